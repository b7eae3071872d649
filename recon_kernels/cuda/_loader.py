"""Loading the compiled extension ``recon_kernels._cuda`` (or, in tests, the CPU emulation
build that stands in for it) and saying why it is unavailable."""

from __future__ import annotations

import contextlib
import functools
import importlib
import shutil
from collections.abc import Iterator
from types import ModuleType

# A module with the extension's API that runs the kernels on the CPU (the test-only build
# recon_kernels._cuda_emu, see csrc/emulator.h); when set, the launchers take CPU tensors.
_emulator: ModuleType | None = None


@functools.cache
def _load():
    try:
        return importlib.import_module("recon_kernels._cuda"), None
    except ImportError as e:
        if shutil.which("nvcc") is None:
            why = (
                "the CUDA extension is not built: no nvcc was found at install time "
                "(install the CUDA toolkit, then reinstall with RECON_BUILD_CUDA=1)"
            )
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


@contextlib.contextmanager
def use_emulator(module: ModuleType) -> Iterator[None]:
    """Tests only: route the launchers to the CPU emulation build ``module`` (CPU tensors)."""
    global _emulator
    prev, _emulator = _emulator, module
    try:
        yield
    finally:
        _emulator = prev


def emulator() -> ModuleType | None:
    """The emulation build in use (tests), or None."""
    return _emulator


def ext() -> ModuleType:
    """The module the launchers call: the emulator when set, else the extension."""
    return _emulator if _emulator is not None else extension()
