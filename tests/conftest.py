"""Shared test fixtures: device/backend parametrisation and the 2x-error tolerance rule.

Without a GPU, Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, so it is set here). With a GPU, the same tests run the Triton
and CUDA kernels for real on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: -n 2 on 2 cores would otherwise oversubscribe
    torch.set_num_threads(1)
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import recon_kernels as rk  # noqa: E402

LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# the "+ tiny atol" of the tolerance rule, per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float64: 1e-10}


def kernel_cases():
    """(backend, device) pairs whose kernels this machine can run, as pytest params.

    A case the machine cannot run is skipped with the missing hardware named."""
    cases = []
    if HAS_GPU:
        cases.append(pytest.param("triton", "cuda", id="triton-cuda"))
        why = rk.why_unavailable("cuda", "cuda")
        cases.append(
            pytest.param(
                "cuda",
                "cuda",
                id="cuda-cuda",
                marks=pytest.mark.skipif(why is not None, reason=str(why)),
            )
        )
    else:
        cases.append(pytest.param("triton", "cpu", id="triton-interp"))
        cases.append(
            pytest.param(
                "cuda",
                "cuda",
                id="cuda-cuda",
                marks=pytest.mark.skip(
                    reason="needs a CUDA GPU to run the CUDA kernels (none visible)"
                ),
            )
        )
    return cases


def assert_rule(
    name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None, dtype
):
    """The FlashAttention rule: |kernel - ref64| <= 2 * |eager_in_dtype - ref64| + atol.

    ref_lowp: the eager reference run in the same low precision (None for float32/64, where
    the bound is atol-only plus 2x the float32 eager error if given)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.detach().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    err = (got64 - ref64).abs().max().item() if got64.numel() else 0.0
    base = 0.0
    if ref_lowp is not None and ref64.numel():
        base = (ref_lowp.detach().double() - ref64).abs().max().item()
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > 2 x eager {dtype} error {base:.3e} + atol"
