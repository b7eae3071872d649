"""The ``cuda`` backend: Python launchers of the compiled extension ``recon_kernels._cuda``.

The extension (sources in ``csrc/``) takes raw device pointers, sizes, strides, a dtype code
and a CUDA stream; it never sees a torch tensor and does not link libtorch. Everything that
could make a kernel read or write out of bounds is settled here first: devices, dtypes,
shapes, unit stride of the last dim, and 16-byte alignment of every row the kernels copy with
16-byte vectors (unaligned inputs are copied into aligned, row-padded buffers, never
rejected). The launchers raise ``RuntimeError`` with the CUDA error string on failure.

Every launcher has exactly the signature and return convention of its counterpart in
``recon_kernels.reference`` (``attention_fwd``/``attention_bwd``, ``conv1d_mlp_fwd``/``_bwd``,
``lora_linear_fwd``/``_bwd``, ``merge_lora``), so ``ops/_dispatch.py`` can swap them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import shutil
from collections.abc import Iterator
from types import ModuleType

import torch

from recon_kernels.reference import dropout_params

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

# A module with the extension's API that runs the kernels on the CPU (the test-only build
# recon_kernels._cuda_emu, see csrc/emulator.h); when set, the launchers take CPU tensors.
_emulator: ModuleType | None = None


# --------------------------------------------------------------------------- loading


@functools.cache
def _load():
    try:
        return importlib.import_module("recon_kernels._cuda"), None
    except ImportError as e:
        if shutil.which("nvcc") is None:
            why = (
                "the CUDA extension is not built: no nvcc was found at install time "
                "(install the CUDA toolkit, then reinstall with RECON_BUILD_CUDA=1)"
            )
        else:
            why = (
                "the CUDA extension recon_kernels._cuda is not built or failed to import "
                f"({e}); reinstall with RECON_BUILD_CUDA=1"
            )
        return None, why


def extension():
    """The loaded extension module; RuntimeError saying why if it is unavailable."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def unavailable_reason() -> str | None:
    return _load()[1]


@contextlib.contextmanager
def use_emulator(module: ModuleType) -> Iterator[None]:
    """Tests only: route the launchers to the CPU emulation build ``module`` (CPU tensors)."""
    global _emulator
    prev, _emulator = _emulator, module
    try:
        yield
    finally:
        _emulator = prev


def _ext():
    return _emulator if _emulator is not None else extension()


# --------------------------------------------------------------------------- checks


def _check_device(name: str, t: torch.Tensor) -> None:
    if _emulator is not None:
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CUDA emulator takes CPU tensors, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name}: the cuda backend needs a CUDA tensor, got a tensor on {t.device}"
        )


def _check(name: str, t: torch.Tensor, ref: torch.Tensor | None = None, ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    _check_device(name, t)
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(
            f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype} "
            "(use backend='eager' for float64)"
        )
    if ref is not None:
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device}, got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte chunk (the kernels' copy unit)."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def _strides(t: torch.Tensor) -> list[int]:
    """Element strides, 0 on size-1 dims (any stride is valid there; 0 is trivially aligned)."""
    return [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]


def _is_aligned(t: torch.Tensor) -> bool:
    v = _vec(t.dtype)
    st = _strides(t)
    return (
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % v == 0 and s >= 0 for s in st[:-1])
    )


def _aligned_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose rows start 16-byte aligned (the last dim is
    padded in memory to a multiple of 16 bytes; the returned view has the exact shape)."""
    v = _vec(like.dtype)
    last = shape[-1]
    padded = (last + v - 1) // v * v
    buf = torch.empty((*shape[:-1], padded), dtype=like.dtype, device=like.device)
    return buf[..., :last]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can copy its rows with 16-byte vectors, else an aligned copy."""
    if _is_aligned(t):
        return t
    out = _aligned_empty(tuple(t.shape), t)
    out.copy_(t)
    return out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in the last dim (for tensors read element by element)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _put(args, **fields) -> None:
    # the extension's argument structs reject unknown field names (AttributeError)
    for k, val in fields.items():
        setattr(args, k, val)


def _launch(t: torch.Tensor, fn, args) -> None:
    """Runs fn(args, stream) on t's device and current stream."""
    if _emulator is not None:
        fn(args, 0)
        return
    with torch.cuda.device(t.device):
        fn(args, torch.cuda.current_stream(t.device).cuda_stream)


# --------------------------------------------------------------------------- attention


def _attn_operand(args, prefix: str, t: torch.Tensor, ptr_field: str | None = None) -> None:
    sb, sh, sm, _ = _strides(t)
    fields = {f"{prefix}_sb": sb, f"{prefix}_sh": sh, f"{prefix}_sm": sm}
    _put(args, **{ptr_field or prefix: t.data_ptr()}, **fields)


def _attn_common(args, q, k, mask, key_padding_mask, scale, causal) -> list[torch.Tensor]:
    """Sizes, flags and masks; returns the mask tensors that must outlive the launch."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    keep = []
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        _check_device("mask", mask)
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
        sb, sh, sm, sn = _strides(m)
        _put(args, mask=m.data_ptr(), m_sb=sb, m_sh=sh, m_sm=sm, m_sn=sn)
        keep.append(m)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, NK):
            raise ValueError(
                f"key_padding_mask: expected a bool tensor of shape (B, Nk) = ({B}, {NK}), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        _check_device("key_padding_mask", key_padding_mask)
        kp = key_padding_mask.view(torch.uint8)
        sb, sn = _strides(kp)
        _put(args, kpm=kp.data_ptr(), kpm_sb=sb, kpm_sn=sn)
        keep.append(kp)
    _put(
        args,
        b=B,
        h=H,
        nq=NQ,
        nk=NK,
        d=D,
        scale=float(scale),
        causal=bool(causal),
        dtype=_DTYPE_CODES[q.dtype],
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
    _check("q", q, ndim=4)
    _check("k", k, q, ndim=4)
    _check("v", v, q, ndim=4)
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
    ext = _ext()
    args = ext.AttnArgs()
    _put(args, **drop)
    B, H, NQ, D = q.shape
    q_, k_, v_ = _aligned(q), _aligned(k), _aligned(v)
    # the kernel writes through strides: (B, Nq, H, D) storage seen as (B, H, Nq, D)
    out = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    for prefix, t in (("q", q_), ("k", k_), ("v", v_), ("o", out)):
        _attn_operand(args, prefix, t)
    sb, sh, sm = _strides(lse)
    _put(args, lse=lse.data_ptr(), lse_sb=sb, lse_sh=sh, lse_sm=sm)
    keep = _attn_common(args, q, k, mask, key_padding_mask, scale, causal)
    _launch(q, ext.attention_fwd, args)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv (contiguous, input dtype). lse: (B, H, Nq) float32 from forward;
    dropout_p and seed: the forward's (the same keep mask is drawn again)."""
    drop = _attn_dropout(dropout_p, seed)
    _check_attn(q, k, v)
    _check("dout", dout, q, ndim=4)
    _check("out", out, q, ndim=4)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if tuple(dout.shape) != (B, H, NQ, D) or tuple(out.shape) != (B, H, NQ, D):
        raise ValueError(
            f"dout/out: expected shape {tuple(q.shape)}, got {tuple(dout.shape)} and "
            f"{tuple(out.shape)}"
        )
    _check_device("lse", lse)
    if tuple(lse.shape) != (B, H, NQ):
        raise ValueError(f"lse: expected shape ({B}, {H}, {NQ}), got {tuple(lse.shape)}")
    ext = _ext()
    args = ext.AttnArgs()
    _put(args, **drop)
    lse = lse.float()
    q_, k_, v_, do_ = _aligned(q), _aligned(k), _aligned(v), _aligned(dout)
    out_ = _unit_last(out)
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
    _put(args, delta=delta.data_ptr())
    sb, sh, sm = _strides(lse)
    _put(args, lse=lse.data_ptr(), lse_sb=sb, lse_sh=sh, lse_sm=sm)
    keep = _attn_common(args, q, k, mask, key_padding_mask, scale, causal)
    _launch(q, ext.attention_bwd, args)
    del keep
    return dq, dk, dv


# --------------------------------------------------------------------------- conv1d_mlp


def _check_vec(name: str, b: torch.Tensor | None, n: int, ref: torch.Tensor):
    if b is None:
        return None
    _check(name, b, ref, ndim=1)
    if b.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(b.shape)}")
    return b.contiguous()


def _round_up(n: int, v: int) -> int:
    return (n + v - 1) // v * v


def _ld(t: torch.Tensor) -> int:
    """Row stride of a 2-D operand; a single row's stride is never followed, so report an
    aligned one (the launchers check ld % 16 bytes)."""
    if t.shape[0] > 1:
        return t.stride(0)
    v = _vec(t.dtype)
    return (t.shape[1] + v - 1) // v * v


def _check_mlp(x, w1, w2):
    _check("x", x, ndim=2)
    _check("w1", w1, x, ndim=2)
    _check("w2", w2, x, ndim=2)
    if w1.shape[1] != x.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"w1/w2: expected (hidden, {x.shape[1]}) and (C_out, hidden), got "
            f"{tuple(w1.shape)} and {tuple(w2.shape)}"
        )


def _act(name: str) -> int:
    if name not in _ACT_CODES:
        raise ValueError(f"activation: expected one of {tuple(_ACT_CODES)}, got {name!r}")
    return _ACT_CODES[name]


def conv1d_mlp_fwd(x, w1, b1, w2, b2, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C) -> (y (M, C_out), h (M, hidden) pre-activation), both in x.dtype."""
    _check_mlp(x, w1, w2)
    M, C = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    b1_ = _check_vec("b1", b1, hidden, x)
    b2_ = _check_vec("b2", b2, c_out, x)
    code = _act(act)
    y = torch.empty((M, c_out), dtype=x.dtype, device=x.device)
    h = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, h
    ext = _ext()
    x_, w1_, w2_ = _aligned(x), _aligned(w1), _aligned(w2)
    act_h = _aligned_empty((M, hidden), x)  # act(h), consumed by the second GEMM
    args = ext.MlpArgs()
    _put(
        args,
        x=x_.data_ptr(),
        ldx=_ld(x_),
        w1=w1_.data_ptr(),
        ldw1=_ld(w1_),
        w2=w2_.data_ptr(),
        ldw2=_ld(w2_),
        b1=0 if b1_ is None else b1_.data_ptr(),
        b2=0 if b2_ is None else b2_.data_ptr(),
        y=y.data_ptr(),
        ldy=_ld(y),
        h=h.data_ptr(),
        ldh=_ld(h),
        act_h=act_h.data_ptr(),
        ld_act_h=act_h.stride(0),
        m=M,
        c=C,
        hidden=hidden,
        c_out=c_out,
        act=code,
        dtype=_DTYPE_CODES[x.dtype],
    )
    _launch(x, ext.conv1d_mlp_fwd, args)
    return y, h


def conv1d_mlp_bwd(dy, x, w1, w2, h, act: str, has_b1: bool, has_b2: bool, needs_dw: bool = True):
    """All 2-D. Returns dx, dw1|None, db1|None, dw2|None, db2|None (act(h) is recomputed, not
    saved; the weight gradients only with needs_dw)."""
    _check_mlp(x, w1, w2)
    M, C = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    _check("dy", dy, x, ndim=2)
    _check("h", h, x, ndim=2)
    if tuple(dy.shape) != (M, c_out) or tuple(h.shape) != (M, hidden):
        raise ValueError(
            f"dy/h: expected shapes ({M}, {c_out}) and ({M}, {hidden}), got "
            f"{tuple(dy.shape)} and {tuple(h.shape)}"
        )
    code = _act(act)
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
    ext = _ext()
    dy_, x_, w1_, w2_ = _aligned(dy), _aligned(x), _aligned(w1), _aligned(w2)
    h_ = _unit_last(h)
    dh = _aligned_empty((M, hidden), x)
    act_h = _aligned_empty((M, hidden), x)
    args = ext.MlpArgs()
    _put(
        args,
        x=x_.data_ptr(),
        ldx=_ld(x_),
        w1=w1_.data_ptr(),
        ldw1=_ld(w1_),
        w2=w2_.data_ptr(),
        ldw2=_ld(w2_),
        h=h_.data_ptr(),
        ldh=_ld(h_),
        act_h=act_h.data_ptr(),
        ld_act_h=act_h.stride(0),
        dy=dy_.data_ptr(),
        lddy=_ld(dy_),
        dh=dh.data_ptr(),
        lddh=dh.stride(0),
        dx=dx.data_ptr(),
        lddx=_ld(dx),
        dw1=0 if dw1 is None else dw1.data_ptr(),  # 0: frozen weights, the GEMM is skipped
        lddw1=_ld(dw1) if needs_dw else _round_up(C, _vec(dt)),
        dw2=0 if dw2 is None else dw2.data_ptr(),
        lddw2=_ld(dw2) if needs_dw else _round_up(hidden, _vec(dt)),
        db1=0 if db1 is None else db1.data_ptr(),
        db2=0 if db2 is None else db2.data_ptr(),
        m=M,
        c=C,
        hidden=hidden,
        c_out=c_out,
        act=code,
        dtype=_DTYPE_CODES[dt],
    )
    _launch(x, ext.conv1d_mlp_bwd, args)
    return dx, dw1, db1, dw2, db2


# --------------------------------------------------------------------------- LoRA


def _check_lora(weight, lora_a, lora_b, ref_name: str, ref: torch.Tensor):
    _check("weight", weight, ref if ref is not weight else None, ndim=2)
    _check("lora_a", lora_a, ref, ndim=2)
    _check("lora_b", lora_b, ref, ndim=2)
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape[1] != in_f or tuple(lora_b.shape) != (out_f, r) or r < 1:
        raise ValueError(
            f"lora_a/lora_b: expected (r, {in_f}) and ({out_f}, r) with r >= 1 to match "
            f"weight {tuple(weight.shape)}, got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float):
    """x (M, in) -> (y (M, out), xa = x lora_aᵀ (M, r)), both in x.dtype."""
    _check("x", x, ndim=2)
    _check_lora(weight, lora_a, lora_b, "x", x)
    M, in_f = x.shape
    out_f, r = weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != in_f:
        raise ValueError(f"x: expected last dim {weight.shape[1]}, got shape {tuple(x.shape)}")
    bias_ = _check_vec("bias", bias, out_f, x)
    y = torch.empty((M, out_f), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, torch.empty((0, r), dtype=x.dtype, device=x.device)
    ext = _ext()
    x_, w_, la_, lb_ = _aligned(x), _aligned(weight), _aligned(lora_a), _aligned(lora_b)
    xa = _aligned_empty((M, r), x)  # also the A operand of the rank-r term
    args = ext.LoraArgs()
    _put(
        args,
        x=x_.data_ptr(),
        ldx=_ld(x_),
        w=w_.data_ptr(),
        ldw=_ld(w_),
        la=la_.data_ptr(),
        ldla=_ld(la_),
        lb=lb_.data_ptr(),
        ldlb=_ld(lb_),
        bias=0 if bias_ is None else bias_.data_ptr(),
        y=y.data_ptr(),
        ldy=_ld(y),
        xa=xa.data_ptr(),
        ldxa=xa.stride(0),
        m=M,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=_DTYPE_CODES[x.dtype],
    )
    _launch(x, ext.lora_linear_fwd, args)
    return y, xa.contiguous()


def lora_linear_bwd(
    dy, x, weight, lora_a, lora_b, xa, scale: float, needs_dw: bool, has_bias: bool
):
    """Returns dx, dweight|None, dbias|None, dA, dB (x.dtype)."""
    _check("x", x, ndim=2)
    _check_lora(weight, lora_a, lora_b, "x", x)
    _check("dy", dy, x, ndim=2)
    _check("xa", xa, x, ndim=2)
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
    ext = _ext()
    dy_, x_, w_ = _aligned(dy), _aligned(x), _aligned(weight)
    la_, lb_, xa_ = _aligned(lora_a), _aligned(lora_b), _aligned(xa)
    dyb = _aligned_empty((M, r), x)  # dy lora_b, also an A operand
    args = ext.LoraArgs()
    _put(
        args,
        x=x_.data_ptr(),
        ldx=_ld(x_),
        w=w_.data_ptr(),
        ldw=_ld(w_),
        la=la_.data_ptr(),
        ldla=_ld(la_),
        lb=lb_.data_ptr(),
        ldlb=_ld(lb_),
        xa=xa_.data_ptr(),
        ldxa=_ld(xa_),
        dy=dy_.data_ptr(),
        lddy=_ld(dy_),
        dyb=dyb.data_ptr(),
        lddyb=dyb.stride(0),
        dx=dx.data_ptr(),
        lddx=_ld(dx),
        dla=da.data_ptr(),
        lddla=_ld(da),
        dlb=db.data_ptr(),
        lddlb=_ld(db),
        dw=0 if dw is None else dw.data_ptr(),
        lddw=0 if dw is None else _ld(dw),
        dbias=0 if dbias is None else dbias.data_ptr(),
        m=M,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=_DTYPE_CODES[dt],
    )
    _launch(x, ext.lora_linear_bwd, args)
    return dx, dw, dbias, da, db


def merge_lora(weight, lora_a, lora_b, scale: float) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a in weight's dtype (fp32 accumulation)."""
    _check_lora(weight, lora_a, lora_b, "weight", weight)
    out_f, in_f = weight.shape
    r = lora_a.shape[0]
    ext = _ext()
    la_, lb_ = _aligned(lora_a), _aligned(lora_b)
    w_ = _unit_last(weight)
    merged = torch.empty((out_f, in_f), dtype=weight.dtype, device=weight.device)
    args = ext.LoraArgs()
    _put(
        args,
        w=w_.data_ptr(),
        ldw=_ld(w_),
        la=la_.data_ptr(),
        ldla=_ld(la_),
        lb=lb_.data_ptr(),
        ldlb=_ld(lb_),
        y=merged.data_ptr(),
        ldy=_ld(merged),
        m=out_f,
        **{"in": in_f},
        out=out_f,
        r=r,
        scale=float(scale),
        dtype=_DTYPE_CODES[weight.dtype],
    )
    _launch(weight, ext.merge_lora, args)
    return merged
