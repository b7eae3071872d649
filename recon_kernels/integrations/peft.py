"""peft integration: ``accelerate(peft_model)`` runs peft's LoRA ``Linear`` layers through
the fused ``rk.lora_linear`` (x Wᵀ + b + s·(x Aᵀ) Bᵀ, never forming W + s·BA).

Each ``peft.tuners.lora.layer.Linear`` gets its class swapped for ``ReconLoraLinear``, a
subclass whose ``forward`` takes the fused path and otherwise calls peft's own forward. The
adapters, their parameters, ``merge``/``unmerge``/``merge_and_unload``, ``save_pretrained``
and ``load_adapter`` are peft's, untouched; ``restore(peft_model)`` swaps the classes back.
Training code does not change.

The fused path is taken when a layer has exactly one active adapter, no merged weights,
adapters enabled, no ``adapter_names`` (mixed batch) or variant keyword, a plain LoRA adapter
(no DoRA or other variant, no ``lora_bias``), an ``nn.Linear`` base (or transformers'
``Conv1D`` with ``fan_in_fan_out``, used through a transposed view) and no dropout active
(``lora_dropout=0``, or eval mode). Input, base weight and adapters must share one dtype; under
``torch.autocast`` they are cast to the autocast dtype first, as ``nn.Linear`` is. Anything
else runs peft's forward, logged once per reason; the result is the same either way.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from ..ops import lora_linear
from ._log import warn_once

logger = logging.getLogger(__name__)

# states a user chooses on purpose: said at debug level, not as a warning
_BENIGN = ("adapters disabled", "merged adapter weights")


def _warn_once(msg: str) -> None:
    if msg in _BENIGN:
        if torch.compiler.is_compiling():
            return
        logger.debug("recon_kernels peft integration: %s; running peft's forward", msg)
        return
    warn_once(logger, msg, "recon_kernels peft integration: %s; running peft's forward (said once)")


def _base_weight(layer: PeftLoraLinear) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of the base layer in nn.Linear layout, or None if unknown."""
    base = layer.get_base_layer()
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if layer.fan_in_fan_out and type(base).__name__ == "Conv1D" and base.weight.dim() == 2:
        return base.weight.t(), base.bias  # transformers' Conv1D keeps (in, out)
    return None


def fused_path_blocker(layer: PeftLoraLinear, x: torch.Tensor, args, kwargs) -> str | None:
    """Why this call cannot take the fused path (None: it can). Python attributes only."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (adapter_names / variant keywords)"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "merged adapter weights"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused op takes one)"
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
        return "a LoRA variant (DoRA, ...)"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True"
    dropout = layer.lora_dropout[name]
    if layer.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return "lora_dropout > 0 in training (the dropped input only feeds the LoRA branch)"
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return f"lora_dropout of type {type(dropout).__name__}"
    a, b = layer.lora_A[name], layer.lora_B[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
        return "lora_A/lora_B are not bias-free nn.Linear"
    if _base_weight(layer) is None:
        return f"base layer {type(layer.get_base_layer()).__name__} (need nn.Linear or Conv1D)"
    if not torch.is_autocast_enabled(x.device.type):
        w = layer.get_base_layer().weight
        if not (x.dtype == w.dtype == a.weight.dtype == b.weight.dtype):
            return (
                f"mixed dtypes without autocast (x {x.dtype}, base {w.dtype}, "
                f"adapter {a.weight.dtype})"
            )
    return None


class ReconLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear whose forward runs ``rk.lora_linear`` when it can (module docstring)."""

    _recon_base = PeftLoraLinear

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        why = fused_path_blocker(self, x, args, kwargs)
        if why is not None:
            _warn_once(why)
            return super().forward(x, *args, **kwargs)
        name = next(a for a in self.active_adapters if a in self.lora_A)
        weight, bias = _base_weight(self)
        # lora_linear follows torch.autocast itself (casts its inputs like nn.Linear)
        return lora_linear(
            x,
            weight,
            bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            float(self.scaling[name]),
            backend=getattr(self, "_recon_backend", None),
        )


@dataclasses.dataclass
class AccelerateReport:
    """What ``accelerate`` changed: the LoRA Linear layers it swapped, and the LoRA layers
    of other kinds (Embedding, Conv, quantized, ...) it left to peft."""

    accelerated: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    backend: str | None = None

    def __str__(self) -> str:
        lines = [f"accelerate: {len(self.accelerated)} LoRA Linear layers on rk.lora_linear"]
        lines += [f"  left to peft: {n} ({why})" for n, why in self.skipped]
        return "\n".join(lines)


def accelerate(peft_model: nn.Module, *, backend: str | None = None) -> AccelerateReport:
    """Run every peft LoRA ``Linear`` in ``peft_model`` through ``rk.lora_linear``, in place.

    backend: for the fused calls (None: the process default at call time). Idempotent (a
    second call updates the backend). Raises ValueError if the model has no LoRA layer."""
    from peft.tuners.lora.layer import LoraLayer

    if backend is not None:
        from ..backends import _check_name

        _check_name(backend)
    report = AccelerateReport(backend=backend)
    for name, m in peft_model.named_modules():
        if type(m) in (PeftLoraLinear, ReconLoraLinear):
            m.__class__ = ReconLoraLinear
            m._recon_backend = backend
            report.accelerated.append(name)
        elif isinstance(m, LoraLayer):
            report.skipped.append((name, f"{type(m).__name__} is not a plain lora.Linear"))
    if not report.accelerated and not report.skipped:
        raise ValueError(
            f"peft_model: expected a model with peft LoRA layers, found none in "
            f"{type(peft_model).__name__}"
        )
    return report


def restore(peft_model: nn.Module) -> int:
    """Undo ``accelerate``: peft's own LoRA Linear class again. Returns how many layers."""
    n = 0
    for m in peft_model.modules():
        if type(m) is ReconLoraLinear:
            m.__class__ = PeftLoraLinear
            m.__dict__.pop("_recon_backend", None)
            n += 1
    return n
