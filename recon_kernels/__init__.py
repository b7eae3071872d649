"""recon-kernels: fused Triton and CUDA C++ kernels for reconstruction-style pretraining.

>>> import recon_kernels as rk
>>> out = rk.masked_softmax_attention(q, k, v, key_padding_mask=attention_mask.bool())
"""

from __future__ import annotations

from . import integrations, nn, reference
from .backends import (
    available_backends,
    explain,
    get_backend,
    set_backend,
    use_backend,
    why_unavailable,
)
from .integrations import patch_sdpa, scaled_dot_product_attention
from .ops import causal_attention, conv1d_mlp, lora_linear, masked_softmax_attention, merge_lora

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "causal_attention",
    "conv1d_mlp",
    "lora_linear",
    "merge_lora",
    "nn",
    "patch_sdpa",
    "explain",
    "get_backend",
    "integrations",
    "masked_softmax_attention",
    "reference",
    "scaled_dot_product_attention",
    "set_backend",
    "use_backend",
    "why_unavailable",
]
