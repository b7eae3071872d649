"""Helpers shared by the Triton kernels: interpreter detection, dot precision, upcasting."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once at import: @triton.jit picks the interpreter at decoration time too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(TORCH_TO_TL)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic: triton.cdiv is a constexpr_function
    in triton 3.6+, ~2 us per host call, and a launch makes a dozen of these."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2), host side
    (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def dot_precision(dtype: torch.dtype) -> str:
    """Triton ``input_precision`` that matches PyTorch matmul semantics for ``dtype``.

    float32 inputs get full-precision products ("ieee") unless the user allowed TF32 for
    CUDA matmuls, as torch.matmul does; fp16/bf16 always run on tensor cores.
    """
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: the triton backend supports float32, float16 and bfloat16, got {t.dtype} "
            "(use backend='eager' for float64)"
        )


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST (the CPU interpreter) converts the operands to float32 first: the interpreter's
    bf16 arithmetic is wrong, and fp32 products of bf16/fp16 values are exact, so the
    result equals what the tensor cores compute on the GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


def autotune_enabled() -> bool:
    """RECON_TRITON_AUTOTUNE=0 turns autotuning off: each kernel takes its first (preferred)
    config that fits, so a test run on a GPU does not compile every candidate per shape."""
    return os.environ.get("RECON_TRITON_AUTOTUNE", "1") not in ("0", "")


@triton.jit
def cast_rne(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest even, on the GPU and in the interpreter alike.

    The GPU's conversion already rounds to nearest even; the interpreter's fp32 -> bf16
    conversion truncates, which would add up to one bf16 ulp of error, so there the
    rounding is done on the bits (finite values; NaN payloads are not preserved)."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
