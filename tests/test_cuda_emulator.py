"""The CUDA launchers (recon_kernels.cuda) on the CPU emulation build of csrc/: the same
kernel sources compiled for the host with csrc/emulator.h (threads as fibers,
mma.sync/ldmatrix/cp.async from their PTX definitions), called directly with inputs in
NaN-filled guard buffers (an out-of-bounds read turns the result non-finite), against the
float64 reference with the 2x rule: fragment layouts, masks, pipelines, lse, dropout masks,
strided views, and the launchers' own guards. The public ops, autograd and the models run
the same kernels as the "cuda-emu" case of the other test files (conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from conftest import DTYPES, assert_rule

from recon_kernels import cuda as rkcuda
from recon_kernels import reference as R

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

LOW = (torch.float16, torch.bfloat16)


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
    _check_emulated_attention(emu, dtype, case)


# The forward's tiles (FwdCfg): 128 query rows per block (32 per warp) for fp16/bf16 at
# D <= 128, 64 otherwise; 64 keys per tile at D <= 64, else 32 (16 per softmax step at
# D = 128), double-buffered. Nq across 127/128/129/255 (a block of one row, warps with
# no row), Nk 1, 63, 65 (partial and single-key tiles, a second buffer that is half
# empty), causal with Nq != Nk both ways around the 128-row boundary (warps whose rows see
# no key of a tile skip it; blocks whose rows see no key at all), every head-dim bucket.
TILE_CASES = [
    (1, 1, 127, 65, 40, "none"),
    (1, 2, 128, 63, 72, "causal"),
    (2, 1, 129, 1, 128, "kpm"),
    (1, 1, 255, 129, 128, "causal"),
    (1, 1, 129, 255, 72, "causal_mask"),
    (1, 1, 128, 128, 128, "causal"),
    (2, 1, 129, 65, 256, "mask_kpm"),
    (2, 1, 127, 255, 40, "causal_kpm"),
    (1, 1, 255, 63, 256, "causal"),
    (2, 2, 1, 65, 128, "causal"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention_forward_tile_boundaries(emu, dtype, case):
    _check_emulated_attention(emu, dtype, case)


SM90_KERNEL = "attention_fwd_sm90"
SM90_BWD_KERNEL = "attention_bwd_sm90"


@contextlib.contextmanager
def _fwd_path(emu, monkeypatch, path, kernel=SM90_KERNEL, var="RECON_CUDA_ATTN_FWD", expect=None):
    """var=path for the block; checks that the sm_90a kernel ran exactly when asked for
    (expect: whether it should, default path == "sm90"; the emulator counts launches per
    kernel name)."""
    if monkeypatch is None:
        yield
        return
    monkeypatch.setenv(var, path)
    before = emu.launch_counts().get(kernel, 0)
    yield
    ran = emu.launch_counts().get(kernel, 0) - before
    want = path == "sm90" if expect is None else expect
    assert (ran > 0) == want, f"{kernel} launched {ran} times under {var}={path}"


def _bwd_path(emu, monkeypatch, path, d):
    """The backward likewise (every head dim: D = 256 in two launches, dV then dK + dQ)."""
    return _fwd_path(emu, monkeypatch, path, SM90_BWD_KERNEL, "RECON_CUDA_ATTN_BWD")


# The sm_90a forward's tiles (csrc/attention_fwd_sm90.cu): 128 query rows per block, 64 per
# consumer warpgroup; 128 keys per tile at D <= 128, 64 at D = 256, in a two-stage TMA ring
# (a third tile waits on the "empty" barrier of the first). Nq 64 / 65 (second warpgroup
# without rows / with one), Nk past 2 and 4 tiles, partial tiles, every head-dim bucket
# with D off the bucket (TMA zero fill of columns past D), causal both ways.
SM90_CASES = [
    (1, 1, 65, 383, 128, "causal"),
    (1, 1, 64, 300, 64, "none"),
    (2, 2, 200, 257, 72, "mask_kpm"),
    (2, 1, 130, 200, 256, "causal_kpm"),
    (2, 1, 1, 513, 40, "none"),
    (1, 1, 300, 129, 136, "causal"),
    # the backward's tiles: 128 keys per block at D <= 64 (64 at D = 128), 64-query steps in
    # a two-stage ring (a third step waits on the first one's "empty" barrier); causal with
    # Nq > Nk (key blocks whose first query step starts past 0)
    (1, 1, 257, 100, 128, "causal"),
    (2, 1, 190, 65, 64, "causal_kpm"),
    (1, 2, 70, 200, 40, "mask"),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    "case", ATTN_CASES + TILE_CASES + SM90_CASES, ids=lambda c: "x".join(map(str, c))
)
def test_emulated_sm90_forward_matches_reference(emu, monkeypatch, dtype, case):
    """The sm_90a forward and backward (wgmma, TMA, mbarriers, warp specialisation, float
    atomics for dQ, in the emulator's PTX models) under the same oracle as the portable
    ones."""
    _check_emulated_attention(emu, dtype, case, monkeypatch, "sm90")


# Lazy rescaling of both forwards (RECON_CUDA_ATTN_LAZY): keys that grow along the
# sequence (up to 7x) make the row maxima outgrow the kept shifts by more than 2^15 over the
# key tiles, so rows both keep a stale shift (probabilities up to 2^lazy: past 2^16 the fp16
# P would overflow) and move it (O rescaled), side by side in a warp; 0 = move on any
# growth. Every head-dim bucket, masks with fully masked rows, a partial last tile.
LAZY_CASES = [
    (1, 2, 130, 513, 64, "none"),
    (2, 1, 65, 300, 128, "causal_kpm"),
    (1, 1, 70, 200, 256, "mask"),
]
LAZY_KERNELS = [("sm80", d) for d in DTYPES] + [("sm90", d) for d in LOW]


@pytest.mark.parametrize("lazy", ["0", "8", "15"])
@pytest.mark.parametrize("path,dtype", LAZY_KERNELS, ids=lambda x: str(x))
@pytest.mark.parametrize("case", LAZY_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_forward_lazy_rescale(emu, monkeypatch, path, dtype, case, lazy):
    """The lazily rescaled forwards (and the backward from their lse) under the 2x rule."""
    monkeypatch.setenv("RECON_CUDA_ATTN_LAZY", lazy)
    _check_emulated_attention(emu, dtype, case, monkeypatch, path, ramp=6.0)


# RECON_CUDA_ATTN_PINGPONG=1: the sm_90a forward's two consumer warpgroups (D <= 128) take
# turns issuing their GEMMs through named barriers: the attention cases with two consumers
# (odd lengths, an all-padding sequence: no key block, no turn taken; causal rows that see
# no key) and two with many key blocks
PINGPONG_CASES = [c for c in ATTN_CASES if c[4] <= 128] + [
    (2, 1, 70, 300, 72, "causal_kpm"),
    (1, 2, 130, 513, 128, "none"),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", PINGPONG_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_sm90_forward_pingpong(emu, monkeypatch, dtype, case):
    """The pingpong schedule under the 2x rule; the emulator's named barriers fail a run
    whose waits and arrivals do not pair up (a missed hand-over deadlocks, an extra one is
    left open at exit)."""
    monkeypatch.setenv("RECON_CUDA_ATTN_PINGPONG", "1")
    _check_emulated_attention(emu, dtype, case, monkeypatch, "sm90")


@pytest.mark.parametrize("raw", ["2", "yes", ""])
def test_pingpong_switch_is_validated(monkeypatch, raw):
    monkeypatch.setenv("RECON_CUDA_ATTN_PINGPONG", raw)
    with pytest.raises(ValueError, match=r"RECON_CUDA_ATTN_PINGPONG: expected 0 or 1"):
        rkcuda.attention.pingpong()


@pytest.mark.parametrize("raw", ["-1", "16", "x", "nan"])
def test_lazy_rescale_threshold_is_validated(monkeypatch, raw):
    monkeypatch.setenv("RECON_CUDA_ATTN_LAZY", raw)
    with pytest.raises(ValueError, match=r"RECON_CUDA_ATTN_LAZY: expected a number in \[0, 15\]"):
        rkcuda.attention.lazy_log2()


def test_emulated_sm90_forward_choice(emu, monkeypatch):
    """Which forward runs, and why: the emulator's auto is the portable kernel; sm90 takes
    fp16/bf16 with TMA-describable strides and falls back otherwise (fp32, a batch stride of
    0 on an expanded tensor), still correct."""
    q, k, v = (_rand(2, 2, 9, 40, seed=i).half() for i in range(3))
    with rkcuda.use_emulator(emu):
        monkeypatch.delenv("RECON_CUDA_ATTN_FWD", raising=False)
        assert rkcuda.attention.fwd_choice(q, k, v).startswith("sm80: the emulator")
        monkeypatch.setenv("RECON_CUDA_ATTN_FWD", "sm80")
        assert rkcuda.attention.fwd_choice(q, k, v).startswith("sm80: path = 1")
        monkeypatch.setenv("RECON_CUDA_ATTN_FWD", "sm90")
        monkeypatch.setenv("RECON_CUDA_ATTN_BWD", "sm90")
        assert rkcuda.attention.fwd_choice(q, k, v) == "sm90"
        assert rkcuda.attention.fwd_choice(q.float(), k.float(), v.float()) == (
            "sm80: dtype is not float16/bfloat16"
        )
        assert rkcuda.attention.bwd_choice(q, k, v, q) == "sm90"
        q2, k2, v2 = (_rand(1, 1, 9, 200, seed=i).half() for i in range(3))
        assert rkcuda.attention.fwd_choice(q2, k2, v2) == "sm90"
        assert rkcuda.attention.bwd_choice(q2, k2, v2, q2) == "sm90"
        kx = k[:1].expand(2, 2, 9, 40)  # batch stride 0 with B = 2: no tensor map
        assert "TMA" in rkcuda.attention.fwd_choice(q, kx, v)
        with _fwd_path(emu, monkeypatch, "sm80"):  # falls back: the sm90 kernel must not run
            monkeypatch.setenv("RECON_CUDA_ATTN_FWD", "sm90")
            out, _ = rkcuda.attention_fwd(q, kx, v, None, None, 0.3, False)
        ref = R.attention(q.double(), kx.double(), v.double(), scale=0.3)
        assert (out.double() - ref).abs().max() < 5e-3
        monkeypatch.setenv("RECON_CUDA_ATTN_FWD", "fast")
        with pytest.raises(ValueError, match="RECON_CUDA_ATTN_FWD: expected one of"):
            rkcuda.attention_fwd(q, k, v, None, None, 0.3, False)


def _check_emulated_attention(emu, dtype, case, monkeypatch=None, path="sm80", ramp=0.0):
    """ramp > 0: key j scaled by 1 + ramp * j / Nk, so row maxima keep growing over the key
    tiles (the online softmax's rescaling)."""
    B, H, NQ, NK, D, mode = case
    q, k, v, do = (
        _rand(*s, seed=i)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    if ramp:
        k = k * (1 + ramp * torch.arange(NK, dtype=torch.float64) / NK)[:, None]
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)  # the kernels also take mask + causal
    scale = D**-0.5
    f = lambda q, k, v: R.attention(q, k, v, mask, kpm, scale, causal)  # noqa: E731
    ref, ref_g = _grad_ref(f, (q, k, v), do)
    # baseline of the 2x rule: eager in the same dtype (float32 eager for float32)
    low, low_g = _grad_ref(f, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    qd, kd, vd, dod = (_guarded(t.to(dtype)) for t in (q, k, v, do))
    with rkcuda.use_emulator(emu):
        with _fwd_path(emu, monkeypatch, path):
            out, lse = rkcuda.attention_fwd(qd, kd, vd, mask, kpm, scale, causal)
        with _bwd_path(emu, monkeypatch, path, D):
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
    (1, 1, 129, 65, 128, "causal", 0.2, 13),  # 128-row tiles, 16-key softmax steps
    (2, 2, 17, 100, 72, "mask_kpm", 0.5, 2**32 + 5),
    (2, 1, 70, 33, 24, "causal", 0.5, -3),
    (1, 1, 9, 40, 200, "mask", 0.1, 11),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_attention_dropout_matches_reference(emu, dtype, case):
    """Dropout in the forward and both backward kernels vs the reference's keep mask."""
    _check_emulated_dropout(emu, dtype, case)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    "case",
    DROPOUT_CASES
    + [(2, 1, 130, 300, 128, "causal_kpm", 0.3, 9), (1, 1, 65, 200, 256, "none", 0.2, 1)],
    ids=lambda c: "x".join(map(str, c)),
)
def test_emulated_sm90_forward_dropout_matches_reference(emu, monkeypatch, dtype, case):
    _check_emulated_dropout(emu, dtype, case, monkeypatch, "sm90")


# (B, H, Nq, Nk, D, mode): three or more (key block, consumer) sums per dQ tile (two add
# up to the same bits in either order): D = 64 (two consumers per 128-key block), D = 128
# causal with Nq < Nk (key blocks whose first query tile is past 0: tiles with 2..5
# sums), D = 256 (two launches, dQ in the second)
ORDER_CASES = [
    (1, 2, 130, 300, 64, "none"),
    (2, 1, 200, 260, 128, "causal"),
    (2, 1, 70, 200, 256, "mask_kpm"),
]


def _dq_sums(q, k, case, kpm=None):
    """Expected counters of bwd_workspace: (key block, consumer) sums per 64-query tile; key
    blocks past a sequence's last real key (kpm) sweep nothing and add none."""
    B, H, NQ, NK, D, mode = case
    consumers = 2 if D <= 64 else 1
    block = 64 * consumers
    tiles = (NQ + 63) // 64
    counts = []
    for b in range(B):
        end = NK if kpm is None else int(kpm[b].nonzero().max()) + 1 if kpm[b].any() else 0
        count = torch.zeros(tiles, dtype=torch.int32)
        for n in range((NK + block - 1) // block):
            if n * block >= end:
                continue
            first = max(0, n * block - (NK - NQ)) // 64 if "causal" in mode else 0
            count[first:] += consumers
        counts += [count] * H
    return torch.cat(counts)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", ORDER_CASES, ids=lambda c: "x".join(map(str, c)))
def test_emulated_sm90_backward_deterministic_order(emu, monkeypatch, dtype, case):
    """deterministic=True orders the dQ sums of the sm_90a backward: with eight blocks
    resident, newest first (RECON_EMU_BLOCKS=8, every case's key blocks of a head started
    together: a block that adds into a dQ tile without
    waiting for the older ones, or passes its turn on before its sums have landed, gets
    there first), the float32 dQ sums are bit-identical to the one-block-at-a-time run and
    the counters show every sum taken its turn; deterministic=False under the same schedule
    gives other bits (so the schedule does reorder, and this test can fail)."""
    B, H, NQ, NK, D, mode = case
    q, k, v, do = (
        _rand(*s, seed=i).to(dtype)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    args = (mask, kpm, D**-0.5, causal)
    monkeypatch.setenv("RECON_CUDA_ATTN_BWD", "sm90")
    with rkcuda.use_emulator(emu):
        out, lse = rkcuda.attention_fwd(q, k, v, *args)
        tiles = rkcuda.attention.bwd_workspace(q).numel() - B * H * ((NQ + 63) // 64)  # floats

        def run(blocks, deterministic):
            monkeypatch.setenv("RECON_EMU_BLOCKS", str(blocks))
            ws = rkcuda.attention.bwd_workspace(q)
            with _bwd_path(emu, monkeypatch, "sm90", D):
                g = rkcuda.attention.attention_bwd_with_workspace(
                    do, q, k, v, out, lse, *args, deterministic=deterministic, dq_workspace=ws
                )
            return ws[:tiles], ws[tiles:].view(torch.int32), g

        in_order, count, g = run(1, True)
        assert torch.equal(count, _dq_sums(q, k, case, kpm)), (
            "counters: one turn per (block, consumer)"
        )
        ref, ref_g = _grad_ref(
            lambda q, k, v: R.attention(q, k, v, *args),
            [t.double() for t in (q, k, v)],
            do.double(),
        )
        low, low_g = _grad_ref(lambda q, k, v: R.attention(q, k, v, *args), (q, k, v), do)
        for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
            assert_rule(name, a, b, c, dtype)
        newest_first, count4, g4 = run(8, True)
        assert torch.equal(newest_first, in_order), "deterministic dQ sums depend on the schedule"
        assert torch.equal(count4, count)
        assert all(torch.equal(a, b) for a, b in zip(g4, g))
        unordered, count0, _ = run(8, False)
        assert not torch.equal(unordered, in_order), "the newest-first schedule did not reorder"
        assert torch.equal(count0, torch.zeros_like(count0)), "deterministic=False: no counters"
        torch.testing.assert_close(unordered, in_order, rtol=1e-5, atol=1e-5)


def test_emulated_sm90_backward_workspace_is_validated(emu, monkeypatch):
    q = _rand(1, 1, 70, 64).to(torch.float16)
    monkeypatch.setenv("RECON_CUDA_ATTN_BWD", "sm90")
    with rkcuda.use_emulator(emu):
        ws = rkcuda.attention.bwd_workspace(q)
        assert ws.numel() == 2 * 4096 + 2 and ws.dtype == torch.float32  # 2 tiles, 2 counters
        out, lse = rkcuda.attention_fwd(q, q, q, None, None, 0.125, False)
        for bad, msg in (
            (ws.double(), "float32 tensor of at least 8194 elements .* got torch.float64"),
            (ws[:-1], "of at least 8194 elements .* got torch.float32 of 8193"),
            (torch.zeros(2 * 8194)[::2], "not contiguous"),
            (torch.zeros(8195)[1:], "16-byte aligned"),
        ):
            with pytest.raises(ValueError, match="dq_workspace: expected .*" + msg):
                rkcuda.attention.attention_bwd_with_workspace(
                    q, q, q, q, out, lse, None, None, 0.125, False, dq_workspace=bad
                )


def test_emulated_multiblock_schedule_runs_every_kernel(emu, monkeypatch):
    """Several blocks resident (RECON_EMU_BLOCKS=3, newest first) change no result of the
    kernels whose blocks are independent: forward, backward (both paths), GEMMs."""
    B, H, NQ, NK, D = 2, 2, 70, 150, 72
    q, k, v, do = (
        _rand(*s, seed=i).to(torch.bfloat16)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    mask, kpm, causal = _masks("mask_kpm", B, H, NQ, NK)
    args = (mask, kpm, D**-0.5, causal)
    x, w = _rand(70, 40, seed=7).to(torch.bfloat16), _rand(48, 40, seed=8).to(torch.bfloat16)
    a, b = _rand(4, 40, seed=9).to(torch.bfloat16), _rand(48, 4, seed=10).to(torch.bfloat16)

    def run(blocks):
        monkeypatch.setenv("RECON_EMU_BLOCKS", str(blocks))
        res = []
        with rkcuda.use_emulator(emu):
            for path in ("sm80", "sm90"):
                monkeypatch.setenv("RECON_CUDA_ATTN_FWD", path)
                monkeypatch.setenv("RECON_CUDA_ATTN_BWD", path)
                out, lse = rkcuda.attention_fwd(q, k, v, *args)
                res += [out, lse, *rkcuda.attention_bwd(do, q, k, v, out, lse, *args)]
            res += [*rkcuda.lora_linear_fwd(x, w, None, a, b, 2.0)]
        return res

    for i, (x1, x3) in enumerate(zip(run(1), run(3))):
        assert torch.equal(x1, x3), f"result {i} changed with 3 blocks resident"


def _check_emulated_dropout(emu, dtype, case, monkeypatch=None, path="sm80"):
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
        with _fwd_path(emu, monkeypatch, path):
            out, lse = rkcuda.attention_fwd(qd, kd, vd, mask, kpm, scale, causal, p, seed)
        with _bwd_path(emu, monkeypatch, path, D):
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


@pytest.mark.parametrize("probe", ["fwd", "bwd", "det", "pp"])
def test_device_gate_probes_on_the_emulated_sm90_kernels(emu, monkeypatch, probe):
    """benchmarks/sm90_gate.py's probes (the device run turns off an sm_90a kernel whose
    probe fails) pass on the emulated sm_90a kernels, which they do run, and fail on a
    wrong result: a probe that cannot fail would hide a broken kernel; one that fails on a
    right kernel would turn it off and lose its benchmark."""
    import sm90_gate as gate  # benchmarks/ (on sys.path above)

    monkeypatch.delenv("RECON_GATE_STUB", raising=False)
    for var in ("RECON_CUDA_ATTN_FWD", "RECON_CUDA_ATTN_BWD", "RECON_CUDA_ATTN_PINGPONG"):
        monkeypatch.setenv(var, "auto" if "PINGPONG" not in var else "0")  # (restored after)
    fwd = probe in ("fwd", "pp")
    kernel = SM90_KERNEL if fwd else SM90_BWD_KERNEL
    before = emu.launch_counts().get(kernel, 0)
    assert gate.probe(probe, emulator=emu) == 0
    assert emu.launch_counts().get(kernel, 0) > before, f"{kernel} did not run"
    if probe == "pp":
        assert os.environ["RECON_CUDA_ATTN_PINGPONG"] == "1"
    name = "attention_fwd" if fwd else "attention_bwd"
    right = getattr(rkcuda, name)
    if fwd:
        wrong = lambda *a, **kw: (lambda o, lse: (o * 1.05, lse))(*right(*a, **kw))  # noqa: E731
    else:
        wrong = lambda *a, **kw: (lambda dq, dk, dv: (dq, dk, dv.flip(2)))(*right(*a, **kw))  # noqa: E731
    monkeypatch.setattr(rkcuda, name, wrong)
    assert gate.probe(probe, emulator=emu) == 1
