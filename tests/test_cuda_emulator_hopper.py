"""The Hopper primitives of csrc/hopper.cuh (wgmma, TMA, mbarrier, setmaxnreg) through their
emulator models (csrc/emulator_hopper.h), by the self-test kernel of csrc/hopper_selftest.cu:
D (64 x N, f32) = A B^T with A (rows_a x 64), B (rows_b x 64) loaded by TMA (zero fill past
the rows) with every swizzle mode, multiplied by four k16 wgmma steps whose descriptors
advance inside the swizzle atoms, against the float64 product of the same rounded inputs.
The unforgiving parts are tested to fail: a wgmma result read before the wait_group that
covers it, shared memory read before the mbarrier wait, an invalid setmaxnreg count.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rule

LOW = (torch.float16, torch.bfloat16)
CODE = {torch.float16: 1, torch.bfloat16: 2}


def _run(emu, mode, dtype, n, swizzle, rows_a, rows_b, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows_a, 64, generator=g, dtype=torch.float64)
    b = torch.randn(rows_b, 64, generator=g, dtype=torch.float64)
    al, bl = a.to(dtype).contiguous().to(device), b.to(dtype).contiguous().to(device)
    out = torch.full((64, n), 12345.0, device=device)
    out2 = torch.full((64, n), 12345.0, device=device)
    emu.hopper_selftest(
        mode,
        CODE[dtype],
        n,
        swizzle,
        al.data_ptr(),
        rows_a,
        bl.data_ptr(),
        rows_b,
        out.data_ptr(),
        out2.data_ptr(),
    )
    if device != "cpu":
        torch.cuda.synchronize()
    al, bl, out, out2 = al.cpu(), bl.cpu(), out.cpu(), out2.cpu()
    ref = torch.zeros(64, n, dtype=torch.float64)
    ref[:rows_a, :rows_b] = al.double() @ bl.double().T
    low = torch.zeros(64, n, dtype=torch.float64)
    low[:rows_a, :rows_b] = (al @ bl.T).double()  # eager in the low precision: 2x-rule base
    return out, out2, ref, low


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("swizzle", [0, 32, 64, 128])
@pytest.mark.parametrize("n,rows_a,rows_b", [(16, 64, 16), (64, 17, 63), (16, 1, 9)])
@pytest.mark.parametrize("mode", [0, 1, 7], ids=["ss", "rs", "ss-tma3d"])
def test_wgmma_tma_matches_float64(emu, dtype, swizzle, n, rows_a, rows_b, mode):
    out, _, ref, low = _run(emu, mode, dtype, n, swizzle, rows_a, rows_b)
    assert_rule("D", out, ref, low, dtype)
    # f32 accumulation of exact products: far tighter than the rule
    assert (out.double() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
    assert torch.equal(out[rows_a:], torch.zeros_like(out[rows_a:])), "zero-filled rows of A"
    assert torch.equal(out[:, rows_b:], torch.zeros_like(out[:, rows_b:])), "zero-filled B"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_wgmma_result_only_visible_after_covering_wait(emu, dtype):
    """Two commit groups, wait_group 1: the first is complete, the second still NaN."""
    out, out2, ref, low = _run(emu, 2, dtype, 16, 128, 64, 16, seed=3)
    assert_rule("D1", out, ref, low, dtype)
    assert torch.isnan(out2).all(), "a wgmma result read before its wait_group must be NaN"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("swizzle", [0, 128])
def test_mbarrier_ring_two_phases(emu, dtype, swizzle):
    """full/empty mbarrier ring over two phases (parity 0 then 1); phase 1 reloads A at
    row -8 (TMA zero fill of negative coordinates)."""
    out, out2, ref, low = _run(emu, 5, dtype, 64, swizzle, 50, 40, seed=5)
    assert_rule("D phase 0", out, ref, low, dtype)
    shifted = torch.zeros_like(ref)
    shifted[8:] = ref[:-8]
    shifted_low = torch.zeros_like(low)
    shifted_low[8:] = low[:-8]
    assert_rule("D phase 1", out2, shifted, shifted_low, dtype)
    assert torch.equal(out2[:8], torch.zeros_like(out2[:8]))


def test_tma_data_only_visible_after_mbarrier_wait(emu):
    out, _, ref, _ = _run(emu, 3, torch.float16, 16, 64, 64, 16)
    assert not torch.isfinite(out).any(), "smem read without the mbarrier wait must be stale"


def test_setmaxnreg_count_is_checked(emu):
    with pytest.raises(RuntimeError, match=r"setmaxnreg: count 236 outside \[24, 256\] or not"):
        _run(emu, 4, torch.float16, 16, 0, 64, 16)


def test_wgmma_without_fence_is_an_error(emu):
    with pytest.raises(RuntimeError, match="wgmma.mma_async without a wgmma.fence"):
        _run(emu, 6, torch.bfloat16, 64, 0, 64, 16)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(n=32), "n: expected 16 or 64, got 32"),
        (dict(swizzle=48), "swizzle: expected 0, 32, 64 or 128, got 48"),
        (dict(rows_b=17), r"rows_b: expected 1..16, got 17"),
        (dict(mode=9), "mode: expected 0..7, got 9"),
    ],
)
def test_selftest_rejects_bad_arguments(emu, kw, msg):
    args = dict(mode=0, dtype=torch.float16, n=16, swizzle=0, rows_a=64, rows_b=16)
    args.update(kw)
    with pytest.raises(RuntimeError, match=msg):
        _run(emu, args["mode"], args["dtype"], args["n"], args["swizzle"], 64, args["rows_b"])


def _turns(emu, monkeypatch, blocks, reverse, resident):
    monkeypatch.setenv("RECON_EMU_BLOCKS", str(resident))
    counter = torch.zeros(1, dtype=torch.int32)
    order = torch.full((blocks,), -1, dtype=torch.int32)
    emu.flag_selftest(counter.data_ptr(), order.data_ptr(), blocks, reverse)
    return counter.item(), order.tolist()


@pytest.mark.parametrize("resident", [1, 2, 5])
def test_flag_turns_in_block_order(emu, monkeypatch, resident):
    """Block b waits for turn b, writes order[b] = b, passes the turn on: any residency."""
    assert _turns(emu, monkeypatch, 5, False, resident) == (5, [0, 1, 2, 3, 4])


def test_flag_turns_waiting_on_newer_blocks(emu, monkeypatch):
    """Block b waits for blocks b + 1..: it works only with every block resident (the
    scheduler runs the newest first), and with fewer the emulator reports the deadlock a GPU
    would hang in, naming the threads that spin on the flag."""
    assert _turns(emu, monkeypatch, 5, True, 5) == (5, [4, 3, 2, 1, 0])
    for resident in (1, 3):
        with pytest.raises(RuntimeError, match=r"deadlock: .* 32 on a global flag"):
            _turns(emu, monkeypatch, 5, True, resident)


def _hopper_gpu():
    """The built extension on an sm_90 GPU, or a skip naming the missing hardware."""
    if not torch.cuda.is_available():
        pytest.skip("needs an sm_90 (Hopper) CUDA GPU to run the self-tests (none visible)")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 (Hopper) GPU, got " + torch.cuda.get_device_name())
    from recon_kernels.cuda import _loader

    return _loader.extension()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("mode", [0, 1, 5, 7], ids=["ss", "rs", "ring", "ss-tma3d"])
def test_hopper_selftest_on_gpu(dtype, mode):
    """The same self-tests on the real instructions (H100 / H200)."""
    ext = _hopper_gpu()
    out, out2, ref, low = _run(ext, mode, dtype, 64, 128, 50, 40, seed=2, device="cuda")
    assert_rule("D", out, ref, low, dtype)
    if mode == 5:
        shifted, shifted_low = torch.zeros_like(ref), torch.zeros_like(low)
        shifted[8:], shifted_low[8:] = ref[:-8], low[:-8]
        assert_rule("D phase 1", out2, shifted, shifted_low, dtype)


def test_flag_turns_on_gpu():
    """4096 blocks, each waiting for the previous one's turn: completes (the blocks start in
    blockIdx order, which the deterministic backward relies on) in block order."""
    ext = _hopper_gpu()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    order = torch.full((4096,), -1, dtype=torch.int32, device="cuda")
    ext.flag_selftest(counter.data_ptr(), order.data_ptr(), 4096, False)
    torch.cuda.synchronize()
    assert counter.item() == 4096
    assert torch.equal(order.cpu(), torch.arange(4096, dtype=torch.int32))
