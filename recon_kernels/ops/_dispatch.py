"""The one place that maps a backend name to the module implementing an op family.

Every implementation module exposes the same function names with the same signatures
(``attention_fwd``/``attention_bwd``, ``conv1d_mlp_fwd``/``conv1d_mlp_bwd``,
``lora_linear_fwd``/``lora_linear_bwd``, ``merge_lora``):

* eager  -> ``recon_kernels.ops.eager`` (``reference``'s formulas + torch CPU fast paths)
* triton -> ``recon_kernels.triton.<family>``
* cuda   -> ``recon_kernels.cuda.<family>`` (Python launchers of the compiled extension)
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from .. import backends

# A library fragment for the public composite ops (the custom ops register themselves).
LIB = torch.library.Library("recon", "FRAGMENT")


_IMPLS: dict[tuple[str, str], ModuleType] = {}


def impl(backend: str, family: str) -> ModuleType:
    mod = _IMPLS.get((backend, family))
    if mod is not None:
        return mod
    if backend == "eager":
        mod = importlib.import_module("recon_kernels.ops.eager")
    elif backend == "triton":
        mod = importlib.import_module(f"recon_kernels.triton.{family}")
    elif backend == "cuda":
        mod = importlib.import_module(f"recon_kernels.cuda.{family}")
    else:
        raise ValueError(f"backend: expected one of {backends.BACKENDS}, got {backend!r}")
    _IMPLS[(backend, family)] = mod
    return mod


def run(backend: str, family: str, fn: str, *args, **kwargs):
    """``fn`` of the backend's implementation module, called from a custom op's body with
    autocast off: the op's inputs were already cast to the autocast dtype by the public
    function (``autocast`` below), and a backend that computes in float32 on purpose (the
    eager reference's upcasts) must not have its matmuls cast back down by autocast."""
    ref = next(a for a in args if isinstance(a, torch.Tensor))
    with no_autocast(ref.device):
        return getattr(impl(backend, family), fn)(*args, **kwargs)


# The light path: in plain eager mode the public ops run their forward/backward through a
# torch.autograd.Function that calls the same backend functions as the custom ops, without
# torch.library's per-call machinery (schema default filling, redispatch, the dynamo-disable
# wrapper: ~0.1 ms per op call on CPU, as much as a small kernel). Anything that traces or
# transforms (torch.compile, export, fake/proxy/functional dispatch modes, torch.func,
# tensor subclasses) takes the custom ops. RECON_LIGHT_DISPATCH=0 turns the light path off.
LIGHT = os.environ.get("RECON_LIGHT_DISPATCH", "1") != "0"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def light(*tensors: torch.Tensor | None) -> bool:
    """Whether a public op may take the light path (see LIGHT) for these inputs."""
    if not LIGHT or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def light_function(name: str, fwd, setup_context, backward, bwd) -> type:
    """The light route of one custom op: a torch.autograd.Function named ``name`` running
    ``fwd(*inputs)``, the op's ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads, bwd)`` (bwd: the backward op's body), once differentiable like
    the custom ops, whose backward kernels have no derivative.

    forward takes ctx itself rather than a separate setup_context: apply() would otherwise
    bind the arguments with inspect.signature on every call (~80 us)."""

    def forward(ctx, *inputs):
        out = fwd(*inputs)
        setup_context(ctx, inputs, out)
        return out

    @once_differentiable
    def backward_(ctx, *grads):
        return backward(ctx, *grads, bwd)

    doc = f"{name}: a custom op's forward, setup and backward without torch.library."
    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_), "__doc__": doc},
    )


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device`` (a no-op context when it is off already)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def resolve(
    backend: str | None, device: torch.device, dtype: torch.dtype, family: str = "attention"
) -> str:
    """Concrete backend for a call of op ``family``; float64 only runs on eager (auto picks
    it, others raise); auto on a GPU follows backends.AUTO_TABLE."""
    requested = backends.get_backend() if backend is None else backend
    if isinstance(requested, str) and requested.lower() == "auto" and dtype == torch.float64:
        return "eager"
    name = backends.resolve(requested, device, family)
    if dtype == torch.float64 and name != "eager":
        raise ValueError(
            f"dtype: backend {name!r} supports float32, float16 and bfloat16, got torch.float64 "
            "(float64 runs on backend='eager')"
        )
    return name


def autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating-point inputs to the autocast dtype when autocast is on for their device,
    as torch does for matmul-like ops (nn.Linear, SDPA): the fused ops then run in bf16/fp16
    under ``torch.autocast`` instead of in the float32 that LayerNorm hands them."""
    ref = next(t for t in tensors if t is not None)
    dev = ref.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(
        t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )
