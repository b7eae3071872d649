"""Backend names, process-wide selection, availability and the reasons for unavailability.

``backend=None`` on an op takes the process default: ``set_backend(name)``, the context
manager ``use_backend(name)``, or the ``RECON_BACKEND`` environment variable; else ``auto``.

=========  =========================================================================
eager      ``reference.py``; any device; float64 capable
triton     CUDA tensors; CPU tensors only with ``TRITON_INTERPRET=1``
cuda       CUDA tensors when the compiled extension ``recon_kernels._cuda`` is built
auto       CUDA tensor: the first available backend of ``AUTO_TABLE[op][arch]``;
           CPU tensor: ``eager``
=========  =========================================================================

``AUTO_TABLE`` is the one place that says which kernel backend ``auto`` runs for an op
family on a GPU architecture, with the evidence behind each choice (``AUTO_EVIDENCE``):
committed benchmark results once a GPU run exists, the static SASS metrics until then.
``recon info`` prints the choice for the visible GPU and why.
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


# --------------------------------------------------------------------------- auto

FAMILIES = ("attention", "mlp", "lora")

# op family -> GPU architecture class -> backends in order of preference (auto takes the
# first one available). sm90: from the committed H200 run (AUTO_RESULTS; tests/
# test_backends.py checks that each first choice is the faster one there); sm80 and other:
# from the static metrics (no GPU run on those yet).
AUTO_RESULTS = {"sm90": "benchmarks/results/gpu-h200-2026-12-04/results.csv"}
_STATIC_SM80 = (
    "static (sm_80 SASS): both backends use mma.sync (HMMA); the hand-written CUDA kernels "
    "are kept first until a benchmark run says otherwise; no sm_80 GPU benchmark committed"
)
_STATIC_OTHER = (
    "the CUDA extension is built for sm_80 and sm_90a only (RECON_CUDA_ARCHS); Triton "
    "compiles for the GPU it runs on"
)
AUTO_TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {
        "sm90": ("cuda", "triton"),
        "sm80": ("cuda", "triton"),
        "other": ("triton", "cuda"),
    },
    "mlp": {"sm90": ("triton", "cuda"), "sm80": ("cuda", "triton"), "other": ("triton", "cuda")},
    "lora": {"sm90": ("triton", "cuda"), "sm80": ("cuda", "triton"), "other": ("triton", "cuda")},
}
_RUN = "measured on an H200 (torch 2.11, triton 3.6; " + AUTO_RESULTS["sm90"] + ")"
AUTO_EVIDENCE: dict[str, dict[str, str]] = {
    fam: {"sm90": "", "sm80": _STATIC_SM80, "other": _STATIC_OTHER} for fam in FAMILIES
}
AUTO_EVIDENCE["attention"]["sm90"] = (
    _RUN + ": the sm_90a CUDA kernels (wgmma + TMA + warp specialisation) beat Triton "
    "forward+backward in 7 of 8 cases (causal D=128 N=8k 5.39 vs 6.00 ms; forward 506 vs "
    "411 TFLOP/s); Triton wins causal D=128 N=1k (1.14 vs 1.24 ms) and the forward alone "
    "with a key padding mask (BERT N=512: 0.24-0.43 vs 0.47-0.59 ms)"
)
AUTO_EVIDENCE["mlp"]["sm90"] = (
    _RUN + ": the Triton GEMMs (wgmma, TMA) beat the CUDA mma.sync ones in every case, "
    "forward 2.1-3.5x, forward+backward 1.1-2.8x (C=4096x16384: 12.6 vs 35.1 ms)"
)
AUTO_EVIDENCE["lora"]["sm90"] = (
    _RUN + ": Triton beats CUDA forward 3.5-3.7x, forward+backward 2.0-2.1x "
    "(r16 4096x4096: 1.82 vs 3.76 ms)"
)


@torch.compiler.assume_constant_result
def arch_class(index: int) -> str:
    """The AUTO_TABLE column of CUDA device ``index``: sm90 (Hopper), sm80 (Ampere / Ada:
    compute capability 8.x) or other."""
    major, _ = torch.cuda.get_device_capability(index)
    return {9: "sm90", 8: "sm80"}.get(major, "other")


def auto_backend(family: str, device: torch.device) -> str:
    """What ``auto`` runs for op ``family`` on tensors of ``device``."""
    if device.type != "cuda":
        return "eager"
    if family not in AUTO_TABLE:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    order = AUTO_TABLE[family][arch_class(index)]
    for name in order:
        if why_unavailable(name, device) is None:
            return name
    return order[0]  # unavailable: resolve's caller gets the reason from the op


def explain_auto(device: torch.device | str | None = None) -> list[str]:
    """One line per op family: what auto runs on ``device`` (default: the current GPU) and
    the evidence for it."""
    if device is None:
        if not torch.cuda.is_available():
            return ["auto: no GPU visible, so CPU tensors run eager (the reference)"]
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return [f"auto: tensors on {device.type} run eager (the reference)"]
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = arch_class(index)
    lines = [f"auto on {torch.cuda.get_device_name(index)} ({arch}):"]
    for fam in FAMILIES:
        lines.append(
            f"  {fam:9s} -> {auto_backend(fam, device)} "
            f"(order {', '.join(AUTO_TABLE[fam][arch])}; {AUTO_EVIDENCE[fam][arch]})"
        )
    if torch.cuda.is_available() and why_unavailable("cuda", device) is None:
        from .cuda.attention import fwd_choice  # the extension is there

        x = torch.empty(1, 1, 128, 128, dtype=torch.bfloat16, device=device)
        lines.append(
            f"  cuda attention forward (bf16, D=128, RECON_CUDA_ATTN_FWD): {fwd_choice(x, x, x)}"
        )
    return lines


def resolve(name: str | None, device: torch.device, family: str = "attention") -> str:
    """Concrete backend for a call of op ``family`` on ``device``; raises RuntimeError saying
    why if unavailable."""
    name = _check_name(get_backend() if name is None else name)
    if name == "auto":
        if device.type == "cuda":
            name = auto_backend(family, device)
        else:
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
    lines += explain_auto()
    return "\n".join(lines)
