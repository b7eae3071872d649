"""conv1d_mlp: the transformer MLP as a kernel-size-1 conv, act(x W1ᵀ + b1) W2ᵀ + b2.

Custom ops ``recon::conv1d_mlp_fwd`` -> (y, h) and ``recon::conv1d_mlp_bwd``; forward saves
x, W1, W2 and the pre-activation h only (act(h) is recomputed in backward). The public
``recon::conv1d_mlp`` is composite: validate, flatten x to 2-D, call the forward op.
"""

from __future__ import annotations

import torch

from ..reference import ACTIVATIONS
from . import _dispatch
from ._validate import check_like, check_tensor, shape_str

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("recon::conv1d_mlp_fwd", mutates_args=())
def conv1d_mlp_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C) -> (y (M, C_out), h (M, hidden) pre-activation), both in x.dtype."""
    return _fwd_body(x, w1, b1, w2, b2, activation, backend)


@conv1d_mlp_fwd.register_fake
def _(x, w1, b1, w2, b2, activation, backend):
    torch._check(x.shape[-1] == w1.shape[1], lambda: "x/w1 inner size mismatch")
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


def _bwd_body(dy, x, w1, w2, h, activation, has_b1, has_b2, needs_dw, backend):
    """The backward op's work, None for a skipped gradient (shared by the custom op and
    the light route)."""
    return _dispatch.run(
        backend, "mlp", "conv1d_mlp_bwd", dy, x, w1, w2, h, activation, has_b1, has_b2, needs_dw
    )


@torch.library.custom_op("recon::conv1d_mlp_bwd", mutates_args=())
def conv1d_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    has_b1: bool,
    has_b2: bool,
    needs_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2); a bias gradient is an empty (0,) tensor when that bias is
    absent or frozen, the weight gradients when both weights are frozen (needs_dw False:
    the dW1/dW2 GEMMs are skipped, e.g. LoRA fine-tuning with a frozen MLP)."""
    dx, dw1, db1, dw2, db2 = _bwd_body(
        dy, x, w1, w2, h, activation, has_b1, has_b2, needs_dw, backend
    )
    if dw1 is None:
        dw1 = w1.new_empty(0)
    if dw2 is None:
        dw2 = w2.new_empty(0)
    if db1 is None:
        db1 = w1.new_empty(0)
    if db2 is None:
        db2 = w2.new_empty(0)
    return dx, dw1, db1, dw2, db2


@conv1d_mlp_bwd.register_fake
def _(dy, x, w1, w2, h, activation, has_b1, has_b2, needs_dw, backend):
    return (
        x.new_empty(x.shape),
        w1.new_empty(w1.shape if needs_dw else 0),
        w1.new_empty(w1.shape[0] if has_b1 else 0),
        w2.new_empty(w2.shape if needs_dw else 0),
        w2.new_empty(w2.shape[0] if has_b2 else 0),
    )


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, backend = inputs
    _, h = output
    ctx.save_for_backward(x, w1, w2, h)
    ctx.activation, ctx.backend = activation, backend
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.mark_non_differentiable(h)
    # autograd would otherwise fill a zeros tensor the size of the non-differentiable
    # output as its gradient on every backward; an unused output then arrives as None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh, bwd=conv1d_mlp_bwd):
    x, w1, w2, h = ctx.saved_tensors
    if dy is None:
        return (None,) * 7
    need = ctx.needs_input_grad
    needs_dw = bool(need[1] or need[3])
    has_b1 = ctx.has_b1 and bool(need[2])
    has_b2 = ctx.has_b2 and bool(need[4])
    dx, dw1, db1, dw2, db2 = bwd(
        dy, x, w1, w2, h, ctx.activation, has_b1, has_b2, needs_dw, ctx.backend
    )
    return (
        dx,
        dw1 if need[1] else None,
        db1 if has_b1 else None,
        dw2 if need[3] else None,
        db2 if has_b2 else None,
        None,
        None,
    )


conv1d_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


def _fwd_body(x, w1, b1, w2, b2, activation, backend):
    """The forward op's work (shared by the custom op and the light route)."""
    return _dispatch.run(backend, "mlp", "conv1d_mlp_fwd", x, w1, b1, w2, b2, activation)


_LightMLP = _dispatch.light_function("_LightMLP", _fwd_body, _setup_context, _backward, _bwd_body)


# --------------------------------------------------------------------------- public API


def _validate(x, w1, b1, w2, b2, activation):
    check_tensor("x", x, ndim=range(1, 9), layout="(..., C)")
    check_tensor("w1", w1, ndim=2, layout="(hidden, C)")
    check_tensor("w2", w2, ndim=2, layout="(C_out, hidden)")
    check_like("w1", w1, "x", x)
    check_like("w2", w2, "x", x)
    C, hidden = x.shape[-1], w1.shape[0]
    if w1.shape[1] != C:
        raise ValueError(
            f"w1: expected shape (hidden, {C}) to match x {shape_str(x)}, got {shape_str(w1)}"
        )
    if w2.shape[1] != hidden:
        raise ValueError(
            f"w2: expected shape (C_out, {hidden}) to match w1 {shape_str(w1)}, got {shape_str(w2)}"
        )
    for name, b, n in (("b1", b1, hidden), ("b2", b2, w2.shape[0])):
        if b is not None:
            check_tensor(name, b, ndim=1, layout=f"({n},)")
            check_like(name, b, "x", x)
            if b.shape[0] != n:
                raise ValueError(f"{name}: expected shape ({n},), got {shape_str(b)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if min(C, hidden, w2.shape[0]) < 1:
        raise ValueError(
            f"w1/w2: expected non-empty weights, got {shape_str(w1)} and {shape_str(w2)}"
        )


def conv1d_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    activation: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """act(x W1ᵀ + b1) W2ᵀ + b2: the MLP of a transformer block as a pointwise conv.

    x: (..., C); w1: (hidden, C); w2: (C_out, hidden) (nn.Linear layout); b1: (hidden,),
    b2: (C_out,), either may be None. activation: "gelu" (exact erf) | "gelu_tanh" | "relu".
    Returns (..., C_out) in x's dtype. Saves x and the pre-activation h (M, hidden) for
    backward (not act(h): it is recomputed).
    """
    if isinstance(x, torch.Tensor):
        x, w1, b1, w2, b2 = _dispatch.autocast(x, w1, b1, w2, b2)
    _validate(x, w1, b1, w2, b2, activation)
    name = _dispatch.resolve(backend, x.device, x.dtype, "mlp")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fwd = _LightMLP.apply if _dispatch.light(x2, w1, b1, w2, b2) else conv1d_mlp_fwd
    y, _ = fwd(x2, w1, b1, w2, b2, activation, name)
    return y.reshape(*lead, w2.shape[0])


_dispatch.LIB.define(
    "conv1d_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, *, "
    "str activation='gelu', str? backend=None) -> Tensor"
)
_dispatch.LIB.impl("conv1d_mlp", conv1d_mlp, "CompositeImplicitAutograd")
