"""masked_softmax_attention and causal_attention: validation, custom ops, autograd.

Two opaque custom ops carry the work (``recon::attention_fwd`` -> (out, lse) and
``recon::attention_bwd`` -> (dq, dk, dv)); forward saves q, k, v, out and lse. The public
ops ``recon::masked_softmax_attention`` / ``recon::causal_attention`` are composite: they
validate, resolve the backend and call the forward op, so torch.compile sees one opaque
node per call and autograd reaches the backward op.

``deterministic`` (a plain bool of both custom ops' schemas, so torch.compile keys on it)
picks the backward: on triton, False (default, as FlashAttention) the fused atomic-dQ
kernel, True the atomic-free two-kernel one, bit-reproducible run to run; on cuda, True
makes the sm_90a backward (Hopper) add its dQ partial sums in key-block order, the same
bits every run (the portable backward is deterministic either way). ``eager`` accepts it and ignores it: its backward is deterministic whatever its value.
"""

from __future__ import annotations

import math

import torch

from . import _dispatch
from ._validate import check_device, check_scale, check_tensor, shape_str

MAX_HEAD_DIM = 256
_LAYOUT_Q = "(B, H, Nq, D)"
_LAYOUT_KV = "(B, H, Nk, D)"


# --------------------------------------------------------------------------- custom ops


def new_output(q: torch.Tensor) -> torch.Tensor:
    """The attention output: logical (B, H, Nq, D), stored (B, Nq, H, D)-contiguous, so the
    usual ``out.transpose(1, 2).reshape(B, Nq, H * D)`` after attention is free. Every
    backend returns this layout."""
    B, H, NQ, D = q.shape
    return q.new_empty((B, NQ, H, D)).transpose(1, 2)


def _fwd_body(q, k, v, mask, kpm, scale, causal, backend, dropout_p=0.0, seed=None, det=False):
    """The forward op's work (shared by the custom op and the light route; det, the
    backward's choice, is not used here)."""
    return _dispatch.run(
        backend,
        "attention",
        "attention_fwd",
        q,
        k,
        v,
        mask,
        kpm,
        scale,
        causal,
        **_dropout_args(dropout_p, seed),
    )


def _bwd_body(
    dout, q, k, v, out, lse, mask, kpm, scale, causal, backend, dropout_p, seed, deterministic
):
    """The backward op's work (shared by the custom op and the light route)."""
    return _dispatch.run(
        backend,
        "attention",
        "attention_bwd",
        dout,
        q,
        k,
        v,
        out,
        lse,
        mask,
        kpm,
        scale,
        causal,
        **_dropout_args(dropout_p, seed),
        deterministic=deterministic,
    )


@torch.library.custom_op("recon::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    backend: str,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) float32; float64 for float64 inputs).
    dropout_p > 0: seed is a CPU int64 tensor of one element (reference.dropout_keep).
    deterministic: not used by the forward, saved for the backward op."""
    return _fwd_body(q, k, v, mask, key_padding_mask, scale, causal, backend, dropout_p, seed)


def _dropout_args(dropout_p: float, seed: torch.Tensor | None) -> dict:
    if dropout_p <= 0:
        return {}
    return {"dropout_p": dropout_p, "seed": int(seed.item())}  # the kernels keep 32 bits


@attention_fwd.register_fake
def _(
    q,
    k,
    v,
    mask,
    key_padding_mask,
    scale,
    causal,
    backend,
    dropout_p=0.0,
    seed=None,
    deterministic=False,
):
    B, H, NQ, D = q.shape
    torch._check(k.shape[-1] == D, lambda: f"k: head dim {k.shape[-1]} != q's {D}")
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return new_output(q), q.new_empty((B, H, NQ), dtype=lse_dtype)


@torch.library.custom_op("recon::attention_bwd", mutates_args=())
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
    backend: str,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the input dtypes. deterministic=False lets the triton and cuda (sm_90a)
    backends sum dQ in a varying order (see the module docstring)."""
    return _bwd_body(
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
        backend,
        dropout_p,
        seed,
        deterministic,
    )


@attention_bwd.register_fake
def _(
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
    backend,
    dropout_p=0.0,
    seed=None,
    deterministic=False,
):
    # every backend returns contiguous gradients, whatever the inputs' strides
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, kpm, scale, causal, backend, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, kpm, seed)
    ctx.scale, ctx.causal, ctx.backend, ctx.dropout_p = scale, causal, backend, dropout_p
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)
    # autograd would otherwise fill a zeros tensor the size of the non-differentiable
    # output as its gradient on every backward; an unused output then arrives as None
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, bwd=attention_bwd):
    q, k, v, out, lse, mask, kpm, seed = ctx.saved_tensors
    if dout is None:
        return (None,) * 11
    dq, dk, dv = bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        mask,
        kpm,
        ctx.scale,
        ctx.causal,
        ctx.backend,
        ctx.dropout_p,
        seed,
        ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


_LightAttention = _dispatch.light_function(
    "_LightAttention", _fwd_body, _setup_context, _backward, _bwd_body
)


# --------------------------------------------------------------------------- validation


def _validate(q, k, v, mask, key_padding_mask, scale):
    check_tensor("q", q, ndim=4, layout=_LAYOUT_Q)
    check_tensor("k", k, ndim=4, layout=_LAYOUT_KV)
    check_tensor("v", v, ndim=4, layout=_LAYOUT_KV)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: expected dtype {q.dtype} (same as q), got {t.dtype}")
        check_device(name, t, "q", q)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k: expected shape ({B}, {H}, Nk, {D}) to match q {shape_str(q)}, got {shape_str(k)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {shape_str(k)} (same as k), got {shape_str(v)}")
    if NQ < 1 or NK < 1 or B < 1 or H < 1:
        raise ValueError(
            f"q/k: expected B, H, Nq, Nk >= 1, got q {shape_str(q)} and k {shape_str(k)}"
        )
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D must be in [1, {MAX_HEAD_DIM}], got D={D}")
    if mask is not None:
        check_tensor("mask", mask, ndim=(2, 3, 4), dtypes=(torch.bool,))
        check_device("mask", mask, "q", q)
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        for got, want, what in zip(m.shape, (B, H, NQ, NK), ("B", "H", "Nq", "Nk")):
            if got not in (1, want):
                raise ValueError(
                    f"mask: expected a shape broadcastable to (B, H, Nq, Nk) = "
                    f"({B}, {H}, {NQ}, {NK}), got {shape_str(mask)} (dim {what}: {got})"
                )
        mask = m
    if key_padding_mask is not None:
        check_tensor(
            "key_padding_mask", key_padding_mask, ndim=2, layout="(B, Nk)", dtypes=(torch.bool,)
        )
        check_device("key_padding_mask", key_padding_mask, "q", q)
        if tuple(key_padding_mask.shape) != (B, NK):
            raise ValueError(
                f"key_padding_mask: expected shape (B, Nk) = ({B}, {NK}), "
                f"got {shape_str(key_padding_mask)}"
            )
    scale = 1.0 / math.sqrt(D) if scale is None else check_scale("scale", scale)
    return mask, scale


def _check_dropout(dropout_p) -> float:
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, (int, float))
        or not 0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_deterministic(deterministic) -> bool:
    if not isinstance(deterministic, bool):
        raise ValueError(
            f"deterministic: expected a bool, got {type(deterministic).__name__} {deterministic!r}"
        )
    # torch.use_deterministic_algorithms(True) asks every op for its deterministic kernel
    return deterministic or torch.are_deterministic_algorithms_enabled()


def _attention(
    q, k, v, mask, key_padding_mask, scale, causal, dropout_p, backend, deterministic=False
):
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        q, k, v = _dispatch.autocast(q, k, v)
    mask, scale = _validate(q, k, v, mask, key_padding_mask, scale)
    dropout_p = _check_dropout(dropout_p)
    deterministic = _check_deterministic(deterministic)
    name = _dispatch.resolve(backend, q.device, q.dtype)
    seed = None
    if dropout_p > 0:
        # from torch's CPU generator: torch.manual_seed makes a run repeatable
        seed = torch.randint(0, 2**32, (1,), dtype=torch.int64)
    fwd = (
        _LightAttention.apply if _dispatch.light(q, k, v, mask, key_padding_mask) else attention_fwd
    )
    out, _ = fwd(
        q, k, v, mask, key_padding_mask, scale, causal, name, dropout_p, seed, deterministic
    )
    return out


# --------------------------------------------------------------------------- public API


def masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v, bidirectional.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D), any strides, float32/float16/bfloat16
    (float64 on the eager backend), D <= 256.
    mask: bool broadcastable to (B, H, Nq, Nk), True = may attend (SDPA convention).
    key_padding_mask: bool (B, Nk), True = real token (HF attention_mask convention).
    scale: defaults to 1/sqrt(D). A query row with no allowed key returns 0 (0 gradient).
    dropout_p: attention-probability dropout (as in training BERT / GPT-2), in [0, 1): each
    probability is zeroed with chance dropout_p and the rest scaled by 1/(1 - dropout_p).
    The mask is a hash of (seed, batch, head, query, key) (reference.dropout_keep), the
    seed drawn from torch's default CPU generator per call: torch.manual_seed repeats it,
    and backward regenerates the mask instead of storing it. Pass 0 in eval.
    deterministic: False (default, as FlashAttention) lets the triton backward, and the
    cuda one on Hopper (sm_90a), add dQ with float32 atomics (5 GEMMs per tile; dQ's last
    bits vary run to run); True runs the atomic-free backwards (triton: two kernels; cuda:
    the portable one), bit-reproducible run to run, as does
    torch.use_deterministic_algorithms(True). eager is deterministic either way.
    Returns (B, H, Nq, D) in q's dtype, laid out (B, Nq, H, D)-contiguous so that merging
    the heads afterwards is free. Saves q, k, v, out and the
    log-sum-exp (B, H, Nq) for backward.
    """
    return _attention(
        q, k, v, mask, key_padding_mask, scale, False, dropout_p, backend, deterministic
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal attention: query i sees keys j <= i + Nk - Nq (bottom-right aligned, so a
    decode step with Nq=1 sees every key). Shapes and the rest as masked_softmax_attention.
    """
    return _attention(
        q, k, v, None, key_padding_mask, scale, True, dropout_p, backend, deterministic
    )


_dispatch.LIB.define(
    "masked_softmax_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, *, "
    "Tensor? key_padding_mask=None, float? scale=None, float dropout_p=0.0, "
    "str? backend=None, bool deterministic=False) -> Tensor"
)
_dispatch.LIB.impl(
    "masked_softmax_attention", masked_softmax_attention, "CompositeImplicitAutograd"
)
_dispatch.LIB.define(
    "causal_attention(Tensor q, Tensor k, Tensor v, *, Tensor? key_padding_mask=None, "
    "float? scale=None, float dropout_p=0.0, str? backend=None, bool deterministic=False) "
    "-> Tensor"
)
_dispatch.LIB.impl("causal_attention", causal_attention, "CompositeImplicitAutograd")
