"""The eager backend's CPU fast paths (recon_kernels/ops/eager.py) vs the float64 reference.

torch's flash attention for CPU (no mask, causal with Nq == Nk, no dropout) and the fused
activation backward of the MLP: forward and every gradient under the 2x rule, on the odd
shapes of test_attention, every mask mode (the masked modes must fall back to the reference
formulas and keep fully-masked rows at 0 with 0 gradient), and a check that the fast path is
really the one taken where it applies.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_rule
from test_attention import MODES, SHAPES, _check_kernel, _inputs

import recon_kernels as rk
from recon_kernels import reference as R
from recon_kernels.ops import eager as E


def _fast_applies(mode, shape):
    B, H, NQ, NK, D = shape
    return mode == "none" or (mode == "causal" and NQ == NK)


@pytest.fixture
def reference_calls(monkeypatch):
    """How often the eager backend fell back to reference.attention_fwd / _bwd."""
    calls = {"fwd": 0, "bwd": 0, "mlp_bwd": 0}
    fwd, bwd, mlp_bwd = R.attention_fwd, R.attention_bwd, R.conv1d_mlp_bwd

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(R, "attention_fwd", count("fwd", fwd))
    monkeypatch.setattr(R, "attention_bwd", count("bwd", bwd))
    monkeypatch.setattr(R, "conv1d_mlp_bwd", count("mlp_bwd", mlp_bwd))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_eager_attention_matches_reference(dtype, shape, mode, reference_calls):
    _check_kernel("eager", "cpu", dtype, shape, mode)
    fast = _fast_applies(mode, shape)
    assert reference_calls["fwd"] == (0 if fast else 1), "fast path taken iff it applies"
    assert reference_calls["bwd"] == (0 if fast else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_fully_masked_rows_zero_output_and_gradient(dtype):
    B, H, NQ, NK, D = 2, 2, 17, 23, 40
    out, g, _ = _check_kernel("eager", "cpu", dtype, (B, H, NQ, NK, D), "mask_kpm")
    assert out[0].abs().max() == 0 and out[1, 0, NQ // 2].abs().max() == 0
    assert g[0][0].abs().max() == 0 and g[0][1, 0, NQ // 2].abs().max() == 0
    assert g[1][0].abs().max() == 0 and g[2][0].abs().max() == 0
    out, g, _ = _check_kernel("eager", "cpu", dtype, (2, 4, 40, 12, 64), "causal")
    assert out[:, :, :28].abs().max() == 0 and g[0][:, :, :28].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_attention_packed_qkv_views(dtype, reference_calls):
    """GPT's layout: q, k, v strided views of one (B, N, 3, H, D) projection."""
    B, N, H, D = 3, 33, 4, 24
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)

    def run(x, fn):
        x = x.detach().clone().requires_grad_()
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        out = fn(q, k, v)
        out.backward(do.to(x.dtype))
        return out.detach(), x.grad

    ref, ref_g = run(qkv, lambda q, k, v: R.attention(q, k, v, causal=True))
    low, low_g = run(qkv.to(dtype), lambda q, k, v: R.attention(q, k, v, causal=True))
    out, gr = run(qkv.to(dtype), lambda q, k, v: rk.causal_attention(q, k, v, backend="eager"))
    assert out.transpose(1, 2).is_contiguous()
    assert_rule("out", out, ref, low, dtype)
    assert_rule("dqkv", gr, ref_g, low_g, dtype)
    assert reference_calls["fwd"] == 0 and reference_calls["bwd"] == 0


def test_eager_attention_lse_matches_reference():
    """The saved log-sum-exp is the one every backend returns: float32 (B, H, Nq) contiguous."""
    q, k, v, _ = (t.float() for t in _inputs(2, 3, 17, 17, 40))
    for causal in (False, True):
        out, lse = E.attention_fwd(q, k, v, None, None, 0.3, causal)
        ref_out, ref_lse = R.attention_fwd(
            q.double(), k.double(), v.double(), None, None, 0.3, causal
        )
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == (2, 3, 17)
        assert (lse.double() - ref_lse).abs().max() < 1e-5
        assert (out.double() - ref_out).abs().max() < 1e-5


def test_float64_and_dropout_stay_on_the_reference(reference_calls):
    q, k, v, _ = _inputs(1, 2, 9, 9, 8)
    rk.causal_attention(q, k, v, backend="eager")  # float64: the oracle's formulas
    assert reference_calls["fwd"] == 1
    rk.causal_attention(q.float(), k.float(), v.float(), backend="eager", dropout_p=0.5)
    assert reference_calls["fwd"] == 2


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("has_b", [True, False])
def test_eager_mlp_backward_fast_path(act, has_b, reference_calls):
    """Fused activation backward vs the float64 reference, float32, odd sizes."""
    M, C, Hd, Co = 37, 24, 67, 19
    g = torch.Generator().manual_seed(5)
    x, w1, b1, w2, b2, dy = (
        torch.randn(*s, generator=g, dtype=torch.float64)
        for s in ((M, C), (Hd, C), (Hd,), (Co, Hd), (Co,), (M, Co))
    )
    if not has_b:
        b1 = b2 = None

    def run(ts, fn):
        ts = [None if t is None else t.detach().clone().requires_grad_() for t in ts]
        out = fn(*ts)
        out.backward(dy.to(out.dtype))
        return out.detach(), [None if t is None else t.grad for t in ts]

    args = (x, w1, b1, w2, b2)
    to32 = [None if t is None else t.float() for t in args]
    ref, ref_g = run(args, lambda *t: R.conv1d_mlp(*t, activation=act))
    low, low_g = run(to32, lambda *t: R.conv1d_mlp(*t, activation=act))
    out, gr = run(to32, lambda *t: rk.conv1d_mlp(*t, activation=act, backend="eager"))
    assert reference_calls["mlp_bwd"] == 0
    assert_rule("y", out, ref, low, torch.float32)
    for name, a, b, c in zip(("dx", "dw1", "db1", "dw2", "db2"), gr, ref_g, low_g):
        if b is None:
            assert a is None
            continue
        assert_rule(name, a, b, c, torch.float32)


def _fills(fn) -> list[list[int]]:
    """Shapes of every aten::zeros / aten::fill_ that ``fn`` runs (torch profiler)."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()
    return [e.input_shapes[0] for e in prof.events() if e.name in ("aten::fill_", "aten::zero_")]


@pytest.mark.parametrize("op", ["mlp", "lora", "attention"])
def test_backward_does_not_fill_zeros_for_the_saved_output(op):
    """The ops' second outputs (the MLP pre-activation h, LoRA's x A^T, attention's lse) are
    non-differentiable: autograd must not materialise a zeros gradient for them on every
    backward (for the MLP that was an (M, hidden) fill per layer, ~10% of a CPU GPT step)."""
    g = torch.Generator().manual_seed(0)
    if op == "mlp":
        M, C, Hd = 96, 16, 80
        x = torch.randn(M, C, generator=g, requires_grad=True)
        w1 = torch.randn(Hd, C, generator=g, requires_grad=True)
        w2 = torch.randn(C, Hd, generator=g, requires_grad=True)
        y = rk.conv1d_mlp(x, w1, None, w2, None, activation="relu", backend="eager")
        shape = [M, Hd]
    elif op == "lora":
        M, C, R_ = 96, 16, 7
        x = torch.randn(M, C, generator=g, requires_grad=True)
        w = torch.randn(24, C, generator=g)
        a = torch.randn(R_, C, generator=g, requires_grad=True)
        b = torch.randn(24, R_, generator=g, requires_grad=True)
        y = rk.lora_linear(x, w, None, a, b, scale=0.5, backend="eager")
        shape = [M, R_]
    else:
        q, k, v = (torch.randn(2, 3, 33, 8, generator=g, requires_grad=True) for _ in range(3))
        y = rk.masked_softmax_attention(q, k, v, backend="eager")
        shape = [2, 3, 33]
    dy = torch.randn(y.shape, generator=g)
    fills = _fills(lambda: y.backward(dy))
    assert shape not in fills, fills
    # and the gradients are still there
    assert x.grad is not None if op != "attention" else q.grad is not None
