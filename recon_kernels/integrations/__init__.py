"""Drop-in use of the fused ops in existing PyTorch and Hugging Face code.

* ``scaled_dot_product_attention`` / ``patch_sdpa``: torch's SDPA signature on the fused ops
  (``sdpa.py``; needs only torch).
* ``transformers``: ``register()`` (``attn_implementation="recon"``) and
  ``apply_recon_kernels(model)``; imported on first access, needs ``transformers``.
* ``peft``: ``accelerate(peft_model)``; imported on first access, needs ``peft``.

Importing this package (or ``recon_kernels``) never imports transformers or peft.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .sdpa import patch_sdpa, scaled_dot_product_attention

_LAZY = ("transformers", "peft")

__all__ = ["patch_sdpa", "peft", "scaled_dot_product_attention", "transformers"]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
