"""Static SASS checks of the Triton kernels for Hopper (sm_90a), no GPU needed.

benchmarks/sass_report.py compiles a representative subset of the configs the autotuner
picks first (a subprocess without the interpreter) and these tests fail on a regression:

* no spills (the backward: none inside a loop, at most BWD_SAVE_BYTES around its two
  loops), tensor-core instructions, shared memory within the sm_90 limit;
* attention: no work replicated across warpgroups (HGMMA per main-loop iteration equals
  the tile's ideal, HGMMA work ratio 1.0, MUFU.EX2 per score element 1 in the backward,
  1 + 4 / BN in the forward (the per-row rescale), times D_SPLIT); the fused
  atomic-dQ backward: the ideal of its 5 GEMMs, each dQ element added once per iteration
  by vectorised (F32x4) atomics;
* GEMM: the main loop keeps at least one wgmma group in flight (wait depth >= 1) and reads
  A and B through TMA (RECON_GEMM_TMA=auto).

Under the installed triton and, where its venv exists ($RECON_TRITON_VENV or
~/.cache/recon-kernels/venv-triton3.6; ``sass_report.py --triton-venv --create-venv``
makes it), under triton 3.6, the GPU image's version. The full sweep is the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

# first choices (rank 0) of the kernels the models launch most, one per head-dim bucket
# and mask variant: ~15 compiles, ~1 minute per triton version on 2 cores
ATTN_FILTERS = [
    "fwd bf16 D=128 causal=0 kpm=0 mask=0 drop=0",
    "fwd bf16 D=128 causal=1 kpm=0 mask=0 drop=0",
    "fwd fp16 D=64 causal=1 kpm=0 mask=0 drop=0",
    "fwd bf16 D=256 causal=0 kpm=0 mask=1 drop=0",
    "fwd bf16 D=256 causal=1 kpm=0 mask=0 drop=1",
    # D = 256 through descriptors (auto): 128 x 64, rows split over the two warpgroups
    "fwd bf16 D=256 causal=0 kpm=0 mask=0 drop=0",
    "fwd fp16 D=256 causal=0 kpm=1 mask=0 drop=0",
    # RECON_ATTN_FWD_MASKED=wide: 128 x 64 with the general mask or dropout at D = 128
    "fwd bf16 D=128 causal=0 kpm=0 mask=1 drop=0",
    "fwd bf16 D=128 causal=0 kpm=1 mask=0 drop=1",
    # BERT: key padding at D = 64 (the full blocks before the first padding key unmasked)
    "fwd bf16 D=64 causal=0 kpm=1 mask=0 drop=0",
    "fwd bf16 D=128 causal=0 kpm=1 mask=0 drop=0",
    "dkdv bf16 D=128 causal=0 kpm=0 mask=0 drop=0",
    "dkdv bf16 D=64 causal=1 kpm=0 mask=0 drop=1",
    "dkdv bf16 D=256 causal=0 kpm=1 mask=0 drop=0",
    "dq bf16 D=128 causal=0 kpm=0 mask=0 drop=0",
    "dq bf16 D=64 causal=0 kpm=1 mask=0 drop=1",
    "dq bf16 D=256 causal=1 kpm=0 mask=0 drop=0",
    # the fused atomic-dQ backward (deterministic=False): 5 GEMMs per tile
    "atomic bf16 D=128 causal=0 kpm=0 mask=0 drop=0",
    "atomic bf16 D=64 causal=1 kpm=0 mask=0 drop=1",
    "atomic fp16 D=64 causal=0 kpm=0 mask=1 drop=0",
    "atomic bf16 D=256 causal=0 kpm=1 mask=0 drop=1",
]
ATOMIC_FILTERS = [f for f in ATTN_FILTERS if f.startswith("atomic")]
GEMM_FILTERS = [
    "gemm mlp_fwd_gemm1_bias_gelu_h bf16",  # K-contiguous B: triton 3.6 serialised it
    "gemm mlp_bwd_dh_dact_db1 bf16",
    "gemm mlp_bwd_dh_dact_db1_store bf16",  # RECON_MLP_DW2=store (default): + act(h) store
    "gemm mlp_bwd_dw2_act_prologue bf16",
    "gemm lora_fwd_main_bias bf16",
]


def _venv_python() -> str | None:
    from sass_report import DEFAULT_VENV

    py = os.path.join(DEFAULT_VENV, "bin", "python")
    return py if os.path.exists(py) else None


PYTHONS = [pytest.param(sys.executable, id="installed")]
_py36 = _venv_python()
PYTHONS.append(
    pytest.param(
        _py36,
        id="triton-venv",
        marks=pytest.mark.skipif(
            _py36 is None,
            reason="no triton 3.6 venv ($RECON_TRITON_VENV or ~/.cache/recon-kernels/"
            "venv-triton3.6; make it with sass_report.py --triton-venv --create-venv)",
        ),
    )
)


@pytest.fixture(scope="module", params=PYTHONS)
def report(request, tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("sass") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # the report must describe the default kernels, whatever the caller's switches
    env = {k: v for k, v in env.items() if not k.startswith("RECON_") or k == "RECON_TRITON_VENV"}
    filters = [a for f in ATTN_FILTERS + GEMM_FILTERS for a in ("--filter", f)]
    proc = subprocess.run(
        [
            request.param,
            os.path.join(ROOT, "benchmarks", "sass_report.py"),
            "--first-only",
            "--quiet",
            "--json",
            str(out),
            *filters,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    ver = rows[0]["_meta"]["triton"]
    return [{**r, "triton": ver} for r in rows if "case" in r]


def _pick(rows, filt):
    words = set(filt.split())
    got = [r for r in rows if words <= set(r["case"].split())]
    assert got, f"no compiled case for {filt!r}"
    return got


def test_every_selected_kernel_compiled(report):
    for f in ATTN_FILTERS + GEMM_FILTERS:
        _pick(report, f)
    for r in report:
        assert "error" not in r, f"{r['case']}: {r.get('error')}"


# The backward's two loops (RECON_ATTN_BWD_FAST=1: the interior blocks, then the tested
# rest): ptxas may save a few prologue registers (output addresses) around the interior
# loop, at most 56 bytes for the first choices (triton 3.9, D = 128 atomic), a one-time
# cost per program. None inside a loop (the sweep, benchmarks/results/static-sm90: none in
# any first choice; one STL/LDL in the loop of the 3.6 D = 256 dK/dV rank-1 32 x 64 tile).
BWD_SAVE_BYTES = 64


def test_no_spills_and_tensor_cores(report):
    for r in report:
        assert r["loop_spills"] == 0, f"{r['case']}: {r['loop_spills']} spill instructions in loops"
        bound = BWD_SAVE_BYTES if r.get("kernel") in ("dkdv", "dq", "atomic") else 0
        assert r["spill_bytes"] <= bound, (
            f"{r['case']}: {r['spill_bytes']} spill bytes, expected <= {bound}"
        )
        assert r["tensor_core"], f"{r['case']}: no HGMMA/HMMA instruction"
        assert r["smem"] <= 227 * 1024, f"{r['case']}: {r['smem']} B shared memory > 227 KiB"


# D = 256: the forward with descriptor loads has tiles that both split their rows and fit
# (see attention._pruner), and the backward splits each tile's gradient columns over two
# programs (D_SPLIT = 2)
SPLIT_FILTERS = list(ATTN_FILTERS)


@pytest.mark.parametrize("filt", SPLIT_FILTERS)
def test_attention_no_replicated_work(report, filt):
    """D <= 128, the D = 256 forward through descriptors and the D = 256 backward with
    D_SPLIT = 2, whose two programs per tile both compute the scores: 2 MUFU.EX2 per score
    element by design, none replicated between a program's warpgroups."""
    (r,) = _pick(report, filt)
    ds = r.get("d_split", 1)
    if r["D"] == 256 and r["kernel"] != "fwd":
        assert ds == 2, f"{r['case']}: expected D_SPLIT = 2 at D = 256 (bwd_d_split auto)"
    assert r["hgmma_per_iter"] == r["hgmma_ideal"], (
        f"{r['case']}: expected the tile's ideal {r['hgmma_ideal']} HGMMA per iteration, "
        f"got {r['hgmma_per_iter']}"
    )
    assert r["mma_work_ratio"] == pytest.approx(1.0), (
        f"{r['case']}: tensor-core work ratio expected 1.0, got {r['mma_work_ratio']}"
    )
    # One exp2 per score element (per program: D_SPLIT of them); the forward adds the
    # online-softmax rescale, one exp2 per row and iteration for a thread that holds BN / 4
    # columns of the row in the wgmma accumulator layout: 1 + 4 / BN (1.125 at BN = 32).
    # Rows replicated between warpgroups show as 2x this.
    want = ds * (1.0 + 4.0 / r["BN"] if r["kernel"] == "fwd" else 1.0)
    assert r["ex2_per_elem"] <= want + 1e-3, (
        f"{r['case']}: expected <= {want:.3f} MUFU.EX2 per score element, got {r['ex2_per_elem']}"
    )


# The D = 256 backward with D_SPLIT = 2 (default): first-choice tile and the most SASS
# instructions per score element (both programs) per triton minor version. Measured
# 57.62 / 47.12 (dK/dV), 41.0 / 36.06 (dQ), 145.5 / 131.25 (atomic, dropout); before
# (D_SPLIT = 1: 32 x 32 mma.sync, rows replicated) 103.25 / 99, 50.69 / 36.81 (64 x 64,
# work 1.67), and 141.75 / 138.75 for the atomic kernel without dropout.
BWD256 = {
    "dkdv bf16 D=256 causal=0 kpm=1 mask=0 drop=0": ((32, 128, 8), {"3.9": 58.0, "3.6": 47.5}),
    "dq bf16 D=256 causal=1 kpm=0 mask=0 drop=0": ((128, 64, 8), {"3.9": 41.5, "3.6": 36.5}),
    "atomic bf16 D=256 causal=0 kpm=1 mask=0 drop=1": ((16, 128, 8), {"3.9": 146.0, "3.6": 132.0}),
}


@pytest.mark.parametrize("filt", list(BWD256))
def test_attention_bwd_d256_split_loop(report, filt):
    (r,) = _pick(report, filt)
    tile, bounds = BWD256[filt]
    ver = ".".join(r["triton"].split(".")[:2])
    assert (r["BM"], r["BN"], r["warps"]) == tile, f"{r['case']}: expected the {tile} tile"
    assert r.get("d_split") == 2 and r["hmma_per_iter"] == 0, r["case"]
    bound = bounds.get(ver, max(bounds.values()))
    assert r["instr_per_elem"] <= bound, (
        f"{r['case']} (triton {r['triton']}): {r['instr_per_elem']} SASS instructions per "
        f"score element, expected <= {bound}"
    )


# The steady forward loop at the default switches (RECON_ATTN_FWD_TMA=auto: device-side
# descriptors at D = 128, RECON_ATTN_FWD_BN=128): the first-choice tile and the most SASS
# instructions per score element it may issue per thread, per triton minor version
# (measured: D = 128 7.97 / 7.48, D = 64 7.27 / 6.95 under 3.9 / 3.6; host-side descriptors
# at D = 128 8.12 / 7.67; FlashAttention-3 6.75, Triton tutorial 06 7.7-9.7).
FWD_LOOP = {
    "fwd bf16 D=128 causal=0 kpm=0 mask=0 drop=0": ((128, 128), {"3.9": 8.0, "3.6": 7.5}),
    "fwd bf16 D=128 causal=1 kpm=0 mask=0 drop=0": ((128, 128), {"3.9": 8.0, "3.6": 7.5}),
    "fwd fp16 D=64 causal=1 kpm=0 mask=0 drop=0": ((128, 128), {"3.9": 7.35, "3.6": 7.05}),
    # the loop of the all-real key blocks: the unmasked one (was 10.88 / 10.34 with the
    # per-key test on every block; measured 7.33 / 7.02)
    "fwd bf16 D=64 causal=0 kpm=1 mask=0 drop=0": ((128, 128), {"3.9": 7.4, "3.6": 7.1}),
    # D = 128 with key padding: device descriptors and 128 x 128 as without it (was the
    # cp.async 128 x 64, 11.22 / 10.5)
    "fwd bf16 D=128 causal=0 kpm=1 mask=0 drop=0": ((128, 128), {"3.9": 8.0, "3.6": 7.5}),
    # D = 256 with descriptors: 128 x 64 on 8 warps (measured 14.25 / 13.62, key padding
    # 14.25 / 13.72; the pointer loop's 64 x 32 with replicated rows: 51.75 / 40.75)
    "fwd bf16 D=256 causal=0 kpm=0 mask=0 drop=0": ((128, 64), {"3.9": 14.3, "3.6": 13.7}),
    "fwd fp16 D=256 causal=0 kpm=1 mask=0 drop=0": ((128, 64), {"3.9": 14.3, "3.6": 13.8}),
    # descriptors with a general mask (measured 18.97 / 20.97) and with dropout (128 x 32:
    # 38.62 / 36.94); the pointer loop's 64 x 32 with rows replicated: 62.25 / 50.5, 83.25 / 70
    "fwd bf16 D=256 causal=0 kpm=0 mask=1 drop=0": ((128, 64), {"3.9": 19.0, "3.6": 21.0}),
    "fwd bf16 D=256 causal=1 kpm=0 mask=0 drop=1": ((128, 32), {"3.9": 38.7, "3.6": 37.0}),
}


@pytest.mark.parametrize("filt", list(FWD_LOOP))
def test_attention_fwd_loop_instructions(report, filt):
    """The forward's steady loop: the 128 x 128 tile, at most the bound's instructions per
    score element, and at D = 128, 256 the K/V tiles loaded by TMA (UTMALDG, device descriptors);
    a regression of the tile order, the descriptor path or the loop body fails here."""
    (r,) = _pick(report, filt)
    tile, bounds = FWD_LOOP[filt]
    ver = ".".join(r["triton"].split(".")[:2])
    assert (r["BM"], r["BN"]) == tile, f"{r['case']}: expected the {tile} tile first"
    bound = bounds.get(ver, max(bounds.values()))
    assert r["instr_per_elem"] <= bound, (
        f"{r['case']} (triton {r['triton']}): {r['instr_per_elem']} SASS instructions per "
        f"score element in the steady loop, expected <= {bound}"
    )
    if r["D"] >= 128:
        assert r["tma"] > 0, f"{r['case']}: expected UTMALDG (RECON_ATTN_FWD_TMA=auto)"
    else:
        assert r["tma"] == 0, f"{r['case']}: TMA is only the default at BLOCK_D = 128, 256"


@pytest.mark.parametrize("filt", ATOMIC_FILTERS)
def test_atomic_backward_five_gemms_and_vector_atomics(report, filt):
    """The fused backward's loop: 5 GEMMs' worth of tensor-core work (the dots of
    sass_report.attention_dots: S, dP, dV, dK, dQᵀ; the two-kernel path has 7), and the
    dQᵀ tile (D x BLOCK_M) added once per iteration as REDG.E.ADD.F32x4."""
    from sass_report import attention_dots

    (r,) = _pick(report, filt)
    g = r["D"] // r.get("d_split", 1)  # the program's dQ columns
    dots = attention_dots("atomic", r["BM"], r["BN"], r["D"], r.get("d_split", 1))
    assert len(dots) == 5 and dots[-1] == (g, r["BM"], r["BN"])
    threads = 32 * r["warps"]
    assert r["red_elems_per_iter"] * threads == g * r["BM"], (
        f"{r['case']}: expected {g} x {r['BM']} dQ elements added per iteration, got "
        f"{r['red_elems_per_iter']} per thread x {threads} threads"
    )
    assert r["red_per_iter"] * 4 == r["red_elems_per_iter"], (
        f"{r['case']}: expected F32x4 atomics, got {r['red_per_iter']} instructions for "
        f"{r['red_elems_per_iter']} elements"
    )
    assert r["hgmma_per_iter"] == r["hgmma_ideal"] and r["hmma_per_iter"] == 0


def test_atomic_backward_does_five_gemms_of_work(report):
    """D = 128, the same flags: the tensor-core MACs per score element in the SASS loops are
    5 D for the fused kernel, 7 D for the two-kernel path (dK/dV 4 D + dQ 3 D)."""
    from sass_report import attention_dots

    flags = "bf16 D=128 causal=0 kpm=0 mask=0 drop=0"
    macs = {}
    for kern in ("atomic", "dkdv", "dq"):
        (r,) = _pick(report, f"{kern} {flags}")
        work = sum(m * n * k for m, n, k in attention_dots(kern, r["BM"], r["BN"], r["D"]))
        macs[kern] = r["mma_work_ratio"] * work / (r["BM"] * r["BN"])
    assert macs["atomic"] == pytest.approx(5 * 128), macs
    assert macs["dkdv"] + macs["dq"] == pytest.approx(7 * 128), macs


@pytest.mark.parametrize("filt", GEMM_FILTERS)
def test_gemm_keeps_wgmma_in_flight(report, filt):
    (r,) = _pick(report, filt)
    assert r["hgmma_per_iter"] == r["hgmma_ideal"], (
        f"{r['case']}: expected {r['hgmma_ideal']} HGMMA per K step, got {r['hgmma_per_iter']}"
    )
    assert r["wait_depth"] is not None and r["wait_depth"] >= 1, (
        f"{r['case']}: expected wgmma wait depth >= 1 in the K loop, got {r['wait_depth']} "
        "(0 serialises the tensor cores)"
    )


@pytest.mark.parametrize("filt", GEMM_FILTERS)
def test_gemm_reads_operands_through_tma(report, filt):
    """RECON_GEMM_TMA=auto (the default): A and B through host-side descriptors (UTMALDG),
    which keeps the K loop short (85-90 SASS instructions at 128 x 256 against 127-163 with
    cp.async pointers; the activation prologue adds its math)."""
    (r,) = _pick(report, filt)
    assert r["tma"] > 0, f"{r['case']}: no TMA instruction (RECON_GEMM_TMA=auto should use it)"
    limit = 1300 if "prologue" in filt else 100
    assert r["loop_instrs"] <= limit, f"{r['case']}: {r['loop_instrs']} instructions in the K loop"


def test_sass_parser_on_a_known_loop():
    """The loop finder and counters on a hand-written SASS fragment."""
    from sass_report import sass_metrics

    sass = "\n".join(
        [
            "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
            "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ ;",
            "        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;",
            "        /*0030*/                   MUFU.EX2 R4, R4 ;",
            "        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR24] ;",
            "        /*0050*/              @!P2 BRA 0x10 ;",
            "        /*0060*/                   EXIT ;",
            "        /*0070*/                   BRA 0x70;",
        ]
    )
    m = sass_metrics(sass)
    assert m["loops"] == 1
    main = m["main"]
    assert (main["instrs"], main["hgmma"], main["ex2"], main["wait_depth"]) == (5, 2, 1, 1)
    assert main["mma_work"] == 64 * 64 * 16 + 64 * 128 * 16


def _first(kind, d, mode, monkeypatch, **flags):
    from recon_kernels.triton import attention as A

    monkeypatch.setenv("RECON_ATTN_TILES", mode)
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "1")
    named = dict(NQ=4096, NK=4096, BLOCK_D=d, HAS_MASK=False, HAS_KPM=False, DROPOUT=False)
    named.update(flags)
    kept = A._pruner(kind)(A._configs(kind, interpret=False), named)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "flags",
    [{}, {"HAS_MASK": True}, {"HAS_KPM": True, "DROPOUT": True}],
    ids=["plain", "mask", "kpm-drop"],
)
def test_split_tiles_never_replicate(kind, d, flags, monkeypatch):
    """RECON_ATTN_TILES=split (the default): every config the autotuner may pick splits its
    MMA rows over the warpgroups (D <= 128; D = 256 dK/dV has no such tile that fits)."""
    from recon_kernels.triton.attention import splits_rows

    kept = _first(kind, d, "split", monkeypatch, **flags)
    assert kept
    for bm, bn, w, _ in kept:
        assert splits_rows(kind, bm, bn, w), f"{kind} D={d} {flags}: {bm}x{bn}/{w}w replicates"


@pytest.mark.parametrize("kind", ["dkdv", "dq", "atomic"])
@pytest.mark.parametrize(
    "flags",
    [{}, {"HAS_MASK": True}, {"HAS_KPM": True, "DROPOUT": True}],
    ids=["plain", "mask", "kpm-drop"],
)
def test_backward_d256_split_tiles(kind, flags, monkeypatch):
    """D_SPLIT = 2 (the default at BLOCK_D = 256): the pruner takes its own tiles in their
    order, each splitting its rows over the warpgroups; with a mask or dropout the
    single-stage dK/dV and atomic tiles (which spill there under 3.9) are skipped."""
    from recon_kernels.triton.attention import splits_rows

    kept = _first(kind, 256, "split", monkeypatch, D_SPLIT=2, **flags)
    masked = bool(flags)
    want = {
        "dkdv": (32, 64, 4, 2) if masked else (32, 128, 8, 1),
        "dq": (128, 64, 8, 1),
        "atomic": (16, 128, 8, 2),
    }[kind]
    assert kept[0] == want, kept
    for bm, bn, w, st in kept:
        assert splits_rows(kind, bm, bn, w), f"{kind}: {bm}x{bn}/{w}w replicates"
        assert not (masked and kind != "dq" and st == 1), kept
    # D_SPLIT = 1 never sees the D_SPLIT tiles it does not share
    plain = _first(kind, 128, "split", monkeypatch, **flags)
    assert (16, 128, 8, 1) not in plain and (32, 128, 8, 1) not in plain


def test_tile_switch_first_choices(monkeypatch):
    """The A/B switch: split picks the tiles the static sweep found clean, legacy the old."""
    assert _first("dkdv", 128, "split", monkeypatch)[0] == (32, 128, 8, 2)
    assert _first("dkdv", 64, "split", monkeypatch)[0] == (64, 128, 8, 2)
    assert _first("dq", 128, "split", monkeypatch)[0] == (128, 64, 8, 2)
    assert _first("dkdv", 128, "legacy", monkeypatch)[0] == (64, 64, 8, 2)
    assert _first("dq", 128, "legacy", monkeypatch)[0] == (64, 128, 8, 2)
    monkeypatch.setenv("RECON_ATTN_TILES", "bogus")
    from recon_kernels.triton.attention import tile_mode

    with pytest.raises(ValueError, match="RECON_ATTN_TILES: expected one of"):
        tile_mode()


@pytest.mark.parametrize("chunk_all", ["0", "1"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_chunk_all_switch_matches_reference(chunk_all, dtype, monkeypatch):
    """RECON_GEMM_CHUNK_ALL both ways in the interpreter: a light (bias) and a heavy
    (bias + gelu, stored twice) epilogue on a tile wide enough to be chunked."""
    import torch

    from recon_kernels.triton import _gemm as G

    if not G.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from conftest import assert_rule

    monkeypatch.setenv("RECON_GEMM_CHUNK_ALL", chunk_all)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    a = torch.randn(37, 40, dtype=dt)
    w = torch.randn(70, 40, dtype=dt)
    bias = torch.randn(70, dtype=dt)

    def ref(a, w, bias):
        return a @ w.t() + bias

    out = torch.empty(37, 70, dtype=dt)
    G.gemm(a, w.t(), out, bias=bias)
    lowp = ref(a, w, bias) if dt != torch.float32 else None
    assert_rule("bias", out, ref(a.double(), w.double(), bias.double()), lowp, dt)
    h, act = torch.empty_like(out), torch.empty_like(out)
    G.gemm(a, w.t(), h, bias=bias, act="gelu", c2=act)
    ref64 = ref(a.double(), w.double(), bias.double())
    gelu = torch.nn.functional.gelu
    lowp_act = gelu(ref(a, w, bias)) if dt != torch.float32 else None
    assert_rule("h", h, ref64, lowp, dt)
    assert_rule("act(h)", act, gelu(ref64), lowp_act, dt)


def test_gemm_chunk_all_rejects_bad_value(monkeypatch):
    from recon_kernels.triton import _gemm as G

    monkeypatch.setenv("RECON_GEMM_CHUNK_ALL", "yes")
    with pytest.raises(ValueError, match="RECON_GEMM_CHUNK_ALL: expected 0 or 1, got 'yes'"):
        G.chunk_all()


@pytest.mark.parametrize("mode", ["none", "causal", "kpm", "mask"])
@pytest.mark.parametrize("shape", [(1, 2, 17, 100, 64), (2, 1, 100, 17, 40)], ids=["pow2", "odd"])
def test_attention_legacy_forward_switch_matches_reference(mode, shape, monkeypatch):
    """RECON_ATTN_FWD=legacy (the non-default forward loop) in the interpreter: output and
    every gradient against the float64 reference, power-of-two and odd head dims."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import _check_kernel

    monkeypatch.setenv("RECON_ATTN_FWD", "legacy")
    _check_kernel("triton", "cpu", torch.bfloat16, shape, mode)


def test_attention_fwd_switch_rejects_bad_value(monkeypatch):
    from recon_kernels.triton import attention as A

    monkeypatch.setenv("RECON_ATTN_FWD", "turbo")
    with pytest.raises(ValueError, match="RECON_ATTN_FWD: expected one of"):
        A.fwd_mode()


@pytest.mark.parametrize("mode,tile", [("wide", (128, 64)), ("narrow", (128, 32))])
@pytest.mark.parametrize("mask_mode", ["mask", "dropout"])
def test_attention_fwd_masked_tiles_switch(mode, tile, mask_mode, monkeypatch):
    """RECON_ATTN_FWD_MASKED: the fast forward with a general mask or dropout at D = 128
    takes 128 x 64 ("wide", default) or the previous 128 x 32 ("narrow"); and the GPU's
    first-choice tile, run in the interpreter, matches the float64 reference (mask and
    key padding with fully masked rows; dropout with key padding), every gradient."""
    import torch

    from recon_kernels.triton import attention as A

    monkeypatch.setenv("RECON_ATTN_FWD_MASKED", mode)
    flag = {"mask": {"HAS_MASK": True}, "dropout": {"DROPOUT": True}}[mask_mode]
    assert _first("fwd", 128, "split", monkeypatch, FAST=True, **flag)[0][:2] == tile
    # the slow loop (negative scale, RECON_ATTN_FWD=legacy) keeps the narrow tiles
    assert _first("fwd", 128, "split", monkeypatch, FAST=False, **flag)[0][:2] == (128, 32)
    if not A.INTERPRET:
        return
    from test_attention import _check_kernel, test_dropout_matches_reference

    kern = A._attn_fwd_kernel
    monkeypatch.setattr(kern, "configs", A._configs("fwd", interpret=False))
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "0")
    shape = (2, 1, 130, 130, 128)  # batch 0 all padding, batch 1 not
    if mask_mode == "mask":
        _check_kernel("triton", "cpu", torch.bfloat16, shape, "mask_kpm")
    else:
        test_dropout_matches_reference("triton", "cpu", torch.bfloat16, (shape, "causal_kpm", 0.3))
    used = kern.best_config
    assert (used.kwargs["BLOCK_M"], used.kwargs["BLOCK_N"]) == tile


TMA_SHAPES = [
    (2, 1, 17, 100, 40),
    (2, 2, 100, 17, 72),
    (2, 1, 1, 1, 40),
    (1, 2, 17, 100, 128),
    (1, 1, 17, 100, 200),
]


# auto is off below BLOCK_D = 128, so it runs on the D = 128, 200 (-> 256) shapes only (the
# off cases cover the others)
TMA_CASES = [
    (tma, mode, shape)
    for tma in ("host", "device", "off", "auto")
    for mode in ("none", "causal", "mask_kpm", "causal_kpm")
    for shape in TMA_SHAPES
    if tma != "auto" or shape[-1] > 64
]


@pytest.mark.parametrize(
    "tma,mode,shape", TMA_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c
)
def test_attention_fwd_tma_switch_matches_reference(tma, mode, shape, monkeypatch):
    """RECON_ATTN_FWD_TMA in the interpreter (which emulates tensor descriptors): output and
    every gradient vs the float64 reference under the 2x rule, odd Nq/Nk (1, 17, 100) and
    head dims (40, 72, 200: the descriptor's zero fill pads them to 64, 128, 256), fully masked rows
    (batch 0 all padding, a mask row that sees nothing): O = 0 and lse = +inf there; and
    the launch really took descriptors where the mode says so."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import _check_kernel, _inputs, _masks

    monkeypatch.setenv("RECON_ATTN_FWD_TMA", tma)
    used = []
    real = A._tma_ok
    monkeypatch.setattr(A, "_tma_ok", lambda *t: used.append(real(*t)) or used[-1])
    _check_kernel("triton", "cpu", torch.bfloat16, shape, mode)
    # auto: device descriptors at BLOCK_D = 128 without a general mask (key padding
    # included), at BLOCK_D = 256 always
    block = A._block_d(shape[-1])
    want = tma in ("host", "device") or (
        tma == "auto" and (block == 256 or (block == 128 and "mask" not in mode))
    )
    if want:
        assert used and all(used), f"{tma} {mode}: descriptors not used ({used})"
    else:
        assert not used, f"{tma} {mode}: descriptors asked for ({used})"
    if "kpm" in mode:  # batch 0 is all padding
        B, H, NQ, NK, D = shape
        q, k, v, _ = (t.to(torch.bfloat16) for t in _inputs(B, H, NQ, NK, D))
        mask, kpm, causal = _masks(mode, B, H, NQ, NK)
        out, lse = A.attention_fwd(q, k, v, mask, kpm, D**-0.5, causal)
        assert torch.all(out[0] == 0) and torch.all(lse[0] == float("inf"))
        if B > 1 and NQ > 1:  # (1 x 1 with a mask: no key left anywhere)
            assert torch.isfinite(lse[1]).any()


@pytest.mark.parametrize("tma", ["host", "device"])
def test_attention_fwd_tma_dropout_matches_reference(tma, monkeypatch):
    """Dropout through the descriptor loads (RECON_ATTN_FWD_TMA=host / device), key padding."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import test_dropout_matches_reference

    monkeypatch.setenv("RECON_ATTN_FWD_TMA", tma)
    test_dropout_matches_reference(
        "triton", "cpu", torch.bfloat16, ((2, 2, 100, 17, 72), "causal_kpm", 0.5)
    )


@pytest.mark.parametrize("bn", ["128", "64"])
def test_attention_fwd_bn_switch_first_choices(bn, monkeypatch):
    """RECON_ATTN_FWD_BN=128 (default): 128 x 128 on 8 warps first where it does not spill
    (BLOCK_D <= 64; BLOCK_D = 128 with descriptor loads, key padding too), the register
    budget still deciding (key padding at D = 128 with pointer loads keeps 128 x 64); 64:
    the previous order."""
    monkeypatch.setenv("RECON_ATTN_FWD_BN", bn)
    wide = (128, 128, 8, 2) if bn == "128" else (128, 64, 8, 3)
    assert _first("fwd", 64, "split", monkeypatch, FAST=True)[0] == wide
    assert _first("fwd", 128, "split", monkeypatch, FAST=True, TMA=True)[0] == wide
    assert _first("fwd", 128, "split", monkeypatch, FAST=True)[0] == (128, 64, 8, 3)
    kpm = dict(FAST=True, TMA=True, HAS_KPM=True)
    assert _first("fwd", 128, "split", monkeypatch, **kpm)[0] == wide
    kpm_pointers = dict(FAST=True, HAS_KPM=True)
    assert _first("fwd", 128, "split", monkeypatch, **kpm_pointers)[0] == (128, 64, 8, 3)
    assert _first("fwd", 64, "split", monkeypatch, FAST=False)[0] == (128, 64, 8, 3)


def test_attention_fwd_d256_tiles(monkeypatch):
    """BLOCK_D = 256: with descriptor loads every candidate splits its rows (128 x 64 on 8
    warps first, masks too; 128 x 32 with dropout); with pointer loads or float32 operands
    the legacy 8-warp tiles (rows replicated) as before."""
    import torch

    from recon_kernels.triton.attention import splits_rows

    bf16 = torch.empty(0, dtype=torch.bfloat16)
    for extra in ({}, {"HAS_KPM": True}, {"CAUSAL": True}):
        kept = _first("fwd", 256, "split", monkeypatch, Q=bf16, FAST=True, TMA=True, **extra)
        assert kept[0] == (128, 64, 8, 2), (extra, kept)
        assert all(splits_rows("fwd", bm, bn, w) for bm, bn, w, _ in kept), (extra, kept)
    legacy = (64, 32, 8, 2)
    assert _first("fwd", 256, "split", monkeypatch, Q=bf16, FAST=True)[0] == legacy
    # a general mask: 128 x 64 too; dropout (its hash tiles): 128 x 32 (128 x 64 spills)
    for extra, first in (
        ({"HAS_MASK": True}, (128, 64, 8, 2)),
        ({"HAS_MASK": True, "HAS_KPM": True}, (128, 64, 8, 2)),
        ({"DROPOUT": True}, (128, 32, 8, 3)),
        ({"DROPOUT": True, "HAS_KPM": True, "CAUSAL": True}, (128, 32, 8, 3)),
    ):
        kept = _first("fwd", 256, "split", monkeypatch, Q=bf16, FAST=True, TMA=True, **extra)
        assert kept[0] == first, (extra, kept)
        assert all(splits_rows("fwd", bm, bn, w) for bm, bn, w, _ in kept), (extra, kept)
        if "DROPOUT" in extra:
            assert all(bn <= 32 for _, bn, _, _ in kept), kept
    f32 = torch.empty(0, dtype=torch.float32)
    assert _first("fwd", 256, "split", monkeypatch, Q=f32, FAST=True, TMA=True)[0] == legacy


@pytest.mark.parametrize("d,tile", [(128, (128, 128)), (200, (128, 64))])
def test_attention_fwd_wide_tile_with_tma_matches_reference(d, tile, monkeypatch):
    """The GPU's first choice at D = 128 (128 x 128 with descriptors) and D = 200 (BLOCK_D
    256: 128 x 64, the head dim zero-filled by the descriptors) run in the interpreter: two
    query and key blocks, the second partial, causal and not."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import _check_kernel

    kern = A._attn_fwd_kernel
    monkeypatch.setattr(kern, "configs", A._configs("fwd", interpret=False))
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "0")
    for mode in ("none", "causal"):
        _check_kernel("triton", "cpu", torch.bfloat16, (1, 1, 200, 130, d), mode)
        used = kern.best_config
        assert (used.kwargs["BLOCK_M"], used.kwargs["BLOCK_N"]) == tile


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("mode", ["kpm", "causal"])
def test_attention_bwd_d256_gpu_tiles_match_reference(deterministic, mode, monkeypatch):
    """The GPU's first choices at D = 256 (D_SPLIT = 2: dK/dV 32 x 128 on 8 warps, dQ
    128 x 64, the atomic kernel 16 x 128) run in the interpreter, head dim 200 zero-padded
    to 256 and D = 256 itself: every gradient under the 2x rule, the tiles the ones named."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import _check_kernel

    names = ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") if deterministic else (
        "_attn_bwd_atomic_kernel",
    )  # fmt: skip
    kinds = {"_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
    for name in names:
        kern = getattr(A, name)
        monkeypatch.setattr(kern, "configs", A._configs(kinds.get(name, "atomic"), interpret=False))
        monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv("RECON_ATTN_BWD_DSPLIT", raising=False)
    want = {
        "_attn_bwd_dkdv_kernel": (32, 128, 8),
        "_attn_bwd_dq_kernel": (128, 64, 8),
        "_attn_bwd_atomic_kernel": (16, 128, 8),
    }
    for d in (200, 256):
        # (d = 200: the backward's inputs padded to the block, as on a Hopper GPU)
        monkeypatch.setenv("RECON_ATTN_BWD_PAD_D", "1")
        _check_kernel(
            "triton", "cpu", torch.bfloat16, (1, 1, 130, 150, d), mode, deterministic=deterministic
        )
        for name in names:
            c = getattr(A, name).best_config
            assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == want[name], name


# RECON_ATTN_FWD_WS=1 (D = 128, non-causal): most SASS instructions per score element of a
# consumer warpgroup's loop (measured 7.48 / 7.03 under triton 3.9 / 3.6)
FWD_WS_LOOP = {"3.9": 7.5, "3.6": 7.05}


@pytest.mark.parametrize("python", PYTHONS)
def test_attention_fwd_ws_static(python, tmp_path):
    """RECON_ATTN_FWD_WS=1: the 128 x 128 tile on 4 warps becomes a producer and two
    consumer warpgroups (USETMAXREG, 12 warps launched), each consumer issues its 64-row
    slice's ideal HGMMA count with no spill and fewer instructions per score element than
    the 8-warp loop."""
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = {k: v for k, v in env.items() if not k.startswith("RECON_") or k == "RECON_TRITON_VENV"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", RECON_ATTN_FWD_WS="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    filt = "fwd bf16 D=128 causal=0 kpm=0 mask=0 drop=0"
    proc = subprocess.run(
        [python, os.path.join(ROOT, "benchmarks", "sass_report.py"), "--first-only", "--quiet",
         "--dtypes", "bf16", "--json", str(out), "--filter", filt],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    ver = ".".join(rows[0]["_meta"]["triton"].split(".")[:2])
    (r,) = [r for r in rows if "case" in r]
    assert (r["BM"], r["BN"], r["warps"]) == (128, 128, 4), r["case"]
    assert r["setmaxreg"] and r["mma_warps"] == 8, f"{r['case']}: not warp-specialised"
    assert r["spill_bytes"] == 0 and r["tma"] > 0
    assert r["hgmma_per_iter"] == r["hgmma_ideal"] == 16
    assert r["ex2_per_elem"] <= 1.0 + 4.0 / 128 + 1e-3
    bound = FWD_WS_LOOP.get(ver, max(FWD_WS_LOOP.values()))
    assert r["instr_per_elem"] <= bound, f"{r['case']} (triton {ver}): {r['instr_per_elem']}"


@pytest.mark.parametrize(
    "shape", [(1, 2, 200, 256, 128), (2, 1, 17, 128, 40), (1, 1, 70, 100, 128)]
)
@pytest.mark.parametrize("mode", ["none", "causal"])
def test_attention_fwd_ws_switch_matches_reference(shape, mode, monkeypatch):
    """RECON_ATTN_FWD_WS=1 in the interpreter with the GPU's tiles (the warp-specialised
    128 x 128 first): output and gradients vs the float64 reference under the 2x rule, head
    dim 40 zero-filled to 64 by the descriptors; the launch is warp-specialised only where it
    may be (Nk a multiple of 128, not causal)."""
    import torch

    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    from test_attention import _check_kernel

    kern = A._attn_fwd_kernel
    monkeypatch.setattr(kern, "configs", A._configs("fwd", interpret=False))
    monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("RECON_ATTN_FWD_WS", "1")
    monkeypatch.setenv("RECON_ATTN_FWD_TMA", "device")  # (auto: at BLOCK_D = 128 only)
    seen = []
    real = kern.run
    monkeypatch.setattr(kern, "run", lambda *a, **kw: seen.append(kw["WS"]) or real(*a, **kw))
    _check_kernel("triton", "cpu", torch.bfloat16, shape, mode)
    want = mode == "none" and shape[3] % 128 == 0
    assert seen and all(w == want for w in seen), f"WS launches {seen}, expected {want}"
    if want:
        used = kern.best_config
        assert (used.kwargs["BLOCK_M"], used.kwargs["BLOCK_N"], used.num_warps) == (128, 128, 4)


@pytest.mark.parametrize(
    "var,fn",
    [
        ("RECON_ATTN_FWD_TMA", "fwd_tma_mode"),
        ("RECON_ATTN_FWD_BN", "fwd_bn_mode"),
        ("RECON_ATTN_FWD_WS", "fwd_ws_mode"),
    ],
)
def test_attention_fwd_tma_bn_switches_reject_bad_value(var, fn, monkeypatch):
    from recon_kernels.triton import attention as A

    monkeypatch.setenv(var, "bogus")
    with pytest.raises(ValueError, match=f"{var}: expected one of"):
        getattr(A, fn)()


def test_attention_fwd_masked_switch_rejects_bad_value(monkeypatch):
    from recon_kernels.triton import attention as A

    monkeypatch.setenv("RECON_ATTN_FWD_MASKED", "huge")
    with pytest.raises(ValueError, match="RECON_ATTN_FWD_MASKED: expected one of"):
        A.fwd_masked_mode()


# the opt-in shared memory of one H100 / H200 CTA (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SM90_SMEM = 232448


@pytest.mark.parametrize("python", PYTHONS)
def test_float32_first_tiles_fit_shared_memory(python, tmp_path):
    """float32 inputs: the first tile the pruner keeps for each attention kernel compiles
    within an sm_90 CTA's shared memory, and the pruner's estimate is not below what the
    compiler allocated. (Found on an H200: the pruner sized shared memory for 2-byte
    operands and the float32 128 x 128 forward at D = 72 -> 128 asked for 262168 B.)"""
    pytest.importorskip("triton.backends.nvidia")
    from recon_kernels.triton import attention as A

    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = {k: v for k, v in env.items() if not k.startswith("RECON_") or k == "RECON_TRITON_VENV"}
    env.update(TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    kinds = ("fwd", "dkdv", "dq", "atomic")
    filters = [
        a for k in kinds for a in ("--filter", f"{k} fp32 D=128 causal=0 kpm=0 mask=0 drop=0")
    ]
    proc = subprocess.run(
        [python, os.path.join(ROOT, "benchmarks", "sass_report.py"), "--first-only", "--quiet",
         "--dtypes", "fp32", "--all-configs-for", "none", "--json", str(out), *filters],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in json.loads(out.read_text()) if "case" in r]
    for k in kinds:
        (r,) = _pick(rows, f"{k} fp32 D=128 causal=0 kpm=0 mask=0 drop=0")
        assert "error" not in r, f"{r['case']}: {r.get('error')}"
        assert r["smem"] <= SM90_SMEM, f"{r['case']}: {r['smem']} B shared memory"
        _, est = A._footprint(k, r["BM"], r["BN"], 128, r["stages"], 4)
        assert r["smem"] <= est + 1024, f"{r['case']}: {r['smem']} B > the pruner's {est}"
