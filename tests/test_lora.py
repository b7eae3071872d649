"""lora_linear and merge_lora: kernels vs the float64 reference (2x-error rule), merge
exactness, the custom ops (opcheck, torch.compile, gradcheck), bad input, the LoRALinear
module against Hugging Face peft, and static checks of the compiled Triton kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import DTYPES, GEMM_SWITCHES, assert_rule, kernel_cases, triton_cases
from test_mlp import check_static_report, compile_report

import recon_kernels as rk
from recon_kernels import reference
from recon_kernels.nn import LoRALinear
from recon_kernels.ops import lora as lora_ops

SCALE = 0.37  # not a power of two: a misplaced or doubly rounded scale shows

# (name, x shape, out, r, has_bias, weight trainable, layout)
# Odd sizes straddling the interpreter's 32 x 64 x 16 tiles; "t": x is the transpose of an
# (in, M) tensor; "slice": a column slice of a wider buffer. M = 66 and 100 make the
# long-K dA/dB GEMMs split K in the interpreter (a virtual 4-SM machine).
CASES = [
    ("m1", (1, 40), 72, 8, True, False, "contig"),
    ("3d", (2, 35, 100), 24, 5, False, True, "contig"),
    ("t", (66, 40), 136, 16, True, True, "t"),
    ("slice", (100, 72), 40, 1, True, False, "slice"),
]


def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout, differentiably (grads reach the leaf)."""
    if layout == "t":
        y = x.t().contiguous().t()
    elif layout == "slice":
        pad = torch.zeros(x.shape[0], 3, dtype=x.dtype, device=x.device)
        y = torch.cat([pad, x, pad], dim=1)[:, 3 : 3 + x.shape[1]]
    else:
        return x
    assert not y.is_contiguous() and torch.equal(y, x)
    return y


def _weights(in_f, out_f, r, has_bias, dtype, device):
    """nn.Linear-like weight/bias, kaiming-like A, and a non-zero B (as after training)."""
    w = (torch.rand(out_f, in_f) * 2 - 1) / in_f**0.5
    b = torch.randn(out_f) * 0.5 if has_bias else None
    a = (torch.rand(r, in_f) * 2 - 1) / in_f**0.5
    bb = torch.randn(out_f, r) / r**0.5
    cast = lambda t: None if t is None else t.to(dtype).to(device)
    return cast(w), cast(b), cast(a), cast(bb)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend,device", [*kernel_cases(), pytest.param("eager", "cpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_lora_linear_matches_reference(backend, device, dtype, case):
    """Output and the gradients of x, A, B, bias (and W when trainable) vs float64; the
    bound is 2x the error of eager PyTorch (reference.lora_linear) in the same dtype. A
    frozen W gets no gradient."""
    check_against_reference(backend, device, dtype, case)


@pytest.mark.parametrize("backend,device", triton_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tma,pers", GEMM_SWITCHES)
def test_gemm_switches_match_reference(backend, device, dtype, case, tma, pers, gemm_switches):
    """lora_linear forward and backward (the rank-r second K segment with bias, the scaled
    second store, split-K dA/dB, transposed operands) under every value of RECON_GEMM_TMA
    and RECON_GEMM_PERSISTENT, same 2x rule; with descriptors both forms are taken."""
    codes = gemm_switches(tma, pers)
    check_against_reference(backend, device, dtype, case)
    from recon_kernels.triton import _gemm as G

    if G.tma_wanted(torch.tensor([], dtype=dtype).element_size()):
        assert {1, 2} <= set(codes), codes
    else:
        assert not codes


def check_against_reference(backend, device, dtype, case):
    _, shape, out_f, r, has_bias, w_trainable, layout = case
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).to(device)
    w, b, a, bb = _weights(shape[-1], out_f, r, has_bias, dtype, device)
    dy = torch.randn(*shape[:-1], out_f).to(dtype).to(device)

    def run(fn, x, w, b, a, bb, dy):
        leaves = {
            "x": x.detach().clone().requires_grad_(),
            "weight": w.detach().clone().requires_grad_(w_trainable),
            "bias": None if b is None else b.detach().clone().requires_grad_(),
            "lora_a": a.detach().clone().requires_grad_(),
            "lora_b": bb.detach().clone().requires_grad_(),
        }
        y = fn(**leaves)
        y.backward(dy)
        return y.detach(), {k: None if t is None else t.grad for k, t in leaves.items()}

    def kernel(x, weight, bias, lora_a, lora_b):
        x = _relayout(x, layout)
        return rk.lora_linear(x, weight, bias, lora_a, lora_b, SCALE, backend=backend)

    def eager(x, weight, bias, lora_a, lora_b):
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, SCALE)

    cpu = lambda t: None if t is None else t.cpu()
    d64 = lambda t: None if t is None else t.cpu().double()
    y, g = run(kernel, x, w, b, a, bb, dy)
    y64, g64 = run(eager, *(d64(t) for t in (x, w, b, a, bb, dy)))
    ylp, glp = run(eager, *(cpu(t) for t in (x, w, b, a, bb, dy)))

    assert y.dtype == dtype and y.shape == (*shape[:-1], out_f)
    assert_rule("y", y.cpu(), y64, ylp, dtype)
    for name in ("x", "weight", "bias", "lora_a", "lora_b"):
        if g64[name] is None:
            assert g[name] is None, f"d{name}: expected no gradient (frozen or absent)"
            continue
        assert g[name].dtype == dtype, f"d{name}: dtype {g[name].dtype}"
        assert_rule(f"d{name}", g[name].cpu(), g64[name], glp[name], dtype)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_lora_kernel_ops_match_eager_ops(backend, device):
    """The backend's fwd/bwd functions against the eager backend's (same formulas, fp32):
    xa (saved for backward) too, a stride-0 dy, dW/dbias only when asked, and M = 0."""
    torch.manual_seed(1)
    impl = lora_ops._dispatch.impl(backend, "lora")
    x = torch.randn(70, 40, device=device)
    w, b, a, bb = _weights(40, 72, 6, True, torch.float32, device)
    y, xa = impl.lora_linear_fwd(x, w, b, a, bb, SCALE)
    y_e, xa_e = reference.lora_linear_fwd(*(t.cpu() for t in (x, w, b, a, bb)), SCALE)
    torch.testing.assert_close(xa.cpu(), xa_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu(), y_e, rtol=1e-5, atol=1e-5)
    dy = torch.ones((), device=device).expand(70, 72)  # strides (0, 0)
    for needs_dw, has_bias in ((True, True), (False, False)):
        got = impl.lora_linear_bwd(dy, x, w, a, bb, xa, SCALE, needs_dw, has_bias)
        want = reference.lora_linear_bwd(
            dy.cpu(), *(t.cpu() for t in (x, w, a, bb, xa)), SCALE, needs_dw, has_bias
        )
        for name, gt, wt in zip(("dx", "dw", "dbias", "da", "db"), got, want):
            if wt is None:
                assert gt is None, name
            else:
                torch.testing.assert_close(gt.cpu(), wt, rtol=1e-5, atol=1e-5, msg=name)
    y0, xa0 = impl.lora_linear_fwd(x[:0], w, b, a, bb, SCALE)
    assert y0.shape == (0, 72) and xa0.shape == (0, 6)
    dx0, dw0, db0, da0, dbb0 = impl.lora_linear_bwd(dy[:0], x[:0], w, a, bb, xa0, SCALE, True, True)
    assert dx0.shape == (0, 40)
    for t in (dw0, db0, da0, dbb0):
        assert t.abs().max().item() == 0.0


@pytest.mark.parametrize("backend,device", triton_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tma,pers", GEMM_SWITCHES)
def test_split_k_gemm(backend, device, dtype, tma, pers, gemm_switches):
    """The split-K path of the shared GEMM (dA/dB: tiny outputs, K = tokens) against torch,
    for explicit split counts including more splits than K tiles (empty splits), into a
    transposed output view, under every value of the GEMM switches."""
    gemm_switches(tma, pers)
    from recon_kernels.triton._gemm import gemm

    torch.manual_seed(8)
    a = torch.randn(97, 13).to(dtype).to(device).t()  # (13, 97): K = 97, M-major
    b = torch.randn(97, 40).to(dtype).to(device)
    want = 0.37 * (a.double() @ b.double())
    for split in (1, 2, 3, 8):
        out = torch.empty(40, 13, dtype=dtype, device=device).t()  # (13, 40), strides (1, 13)
        gemm(a, b, out, alpha=0.37, split_k=split)
        lowp = (0.37 * (a.float() @ b.float())).to(dtype)  # one rounding of an fp32 result
        assert_rule(f"split_k={split}", out.cpu(), want.cpu(), lowp.cpu(), dtype)


# --------------------------------------------------------------------------- merge


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |t| (float64), normal range."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(t.abs().clamp_min(fi.tiny)))
    return torch.exp2(e) * fi.eps


@pytest.mark.parametrize("backend,device", [*kernel_cases(), pytest.param("eager", "cpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tma,pers", GEMM_SWITCHES)
def test_merge_lora_exact_to_rounding(backend, device, dtype, tma, pers, gemm_switches):
    """merge_lora = W + s·B A correctly rounded from fp32 (<= half an ulp, plus fp32 noise,
    from the exact value); merge_lora_ gives the same bits in place; unmerging restores W
    to within the two roundings. Under every value of the GEMM switches."""
    gemm_switches(tma, pers)
    torch.manual_seed(2)
    w, _, a, bb = _weights(100, 72, 7, False, dtype, device)
    exact = w.cpu().double() + SCALE * (bb.cpu().double() @ a.cpu().double())
    merged = rk.merge_lora(w, a, bb, SCALE, backend=backend)
    assert merged.dtype == dtype and merged.shape == w.shape
    err = (merged.cpu().double() - exact).abs()
    tol = 0.5 * _ulp(exact, dtype) + 1e-6 * exact.abs() + 1e-7
    assert (err <= tol).all(), f"merge off by {(err / _ulp(exact, dtype)).max():.3f} ulp"

    w2 = w.clone()
    out = lora_ops.merge_lora_(w2, a, bb, SCALE, backend=backend)
    assert out is w2
    assert torch.equal(w2, merged), "in-place merge differs from merge_lora"
    lora_ops.merge_lora_(w2, a, bb, -SCALE, backend=backend)
    back = (w2.cpu().double() - w.cpu().double()).abs()
    bound = _ulp(torch.maximum(w.cpu().double().abs(), exact.abs()), dtype) + 1e-6
    assert (back <= bound).all(), "unmerge did not restore W to within rounding"


def test_merge_lora_gradients_eager():
    """merge_lora is differentiable (W, A, B): float64 gradcheck on the eager backend."""
    torch.manual_seed(3)
    w, a, bb = (
        torch.randn(s, dtype=torch.float64).requires_grad_() for s in ((5, 4), (2, 4), (5, 2))
    )
    assert torch.autograd.gradcheck(
        lambda *t: rk.merge_lora(*t, SCALE, backend="eager"), (w, a, bb)
    )


# --------------------------------------------------------------------------- custom ops


def _eager_inputs(dtype=torch.float32, requires_grad=True):
    torch.manual_seed(4)
    x = torch.randn(11, 12, dtype=dtype)
    w, b, a, bb = _weights(12, 9, 3, True, dtype, "cpu")
    return [t.requires_grad_(requires_grad) for t in (x, w, b, a, bb)]


def test_opcheck_ops():
    x, w, b, a, bb = _eager_inputs()
    fwd = torch.ops.recon.lora_linear_fwd.default
    torch.library.opcheck(fwd, (x, w, b, a, bb, SCALE, "eager"))
    torch.library.opcheck(fwd, (x, w.detach(), None, a, bb, 2.0, "eager"))
    _, xa = lora_ops.lora_linear_fwd(*(t.detach() for t in (x, w, b, a, bb)), SCALE, "eager")
    dy = torch.randn(11, 9)
    d = lambda t: t.detach()
    bwd = torch.ops.recon.lora_linear_bwd.default
    torch.library.opcheck(bwd, (dy, d(x), d(w), d(a), d(bb), xa, SCALE, False, True, "eager"))
    torch.library.opcheck(bwd, (dy, d(x), d(w), d(a), d(bb), xa, SCALE, True, False, "eager"))
    torch.library.opcheck(torch.ops.recon.merge_lora_op.default, (w, a, bb, SCALE, "eager"))
    torch.library.opcheck(
        torch.ops.recon.merge_lora_.default, (d(w).clone(), d(a), d(bb), SCALE, "eager")
    )


def test_torch_compile_fullgraph():
    """lora_linear (forward + backward) and merge_lora trace into one graph each."""
    x, w, b, a, bb = _eager_inputs()
    w = w.detach()  # the fine-tuning case: frozen base weight

    def f(x, b, a, bb):
        return rk.lora_linear(x, w, b, a, bb, SCALE, backend="eager").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, b, a, bb)
    grads = torch.autograd.grad(loss, (x, b, a, bb))
    loss_ref = f(x, b, a, bb)
    grads_ref = torch.autograd.grad(loss_ref, (x, b, a, bb))
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)

    merge = torch.compile(
        lambda w, a, bb: rk.merge_lora(w, a, bb, SCALE, backend="eager"),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.testing.assert_close(
        merge(w, a.detach(), bb.detach()), reference.merge_lora(w, a, bb, SCALE)
    )


def test_gradcheck_reference_and_op():
    """float64 gradcheck of the oracle and of the custom op's explicit backward (every
    input, W trainable)."""
    x, w, b, a, bb = _eager_inputs(torch.float64)
    args = (
        x[:3, :5].detach().requires_grad_(),
        w[:4, :5].detach().requires_grad_(),
        b[:4].detach().requires_grad_(),
        a[:, :5].detach().requires_grad_(),
        bb[:4].detach().requires_grad_(),
    )
    assert torch.autograd.gradcheck(lambda *t: reference.lora_linear(*t, SCALE), args)
    assert torch.autograd.gradcheck(lambda *t: rk.lora_linear(*t, SCALE, backend="eager"), args)


_BAD = [
    ("lora_b", lambda a: a.update(lora_b=torch.randn(9, 4)), "rank-mismatch"),
    ("lora_a", lambda a: a.update(lora_a=torch.randn(3, 13)), "a-in"),
    ("x", lambda a: a.update(x=torch.randn(11, 13)), "x-in"),
    ("bias", lambda a: a.update(bias=torch.randn(8)), "bias-shape"),
    ("weight", lambda a: a.update(weight=torch.randn(9)), "weight-rank"),
    ("lora_a", lambda a: a.update(lora_a=a["lora_a"].half()), "dtype-mix"),
    ("lora_b", lambda a: a.update(lora_b=a["lora_b"].to("meta")), "device-mix"),
    ("scale", lambda a: a.update(scale="2"), "scale-type"),
    ("scale", lambda a: a.update(scale=float("nan")), "scale-nan"),
]


@pytest.mark.parametrize("arg,change", [(b[0], b[1]) for b in _BAD], ids=[b[2] for b in _BAD])
def test_bad_input_names_the_argument(arg, change):
    x, w, b, a, bb = _eager_inputs(requires_grad=False)
    args = {"x": x, "weight": w, "bias": b, "lora_a": a, "lora_b": bb, "scale": SCALE}
    change(args)
    with pytest.raises((ValueError, TypeError), match=rf"^{arg}:"):
        rk.lora_linear(**args, backend="eager")
    if arg in ("lora_a", "lora_b", "weight", "scale"):
        with pytest.raises((ValueError, TypeError), match=rf"^{arg}:"):
            rk.merge_lora(args["weight"], args["lora_a"], args["lora_b"], args["scale"])


# --------------------------------------------------------------------------- module


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, name: str, rel: float = 1e-5):
    """Two fp32 computations of the same formula in different summation orders: max error
    <= rel x the tensor's max magnitude (elementwise relative error is meaningless where
    sums cancel). fp32 reordering moves a K-term sum by ~sqrt(K)·6e-8 of its terms' scale:
    K <= 128 here, so 1e-5 leaves a 10x margin and still catches any wrong formula."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{name}: max error {err:.3e} > {rel} x {scale:.3e}"


def _peft_pair(base: nn.Linear, r: int, alpha: float, rslora: bool, backend: str):
    """A peft LoRA Linear and a LoRALinear over copies of ``base``, built from the same RNG
    state (so their default inits can be compared), then given the same non-zero B."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora)
    torch.manual_seed(10)
    peft_layer = PeftLinear(
        copy.deepcopy(base), "default", cfg, r=r, lora_alpha=alpha, use_rslora=rslora
    )
    torch.manual_seed(10)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, use_rslora=rslora, backend=backend)
    return peft_layer, ours


@pytest.mark.parametrize("backend,device", [pytest.param("eager", "cpu"), *kernel_cases()])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_loralinear_matches_peft(backend, device, rslora):
    """Same init (kaiming-uniform A from the same RNG state, zero B), same scaling, output
    equal to the base layer at init; with trained (non-zero) B, the same output and
    gradients of x, A, B as peft's LoRA layer (fp32)."""
    torch.manual_seed(5)
    base = nn.Linear(40, 72).to(device)
    base.weight.requires_grad_(False)
    peft_layer, ours = _peft_pair(base, 8, 16, rslora, backend)
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    assert torch.equal(ours.lora_A.weight, pa), "A init differs from peft's"
    assert ours.lora_B.weight.abs().max().item() == 0.0
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])

    x = torch.randn(3, 5, 40, device=device)
    assert_fp32_close(ours(x), base(x), "y at init")

    with torch.no_grad():
        pb.normal_()
        ours.lora_B.weight.copy_(pb)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y_p, y_o = peft_layer(x1), ours(x2)
    assert_fp32_close(y_o, y_p, "y")
    dy = torch.randn_like(y_p)
    y_p.backward(dy)
    y_o.backward(dy)
    assert_fp32_close(x2.grad, x1.grad, "dx")
    assert_fp32_close(ours.lora_A.weight.grad, pa.grad, "dA")
    assert_fp32_close(ours.lora_B.weight.grad, pb.grad, "dB")
    assert ours.base_layer.weight.grad is None


@pytest.mark.parametrize("backend,device", [pytest.param("eager", "cpu"), *kernel_cases()])
def test_loralinear_merge_unmerge(backend, device):
    """merge() folds s·B A into W in place (the merged forward is the plain base layer and
    matches the unmerged one), unmerge() restores W; repeated calls are no-ops."""
    torch.manual_seed(6)
    m = LoRALinear(nn.Linear(40, 24).to(device), r=4, alpha=8, backend=backend)
    nn.init.normal_(m.lora_B.weight)
    w0 = m.base_layer.weight.detach().clone()
    ptr = m.base_layer.weight.data_ptr()
    x = torch.randn(7, 40, device=device)
    with torch.no_grad():
        y_unmerged = m(x)
        m.merge()
        m.merge()  # no-op
        assert m.merged and m.base_layer.weight.data_ptr() == ptr
        assert_fp32_close(m(x), y_unmerged, "merged y")
        want = w0 + m.scaling * m.lora_B.weight @ m.lora_A.weight
        assert_fp32_close(m.base_layer.weight, want, "merged W", rel=1e-6)
        m.unmerge()
        m.unmerge()  # no-op
        assert not m.merged
        assert_fp32_close(m.base_layer.weight, w0, "unmerged W", rel=1e-6)
        assert_fp32_close(m(x), y_unmerged, "unmerged y")


def test_loralinear_state_dict_trainable_base_and_dropout():
    torch.manual_seed(7)
    m = LoRALinear(nn.Linear(12, 9), r=2, alpha=4.0, dropout=0.5)
    assert set(m.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    }
    assert "merged=False" in repr(m)
    nn.init.normal_(m.lora_B.weight)
    x = torch.randn(64, 12)
    # the base weight trainable too: dW flows through the fused op (eval: no dropout)
    m.eval()
    m(x).sum().backward()
    assert m.base_layer.weight.grad is not None and m.lora_A.weight.grad is not None
    want = torch.ones(64, 9).t() @ x
    assert_fp32_close(m.base_layer.weight.grad, want, "dW")
    # dropout feeds only the LoRA branch in training, like peft
    m.train()
    y_train = m(x)
    with torch.no_grad():
        y_eval = m.eval()(x)
    assert not torch.allclose(y_train, y_eval)
    with pytest.raises(ValueError, match="^r:"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="^base:"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)


# --------------------------------------------------------------------------- static checks

STATIC_VARIANTS = {
    # xa = x Aᵀ and s·xa, g = s·dy B: skinny N = r (the tiles shrink to BLOCK_N = 16)
    "fwd_xa_scaled_copy": (dict(STORE_C2=True), False, [(128, 16, 64, 4, 3), (64, 16, 64, 4, 4)]),
    # y = x Wᵀ + xs Bᵀ + b: the rank-r update as a second K-loop
    "fwd_main_lora_bias": (dict(HAS_AB2=True, HAS_BIAS=True, contiguous_k=(True, True)), True),
    "bwd_dx_lora": (dict(HAS_AB2=True, contiguous_k=(True, False)), True),
    # dA = gᵀ x (M = r: BLOCK_M = 16), dB = s·dyᵀ xa (N = r), dW = dyᵀ x
    "bwd_dA_dB_dW": (
        dict(contiguous_k=(False, False)),
        False,
        [(16, 256, 64, 4, 3), (128, 16, 64, 4, 3)],
    ),
    "merge_add_w": (dict(EPI=2, contiguous_k=(True, False)), False),
}


def test_static_compile_sm90_tensor_cores_no_spills():
    """Every LoRA GEMM variant compiles for sm_90 (and sm_80); the PTX uses wgmma /
    mma.sync and ptxas spills nothing (registers printed with -s)."""
    pytest.importorskip("triton.backends.nvidia")
    check_static_report(compile_report(STATIC_VARIANTS))
