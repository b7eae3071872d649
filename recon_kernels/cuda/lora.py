"""Launchers of the LoRA ops (csrc/lora.cu): x Wᵀ + b + s·(x Aᵀ) Bᵀ as one GEMM with a
second rank-r K segment, its backward, and merge_lora."""

from __future__ import annotations

import torch

from ..codes import DTYPE_CODES
from ._common import (
    aligned,
    aligned_empty,
    check,
    check_vec,
    launch,
    ld,
    put,
    unit_last,
)
from ._loader import ext as extension_module


def _check_lora(weight, lora_a, lora_b, ref_name: str, ref: torch.Tensor):
    check("weight", weight, ref if ref is not weight else None, ndim=2)
    check("lora_a", lora_a, ref, ndim=2)
    check("lora_b", lora_b, ref, ndim=2)
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape[1] != in_f or tuple(lora_b.shape) != (out_f, r) or r < 1:
        raise ValueError(
            f"lora_a/lora_b: expected (r, {in_f}) and ({out_f}, r) with r >= 1 to match "
            f"weight {tuple(weight.shape)}, got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float):
    """x (M, in) -> (y (M, out), xa = x lora_aᵀ (M, r)), both in x.dtype."""
    check("x", x, ndim=2)
    _check_lora(weight, lora_a, lora_b, "x", x)
    M, in_f = x.shape
    out_f, r = weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != in_f:
        raise ValueError(f"x: expected last dim {weight.shape[1]}, got shape {tuple(x.shape)}")
    bias_ = check_vec("bias", bias, out_f, x)
    y = torch.empty((M, out_f), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, torch.empty((0, r), dtype=x.dtype, device=x.device)
    ext = extension_module()
    x_, w_, la_, lb_ = aligned(x), aligned(weight), aligned(lora_a), aligned(lora_b)
    xa = aligned_empty((M, r), x)  # also the A operand of the rank-r term
    args = ext.LoraArgs()
    put(
        args,
        x=x_.data_ptr(),
        ldx=ld(x_),
        w=w_.data_ptr(),
        ldw=ld(w_),
        la=la_.data_ptr(),
        ldla=ld(la_),
        lb=lb_.data_ptr(),
        ldlb=ld(lb_),
        bias=0 if bias_ is None else bias_.data_ptr(),
        y=y.data_ptr(),
        ldy=ld(y),
        xa=xa.data_ptr(),
        ldxa=xa.stride(0),
        m=M,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=DTYPE_CODES[x.dtype],
    )
    launch(x, ext.lora_linear_fwd, args)
    return y, xa.contiguous()


def lora_linear_bwd(
    dy, x, weight, lora_a, lora_b, xa, scale: float, needs_dw: bool, has_bias: bool
):
    """Returns dx, dweight|None, dbias|None, dA, dB (x.dtype)."""
    check("x", x, ndim=2)
    _check_lora(weight, lora_a, lora_b, "x", x)
    check("dy", dy, x, ndim=2)
    check("xa", xa, x, ndim=2)
    M, in_f = x.shape
    out_f, r = weight.shape[0], lora_a.shape[0]
    if tuple(dy.shape) != (M, out_f) or tuple(xa.shape) != (M, r):
        raise ValueError(
            f"dy/xa: expected shapes ({M}, {out_f}) and ({M}, {r}), got {tuple(dy.shape)} "
            f"and {tuple(xa.shape)}"
        )
    dev, dt = x.device, x.dtype
    dx = torch.empty((M, in_f), dtype=dt, device=dev)
    da = torch.empty((r, in_f), dtype=dt, device=dev)
    db = torch.empty((out_f, r), dtype=dt, device=dev)
    dw = torch.empty((out_f, in_f), dtype=dt, device=dev) if needs_dw else None
    dbias = torch.empty((out_f,), dtype=dt, device=dev) if has_bias else None
    if M == 0:
        for t in (da, db, dw, dbias):
            if t is not None:
                t.zero_()
        return dx, dw, dbias, da, db
    ext = extension_module()
    dy_, x_, w_ = aligned(dy), aligned(x), aligned(weight)
    la_, lb_, xa_ = aligned(lora_a), aligned(lora_b), aligned(xa)
    dyb = aligned_empty((M, r), x)  # dy lora_b, also an A operand
    args = ext.LoraArgs()
    put(
        args,
        x=x_.data_ptr(),
        ldx=ld(x_),
        w=w_.data_ptr(),
        ldw=ld(w_),
        la=la_.data_ptr(),
        ldla=ld(la_),
        lb=lb_.data_ptr(),
        ldlb=ld(lb_),
        xa=xa_.data_ptr(),
        ldxa=ld(xa_),
        dy=dy_.data_ptr(),
        lddy=ld(dy_),
        dyb=dyb.data_ptr(),
        lddyb=dyb.stride(0),
        dx=dx.data_ptr(),
        lddx=ld(dx),
        dla=da.data_ptr(),
        lddla=ld(da),
        dlb=db.data_ptr(),
        lddlb=ld(db),
        dw=0 if dw is None else dw.data_ptr(),
        lddw=0 if dw is None else ld(dw),
        dbias=0 if dbias is None else dbias.data_ptr(),
        m=M,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=DTYPE_CODES[dt],
    )
    launch(x, ext.lora_linear_bwd, args)
    return dx, dw, dbias, da, db


def merge_lora(weight, lora_a, lora_b, scale: float) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a in weight's dtype (fp32 accumulation)."""
    _check_lora(weight, lora_a, lora_b, "weight", weight)
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    ext = extension_module()
    la_, lb_ = aligned(lora_a), aligned(lora_b)
    w_ = unit_last(weight)
    merged = torch.empty((out_f, in_f), dtype=weight.dtype, device=weight.device)
    args = ext.LoraArgs()
    put(
        args,
        w=w_.data_ptr(),
        ldw=ld(w_),
        la=la_.data_ptr(),
        ldla=ld(la_),
        lb=lb_.data_ptr(),
        ldlb=ld(lb_),
        y=merged.data_ptr(),
        ldy=ld(merged),
        m=out_f,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=DTYPE_CODES[weight.dtype],
    )
    launch(weight, ext.merge_lora, args)
    return merged
