"""The CUDA extension on a machine without a GPU: build, import, static checks, emulation.

* build: the extension builds with nvcc (through the install's ninja build directory, a
  no-op when it is fresh) and imports; without a GPU every call raises a clear RuntimeError.
* static: ptxas reports 0 spill bytes for every kernel; the sm_90a SASS of every fp16/bf16
  kernel contains tensor-core instructions (HMMA/HGMMA), and no fp32 kernel does (fp32
  keeps full fp32 products); the build emits no warning.
* emulation: the same kernel sources compiled for the CPU with csrc/emulator.h (threads as
  fibers, mma.sync/ldmatrix/cp.async from their PTX definitions), checked through
  recon_kernels.cuda's launchers against the float64 reference with the 2x rule. This is
  what checks fragment layouts, masks and pipelines here; on a GPU the numerical tests of
  the other files run the real kernels (backend "cuda").
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ATOL, assert_rule

import recon_kernels as rk
from recon_kernels import cuda as rkcuda
from recon_kernels import reference as R
from recon_kernels.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_cuda  # noqa: E402

NVCC = build_cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None,
    reason="nvcc not found: the CUDA extension cannot be built here (install the CUDA "
    "toolkit or set CUDA_HOME / NVCC)",
)
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernels every build must contain: (name stem, dtypes instantiated)
KERNELS = {
    "attn_fwd_kernel": 9,  # 3 dtypes x head-dim buckets 64/128/256
    "attn_bwd_dkdv_kernel": 9,
    "attn_bwd_dq_kernel": 9,
    "attn_bwd_delta_kernel": 3,
    "gemm_kernel": 9,  # 3 dtypes x 3 operand layouts
    "colsum_kernel": 3,
}
TENSOR_CORE_KERNELS = (
    "attn_fwd_kernel",
    "attn_bwd_dkdv_kernel",
    "attn_bwd_dq_kernel",
    "gemm_kernel",
)


@contextlib.contextmanager
def _locked(path: str):
    """Serialises builds between pytest-xdist workers."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cuda_build() -> str:
    """Path of a freshly built extension (ninja: nothing to do after `pip install -e .`)."""
    if NVCC is None:
        pytest.skip(needs_nvcc.kwargs["reason"])
    with _locked(build_cuda.BUILD_DIR + ".lock"):
        return build_cuda.build_extension(build_cuda.BUILD_DIR)


def _import_from(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def emu():
    """The CPU emulation build recon_kernels._cuda_emu (host compiler + CUDA headers)."""
    if NVCC is None:
        pytest.skip(needs_nvcc.kwargs["reason"] + "; the emulator needs its fp16/bf16 headers")
    builddir = os.path.join(ROOT, "build", "cuda-emu")
    with _locked(builddir + ".lock"):
        path = build_cuda.build_emulator(builddir)
    return _import_from(path, "_cuda_emu")


# --------------------------------------------------------------------------- build, import


@needs_nvcc
def test_extension_builds_and_imports(cuda_build):
    mod = _import_from(cuda_build, "_cuda")
    assert mod.build_info["emulated"] is False
    assert mod.build_info["archs"] == os.environ.get("RECON_CUDA_ARCHS", build_cuda.DEFAULT_ARCHS)
    for fn in (
        "attention_fwd",
        "attention_bwd",
        "gemm",
        "conv1d_mlp_fwd",
        "conv1d_mlp_bwd",
        "lora_linear_fwd",
        "lora_linear_bwd",
        "merge_lora",
        "colsum",
        "device_count",
    ):
        assert callable(getattr(mod, fn)), fn
    # the launch structs reject misspelt fields instead of silently ignoring them
    with pytest.raises(AttributeError):
        mod.AttnArgs().qq = 1
    # links only the CUDA runtime statically: no libcudart / libtorch / libc10 dependency
    ldd = shutil.which("ldd")
    if ldd:
        deps = subprocess.run([ldd, cuda_build], capture_output=True, text=True).stdout
        assert not re.search(r"libcudart|libtorch|libc10", deps), deps


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_no_gpu_gives_a_clear_error_not_a_crash(cuda_build):
    mod = _import_from(cuda_build, "_cuda")
    status = mod.device_status()
    assert "no usable CUDA device" in status and "cudaGetDeviceCount" in status, status
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.device_count()
    # a launcher with well-formed arguments stops at the device check, before any pointer use
    g = mod.GemmArgs()
    g.a, g.b, g.c, g.lda, g.ldb, g.ldc, g.m, g.n, g.k = 256, 512, 1024, 16, 16, 16, 16, 16, 16
    with pytest.raises(RuntimeError, match=r"gemm: no usable CUDA device"):
        mod.gemm(g, 0)
    why = rk.why_unavailable("cuda")
    assert why is not None and ("GPU" in why or "not built" in why), why
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        rkcuda.attention_fwd(*(torch.randn(1, 1, 4, 8) for _ in range(3)), None, None, 0.3, False)


def test_cuda_is_a_backend_of_every_op_with_reference_signatures():
    for fam in ("attention", "mlp", "lora"):
        assert _dispatch.impl("cuda", fam) is rkcuda
    for name in (
        "attention_fwd",
        "attention_bwd",
        "conv1d_mlp_fwd",
        "conv1d_mlp_bwd",
        "lora_linear_fwd",
        "lora_linear_bwd",
        "merge_lora",
    ):
        want = list(inspect.signature(getattr(R, name)).parameters)
        got = list(inspect.signature(getattr(rkcuda, name)).parameters)
        assert got == want, f"{name}: {got} != reference {want}"


def test_unbuilt_extension_says_why(monkeypatch):
    def no_ext(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(rkcuda.importlib, "import_module", no_ext)
    monkeypatch.setattr(rkcuda.shutil, "which", lambda _: None)
    mod, why = rkcuda._load.__wrapped__()
    assert mod is None and "not built" in why and "no nvcc" in why
    monkeypatch.setattr(rkcuda.shutil, "which", lambda _: "/usr/bin/nvcc")
    mod, why = rkcuda._load.__wrapped__()
    assert "RECON_BUILD_CUDA=1" in why and "No module named" in why


def test_build_config_switches(monkeypatch):
    monkeypatch.setenv("RECON_BUILD_CUDA", "0")
    assert build_cuda.cuda_build_config() == ([], {})
    monkeypatch.setenv("RECON_BUILD_CUDA", "maybe")
    with pytest.raises(SystemExit, match="RECON_BUILD_CUDA must be auto, 0 or 1"):
        build_cuda.cuda_build_config()
    # no nvcc anywhere: auto installs pure Python, 1 refuses with the reason
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda: None)
    monkeypatch.setenv("RECON_BUILD_CUDA", "auto")
    assert build_cuda.cuda_build_config() == ([], {})
    monkeypatch.setenv("RECON_BUILD_CUDA", "1")
    with pytest.raises(
        SystemExit, match="RECON_BUILD_CUDA=1 but the extension cannot be built: nvcc not found"
    ):
        build_cuda.cuda_build_config()
    assert build_cuda.parse_archs("80;90a") == ["80", "90a"]
    assert build_cuda.parse_archs("sm_86") == ["86"]
    with pytest.raises(SystemExit, match="RECON_CUDA_ARCHS"):
        build_cuda.parse_archs("ampere")
    flags = build_cuda.nvcc_arch_flags(["80", "90a"])
    assert "arch=compute_90a,code=sm_90a" in flags and "arch=compute_80,code=compute_80" in flags


# --------------------------------------------------------------------------- static checks


def _ptxas_reports(builddir: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, sm arch): registers / spill stores / spill loads} from the logs."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for log in sorted(os.listdir(builddir)):
        if not log.endswith(".o.log"):
            continue
        cur = None
        for line in open(os.path.join(builddir, log)):
            m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
            if m:
                cur = out.setdefault((m.group(1), m.group(2)), {})
                continue
            m = re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
            )
            if m and cur is not None:
                cur.update(
                    stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3))
                )
            m = re.search(r"Used (\d+) registers", line)
            if m and cur is not None:
                cur["regs"] = int(m.group(1))
    return out


def _stem(mangled: str) -> str:
    m = re.match(r"_ZN2rk\d+(\w+?)I", mangled)
    return m.group(1) if m else mangled


def _archs() -> list[str]:
    return build_cuda.parse_archs(os.environ.get("RECON_CUDA_ARCHS", build_cuda.DEFAULT_ARCHS))


@needs_nvcc
def test_ptxas_zero_spills_every_kernel(cuda_build):
    reports = _ptxas_reports(os.path.dirname(cuda_build))
    for arch in _archs():
        got = {k: v for k, v in reports.items() if k[1] == f"sm_{arch}"}
        counts: dict[str, int] = {}
        for name, _ in got:
            counts[_stem(name)] = counts.get(_stem(name), 0) + 1
        assert counts == KERNELS, f"sm_{arch}: kernels built {counts}, expected {KERNELS}"
        for (name, a), rep in got.items():
            assert {"regs", "spill_st", "spill_ld"} <= rep.keys(), f"{name} {a}: no ptxas report"
            assert rep["spill_st"] == 0 and rep["spill_ld"] == 0, (
                f"{name} ({a}): {rep['spill_st']} bytes spill stores, {rep['spill_ld']} bytes "
                f"spill loads, {rep['regs']} registers"
            )
            assert rep["stack"] == 0, f"{name} ({a}): {rep['stack']} bytes of stack (local memory)"


def _cuobjdump() -> str | None:
    cands = [shutil.which("cuobjdump")]
    if NVCC:
        cands.append(os.path.join(build_cuda.cuda_root(NVCC), "bin", "cuobjdump"))
    try:
        import triton

        cands.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _sass_functions(so: str, arch: str) -> dict[str, str]:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (neither the CUDA toolkit's nor the triton wheel's)")
    text = subprocess.run(
        [tool, "-sass", "-arch", f"sm_{arch}", so], capture_output=True, text=True, check=True
    ).stdout
    funcs: dict[str, str] = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name, _, body = chunk.partition("\n")
        funcs[name.strip()] = body
    return funcs


@needs_nvcc
def test_sass_tensor_cores_in_half_kernels(cuda_build):
    arch = "90a" if "90a" in _archs() else _archs()[-1]
    funcs = _sass_functions(cuda_build, arch)
    assert len(funcs) == sum(KERNELS.values()), sorted(funcs)
    for name, body in funcs.items():
        mma = re.findall(r"\b(HMMA|HGMMA)\.", body)
        half = "6__half" in name or "13__nv_bfloat16" in name
        if _stem(name) in TENSOR_CORE_KERNELS and half:
            assert mma, f"{name} (sm_{arch}): no HMMA/HGMMA instruction"
        elif _stem(name) in TENSOR_CORE_KERNELS:
            assert not mma, f"{name} (sm_{arch}): fp32 kernel uses tensor cores (TF32 products)"


@needs_nvcc
def test_build_emits_no_warnings(cuda_build):
    assert build_cuda.warnings_in_logs(os.path.dirname(cuda_build)) == []


# --------------------------------------------------------------------------- emulation


def _rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _guarded(t: torch.Tensor, pad: int = 64) -> torch.Tensor:
    """A copy of t inside a NaN-filled buffer: an out-of-bounds read by a kernel turns the
    result non-finite (the 2x rule rejects it). The view stays 16-byte aligned."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    view = buf[pad : pad + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _grad_ref(fn, inputs, dout):
    ts = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ts)
    out.backward(dout)
    return out.detach(), [t.grad for t in ts]


def _masks(mode, B, H, NQ, NK, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = kpm = None
    if "kpm" in mode:
        kpm = torch.rand(B, NK, generator=g) > 0.3
        kpm[:, 0] = True
        kpm[0] = False  # batch 0: every row fully masked
    if "mask" in mode:
        mask = torch.rand(1, H, NQ, NK, generator=g) > 0.25  # broadcast over batch
        mask[0, 0, NQ // 2] = False  # one fully masked row
    return mask, kpm, "causal" in mode


# (B, H, Nq, Nk, D, mode): every head-dim bucket, tile edges (16, 32, 64 multiples +- 1),
# Nq < Nk, Nq > Nk (rows that see no key), decode, every mask kind
ATTN_CASES = [
    (2, 2, 17, 23, 40, "none"),
    (1, 1, 100, 70, 64, "causal"),
    (2, 1, 70, 100, 72, "causal_kpm"),
    (2, 2, 33, 65, 16, "mask_kpm"),
    (1, 2, 9, 40, 256, "mask"),
    (2, 1, 20, 130, 136, "causal_kpm"),
    (2, 1, 1, 37, 24, "causal"),
    (1, 1, 65, 31, 200, "causal_mask"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention_matches_reference(emu, dtype, case):
    B, H, NQ, NK, D, mode = case
    q, k, v, do = (
        _rand(*s, seed=i)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)  # the kernels also take mask + causal
    scale = D**-0.5
    f = lambda q, k, v: R.attention(q, k, v, mask, kpm, scale, causal)  # noqa: E731
    ref, ref_g = _grad_ref(f, (q, k, v), do)
    # baseline of the 2x rule: eager in the same dtype (float32 eager for float32)
    low, low_g = _grad_ref(f, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    qd, kd, vd, dod = (_guarded(t.to(dtype)) for t in (q, k, v, do))
    with rkcuda.use_emulator(emu):
        out, lse = rkcuda.attention_fwd(qd, kd, vd, mask, kpm, scale, causal)
        dq, dk, dv = rkcuda.attention_bwd(dod, qd, kd, vd, out, lse, mask, kpm, scale, causal)
    # lse against float64 math on the same (rounded) inputs: only kernel arithmetic remains
    _, ref_lse = R.attention_fwd(
        *(t.to(dtype).double() for t in (q, k, v)), mask, kpm, scale, causal
    )
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf exactly on empty rows"
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-5 * (1 + ref_lse[fin].abs().max())
    assert_rule("out", out, ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, low_g):
        assert a.dtype == dtype
        assert_rule(name, a, b, c, dtype)
    empty = torch.isinf(ref_lse)  # rows with no allowed key: 0 output and 0 gradient
    if empty.any():
        assert out[empty].abs().max().item() == 0 and dq[empty].abs().max().item() == 0


# (B, H, Nq, Nk, D, mode, dropout_p, seed): head-dim buckets 64/128/256 (fp32 D = 256 runs
# the split sweeps), Nq != Nk both ways, fully masked rows (kpm batch 0, one mask row,
# causal rows with Nq > Nk)
DROPOUT_CASES = [
    (2, 2, 17, 100, 40, "causal_kpm", 0.1, 7),
    (2, 2, 17, 100, 72, "mask_kpm", 0.5, 2**32 + 5),
    (2, 1, 70, 33, 24, "causal", 0.5, -3),
    (1, 1, 9, 40, 200, "mask", 0.1, 11),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention_dropout_matches_reference(emu, dtype, case):
    """Dropout in the forward and both backward kernels vs the reference's keep mask."""
    B, H, NQ, NK, D, mode, p, seed = case
    q, k, v, do = (
        _rand(*s, seed=i)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    scale = D**-0.5
    f = lambda q, k, v: R.attention(q, k, v, mask, kpm, scale, causal, p, seed)  # noqa: E731
    ref, ref_g = _grad_ref(f, (q, k, v), do)
    low, low_g = _grad_ref(f, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    qd, kd, vd, dod = (_guarded(t.to(dtype)) for t in (q, k, v, do))
    with rkcuda.use_emulator(emu):
        out, lse = rkcuda.attention_fwd(qd, kd, vd, mask, kpm, scale, causal, p, seed)
        dq, dk, dv = rkcuda.attention_bwd(
            dod, qd, kd, vd, out, lse, mask, kpm, scale, causal, p, seed
        )
    # lse is the undropped one
    _, ref_lse = R.attention_fwd(
        *(t.to(dtype).double() for t in (q, k, v)), mask, kpm, scale, causal
    )
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse: +inf exactly on empty rows"
    fin = torch.isfinite(ref_lse)
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-5 * (1 + ref_lse[fin].abs().max())
    assert_rule("out", out, ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, low_g):
        assert_rule(name, a, b, c, dtype)
    empty = torch.isinf(ref_lse)
    if empty.any():
        assert out[empty].abs().max().item() == 0 and dq[empty].abs().max().item() == 0


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_emulated_attention_dropout_mask_is_exact(emu, dtype):
    """The kernels drop exactly reference.dropout_keep's entries: with V = I the output is
    P o Z itself, with dO = I dV is (P o Z)^T, so their zero patterns must equal the keep
    mask (an index off by one, a swapped row/column or a wrong (batch, head) key fails);
    other seeds give other masks; dropout_p = 0 is the no-dropout call, bit for bit."""
    B, H, NQ, NK, D = 2, 2, 19, 37, 40
    q, k = _rand(B, H, NQ, D, seed=0) * 0.3, _rand(B, H, NK, D, seed=1) * 0.3  # P > 0
    v = torch.eye(NK, D, dtype=torch.float64).expand(B, H, NK, D).contiguous()
    do = torch.eye(NQ, D, dtype=torch.float64).expand(B, H, NQ, D).contiguous()
    _, kpm, causal = _masks("causal_kpm", B, H, NQ, NK)
    allowed = R.attention_allowed(
        NQ, NK, mask=None, key_padding_mask=kpm, causal=causal, device=q.device
    )
    qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, do))
    args = (None, kpm, D**-0.5, causal)

    def run(p, seed):
        with rkcuda.use_emulator(emu):
            out, lse = rkcuda.attention_fwd(qd, kd, vd, *args, p, seed)
            grads = rkcuda.attention_bwd(dod, qd, kd, vd, out, lse, *args, p, seed)
        return out, lse, grads

    for p, seed in ((0.5, 3), (0.1, 2**31 + 1)):
        keep = R.dropout_keep(seed, B, H, NQ, NK, p) & allowed
        out, lse, (dq, dk, dv) = run(p, seed)
        assert torch.equal(out[..., :NK] != 0, keep), f"forward mask (p={p}, seed={seed})"
        assert torch.equal(dv[..., :NQ].transpose(-1, -2) != 0, keep), f"dV mask (p={p})"
        ref_out, _ = R.attention_fwd(qd.double(), kd.double(), vd.double(), *args, p, seed)
        assert (out.double() - ref_out).abs().max() < 2e-3
        ref_g = R.attention_bwd(
            dod.double(),
            qd.double(),
            kd.double(),
            vd.double(),
            out.double(),
            lse.double(),
            *args,
            p,
            seed,
        )
        for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g):
            assert (a.double() - b).abs().max() < 2e-3, name
    # another seed draws another mask; dropout_p = 0 (any seed) is exactly no dropout
    assert not torch.equal(run(0.5, 4)[0], run(0.5, 3)[0])
    with rkcuda.use_emulator(emu):
        base_out, base_lse = rkcuda.attention_fwd(qd, kd, vd, *args)
        base_g = rkcuda.attention_bwd(dod, qd, kd, vd, base_out, base_lse, *args)
    out0, lse0, g0 = run(0.0, 12345)
    assert torch.equal(out0, base_out) and torch.equal(lse0, base_lse)
    assert all(torch.equal(a, b) for a, b in zip(g0, base_g))


def test_attention_dropout_p_is_validated():
    q = torch.randn(1, 1, 4, 8)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            rkcuda.attention_fwd(q, q, q, None, None, 0.3, False, bad)
        with pytest.raises(ValueError, match="dropout_p"):
            rkcuda.attention_bwd(q, q, q, q, q, q[..., 0], None, None, 0.3, False, bad)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_emulated_attention_strided_and_unaligned_views(emu, dtype):
    """Packed qkv views (non-contiguous, row stride 3*H*D), D = 59 (rows not 16-byte
    aligned: the launcher copies), non-contiguous dO."""
    B, N, H, D = 2, 21, 2, 59
    qkv = _rand(B, N, 3, H, D, seed=3)
    do = _rand(B, N, H, D, seed=4).transpose(1, 2)
    kpm = torch.rand(B, N, generator=torch.Generator().manual_seed(5)) > 0.2
    kpm[:, 0] = True
    split = lambda p: p.permute(2, 0, 3, 1, 4).unbind(0)  # noqa: E731
    f = lambda p: R.attention(*split(p), key_padding_mask=kpm)  # noqa: E731
    ref, (ref_g,) = _grad_ref(f, [qkv], do)
    low, (low_g,) = _grad_ref(f, [qkv.to(dtype)], do.to(dtype))
    p = qkv.to(dtype)
    q, k, v = split(p)
    assert not q.is_contiguous()
    with rkcuda.use_emulator(emu):
        out, lse = rkcuda.attention_fwd(q, k, v, None, kpm, D**-0.5, False)
        dq, dk, dv = rkcuda.attention_bwd(
            do.to(dtype), q, k, v, out, lse, None, kpm, D**-0.5, False
        )
    assert_rule("out", out, ref, low, dtype)
    got_g = torch.stack([dq, dk, dv], 0).permute(1, 3, 0, 2, 4)  # back to (B, N, 3, H, D)
    assert_rule("dqkv", got_g, ref_g, low_g, dtype)


# (M, C, hidden, C_out, activation, biases): M and hidden across tile edges (128), odd C
MLP_CASES = [
    (37, 24, 70, 20, "gelu", True),
    (130, 40, 136, 33, "gelu_tanh", True),
    (50, 59, 100, 17, "relu", False),
    (1, 16, 8, 8, "gelu", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_conv1d_mlp_matches_reference(emu, dtype, case):
    M, C, Hd, Co, act, bias = case
    x, w1, w2, dy = (
        _rand(M, C, seed=0),
        _rand(Hd, C, seed=1) / C**0.5,
        _rand(Co, Hd, seed=2) / Hd**0.5,
        _rand(M, Co, seed=3),
    )
    b1 = _rand(Hd, seed=4) if bias else None
    b2 = _rand(Co, seed=5) if bias else None
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]

    def f(*ts):
        it = iter(ts)
        x_, w1_ = next(it), next(it)
        b1_ = next(it) if bias else None
        w2_ = next(it)
        b2_ = next(it) if bias else None
        return R.conv1d_mlp(x_, w1_, b1_, w2_, b2_, act)

    ref, ref_g = _grad_ref(f, params, dy)
    lowd = torch.float32 if dtype == torch.float32 else dtype
    low, low_g = _grad_ref(f, [t.to(lowd) for t in params], dy.to(lowd))
    cast = lambda t: None if t is None else _guarded(t.to(dtype))  # noqa: E731
    xd, w1d, b1d, w2d, b2d, dyd = map(cast, (x, w1, b1, w2, b2, dy))
    with rkcuda.use_emulator(emu):
        y, h = rkcuda.conv1d_mlp_fwd(xd, w1d, b1d, w2d, b2d, act)
        dx, dw1, db1, dw2, db2 = rkcuda.conv1d_mlp_bwd(dyd, xd, w1d, w2d, h, act, bias, bias)
    assert_rule("y", y, ref, low, dtype)
    h_ref = torch.nn.functional.linear(x, w1, b1)
    h_low = torch.nn.functional.linear(x.to(lowd), w1.to(lowd), None if b1 is None else b1.to(lowd))
    assert_rule("h", h, h_ref, h_low, dtype)
    got = [dx, dw1] + ([db1] if bias else []) + [dw2] + ([db2] if bias else [])
    names = ["dx", "dw1"] + (["db1"] if bias else []) + ["dw2"] + (["db2"] if bias else [])
    for name, a, b, c in zip(names, got, ref_g, low_g):
        assert_rule(name, a, b, c, dtype)
    if not bias:
        assert db1 is None and db2 is None


# (M, in, out, r, scale, bias)
LORA_CASES = [
    (37, 48, 20, 4, 0.5, True),
    (150, 40, 136, 8, 2.0, True),
    (33, 21, 19, 3, 0.25, False),
    (1, 8, 8, 1, 1.0, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_lora_matches_reference(emu, dtype, case):
    M, I, O, r, s, bias = case
    x, w, a, b, dy = (
        _rand(M, I, seed=0),
        _rand(O, I, seed=1) / I**0.5,
        _rand(r, I, seed=2) / I**0.5,
        _rand(O, r, seed=3),
        _rand(M, O, seed=4),
    )
    bs = _rand(O, seed=5) if bias else None
    params = [x, w, a, b] + ([bs] if bias else [])
    f = lambda x_, w_, a_, b_, *rest: R.lora_linear(x_, w_, rest[0] if rest else None, a_, b_, s)  # noqa: E731
    ref, ref_g = _grad_ref(f, params, dy)
    lowd = torch.float32 if dtype == torch.float32 else dtype
    low, low_g = _grad_ref(f, [t.to(lowd) for t in params], dy.to(lowd))
    xd, wd, ad, bd, dyd = (_guarded(t.to(dtype)) for t in (x, w, a, b, dy))
    bsd = None if bs is None else _guarded(bs.to(dtype))
    with rkcuda.use_emulator(emu):
        y, xa = rkcuda.lora_linear_fwd(xd, wd, bsd, ad, bd, s)
        dx, dw, dbias, da, db = rkcuda.lora_linear_bwd(dyd, xd, wd, ad, bd, xa, s, True, bias)
        merged = rkcuda.merge_lora(wd, ad, bd, s)
    assert_rule("y", y, ref, low, dtype)
    assert_rule("xa", xa, x @ a.t(), x.to(lowd) @ a.to(lowd).t(), dtype)
    assert xa.is_contiguous() and xa.shape == (M, r)
    named = {"dx": dx, "dw": dw, "da": da, "db": db}
    ref_named = dict(zip(["dx", "dw", "da", "db", "dbias"], ref_g))
    low_named = dict(zip(["dx", "dw", "da", "db", "dbias"], low_g))
    if bias:
        named["dbias"] = dbias
    for name, t in named.items():
        assert_rule(name, t, ref_named[name], low_named[name], dtype)
    assert_rule(
        "merge",
        merged,
        R.merge_lora(w, a, b, s),
        R.merge_lora(w.to(lowd), a.to(lowd), b.to(lowd), s),
        dtype,
    )
    with rkcuda.use_emulator(emu):  # the fine-tuning case: no dW, no dbias
        dx2, dw2, dbias2, _, _ = rkcuda.lora_linear_bwd(dyd, xd, wd, ad, bd, xa, s, False, False)
    assert dw2 is None and dbias2 is None and torch.equal(dx2, dx)


def test_emulated_empty_token_batch(emu):
    x = torch.zeros(0, 8)
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    with rkcuda.use_emulator(emu):
        y, h = rkcuda.conv1d_mlp_fwd(x, w1, None, w2, None, "gelu")
        dx, dw1, db1, dw2, db2 = rkcuda.conv1d_mlp_bwd(
            torch.zeros(0, 8), x, w1, w2, h, "gelu", True, True
        )
    assert y.shape == (0, 8) and h.shape == (0, 16)
    assert dw1.abs().max() == 0 and dw2.abs().max() == 0 and db1.abs().max() == 0


def test_emulated_launcher_guards_reject_misaligned_input(emu):
    """The C++ launchers re-check what Python guarantees: a misaligned row is refused."""
    q = torch.randn(1, 1, 8, 16, dtype=torch.float16)
    a = emu.AttnArgs()
    a.q = a.k = a.v = q.data_ptr() + 2  # not 16-byte aligned
    a.o = a.lse = q.data_ptr()
    a.b = a.h = 1
    a.nq = a.nk = 8
    a.d = 16
    a.q_sm = a.k_sm = a.v_sm = 16
    a.dtype = 1
    with pytest.raises(
        RuntimeError, match=r"attention_fwd: q: expected a 16-byte aligned data pointer"
    ):
        emu.attention_fwd(a, 0)
    g = emu.GemmArgs()
    g.a, g.b, g.c, g.lda, g.ldb, g.ldc, g.m, g.n, g.k, g.dtype = 16, 32, 64, 12, 16, 16, 4, 4, 4, 1
    with pytest.raises(
        RuntimeError, match=r"gemm: A: expected a 16-byte aligned pointer and a row stride"
    ):
        emu.gemm(g, 0)


# A pytest plugin for a nested run: every test of the suite parametrised over kernel_cases()
# gets a "cuda-emu" case that runs backend "cuda" on CPU tensors through the emulator, so
# the public API, the custom ops, autograd and the models exercise the CUDA kernels here.
_SUITE_PLUGIN = """
import importlib.util, os, sys
import pytest

def pytest_sessionstart(session):
    spec = importlib.util.spec_from_file_location("_cuda_emu", os.environ["RECON_EMU_MODULE"])
    emu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu)
    from recon_kernels import backends
    from recon_kernels import cuda as rkcuda
    rkcuda._emulator = emu
    why = backends.why_unavailable
    backends.why_unavailable = lambda name, device=None: (
        None if str(name).lower() == "cuda" else why(name, device)
    )
    sys.modules["conftest"].kernel_cases = lambda: [pytest.param("cuda", "cpu", id="cuda-emu")]
"""


@needs_nvcc
def test_suite_cuda_cases_on_the_emulator(emu, tmp_path):
    """The numerical tests of the other files (attention, MLP, LoRA, models, integrations)
    with backend "cuda", run on the emulated kernels: what a GPU run checks, minus the GPU."""
    (tmp_path / "recon_emu_suite.py").write_text(_SUITE_PLUGIN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    env["RECON_EMU_MODULE"] = emu.__file__
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "recon_emu_suite", "-p", "no:cacheprovider"]
    cmd += ["-k", "cuda-emu", os.path.join(ROOT, "tests"), "--ignore", os.path.abspath(__file__)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 100, f"too few emulated cuda cases ran:\n{tail}"


def test_atol_table_covers_kernel_dtypes():
    # the emulation tests use conftest's tolerance rule for every dtype they run
    assert all(d in ATOL for d in DTYPES)
