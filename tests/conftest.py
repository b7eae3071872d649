"""Shared test fixtures: device/backend parametrisation and the 2x-error tolerance rule.

Without a GPU, Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, so it is set here) and the CUDA kernels run in their CPU
emulation build (the "cuda-emu" case: the same csrc/ sources compiled for the host with
csrc/emulator.h, built once per session when nvcc's headers are there). With a GPU, the
same tests run the Triton and CUDA kernels for real on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sys

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: -n 2 on 2 cores would otherwise oversubscribe
    torch.set_num_threads(1)
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import recon_kernels as rk  # noqa: E402
from recon_kernels import cuda as rkcuda  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_cuda  # noqa: E402

NVCC = build_cuda.find_nvcc()
NO_NVCC = (
    "nvcc not found: the CUDA extension cannot be built here (install the CUDA toolkit or "
    "set CUDA_HOME / NVCC)"
)

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
        emu_marks = [pytest.mark.cuda_emu]
        if NVCC is None:
            emu_marks.append(pytest.mark.skip(reason=NO_NVCC + "; the emulator needs its headers"))
        cases.append(pytest.param("cuda", "cpu", id="cuda-emu", marks=emu_marks))
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


def triton_cases():
    """The Triton cases of kernel_cases() (tests of Triton-only machinery)."""
    return [c for c in kernel_cases() if c.values[0] == "triton"]


def attention_cases():
    """kernel_cases() plus the other CUDA attention kernels (csrc/attention_{fwd,bwd}_sm90.cu
    vs attention_{fwd,bwd}.cu, RECON_CUDA_ATTN_FWD / _BWD): without a GPU the emulator runs
    the sm_90a ones ("cuda-emu-sm90"; the plain "cuda-emu" case runs the portable ones); with
    a GPU the portable ones are forced too ("cuda-cuda-sm80"; "cuda-cuda" runs auto's)."""
    cases = kernel_cases()
    if HAS_GPU:
        why = rk.why_unavailable("cuda", "cuda")
        marks = [pytest.mark.attn_fwd_path("sm80")]
        if why is not None:
            marks.append(pytest.mark.skip(reason=str(why)))
        cases.append(pytest.param("cuda", "cuda", id="cuda-cuda-sm80", marks=marks))
    else:
        marks = [pytest.mark.cuda_emu, pytest.mark.attn_fwd_path("sm90")]
        if NVCC is None:
            marks.append(pytest.mark.skip(reason=NO_NVCC + "; the emulator needs its headers"))
        cases.append(pytest.param("cuda", "cpu", id="cuda-emu-sm90", marks=marks))
    return cases


@pytest.fixture(autouse=True)
def _attn_fwd_path_case(request, monkeypatch):
    """A case marked attn_fwd_path(name) runs with RECON_CUDA_ATTN_FWD=name and
    RECON_CUDA_ATTN_BWD=name (which CUDA attention kernels: forward and backward)."""
    m = request.node.get_closest_marker("attn_fwd_path")
    if m is not None:
        monkeypatch.setenv("RECON_CUDA_ATTN_FWD", m.args[0])
        monkeypatch.setenv("RECON_CUDA_ATTN_BWD", m.args[0])
    yield


@contextlib.contextmanager
def locked(path: str):
    """Serialises builds between pytest-xdist workers."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def emu():
    """The CPU emulation build of the CUDA kernels (host compiler + CUDA headers), built once
    (ninja: a no-op when fresh)."""
    if NVCC is None:
        pytest.skip(NO_NVCC + "; the emulator needs its fp16/bf16 headers")
    builddir = os.path.join(ROOT, "build", "cuda-emu")
    with locked(builddir + ".lock"):
        path = build_cuda.build_emulator(builddir)
    spec = importlib.util.spec_from_file_location("_cuda_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _cuda_emu_case(request):
    """A "cuda-emu" kernel case runs backend "cuda" on CPU tensors through the emulator."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    with rkcuda.use_emulator(request.getfixturevalue("emu")):
        yield


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


# RECON_GEMM_TMA x RECON_GEMM_PERSISTENT: every value of the GEMM switches (auto is one of
# the others: see _gemm.tma_mode)
GEMM_SWITCHES = [
    pytest.param(tma, pers, id=f"tma={tma}-persistent={pers}")
    for tma in ("auto", "off", "host")
    for pers in ("0", "1")
]


@pytest.fixture
def gemm_switches(monkeypatch):
    """Sets the GEMM switches; returns the descriptor codes (_gemm._operand_desc: 1 over the
    operand, 2 over its transpose, 0 pointers) the launches chose."""
    from recon_kernels.triton import _gemm as G

    codes = []
    real = G._operand_desc

    def spy(t, k_dim):
        d, code = real(t, k_dim)
        codes.append(code)
        return d, code

    monkeypatch.setattr(G, "_operand_desc", spy)

    def set_(tma, pers):
        monkeypatch.setenv("RECON_GEMM_TMA", tma)
        monkeypatch.setenv("RECON_GEMM_PERSISTENT", pers)
        return codes

    return set_


# sticky CUDA faults: a worker restarts (xdist) or the GPU tests skip (plain run) after one
from sticky_cuda import (  # noqa: E402, F401
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)
