"""lora_linear (x Wᵀ + b + s·(x Aᵀ) Bᵀ, never forming W + s·BA) and merge_lora.

Custom ops ``recon::lora_linear_fwd`` -> (y, xa) and ``recon::lora_linear_bwd``; forward
saves x and xa = x Aᵀ (M, r) (plus the weights, which are parameters, not activations).
dW is computed only when the base weight requires grad (the fine-tuning case skips it).
``recon::merge_lora`` returns weight + scale · B A; ``recon::merge_lora_`` (``merge_lora_``
here) adds it in place, rounded once from fp32 exactly like the copy (LoRALinear's
merge/unmerge use it: no (out, in) temporary).
"""

from __future__ import annotations

import torch

from . import _dispatch
from ._validate import check_like, check_scale, check_tensor, shape_str

# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("recon::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) -> (y (M, out), xa (M, r)), both in x.dtype."""
    return _fwd_body(x, weight, bias, lora_a, lora_b, scale, backend)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, backend):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x/weight inner size mismatch")
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _bwd_body(dy, x, weight, lora_a, lora_b, xa, scale, needs_dw, has_bias, backend):
    """The backward op's work, None for a skipped gradient (shared by the custom op and
    the light route)."""
    return _dispatch.run(
        backend,
        "lora",
        "lora_linear_bwd",
        dy,
        x,
        weight,
        lora_a,
        lora_b,
        xa,
        scale,
        needs_dw,
        has_bias,
    )


@torch.library.custom_op("recon::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    needs_dw: bool,
    has_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dA, dB); dweight/dbias are empty (0,) when not needed."""
    dx, dw, dbias, da, db = _bwd_body(
        dy, x, weight, lora_a, lora_b, xa, scale, needs_dw, has_bias, backend
    )
    if dw is None:
        dw = weight.new_empty(0)
    if dbias is None:
        dbias = weight.new_empty(0)
    return dx, dw, dbias, da, db


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scale, needs_dw, has_bias, backend):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if needs_dw else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if has_bias else 0),
        lora_a.new_empty(lora_a.shape),
        lora_b.new_empty(lora_b.shape),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, backend = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
    ctx.scale, ctx.backend = scale, backend
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(xa)
    # autograd would otherwise fill a zeros tensor the size of the non-differentiable
    # output as its gradient on every backward; an unused output then arrives as None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dxa, bwd=lora_linear_bwd):
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    if dy is None:
        return (None,) * 7
    needs_dw = bool(ctx.needs_input_grad[1])
    needs_dbias = ctx.has_bias and bool(ctx.needs_input_grad[2])
    dx, dw, dbias, da, db = bwd(
        dy, x, weight, lora_a, lora_b, xa, ctx.scale, needs_dw, needs_dbias, ctx.backend
    )
    return dx, dw if needs_dw else None, dbias if needs_dbias else None, da, db, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _fwd_body(x, weight, bias, lora_a, lora_b, scale, backend):
    """The forward op's work (shared by the custom op and the light route)."""
    return _dispatch.run(backend, "lora", "lora_linear_fwd", x, weight, bias, lora_a, lora_b, scale)


_LightLoRA = _dispatch.light_function("_LightLoRA", _fwd_body, _setup_context, _backward, _bwd_body)


@torch.library.custom_op("recon::merge_lora_op", mutates_args=())
def merge_lora_op(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a, in weight's dtype, contiguous (whatever weight's
    strides: every backend returns the layout the fake declares)."""
    return _dispatch.run(backend, "lora", "merge_lora", weight, lora_a, lora_b, scale).contiguous()


@merge_lora_op.register_fake
def _(weight, lora_a, lora_b, scale, backend):
    return weight.new_empty(weight.shape)


def _merge_setup(ctx, inputs, output):
    weight, lora_a, lora_b, scale, backend = inputs
    ctx.save_for_backward(lora_a, lora_b)
    ctx.scale = scale


def _merge_backward(ctx, g):
    lora_a, lora_b = ctx.saved_tensors
    # d/dA = s Bᵀ g, d/dB = s g Aᵀ: (out, r)ᵀ (out, in) and (out, in) (r, in)ᵀ, small GEMMs
    da = (ctx.scale * (lora_b.float().t() @ g.float())).to(lora_a.dtype)
    db = (ctx.scale * (g.float() @ lora_a.float().t())).to(lora_b.dtype)
    return g, da, db, None, None


merge_lora_op.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("recon::merge_lora_", mutates_args=("weight",))
def merge_lora_inplace_op(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, backend: str
) -> None:
    """weight <- weight + scale · lora_b @ lora_a, in place (one rounding from fp32)."""
    mod = _dispatch.impl(backend, "lora")
    inplace = getattr(mod, "merge_lora_", None)
    with _dispatch.no_autocast(weight.device):
        if inplace is not None:
            inplace(weight, lora_a, lora_b, scale)
        else:
            # backends without an in-place kernel: the same rounding, through a temporary
            weight.copy_(mod.merge_lora(weight, lora_a, lora_b, scale))


@merge_lora_inplace_op.register_fake
def _(weight, lora_a, lora_b, scale, backend):
    return None


# --------------------------------------------------------------------------- public API


def _validate_lora(name_x, x, weight, lora_a, lora_b):
    check_tensor("weight", weight, ndim=2, layout="(out, in)")
    check_tensor("lora_a", lora_a, ndim=2, layout="(r, in)")
    check_tensor("lora_b", lora_b, ndim=2, layout="(out, r)")
    ref_name, ref = (name_x, x) if x is not None else ("weight", weight)
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not ref:
            check_like(name, t, ref_name, ref)
    out_f, in_f = weight.shape
    if lora_a.shape[1] != in_f:
        raise ValueError(
            f"lora_a: expected shape (r, {in_f}) to match weight {shape_str(weight)}, got {shape_str(lora_a)}"
        )
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (out_f, r):
        raise ValueError(
            f"lora_b: expected shape ({out_f}, {r}) = (out, r) to match weight {shape_str(weight)} "
            f"and lora_a {shape_str(lora_a)}, got {shape_str(lora_b)}"
        )
    if r < 1:
        raise ValueError(f"lora_a: expected rank r >= 1, got shape {shape_str(lora_a)}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """x Wᵀ + b + scale · (x Aᵀ) Bᵀ without materialising W + scale · B A.

    x: (..., in); weight: (out, in); lora_a: (r, in); lora_b: (out, r) (peft layout);
    bias: (out,) or None. Returns (..., out) in x's dtype. Saves x and x Aᵀ (M, r) for
    backward; dW only when weight.requires_grad.
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias, lora_a, lora_b = _dispatch.autocast(x, weight, bias, lora_a, lora_b)
    check_tensor("x", x, ndim=range(1, 9), layout="(..., in)")
    _validate_lora("x", x, weight, lora_a, lora_b)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x: expected last dim {weight.shape[1]} (weight's in features), got shape {shape_str(x)}"
        )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, layout="(out,)")
        check_like("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {shape_str(bias)}")
    scale = check_scale("scale", scale)
    name = _dispatch.resolve(backend, x.device, x.dtype, "lora")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fwd = _LightLoRA.apply if _dispatch.light(x2, weight, bias, lora_a, lora_b) else lora_linear_fwd
    y, _ = fwd(x2, weight, bias, lora_a, lora_b, scale, name)
    return y.reshape(*lead, weight.shape[0])


def merge_lora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a (a new tensor in weight's dtype, fp32 accumulation).

    weight: (out, in); lora_a: (r, in); lora_b: (out, r)."""
    _validate_lora(None, None, weight, lora_a, lora_b)
    scale = check_scale("scale", scale)
    name = _dispatch.resolve(backend, weight.device, weight.dtype, "lora")
    return merge_lora_op(weight, lora_a, lora_b, scale, name)


def merge_lora_(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """In place: weight <- weight + scale · lora_b @ lora_a; returns weight.

    Computed in fp32 and rounded once to weight's dtype, exactly like ``merge_lora``
    followed by a copy, without the (out, in) temporary. Unmerge with ``-scale``: the
    round trip restores weight up to those two roundings.
    weight: (out, in); lora_a: (r, in); lora_b: (out, r)."""
    _validate_lora(None, None, weight, lora_a, lora_b)
    scale = check_scale("scale", scale)
    name = _dispatch.resolve(backend, weight.device, weight.dtype, "lora")
    merge_lora_inplace_op(weight, lora_a, lora_b, scale, name)
    return weight


_dispatch.LIB.define(
    "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
    "float scale, *, str? backend=None) -> Tensor"
)
_dispatch.LIB.impl("lora_linear", lora_linear, "CompositeImplicitAutograd")
_dispatch.LIB.define(
    "merge_lora(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, *, str? backend=None) -> Tensor"
)
_dispatch.LIB.impl("merge_lora", merge_lora, "CompositeImplicitAutograd")
