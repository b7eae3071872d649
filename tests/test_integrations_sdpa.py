"""rk.scaled_dot_product_attention / rk.patch_sdpa against torch's SDPA.

Oracle: torch.nn.functional.scaled_dot_product_attention run in float64; tolerance: the
FlashAttention rule (our error <= 2 x torch's own float32 error + atol, conftest.assert_rule).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rule, kernel_cases

import recon_kernels as rk
from recon_kernels.integrations import _log as warn_log
from recon_kernels.integrations import sdpa as sdpa_mod

BACKENDS = [pytest.param("eager", "cpu", id="eager-cpu"), *kernel_cases()]
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture
def spy(monkeypatch):
    """Counts calls that reach torch's SDPA (fallbacks) and the fused ops."""
    calls = {"torch": 0, "fused": 0}

    def torch_spy(*a, **k):
        calls["torch"] += 1
        return TORCH_SDPA(*a, **k)

    def wrap(fn):
        def inner(*a, **k):
            calls["fused"] += 1
            return fn(*a, **k)

        return inner

    monkeypatch.setattr(sdpa_mod, "_torch_sdpa", torch_spy)
    monkeypatch.setattr(sdpa_mod, "causal_attention", wrap(sdpa_mod.causal_attention))
    monkeypatch.setattr(
        sdpa_mod, "masked_softmax_attention", wrap(sdpa_mod.masked_softmax_attention)
    )
    return calls


def _qkv(shape_q, shape_k, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(device, dtype)
    k = torch.randn(shape_k, generator=g).to(device, dtype)
    v = torch.randn(shape_k, generator=g).to(device, dtype)
    return q, k, v


def _masks(B, H, L, S, device):
    g = torch.Generator().manual_seed(1)
    full = torch.rand(B, H, L, S, generator=g) > 0.4
    full[0, 0, 0] = False  # a fully masked row
    kpm = torch.ones(B, 1, 1, S, dtype=torch.bool)
    kpm[-1, ..., S // 2 :] = False
    return {
        "none": None,
        "full": full.to(device),  # (B, H, L, S)
        "kpm": kpm.to(device),  # (B, 1, 1, S): the key-padding fast path
        "kpm_expanded": kpm.to(device).expand(B, H, L, S),  # stride-0 view of it
        "rows": (torch.rand(L, S, generator=g) > 0.5).to(device),  # (L, S) broadcast
        "heads": (torch.rand(1, H, 1, S, generator=g) > 0.3).to(device),
    }


def _check(args_fn, kwargs, backend, device, spy, expect_fused=True, ref_mask=None):
    """Forward and q/k/v gradients of ours vs torch (fp32 and the fp64 oracle).

    ref_mask: the mask torch gets instead of ours (then without is_causal)."""
    q, k, v, mask = args_fn()
    ins = [t.requires_grad_() for t in (q, k, v)]
    out = rk.scaled_dot_product_attention(*ins, attn_mask=mask, backend=backend, **kwargs)
    if ref_mask is not None:
        mask, kwargs = ref_mask, {}
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)

    ref32 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o32 = TORCH_SDPA(*ref32, attn_mask=mask, **kwargs)
    g32 = torch.autograd.grad(o32, ref32, g)
    ref64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    m64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    o64 = TORCH_SDPA(*ref64, attn_mask=m64, **kwargs)
    g64 = torch.autograd.grad(o64, ref64, g.double())

    assert out.dtype == o32.dtype and out.shape == o32.shape
    assert_rule("out", out, o64, o32, torch.float32)
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, g32):
        assert_rule(name, a, b, c, torch.float32)
    assert (spy["fused"] == 1) == expect_fused, spy
    assert (spy["torch"] == 0) == expect_fused, spy


# --------------------------------------------------------------------------- fused paths


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "full", "kpm", "kpm_expanded", "rows", "heads"])
def test_bool_masks(backend, device, mask_kind, spy):
    B, H, L, S, E = 2, 3, 6, 9, 16

    def args():
        return (*_qkv((B, H, L, E), (B, H, S, E), device), _masks(B, H, L, S, device)[mask_kind])

    _check(args, {}, backend, device, spy)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("L,S", [(5, 5), (4, 9), (9, 4), (1, 6)])
def test_is_causal_top_left(backend, device, L, S, spy):
    def args():
        return (*_qkv((2, 2, L, 16), (2, 2, S, 16), device), None)

    _check(args, {"is_causal": True}, backend, device, spy)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_is_causal_with_bool_mask_is_their_and(backend, device, spy):
    # torch's CPU path applies both; on CUDA torch rejects the pair, we still apply both
    mask = _masks(2, 3, 6, 8, device)["full"]
    tril = torch.ones(6, 8, dtype=torch.bool, device=device).tril()

    def args():
        return (*_qkv((2, 3, 6, 16), (2, 3, 8, 16), device), mask)

    _check(args, {"is_causal": True}, backend, device, spy, ref_mask=mask & tril)


@pytest.mark.parametrize("kind", ["kpm", "kpm_expanded"])
def test_padding_masks_take_the_key_padding_path(kind, monkeypatch):
    seen = []
    real = sdpa_mod.masked_softmax_attention

    def spy_op(q, k, v, mask=None, *, key_padding_mask=None, **kw):
        seen.append((mask, key_padding_mask))
        return real(q, k, v, mask, key_padding_mask=key_padding_mask, **kw)

    monkeypatch.setattr(sdpa_mod, "masked_softmax_attention", spy_op)
    q, k, v = _qkv((2, 3, 6, 16), (2, 3, 9, 16), "cpu")
    m = _masks(2, 3, 6, 9, "cpu")[kind]
    rk.scaled_dot_product_attention(q, k, v, m, backend="eager")
    ((mask, kpm),) = seen
    assert mask is None
    assert torch.equal(kpm, m[:, 0, 0, :])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "shape_q,shape_k,mask_shape",
    [
        ((5, 16), (7, 16), (5, 7)),  # 2-D: no batch, no heads
        ((3, 5, 16), (3, 7, 16), (3, 1, 7)),  # 3-D (N, L, E), per-batch key mask
        ((2, 2, 3, 5, 8), (2, 2, 3, 7, 8), (2, 1, 1, 5, 7)),  # 5-D
        ((1, 3, 5, 16), (2, 3, 7, 16), (2, 1, 1, 7)),  # batch broadcast of q
        ((2, 2, 3, 5, 8), (3, 7, 8), None),  # ranks differ, k/v broadcast
    ],
)
def test_ranks_and_broadcasting(backend, device, shape_q, shape_k, mask_shape, spy):
    def args():
        q, k, v = _qkv(shape_q, shape_k, device)
        m = None
        if mask_shape is not None:
            g = torch.Generator().manual_seed(3)
            m = (torch.rand(mask_shape, generator=g) > 0.3).to(device)
        return q, k, v, m

    _check(args, {}, backend, device, spy)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_scale(backend, device, scale, spy):
    def args():
        return (*_qkv((2, 2, 5, 40), (2, 2, 7, 40), device), None)

    _check(args, {"scale": scale}, backend, device, spy)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_enable_gqa_with_equal_heads_is_fused(backend, device, spy):
    def args():
        return (*_qkv((2, 2, 5, 16), (2, 2, 7, 16), device), None)

    _check(args, {"enable_gqa": True}, backend, device, spy)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, device, dtype, spy):
    q, k, v = _qkv((2, 2, 6, 16), (2, 2, 9, 16), device, dtype)
    mask = _masks(2, 2, 6, 9, device)["kpm"]
    out = rk.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    # the rule's baseline is eager math in the low precision (torch's CPU SDPA keeps fp32
    # probabilities, so it is more accurate than what the rule asks of a kernel)
    lowp = rk.reference.attention(q, k, v, key_padding_mask=mask[:, 0, 0])
    ref = TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=mask)
    assert out.dtype == dtype
    assert_rule("out", out, ref, lowp, dtype)
    assert spy == {"torch": 0, "fused": 1}


# --------------------------------------------------------------------------- float masks


def _float_mask(kind, B, H, L, S, device, dtype=torch.float32):
    allowed = _masks(B, H, L, S, "cpu")["full"]
    if kind == "neg_inf":
        m = torch.zeros(B, H, L, S).masked_fill(~allowed, float("-inf"))
    elif kind == "finfo_min_no_empty_row":
        allowed[:, :, :, 0] = True
        m = torch.zeros(B, H, L, S).masked_fill(~allowed, torch.finfo(dtype).min)
    elif kind == "finfo_min_empty_row":  # allowed[0, 0, 0] is all False
        m = torch.zeros(B, H, L, S).masked_fill(~allowed, torch.finfo(dtype).min)
    else:  # an additive bias
        m = torch.randn(B, H, L, S, generator=torch.Generator().manual_seed(4))
    return m.to(device, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "kind,policy,fused",
    [
        ("neg_inf", "fallback", False),
        ("bias", "fallback", False),
        ("neg_inf", "check", True),
        ("finfo_min_no_empty_row", "check", True),
        ("finfo_min_empty_row", "check", False),  # torch: uniform row; ours would be 0
        ("bias", "check", False),
        ("neg_inf", "binary", True),
        ("finfo_min_no_empty_row", "binary", True),
    ],
)
def test_float_mask_policies(backend, device, kind, policy, fused, spy):
    B, H, L, S = 2, 2, 5, 7
    q, k, v = _qkv((B, H, L, 16), (B, H, S, 16), device)
    m = _float_mask(kind, B, H, L, S, device)
    out = rk.scaled_dot_product_attention(q, k, v, m, backend=backend, float_masks=policy)
    ref = TORCH_SDPA(q.double(), k.double(), v.double(), attn_mask=m.double())
    assert_rule("out", out, ref, TORCH_SDPA(q, k, v, attn_mask=m), torch.float32)
    assert spy == ({"torch": 0, "fused": 1} if fused else {"torch": 1, "fused": 0})


def test_float_mask_check_runs_once_per_mask_version(monkeypatch):
    checks = []
    real = sdpa_mod._check_float_mask_values
    monkeypatch.setattr(
        sdpa_mod, "_check_float_mask_values", lambda m: (checks.append(1), real(m))[1]
    )
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 6, 8), "cpu")
    m = _float_mask("neg_inf", 1, 2, 4, 6, "cpu")
    for _ in range(3):  # a mask shared by all layers of one forward
        rk.scaled_dot_product_attention(q, k, v, m, float_masks="check", backend="eager")
    assert len(checks) == 1
    m.add_(0.0)  # bumps the version counter: the values may have changed
    rk.scaled_dot_product_attention(q, k, v, m, float_masks="check", backend="eager")
    assert len(checks) == 2


# --------------------------------------------------------------------------- fallbacks


def test_fallbacks_taken_exactly_where_documented(spy, caplog, monkeypatch):
    warn_log.reset()
    q, k, v = _qkv((2, 4, 5, 16), (2, 2, 7, 16), "cpu")  # 4 query heads, 2 kv heads
    cases = {
        "gqa": lambda: rk.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "value_dim": lambda: rk.scaled_dot_product_attention(q[:, :2], k, torch.randn(2, 2, 7, 8)),
        "head_dim": lambda: rk.scaled_dot_product_attention(
            *_qkv((1, 1, 3, 264), (1, 1, 4, 264), "cpu")
        ),
        "empty": lambda: rk.scaled_dot_product_attention(q[:, :2, :0], k, v),
        "float_causal": lambda: rk.scaled_dot_product_attention(
            q[:, :2], k, v, torch.zeros(5, 7), is_causal=True, float_masks="binary"
        ),
        "float_grad": lambda: rk.scaled_dot_product_attention(
            q[:, :2], k, v, torch.zeros(5, 7, requires_grad=True), float_masks="binary"
        ),
    }
    with caplog.at_level(logging.WARNING, logger=sdpa_mod.logger.name):
        for name, fn in cases.items():
            before = dict(spy)
            fn()
            assert spy["torch"] == before["torch"] + 1, name
            assert spy["fused"] == before["fused"], name
    # each reason is said once, through logging
    assert len(caplog.records) == len(cases)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=sdpa_mod.logger.name):
        cases["gqa"]()
    assert not caplog.records


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_runs_fused(spy, is_causal):
    """dropout_p > 0 runs on the fused kernels' dropout: the output is the fused op's with
    the same torch seed (and not the undropped one), and the expectation over seeds is
    the undropped attention (dropout is unbiased)."""
    q, k, v = _qkv((2, 2, 5, 16), (2, 2, 7, 16), "cpu")
    torch.manual_seed(7)
    ours = rk.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=is_causal)
    assert spy == {"torch": 0, "fused": 1}
    torch.manual_seed(7)
    if is_causal:  # L < S, top-left: the first L keys, bottom-right aligned
        want = rk.causal_attention(q, k[:, :, :5], v[:, :, :5], dropout_p=0.3)
    else:
        want = rk.masked_softmax_attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert (ours - plain).abs().max() > 0.05
    n = 400
    draws = torch.stack(
        [
            rk.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=is_causal)
            for _ in range(n)
        ]
    )
    # unbiased: every element's mean within 5 standard errors of the undropped value
    bound = 5 * draws.std(0) / n**0.5 + 1e-6
    assert ((draws.mean(0) - plain).abs() <= bound).all()


def test_gqa_fallback_matches_torch():
    q, k, v = _qkv((2, 4, 5, 16), (2, 2, 7, 16), "cpu")
    ours = rk.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_torch_errors_surface():
    q, k, v = _qkv((2, 2, 5, 16), (2, 2, 7, 16), "cpu")
    with pytest.raises(RuntimeError, match="attn_mask"):
        rk.scaled_dot_product_attention(q, k, v, torch.zeros(5, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="float_masks"):
        rk.scaled_dot_product_attention(q, k, v, float_masks="maybe")


def test_autocast_casts_like_torch():
    q, k, v = _qkv((2, 2, 5, 16), (2, 2, 7, 16), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = rk.scaled_dot_product_attention(q, k, v, backend="eager")
        ref = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == ref.dtype == torch.bfloat16
    exact = TORCH_SDPA(q.double(), k.double(), v.double())
    assert_rule("out", ours, exact, ref, torch.bfloat16)


# --------------------------------------------------------------------------- patch_sdpa


def test_patch_sdpa_swaps_and_restores(spy):
    original = F.scaled_dot_product_attention
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 4, 8), "cpu")
    with rk.patch_sdpa(backend="eager"):
        assert F.scaled_dot_product_attention is not original
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert F.scaled_dot_product_attention is original
    assert spy == {"torch": 0, "fused": 1}
    with pytest.raises(KeyError), rk.patch_sdpa():
        raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


def test_patch_sdpa_routes_multihead_attention_math_path(spy):
    # nn.MultiheadAttention (need_weights=False) calls F.scaled_dot_product_attention
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).train()
    x = torch.randn(2, 5, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 3:] = True  # nn.MultiheadAttention: True = padding
    ref = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    with rk.patch_sdpa(backend="eager", float_masks="binary"):
        ours = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    # it hands SDPA a float 0/-inf mask, which float_masks="binary" converts
    assert spy["fused"] >= 1 and spy["torch"] == 0
    exact = mha.double()(
        x.double(), x.double(), x.double(), key_padding_mask=kpm, need_weights=False
    )[0]
    assert_rule("out", ours, exact, ref, torch.float32)


def test_compile_fullgraph_no_graph_break():
    q, k, v = _qkv((2, 2, 5, 16), (2, 2, 7, 16), "cpu")
    mask = _masks(2, 2, 5, 7, "cpu")["kpm_expanded"]

    def f(q, k, v, mask):
        a = rk.scaled_dot_product_attention(q, k, v, mask, backend="eager")
        with rk.patch_sdpa(backend="eager"):
            b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a + b

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, mask), f(q, k, v, mask), rtol=0, atol=0)


def test_importing_the_package_does_not_import_transformers_or_peft():
    import subprocess
    import sys

    code = (
        "import sys, recon_kernels as rk; "
        "assert rk.scaled_dot_product_attention and rk.patch_sdpa and rk.integrations; "
        "bad = [m for m in ('transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad; "
        "rk.integrations.peft.accelerate; assert 'peft' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
