"""Fused attention in Triton: online-softmax forward (saves log-sum-exp) and two backwards
(``attention_bwd(deterministic=...)``, as in FlashAttention):

* deterministic=False (the default): one fused pass over key blocks computing dK, dV and
  adding dQ into a float32 workspace with atomics (5 GEMMs per tile), then a cast;
* deterministic=True: atomic-free and bit-reproducible: a dK/dV pass over key blocks and a
  dQ pass over query blocks (7 GEMMs per tile: S and dP are computed twice).

Both start with the delta preprocess. Masking variants are constexpr flags:

* ``HAS_KPM``: key padding mask (B, Nk), read as one byte per key;
* ``HAS_MASK``: boolean mask broadcastable to (B, H, Nq, Nk), read through its broadcast
  strides (stride 0 on broadcast dims; never expanded in memory);
* ``CAUSAL``: query i sees keys j <= i + Nk - Nq (bottom-right aligned).

Rows with no allowed key produce output 0 and lse = +inf, so every backward term
exp(s - lse) is exactly 0 there: no NaN, zero gradient.

Layout: q (B, H, Nq, D), k/v (B, H, Nk, D), any strides. The head dim is padded to a power
of two (>= 16) inside the kernel and masked. Scores use exp2 with scale·log2(e) folded in.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..masks import kpm_bounds
from ._common import (
    INTERPRET,
    autotune_enabled,
    cast_rne,
    cdiv,
    check_dtype,
    dot_precision,
    mma,
    next_pow2,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- configs


# RECON_ATTN_TILES: "split" (default) prefers tiles whose rows split evenly over the
# warpgroups (64 rows each), so no warpgroup recomputes another's scores; "legacy" is the
# previous list and pruner (for a GPU A/B run). benchmarks/sass_report.py measures both.
TILE_MODES = ("split", "legacy")


def tile_mode() -> str:
    mode = os.environ.get("RECON_ATTN_TILES", "split")
    if mode not in TILE_MODES:
        raise ValueError(f"RECON_ATTN_TILES: expected one of {TILE_MODES}, got {mode!r}")
    return mode


# (BLOCK_M, BLOCK_N, warps, stages), most preferred first: with RECON_TRITON_AUTOTUNE=0 the
# first that fits is used. BLOCK_M tiles queries, BLOCK_N keys in every kernel.
_TILES = {
    "legacy": {
        "fwd": [
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 64, 8, 2),
            (64, 64, 4, 3),
            (128, 32, 8, 3),
            (64, 128, 4, 2),
            (64, 64, 4, 2),
            (64, 32, 4, 3),
            (64, 32, 8, 2),
            (32, 32, 8, 2),
        ],
        "bwd": [
            (64, 128, 8, 2),
            (64, 64, 8, 2),
            (128, 64, 8, 2),
            (64, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
            (32, 64, 8, 2),
            (32, 64, 4, 2),
            (32, 32, 4, 2),
            (32, 32, 8, 1),
        ],
    },
    # sm_90 static sweep (benchmarks/results/static-sm90): the first choices below give the
    # ideal HGMMA count, 1.0 EX2 per score element and 0 spills under triton 3.6 and 3.9
    "split": {
        "fwd": [
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 64, 8, 2),
            (64, 64, 4, 3),
            (128, 32, 8, 3),
            (64, 128, 4, 2),
            (64, 64, 4, 2),
            (64, 32, 4, 3),
            (32, 32, 4, 2),
            # RECON_ATTN_FWD_WS=1 only (pruned otherwise): 4 warps the warp-specialisation
            # pass turns into a producer and two 64-row consumer warpgroups
            (128, 128, 4, 2),
        ],
        # dK/dV: the MMA rows are the BLOCK_N keys (128 over two warpgroups)
        "dkdv": [
            (64, 128, 8, 2),
            (32, 128, 8, 2),
            (32, 128, 8, 3),
            (64, 64, 4, 2),
            (32, 64, 4, 2),
            (32, 32, 4, 2),
            (16, 32, 4, 2),
        ],
        # the fused atomic-dQ backward: dK/dV's tiles (MMA rows = the BLOCK_N keys) plus
        # the (D, M) dQᵀ product
        "atomic": [
            (64, 128, 8, 2),
            (32, 128, 8, 2),
            (64, 64, 4, 2),
            (32, 64, 4, 2),
            (32, 32, 4, 2),
            (16, 32, 4, 2),
            # D = 256 at D_SPLIT = 1 (float32, RECON_ATTN_BWD_DSPLIT=1; no tile above fits):
            # mma.sync, some rows replicated, 0 spills
            (32, 32, 8, 1),
        ],
        # dQ: the MMA rows are the BLOCK_M queries
        "dq": [
            (128, 64, 8, 2),
            (128, 128, 8, 2),
            (128, 32, 8, 2),
            (64, 64, 4, 3),
            (64, 64, 4, 2),
            (64, 32, 4, 2),
            (32, 64, 4, 2),
            (32, 32, 4, 2),
        ],
    },
}


# D_SPLIT = 2 (bwd_d_split: BLOCK_D = 256), most preferred first: each program keeps
# BLOCK_N x 128 dK / dV (or BLOCK_M x 128 dQ) accumulators and the whole-D Q, dO (K, V)
# operand tiles. 0 spills under triton 3.6 and 3.9 (benchmarks/sass_report.py); larger
# tiles spill (64 x 64 / 4 warps: dK, dV and Sᵀ, dPᵀ take 192 per thread) or overflow
# shared memory. Tried at D_SPLIT = 2 only; with a general mask or dropout dK/dV and the
# atomic kernel skip their single-stage tiles (16-40 spill bytes under 3.9).
_DSPLIT_TILES = {
    "dkdv": [(32, 128, 8, 1), (32, 64, 4, 2), (16, 64, 4, 2)],
    # 16 x 128 on 2 stages asks 221-223 KiB of shared memory (of the 227 an sm_90 block has)
    "atomic": [(16, 128, 8, 2), (16, 128, 8, 1)],
    "dq": [(128, 64, 8, 1), (64, 32, 4, 2)],
}
_DSPLIT_SMEM = 224 * 1024


def _tile(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _configs(kind: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    """Candidate tiles (BLOCK_M, BLOCK_N, warps, stages); _pruner drops those that spill,
    overflow shared memory, replicate work or exceed the sequence, so autotuning compiles
    only a few. ``interpret=False`` gives the GPU list in the interpreter (tests)."""
    hook = _desc_blocks if kind == "fwd" else None
    if interpret:
        # Unequal M/N blocks catch transposition bugs; small enough to exercise many tiles.
        return [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1, pre_hook=hook)
        ]
    mode = tile_mode()
    tiles = _TILES[mode].get(kind) or _TILES[mode]["bwd"]
    if mode == "split" and kind != "atomic":
        # the legacy tiles after them: D = 256 falls back to those (see _pruner)
        legacy = _TILES["legacy"].get(kind) or _TILES["legacy"]["bwd"]
        tiles = tiles + [t for t in legacy if t not in tiles]
    if mode == "split":
        tiles = tiles + [t for t in _DSPLIT_TILES.get(kind, []) if t not in tiles]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, pre_hook=hook)
        for bm, bn, w, st in tiles
    ]


def _desc_blocks(nargs) -> None:
    """Config pre-hook of the forward: K and V tensor descriptors (RECON_ATTN_FWD_TMA=host)
    get the (1, 1, BLOCK_N, BLOCK_D) block of the config about to run."""
    for name in ("K", "V"):
        desc = nargs[name]
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]


def _footprint(
    kind: str, bm: int, bn: int, bd: int, stages: int, elem: int = 2, d_split: int = 1
) -> tuple[int, int]:
    """(fp32 accumulator elements per CTA, shared-memory bytes at ``elem``-byte operands).

    fwd keeps O (M x D) and S (M x N) live; dK/dV keeps dK, dV (N x D) and Sᵀ, dPᵀ (N x M);
    dQ keeps dQ (M x D) and S, dP (M x N). Shared memory holds the pipelined operand tiles
    (K, V per stage for fwd/dQ; Q, dO per stage for dK/dV) plus the resident ones, in the
    inputs' dtype: float32 operands take twice the bytes (the 128 x 128 forward at D = 128
    asked an H200 for 262168 B). ``d_split`` > 1: the gradient accumulators (and the extra
    operand tiles of the program's columns) are BLOCK_D / d_split wide."""
    g = bd // d_split  # gradient columns per program
    # the separately loaded column tiles: their own buffers when pipelined (one stage
    # stages them through the other operands', as compiled)
    extra = 1 if d_split > 1 and stages > 1 else 0
    if kind == "fwd":
        acc, smem = bm * bd + bm * bn, stages * bn * bd * 4 + bm * bd * 2
    elif kind == "dkdv":
        acc = 2 * bn * g + 2 * bn * bm
        smem = stages * bm * (bd + extra * g) * 4 + bn * bd * 4
    elif kind == "atomic":  # dK/dV's, plus the dQᵀ (D, M) product and dSᵀ in shared memory
        acc = 2 * bn * g + 2 * bn * bm + g * bm
        smem = stages * bm * (bd + extra * g) * 4 + bn * (bd * 4 + g * 2) + bn * bm * 2
    else:
        acc = bm * g + 2 * bm * bn
        smem = stages * bn * (bd * 4 + extra * g * 2) + bm * bd * 4
    return acc, smem * elem // 2


def splits_rows(kind: str, bm: int, bn: int, warps: int) -> bool:
    """Whether the warps split the MMA rows (BLOCK_N keys for dK/dV, BLOCK_M queries
    otherwise) without recomputing each other's: wgmma tiles (>= 64 rows) need 64 rows per
    warpgroup; mma.sync tiles (< 64 rows) spread over 4 warps, 8 duplicate rows."""
    rows = bn if kind in ("dkdv", "atomic") else bm
    if rows >= 64:
        return rows >= 64 * max(1, warps // 4)
    return warps <= 4


# RECON_ATTN_FWD_MASKED: "wide" (default) lets the fast forward loop (RECON_ATTN_FWD=fast)
# with a general mask or dropout take 128 x 64 tiles at D = 128 (0 spills under triton 3.6
# and 3.9, benchmarks/results/static-sm90); "narrow" keeps the previous 128 x 32 (GPU A/B).
FWD_MASKED_MODES = ("wide", "narrow")


def fwd_masked_mode() -> str:
    mode = os.environ.get("RECON_ATTN_FWD_MASKED", "wide")
    if mode not in FWD_MASKED_MODES:
        raise ValueError(f"RECON_ATTN_FWD_MASKED: expected one of {FWD_MASKED_MODES}, got {mode!r}")
    return mode


def _budget(kind: str, flag, split: bool) -> int:
    """fp32 accumulator elements per thread a tile may keep live without spilling on sm_90
    (ptxas, triton 3.6 and 3.9; benchmarks/sass_report.py). The general mask's (M, N)
    pointer tile and dropout's hash tiles need registers too."""
    if split:
        if kind == "dkdv":  # 2 x 128 x (128 + 32) / 256 = 160 spills nowhere, 192 under 3.6
            return 160
        if kind == "dq":  # 128 x 64 / 8 warps, D = 128: 128, no spill with mask or dropout
            return 128
        if kind == "atomic":  # dK/dV's tiles + dQᵀ: 32 x 128, D = 128: 176 spills nowhere;
            return 176  # 64 x 128, D = 128 (224) spills (dropout: see _pruner)
    if kind == "atomic":  # D = 256, D_SPLIT = 1: 32 x 32 on 8 warps (104 per thread)
        return 104
    if flag("HAS_MASK"):
        budget = 88
    elif flag("HAS_KPM") and not (kind == "fwd" and flag("FAST") and flag("TMA")):
        # (the fast forward with descriptor loads keeps only a key vector for the padding
        # test: 128 x 128 at D = 128, 128 per thread, spills nowhere under 3.6 and 3.9)
        budget = 112
    else:
        budget = 128
    if flag("DROPOUT"):
        # configs above 80 spill with dropout (96 do in some kernels, 80 in none)
        budget = min(budget, 80)
    return budget


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        """Drop configs that would spill, not fit or replicate work across warpgroups
        (checked statically for sm_90 by benchmarks/sass_report.py) or whose tiles exceed
        the sequence lengths."""

        def flag(name):
            return bool(named_args.get(name, kwargs.get(name)))

        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        nq, nk = named_args["NQ"], named_args["NK"]
        # operand bytes (the forward's K, V may be tensor descriptors: Q is always a tensor)
        q = named_args.get("Q")
        elem = q.element_size() if isinstance(q, torch.Tensor) else 2
        # D = 256: no backward tile splits its rows over two warpgroups and fits the
        # registers (the dK, dV or dQ accumulators alone take 128+ per thread), nor runs on
        # 4 warps without spilling its operand fragments: D_SPLIT = 2 (the default for
        # 16-bit operands) halves the accumulators and takes its own tiles; D_SPLIT = 1
        # keeps the legacy rules (8 warps, some rows replicated). The forward with
        # descriptor loads does split them: its loop keeps no K/V addresses, so 128 x 64 on
        # 8 warps (O + S: 160 per thread) and 64 x 64 on 4 spill nowhere, a general mask or
        # key padding included; with dropout (its hash tiles) 128 x 32 (144) and 64 x 32
        # spill nowhere, 128 x 64 does under 3.9 (causal, key padding: 32 bytes). Triton
        # 3.6 and 3.9; float32 operands (no wgmma: FMA dots) keep the legacy tiles
        wide256 = bd == 256 and elem == 2 and kind == "fwd" and flag("FAST") and flag("TMA")
        # D_SPLIT = 2 (the backward at BLOCK_D = 256): its own tiles, in their order
        d_split = int(named_args.get("D_SPLIT", kwargs.get("D_SPLIT")) or 1)
        if tile_mode() == "split" and kind != "fwd":
            if d_split > 1:
                tiles = _DSPLIT_TILES[kind]
                if flag("HAS_MASK") or flag("DROPOUT"):  # the single-stage tiles spill there
                    tiles = [t for t in tiles if t[3] > 1 or kind == "dq"]
                order = {t: i for i, t in enumerate(tiles)}
                pref = [c for c in configs if _tile(c) in order]
                configs = sorted(pref, key=lambda c: order[_tile(c)]) or configs
            else:
                regular = set(_TILES["split"][kind]) | set(_TILES["legacy"]["bwd"])
                configs = [c for c in configs if _tile(c) in regular] or configs
        split = tile_mode() == "split" and (bd < 256 or wide256 or d_split > 1)
        if split and wide256:
            budget = 144 if flag("DROPOUT") else 160
        elif d_split > 1 and kind == "atomic":  # 16 x 128: 152, 32 x 128 on 1 stage (176) spills
            budget = 160
        else:
            budget = _budget(kind, flag, split)
        # RECON_ATTN_FWD_MASKED=wide: the fast loop with a mask or dropout on 8 warps fits
        # 96 (128 x 64 at D = 128: 0 spills); 4-warp tiles keep the budget (64 x 64 spills)
        wide = (
            split
            and kind == "fwd"
            and flag("FAST")
            and (flag("HAS_MASK") or flag("DROPOUT"))
            and fwd_masked_mode() == "wide"
        )
        if (
            kind == "fwd"
            and flag("FAST")
            and fwd_bn_mode() == "128"
            and (bd <= 64 or (bd == 128 and flag("TMA")))
        ):
            # RECON_ATTN_FWD_BN=128: 128 x 128 on 8 warps first (the budget still applies)
            configs = sorted(
                configs,
                key=lambda c: (
                    (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) != (128, 128, 8)
                ),
            )
        ws = kind == "fwd" and flag("WS")
        if ws:  # RECON_ATTN_FWD_WS=1: the warp-specialised 128 x 128 on 4 (-> 12) warps first
            configs = sorted(configs, key=lambda c: not _ws_tile(c))
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            if ws and _ws_tile(c):
                kept.append(c)  # the consumers hold 128 x 128 x 2 / 256 = 128 per thread
                continue
            # tiles much larger than the sequence only waste work
            if bm > max(64, next_pow2(nq)) or bn > max(32, next_pow2(nk)):
                continue
            acc, smem = _footprint(kind, bm, bn, bd, c.num_stages, elem, d_split)
            limit = max(budget, 96) if wide and c.num_warps >= 8 else budget
            smem_cap = _DSPLIT_SMEM if d_split > 1 else 200 * 1024
            if acc > limit * 32 * c.num_warps or smem > smem_cap:
                continue
            if split and not splits_rows(kind, bm, bn, c.num_warps):
                continue
            if kind == "atomic" and flag("DROPOUT") and bm * bn > 16 * 32 * c.num_warps:
                # the keep-mask hash of the (N, M) tile: more than 16 elements per thread
                # spill beside the five products' operands (64 x 128, D = 64, triton 3.6)
                continue
            if not split:
                # the transposed (N, M) tiles of dK/dV with M = 128 spill whatever the
                # budget; D = 256 keeps the Q/dO operand fragments in registers too
                if (kind in ("dkdv", "atomic") and bm > 64) or (bd >= 256 and c.num_warps < 8):
                    continue
            kept.append(c)
        if kept and not autotune_enabled():
            kept = kept[:1]
        if not kept:  # smallest tiles, most warps: always compiles
            kept = [
                min(
                    configs,
                    key=lambda c: (
                        c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"],
                        -c.num_warps,
                        c.num_stages,
                    ),
                )
            ]
        return kept

    return prune


def _ws_tile(c) -> bool:
    """The forward's warp-specialised tile (RECON_ATTN_FWD_WS=1)."""
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 128, 4)


_KEY = ["NQ_KEY", "NK_KEY", "BLOCK_D", "HAS_MASK", "HAS_KPM", "CAUSAL", "DROPOUT"]
_BWD_KEY = [*_KEY, "D_SPLIT", "INTERIOR"]


FWD_MODES = ("fast", "legacy")


def fwd_mode() -> str:
    """RECON_ATTN_FWD: "fast" (default) the forward loop of _fwd_inner_fast, "legacy" the
    previous one (for a GPU A/B run; benchmarks/sass_report.py measures both)."""
    mode = os.environ.get("RECON_ATTN_FWD", "fast")
    if mode not in FWD_MODES:
        raise ValueError(f"RECON_ATTN_FWD: expected one of {FWD_MODES}, got {mode!r}")
    return mode


FWD_TMA_MODES = ("auto", "host", "device", "off")


def fwd_tma_mode() -> str:
    """RECON_ATTN_FWD_TMA: how the fast forward loop reads K and V.

    * "host": through host-side tensor descriptors (triton.tools.tensor_descriptor.
      TensorDescriptor over the 4-D (B, H, Nk, D) tensors: UTMALDG on sm_90, zero fill past
      Nk and the head dim, so no load needs a mask), whatever the head dim and masks;
    * "device": the same loads through descriptors the kernel makes itself
      (tl.make_tensor_descriptor over the (Nk, D) slice of its (batch, head); the 128-byte
      tensor maps live in a global scratch buffer, see _desc_scratch): the descriptor
      address is a uniform register, not a kernel-parameter address recomputed every
      iteration, so the loop is shorter (BLOCK_D = 128, 128 x 128: 7.97 / 7.48 instructions
      per score element under triton 3.9 / 3.6 against 8.12 / 7.67 with "host");
    * "auto" (default): "device" where the static sweep finds descriptors better (BLOCK_D =
      128 with no general mask or dropout: there they take the 128 x 128 tile, 7.97 / 7.48
      instructions per score element under triton 3.9 / 3.6 against 11.2 / 10.5 for the
      cp.async 128 x 64, with key padding too, whose loop below the first padding key is
      the unmasked one; BLOCK_D = 256 with any masks or dropout: descriptors let 128 x 64
      (dropout: 128 x 32) split its rows over two warpgroups without spilling, 14.25 /
      13.62 instructions per score element against 51.75 / 40.75 for the pointer loop's
      64 x 32 with rows replicated, 18.97 / 20.97 against 62.25 / 50.5 with a general mask,
      38.62 / 36.94 against 83.25 / 70 with dropout; at BLOCK_D = 64 "device" is 7.22 /
      7.03 against 7.27 / 7.00 with pointers, not better under 3.6), pointers elsewhere;
    * "off": pointer loads (cp.async) always.

    Any mode falls back to pointers per launch where a descriptor is not allowed (_tma_ok)."""
    mode = os.environ.get("RECON_ATTN_FWD_TMA", "auto")
    if mode not in FWD_TMA_MODES:
        raise ValueError(f"RECON_ATTN_FWD_TMA: expected one of {FWD_TMA_MODES}, got {mode!r}")
    return mode


def fwd_desc_kind(block_d: int, has_mask: bool, has_kpm: bool, dropout: bool) -> str:
    """How the fast forward reads K and V (RECON_ATTN_FWD_TMA), before the per-launch checks
    of _tma_ok: "host" or "device" descriptors, or "off" (pointers)."""
    mode = fwd_tma_mode()
    if mode == "auto":
        if block_d == 256 or (block_d == 128 and not (has_mask or dropout)):
            return "device"
        return "off"
    return mode


def fwd_tma_wanted(block_d: int, has_mask: bool, has_kpm: bool, dropout: bool) -> bool:
    """Whether the fast forward reads K and V through descriptors (RECON_ATTN_FWD_TMA), before
    the per-launch checks of _tma_ok."""
    return fwd_desc_kind(block_d, has_mask, has_kpm, dropout) != "off"


FWD_WS_MODES = ("0", "1")


def fwd_ws_mode() -> bool:
    """RECON_ATTN_FWD_WS=1: warp-specialise the full-block loop of the fast forward
    (tl.range(..., warp_specialize=True): a TMA producer warpgroup and two consumer
    warpgroups of 64 query rows each, USETMAXREG on sm_90) where its loads go through device
    descriptors (RECON_ATTN_FWD_TMA=device; Q is then read through one too) and there is no
    general mask, key padding or dropout: the 128 x 128 tile on 4 warps, which the pass
    turns into 12. "0" (default): no warp specialisation (a GPU A/B switch: the static
    report cannot time it)."""
    mode = os.environ.get("RECON_ATTN_FWD_WS", "0")
    if mode not in FWD_WS_MODES:
        raise ValueError(f"RECON_ATTN_FWD_WS: expected one of {FWD_WS_MODES}, got {mode!r}")
    return mode == "1"


def fwd_ws_wanted(kind: str, has_mask: bool, has_kpm: bool, dropout: bool) -> bool:
    """Whether the fast forward with K/V loads of ``kind`` (fwd_desc_kind) is warp-specialised."""
    return fwd_ws_mode() and kind == "device" and not (has_mask or has_kpm or dropout)


FWD_BN_MODES = ("128", "64")


def fwd_bn_mode() -> str:
    """RECON_ATTN_FWD_BN: "128" (default) puts the 128 x 128 / 8-warp tile first for the fast
    forward where it fits the register budget and does not spill: BLOCK_D <= 64, or
    BLOCK_D = 128 with descriptor loads (with cp.async pointers it spills 16 bytes under
    triton 3.9); the rescale of O and the per-iteration overhead are paid once per 128 keys.
    "64": the previous order (128 x 64 first)."""
    mode = os.environ.get("RECON_ATTN_FWD_BN", "128")
    if mode not in FWD_BN_MODES:
        raise ValueError(f"RECON_ATTN_FWD_BN: expected one of {FWD_BN_MODES}, got {mode!r}")
    return mode


BWD_DSPLIT_MODES = ("auto", "1", "2")


def bwd_d_split(block_d: int, elem: int = 2) -> int:
    """RECON_ATTN_BWD_DSPLIT: how many programs share each backward tile's gradient
    columns (dK, dV, dQ), each computing Sᵀ and dPᵀ over the whole head dim and owning
    BLOCK_D / D_SPLIT columns. "auto" (default): 2 at BLOCK_D = 256 with 16-bit operands
    (tile mode "split"), 1 elsewhere; "1": never; "2": wherever BLOCK_D >= 32 (the
    interpreter tests).

    Why: at D = 256 no backward tile holds the dK and dV accumulators of 64 keys in one
    warpgroup's registers (256 per thread), and 8 warps on 64 rows replicate the score
    products (triton puts a chained dot's warps on its rows), so the tiles fell back to
    32 x 32 mma.sync with rows replicated (99 / 139 instructions per score element, dK/dV
    and atomic, triton 3.6). Split in two, 64 keys x 128 columns fit one warpgroup on
    wgmma; the price is Sᵀ and dPᵀ (and exp2) computed twice."""
    mode = os.environ.get("RECON_ATTN_BWD_DSPLIT", "auto")
    if mode not in BWD_DSPLIT_MODES:
        raise ValueError(f"RECON_ATTN_BWD_DSPLIT: expected one of {BWD_DSPLIT_MODES}, got {mode!r}")
    if mode == "2":
        return 2 if block_d >= 32 else 1
    if mode == "auto" and block_d == 256 and elem == 2 and tile_mode() == "split":
        return 2
    return 1


BWD_FAST_MODES = ("1", "0")


def bwd_fast() -> bool:
    """RECON_ATTN_BWD_FAST: "1" (default) splits each backward program's loop in two: the
    interior blocks (a whole key block and whole query blocks with every pair allowed: below
    the causal diagonal, before the sequence's first padding key, no general mask, head dim
    = BLOCK_D) load without masks and test nothing; the rest (the causal diagonal, the
    last, partial blocks, padding keys, a general mask) test every pair. Not at BLOCK_D =
    256 with dropout (the second loop spills inside it under triton 3.6). "0": one loop
    that tests every pair (the A/B).

    Why: the test (bounds, causal) and the masked loads were a fixed cost on every score
    element of every block. Static sweep (sm_90a, bf16, first-choice tiles, SASS
    instructions per score element, triton 3.6 / 3.9), before -> after: D = 128 atomic
    24.69 -> 19.44 / 26.69 -> 22.81, causal 26.88 -> 19.81 / 29.19 -> 22.81; dK/dV 18.88 ->
    15.62 / 21.0 -> 18.31; dQ 10.91 -> 9.03 / 12.84 -> 10.53, causal 13.97 -> 9.03 /
    14.84 -> 10.53. The price: the kernel holds both loops, and ptxas saves a few
    registers around the interior one (at most 56 bytes of spill stores, none inside a
    loop)."""
    mode = os.environ.get("RECON_ATTN_BWD_FAST", "1")
    if mode not in BWD_FAST_MODES:
        raise ValueError(f"RECON_ATTN_BWD_FAST: expected one of {BWD_FAST_MODES}, got {mode!r}")
    return mode == "1"


def bwd_interior(block_d: int, d: int, has_mask: bool, dropout: bool) -> bool:
    """Whether the backward kernels run their interior loop (the INTERIOR constexpr):
    RECON_ATTN_BWD_FAST=1, head dim = its block, no general mask, and not BLOCK_D = 256 with
    dropout (there the interior loop spills inside it under triton 3.6)."""
    return bwd_fast() and d == block_d and not has_mask and not (block_d == 256 and dropout)


def static_constexprs(
    kind: str, block_d: int = 128, has_mask=False, has_kpm=False, dropout=False, causal=False
) -> dict:
    """Constexpr arguments the launchers pass besides the tile and the mask flags, for the
    current switches (benchmarks/sass_report.py compiles what a launch would run, for a
    power-of-two head dim with descriptor-friendly strides). TMA=True: K and V are read
    through descriptors: host-side ones (the report gives them the type
    tensordesc<dtype[1, 1, BLOCK_N, BLOCK_D]>), or, DEV_DESC=True, pointers the kernel makes
    descriptors of; WS=True: the warp-specialised loop."""
    if kind == "fwd":
        fast = fwd_mode() == "fast"
        desc = fwd_desc_kind(block_d, has_mask, has_kpm, dropout) if fast else "off"
        ws = fwd_ws_wanted(desc, has_mask, has_kpm, dropout) and block_d <= 128 and not causal
        return {
            "FAST": fast,
            "EVEN_D": True,
            "TMA": desc != "off",
            "DEV_DESC": desc == "device",
            "WS": ws,
        }
    return {
        "D_SPLIT": bwd_d_split(block_d),
        "INTERIOR": bwd_interior(block_d, block_d, has_mask, dropout),
    }


# --------------------------------------------------------------------------- shared pieces


@triton.jit
def _allowed(
    offs_m,
    offs_n,
    b,
    h,
    MASK,
    KPM,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOUNDS: tl.constexpr,
    KEYS_ON_ROWS: tl.constexpr,
):
    """Which (query, key) pairs may attend, from 1-D query/key offsets: an (M, N) tile for
    forward/dQ, or (N, M) with KEYS_ON_ROWS for the transposed tiles of dK/dV.

    The key padding mask is loaded once per key as a 1-D vector and broadcast (a 2-D
    pointer tile would cost a 64-bit register per element)."""
    if KEYS_ON_ROWS:
        qi = offs_m[None, :]
        kj = offs_n[:, None]
    else:
        qi = offs_m[:, None]
        kj = offs_n[None, :]
    ok = (qi >= 0) & (kj >= 0)  # all True, with the tile's shape
    if BOUNDS:
        ok = ok & (qi < NQ) & (kj < NK)
    if HAS_KPM:
        kp = tl.load(KPM + b * skpb + offs_n * skpn, mask=offs_n < NK, other=0) != 0
        if KEYS_ON_ROWS:
            ok = ok & kp[:, None]
        else:
            ok = ok & kp[None, :]
    if HAS_MASK:
        mk = tl.load(
            MASK + b * smb + h * smh + qi * smm + kj * smn, mask=(qi < NQ) & (kj < NK), other=0
        )
        ok = ok & (mk != 0)
    if CAUSAL:
        ok = ok & (kj <= qi + (NK - NQ))
    return ok


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (reference.dropout_keep is the specification)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _drop_key(seed, bh):
    """The dropout hash key of one (batch, head): mix32(seed + bh * golden ratio)."""
    return _mix32(seed.to(tl.uint32, bitcast=True) + bh.to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _keep(key, offs_m, offs_n, NK, drop_thresh, TRANS: tl.constexpr):
    """Which (query, key) probabilities survive dropout: (M, N), or (N, M) with TRANS."""
    if TRANS:
        idx = offs_m.to(tl.uint32)[None, :] * NK.to(tl.uint32) + offs_n.to(tl.uint32)[:, None]
    else:
        idx = offs_m.to(tl.uint32)[:, None] * NK.to(tl.uint32) + offs_n.to(tl.uint32)[None, :]
    return (_mix32(idx ^ key) >> 8) >= drop_thresh


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    MASK,
    KPM,
    offs_m,
    offs_d,
    b,
    h,
    skn,
    skd,
    svn,
    svd,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HEAD_DIM,
    qk_scale,
    drop_key,
    drop_thresh,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOUNDS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    DEV_DESC: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    if FAST:
        acc, l_i, m_i = _fwd_inner_fast(
            acc, l_i, m_i, q, K, V, MASK, KPM, offs_m, offs_d, b, h, skn, skd, svn, svd,
            smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale, drop_key,
            drop_thresh, lo, hi, BLOCK_N, HAS_MASK, HAS_KPM, CAUSAL, BOUNDS, DROPOUT,
            PRECISION, UPCAST, EVEN_D, TMA, DEV_DESC, WS,
        )  # fmt: skip
    else:
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < NK
            kt = tl.load(
                K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
            s = s * qk_scale
            if HAS_MASK or HAS_KPM or BOUNDS:
                ok = _allowed(
                    offs_m,
                    offs_n,
                    b,
                    h,
                    MASK,
                    KPM,
                    smb,
                    smh,
                    smm,
                    smn,
                    skpb,
                    skpn,
                    NQ,
                    NK,
                    HAS_MASK,
                    HAS_KPM,
                    CAUSAL and BOUNDS,
                    BOUNDS,
                    False,
                )
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing allowed so far keeps m = -inf: shift by 0 instead (exp2(-inf) = 0)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser: before dropout
            if DROPOUT:
                p = tl.where(_keep(drop_key, offs_m, offs_n, NK, drop_thresh, False), p, 0.0)
            v = tl.load(
                V + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = mma(cast_rne(p, v.dtype, UPCAST), v, acc * alpha[:, None], PRECISION, UPCAST)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_fast(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    MASK,
    KPM,
    offs_m,
    offs_d,
    b,
    h,
    skn,
    skd,
    svn,
    svd,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HEAD_DIM,
    qk_scale,
    drop_key,
    drop_thresh,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    BOUNDS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    DEV_DESC: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    """_fwd_inner with fewer instructions per score element (RECON_ATTN_FWD=fast):

    * the row max is taken on the raw scores and m_i is kept scaled, so the exponent
      s·scale − m is one FFMA (scale > 0 commutes with max);
    * full blocks (not BOUNDS) load K/V without masks when the head dim is a power of two
      (EVEN_D), through pointers advanced by BLOCK_N rows instead of recomputed;
    * rows of a full block without masks always have a finite max: no -inf guard;
    * TMA (RECON_ATTN_FWD_TMA=host): K and V are (B, H, Nk, D) tensor descriptors with
      blocks (1, 1, BLOCK_N, BLOCK_D), zero-filled past Nk and the head dim; DEV_DESC
      (RECON_ATTN_FWD_TMA=device): (Nk, D) descriptors of this (batch, head) with blocks
      (BLOCK_N, BLOCK_D), made by the kernel;
    * WS (RECON_ATTN_FWD_WS=1, with DEV_DESC): the loop is warp-specialised."""
    offs_j = tl.arange(0, BLOCK_N)
    BLOCK_D: tl.constexpr = q.shape[1]
    if TMA:
        b32 = b.to(tl.int32)
        h32 = h.to(tl.int32)
    else:
        # 32-bit offsets inside the tile, loop-invariant; the scalar bases advance
        k_off = offs_j[None, :] * skn + offs_d[:, None] * skd
        v_off = offs_j[:, None] * svn + offs_d[None, :] * svd
        kt_ptrs = K + lo * skn
        v_ptrs = V + lo * svn
        d_ok = offs_d < HEAD_DIM
    GUARD: tl.constexpr = HAS_MASK or HAS_KPM or BOUNDS
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        offs_n = start_n + offs_j
        if DEV_DESC:
            kt = tl.trans(K.load([start_n, 0]))
        elif TMA:
            kt = tl.trans(K.load([b32, h32, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
        elif BOUNDS or not EVEN_D:
            n_ok = offs_n < NK
            kt = tl.load(kt_ptrs + k_off, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        else:
            kt = tl.load(kt_ptrs + k_off)
        s = mma(q, kt, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        if GUARD:
            ok = _allowed(
                offs_m,
                offs_n,
                b,
                h,
                MASK,
                KPM,
                smb,
                smh,
                smm,
                smn,
                skpb,
                skpn,
                NQ,
                NK,
                HAS_MASK,
                HAS_KPM,
                CAUSAL and BOUNDS,
                BOUNDS,
                False,
            )
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if GUARD:
            # a row with nothing allowed so far keeps m = -inf: shift by 0 (exp2(-inf) = 0)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser: before dropout
        if DROPOUT:
            p = tl.where(_keep(drop_key, offs_m, offs_n, NK, drop_thresh, False), p, 0.0)
        if DEV_DESC:
            v = V.load([start_n, 0])
        elif TMA:
            v = V.load([b32, h32, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        elif BOUNDS or not EVEN_D:
            v = tl.load(v_ptrs + v_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs + v_off)
        acc = mma(cast_rne(p, v.dtype, UPCAST), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new
        if not TMA:
            kt_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N * svn
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs("fwd"),
    key=_KEY + ["FAST", "TMA", "DEV_DESC", "WS"],  # the loop variants tune apart
    prune_configs_by={"early_config_prune": _pruner("fwd")},
)
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    MASK,
    KPM,
    KVHI,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    som,
    sod,
    slb,
    slh,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    H,
    NQ,
    NK,
    HEAD_DIM,
    NQ_KEY,
    NK_KEY,
    qk_scale,
    seed,
    drop_thresh,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FAST: tl.constexpr = False,
    EVEN_D: tl.constexpr = False,
    TMA: tl.constexpr = False,
    DEV_DESC: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m  # heaviest query blocks first: better tail balance
    bh = (pid // num_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    if WS:
        # the warp-specialisation pass fails on a pointer-loaded operand of the loop's dot
        # (NVGPUWarpSpecialization: "expected non-null blocks", triton 3.6 and 3.9)
        q_desc = tl.make_tensor_descriptor(
            Q + b * sqb + h * sqh, [NQ, HEAD_DIM], [sqm, 1], [BLOCK_M, BLOCK_D]
        )
        q = q_desc.load([pid_m * BLOCK_M, 0])
    else:
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    if DEV_DESC:  # (Nk, D) descriptors of this (batch, head), zero fill past Nk and D
        K = tl.make_tensor_descriptor(
            K + b * skb + h * skh, [NK, HEAD_DIM], [skn, 1], [BLOCK_N, BLOCK_D]
        )
        V = tl.make_tensor_descriptor(
            V + b * svb + h * svh, [NK, HEAD_DIM], [svn, 1], [BLOCK_N, BLOCK_D]
        )
    elif not TMA:  # host descriptors take (b, h) as coordinates
        K += b * skb + h * skh
        V += b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    drop_key = _drop_key(seed, bh) if DROPOUT else 0

    # Keys [0, n_full) need no causal/bounds test for any row of this block; the rest do.
    if CAUSAL:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M + NK - NQ)
        hi = tl.maximum(hi, 0)
        n_full = tl.minimum(hi, pid_m * BLOCK_M + NK - NQ + 1)
    else:
        hi = NK
        n_full = NK
    if HAS_KPM:
        # keys after the last real key of this sequence are padding: skip their blocks
        hi = tl.minimum(hi, tl.load(KVHI + 2 * b + 1))
        n_full = tl.minimum(n_full, hi)
    n_full = tl.maximum(n_full, 0) // BLOCK_N * BLOCK_N
    n_plain = n_full
    if HAS_KPM:
        # the keys before this sequence's first padding key are all real: the full blocks
        # there skip the key-padding test (for right-padded batches, every full block)
        n_plain = tl.minimum(tl.load(KVHI + 2 * b) // BLOCK_N * BLOCK_N, n_full)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K, V, MASK, KPM, offs_m, offs_d, b, h, skn, skd, svn, svd,
        smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale, drop_key, drop_thresh,
        0, n_plain, BLOCK_N, HAS_MASK, False, CAUSAL, False, DROPOUT, PRECISION, UPCAST,
        FAST, EVEN_D, TMA, DEV_DESC, WS,
    )  # fmt: skip
    if HAS_KPM:
        # full blocks from the first padding key on: the per-key test
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, K, V, MASK, KPM, offs_m, offs_d, b, h, skn, skd, svn, svd,
            smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale, drop_key,
            drop_thresh, n_plain, n_full, BLOCK_N, HAS_MASK, True, CAUSAL, False, DROPOUT,
            PRECISION, UPCAST, FAST, EVEN_D, TMA, DEV_DESC, WS,
        )  # fmt: skip
    if not WS:
        # the tail: keys [n_full, hi). WS launches have none (non-causal, Nk a multiple
        # of 128, no key padding); a loop after the warp-specialised one fails the
        # pass (NVGPUWarpSpecialization: "expected non-null blocks", triton 3.6 and 3.9)
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            MASK,
            KPM,
            offs_m,
            offs_d,
            b,
            h,
            skn,
            skd,
            svn,
            svd,
            smb,
            smh,
            smm,
            smn,
            skpb,
            skpn,
            NQ,
            NK,
            HEAD_DIM,
            qk_scale,
            drop_key,
            drop_thresh,
            n_full,
            hi,
            BLOCK_N,
            HAS_MASK,
            HAS_KPM,
            CAUSAL,
            True,
            DROPOUT,
            PRECISION,
            UPCAST,
            FAST,
            EVEN_D,
            TMA,
            DEV_DESC,
            WS,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * drop_scale
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
        cast_rne(out, O.dtype.element_ty, UPCAST),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=m_ok)


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    DQ_ACC,
    sob,
    soh,
    som,
    sod,
    sdb,
    sdh,
    sdm,
    sdd,
    H,
    NQ,
    HEAD_DIM,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (float32), stored contiguous (B, H, Nq). ZERO_DQ: also
    zero the atomic path's (B, H, D, Nq) float32 dQ accumulator (no separate memset)."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = (tl.program_id(0) // num_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=msk, other=0.0
    )
    do = tl.load(
        DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=msk, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=offs_m < NQ)
    if ZERO_DQ:
        zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        tl.store(
            DQ_ACC + bh * NQ * HEAD_DIM + offs_d[None, :] * NQ + offs_m[:, None], zero, mask=msk
        )


@triton.jit
def _bwd_kv_loop(
    dk,
    dv,
    k,
    v,
    kt,
    Q,
    DO,
    LSE,
    DELTA,
    DQ_ACC,
    MASK,
    KPM,
    offs_n,
    offs_d,
    offs_g,
    b,
    h,
    sqm,
    sqd,
    sdom,
    sdod,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HEAD_DIM,
    qk_scale,
    drop_key,
    drop_thresh,
    drop_scale,
    lo,
    gap_lo,
    gap_hi,
    hi,
    BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    GUARD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """The query-block loop of one key block (dK/dV, and with ATOMIC dQᵀ += Kᵀ dSᵀ into
    DQ_ACC): dV += Pᵀ dO, dK += dSᵀ Q over the query blocks [lo, gap_lo) and [gap_hi, hi).

    GUARD: loads masked at the query and head-dim bounds, every (query, key) pair tested
    (bounds, causal, masks). Not GUARD (RECON_ATTN_BWD_FAST=1, the interior blocks: whole
    query blocks, a whole key block, head dim = BLOCK_D, no general mask, no causal pair
    masked, no padding key): no load masks and no test, the loop [lo, hi) (pass gap_lo =
    gap_hi)."""
    BLOCK_N: tl.constexpr = k.shape[0]
    BLOCK_D: tl.constexpr = k.shape[1]
    offs_i = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < HEAD_DIM
    for it in range(lo, hi - (gap_hi - gap_lo), BLOCK_M):
        if GUARD:
            start_m = it + tl.where(it >= gap_lo, gap_hi - gap_lo, 0)
        else:
            start_m = it
        offs_m = start_m + offs_i
        if GUARD:
            m_ok = offs_m < NQ
            qt = tl.load(
                Q + offs_m[None, :] * sqm + offs_d[:, None] * sqd,
                mask=m_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            lse = tl.load(LSE + offs_m * slm, mask=m_ok, other=float("inf")) * 1.4426950408889634
        else:
            qt = tl.load(Q + offs_m[None, :] * sqm + offs_d[:, None] * sqd)
            lse = tl.load(LSE + offs_m * slm) * 1.4426950408889634
        st = mma(k, qt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST)  # (N, M)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if GUARD:
            ok = _allowed(
                offs_m, offs_n, b, h, MASK, KPM, smb, smh, smm, smn, skpb, skpn, NQ, NK,
                HAS_MASK, HAS_KPM, CAUSAL, True, True,
            )  # fmt: skip
            pt = tl.where(ok, pt, 0.0)
            do = tl.load(
                DO + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                mask=m_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        else:
            do = tl.load(DO + offs_m[:, None] * sdom + offs_d[None, :] * sdod)
        if D_SPLIT == 1:
            do_g = do
            q_g = tl.trans(qt)
        elif GUARD:  # this program's dO and Q columns, for dV and dK (dQ's from K)
            g_msk = m_ok[:, None] & g_ok[None, :]
            do_g = tl.load(
                DO + offs_m[:, None] * sdom + offs_g[None, :] * sdod, mask=g_msk, other=0.0
            )
            q_g = tl.load(Q + offs_m[:, None] * sqm + offs_g[None, :] * sqd, mask=g_msk, other=0.0)
        else:
            do_g = tl.load(DO + offs_m[:, None] * sdom + offs_g[None, :] * sdod)
            q_g = tl.load(Q + offs_m[:, None] * sqm + offs_g[None, :] * sqd)
        if DROPOUT:  # out = (P∘Z) V, Z = keep / (1 - p): dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ)∘Z
            keep = _keep(drop_key, offs_m, offs_n, NK, drop_thresh, True)
            dv = mma(
                cast_rne(tl.where(keep, pt, 0.0), do.dtype, UPCAST), do_g, dv, PRECISION, UPCAST
            )
        else:
            dv = mma(cast_rne(pt, do.dtype, UPCAST), do_g, dv, PRECISION, UPCAST)
        if GUARD:
            delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        else:
            delta = tl.load(DELTA + offs_m)
        dpt = mma(
            v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION, UPCAST
        )
        if DROPOUT:
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
        dst = cast_rne(pt * (dpt - delta[None, :]), qt.dtype, UPCAST)
        dk = mma(dst, q_g, dk, PRECISION, UPCAST)
        if ATOMIC:
            dqt = mma(
                kt,
                dst,
                tl.zeros([BLOCK_D // D_SPLIT, BLOCK_M], dtype=tl.float32),
                PRECISION,
                UPCAST,
            )
            dq_ptrs = DQ_ACC + offs_g[:, None] * NQ + offs_m[None, :]
            if GUARD:
                tl.atomic_add(dq_ptrs, dqt, mask=g_ok[:, None] & m_ok[None, :], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dqt, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_kv_sweep(
    k,
    v,
    kt,
    Q,
    DO,
    LSE,
    DELTA,
    DQ_ACC,
    MASK,
    KPM,
    KVHI,
    offs_n,
    offs_d,
    offs_g,
    b,
    h,
    pid_n,
    sqm,
    sqd,
    sdom,
    sdod,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HEAD_DIM,
    qk_scale,
    drop_key,
    drop_thresh,
    drop_scale,
    BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
    INTERIOR: tl.constexpr,
):
    """dK, dV (fp32, unscaled) of one key block over every query block it visits, [lo,
    q_end) (ATOMIC: dQᵀ added into DQ_ACC on the way): with INTERIOR (bwd_interior) the
    [gap_lo, gap_hi), whole query blocks that see every key of a whole key block (below the
    causal diagonal, the key block before the sequence's first padding key, no general
    mask), in the loop with no test, then the rest in the tested one."""
    BLOCK_N: tl.constexpr = k.shape[0]
    BLOCK_D: tl.constexpr = k.shape[1]
    n0 = pid_n * BLOCK_N
    lo = 0
    if CAUSAL:
        # queries i < j - (Nk - Nq) cannot see key j: start at the first block that can
        lo = tl.maximum(n0 - (NK - NQ), 0) // BLOCK_M * BLOCK_M
    q_end = NQ
    if HAS_KPM:
        # a key block wholly after the sequence's last real key adds nothing anywhere
        q_end = tl.where(n0 < tl.load(KVHI + 2 * b + 1), NQ, 0)
    q_end = tl.maximum(q_end, lo)
    gap_lo = lo
    gap_hi = lo
    dk = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], dtype=tl.float32)
    if INTERIOR:
        if CAUSAL:
            # from here on every query of a block sees the whole key block
            gap_lo = tl.maximum(n0 + BLOCK_N - 1 - (NK - NQ), 0)
            gap_lo = tl.minimum(tl.maximum(tl.cdiv(gap_lo, BLOCK_M) * BLOCK_M, lo), q_end)
        whole = n0 + BLOCK_N <= NK
        if HAS_KPM:
            whole = whole & (n0 + BLOCK_N <= tl.load(KVHI + 2 * b))
        gap_hi = tl.where(
            whole, tl.minimum(tl.maximum(NQ // BLOCK_M * BLOCK_M, gap_lo), q_end), gap_lo
        )
        # the interior query blocks: no load masks, no test
        dk, dv = _bwd_kv_loop(
            dk, dv, k, v, kt, Q, DO, LSE, DELTA, DQ_ACC, MASK, KPM, offs_n, offs_d, offs_g, b,
            h, sqm, sqd, sdom, sdod, slm, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM,
            qk_scale, drop_key, drop_thresh, drop_scale, gap_lo, gap_hi, gap_hi, gap_hi,
            BLOCK_M, HAS_MASK, HAS_KPM, CAUSAL, False, DROPOUT, PRECISION, UPCAST, D_SPLIT,
            ATOMIC,
        )  # fmt: skip
    # the rest (causal diagonal, the last query block, masks): every pair tested
    dk, dv = _bwd_kv_loop(
        dk, dv, k, v, kt, Q, DO, LSE, DELTA, DQ_ACC, MASK, KPM, offs_n, offs_d, offs_g, b, h,
        sqm, sqd, sdom, sdod, slm, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM,
        qk_scale, drop_key, drop_thresh, drop_scale, lo, gap_lo, gap_hi, q_end, BLOCK_M,
        HAS_MASK, HAS_KPM, CAUSAL, True, DROPOUT, PRECISION, UPCAST, D_SPLIT, ATOMIC,
    )  # fmt: skip
    return dk, dv


@triton.jit
def _bwd_q_loop(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    MASK,
    KPM,
    offs_m,
    offs_d,
    offs_g,
    b,
    h,
    skn,
    skd,
    svn,
    svd,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    NQ,
    NK,
    HEAD_DIM,
    qk_scale,
    drop_key,
    drop_thresh,
    drop_scale,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    GUARD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
):
    """The key-block loop of one query block: dQ += dS K over the key blocks [lo, hi).
    lse is in log2 units. GUARD as in _bwd_kv_loop: without it (the interior: whole key
    blocks every query of a whole block sees) no load masks and no test."""
    BLOCK_M: tl.constexpr = q.shape[0]
    offs_j = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_j
        if GUARD:
            n_ok = offs_n < NK
            kt = tl.load(
                K + offs_n[None, :] * skn + offs_d[:, None] * skd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            vt = tl.load(
                V + offs_n[None, :] * svn + offs_d[:, None] * svd,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
        else:
            kt = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd)
            vt = tl.load(V + offs_n[None, :] * svn + offs_d[:, None] * svd)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if GUARD:
            ok = _allowed(
                offs_m, offs_n, b, h, MASK, KPM, smb, smh, smm, smn, skpb, skpn, NQ, NK,
                HAS_MASK, HAS_KPM, CAUSAL, True, False,
            )  # fmt: skip
            p = tl.where(ok, p, 0.0)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION, UPCAST)
        if DROPOUT:
            keep = _keep(drop_key, offs_m, offs_n, NK, drop_thresh, False)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if D_SPLIT == 1:
            k_g = tl.trans(kt)
        elif GUARD:  # this program's K columns
            k_g = tl.load(
                K + offs_n[:, None] * skn + offs_g[None, :] * skd,
                mask=n_ok[:, None] & g_ok[None, :],
                other=0.0,
            )
        else:
            k_g = tl.load(K + offs_n[:, None] * skn + offs_g[None, :] * skd)
        dq = mma(cast_rne(ds, kt.dtype, UPCAST), k_g, dq, PRECISION, UPCAST)
    return dq


@triton.autotune(
    configs=_configs("dkdv"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _pruner("dkdv")}
)
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    MASK,
    KPM,
    KVHI,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    slb,
    slh,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    H,
    NQ,
    NK,
    HEAD_DIM,
    NQ_KEY,
    NK_KEY,
    qk_scale,
    sm_scale,
    seed,
    drop_thresh,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
    INTERIOR: tl.constexpr = False,
):
    """One program per key block: dV = Pᵀ dO and dK = scale · dSᵀ Q over all query blocks.

    Tiles are kept transposed ((N, M) orientation) so no transpose is needed for the dots.
    dK, dV are written contiguous (B, H, Nk, D)."""
    num_n = tl.cdiv(NK, BLOCK_N)
    pid = tl.program_id(0)
    # D_SPLIT programs per key block, each owning BLOCK_D / D_SPLIT gradient columns
    pid_d = pid % D_SPLIT
    pid_n = pid // D_SPLIT % num_n
    bh = (pid // D_SPLIT // num_n).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = pid_d * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    n_ok = offs_n < NK
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < HEAD_DIM
    kv_msk = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=kv_msk,
        other=0.0,
    )
    v = tl.load(
        V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
        mask=kv_msk,
        other=0.0,
    )
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += b * slb + h * slh
    DELTA += bh * NQ

    drop_key = _drop_key(seed, bh) if DROPOUT else 0
    dk, dv = _bwd_kv_sweep(
        k, v, k, Q, DO, LSE, DELTA, DELTA, MASK, KPM, KVHI, offs_n, offs_d, offs_g, b, h, pid_n,
        sqm, sqd, sdom, sdod, slm, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale,
        drop_key, drop_thresh, drop_scale, BLOCK_M, HAS_MASK, HAS_KPM, CAUSAL, DROPOUT,
        PRECISION, UPCAST, D_SPLIT, False, INTERIOR,
    )  # fmt: skip
    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * drop_scale
    out_off = bh * NK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_g[None, :]
    out_msk = n_ok[:, None] & g_ok[None, :]
    tl.store(DK + out_off, cast_rne(dk, DK.dtype.element_ty, UPCAST), mask=out_msk)
    tl.store(DV + out_off, cast_rne(dv, DV.dtype.element_ty, UPCAST), mask=out_msk)


@triton.autotune(
    configs=_configs("dq"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _pruner("dq")}
)
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    MASK,
    KPM,
    KVHI,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    slb,
    slh,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    H,
    NQ,
    NK,
    HEAD_DIM,
    NQ_KEY,
    NK_KEY,
    qk_scale,
    sm_scale,
    seed,
    drop_thresh,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
    INTERIOR: tl.constexpr = False,
):
    """One program per query block: dQ = scale · dS K over the key blocks it can see.
    dQ is written contiguous (B, H, Nq, D)."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid = tl.program_id(0)
    # D_SPLIT programs per query block, each owning BLOCK_D / D_SPLIT columns of dQ
    pid_d = pid % D_SPLIT
    pid_m = pid // D_SPLIT % num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    bh = (pid // D_SPLIT // num_m).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = pid_d * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    m_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < HEAD_DIM
    q_msk = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_msk, other=0.0
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
        mask=q_msk,
        other=0.0,
    )
    lse = (
        tl.load(LSE + b * slb + h * slh + offs_m * slm, mask=m_ok, other=float("inf"))
        * 1.4426950408889634
    )
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=m_ok, other=0.0)
    K += b * skb + h * skh
    V += b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D // D_SPLIT], dtype=tl.float32)
    drop_key = _drop_key(seed, bh) if DROPOUT else 0
    hi = NK
    if CAUSAL:
        hi = tl.maximum(tl.minimum(NK, (pid_m + 1) * BLOCK_M + NK - NQ), 0)
    if HAS_KPM:
        hi = tl.minimum(hi, tl.load(KVHI + 2 * b + 1))
    n_int = 0
    if INTERIOR:
        # the interior: whole key blocks that every query of this (whole) block sees
        n_int = hi
        if CAUSAL:
            n_int = tl.minimum(n_int, pid_m * BLOCK_M + NK - NQ + 1)
        if HAS_KPM:  # before the sequence's first padding key
            n_int = tl.minimum(n_int, tl.load(KVHI + 2 * b))
        n_int = tl.where((pid_m + 1) * BLOCK_M <= NQ, tl.maximum(n_int, 0) // BLOCK_N * BLOCK_N, 0)
        dq = _bwd_q_loop(
            dq, q, do, lse, delta, K, V, MASK, KPM, offs_m, offs_d, offs_g, b, h, skn, skd, svn,
            svd, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale, drop_key,
            drop_thresh, drop_scale, 0, n_int, BLOCK_N, HAS_MASK, HAS_KPM, CAUSAL, False,
            DROPOUT, PRECISION, UPCAST, D_SPLIT,
        )  # fmt: skip
    # the rest (causal diagonal, the last key block, masks): every pair tested
    dq = _bwd_q_loop(
        dq, q, do, lse, delta, K, V, MASK, KPM, offs_m, offs_d, offs_g, b, h, skn, skd, svn,
        svd, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale, drop_key, drop_thresh,
        drop_scale, n_int, hi, BLOCK_N, HAS_MASK, HAS_KPM, CAUSAL, True, DROPOUT, PRECISION,
        UPCAST, D_SPLIT,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + bh * NQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_g[None, :],
        cast_rne(dq, DQ.dtype.element_ty, UPCAST),
        mask=m_ok[:, None] & g_ok[None, :],
    )


@triton.autotune(
    configs=_configs("atomic"),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _pruner("atomic")},
    reset_to_zero=["DQ_ACC"],
)
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_atomic_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ_ACC,
    MASK,
    KPM,
    KVHI,
    sqb,
    sqh,
    sqm,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sdob,
    sdoh,
    sdom,
    sdod,
    slb,
    slh,
    slm,
    smb,
    smh,
    smm,
    smn,
    skpb,
    skpn,
    H,
    NQ,
    NK,
    HEAD_DIM,
    NQ_KEY,
    NK_KEY,
    qk_scale,
    sm_scale,
    seed,
    drop_thresh,
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    D_SPLIT: tl.constexpr,
    INTERIOR: tl.constexpr = False,
):
    """The whole backward in one pass over the key blocks (deterministic=False): 5 GEMMs
    per tile instead of the two-kernel path's 7 (S and dP are not recomputed for dQ).

    One program per key block, as _attn_bwd_dkdv_kernel, plus dQᵀ += Kᵀ dSᵀ per query
    block added into DQ_ACC with fp32 atomics. DQ_ACC is (B, H, D, Nq) float32, zeroed
    before the launch, transposed so each thread's accumulator pairs (consecutive queries)
    land on consecutive addresses; _bwd_dq_convert_kernel scales and casts it. The order
    of the atomic adds varies run to run: dQ is not bit-reproducible (dK, dV are)."""
    num_n = tl.cdiv(NK, BLOCK_N)
    pid = tl.program_id(0)
    # D_SPLIT programs per key block, each owning BLOCK_D / D_SPLIT gradient columns
    pid_d = pid % D_SPLIT
    pid_n = pid // D_SPLIT % num_n
    bh = (pid // D_SPLIT // num_n).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_g = pid_d * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    n_ok = offs_n < NK
    d_ok = offs_d < HEAD_DIM
    g_ok = offs_g < HEAD_DIM
    kv_msk = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
        mask=kv_msk,
        other=0.0,
    )
    v = tl.load(
        V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
        mask=kv_msk,
        other=0.0,
    )
    if D_SPLIT == 1:
        kt = tl.trans(k)  # (D, N): the A operand of dQᵀ
    else:  # this program's K columns
        kt = tl.load(
            K + b * skb + h * skh + offs_n[None, :] * skn + offs_g[:, None] * skd,
            mask=n_ok[None, :] & g_ok[:, None],
            other=0.0,
        )
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += b * slb + h * slh
    DELTA += bh * NQ
    DQ_ACC += bh * HEAD_DIM * NQ

    drop_key = _drop_key(seed, bh) if DROPOUT else 0
    dk, dv = _bwd_kv_sweep(
        k, v, kt, Q, DO, LSE, DELTA, DQ_ACC, MASK, KPM, KVHI, offs_n, offs_d, offs_g, b, h, pid_n,
        sqm, sqd, sdom, sdod, slm, smb, smh, smm, smn, skpb, skpn, NQ, NK, HEAD_DIM, qk_scale,
        drop_key, drop_thresh, drop_scale, BLOCK_M, HAS_MASK, HAS_KPM, CAUSAL, DROPOUT,
        PRECISION, UPCAST, D_SPLIT, True, INTERIOR,
    )  # fmt: skip
    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * drop_scale
    out_off = bh * NK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_g[None, :]
    out_msk = n_ok[:, None] & g_ok[None, :]
    tl.store(DK + out_off, cast_rne(dk, DK.dtype.element_ty, UPCAST), mask=out_msk)
    tl.store(DV + out_off, cast_rne(dv, DV.dtype.element_ty, UPCAST), mask=out_msk)


@triton.jit
def _bwd_dq_convert_kernel(
    DQ_ACC,
    DQ,
    NQ,
    HEAD_DIM,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dq[b, h, i, :] = sm_scale · DQ_ACC[b, h, :, i] in dq's dtype, (B, H, Nq, D) contiguous."""
    num_m = tl.cdiv(NQ, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = (tl.program_id(0) // num_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = bh * NQ * HEAD_DIM
    acc = tl.load(DQ_ACC + base + offs_d[None, :] * NQ + offs_m[:, None], mask=msk, other=0.0)
    tl.store(
        DQ + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        cast_rne(acc * sm_scale, DQ.dtype.element_ty, UPCAST),
        mask=msk,
    )


# --------------------------------------------------------------------------- host side


def _mask_args(q, nk, mask, key_padding_mask):
    """Pointers + strides of the optional masks as uint8 views (dummy q when absent)."""
    B, H, NQ, _ = q.shape
    if mask is not None:
        m = mask.expand(B, H, NQ, nk)  # a view: broadcast dims get stride 0
        m = m.view(torch.uint8)
        mask_t, mstr = m, tuple(m.stride())
    else:
        mask_t, mstr = q, (0, 0, 0, 0)
    if key_padding_mask is not None:
        kp = key_padding_mask.view(torch.uint8)
        kpm_t, kstr = kp, tuple(kp.stride())
        # (leading real keys, one past the last real key) per sequence: the kernels stop at
        # the second, KVHI[2 b + 1]
        kvhi = kpm_bounds(key_padding_mask)
    else:
        kpm_t, kstr, kvhi = q, (0, 0), q
    return mask_t, mstr, kpm_t, kstr, kvhi


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


def _bucket(n: int) -> int:
    return next_pow2(n)


def _tma_ok(*ts) -> bool:
    """Whether K and V may be read through TMA descriptors: unit stride along the head dim,
    16-byte aligned base and strides; on the GPU, compute capability 9.0 or newer (the
    interpreter emulates descriptors)."""
    for t in ts:
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    if INTERPRET:
        return True
    dev = ts[0].device
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


@contextlib.contextmanager
def _desc_scratch(device, needed: bool):
    """Device-side descriptors (RECON_ATTN_FWD_TMA=device) keep their tensor maps in a global
    scratch buffer the launch allocates through triton's allocator: a torch one for this
    launch where the caller has set none (triton.set_allocator is left as it was)."""
    from triton.runtime import _allocation as alloc

    if not needed or not isinstance(alloc._allocator.get(), alloc.NullAllocator):
        yield
        return

    def scratch(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    token = alloc._allocator.set(scratch)
    try:
        yield
    finally:
        alloc._allocator.reset(token)


def _drop_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(seed as a signed int32, 24-bit threshold, 1 / (1 - p)) for the kernels."""
    from ..reference import dropout_params

    s, threshold, scale = dropout_params(dropout_p, seed)
    return s - (1 << 32) if s >= 1 << 31 else s, threshold, scale


def attention_fwd(
    q, k, v, mask, key_padding_mask, scale: float, causal: bool, dropout_p=0.0, seed=0
):
    """q (B, H, Nq, D), k/v (B, H, Nk, D) any strides -> (out, lse (B, H, Nq) fp32);
    out is stored (B, Nq, H, D)-contiguous (see ops.attention.new_output). dropout_p > 0:
    the keep mask of reference.dropout_keep(seed, ...), recomputed in backward."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    out = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    mask_t, mstr, kpm_t, kstr, kvhi = _mask_args(q, NK, mask, key_padding_mask)
    grid = lambda meta: (cdiv(NQ, meta["BLOCK_M"]) * B * H,)
    # the fast loop takes the row max of the raw scores (max(s) * scale): right only for
    # scale > 0; a negative scale (allowed, as in torch) runs the legacy loop
    fast = fwd_mode() == "fast" and scale > 0
    flags = (mask is not None, key_padding_mask is not None, dropout_p > 0)
    desc = fwd_desc_kind(_block_d(D), *flags) if fast else "off"
    if desc != "off" and not _tma_ok(k, v):
        desc = "off"
    # the warp-specialised loop has no tail loop after it (see _attn_fwd_kernel): every key
    # block full (Nk a multiple of the largest BLOCK_N), no causal diagonal
    ws = (
        fwd_ws_wanted(desc, *flags)
        and _block_d(D) <= 128
        and not causal
        and NK % 128 == 0
        and _tma_ok(q)
    )
    kd, vd = k, v
    if desc == "host":  # block shapes: set per config by _desc_blocks
        blk = [1, 1, 16, _block_d(D)]
        kd = TensorDescriptor(k, list(k.shape), list(k.stride()), blk)
        vd = TensorDescriptor(v, list(v.shape), list(v.stride()), list(blk))
    with _desc_scratch(q.device, desc == "device"):
        _attn_fwd_kernel[grid](
            q,
            kd,
            vd,
            out,
            lse,
            mask_t,
            kpm_t,
            kvhi,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            *lse.stride(),
            *mstr,
            *kstr,
            H,
            NQ,
            NK,
            D,
            _bucket(NQ),
            _bucket(NK),
            scale * LOG2E,
            *_drop_args(dropout_p, seed),
            BLOCK_D=_block_d(D),
            HAS_MASK=mask is not None,
            HAS_KPM=key_padding_mask is not None,
            CAUSAL=causal,
            DROPOUT=dropout_p > 0,
            PRECISION=dot_precision(q.dtype),
            UPCAST=INTERPRET,
            FAST=fast,
            EVEN_D=D == _block_d(D),
            TMA=desc != "off",
            DEV_DESC=desc == "device",
            WS=ws,
        )
    return out, lse


BWD_PAD_MODES = ("auto", "1", "0")


def bwd_pad_d(device: torch.device, d: int) -> bool:
    """RECON_ATTN_BWD_PAD_D: whether the backward runs on copies of its inputs zero-padded
    from head dim ``d`` to its power-of-two block. "auto" (default): on a Hopper (sm_90) GPU
    when d is below its block; "1": always then (any device: the interpreter tests); "0":
    never.

    Why: on an H200 under triton 3.6 the fused backward raised an illegal memory access
    for fp16/bf16 whenever d < BLOCK_D and a program swept two or more query blocks
    ((2, 1, 130, 130, 72); (2, 2, 37, 45, 40) with dropout), while every case with
    d == BLOCK_D passed (benchmarks/results/gpu-h200-2026-12-04). The kernel's addresses
    stay inside their tensors in a bounds-checked interpreter run of the same tiles, so the
    fault is the compiled code's; padded inputs run the regime that passed. Zero columns
    change no score, and their gradients are dropped: the result is exact, at the cost of
    BLOCK_D / d the work (72 -> 128: 1.8x) and the padded copies. The same launches in
    float32 (FMA dots, no wgmma) passed, so auto leaves other GPUs unpadded. Upstream has
    similar reports of Hopper wgmma kernels with several tl.dot faulting under triton 3.6-3.7
    and not 3.5 (triton-lang/triton#10486, #11366); not confirmed to be the same bug. The
    device run's pad0 step reruns the faulting cases with "0"."""
    mode = os.environ.get("RECON_ATTN_BWD_PAD_D", "auto")
    if mode not in BWD_PAD_MODES:
        raise ValueError(f"RECON_ATTN_BWD_PAD_D: expected one of {BWD_PAD_MODES}, got {mode!r}")
    if d >= _block_d(d) or mode == "0":
        return False
    return mode == "1" or (mode == "auto" and device.type == "cuda" and _is_hopper(device))


def _is_hopper(device: torch.device) -> bool:
    # the GEMM's cached capability lookup (this runs on every backward; imported here:
    # _gemm imports this module)
    from ._gemm import _arch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _arch(index) // 10 == 9


def attention_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    mask,
    key_padding_mask,
    scale: float,
    causal: bool,
    dropout_p=0.0,
    seed=0,
    deterministic: bool = False,
):
    """Returns dq, dk, dv (contiguous, input dtype). lse: (B, H, Nq) float32 from forward.

    deterministic=True: the atomic-free two-kernel backward (_attn_bwd_dkdv_kernel, then
    _attn_bwd_dq_kernel; 7 GEMMs per tile, bit-reproducible run to run). False: the fused
    _attn_bwd_atomic_kernel (5 GEMMs per tile, dQ summed with fp32 atomics in a
    (B, H, D, Nq) workspace, so dQ's last bits vary between runs; dK, dV do not)."""
    D = q.shape[-1]
    if bwd_pad_d(q.device, D):
        pad = lambda t: torch.nn.functional.pad(t, (0, _block_d(D) - D))  # noqa: E731
        grads = attention_bwd(
            *(pad(t) for t in (dout, q, k, v, out)), lse, mask, key_padding_mask, scale,
            causal, dropout_p, seed, deterministic,
        )  # fmt: skip
        return tuple(g[..., :D].contiguous() for g in grads)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    block_d = _block_d(D)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    # fp32 dQᵀ accumulator of the atomic path, zeroed by the preprocess kernel
    dq_acc = (
        delta if deterministic else torch.empty((B, H, D, NQ), dtype=torch.float32, device=q.device)
    )
    pre_bm = 64 if not INTERPRET else 32
    _bwd_preprocess_kernel[(cdiv(NQ, pre_bm) * B * H,)](
        out,
        dout,
        delta,
        dq_acc,
        *out.stride(),
        *dout.stride(),
        H,
        NQ,
        D,
        BLOCK_M=pre_bm,
        BLOCK_D=block_d,
        ZERO_DQ=not deterministic,
    )
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=q.device)
    mask_t, mstr, kpm_t, kstr, kvhi = _mask_args(q, NK, mask, key_padding_mask)
    common = dict(
        BLOCK_D=block_d,
        HAS_MASK=mask is not None,
        HAS_KPM=key_padding_mask is not None,
        CAUSAL=causal,
        DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(q.dtype),
        UPCAST=INTERPRET,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), *mstr, *kstr)
    sizes = (
        H,
        NQ,
        NK,
        D,
        _bucket(NQ),
        _bucket(NK),
        scale * LOG2E,
        scale,
        *_drop_args(dropout_p, seed),
    )
    d_split = bwd_d_split(block_d, q.element_size())
    common.update(
        D_SPLIT=d_split,
        INTERIOR=bwd_interior(block_d, D, mask is not None, dropout_p > 0),
    )
    key_grid = lambda meta: (cdiv(NK, meta["BLOCK_N"]) * B * H * d_split,)  # noqa: E731
    if not deterministic:
        _attn_bwd_atomic_kernel[key_grid](
            q, k, v, dout, lse, delta, dk, dv, dq_acc, mask_t, kpm_t, kvhi, *strides, *sizes,
            **common,
        )  # fmt: skip
        _bwd_dq_convert_kernel[(cdiv(NQ, pre_bm) * B * H,)](
            dq_acc, dq, NQ, D, scale, BLOCK_M=pre_bm, BLOCK_D=block_d, UPCAST=INTERPRET
        )
        return dq, dk, dv
    _attn_bwd_dkdv_kernel[key_grid](
        q, k, v, dout, lse, delta, dk, dv, mask_t, kpm_t, kvhi, *strides, *sizes, **common
    )
    _attn_bwd_dq_kernel[lambda meta: (cdiv(NQ, meta["BLOCK_M"]) * B * H * d_split,)](
        q, k, v, dout, lse, delta, dq, mask_t, kpm_t, kvhi, *strides, *sizes, **common
    )
    return dq, dk, dv
