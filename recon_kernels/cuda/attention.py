"""Launchers of the attention kernels (csrc/attention_fwd.cu, attention_bwd.cu): forward with
logsumexp, backward (delta, dK/dV, dQ), masks through their broadcast strides, dropout."""

from __future__ import annotations

import os

import torch

from ..codes import DTYPE_CODES
from ..masks import kpm_bounds
from ..reference import dropout_params
from ._common import (
    aligned,
    check,
    check_device,
    launch,
    put,
    strides,
    unit_last,
)
from ._loader import ext as extension_module

# RECON_CUDA_ATTN_FWD: which forward kernel the CUDA backend runs (csrc/attention_fwd.cu,
# attention_fwd_sm90.cu): "auto" (default) the sm_90a kernel (wgmma, TMA, warp
# specialisation) on an sm_90 GPU when the extension was built for it and the strides allow
# TMA, else the portable sm_80 one; "sm80" always the portable one; "sm90" the sm_90a one
# wherever the arguments allow it (fp16/bf16, TMA-describable strides), an error when the
# build or the GPU has no sm_90a (in tests, the emulator runs it on the CPU).
# RECON_CUDA_ATTN_BWD: the same for the backward (csrc/attention_bwd_sm90.cu). The sm_90a
# backward adds dQ into a float32 workspace by bulk reductions (cp.reduce.async.bulk) whose
# order varies, so its dQ may differ in the last bits run to run; with
# attention_bwd(deterministic=True) it adds them in key-block order (a counter per dQ tile,
# as FlashAttention-3 does), the same bits every run, at some speed. The portable backward
# has no atomics: deterministic either way.
FWD_PATHS = {"auto": 0, "sm80": 1, "sm90": 2}


def lazy_log2() -> float:
    """RECON_CUDA_ATTN_LAZY: the CUDA forwards' lazy-rescale threshold in powers of two
    (csrc/attention_fwd.cu and attention_fwd_sm90.cu, FlashAttention-4's trick): a row's
    exponent shift, and with it O, only moves when the row's max outgrows the kept shift by
    more than a factor 2^value in the probabilities; otherwise the kept shift stays (the
    probabilities stay <= 2^value, exact in the fp32 sums). Default 8, as in FA4; 0 moves it
    whenever a row max grows (the kernels before it, for a GPU A/B); at most 15 (P V takes
    P in fp16, whose largest finite value is 65504 < 2^16)."""
    raw = os.environ.get("RECON_CUDA_ATTN_LAZY", "8")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 15.0:
        raise ValueError(f"RECON_CUDA_ATTN_LAZY: expected a number in [0, 15], got {raw!r}")
    return value


def pingpong() -> bool:
    """RECON_CUDA_ATTN_PINGPONG=0|1: the sm_90a forward's two consumer warpgroups take turns
    issuing their GEMMs (FlashAttention-3's pingpong schedule: one's softmax under the
    other's GEMMs; D <= 128). Default 0 until a GPU run compares them (bench_attention's
    recon-cuda-pingpong)."""
    raw = os.environ.get("RECON_CUDA_ATTN_PINGPONG", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"RECON_CUDA_ATTN_PINGPONG: expected 0 or 1, got {raw!r}")
    return raw == "1"


def fwd_path(var: str = "RECON_CUDA_ATTN_FWD") -> str:
    mode = os.environ.get(var, "auto")
    if mode not in FWD_PATHS:
        raise ValueError(f"{var}: expected one of {tuple(FWD_PATHS)}, got {mode!r}")
    return mode


def fwd_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which forward kernel attention_fwd would run for these operands: "sm90", or
    "sm80: <why not sm90>"."""
    ext = extension_module()
    args = ext.AttnArgs()
    for prefix, t in (("q", aligned(q)), ("k", aligned(k)), ("v", aligned(v))):
        _attn_operand(args, prefix, t)
    B, H, NQ, D = q.shape
    put(args, b=B, h=H, nq=NQ, nk=k.shape[2], d=D, dtype=DTYPE_CODES[q.dtype])
    put(args, path=FWD_PATHS[fwd_path()])
    return ext.attention_fwd_choice(args)


def bwd_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> str:
    """Which backward kernels attention_bwd would run: "sm90" or "sm80: <why not sm90>"
    (either way with deterministic=True or False)."""
    path = fwd_path("RECON_CUDA_ATTN_BWD")
    ext = extension_module()
    args = ext.AttnArgs()
    for prefix, t in (("q", aligned(q)), ("k", aligned(k)), ("v", aligned(v))):
        _attn_operand(args, prefix, t)
    _attn_operand(args, "do", aligned(dout), ptr_field="dout")
    B, H, NQ, D = q.shape
    put(args, b=B, h=H, nq=NQ, nk=k.shape[2], d=D, dtype=DTYPE_CODES[q.dtype])
    put(args, path=FWD_PATHS[path])
    return ext.attention_bwd_choice(args)


def bwd_workspace(q: torch.Tensor) -> torch.Tensor:
    """A zeroed workspace for attention_bwd(dq_workspace=) with queries q (B, H, Nq, D):
    float32, per (batch, head) ceil(Nq / 64) x ceil(D / 64) tiles of 64 x 64 dQ sums in the
    order of csrc/attention_bwd_sm90.cu's DqTile (D rounded up to 64, 128 or 256), then one
    int32 counter per (batch, head, 64-query tile): the reductions added into it in order
    (deterministic=True; they stay 0 otherwise)."""
    check("q", q, ndim=4)
    ext = extension_module()
    args = ext.AttnArgs()
    B, H, NQ, D = q.shape
    put(args, b=B, h=H, nq=NQ, d=D)
    return torch.zeros(ext.attention_bwd_workspace(args), dtype=torch.float32, device=q.device)


def _check_workspace(w: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"dq_workspace: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype != torch.float32 or not w.is_contiguous() or w.numel() < n:
        raise ValueError(
            f"dq_workspace: expected a contiguous float32 tensor of at least {n} elements "
            f"(bwd_workspace(q)), got {w.dtype} of {w.numel()} elements"
            + ("" if w.is_contiguous() else ", not contiguous")
        )
    if w.device != device:
        raise ValueError(f"dq_workspace: expected a tensor on {device}, got {w.device}")
    if w.data_ptr() % 16 != 0:
        raise ValueError("dq_workspace: expected a 16-byte aligned tensor (bulk reductions)")
    return w


def _attn_operand(args, prefix: str, t: torch.Tensor, ptr_field: str | None = None) -> None:
    sb, sh, sm, _ = strides(t)
    fields = {f"{prefix}_sb": sb, f"{prefix}_sh": sh, f"{prefix}_sm": sm}
    put(args, **{ptr_field or prefix: t.data_ptr()}, **fields)


def _attn_common(args, q, k, mask, key_padding_mask, scale, causal) -> list[torch.Tensor]:
    """Sizes, flags and masks; returns the mask tensors that must outlive the launch."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    keep = []
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        check_device("mask", mask)
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        try:
            m = m.expand(B, H, NQ, NK)  # a view: broadcast dims get stride 0
        except RuntimeError as e:
            raise ValueError(
                f"mask: expected a shape broadcastable to (B, H, Nq, Nk) = ({B}, {H}, {NQ}, "
                f"{NK}), got {tuple(mask.shape)}"
            ) from e
        m = m.view(torch.uint8)
        sb, sh, sm, sn = strides(m)
        put(args, mask=m.data_ptr(), m_sb=sb, m_sh=sh, m_sm=sm, m_sn=sn)
        keep.append(m)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, NK):
            raise ValueError(
                f"key_padding_mask: expected a bool tensor of shape (B, Nk) = ({B}, {NK}), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        check_device("key_padding_mask", key_padding_mask)
        kp = key_padding_mask.view(torch.uint8)
        sb, sn = strides(kp)
        bounds = kpm_bounds(key_padding_mask)
        put(args, kpm=kp.data_ptr(), kpm_sb=sb, kpm_sn=sn, kpm_bounds=bounds.data_ptr())
        keep += [kp, bounds]
    put(
        args,
        b=B,
        h=H,
        nq=NQ,
        nk=NK,
        d=D,
        scale=float(scale),
        causal=bool(causal),
        dtype=DTYPE_CODES[q.dtype],
    )
    return keep


def _attn_dropout(dropout_p: float, seed: int) -> dict[str, int | float]:
    """AttnArgs dropout fields: the uint32 seed, the 24-bit threshold (0: off) and
    1 / (1 - p); the kernels draw the keep mask of ``reference.dropout_keep`` from them."""
    try:
        p = float(dropout_p)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}") from e
    drop_seed, drop_threshold, drop_scale = dropout_params(p, seed)
    return {"drop_threshold": drop_threshold, "drop_seed": drop_seed, "drop_scale": drop_scale}


def _check_attn(q, k, v) -> None:
    check("q", q, ndim=4)
    check("k", k, q, ndim=4)
    check("v", v, q, ndim=4)
    B, H, NQ, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(
            f"k/v: expected shape ({B}, {H}, Nk, {D}) matching q {tuple(q.shape)}, got "
            f"k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if min(B, H, NQ, k.shape[2], D) < 1 or D > 256:
        raise ValueError(
            f"q/k: expected B, H, Nq, Nk >= 1 and 1 <= D <= 256, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, D), k/v (B, H, Nk, D) -> (out (B, H, Nq, D) in q.dtype, stored
    (B, Nq, H, D)-contiguous like every backend's (ops.attention.new_output), lse (B, H, Nq)
    float32: natural log-sum-exp, +inf on rows with no allowed key). dropout_p > 0 drops
    the probabilities of ``reference.dropout_keep(seed, ...)`` (lse stays the undropped one)."""
    drop = _attn_dropout(dropout_p, seed)
    _check_attn(q, k, v)
    ext = extension_module()
    args = ext.AttnArgs()
    put(args, **drop, path=FWD_PATHS[fwd_path()], lazy_log2=lazy_log2(), pingpong=pingpong())
    B, H, NQ, D = q.shape
    q_, k_, v_ = aligned(q), aligned(k), aligned(v)
    # the kernel writes through strides: (B, Nq, H, D) storage seen as (B, H, Nq, D)
    out = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    for prefix, t in (("q", q_), ("k", k_), ("v", v_), ("o", out)):
        _attn_operand(args, prefix, t)
    sb, sh, sm = strides(lse)
    put(args, lse=lse.data_ptr(), lse_sb=sb, lse_sh=sh, lse_sm=sm)
    keep = _attn_common(args, q, k, mask, key_padding_mask, scale, causal)
    launch(q, ext.attention_fwd, args)
    del keep
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (contiguous, input dtype). lse: (B, H, Nq) float32 from forward;
    dropout_p and seed: the forward's (the same keep mask is drawn again). deterministic:
    True makes the sm_90a backward add its dQ partial sums in a fixed order (bit-reproducible
    run to run, somewhat slower); the portable backward is deterministic either way."""
    return attention_bwd_with_workspace(
        dout,
        q,
        k,
        v,
        out,
        lse,
        mask,
        key_padding_mask,
        scale,
        causal,
        dropout_p,
        seed,
        deterministic,
    )


def attention_bwd_with_workspace(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    deterministic: bool = False,
    dq_workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_bwd with the zeroed float32 workspace of the sm_90a backward given
    (``bwd_workspace``): to reuse a buffer, or to read its float32 dQ sums and counters
    afterwards. None allocates one when that backward runs; the portable backward leaves a
    given one untouched."""
    drop = _attn_dropout(dropout_p, seed)
    _check_attn(q, k, v)
    check("dout", dout, q, ndim=4)
    check("out", out, q, ndim=4)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if tuple(dout.shape) != (B, H, NQ, D) or tuple(out.shape) != (B, H, NQ, D):
        raise ValueError(
            f"dout/out: expected shape {tuple(q.shape)}, got {tuple(dout.shape)} and "
            f"{tuple(out.shape)}"
        )
    check_device("lse", lse)
    if tuple(lse.shape) != (B, H, NQ):
        raise ValueError(f"lse: expected shape ({B}, {H}, {NQ}), got {tuple(lse.shape)}")
    ext = extension_module()
    args = ext.AttnArgs()
    put(args, **drop)
    lse = lse.float()
    q_, k_, v_, do_ = aligned(q), aligned(k), aligned(v), aligned(dout)
    out_ = unit_last(out)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=q.device)
    for prefix, t in (
        ("q", q_),
        ("k", k_),
        ("v", v_),
        ("o", out_),
        ("dq", dq),
        ("dk", dk),
        ("dv", dv),
    ):
        _attn_operand(args, prefix, t)
    _attn_operand(args, "do", do_, ptr_field="dout")
    put(args, delta=delta.data_ptr())
    sb, sh, sm = strides(lse)
    put(args, lse=lse.data_ptr(), lse_sb=sb, lse_sh=sh, lse_sm=sm)
    keep = _attn_common(args, q, k, mask, key_padding_mask, scale, causal)
    put(args, path=FWD_PATHS[fwd_path("RECON_CUDA_ATTN_BWD")], deterministic=bool(deterministic))
    if ext.attention_bwd_choice(args) == "sm90":  # dQ by bulk float adds into a zeroed workspace
        n = ext.attention_bwd_workspace(args)
        if dq_workspace is None:
            dq_accum = torch.zeros(n, dtype=torch.float32, device=q.device)
        else:
            dq_accum = _check_workspace(dq_workspace, n, q.device)
        put(args, dq_accum=dq_accum.data_ptr())
        keep.append(dq_accum)
    launch(q, ext.attention_bwd, args)
    del keep
    return dq, dk, dv
