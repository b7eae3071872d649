"""Loads the compiled CUDA extension ``recon_kernels._cuda`` and says why it is unavailable."""

from __future__ import annotations

import functools
import importlib
import shutil


@functools.cache
def _load():
    try:
        return importlib.import_module("recon_kernels._cuda"), None
    except ImportError as e:
        if shutil.which("nvcc") is None:
            why = "the CUDA extension is not built (no nvcc was found at install time)"
        else:
            why = (
                "the CUDA extension recon_kernels._cuda is not built or failed to import "
                f"({e}); reinstall with RECON_BUILD_CUDA=1"
            )
        return None, why


def extension():
    """The loaded extension module; RuntimeError saying why if it is unavailable."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def unavailable_reason() -> str | None:
    return _load()[1]
