"""What every model shares: config dataclasses with presets, the model base class
(backend switch, save/load as config JSON + safetensors), and the model registry.

A checkpoint directory holds two files:

    config.json        {"model_type": "mae", "config": {...the dataclass as a dict...}}
    model.safetensors  the state dict (tied weights stored once)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # targets/labels with this value are skipped by the losses
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C", bound="ModelConfig")
M = TypeVar("M", bound="ReconModel")

# model_type -> class, filled by ReconModel.__init_subclass__
MODEL_REGISTRY: dict[str, type[ReconModel]] = {}


@dataclasses.dataclass
class ModelConfig:
    """Base of every config dataclass: presets, dict/JSON round trip, nested configs.

    Subclasses set ``presets`` (name -> field overrides). A field whose type is itself a
    ModelConfig may be given as a preset name, a dict, or an instance.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        """The preset ``name`` with ``overrides`` applied (gpt-fast style). A dict given for a
        nested config updates the preset's nested config field by field:
        ``MAEConfig.from_name("small", encoder=dict(patch_size=4))`` keeps the small encoder."""
        if name not in cls.presets:
            raise ValueError(
                f"name: expected one of {sorted(cls.presets)} for {cls.__name__}, got {name!r}"
            )
        preset = dict(cls.presets[name])
        hints = typing.get_type_hints(cls)
        for k, v in overrides.items():
            sub = _config_type(hints.get(k))
            if sub is not None and isinstance(v, dict) and k in preset:
                base = preset[k]
                if isinstance(base, str):
                    base = sub.from_name(base).to_dict()
                elif isinstance(base, ModelConfig):
                    base = base.to_dict()
                v = {**base, **v}
            preset[k] = v
        return cls.from_dict(preset)

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown fields {unknown}; expected a subset of {sorted(names)}"
            )
        kw = {}
        for k, v in d.items():
            sub = _config_type(hints.get(k))
            if sub is not None and not isinstance(v, sub):
                v = sub.from_name(v) if isinstance(v, str) else sub.from_dict(dict(v))
            elif isinstance(v, list):
                v = tuple(v)  # JSON has no tuples
            kw[k] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _config_type(hint: Any) -> type[ModelConfig] | None:
    """The ModelConfig subclass in a type hint (plain or inside a Union), else None."""
    if isinstance(hint, type) and issubclass(hint, ModelConfig):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and issubclass(arg, ModelConfig):
            return arg
    return None


class ReconModel(nn.Module):
    """Base of every model: a config, a backend for every op call, save/load.

    ``backend`` (None | "auto" | "eager" | "triton" | "cuda") is passed to every
    ``recon_kernels`` op the model calls; None takes the process default
    (``rk.set_backend`` / ``RECON_BACKEND``). Switch it on a built model with
    ``set_backend``: the same weights then run on the reference or on the kernels.
    """

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.model_type:
            MODEL_REGISTRY[cls.model_type] = cls

    def __init__(self, config: ModelConfig, backend: str | None = None) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config: expected a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.backend = backend

    @classmethod
    def from_name(cls: type[M], name: str, *, backend: str | None = None, **overrides: Any) -> M:
        """Build from a preset of ``config_class`` (random init)."""
        return cls(cls.config_class.from_name(name, **overrides), backend=backend)

    def set_backend(self, backend: str | None) -> ReconModel:
        """Set the backend of this model and of every submodule that calls an op."""
        set_backend(self, backend)
        return self

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path``."""
        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"model_type": self.model_type, "config": self.config.to_dict()}, f, indent=2)
        save_model(self, os.path.join(path, WEIGHTS_NAME))
        logger.info("saved %s to %s", type(self).__name__, path)

    @classmethod
    def from_pretrained(
        cls: type[M],
        path: str | os.PathLike,
        *,
        backend: str | None = None,
        device: str | torch.device = "cpu",
    ) -> M:
        """Load a directory written by ``save_pretrained`` (strict: every key must match)."""
        model_type, config = read_config(path)
        target = cls if cls.model_type else MODEL_REGISTRY[model_type]
        if target.model_type != model_type:
            raise ValueError(
                f"path: expected a {cls.model_type!r} checkpoint for {cls.__name__}, "
                f"got model_type {model_type!r} in {os.path.join(path, CONFIG_NAME)}"
            )
        from safetensors.torch import load_model

        model = target(target.config_class.from_dict(config), backend=backend)
        load_model(model, os.path.join(path, WEIGHTS_NAME), strict=True, device=str(device))
        return model.to(device)


def read_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(model_type, config dict) of a checkpoint directory."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"path: expected a checkpoint directory with {CONFIG_NAME}, got {path}"
        )
    with open(file) as f:
        blob = json.load(f)
    model_type = blob.get("model_type")
    if model_type not in MODEL_REGISTRY:
        raise ValueError(
            f"{file}: model_type expected one of {sorted(MODEL_REGISTRY)}, got {model_type!r}"
        )
    return model_type, blob["config"]


def load_pretrained(
    path: str | os.PathLike, *, backend: str | None = None, device: str | torch.device = "cpu"
) -> ReconModel:
    """Load any model saved with ``save_pretrained``; its class comes from config.json."""
    model_type, _ = read_config(path)
    return MODEL_REGISTRY[model_type].from_pretrained(path, backend=backend, device=device)


def set_backend(module: nn.Module, backend: str | None) -> None:
    """Set ``.backend`` on ``module`` and every submodule that has that attribute
    (the blocks, and recon_kernels.nn modules such as LoRALinear)."""
    for m in module.modules():
        if hasattr(m, "backend") and not callable(m.backend):
            m.backend = backend
