"""Launchers of conv1d_mlp (csrc/conv1d_mlp.cu): the forward GEMM pair with the bias +
activation epilogue, and the backward with act'(h) in the dh epilogue."""

from __future__ import annotations

import torch

from ..codes import DTYPE_CODES, activation_code
from ._common import (
    aligned,
    aligned_empty,
    check,
    check_vec,
    launch,
    ld,
    put,
    round_up,
    unit_last,
    vec,
)
from ._loader import ext as extension_module


def _check_mlp(x, w1, w2):
    check("x", x, ndim=2)
    check("w1", w1, x, ndim=2)
    check("w2", w2, x, ndim=2)
    if w1.shape[1] != x.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"w1/w2: expected (hidden, {x.shape[1]}) and (C_out, hidden), got "
            f"{tuple(w1.shape)} and {tuple(w2.shape)}"
        )


def conv1d_mlp_fwd(x, w1, b1, w2, b2, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C) -> (y (M, C_out), h (M, hidden) pre-activation), both in x.dtype."""
    _check_mlp(x, w1, w2)
    M, C = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    b1_ = check_vec("b1", b1, hidden, x)
    b2_ = check_vec("b2", b2, c_out, x)
    code = activation_code(act)
    y = torch.empty((M, c_out), dtype=x.dtype, device=x.device)
    h = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, h
    ext = extension_module()
    x_, w1_, w2_ = aligned(x), aligned(w1), aligned(w2)
    act_h = aligned_empty((M, hidden), x)  # act(h), consumed by the second GEMM
    args = ext.MlpArgs()
    put(
        args,
        x=x_.data_ptr(),
        ldx=ld(x_),
        w1=w1_.data_ptr(),
        ldw1=ld(w1_),
        w2=w2_.data_ptr(),
        ldw2=ld(w2_),
        b1=0 if b1_ is None else b1_.data_ptr(),
        b2=0 if b2_ is None else b2_.data_ptr(),
        y=y.data_ptr(),
        ldy=ld(y),
        h=h.data_ptr(),
        ldh=ld(h),
        act_h=act_h.data_ptr(),
        ld_act_h=act_h.stride(0),
        m=M,
        c=C,
        hidden=hidden,
        c_out=c_out,
        act=code,
        dtype=DTYPE_CODES[x.dtype],
    )
    launch(x, ext.conv1d_mlp_fwd, args)
    return y, h


def conv1d_mlp_bwd(dy, x, w1, w2, h, act: str, has_b1: bool, has_b2: bool, needs_dw: bool = True):
    """All 2-D. Returns dx, dw1|None, db1|None, dw2|None, db2|None (act(h) is recomputed, not
    saved; the weight gradients only with needs_dw)."""
    _check_mlp(x, w1, w2)
    M, C = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    check("dy", dy, x, ndim=2)
    check("h", h, x, ndim=2)
    if tuple(dy.shape) != (M, c_out) or tuple(h.shape) != (M, hidden):
        raise ValueError(
            f"dy/h: expected shapes ({M}, {c_out}) and ({M}, {hidden}), got "
            f"{tuple(dy.shape)} and {tuple(h.shape)}"
        )
    code = activation_code(act)
    dev, dt = x.device, x.dtype
    dx = torch.empty((M, C), dtype=dt, device=dev)
    dw1 = torch.empty((hidden, C), dtype=dt, device=dev) if needs_dw else None
    dw2 = torch.empty((c_out, hidden), dtype=dt, device=dev) if needs_dw else None
    db1 = torch.empty((hidden,), dtype=dt, device=dev) if has_b1 else None
    db2 = torch.empty((c_out,), dtype=dt, device=dev) if has_b2 else None
    if M == 0:  # no tokens: the weight gradients are sums over nothing
        for t in (dw1, dw2, db1, db2):
            if t is not None:
                t.zero_()
        return dx, dw1, db1, dw2, db2
    ext = extension_module()
    dy_, x_, w1_, w2_ = aligned(dy), aligned(x), aligned(w1), aligned(w2)
    h_ = unit_last(h)
    dh = aligned_empty((M, hidden), x)
    act_h = aligned_empty((M, hidden), x)
    args = ext.MlpArgs()
    put(
        args,
        x=x_.data_ptr(),
        ldx=ld(x_),
        w1=w1_.data_ptr(),
        ldw1=ld(w1_),
        w2=w2_.data_ptr(),
        ldw2=ld(w2_),
        h=h_.data_ptr(),
        ldh=ld(h_),
        act_h=act_h.data_ptr(),
        ld_act_h=act_h.stride(0),
        dy=dy_.data_ptr(),
        lddy=ld(dy_),
        dh=dh.data_ptr(),
        lddh=dh.stride(0),
        dx=dx.data_ptr(),
        lddx=ld(dx),
        dw1=0 if dw1 is None else dw1.data_ptr(),  # 0: frozen weights, the GEMM is skipped
        lddw1=ld(dw1) if needs_dw else round_up(C, vec(dt)),
        dw2=0 if dw2 is None else dw2.data_ptr(),
        lddw2=ld(dw2) if needs_dw else round_up(hidden, vec(dt)),
        db1=0 if db1 is None else db1.data_ptr(),
        db2=0 if db2 is None else db2.data_ptr(),
        m=M,
        c=C,
        hidden=hidden,
        c_out=c_out,
        act=code,
        dtype=DTYPE_CODES[dt],
    )
    launch(x, ext.conv1d_mlp_bwd, args)
    return dx, dw1, db1, dw2, db2
