"""What every launcher shares: argument checks (device, dtype, rank), the 16-byte alignment
the kernels' vector copies need (unaligned inputs are copied into aligned, row-padded
buffers, never rejected), the argument-struct filler and the launch on the tensor's stream."""

from __future__ import annotations

import torch

from ..codes import DTYPE_CODES
from . import _loader


def check_device(name: str, t: torch.Tensor) -> None:
    if _loader.emulator() is not None:
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CUDA emulator takes CPU tensors, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(
            f"{name}: the cuda backend needs a CUDA tensor, got a tensor on {t.device}"
        )


def check(name: str, t: torch.Tensor, ref: torch.Tensor | None = None, ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    check_device(name, t)
    if t.dtype not in DTYPE_CODES:
        raise ValueError(
            f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype} "
            "(use backend='eager' for float64)"
        )
    if ref is not None:
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}: expected dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device}, got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def vec(dtype: torch.dtype) -> int:
    """Elements per 16-byte chunk (the kernels' copy unit)."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def strides(t: torch.Tensor) -> list[int]:
    """Element strides, 0 on size-1 dims (any stride is valid there; 0 is trivially aligned)."""
    return [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]


def is_aligned(t: torch.Tensor) -> bool:
    v = vec(t.dtype)
    st = strides(t)
    return (
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % v == 0 and s >= 0 for s in st[:-1])
    )


def aligned_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` whose rows start 16-byte aligned (the last dim is
    padded in memory to a multiple of 16 bytes; the returned view has the exact shape)."""
    v = vec(like.dtype)
    last = shape[-1]
    padded = (last + v - 1) // v * v
    buf = torch.empty((*shape[:-1], padded), dtype=like.dtype, device=like.device)
    return buf[..., :last]


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when the kernels can copy its rows with 16-byte vectors, else an aligned copy."""
    if is_aligned(t):
        return t
    out = aligned_empty(tuple(t.shape), t)
    out.copy_(t)
    return out


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in the last dim (for tensors read element by element)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def put(args, **fields) -> None:
    # the extension's argument structs reject unknown field names (AttributeError)
    for k, val in fields.items():
        setattr(args, k, val)


def launch(t: torch.Tensor, fn, args) -> None:
    """Runs fn(args, stream) on t's device and current stream."""
    if _loader.emulator() is not None:
        fn(args, 0)
        return
    with torch.cuda.device(t.device):
        fn(args, torch.cuda.current_stream(t.device).cuda_stream)


def check_vec(name: str, b: torch.Tensor | None, n: int, ref: torch.Tensor):
    if b is None:
        return None
    check(name, b, ref, ndim=1)
    if b.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(b.shape)}")
    return b.contiguous()


def round_up(n: int, v: int) -> int:
    return (n + v - 1) // v * v


def ld(t: torch.Tensor) -> int:
    """Row stride of a 2-D operand; a single row's stride is never followed, so report an
    aligned one (the launchers check ld % 16 bytes)."""
    if t.shape[0] > 1:
        return t.stride(0)
    v = vec(t.dtype)
    return (t.shape[1] + v - 1) // v * v
