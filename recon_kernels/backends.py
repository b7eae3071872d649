"""Backend names, process-wide selection, availability and the reasons for unavailability.

``backend=None`` on an op takes the process default: ``set_backend(name)``, the context
manager ``use_backend(name)``, or the ``RECON_BACKEND`` environment variable; else ``auto``.

=========  =========================================================================
eager      ``reference.py``; any device; float64 capable
triton     CUDA tensors; CPU tensors only with ``TRITON_INTERPRET=1``
cuda       CUDA tensors when the compiled extension ``recon_kernels._cuda`` is built
auto       CUDA tensor: ``cuda`` if built, else ``triton``; CPU tensor: ``eager``
=========  =========================================================================
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("eager", "triton", "cuda")
CHOICES = (*BACKENDS, "auto")

_state = threading.local()
_global_default: str | None = None


def _check_name(name: str, arg: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"{arg}: expected one of {CHOICES}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None resets to RECON_BACKEND / auto)."""
    global _global_default
    _global_default = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend an op uses when called with backend=None (may be 'auto')."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _global_default is not None:
        return _global_default
    env = os.environ.get("RECON_BACKEND")
    if env:
        return _check_name(env, "RECON_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside use ``name`` unless given backend= explicitly."""
    name = _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def _probe_cuda_ext() -> str | None:
    from . import cuda as _cuda_mod

    return _cuda_mod.unavailable_reason()


# Facts about the installation, probed once when the package is imported: plain constants
# for torch.compile (no cache wrapper or import to trace inside a compiled region).
_TRITON_ERROR: str | None = _probe_triton()
_CUDA_EXT_ERROR: str | None = _probe_cuda_ext()


def why_unavailable(name: str, device: torch.device | str | None = None) -> str | None:
    """None if backend ``name`` can run on tensors of ``device`` (default: any), else why not."""
    name = _check_name(name)
    dev = None if device is None else torch.device(device)
    if name == "eager" or name == "auto":
        return None
    if name == "triton":
        err = _TRITON_ERROR
        if err:
            return err
        if dev is None:
            if torch.cuda.is_available() or interpreter_enabled():
                return None
            return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set (the CPU interpreter is off)"
        if dev.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU is visible"
        if dev.type == "cpu":
            if interpreter_enabled():
                return None
            return (
                "triton runs on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
                "before importing recon_kernels, or use a CUDA tensor"
            )
        return f"triton does not support device {dev.type!r}"
    # cuda
    loader = sys.modules.get("recon_kernels.cuda._loader")
    if loader is not None and loader.emulator() is not None:  # tests: CPU emulation build
        if dev is None or dev.type == "cpu":
            return None
        return f"the CUDA emulator (tests) takes CPU tensors, got a tensor on {dev.type!r}"
    err = _CUDA_EXT_ERROR
    if err:
        return err
    if dev is not None and dev.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a tensor on {dev.type!r}"
    if not torch.cuda.is_available():
        return "the extension is built but no CUDA GPU is visible"
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here (on ``device`` when given)."""
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


def resolve(name: str | None, device: torch.device) -> str:
    """Concrete backend for a call on ``device``; raises RuntimeError saying why if unavailable."""
    name = _check_name(get_backend() if name is None else name)
    if name == "auto":
        if device.type == "cuda":
            return "cuda" if why_unavailable("cuda", device) is None else "triton"
        return "eager"
    why = why_unavailable(name, device)
    if why is not None:
        raise RuntimeError(f"backend={name!r} is unavailable for tensors on {device}: {why}")
    return name


def explain() -> str:
    """A human-readable report of versions and which backends are available (and why not)."""
    lines = [f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("GPU: none visible")
    lines.append(f"TRITON_INTERPRET={'1' if interpreter_enabled() else '0'}")
    lines.append(f"default backend: {get_backend()}")
    for b in BACKENDS:
        why = why_unavailable(b)
        lines.append(f"  {b:7s} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
