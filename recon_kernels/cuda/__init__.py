"""The ``cuda`` backend: Python launchers of the compiled extension ``recon_kernels._cuda``,
one file per op family as in ``recon_kernels.triton`` (``attention``, ``mlp``, ``lora``;
``_loader`` loads the extension, ``_common`` holds the checks and launch helpers).

The extension (sources in ``csrc/``) takes raw device pointers, sizes, strides, a dtype code
and a CUDA stream; it never sees a torch tensor and does not link libtorch. Everything that
could make a kernel read or write out of bounds is settled here first: devices, dtypes,
shapes, unit stride of the last dim, and 16-byte alignment of every row the kernels copy with
16-byte vectors (unaligned inputs are copied into aligned, row-padded buffers, never
rejected). The launchers raise ``RuntimeError`` with the CUDA error string on failure.

Every launcher has exactly the signature and return convention of its counterpart in
``recon_kernels.reference`` (``attention_fwd``/``attention_bwd``, ``conv1d_mlp_fwd``/``_bwd``,
``lora_linear_fwd``/``_bwd``, ``merge_lora``), so ``ops/_dispatch.py`` can swap them.
"""

from __future__ import annotations

from ._loader import extension, unavailable_reason, use_emulator
from .attention import attention_bwd, attention_fwd
from .lora import lora_linear_bwd, lora_linear_fwd, merge_lora
from .mlp import conv1d_mlp_bwd, conv1d_mlp_fwd

__all__ = [
    "attention_bwd",
    "attention_fwd",
    "conv1d_mlp_bwd",
    "conv1d_mlp_fwd",
    "extension",
    "lora_linear_bwd",
    "lora_linear_fwd",
    "merge_lora",
    "unavailable_reason",
    "use_emulator",
]
