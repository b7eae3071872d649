"""One Triton GEMM with fused prologue/epilogue options, shared by the MLP and LoRA ops.

    C = epi(alpha · (pro(A) @ B + A2 @ B2) + bias)        A (M, K), B (K, N), C (M, N)

Every operand is addressed through its strides, so transposes are free: pass ``x.t()``
views (the MLP backward computes dW2ᵀ = act(h)ᵀ dy by writing into ``dw2.t()``). The
variants are constexpr flags of one kernel, never copies:

* ``PRO_ACT``: apply the activation to A tiles as they are loaded (fp32 math, then back
  to the input dtype for the tensor cores). dW2 uses it so act(h) is never materialised
  in backward.
* ``HAS_AB2``: a second, short K-loop A2 (M, R) @ B2 (R, N) into the same accumulator:
  the rank-r LoRA update, never forming W + s·B A.
* ``EPI``: 1 multiplies by act'(Z) (Z = the pre-activation h: dh = (dy W2) ⊙ act'(h));
  2 adds Z (merge_lora: W + s·B A, also in place with C = Z = W).
* ``STORE_C2``: also store alpha2 · act(C) (the forward MLP writes h and act(h) in one
  pass; LoRA writes x Aᵀ and s·x Aᵀ).
* ``HAS_CSUM``: per-row-block column sums of the final fp32 tile (db1 without
  re-reading dh), written to a small workspace that the host sums: deterministic, no
  atomics.
* split-K (grid axis 1): for small outputs with long K (LoRA dA/dB, dW of few features),
  each split writes an fp32 partial that the host sums.

Switches (constexprs, in the autotune key): ``TMA_A`` / ``TMA_B`` (RECON_GEMM_TMA) read A
and B through host-side tensor descriptors, over the operand or its transpose, with
pointer fallback per operand; ``PERSISTENT`` (RECON_GEMM_PERSISTENT) runs at most one
program per SM, each looping over tiles with the same epilogues.

Accumulation is fp32; fp32 inputs use ``input_precision`` from ``dot_precision``.
Grouped program order (GROUP_M row blocks share B tiles in L2); autotune keyed on the
bucketed token count, N, K, the operand layout and the flags.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..codes import ACT_CODES as ACT_IDS  # the codes both backends share (csrc too)
from ..codes import EPI_ADD, EPI_DACT, EPI_NONE  # noqa: F401  (mlp.py / lora.py use them)
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
from .attention import _tma_ok  # the descriptor rules (strides, alignment, sm_90+)

# --------------------------------------------------------------------------- activations


@triton.jit
def activate(x, ACT: tl.constexpr):
    """act(x) on fp32 values. 0 identity, 1 gelu (erf), 2 gelu (tanh approx.), 3 relu.
    Constants: 1/sqrt(2) = 0.70710678..., sqrt(2/pi) = 0.79788456..., 1/sqrt(2 pi) = 0.39894228...
    """
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 (1 + tanh(u)) == sigmoid(2u): stable for large |u|, no tanh needed
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)
    elif ACT == 3:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def activate_grad(x, ACT: tl.constexpr):
    """d act(x) / dx on fp32 values (same ids as ``activate``)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        # d/dx 0.5 x (1 + tanh u) with 1 - tanh(u)^2 == 4 s (1 - s)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return s + 2.0 * x * s * (1.0 - s) * du
    elif ACT == 3:
        return tl.where(x > 0.0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


# --------------------------------------------------------------------------- configs

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), most preferred first: the first one
# that fits is the pick when autotuning is off (RECON_TRITON_AUTOTUNE=0).
_GPU_CONFIGS = (
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
)
# Unequal tiles catch transposition bugs; GROUP_M=2 exercises partial groups; BLOCK_N=64
# with _EPI_CHUNK=16 runs the two-level epilogue chunking.
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 2}
# Column width of one epilogue chunk; small in the interpreter so tests run the chunking.
_EPI_CHUNK = 16 if INTERPRET else 64
_SMEM_BUDGET = 160 * 1024  # fits A100 (164 KB) and H100/H200 (227 KB) per block


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [
            triton.Config(dict(_INTERP_CONFIG), num_warps=4, num_stages=1, pre_hook=_desc_blocks)
        ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
            pre_hook=_desc_blocks,
        )
        for bm, bn, bk, w, s in _GPU_CONFIGS
    ]


def _desc_blocks(nargs) -> None:
    """Config pre-hook: the A and B tensor descriptors (RECON_GEMM_TMA) get the blocks of
    the config about to run, (BLOCK_M, BLOCK_K) / (BLOCK_K, BLOCK_N) or, for a transposed
    view (TMA_* = 2), the reverse."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for name, blk in (("A", [bm, bk]), ("B", [bk, bn])):
        desc = nargs[name]
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = blk if nargs["TMA_" + name] == 1 else blk[::-1]


def _arch_tile(bm: int, bn: int, bk: int, arch: int, pro_act: bool, ab2: bool = False):
    """(bm, bn, bk) adjusted for sm_<arch>, or None if unusable. Before Hopper the activation
    prologue keeps the A tile in registers beside the mma.sync accumulator: tiles above
    128 x 128 or BLOCK_K 64 spill there (see benchmarks/sass_report.py), so cap them. The LoRA rank-r
    K-loop (ab2) sits at 255 registers with a 128 x 256 tile on sm_80 (triton 3.6 spills
    8 bytes there), so it is capped at 128 x 128 too."""
    if arch < 90 and (pro_act or ab2) and bm * bn > 128 * 128:
        return None
    if arch < 90 and pro_act:
        bk = min(bk, 32)
    return bm, bn, bk


def tiles_for_arch(
    arch: int, pro_act: bool, ab2: bool = False
) -> list[tuple[int, int, int, int, int]]:
    """The _GPU_CONFIGS entries (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) used on sm_<arch>."""
    out = []
    for bm, bn, bk, w, st in _GPU_CONFIGS:
        t = _arch_tile(bm, bn, bk, arch, pro_act, ab2)
        if t is not None:
            out.append((*t, w, st))
    return out


def fit_configs(
    configs,
    M: int,
    N: int,
    K: int,
    esize: int,
    *,
    arch: int = 90,
    pro_act: bool = False,
    ab2: bool = False,
) -> list[triton.Config]:
    """Shrink each config's tiles to the problem (tiles never exceed the next power of two
    of a dimension), cap fp32 tiles (no tensor cores on the "ieee" path, 4-byte smem),
    drop what exceeds the shared-memory budget or spills on this arch, de-duplicate.
    Never empty."""
    p2 = lambda n: max(16, next_pow2(max(n, 1)))
    out, seen = [], set()
    for c in configs:
        kw = c.kwargs
        tile = _arch_tile(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], arch, pro_act, ab2)
        if tile is None:
            continue
        bm, bn, bk = min(tile[0], p2(M)), min(tile[1], p2(N)), min(tile[2], p2(K))
        warps, stages = c.num_warps, c.num_stages
        if esize >= 4:
            bm, bn, bk = min(bm, 128), min(bn, 128), min(bk, 32)
        if M >= 1024 and bm < 64:
            continue  # small row tiles only pay for decode-sized M
        if bm * bn <= 64 * 64:
            warps = 4
        while stages > 2 and stages * (bm * bk + bk * bn) * esize > _SMEM_BUDGET:
            stages -= 1
        if stages * (bm * bk + bk * bn) * esize > _SMEM_BUDGET:
            continue
        key = (bm, bn, bk, warps, stages)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            triton.Config(
                {**kw, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                num_warps=warps,
                num_stages=stages,
                pre_hook=c.pre_hook,
            )
        )
    if not out:
        last = configs[-1]
        out = [
            triton.Config(
                {**last.kwargs, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
                pre_hook=last.pre_hook,
            )
        ]
    return out


@functools.cache
def _arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _prune(configs, named_args, **kwargs):
    a = named_args["A"]
    a = a.base if isinstance(a, TensorDescriptor) else a
    kept = fit_configs(
        configs,
        named_args["M"],
        named_args["N"],
        named_args["K"],
        a.element_size(),
        arch=_arch(a.device.index or 0) if a.device.type == "cuda" else 90,
        pro_act=bool(kwargs.get("PRO_ACT", False)),
        ab2=bool(kwargs.get("HAS_AB2", False)),
    )
    return kept if autotune_enabled() else kept[:1]


_KEY = [
    "M_KEY",
    "N",
    "K",
    "R",
    "SPLIT_K",
    "LAYOUT",
    "ACT",
    "PRO_ACT",
    "HAS_AB2",
    "HAS_BIAS",
    "EPI",
    "STORE_C2",
    "HAS_CSUM",
    "TMA_A",  # the load and schedule variants tune apart
    "TMA_B",
    "PERSISTENT",
]


# --------------------------------------------------------------------------- kernel


@triton.jit
def _epilogue(
    acc,
    pid_k,
    pid_m,
    off_m,
    off_n,
    M,
    N,
    C,
    BIAS,
    Z,
    C2,
    CSUM,
    scs,
    scm,
    scn,
    szm,
    szn,
    sc2m,
    sc2n,
    alpha,
    alpha2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    STORE_C2: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """alpha, bias, act'(Z) or +Z, store C (and alpha2·act(C), column sums) for the fp32
    tile ``acc`` whose origin is (off_m, off_n)."""
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    c_ok = (off_m + lm < M)[:, None] & (off_n + ln < N)[None, :]
    om64 = off_m.to(tl.int64)
    on64 = off_n.to(tl.int64)
    acc = acc * alpha
    if HAS_BIAS:
        bias = tl.load(BIAS + off_n + ln, mask=off_n + ln < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if EPI != 0:
        z_ptrs = Z + (om64 * szm + on64 * szn) + (lm[:, None] * szm + ln[None, :] * szn)
        z = tl.load(z_ptrs, mask=c_ok, other=0.0).to(tl.float32)
        if EPI == 1:
            acc = acc * activate_grad(z, ACT)
        else:
            acc = acc + z
    c_off = pid_k.to(tl.int64) * scs + om64 * scm + on64 * scn
    c_ptrs = C + c_off + (lm[:, None] * scm + ln[None, :] * scn)
    tl.store(c_ptrs, cast_rne(acc, C.dtype.element_ty, UPCAST), mask=c_ok)
    if STORE_C2:
        c2_ptrs = C2 + (om64 * sc2m + on64 * sc2n) + (lm[:, None] * sc2m + ln[None, :] * sc2n)
        if EPI == 1:  # MLP backward: act(h) beside dh, for dW2 (the "store" strategy)
            c2 = cast_rne(activate(z, ACT) * alpha2, C2.dtype.element_ty, UPCAST)
        else:
            c2 = cast_rne(activate(acc, ACT) * alpha2, C2.dtype.element_ty, UPCAST)
        tl.store(c2_ptrs, c2, mask=c_ok)
    if HAS_CSUM:
        colsum = tl.sum(tl.where(c_ok, acc, 0.0), axis=0)
        tl.store(CSUM + pid_m.to(tl.int64) * N + off_n + ln, colsum, mask=off_n + ln < N)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a (BLOCK_M, BLOCK_N) tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue_halves(
    acc,
    pid_k,
    pid_m,
    off_m,
    off_n,
    M,
    N,
    C,
    BIAS,
    Z,
    C2,
    CSUM,
    scs,
    scm,
    scn,
    szm,
    szn,
    sc2m,
    sc2n,
    alpha,
    alpha2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    STORE_C2: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``_epilogue`` on each column half of the tile in turn."""
    lo, hi = _halves(acc, BLOCK_M, BLOCK_N)
    HALF: tl.constexpr = BLOCK_N // 2
    _epilogue(
        lo,
        pid_k,
        pid_m,
        off_m,
        off_n,
        M,
        N,
        C,
        BIAS,
        Z,
        C2,
        CSUM,
        scs,
        scm,
        scn,
        szm,
        szn,
        sc2m,
        sc2n,
        alpha,
        alpha2,
        BLOCK_M,
        HALF,
        ACT,
        HAS_BIAS,
        EPI,
        STORE_C2,
        HAS_CSUM,
        UPCAST,
    )
    _epilogue(
        hi,
        pid_k,
        pid_m,
        off_m,
        off_n + HALF,
        M,
        N,
        C,
        BIAS,
        Z,
        C2,
        CSUM,
        scs,
        scm,
        scn,
        szm,
        szn,
        sc2m,
        sc2n,
        alpha,
        alpha2,
        BLOCK_M,
        HALF,
        ACT,
        HAS_BIAS,
        EPI,
        STORE_C2,
        HAS_CSUM,
        UPCAST,
    )


@triton.jit
def _gemm_tile(
    tile,
    pid_k,
    A,
    B,
    C,
    A2,
    B2,
    BIAS,
    Z,
    C2,
    CSUM,
    M,
    N,
    K,
    R,
    sam,
    sak,
    sbk,
    sbn,
    scs,
    scm,
    scn,
    sa2m,
    sa2r,
    sb2r,
    sb2n,
    szm,
    szn,
    sc2m,
    sc2n,
    alpha,
    alpha2,
    SPLIT_K,
    M_KEY,
    LAYOUT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACT: tl.constexpr,
    PRO_ACT: tl.constexpr,
    HAS_AB2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    STORE_C2: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    EPI_CHUNK: tl.constexpr,
    CHUNK_ALL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile (linear id ``tile`` in grouped order) of split
    ``pid_k``: the K loop, the LoRA segment and the fused epilogue."""
    # grouped order: GROUP_M consecutive row blocks sweep the column blocks together, so
    # the B tiles they share stay in L2
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (tile // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % group_size
    pid_n = (tile % in_group) // group_size

    # 64-bit offsets only for the scalar tile origins; offsets inside a tile are 32-bit
    # (the host checks stride * 256 < 2**31), which keeps register pressure down
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = off_m + lm < M
    n_ok = off_n + ln < N
    om64 = off_m.to(tl.int64)
    on64 = off_n.to(tl.int64)

    # this split's K range: whole tiles, the last split ends at K
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    if TMA_A == 0:
        a_ptrs = (
            A + (om64 * sam + k_lo.to(tl.int64) * sak) + (lm[:, None] * sam + rk[None, :] * sak)
        )
    if TMA_B == 0:
        b_ptrs = (
            B + (k_lo.to(tl.int64) * sbk + on64 * sbn) + (rk[:, None] * sbk + ln[None, :] * sbn)
        )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        # "< K - k" (not k_hi): K is specialised divisible by 16 when it is, which keeps the
        # masks uniform over vector widths; interior splits never reach K anyway
        k_ok = rk < K - k
        # descriptors (TMA_*): zero fill past M, N and K, no masks
        if TMA_A == 1:  # (M, K) with unit stride along K
            a = A.load([off_m, k])
        elif TMA_A == 2:  # (K, M) with unit stride along M: a transposed view
            a = tl.trans(A.load([k, off_m]))
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if TMA_B == 1:  # (K, N) with unit stride along N
            b = B.load([k, off_n])
        elif TMA_B == 2:  # (N, K) with unit stride along K: a transposed view
            b = tl.trans(B.load([off_n, k]))
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PRO_ACT:
            # act(0) == 0 for every activation, so the masked zeros stay zeros
            a = cast_rne(activate(a.to(tl.float32), ACT), b.dtype, UPCAST)
        acc = mma(a, b, acc, PRECISION, UPCAST)
        if TMA_A == 0:
            a_ptrs += BLOCK_K * sak
        if TMA_B == 0:
            b_ptrs += BLOCK_K * sbk

    if HAS_AB2:
        rr = tl.arange(0, BLOCK_R)
        a2_ptrs = A2 + om64 * sa2m + (lm[:, None] * sa2m + rr[None, :] * sa2r)
        b2_ptrs = B2 + on64 * sb2n + (rr[:, None] * sb2r + ln[None, :] * sb2n)
        for r0 in range(0, R, BLOCK_R):
            r_ok = rr < R - r0
            a2 = tl.load(a2_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b2 = tl.load(b2_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(a2, b2, acc, PRECISION, UPCAST)
            a2_ptrs += BLOCK_R * sa2r
            b2_ptrs += BLOCK_R * sb2r

    # Heavy epilogues (activation math, an extra tile load) on wide tiles run in column
    # chunks of EPI_CHUNK: fewer live temporaries, no register spills. CHUNK_ALL chunks the
    # light ones of the widest tiles too: triton 3.6 then keeps a wgmma group in flight in
    # the K loop of a 128 x 256 tile (wait depth 1) instead of waiting after every one
    # (benchmarks/sass_report.py).
    HEAVY: tl.constexpr = EPI == 1 or (STORE_C2 and ACT != 0)
    if (HEAVY or CHUNK_ALL) and BLOCK_N >= 4 * EPI_CHUNK:
        acc_lo, acc_hi = _halves(acc, BLOCK_M, BLOCK_N)
        _epilogue_halves(
            acc_lo,
            pid_k,
            pid_m,
            off_m,
            off_n,
            M,
            N,
            C,
            BIAS,
            Z,
            C2,
            CSUM,
            scs,
            scm,
            scn,
            szm,
            szn,
            sc2m,
            sc2n,
            alpha,
            alpha2,
            BLOCK_M,
            BLOCK_N // 2,
            ACT,
            HAS_BIAS,
            EPI,
            STORE_C2,
            HAS_CSUM,
            UPCAST,
        )
        _epilogue_halves(
            acc_hi,
            pid_k,
            pid_m,
            off_m,
            off_n + BLOCK_N // 2,
            M,
            N,
            C,
            BIAS,
            Z,
            C2,
            CSUM,
            scs,
            scm,
            scn,
            szm,
            szn,
            sc2m,
            sc2n,
            alpha,
            alpha2,
            BLOCK_M,
            BLOCK_N // 2,
            ACT,
            HAS_BIAS,
            EPI,
            STORE_C2,
            HAS_CSUM,
            UPCAST,
        )
    elif HEAVY and BLOCK_N >= 2 * EPI_CHUNK:
        _epilogue_halves(
            acc,
            pid_k,
            pid_m,
            off_m,
            off_n,
            M,
            N,
            C,
            BIAS,
            Z,
            C2,
            CSUM,
            scs,
            scm,
            scn,
            szm,
            szn,
            sc2m,
            sc2n,
            alpha,
            alpha2,
            BLOCK_M,
            BLOCK_N,
            ACT,
            HAS_BIAS,
            EPI,
            STORE_C2,
            HAS_CSUM,
            UPCAST,
        )
    else:
        _epilogue(
            acc,
            pid_k,
            pid_m,
            off_m,
            off_n,
            M,
            N,
            C,
            BIAS,
            Z,
            C2,
            CSUM,
            scs,
            scm,
            scn,
            szm,
            szn,
            sc2m,
            sc2n,
            alpha,
            alpha2,
            BLOCK_M,
            BLOCK_N,
            ACT,
            HAS_BIAS,
            EPI,
            STORE_C2,
            HAS_CSUM,
            UPCAST,
        )


@triton.jit
def _gemm_kernel(
    A,
    B,
    C,
    A2,
    B2,
    BIAS,
    Z,
    C2,
    CSUM,
    M,
    N,
    K,
    R,
    sam,
    sak,
    sbk,
    sbn,
    scs,
    scm,
    scn,
    sa2m,
    sa2r,
    sb2r,
    sb2n,
    szm,
    szn,
    sc2m,
    sc2n,
    alpha,
    alpha2,
    SPLIT_K,
    M_KEY,
    LAYOUT,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACT: tl.constexpr,
    PRO_ACT: tl.constexpr,
    HAS_AB2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    STORE_C2: tl.constexpr,
    HAS_CSUM: tl.constexpr,
    EPI_CHUNK: tl.constexpr,
    CHUNK_ALL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """The launch: one tile per program, or (PERSISTENT) a grid of at most one program per
    SM, each walking the tiles pid, pid + programs, ... in grouped order; every split
    (grid axis 1) walks the same tiles."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _gemm_tile(
                tile,
                pid_k,
                A,
                B,
                C,
                A2,
                B2,
                BIAS,
                Z,
                C2,
                CSUM,
                M,
                N,
                K,
                R,
                sam,
                sak,
                sbk,
                sbn,
                scs,
                scm,
                scn,
                sa2m,
                sa2r,
                sb2r,
                sb2n,
                szm,
                szn,
                sc2m,
                sc2n,
                alpha,
                alpha2,
                SPLIT_K,
                M_KEY,
                LAYOUT,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                GROUP_M,
                BLOCK_R,
                ACT,
                PRO_ACT,
                HAS_AB2,
                HAS_BIAS,
                EPI,
                STORE_C2,
                HAS_CSUM,
                EPI_CHUNK,
                CHUNK_ALL,
                PRECISION,
                UPCAST,
                TMA_A,
                TMA_B,
            )
    else:
        _gemm_tile(
            pid,
            pid_k,
            A,
            B,
            C,
            A2,
            B2,
            BIAS,
            Z,
            C2,
            CSUM,
            M,
            N,
            K,
            R,
            sam,
            sak,
            sbk,
            sbn,
            scs,
            scm,
            scn,
            sa2m,
            sa2r,
            sb2r,
            sb2n,
            szm,
            szn,
            sc2m,
            sc2n,
            alpha,
            alpha2,
            SPLIT_K,
            M_KEY,
            LAYOUT,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP_M,
            BLOCK_R,
            ACT,
            PRO_ACT,
            HAS_AB2,
            HAS_BIAS,
            EPI,
            STORE_C2,
            HAS_CSUM,
            EPI_CHUNK,
            CHUNK_ALL,
            PRECISION,
            UPCAST,
            TMA_A,
            TMA_B,
        )


_gemm_tuned = triton.autotune(
    configs=_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune}
)(_gemm_kernel)


def chunk_all() -> bool:
    """RECON_GEMM_CHUNK_ALL=1 (default): chunk every epilogue of the widest tiles (keeps
    the K loop pipelined under triton 3.6); 0: only the heavy ones, as before (A/B)."""
    v = os.environ.get("RECON_GEMM_CHUNK_ALL", "1")
    if v not in ("0", "1"):
        raise ValueError(f"RECON_GEMM_CHUNK_ALL: expected 0 or 1, got {v!r}")
    return v == "1"


GEMM_TMA_MODES = ("auto", "host", "off")


def tma_mode() -> str:
    """RECON_GEMM_TMA: how the K loop reads A and B.

    * "host": through host-side tensor descriptors (triton.tools.tensor_descriptor.
      TensorDescriptor over the 2-D operand, or over its transpose where the unit stride is
      along M (A) or K (B), loaded and transposed: UTMALDG on sm_90, zero fill past M, N
      and K, so no load needs a mask);
    * "auto" (default): "host" for fp16/bf16 operands (benchmarks/results/static-sm90:
      under triton 3.9 and 3.6 every GEMM variant's K loop drops from 111-165 to 73-90 SASS
      instructions, 0 spills, wait depth >= 1), pointers for fp32 (there descriptors make
      the "ieee" FMA path spill and the transposed tf32 operands wait after every wgmma);
    * "off": pointer loads (cp.async) always.

    Any mode falls back to pointers per operand and launch where a descriptor is not
    allowed (attention._tma_ok: unit stride, 16-byte aligned base and strides, sm_90+)."""
    mode = os.environ.get("RECON_GEMM_TMA", "auto")
    if mode not in GEMM_TMA_MODES:
        raise ValueError(f"RECON_GEMM_TMA: expected one of {GEMM_TMA_MODES}, got {mode!r}")
    return mode


def tma_wanted(esize: int = 2) -> bool:
    """Whether the launcher tries descriptors (RECON_GEMM_TMA) for operands of ``esize``
    bytes, before the per-operand checks."""
    mode = tma_mode()
    return mode == "host" or (mode == "auto" and esize == 2)


def persistent() -> bool:
    """RECON_GEMM_PERSISTENT=1: a persistent schedule (grid = min(tiles, SMs) programs, each
    walking tiles pid, pid + programs, ... with every fused epilogue and split-K kept);
    0 (default): one program per tile."""
    v = os.environ.get("RECON_GEMM_PERSISTENT", "0")
    if v not in ("0", "1"):
        raise ValueError(f"RECON_GEMM_PERSISTENT: expected 0 or 1, got {v!r}")
    return v == "1"


def static_constexprs(contiguous_k=(True, True)) -> dict:
    """Constexpr arguments the launcher passes besides tiles and variant flags, for the
    current switches and operands whose unit stride is along K where ``contiguous_k`` says
    (A, B), with descriptor-friendly strides (benchmarks/sass_report.py compiles what a
    launch would run; TMA_A / TMA_B != 0: that operand is a tensor descriptor)."""
    tma = tma_wanted()
    ka, kb = contiguous_k
    return {
        "CHUNK_ALL": chunk_all(),
        "TMA_A": (1 if ka else 2) if tma else 0,
        "TMA_B": (2 if kb else 1) if tma else 0,
        "PERSISTENT": persistent(),
    }


# --------------------------------------------------------------------------- host side


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    """Programs of a persistent launch: the SMs (a virtual 3 in the interpreter, so test
    shapes give programs an uneven number of tiles)."""
    if INTERPRET or device.type != "cuda":
        return 3
    return _num_sms(device.index or 0)


def _operand_desc(t: torch.Tensor, k_dim: int):
    """(descriptor or t, TMA code) for a GEMM operand (M, K) (k_dim=1) or (K, N) (k_dim=0):
    code 1 over t itself (unit stride along its columns), 2 over its transpose (unit stride
    along its rows), 0 (pointers) where neither view may be a descriptor. The blocks are
    placeholders: _desc_blocks sets them per config."""
    for code, view in ((1, t), (2, t.t())):
        if view.stride(1) == 1 and _tma_ok(view):
            return TensorDescriptor(view, list(view.shape), list(view.stride()), [16, 16]), code
    return t, 0


def _split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K when the output has too few tiles to fill the machine (LoRA dA/dB, dW of
    narrow layers). Tiles are counted at the largest candidate tile; each split keeps at
    least a few K tiles so the fp32 partials stay cheap next to the GEMM."""
    if INTERPRET:
        # a virtual 4-"SM" machine with the interpreter's tiles, so that the
        # small test shapes exercise the split path too
        sms, bm, bn, min_k = 4, _INTERP_CONFIG["BLOCK_M"], _INTERP_CONFIG["BLOCK_N"], 32
    elif device.type == "cuda":
        sms, bm, bn, min_k = _num_sms(device.index or 0), 128, 128, 1024
    else:
        return 1
    tiles = cdiv(m, bm) * cdiv(n, bn)
    if tiles * 2 > sms:
        return 1
    return max(1, min(cdiv(sms, tiles), k // min_k, 32))


@functools.lru_cache(maxsize=1024)
def _min_block_m(M: int, N: int, K: int, esize: int) -> int:
    """Smallest BLOCK_M the autotuner may pick for this problem (sizes the CSUM workspace)."""
    if INTERPRET:
        return _INTERP_CONFIG["BLOCK_M"]
    return min(c.kwargs["BLOCK_M"] for c in fit_configs(_configs(), M, N, K, esize))


# offsets inside a tile are int32: (tile rows + tile cols) * stride must stay below 2**31
_MAX_STRIDE = 2**31 // 512


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    alpha: float = 1.0,
    bias: torch.Tensor | None = None,
    act: str = "none",
    pro_act: bool = False,
    ab2: tuple[torch.Tensor, torch.Tensor] | None = None,
    epi: int = EPI_NONE,
    z: torch.Tensor | None = None,
    c2: torch.Tensor | None = None,
    alpha2: float = 1.0,
    colsum: bool = False,
    split_k: int | None = None,
    tune: bool = True,
) -> torch.Tensor | None:
    """out[:] = epi(alpha · (pro(a) @ b + a2 @ b2) + bias); returns fp32 column sums of out
    (N,) when ``colsum`` (computed from the fp32 values before rounding), else None.

    a: (M, K), b: (K, N), out: (M, N), any strides (views of transposes are fine).
    ab2: (a2 (M, R), b2 (R, N)). z: (M, N) for ``epi``. c2: (M, N) receives
    alpha2 · act(out), or alpha2 · act(z) with ``epi=EPI_DACT``. split_k=None picks it (only for plain GEMMs: no epilogue but alpha).
    ``tune=False`` launches one fixed config (never re-runs the kernel: safe in place).
    """
    M, K = a.shape
    N = b.shape[1]
    assert b.shape[0] == K and tuple(out.shape) == (M, N), (a.shape, b.shape, out.shape)
    for name, t in (("a", a), ("b", b)):
        check_dtype(name, t)
    extra = ab2 if ab2 is not None else (None, None)
    for name, t in (
        ("a", a),
        ("b", b),
        ("out", out),
        ("z", z),
        ("c2", c2),
        ("a2", extra[0]),
        ("b2", extra[1]),
    ):
        if t is not None and max(t.stride(), default=0) >= _MAX_STRIDE:
            raise ValueError(
                f"{name}: the Triton GEMM takes strides below {_MAX_STRIDE} elements (32-bit "
                f"offsets inside a tile), got strides {tuple(t.stride())}; pass a contiguous copy"
            )
    if M == 0 or N == 0:
        return torch.zeros(N, dtype=torch.float32, device=out.device) if colsum else None
    plain = not (bias is not None or ab2 is not None or epi or c2 is not None or colsum)
    if split_k is None:
        split_k = _split_k(M, N, K, out.device) if plain and tune else 1
    assert split_k == 1 or plain, "split-K takes no epilogue besides alpha"

    target = out
    if split_k > 1:
        target = torch.empty((split_k, M, N), dtype=torch.float32, device=out.device)
        sc = target.stride()
    else:
        sc = (0, *out.stride())
    dummy = out
    a2, b2 = ab2 if ab2 is not None else (dummy, dummy)
    R = a2.shape[1] if ab2 is not None else 0
    csum = None
    if colsum:
        rows = cdiv(M, _min_block_m(M, N, K, a.element_size()))
        csum = torch.zeros((rows, N), dtype=torch.float32, device=out.device)
    tma_a = tma_b = 0
    ad, bd = a, b
    if tma_wanted(a.element_size()) and K > 0:
        ad, tma_a = _operand_desc(a, 1)
        bd, tma_b = _operand_desc(b, 0)
    pers = persistent()
    layout = int(a.stride(1) == 1) | int(b.stride(0) == 1) << 1 | int(out.stride(1) == 1) << 2
    args = (
        ad,
        bd,
        target,
        a2,
        b2,
        bias if bias is not None else dummy,
        z if z is not None else dummy,
        c2 if c2 is not None else dummy,
        csum if csum is not None else dummy,
        M,
        N,
        K,
        R,
        *a.stride(),
        *b.stride(),
        *sc,
        *(a2.stride() if ab2 is not None else (0, 0)),
        *(b2.stride() if ab2 is not None else (0, 0)),
        *(z.stride() if z is not None else (0, 0)),
        *(c2.stride() if c2 is not None else (0, 0)),
        float(alpha),
        float(alpha2),
        split_k,
        next_pow2(M),
        layout,
    )
    flags = dict(
        BLOCK_R=max(16, min(64, next_pow2(max(R, 1)))),
        ACT=ACT_IDS[act],
        PRO_ACT=pro_act,
        HAS_AB2=ab2 is not None,
        HAS_BIAS=bias is not None,
        EPI=epi,
        STORE_C2=c2 is not None,
        HAS_CSUM=colsum,
        EPI_CHUNK=_EPI_CHUNK,
        CHUNK_ALL=chunk_all(),
        PRECISION=dot_precision(a.dtype),
        UPCAST=INTERPRET,
        TMA_A=tma_a,
        TMA_B=tma_b,
        PERSISTENT=pers,
    )

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _programs(out.device)) if pers else tiles, split_k)

    if tune:
        _gemm_tuned[grid](*args, **flags)
    else:
        # memory-bound uses (merge_lora): a mid-sized tile, no benchmarking
        fixed = _configs() if INTERPRET else [c for c in _configs() if c.kwargs["BLOCK_M"] == 64]
        cfg = fit_configs(fixed[:1], M, N, K, a.element_size())[0]
        _desc_blocks({"A": ad, "B": bd, **flags, **cfg.kwargs})
        _gemm_kernel[grid(cfg.kwargs)](
            *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
    if split_k > 1:
        out.copy_(target.sum(0))
    return csum.sum(0) if csum is not None else None
