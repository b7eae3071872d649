"""The CUDA extension on a machine without a GPU: build, import, static checks.

* build: the extension builds with nvcc (through the install's ninja build directory, a
  no-op when it is fresh) and imports; without a GPU every call raises a clear RuntimeError.
* static: ptxas reports 0 spill bytes for every kernel; the sm_90a SASS of every fp16/bf16
  kernel contains tensor-core instructions (HMMA/HGMMA), and no fp32 kernel does (fp32
  keeps full fp32 products); the build emits no warning.

Numerics: the kernel tests of test_attention/test_mlp/test_lora (and the models) run the
CUDA kernels as their "cuda-emu" case on the CPU emulation build (conftest.py), and
test_cuda_emulator.py checks the launchers themselves (guard buffers, lse, misaligned input).
"""

from __future__ import annotations

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
from conftest import ATOL, NO_NVCC, NVCC, ROOT, locked

import build_cuda  # noqa: E402  (conftest puts the repository root on sys.path)
import recon_kernels as rk
from recon_kernels import cuda as rkcuda
from recon_kernels import reference as R
from recon_kernels.cuda import _loader as cuda_loader
from recon_kernels.ops import _dispatch

needs_nvcc = pytest.mark.skipif(NVCC is None, reason=NO_NVCC)
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
    "hopper_selftest_kernel": 4,  # fp16/bf16 x N = 16/64 (csrc/hopper_selftest.cu)
    "flag_selftest_kernel": 1,
    # csrc/attention_fwd_sm90.cu: fp16/bf16 x buckets 64/128/256 x masked x dropout (the
    # sm_80 pass builds the same names as trap stubs: the launcher never picks them there)
    "attn_fwd_sm90_kernel": 24,
    # csrc/attention_bwd_sm90.cu: fp16/bf16 x masked x dropout x (D 64, 128: one pass;
    # D 256: the dV pass and the dK + dQ pass), + the dQ convert
    "attn_bwd_sm90_kernel": 32,
    "attn_bwd_dq_convert_sm90_kernel": 2,
}
TENSOR_CORE_KERNELS = (
    "attn_fwd_kernel",
    "attn_bwd_dkdv_kernel",
    "attn_bwd_dq_kernel",
    "gemm_kernel",
    "hopper_selftest_kernel",
)


@pytest.fixture(scope="session")
def cuda_build() -> str:
    """Path of a freshly built extension (ninja: nothing to do after `pip install -e .`)."""
    if NVCC is None:
        pytest.skip(needs_nvcc.kwargs["reason"])
    with locked(build_cuda.BUILD_DIR + ".lock"):
        return build_cuda.build_extension(build_cuda.BUILD_DIR)


def _import_from(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    # one launcher module per op family, as recon_kernels.triton
    families = {
        "attention": ("attention_fwd", "attention_bwd"),
        "mlp": ("conv1d_mlp_fwd", "conv1d_mlp_bwd"),
        "lora": ("lora_linear_fwd", "lora_linear_bwd", "merge_lora"),
    }
    for fam, names in families.items():
        mod = _dispatch.impl("cuda", fam)
        assert mod.__name__ == f"recon_kernels.cuda.{fam}"
        for name in names:
            want = list(inspect.signature(getattr(R, name)).parameters)
            got = list(inspect.signature(getattr(mod, name)).parameters)
            assert got == want, f"{name}: {got} != reference {want}"
            assert getattr(rkcuda, name) is getattr(mod, name)


def test_unbuilt_extension_says_why(monkeypatch):
    def no_ext(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_loader.importlib, "import_module", no_ext)
    monkeypatch.setattr(cuda_loader.shutil, "which", lambda _: None)
    mod, why = cuda_loader._load.__wrapped__()
    assert mod is None and "not built" in why and "no nvcc" in why
    monkeypatch.setattr(cuda_loader.shutil, "which", lambda _: "/usr/bin/nvcc")
    mod, why = cuda_loader._load.__wrapped__()
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
    """rk::name<...>(...) or rk::name(...) -> name (Itanium: _ZN2rk<len><name>...)."""
    m = re.match(r"_ZN2rk(\d+)", mangled)
    return mangled[m.end() : m.end() + int(m.group(1))] if m else mangled


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


@needs_nvcc
def test_ptxas_never_serializes_wgmma(cuda_build):
    """ptxas serializes every wgmma of a kernel (each waits for the previous: no overlap of
    the tensor cores with anything) when it cannot keep the accumulators in place, e.g.
    around a divergent loop in the warpgroup (info C7520, "wgmma.mma_async instructions are
    serialized"): a silent slowdown of several times that no numerical test sees."""
    builddir = os.path.dirname(cuda_build)
    hits = []
    for log in sorted(os.listdir(builddir)):
        if log.endswith(".o.log"):
            text = open(os.path.join(builddir, log)).read()
            hits += re.findall(r"C7520[^\n]*?function '(\w+)'", text)
    assert not hits, f"wgmma serialized by ptxas in {sorted(set(hits))}"


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
def test_sass_hopper_primitives_in_sm90a_selftest(cuda_build):
    """The sm_90a SASS of the Hopper self-test kernels (csrc/hopper_selftest.cu) holds what
    the wrappers promise: HGMMA (wgmma), UTMALDG (TMA tile load), USETMAXREG, the mbarrier
    try-wait, a wgmma wait of depth 1 (mode 2 waits with one group in flight), and the
    global flags' acquire / release."""
    if "90a" not in _archs():
        pytest.skip("RECON_CUDA_ARCHS has no sm_90a target")
    funcs = {n: b for n, b in _sass_functions(cuda_build, "90a").items() if "hopper_selftest" in n}
    assert len(funcs) == KERNELS["hopper_selftest_kernel"], sorted(funcs)
    for name, body in funcs.items():
        for pat in (
            r"\bHGMMA\.64x(16|64)x16\.F32",
            r"\bUTMALDG\.2D\b",
            r"\bUTMALDG\.3D\b",
            r"\bUSETMAXREG\.TRY",  # setmaxnreg.inc (the consumer warpgroup)
            r"\bUSETMAXREG\.DEALLOC",  # setmaxnreg.dec (the producer warpgroup)
            r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b",  # mbarrier.try_wait.parity
            r"\bSYNCS\.ARRIVE\.TRANS64",  # mbarrier.arrive.expect_tx
            r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1\b",  # wgmma.wait_group 1
        ):
            assert re.search(pat, body), f"{name} (sm_90a): no {pat}"
    # the global-flag turns: ld.acquire.gpu spin with backoff, the turn passed on by one
    # red.release.gpu (a fence, then the add)
    (flag,) = [b for n, b in _sass_functions(cuda_build, "90a").items() if "flag_selftest" in n]
    for pat in (r"\bLDG\.E\.STRONG\.GPU\b", r"\bNANOSLEEP\b", r"\bMEMBAR\.ALL\.GPU\b"):
        assert re.search(pat, flag), f"flag_selftest_kernel (sm_90a): no {pat}"
    assert len(re.findall(r"\bREDG\.E\.ADD\.S32\.STRONG\.GPU\b", flag)) == 1
    # the sm_80 build of the same source is the trap stub (no Hopper instruction leaks)
    if "80" in _archs():
        for name, body in _sass_functions(cuda_build, "80").items():
            if "hopper_selftest" in name:
                assert not re.search(r"HGMMA|UTMALDG|USETMAXREG", body), name


@needs_nvcc
def test_build_emits_no_warnings(cuda_build):
    assert build_cuda.warnings_in_logs(os.path.dirname(cuda_build)) == []


def test_atol_table_covers_kernel_dtypes():
    # the emulation tests use conftest's tolerance rule for every dtype they run
    assert all(d in ATOL for d in DTYPES)


def test_csrc_codes_match_the_shared_table():
    """csrc/common.cuh declares the codes of recon_kernels/codes.py, value for value."""
    from recon_kernels import codes

    src = open(os.path.join(ROOT, "csrc", "common.cuh")).read()

    def enum(name):
        body = re.search(r"enum " + name + r" : int \{([^}]*)\}", src).group(1)
        return {k.strip(): int(v) for k, v in (e.split("=") for e in body.split(","))}

    names = {torch.float32: "kFloat32", torch.float16: "kFloat16", torch.bfloat16: "kBFloat16"}
    assert enum("DTypeCode") == {names[d]: c for d, c in codes.DTYPE_CODES.items()}
    acts = {"none": "kActNone", "gelu": "kGelu", "gelu_tanh": "kGeluTanh", "relu": "kRelu"}
    assert enum("ActCode") == {acts[a]: c for a, c in codes.ACT_CODES.items()}
    assert enum("EpiCode") == {
        "kEpiNone": codes.EPI_NONE,
        "kEpiDact": codes.EPI_DACT,
        "kEpiAdd": codes.EPI_ADD,
    }


# --------------------------------------------------------------------------- sm_80 attention forward
#
# Issue #12, item 4: the forward used 16 query rows per warp, re-reading Q and K/V from
# shared memory for every MMA: 0.070 B of shared memory per FLOP at D = 128 (16 x 128 Q +
# 2 x 64 x 128 K/V fp16 bytes per 4 x 16 x 64 x 128 FLOPs). Now 32 rows per warp with Q in
# registers: every K/V fragment feeds two m16 tiles.

SM80_SMEM_LIMIT = 166912  # dynamic shared memory a block may opt into on sm_80 (163 KiB)
OLD_FWD_SMEM_BYTES_PER_FLOP = (16 * 128 + 2 * 64 * 128) * 2 / (4 * 16 * 64 * 128)
LDSM_X4_BYTES = 4 * 8 * 16  # four 8 x 8 matrices of 16-bit values per warp
HMMA_16816_FLOPS = 2 * 16 * 8 * 16
ELEM_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _fwd_tiles(mod, dtype, d) -> dict:
    from recon_kernels.codes import DTYPE_CODES

    return mod.attention_fwd_tiles(DTYPE_CODES[dtype], d)


def _fwd_smem_bytes_per_flop(t: dict, dtype, d: int) -> float:
    """Shared-memory bytes a warp reads per MMA FLOP: per softmax step of sub_n keys, the
    K and V tiles (and its Q rows unless Q lives in registers) for 2 x 2 x rows x sub_n x d
    FLOPs."""
    rows, n = t["rows_per_warp"], t["sub_n"]
    q = 0 if t["q_in_regs"] else rows * d
    return (q + 2 * n * d) * ELEM_BYTES[dtype] / (4 * rows * n * d)


@needs_nvcc
def test_sm80_attention_forward_tiles(cuda_build):
    mod = _import_from(cuda_build, "_cuda")
    assert OLD_FWD_SMEM_BYTES_PER_FLOP == pytest.approx(0.0703, abs=1e-4)
    for dtype in DTYPES:
        for d in (16, 40, 64, 72, 128, 200, 256):
            t = _fwd_tiles(mod, dtype, d)
            assert t["head_dim_bucket"] == (64 if d <= 64 else 128 if d <= 128 else 256)
            assert t["stages"] == 2, f"{dtype} D={d}: K/V must be double-buffered, got {t}"
            assert t["smem_bytes"] <= SM80_SMEM_LIMIT, f"{dtype} D={d}: {t}"
            assert t["block_m"] == t["warps"] * t["rows_per_warp"]
            assert t["block_n"] % t["sub_n"] == 0 and t["sub_n"] % 16 == 0
            if d <= 128:
                # two blocks fit one SM's 164 KiB (the register file allows two as well)
                assert 2 * t["smem_bytes"] <= 164 * 1024, f"{dtype} D={d}: {t}"
            if dtype in LOW and d <= 128:
                assert t["rows_per_warp"] == 32 and t["block_m"] == 128 and t["q_in_regs"], t
    for dtype in LOW:
        got = _fwd_smem_bytes_per_flop(_fwd_tiles(mod, dtype, 128), dtype, 128)
        assert got <= OLD_FWD_SMEM_BYTES_PER_FLOP / 2, f"{dtype}: {got:.4f} B/FLOP at D=128"
    with pytest.raises(RuntimeError, match=r"head dim D: expected 1 <= D <= 256, got 257"):
        mod.attention_fwd_tiles(1, 257)
    with pytest.raises(RuntimeError, match="dtype code"):
        mod.attention_fwd_tiles(7, 64)


def _innermost_mma_loop(body: str, mma: str = r"\bHMMA\.") -> list[str]:
    """The instructions of the smallest loop of a SASS function body that contains an HMMA.

    A loop is the address range of a backward branch and its target; a range that some
    other backward branch enters from outside (ptxas places cold paths, e.g. the mask
    evaluation, after the loop and branches back into its middle) is not a loop."""
    return min(_mma_loops(body, mma), key=len)


def _mma_loops(body: str, mma: str = r"\bHMMA\.") -> list[list[str]]:
    """Every loop (see _innermost_mma_loop) of a SASS function body that contains ``mma``."""
    ins = []
    for line in body.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    back = []  # (target, source) of every backward branch
    for addr, text in ins:
        m = re.search(r"\bBRA(?:\.\w+)* (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            back.append((int(m.group(1), 16), addr))
    loops = []
    for lo, hi in back:
        if any(lo <= src <= hi and not lo <= dst <= hi for dst, src in back):
            continue
        loop = [t for a, t in ins if lo <= a <= hi]
        if any(re.search(mma, t) for t in loop):
            loops.append(loop)
    assert loops, f"no loop with {mma} found"
    return loops


@needs_nvcc
def test_sm80_attention_forward_registers_and_sass(cuda_build):
    """ptxas: every forward instantiation for sm_80 within 255 registers, no spills. SASS of
    the fp16/bf16 forwards for sm_80: the innermost loop (one softmax step) holds exactly the
    HMMAs of the tile and only K/V ldmatrix (Q stays in registers), so the shared-memory
    bytes per FLOP measured on the machine code equal the tile arithmetic (<= half the
    old 0.070 at D = 128)."""
    if "80" not in _archs():
        pytest.skip(f"sm_80 not among RECON_CUDA_ARCHS={_archs()}")
    reports = _ptxas_reports(os.path.dirname(cuda_build))
    fwd = {k: v for k, v in reports.items() if _stem(k[0]) == "attn_fwd_kernel" and k[1] == "sm_80"}
    assert len(fwd) == 9, sorted(fwd)
    for (name, _), rep in fwd.items():
        assert rep["regs"] <= 255 and rep["spill_st"] == 0 and rep["spill_ld"] == 0, (name, rep)
    mod = _import_from(cuda_build, "_cuda")
    funcs = _sass_functions(cuda_build, "80")
    mangled = {torch.float16: "6__half", torch.bfloat16: "13__nv_bfloat16"}
    for dtype in LOW:
        for d in (64, 128, 256):
            name = f"_ZN2rk15attn_fwd_kernelI{mangled[dtype]}Li{d}EEEvNS_8AttnArgsE"
            loop = _innermost_mma_loop(funcs[name])
            hmma = [t for t in loop if re.search(r"\bHMMA\.16816\.F32", t)]
            ldsm = [t for t in loop if re.search(r"\bLDSM\.", t)]
            assert all(re.search(r"LDSM\.16\.MT?88\.4", t) for t in ldsm), ldsm
            t = _fwd_tiles(mod, dtype, d)
            rows, n = t["rows_per_warp"], t["sub_n"]
            # S = Q K^T and O += P V, m16n8k16 each: rows/16 x n/8 x d/16 + rows/16 x d/8 x n/16
            assert len(hmma) == 2 * (rows // 16) * (n // 8) * (d // 16), (name, len(hmma))
            # K: n/16 x d/16 ldmatrix.x4, V: the same; none for Q
            assert len(ldsm) == 2 * (n // 16) * (d // 16), (name, len(ldsm))
            measured = len(ldsm) * LDSM_X4_BYTES / (len(hmma) * HMMA_16816_FLOPS)
            assert measured == pytest.approx(_fwd_smem_bytes_per_flop(t, dtype, d))
            if d == 128:
                assert measured <= OLD_FWD_SMEM_BYTES_PER_FLOP / 2, (name, measured)


# The sm_90a attention forward's steady loop (csrc/attention_fwd_sm90.cu, the plain kernel:
# no mask, no dropout, not the last tile) per head-dim bucket: (keys per tile, bound on SASS
# instructions per score element per thread, as measured when it was written + ~1%: 6.45,
# 7.08, 12.94). History: 7.17 / 8.05 at D = 64 / 128 before the consumer index was made
# warp-uniform to ptxas (common.cuh's warp_uniform); 7.03 / 7.80 / 14.66 before the lazy
# rescaling dropped the warp-wide rescale vote (five shuffles); 6.84 / 7.58 / 14.28 while
# every K / V descriptor was rebuilt from the stage index (now: a stage base per tile plus
# immediates).
SM90_FWD_LOOP = {64: (128, 6.52), 128: (128, 7.15), 256: (64, 13.07)}


@needs_nvcc
def test_sm90_attention_forward_sass(cuda_build):
    """Every sm_90a forward instantiation: HGMMA (wgmma), UTMALDG.4D (TMA), USETMAXREG both
    ways (producer / consumer warpgroups), mbarrier waits, and a wgmma wait of depth 1
    inside the innermost HGMMA loop (P V runs during the next softmax). The plain kernels'
    steady loop: exactly the tile's HGMMAs (kD/16 for S = Q K^T, kBlockN/16 for O += P V),
    one MUFU.EX2 per score element (+ the two row rescales), no compiler-injected
    warpgroup.arrive (only the loop's own wgmma.fence), and at most the recorded SASS
    instructions per score element (a regression bound)."""
    if "90a" not in _archs():
        pytest.skip("RECON_CUDA_ARCHS has no sm_90a target")
    reports = _ptxas_reports(os.path.dirname(cuda_build))
    funcs = {n: b for n, b in _sass_functions(cuda_build, "90a").items() if "attn_fwd_sm90" in n}
    assert len(funcs) == KERNELS["attn_fwd_sm90_kernel"], sorted(funcs)
    for name, body in funcs.items():
        rep = reports[(name, "sm_90a")]
        assert rep["spill_st"] == 0 and rep["spill_ld"] == 0 and rep["stack"] == 0, (name, rep)
        for pat in (
            r"\bHGMMA\.64x\d+x16\.F32",
            r"\bUTMALDG\.4D\b",
            r"\bUSETMAXREG\.TRY",
            r"\bUSETMAXREG\.DEALLOC",
            r"\bSYNCS\.PHASECHK\.TRANS64\.TRYWAIT\b",
        ):
            assert re.search(pat, body), f"{name}: no {pat}"
        loop = _innermost_mma_loop(body, r"\bHGMMA\.")
        assert any(re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1\b", t) for t in loop), name
        m = re.search(r"kernelI(6__half|13__nv_bfloat16)Li(\d+)ELb(\d)ELb(\d)E", name)
        assert m, name
        d, masked, drop = int(m.group(2)), m.group(3) == "1", m.group(4) == "1"
        if masked or drop:
            continue
        bn, bound = SM90_FWD_LOOP[d]
        hgmma = [t for t in loop if re.search(r"\bHGMMA\.", t)]
        assert len(hgmma) == d // 16 + bn // 16, (name, len(hgmma))
        elems = 64 * bn // 128  # score elements per thread per tile (64 rows per warpgroup)
        ex2 = sum(bool(re.search(r"\bMUFU\.EX2\b", t)) for t in loop)
        assert ex2 == elems + 2, (name, ex2)
        assert sum("WARPGROUP.ARRIVE" in t for t in loop) == 2, name
        assert len(loop) / elems <= bound, (name, len(loop) / elems)
        assert not any(re.search(r"\bBAR\.(SYNC|ARV)\b", t) for t in loop), name
        if d <= 128:  # two consumers: the pingpong copy of the loop waits and hands over
            pp = [lp for lp in _mma_loops(body, r"\bHGMMA\.") if
                  sum(bool(re.search(r"\bHGMMA\.", t)) for t in lp) == len(hgmma)]  # fmt: skip
            assert any(
                any(re.search(r"\bBAR\.SYNC\b", t) for t in lp)
                and any(re.search(r"\bBAR\.ARV\b", t) for t in lp)
                for lp in pp
            ), f"{name}: no pingpong loop (BAR.SYNC + BAR.ARV around the HGMMAs)"
    if "80" in _archs():  # the sm_80 pass holds trap stubs only
        for name, body in _sass_functions(cuda_build, "80").items():
            if "attn_fwd_sm90" in name:
                assert not re.search(r"HGMMA|UTMALDG|USETMAXREG", body), name


def test_generated_wgmma_wrappers_are_current():
    """csrc/wgmma_ops.inc is the output of csrc/gen_wgmma.py (edit the generator, rerun)."""
    gen = os.path.join(ROOT, "csrc", "gen_wgmma.py")
    r = subprocess.run([sys.executable, gen, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, "csrc/wgmma_ops.inc is stale: run python csrc/gen_wgmma.py"


# The sm_90a backward's steady step (csrc/attention_bwd_sm90.cu, the plain kernels: 64
# queries against each consumer's 64 keys) per (head-dim bucket, pass): bound on SASS
# instructions per score element per thread, as measured when written + ~1% (9.22, 11.28,
# 6.19, 13.56). History of the D = 64 / 128 steps: 28 / 41 with per-element float atomics
# for dQ (REDG) and scalar dS stores; 15.0 / 19.4 with bulk reductions issued by the
# consumers; 16.25 / 20.66 with the deterministic turn in the consumers too; 10.1 / 12.34
# once the consumers hand each dQ chunk to a writer warp through named barriers; 9.59 /
# 11.84 with lse and delta in 8-byte pairs (LDS.64); now the Q / dO descriptors are a
# stage base per step plus immediates.
SM90_BWD_LOOP = {(64, 0): 9.31, (128, 0): 11.4, (256, 1): 6.25, (256, 2): 13.7}


@needs_nvcc
def test_sm90_attention_backward_sass(cuda_build):
    """Every sm_90a backward instantiation (csrc/attention_bwd_sm90.cu): 0 spills; HGMMA
    (SS for S^T and dP^T, RS for dV and dK, SS with an MN-major B for dQ), UTMALDG.4D,
    USETMAXREG both ways, dQ added by bulk reductions from shared memory
    (UBLKRED.G.S.ADD.F32 by the writer warp, no per-element float REDG; not in D = 256's dV
    pass), in order when deterministic (ld.acquire.gpu spin with NANOSLEEP, one
    red.release.gpu), dS stored
    transposed by stmatrix (STSM.16.MT88.4, kM / 16 per step) and, in the
    innermost HGMMA loop, a wgmma wait of depth 1 (the exponentials of P^T under dP^T; not
    in the dV pass, which has no dP^T). The plain one-pass kernels' loop holds the 5 GEMMs
    of the tile: 2 x D/16 (S^T, dP^T) + 2 x 64/16 (dV, dK) + 4 x D/64 (dQ) HGMMAs, one
    MUFU.EX2 per score element, one bar.arrive (to the writer) per 64-column chunk of dQ
    and no UBLKRED (the writer's), and at most the
    recorded instructions per score element; D = 256's passes: S^T + dV, and S^T + dP^T +
    dK + dQ."""
    if "90a" not in _archs():
        pytest.skip("RECON_CUDA_ARCHS has no sm_90a target")
    reports = _ptxas_reports(os.path.dirname(cuda_build))
    funcs = {n: b for n, b in _sass_functions(cuda_build, "90a").items() if "attn_bwd_sm90" in n}
    assert len(funcs) == KERNELS["attn_bwd_sm90_kernel"], sorted(funcs)
    for name, body in funcs.items():
        rep = reports[(name, "sm_90a")]
        assert rep["spill_st"] == 0 and rep["spill_ld"] == 0 and rep["stack"] == 0, (name, rep)
        m = re.search(r"kernelI(6__half|13__nv_bfloat16)Li(\d+)ELb(\d)ELb(\d)ELi(\d)E", name)
        assert m, name
        d, masked, drop, npass = (
            int(m.group(2)),
            m.group(3) == "1",
            m.group(4) == "1",
            int(m.group(5)),
        )
        assert (npass == 0) == (d <= 128), name
        pats = [r"\bHGMMA\.64x\d+x16\.F32", r"\bUTMALDG\.4D\b", r"\bUSETMAXREG\.TRY"]
        pats += [r"\bUSETMAXREG\.DEALLOC"] + ([r"\bUBLKRED\.G\.S\.ADD\.F32"] if npass != 1 else [])
        for pat in pats:
            assert re.search(pat, body), f"{name}: no {pat}"
        assert not re.search(r"\bRED(G|UX)?\.[^;]*F32", body), (
            f"{name}: per-element float reductions"
        )
        if npass != 1:  # deterministic=True: the turn of each dQ tile (spin, then pass it on)
            assert re.search(r"\bLDG\.E\.STRONG\.GPU\b", body), f"{name}: no ld.acquire.gpu"
            assert re.search(r"\bNANOSLEEP\b", body), f"{name}: no backoff in the spin"
            turns = re.findall(r"\bREDG\.E\.ADD\.S32\.STRONG\.GPU\b", body)
            consumers = 2 if d <= 64 else 1  # (the writer's loop over them unrolled)
            assert len(turns) == consumers, f"{name}: {len(turns)} red.release.gpu"
        loop = _innermost_mma_loop(body, r"\bHGMMA\.")
        if npass != 1:  # (the dV pass has no dP^T to overlap)
            assert any(re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1\b", t) for t in loop), name
        if masked or drop:
            continue
        hgmma = [t for t in loop if re.search(r"\bHGMMA\.", t)]
        want = {
            0: 2 * (d // 16) + 2 * 4 + 4 * (d // 64),
            1: d // 16 + 4,
            2: 2 * (d // 16) + 4 + 4 * (d // 64),
        }
        assert len(hgmma) == want[npass], (name, len(hgmma))
        ex2 = sum(bool(re.search(r"\bMUFU\.EX2\b", t)) for t in loop)
        assert ex2 == 32, (name, ex2)  # 64 keys x 64 queries / 128 threads
        if npass != 1:  # the dQ chunks go to the writer warp: one bar.arrive each
            red = sum(bool(re.search(r"\bUBLKRED\.", t)) for t in loop)
            assert red == 0, (name, red)  # (issued by the writer warp, outside this loop)
            arv = sum(bool(re.search(r"\bBAR\.ARV\b", t)) for t in loop)
            assert arv == d // 64, (name, arv)
            stsm = sum(bool(re.search(r"\bSTSM\.16\.MT88\.4\b", t)) for t in loop)
            assert stsm == 4, (name, stsm)  # 64 queries / 16
        assert len(loop) / 32 <= SM90_BWD_LOOP[(d, npass)], (name, len(loop) / 32)
