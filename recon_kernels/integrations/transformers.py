"""Hugging Face ``transformers`` integration: ``attn_implementation="recon"`` and
``apply_recon_kernels(model)``.

``register()`` adds the name ``"recon"`` to transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (how the model builds the mask it passes to it), so
``AutoModel.from_config(cfg, attn_implementation="recon")`` or
``model.set_attn_implementation("recon")`` runs every model that uses the interface (GPT-2,
BERT, ViT, ViT-MAE, Llama-style, ...) on the fused attention ops.

The masks the "recon" mask builder returns (what the attention function then receives):

======================================  ===================================================
plain causal mask, no cache offset      None (no padding) or the bool padding mask (B, S):
(kv_length == q_offset + q_length)      ``causal_attention(key_padding_mask=...)``, bottom-
                                        right aligned, which is HF's alignment for a cache
plain bidirectional mask                (B, 1, L, S) bool, an ``expand`` of the (B, 1, 1, S)
                                        padding mask (all True without padding): the
                                        key-padding fast path, read as B*S bytes
anything else (sliding windows, packed  HF's own materialised 4-D bool mask (``sdpa``'s
sequences, static caches, or/and mask   builder with every skip turned off): the general
functions, ...)                         mask path of ``masked_softmax_attention``
======================================  ===================================================

The attention function takes the query/key/value HF gives it (B, H, N, D), repeats key/value
heads for grouped-query attention, and returns (B, L, H, D). It hands the call to
transformers' own ``sdpa`` implementation (logging once) when it carries what the kernels do
not compute: ``softcap``, ``s_aux``
(attention sinks) or ``position_bias``; a float 4-D mask passed in by the caller goes to
torch's SDPA (see ``sdpa.py``). Query rows with no visible key (e.g. left padding under a
causal mask) give 0, as torch's SDPA does for bool masks; HF's *eager* path gives the
uniform average there, so compare models at real token positions.

``apply_recon_kernels(model)`` patches a loaded GPT-2, BERT, ViT or ViT-MAE model in place:
the attention implementation becomes "recon" and each MLP block runs as one fused
``conv1d_mlp`` (GPT-2 ``Conv1D`` pairs, BERT/ViT ``Linear`` pairs; activations gelu (erf),
gelu_new / gelu_pytorch_tanh (tanh), relu). Parameters stay where they are (same state dict,
same optimizer references, same ``save_pretrained`` output); the module classes are swapped
for subclasses with a fused ``forward``. ``revert_recon_kernels(model)`` undoes all of it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
except ImportError as e:  # pragma: no cover - depends on the installed version
    raise ImportError(
        "recon_kernels.integrations.transformers needs transformers >= 4.53 (AttentionInterface "
        f"and masking_utils.AttentionMaskInterface), found transformers "
        f"{transformers.__version__}: {e}"
    ) from e

from ..ops import causal_attention, conv1d_mlp, masked_softmax_attention
from ._log import warn_once
from .sdpa import scaled_dot_product_attention

logger = logging.getLogger(__name__)

IMPLEMENTATION = "recon"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias")

_default_backend: str | None = None


def _warn_once(msg: str) -> None:
    warn_once(logger, msg, "recon_kernels transformers integration: %s (said once)")


# --------------------------------------------------------------------------- the mask builder


def _padding_mask(attention_mask: torch.Tensor, batch_size: int, kv_length: int) -> torch.Tensor:
    """The 2-D HF padding mask (B, >= 0 keys), True = real token, cut / padded to (B, S)."""
    pad = attention_mask.to(torch.bool)
    if pad.shape[-1] < kv_length:  # keys beyond the mask (e.g. not yet written) are padding
        pad = F.pad(pad, (0, kv_length - pad.shape[-1]), value=False)
    return pad[:, :kv_length].expand(batch_size, kv_length)


def recon_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """The mask builder registered as "recon" in ``AttentionMaskInterface`` (table above).

    Decides on Python values only (function identity, ints), never on mask contents, so it
    traces under torch.compile without a graph break."""
    plain = isinstance(kv_offset, int) and kv_offset == 0 and local_size is None
    if (
        plain
        and mask_function is causal_mask_function
        and allow_is_causal_skip
        and isinstance(q_offset, int)
        and kv_length == q_offset + q_length
    ):
        if attention_mask is None:
            return None
        return _padding_mask(attention_mask, batch_size, kv_length)  # (B, S)
    if plain and mask_function is bidirectional_mask_function:
        if attention_mask is None:
            allowed = torch.ones((), dtype=torch.bool, device=device)
            return allowed.expand(batch_size, 1, q_length, kv_length)
        pad = _padding_mask(attention_mask, batch_size, kv_length)
        return pad[:, None, None, :].expand(batch_size, 1, q_length, kv_length)  # (B, 1, L, S)
    sdpa_builder = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa_builder(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
        **kwargs,
    )


# --------------------------------------------------------------------------- the attention fn


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), each kv head repeated n_rep times in place."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def _dense_mask(attention_mask, causal, L, S, device):
    """Our compact mask forms (None / (B, S) + causality) as the bool mask torch's SDPA takes
    (None when nothing is masked); a 4-D mask is returned as is."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    allowed = None
    if attention_mask is not None:  # (B, S) padding
        allowed = attention_mask.to(torch.bool)[:, None, None, :]
    if causal and L > 1:
        i = torch.arange(L, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        cm = j <= i + (S - L)  # bottom-right, as causal_attention
        allowed = cm if allowed is None else allowed & cm
    return allowed


def recon_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "recon" entry of ``AttentionInterface``.

    query: (B, H, L, D); key, value: (B, Hkv, S, D) with H a multiple of Hkv;
    attention_mask: None, (B, S) bool padding, or 4-D bool/float (see the module docstring).
    Causality when the mask is None or 2-D: ``is_causal`` if given, else ``module.is_causal``
    (default True), bottom-right aligned. Returns ((B, L, H, D), None): no attention weights.
    """
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions=True is not supported; attention weights are None")
    backend = getattr(module, "_recon_backend", None) or _default_backend
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    L, S = query.shape[2], key.shape[2]

    extra = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if extra:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        why = ", ".join(extra)
        _warn_once(f"{why}: this call runs on transformers' sdpa attention")
        mask = _dense_mask(attention_mask, causal, L, S, query.device)
        # the mask now carries causality; repeated kv heads make HF's own GQA step a no-op
        shim = _NoGQA(module)
        return sdpa_attention_forward(
            shim,
            query,
            key,
            value,
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=False,
            **kwargs,
        )

    if attention_mask is not None and attention_mask.dim() == 4:
        # a full mask: it carries everything, including causality (HF's sdpa convention)
        out = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            backend=backend,
        )
    else:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask: expected None, a (B, S) padding mask or a 4-D mask, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        kpm = None if attention_mask is None else attention_mask.to(torch.bool)
        # the ops follow torch.autocast themselves (inputs cast like nn.Linear / SDPA)
        attend = causal_attention if causal and L > 1 else masked_softmax_attention
        out = attend(
            query,
            key,
            value,
            key_padding_mask=kpm,
            scale=scaling,
            dropout_p=dropout,
            backend=backend,
        )
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D)


class _NoGQA:
    """A view of an attention module that reports no grouped-query attention, for handing
    already-repeated key/value heads to transformers' sdpa function."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def register(backend: str | None = None) -> str:
    """Register the "recon" attention implementation (function + mask builder) with
    transformers. Idempotent. ``backend`` sets the backend its attention calls use when the
    module has none of its own (None: the process default, ``rk.use_backend``/``set_backend``).
    Returns the implementation name, for ``attn_implementation=``."""
    global _default_backend
    if backend is not None:
        from ..backends import _check_name

        _check_name(backend)
    _default_backend = backend
    AttentionInterface.register(IMPLEMENTATION, recon_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, recon_attention_mask)
    return IMPLEMENTATION


# --------------------------------------------------------------------------- MLP patching


def activation_name(act: object) -> str | None:
    """Our activation name for a transformers / torch activation, or None if unsupported."""
    from transformers import activations as A

    if type(act) is A.NewGELUActivation:
        return "gelu_tanh"
    for cls_name in ("GELUTanh", "PytorchGELUTanh"):  # gelu_pytorch_tanh (5.x / 4.x names)
        cls = getattr(A, cls_name, None)
        if cls is not None and type(act) is cls:
            return "gelu_tanh"
    if type(act) is A.GELUActivation:  # gelu and gelu_python: both the exact erf form
        return "gelu"
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act) is nn.ReLU or act is F.relu:
        return "relu"
    if act is F.gelu:
        return "gelu"
    return None


def _stock_if_changed(method: str):
    """Wrap a fused method: if the module's submodules are no longer the stock ones (e.g. peft
    wrapped c_fc in a LoRA layer after patching), run the stock method instead of silently
    bypassing the wrapper. A Python type check, static under torch.compile."""

    def deco(fused):
        # wraps: inspect.signature must see fused's (HF's apply_chunking_to_forward counts it)
        @functools.wraps(fused)
        def inner(self, *args, **kwargs):
            if type(self)._recon_check(self) is not None:
                return getattr(self._recon_base, method)(self, *args, **kwargs)
            return fused(self, *args, **kwargs)

        inner.__name__ = inner.__qualname__ = method
        return inner

    return deco


def _gpt2_mlp_forward(self, hidden_states):
    # Conv1D weights are (in, out): the transposes are the nn.Linear layout, as views
    y = conv1d_mlp(
        hidden_states,
        self.c_fc.weight.t(),
        self.c_fc.bias,
        self.c_proj.weight.t(),
        self.c_proj.bias,
        activation=self._recon_activation,
        backend=self._recon_backend,
    )
    return self.dropout(y)


def _fc_mlp_forward(self, hidden_states):
    return conv1d_mlp(
        hidden_states,
        self.fc1.weight,
        self.fc1.bias,
        self.fc2.weight,
        self.fc2.bias,
        activation=self._recon_activation,
        backend=self._recon_backend,
    )


def _bert_feed_forward_chunk(self, attention_output):
    inter, out = self.intermediate, self.output
    h = conv1d_mlp(
        attention_output,
        inter.dense.weight,
        inter.dense.bias,
        out.dense.weight,
        out.dense.bias,
        activation=self._recon_activation,
        backend=self._recon_backend,
    )
    return out.LayerNorm(out.dropout(h) + attention_output)


@dataclasses.dataclass(frozen=True)
class _MLPSpec:
    """Where one architecture keeps an MLP: the module class, the method to replace, and how
    to find its activation and check its submodules are the stock ones."""

    module: str  # transformers.models.<module>
    cls: str
    method: str
    impl: object
    activation: object  # module -> activation object
    check: object  # module -> None if the layout is the stock one, else why not


def _is_linear(m) -> bool:
    return type(m) is nn.Linear


def _is_conv1d(m) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(m) is Conv1D


_SPECS: dict[str, tuple[_MLPSpec, ...]] = {
    "gpt2": (
        _MLPSpec(
            "gpt2.modeling_gpt2",
            "GPT2MLP",
            "forward",
            _gpt2_mlp_forward,
            lambda m: m.act,
            lambda m: (
                None
                if _is_conv1d(m.c_fc) and _is_conv1d(m.c_proj)
                else "c_fc/c_proj are not Conv1D"
            ),
        ),
    ),
    "bert": (
        _MLPSpec(
            "bert.modeling_bert",
            "BertLayer",
            "feed_forward_chunk",
            _bert_feed_forward_chunk,
            lambda m: m.intermediate.intermediate_act_fn,
            lambda m: (
                None
                if type(m.intermediate).__name__ == "BertIntermediate"
                and type(m.output).__name__ == "BertOutput"
                and _is_linear(m.intermediate.dense)
                and _is_linear(m.output.dense)
                else "intermediate/output are not the stock BertIntermediate/BertOutput"
            ),
        ),
    ),
    "vit": (
        _MLPSpec(
            "vit.modeling_vit",
            "ViTMLP",
            "forward",
            _fc_mlp_forward,
            lambda m: m.activation_fn,
            lambda m: (
                None if _is_linear(m.fc1) and _is_linear(m.fc2) else "fc1/fc2 are not nn.Linear"
            ),
        ),
    ),
    "vit_mae": (
        _MLPSpec(
            "vit_mae.modeling_vit_mae",
            "ViTMAEMLP",
            "forward",
            _fc_mlp_forward,
            lambda m: m.activation_fn,
            lambda m: (
                None if _is_linear(m.fc1) and _is_linear(m.fc2) else "fc1/fc2 are not nn.Linear"
            ),
        ),
    ),
}
SUPPORTED_MODEL_TYPES = tuple(_SPECS)

_patched_classes: dict[type, type] = {}


def _patched_class(base: type, spec: _MLPSpec) -> type:
    """A subclass of ``base`` whose ``spec.method`` is the fused one (made once per base class
    and kept in this module's namespace, so patched models still pickle and deepcopy)."""
    cls = _patched_classes.get(base)
    if cls is None:
        name = f"Recon{base.__name__}"
        attrs = {
            spec.method: _stock_if_changed(spec.method)(spec.impl),
            "__module__": __name__,
            "_recon_base": base,
            "_recon_check": staticmethod(spec.check),
        }
        cls = type(name, (base,), attrs)
        cls.__qualname__ = name
        globals()[name] = cls
        _patched_classes[base] = cls
    return cls


@dataclasses.dataclass
class PatchReport:
    """What ``apply_recon_kernels`` changed."""

    model_type: str
    attention_before: str | None = None
    attention_after: str | None = None
    mlp_patched: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    backend: str | None = None
    # configs outside set_attn_implementation's reach that were switched: (config, previous)
    _config_copies: list = dataclasses.field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [f"apply_recon_kernels on a {self.model_type} model (backend={self.backend!r}):"]
        if self.attention_after is not None:
            lines.append(f"  attention: {self.attention_before} -> {self.attention_after}")
        else:
            lines.append("  attention: unchanged")
        lines.append(f"  fused MLPs: {len(self.mlp_patched)}")
        for name, why in self.skipped:
            lines.append(f"  left stock: {name or '<model>'} ({why})")
        return "\n".join(lines)


def _uses_interface(module: nn.Module) -> bool:
    """Is ``module`` an attention layer or a (sub)model, whose config selects attention?"""
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel) or hasattr(module, "is_causal")


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def apply_recon_kernels(
    model: nn.Module, attention: bool = True, mlp: bool = True, *, backend: str | None = None
) -> PatchReport:
    """Patch a loaded GPT-2 / BERT / ViT / ViT-MAE model in place to run the fused kernels.

    attention: switch the model to ``attn_implementation="recon"`` (registering it).
    mlp: run every MLP block as one ``conv1d_mlp`` (an MLP whose activation the op does not
    have, e.g. gelu_fast / quick_gelu, is left stock and listed in ``report.skipped``).
    backend: for every patched call (None: the process default at call time).
    Parameters, state dict and the forward's results (within float reordering) are unchanged.
    Raises ValueError for another architecture. Undo with ``revert_recon_kernels(model)``.
    """
    import importlib

    model_type = _model_type(model)
    if model_type not in _SPECS:
        raise ValueError(
            f"model: apply_recon_kernels knows model types {SUPPORTED_MODEL_TYPES}, got "
            f"{model_type!r} ({type(model).__name__}). Models that use transformers' "
            f"AttentionInterface can still take attn_implementation='{IMPLEMENTATION}' after "
            "rk.integrations.transformers.register()."
        )
    if getattr(model, "_recon_patch_report", None) is not None:
        raise RuntimeError(
            "model: already patched by apply_recon_kernels; call revert_recon_kernels(model) first"
        )
    if backend is not None:
        from ..backends import _check_name

        _check_name(backend)
    report = PatchReport(model_type=model_type, backend=backend)

    if mlp:
        found = 0
        for spec in _SPECS[model_type]:
            mod = importlib.import_module(f"transformers.models.{spec.module}")
            base = getattr(mod, spec.cls, None)
            if base is None:
                continue
            for name, m in model.named_modules():
                if type(m) is not base:
                    continue
                found += 1
                why = spec.check(m)
                act = spec.activation(m)
                act_name = activation_name(act)
                if why is None and act_name is None:
                    why = f"activation {type(act).__name__} has no fused kernel"
                if why is not None:
                    report.skipped.append((name, why))
                    continue
                m.__class__ = _patched_class(base, spec)
                m._recon_activation = act_name
                m._recon_backend = backend
                report.mlp_patched.append(name)
        if found == 0:
            raise ValueError(
                f"model: a {model_type!r} model without the MLP classes "
                f"{[s.cls for s in _SPECS[model_type]]} this transformers version should have: "
                "its layout is not one apply_recon_kernels knows (pass mlp=False to patch "
                "attention only)"
            )

    if attention:
        register(_default_backend)
        report.attention_before = model.config._attn_implementation
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(IMPLEMENTATION)
        else:  # older transformers: the config walk below switches every config
            model.config._attn_implementation = IMPLEMENTATION
        report.attention_after = model.config._attn_implementation
        if report.attention_after != IMPLEMENTATION:
            raise RuntimeError(
                f"model: could not set attn_implementation={IMPLEMENTATION!r} on "
                f"{type(model).__name__} (it is {report.attention_after!r})"
            )
        # Modules holding a private copy of the config (ViT-MAE's decoder) are out of
        # set_attn_implementation's reach: switch those copies too, and remember them.
        for m in model.modules():
            cfg = getattr(m, "config", None)
            impl = getattr(cfg, "_attn_implementation", None)
            if isinstance(impl, str) and impl != IMPLEMENTATION and _uses_interface(m):
                report._config_copies.append((cfg, impl))
                cfg._attn_implementation = IMPLEMENTATION
        if backend is not None:
            for m in model.modules():
                if hasattr(m, "is_causal") and hasattr(m, "config"):  # the attention modules
                    m._recon_backend = backend
    model._recon_patch_report = report
    return report


def revert_recon_kernels(model: nn.Module) -> None:
    """Undo ``apply_recon_kernels``: stock module classes and the previous attention
    implementation. Parameters were never touched."""
    report = getattr(model, "_recon_patch_report", None)
    if report is None:
        raise ValueError("model: not patched by apply_recon_kernels (nothing to revert)")
    for m in model.modules():
        base = getattr(type(m), "_recon_base", None)
        if base is not None:
            m.__class__ = base
        for attr in ("_recon_activation", "_recon_backend"):
            if attr in m.__dict__:
                delattr(m, attr)
    if report.attention_after is not None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(report.attention_before)
        else:
            model.config._attn_implementation = report.attention_before
        for cfg, impl in report._config_copies:
            cfg._attn_implementation = impl
    model._recon_patch_report = None
