"""Op registration: one module per op family (custom ops, fake impls, autograd)."""

from .attention import causal_attention, masked_softmax_attention
from .lora import lora_linear, merge_lora
from .mlp import conv1d_mlp

__all__ = [
    "causal_attention",
    "conv1d_mlp",
    "lora_linear",
    "masked_softmax_attention",
    "merge_lora",
]
