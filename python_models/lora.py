"""LoRA fine-tuning of any model here: wrap chosen nn.Linear layers in
``recon_kernels.nn.LoRALinear`` (fused ``lora_linear`` op, peft layout: ``<name>.lora_A.weight``
(r, in), ``<name>.lora_B.weight`` (out, r), ``<name>.base_layer.weight``), freeze everything
else except an optional head, merge/unmerge, save/load the adapters alone.

Module patterns: a pattern matches a module name if ``re.fullmatch(pattern, s)`` holds for
the name or any dot-suffix of it, so ``"qkv"`` matches ``encoder.blocks.3.attn.qkv``,
``r"blocks\\.[01]\\..*"`` the first two blocks, ``"(qkv|proj|fc1|fc2)"`` every linear of
every block (the layer names come from python_models.models.blocks).

    names = inject_lora(model.encoder, "(qkv|proj)", r=8, alpha=16)   # freezes the rest
    ... train ...
    save_adapters(model, "adapters.safetensors")
    load_adapters(fresh_model, "adapters.safetensors")   # injects, then loads
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from recon_kernels.nn import LoRALinear

logger = logging.getLogger(__name__)

ADAPTER_FORMAT = "recon-lora-v1"


def _patterns(patterns: str | Iterable[str]) -> list[str]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"patterns: expected strings, got {type(p).__name__}")
        re.compile(p)
    return pats


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """True if a pattern fully matches ``name`` or one of its dot-suffixes."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(re.fullmatch(p, s) for p in _patterns(patterns) for s in suffixes)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every wrapped layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _wrap(model: nn.Module, name: str, r, alpha, dropout, use_rslora, backend) -> None:
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear to wrap, got {type(mod).__name__}")
    _set_submodule(
        model, name, LoRALinear(mod, r, alpha, dropout, use_rslora=use_rslora, backend=backend)
    )


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    trainable: str | Sequence[str] = (),
    freeze: bool = True,
    backend: str | None = None,
) -> list[str]:
    """Wrap every nn.Linear whose name matches ``targets`` in a LoRALinear (output unchanged:
    B starts at 0). With ``freeze`` only the LoRA parameters and the parameters of modules
    matching ``trainable`` (e.g. ``"head"``) keep requires_grad. ``backend`` defaults to
    ``model.backend``. Returns the wrapped names; raises if nothing matched.
    """
    backend = getattr(model, "backend", None) if backend is None else backend
    pats = _patterns(targets)
    wrapped = set(lora_modules(model))
    names = []
    for name, mod in list(model.named_modules()):
        inside = any(name.startswith(w + ".") for w in wrapped)
        if not name or inside or not isinstance(mod, nn.Linear) or not name_matches(name, pats):
            continue
        _wrap(model, name, r, alpha, dropout, use_rslora, backend)
        wrapped.add(name)
        names.append(name)
    if not names and not lora_modules(model):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"targets: {pats} matched no nn.Linear; the model's linears are {linears}")
    if freeze:
        freeze_except_lora(model, trainable)
    logger.info("LoRA r=%d alpha=%g on %d layers: %s", r, alpha, len(names), names)
    return names


def freeze_except_lora(model: nn.Module, trainable: str | Sequence[str] = ()) -> None:
    """requires_grad=True only for LoRA A/B and for parameters of modules (or parameters)
    whose name matches ``trainable``; everything else is frozen."""
    pats = _patterns(trainable)
    keep_mods = [n for n, _ in model.named_modules() if n and pats and name_matches(n, pats)]
    for pname, p in model.named_parameters():
        is_lora = ".lora_A." in f".{pname}" or ".lora_B." in f".{pname}"
        in_head = any(pname.startswith(m + ".") for m in keep_mods)
        p.requires_grad_(is_lora or in_head or bool(pats and name_matches(pname, pats)))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference at plain-Linear cost)."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora``."""
    for m in lora_modules(model).values():
        m.unmerge()


def unwrap_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base nn.Linear (merged first unless merge=False), so
    the model has its original structure again (e.g. for save_pretrained). In place."""
    for name, m in lora_modules(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        _set_submodule(model, name, m.base_layer)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA A/B of every wrapped layer, plus every other trainable parameter (the head)."""
    out = {}
    for pname, p in model.named_parameters():
        is_lora = ".lora_A." in f".{pname}" or ".lora_B." in f".{pname}"
        if is_lora or p.requires_grad:
            out[pname] = p.detach()
    return out


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapters (and trainable extras) to one safetensors file, with each wrapped
    layer's r / alpha / dropout / rslora in the metadata."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model: expected LoRA-wrapped layers (call inject_lora first), found none")
    spec = {
        n: {"r": m.r, "alpha": m.alpha, "dropout": _dropout_p(m), "use_rslora": m.use_rslora}
        for n, m in mods.items()
    }
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(
        tensors, os.fspath(path), metadata={"format": ADAPTER_FORMAT, "lora": json.dumps(spec)}
    )


def _dropout_p(m: LoRALinear) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def load_adapters(
    model: nn.Module, path: str | os.PathLike, *, freeze: bool = True, backend: str | None = None
) -> list[str]:
    """Load adapters written by ``save_adapters``. Layers not yet wrapped are wrapped first
    (from the file's metadata); with ``freeze`` the loaded non-LoRA tensors (the head) stay
    trainable and the rest is frozen. Every tensor must match a parameter. Returns the keys."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(
                f"path: expected a {ADAPTER_FORMAT!r} adapter file, got format {meta.get('format')!r} in {path}"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    existing = lora_modules(model)
    for name, s in json.loads(meta["lora"]).items():
        if name in existing:
            m = existing[name]
            if m.merged:
                raise ValueError(
                    f"{name}: expected an unmerged LoRA layer to load into, got a merged one"
                )
            if (m.r, m.use_rslora) != (s["r"], s["use_rslora"]) or m.alpha != s["alpha"]:
                raise ValueError(
                    f"{name}: the model's LoRA (r={m.r}, alpha={m.alpha}, rslora={m.use_rslora}) differs "
                    f"from the file's (r={s['r']}, alpha={s['alpha']}, rslora={s['use_rslora']})"
                )
            continue
        if backend is None:
            backend = getattr(model, "backend", None)
        _wrap(model, name, s["r"], s["alpha"], s["dropout"], s["use_rslora"], backend)
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"path: tensors {missing} of {path} match no parameter of the model")
    with torch.no_grad():
        for k, t in tensors.items():
            if params[k].shape != t.shape:
                raise ValueError(
                    f"{k}: expected shape {tuple(params[k].shape)}, got {tuple(t.shape)} in {path}"
                )
            params[k].copy_(t)
    if freeze:
        extras = [k for k in tensors if ".lora_A." not in f".{k}" and ".lora_B." not in f".{k}"]
        freeze_except_lora(model, [re.escape(k) for k in extras])
    return sorted(tensors)
