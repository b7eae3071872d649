"""conv1d_mlp: kernels vs the float64 reference (2x-error rule), the custom ops (opcheck,
torch.compile, gradcheck), bad input, the ConvMLP module and its loaders, the memory it
saves for backward, and static checks of the compiled Triton kernels for sm_90 / sm_80."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import DTYPES, GEMM_SWITCHES, assert_rule, kernel_cases, triton_cases

import recon_kernels as rk
from recon_kernels import reference
from recon_kernels.nn import ConvMLP
from recon_kernels.ops import mlp as mlp_ops

# (name, x shape, hidden, C_out, activation, has_b1, has_b2, layout)
# Sizes are odd and straddle the interpreter's 32 x 64 x 16 tiles (partial tiles in every
# dim, K tails, 3 row blocks = a partial GROUP_M=2 group); layout "t" passes x as the
# transpose of a (C, M) tensor and "slice" as a column slice of a wider one.
CASES = [
    ("m1", (1, 40), 72, 40, "gelu", True, True, "contig"),
    ("3d", (2, 35, 100), 72, 24, "gelu_tanh", False, False, "contig"),
    ("t", (17, 40), 136, 40, "relu", True, True, "t"),
    ("slice", (100, 72), 40, 100, "gelu", True, False, "slice"),
]


def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout, differentiably (grads reach the leaf)."""
    if layout == "t":  # (M, C) with strides (1, M)
        y = x.t().contiguous().t()
    elif layout == "slice":  # (M, C) inside an (M, C + 5) buffer: row stride C + 5
        wide = torch.zeros(x.shape[0], x.shape[1] + 5, dtype=x.dtype, device=x.device)
        y = torch.cat([wide[:, :2], x, wide[:, 2 + x.shape[1] :]], dim=1)[:, 2 : 2 + x.shape[1]]
    else:
        return x
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


def _params(c, hidden, c_out, has_b1, has_b2, dtype, device):
    """nn.Linear-like init (values O(1/sqrt(fan_in))) so h = O(1) exercises the activation."""
    w1 = (torch.rand(hidden, c) * 2 - 1) / c**0.5
    w2 = (torch.rand(c_out, hidden) * 2 - 1) / hidden**0.5
    b1 = torch.randn(hidden) * 0.5 if has_b1 else None
    b2 = torch.randn(c_out) * 0.5 if has_b2 else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(w1), cast(b1), cast(w2), cast(b2)


def _run(fn, x, params, dy):
    """y = fn(x, *params); backward of dy. Returns y and the grads of x and every param."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, *params)]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend,device", [*kernel_cases(), pytest.param("eager", "cpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv1d_mlp_matches_reference(backend, device, dtype, case):
    """Output and the gradients of x, W1, b1, W2, b2 vs float64; the bound is 2x the error of
    eager PyTorch (reference.conv1d_mlp under autograd) in the same dtype."""
    check_against_reference(backend, device, dtype, case)


@pytest.mark.parametrize("backend,device", triton_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tma,pers", GEMM_SWITCHES)
def test_gemm_switches_match_reference(backend, device, dtype, case, tma, pers, gemm_switches):
    """conv1d_mlp forward and backward (bias, every activation, the act'(h) epilogue with
    column sums, the activation prologue, transposed operands) under every value of
    RECON_GEMM_TMA and RECON_GEMM_PERSISTENT, same 2x rule. With descriptors both forms
    (over the operand and over its transpose) are taken."""
    codes = gemm_switches(tma, pers)
    check_against_reference(backend, device, dtype, case)
    from recon_kernels.triton import _gemm as G

    if G.tma_wanted(torch.tensor([], dtype=dtype).element_size()):
        assert {1, 2} <= set(codes), codes
    else:
        assert not codes


def test_gemm_switches_reject_bad_values(monkeypatch):
    from recon_kernels.triton import _gemm as G

    monkeypatch.setenv("RECON_GEMM_TMA", "on")
    with pytest.raises(ValueError, match="RECON_GEMM_TMA: expected one of"):
        G.tma_mode()
    monkeypatch.setenv("RECON_GEMM_TMA", "off")
    monkeypatch.setenv("RECON_GEMM_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="RECON_GEMM_PERSISTENT: expected 0 or 1, got 'yes'"):
        G.persistent()


def test_gemm_descriptor_fallback():
    """Descriptors where the rules allow (unit stride, 16-byte strides and base), over the
    transpose where the unit stride is along the other dim, pointers elsewhere."""
    from recon_kernels.triton import _gemm as G

    if not G.INTERPRET:
        pytest.skip("the CPU interpreter emulates descriptors (on a GPU: sm_90+ only)")
    x = torch.zeros(33, 48, dtype=torch.bfloat16)
    assert G._operand_desc(x, 1)[1] == 1
    assert G._operand_desc(x.t(), 0)[1] == 2
    assert G._operand_desc(x[:, :40], 1)[1] == 1  # row stride 96 bytes: fine
    assert G._operand_desc(x[:, 1:41], 1)[1] == 0  # base 2 bytes off alignment
    y = torch.zeros(33, 44, dtype=torch.bfloat16)  # row stride 88 bytes
    assert G._operand_desc(y, 1)[1] == 0
    z = torch.zeros(4, 6, 8, dtype=torch.float32)[:, :, 0]  # no unit stride
    assert G._operand_desc(z, 1)[1] == 0


def test_host_cdiv_and_next_pow2_equal_triton_s():
    """The launchers' host arithmetic (triton/_common.py: plain Python, triton's own are
    constexpr_functions costing ~2 us a call) gives triton's values."""
    import triton

    from recon_kernels.triton._common import cdiv, next_pow2

    vals = [*range(0, 3000), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 3 * 2**33 + 7]
    for n in vals:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 16, 64, 100, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.fixture
def dw2_store():
    from recon_kernels.triton import mlp as triton_mlp

    prev = triton_mlp.set_dw2_strategy("store")
    yield triton_mlp
    triton_mlp.set_dw2_strategy(prev)


@pytest.mark.parametrize("backend,device", triton_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[1:3], ids=[c[0] for c in CASES[1:3]])
def test_triton_dw2_store_strategy_matches_reference(backend, device, dtype, case, dw2_store):
    """The "store" strategy (act(h) written by the dh GEMM's epilogue, read by dW2) under the
    same 2x rule, and its dW2 equal to the default strategy's (same rounding of act(h))."""
    check_against_reference(backend, device, dtype, case)
    torch.manual_seed(3)
    x = torch.randn(37, 40, device=device)
    w1, b1, w2, b2 = _params(40, 72, 24, True, True, torch.float32, device)
    _, h = dw2_store.conv1d_mlp_fwd(x, w1, b1, w2, b2, "gelu")
    dy = torch.randn(37, 24, device=device)
    stored = dw2_store.conv1d_mlp_bwd(dy, x, w1, w2, h, "gelu", True, True)
    dw2_store.set_dw2_strategy("recompute")
    recomputed = dw2_store.conv1d_mlp_bwd(dy, x, w1, w2, h, "gelu", True, True)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), stored, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="^strategy: expected one of"):
        dw2_store.set_dw2_strategy("cache")


def check_against_reference(backend, device, dtype, case):
    _, shape, hidden, c_out, act, has_b1, has_b2, layout = case
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).to(device)
    params = _params(shape[-1], hidden, c_out, has_b1, has_b2, dtype, device)
    dy = torch.randn(*shape[:-1], c_out).to(dtype).to(device)

    def kernel(x, w1, b1, w2, b2):
        x = _relayout(x, layout)
        return rk.conv1d_mlp(x, w1, b1, w2, b2, activation=act, backend=backend)

    def eager(x, w1, b1, w2, b2):
        return reference.conv1d_mlp(x, w1, b1, w2, b2, act)

    y, grads = _run(kernel, x, params, dy)
    cpu = lambda t: None if t is None else t.cpu()
    d64 = lambda t: None if t is None else t.cpu().double()
    y64, grads64 = _run(eager, d64(x), [d64(p) for p in params], d64(dy))
    ylp, gradslp = _run(eager, x.cpu(), [cpu(p) for p in params], dy.cpu())

    assert y.dtype == dtype and y.shape == (*shape[:-1], c_out)
    assert_rule("y", y.cpu(), y64, ylp, dtype)
    for name, g, g64, glp in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, grads64, gradslp):
        if g64 is None:
            assert g is None, f"{name}: gradient of an absent bias"
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert_rule(name, g.cpu(), g64, glp, dtype)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_conv1d_mlp_kernel_ops_match_eager_ops(backend, device):
    """The backend's fwd/bwd functions against the eager backend's (same formulas, fp32):
    h (the saved pre-activation) is checked too, and the backward with a stride-0 dy
    (what y.sum().backward() produces)."""
    torch.manual_seed(1)
    impl = mlp_ops._dispatch.impl(backend, "mlp")
    x = torch.randn(33, 40, device=device)
    w1, b1, w2, b2 = _params(40, 72, 24, True, True, torch.float32, device)
    y, h = impl.conv1d_mlp_fwd(x, w1, b1, w2, b2, "gelu")
    y_e, h_e = reference.conv1d_mlp_fwd(x.cpu(), w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu(), "gelu")
    torch.testing.assert_close(h.cpu(), h_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu(), y_e, rtol=1e-5, atol=1e-5)
    dy = torch.ones((), device=device).expand(33, 24)  # strides (0, 0)
    got = impl.conv1d_mlp_bwd(dy, x, w1, w2, h, "gelu", True, True)
    want = reference.conv1d_mlp_bwd(
        dy.cpu(), x.cpu(), w1.cpu(), w2.cpu(), h.cpu(), "gelu", True, True
    )
    for name, g, w in zip(("dx", "dw1", "db1", "dw2", "db2"), got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "backend,device", kernel_cases() + [pytest.param("eager", "cpu", id="eager")]
)
def test_frozen_weights_skip_weight_gradients(backend, device):
    """Frozen MLP weights (LoRA fine-tuning elsewhere in the model): the backward skips the
    dW1/dW2 GEMMs, returns no weight gradient, and dx / the bias gradients are unchanged."""
    torch.manual_seed(2)
    impl = mlp_ops._dispatch.impl(backend, "mlp")
    x = torch.randn(21, 40, device=device)
    w1, b1, w2, b2 = _params(40, 72, 24, True, True, torch.float32, device)
    _, h = impl.conv1d_mlp_fwd(x, w1, b1, w2, b2, "gelu_tanh")
    dy = torch.randn(21, 24, device=device)
    full = impl.conv1d_mlp_bwd(dy, x, w1, w2, h, "gelu_tanh", True, True, True)
    frozen = impl.conv1d_mlp_bwd(dy, x, w1, w2, h, "gelu_tanh", True, True, False)
    assert frozen[1] is None and frozen[3] is None
    for i in (0, 2, 4):
        torch.testing.assert_close(frozen[i], full[i], rtol=0, atol=0)
    # through autograd: only x (and b2) require grad
    xg = x.clone().requires_grad_()
    b2g = b2.clone().requires_grad_()
    y = rk.conv1d_mlp(xg, w1, b1, w2, b2g, activation="gelu_tanh", backend=backend)
    y.backward(dy)
    torch.testing.assert_close(xg.grad, full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b2g.grad, full[4], rtol=1e-6, atol=1e-6)
    assert w1.grad is None and w2.grad is None and b1.grad is None


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_conv1d_mlp_empty_batch(backend, device):
    """M = 0 tokens: empty output, zero weight gradients, no launch."""
    x = torch.randn(0, 40, device=device, requires_grad=True)
    w1, b1, w2, b2 = (
        t.requires_grad_() for t in _params(40, 72, 24, True, True, torch.float32, device)
    )
    y = rk.conv1d_mlp(x, w1, b1, w2, b2, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    for t in (w1, b1, w2, b2):
        assert t.grad is not None and t.grad.abs().max().item() == 0.0


# --------------------------------------------------------------------------- custom ops


def _eager_inputs(dtype=torch.float32, requires_grad=True):
    torch.manual_seed(2)
    x = torch.randn(5, 7, 12, dtype=dtype)
    w1, b1, w2, b2 = _params(12, 20, 9, True, True, dtype, "cpu")
    return [t.requires_grad_(requires_grad) for t in (x, w1, b1, w2, b2)]


def test_opcheck_forward_and_backward_ops():
    x, w1, b1, w2, b2 = _eager_inputs()
    x2 = x.detach().reshape(-1, 12).requires_grad_()
    torch.library.opcheck(
        torch.ops.recon.conv1d_mlp_fwd.default, (x2, w1, b1, w2, b2, "gelu", "eager")
    )
    torch.library.opcheck(
        torch.ops.recon.conv1d_mlp_fwd.default, (x2, w1, None, w2, None, "relu", "eager")
    )
    _, h = mlp_ops.conv1d_mlp_fwd(
        x2.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), "gelu", "eager"
    )
    dy = torch.randn(x2.shape[0], 9)
    for needs_dw in (True, False):
        args = (
            dy,
            x2.detach(),
            w1.detach(),
            w2.detach(),
            h,
            "gelu_tanh",
            True,
            False,
            needs_dw,
            "eager",
        )
        torch.library.opcheck(torch.ops.recon.conv1d_mlp_bwd.default, args)


def test_torch_compile_fullgraph():
    """The public op traces into one graph (forward and backward) on the eager/CPU path."""
    x, w1, b1, w2, b2 = _eager_inputs()

    def f(x, w1, b1, w2, b2):
        return (
            rk.conv1d_mlp(x, w1, b1, w2, b2, activation="gelu_tanh", backend="eager").square().sum()
        )

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w1, b1, w2, b2)
    grads = torch.autograd.grad(loss, (x, w1, b1, w2, b2))
    loss_ref = f(x, w1, b1, w2, b2)
    grads_ref = torch.autograd.grad(loss_ref, (x, w1, b1, w2, b2))
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu"])
def test_gradcheck_reference_and_op(act):
    """float64 gradcheck of the oracle and of the custom op's explicit backward formulas
    (eager backend)."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    # keep relu away from its kink, where finite differences are meaningless
    x = (x + 0.05 * torch.sign(x)).requires_grad_()
    w1, b1, w2, b2 = (
        t.requires_grad_() for t in _params(4, 6, 3, True, True, torch.float64, "cpu")
    )
    args = (x, w1, b1, w2, b2)
    assert torch.autograd.gradcheck(lambda *a: reference.conv1d_mlp(*a, act), args)
    assert torch.autograd.gradcheck(
        lambda *a: rk.conv1d_mlp(*a, activation=act, backend="eager"), args
    )


@pytest.mark.parametrize(
    "change,arg",
    [
        (lambda a: a.__setitem__("w1", torch.randn(20, 13)), "w1"),
        (lambda a: a.__setitem__("w2", torch.randn(9, 21)), "w2"),
        (lambda a: a.__setitem__("b1", torch.randn(19)), "b1"),
        (lambda a: a.__setitem__("b2", torch.randn(9, 1)), "b2"),
        (lambda a: a.__setitem__("w1", a["w1"].half()), "w1"),
        (lambda a: a.__setitem__("w2", a["w2"].to("meta")), "w2"),
        (lambda a: a.__setitem__("x", torch.tensor(1.0)), "x"),
        (lambda a: a.__setitem__("activation", "swish"), "activation"),
        (lambda a: a.__setitem__("x", a["x"].long()), "x"),
    ],
    ids=[
        "w1-shape",
        "w2-shape",
        "b1-shape",
        "b2-rank",
        "dtype-mix",
        "device-mix",
        "x-rank",
        "act",
        "x-int",
    ],
)
def test_bad_input_names_the_argument(change, arg):
    x, w1, b1, w2, b2 = _eager_inputs(requires_grad=False)
    a = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "activation": "gelu"}
    change(a)
    with pytest.raises((ValueError, TypeError), match=rf"^{arg}:"):
        rk.conv1d_mlp(
            a["x"], a["w1"], a["b1"], a["w2"], a["b2"], activation=a["activation"], backend="eager"
        )


def test_float64_needs_eager_backend():
    x, w1, b1, w2, b2 = _eager_inputs(torch.float64, requires_grad=False)
    with pytest.raises(ValueError, match="dtype"):
        rk.conv1d_mlp(x, w1, b1, w2, b2, backend="triton")


# --------------------------------------------------------------------------- module


def _module_backends():
    return [pytest.param("eager", "cpu"), *kernel_cases()]


@pytest.mark.parametrize("backend,device", _module_backends())
def test_convmlp_from_linear_conv1d_and_hf(backend, device):
    """ConvMLP loaded from nn.Linear pairs, nn.Conv1d(kernel_size=1) and GPT-2's Conv1D
    reproduces the source modules (fp32; reordered sums only)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(3)
    fc1, fc2 = nn.Linear(24, 56).to(device), nn.Linear(56, 24).to(device)
    x = torch.randn(2, 9, 24, device=device)
    m = ConvMLP.from_linear(fc1, fc2, activation="gelu", backend=backend)
    torch.testing.assert_close(m(x), fc2(nn.functional.gelu(fc1(x))), rtol=1e-5, atol=1e-5)
    assert m.fc1.weight.data_ptr() != fc1.weight.data_ptr()  # a copy, not shared storage

    c1, c2 = nn.Conv1d(24, 56, 1).to(device), nn.Conv1d(56, 24, 1).to(device)
    m = ConvMLP.from_conv1d(c1, c2, activation="relu", backend=backend)
    want = c2(torch.relu(c1(x.transpose(1, 2)))).transpose(1, 2)  # conv layout (B, C, N)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="conv1"):
        ConvMLP.from_conv1d(nn.Conv1d(24, 56, 3), c2)

    cfg = GPT2Config(n_embd=24, activation_function="gelu_new", resid_pdrop=0.0)
    hf = GPT2MLP(56, cfg).to(device).eval()
    nn.init.normal_(hf.c_fc.bias)  # HF initialises biases to 0: make them matter
    nn.init.normal_(hf.c_proj.bias)
    m = ConvMLP.from_hf_conv1d(hf.c_fc, hf.c_proj, backend=backend)
    assert m.fc1.weight.shape == (56, 24) and m.fc2.weight.shape == (24, 56)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x), rtol=1e-5, atol=1e-5)


def test_convmlp_state_dict_and_bias_mismatch():
    m = ConvMLP(16, 48, activation="gelu_tanh")
    assert set(m.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    seq = nn.Sequential(nn.Linear(16, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 16))
    m.load_state_dict(
        {k.replace("0.", "fc1.").replace("2.", "fc2."): v for k, v in seq.state_dict().items()}
    )
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), seq(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="b1/b2"):
        ConvMLP.from_linear(nn.Linear(16, 48), nn.Linear(48, 16, bias=False))
    with pytest.raises(ValueError, match="activation"):
        ConvMLP(16, 48, activation="tanh")


def _saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during module(x), parameters
    excluded (matched by storage)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("backend,device", _module_backends())
def test_convmlp_saves_only_x_and_h(backend, device):
    """Activation memory kept for backward: ConvMLP saves x and h, eager Linear-GELU-Linear
    saves x, h and act(h): ours is exactly one (M, hidden) tensor smaller."""
    torch.manual_seed(4)
    m = ConvMLP(32, 128, backend=backend, device=device)
    seq = nn.Sequential(m.fc1, nn.GELU(), m.fc2)
    x = torch.randn(4, 16, 32, device=device, requires_grad=True)
    ours = _saved_activation_bytes(m, x)
    eager = _saved_activation_bytes(seq, x)
    x_bytes, h_bytes = x.numel() * 4, 4 * 16 * 128 * 4
    assert ours == x_bytes + h_bytes
    assert eager == x_bytes + 2 * h_bytes
    assert ours < eager


# --------------------------------------------------------------------------- static checks

# name -> (constexpr flags, heavy epilogue/prologue?): the GEMMs the MLP launches.
# contiguous_k: whether A / B have unit stride along K.
STATIC_VARIANTS = {
    "fwd_gemm1_bias_gelu_h": (dict(ACT=1, HAS_BIAS=True, STORE_C2=True), True),
    "fwd_gemm1_gelu_tanh": (dict(ACT=2, HAS_BIAS=True, STORE_C2=True), True),
    "fwd_gemm2_bias": (dict(HAS_BIAS=True), False),
    "bwd_dh_dact_db1": (dict(ACT=1, EPI=1, HAS_CSUM=True), True),
    "bwd_dw2_act_prologue": (dict(ACT=1, PRO_ACT=True, contiguous_k=(False, False)), True),
    # the "store" dW2 strategy: act(h) written beside dh (dW2 is then a plain GEMM)
    "bwd_dh_dact_db1_store_act": (dict(ACT=1, EPI=1, HAS_CSUM=True, STORE_C2=True), True),
    "bwd_dw1": (dict(contiguous_k=(False, False)), False),
    "bwd_dx": (dict(contiguous_k=(True, False)), False),
}


def static_jobs(variants: dict) -> list[dict]:
    """sm_90 (the H100/H200 target) bf16 with every autotune tile for the variants with
    activation math or a second K-loop (where registers run short), the first tile for the
    others, plus any extra tiles a variant names (skinny LoRA shapes); fp16 once; sm_80
    bf16 with the first tile the autotuner keeps on Ampere for the heavy ones.
    variants: name -> (constexpr flags, heavy, [extra (BM, BN, BK, warps, stages)])."""
    from recon_kernels.triton._gemm import _GPU_CONFIGS, tiles_for_arch

    jobs = []
    for i, (name, (flags, heavy, *extra)) in enumerate(variants.items()):
        tiles = [*(_GPU_CONFIGS if heavy else _GPU_CONFIGS[:1]), *(extra[0] if extra else ())]
        jobs += [dict(name=name, arch=90, dtype="bf16", block=b, flags=flags) for b in tiles]
        if i == 0:
            jobs.append(dict(name=name, arch=90, dtype="fp16", block=_GPU_CONFIGS[0], flags=flags))
        if heavy:
            b = tiles_for_arch(80, flags.get("PRO_ACT", False), flags.get("HAS_AB2", False))[0]
            jobs.append(dict(name=name, arch=80, dtype="bf16", block=b, flags=flags))
    return jobs


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
_STATIC_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])  # benchmarks/: the static-compile tool
from sass_report import gemm_compile_static as compile_static
out = []
for job in json.loads(sys.argv[1]):
    flags = dict(job["flags"])
    if "contiguous_k" in flags:
        flags["contiguous_k"] = tuple(flags["contiguous_k"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[job["dtype"]]
    r = compile_static(dtype, arch=job["arch"], block=tuple(job["block"]), **flags)
    out.append(dict(job, mma=r["mma"], regs=r["regs"], spill_bytes=r["spill_bytes"]))
print(json.dumps(out))
"""


def compile_report(variants: dict) -> list[dict]:
    """Compile the variants' jobs in a subprocess: the JIT compiler, not the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", _STATIC_SCRIPT, json.dumps(static_jobs(variants)), BENCHMARKS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_static_report(report: list[dict]) -> None:
    lines = []
    for r in report:
        lines.append(
            f"sm_{r['arch']} {r['dtype']} {str(r['block']):22s} {r['name']:24s} "
            f"regs={r['regs']} spill={r['spill_bytes']} {r['mma'][:1]}"
        )
    print("\n".join(lines))
    for r in report:
        # Hopper's wgmma needs 64-row tiles; smaller ones (skinny LoRA GEMMs) use mma.sync
        want = "wgmma.mma_async" if r["arch"] == 90 and r["block"][0] >= 64 else "mma.sync"
        assert any(op.startswith(want) for op in r["mma"]), (
            f"{r['name']} sm_{r['arch']}: no {want} in the PTX"
        )
        if r["spill_bytes"] is not None:
            assert r["spill_bytes"] == 0, (
                f"{r['name']} {r['block']} sm_{r['arch']}: {r['spill_bytes']} spill bytes"
            )


def test_static_compile_sm90_tensor_cores_no_spills():
    """Every MLP GEMM variant compiles for sm_90 (and sm_80); the PTX uses wgmma (Hopper) /
    mma.sync (Ampere) and ptxas spills nothing (registers printed with -s)."""
    pytest.importorskip("triton.backends.nvidia")
    check_static_report(compile_report(STATIC_VARIANTS))
