"""masked_softmax_attention / causal_attention: reference, kernels, registration, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DTYPES, LOW_PRECISION, assert_rule, attention_cases, kernel_cases, triton_cases

import recon_kernels as rk
from recon_kernels import reference as R
from recon_kernels.ops import attention as A

# --------------------------------------------------------------------------- helpers


def _inputs(B, H, NQ, NK, D, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (
        torch.randn(*s, generator=g, dtype=torch.float64)
        for s in ((B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D))
    )
    return [t.to(device) for t in (q, k, v, do)]


def _masks(mode, B, H, NQ, NK, device="cpu", seed=1):
    """(mask, key_padding_mask, causal) for a mask mode; every mode with masks has at least
    one fully-masked query row."""
    g = torch.Generator().manual_seed(seed)
    mask = kpm = None
    causal = "causal" in mode
    if "kpm" in mode:
        kpm = torch.rand(B, NK, generator=g) > 0.3
        kpm[:, 0] = True
        kpm[0] = False  # batch 0 is all padding: every row of it is fully masked
    if "rpad" in mode:
        # right padding, as a tokenizer's batch: sequence b holds its first lengths[b] keys
        # (all padding, all real, then lengths a tile past a boundary and just short of one)
        lengths = [0, NK, NK // 2 + 1, 129, 63][:B]
        kpm = torch.arange(NK)[None, :] < torch.tensor(lengths)[:, None]
    if "holes" in mode:
        # padding inside sequence 2 from key Nk/3 on (every 5th): whole real key tiles first,
        # then full tiles that need the per-key test, then the boundary tile
        kpm[2, NK // 3 :: 5] = False
    if "mask" in mode:
        # broadcast over batch: (1, H, Nq, Nk); row NQ // 2 of head 0 sees nothing
        mask = torch.rand(1, H, NQ, NK, generator=g) > 0.25
        mask[0, 0, NQ // 2] = False
    return (
        None if mask is None else mask.to(device),
        None if kpm is None else kpm.to(device),
        causal,
    )


def _run(fn, tensors, do, **kw):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*ts, **kw)
    out.backward(do)
    return out.detach(), [t.grad for t in ts]


def _call(
    q, k, v, mask=None, key_padding_mask=None, causal=False, backend=None, deterministic=None
):
    kw = {} if deterministic is None else {"deterministic": deterministic}
    if causal:
        assert mask is None
        return rk.causal_attention(
            q, k, v, key_padding_mask=key_padding_mask, backend=backend, **kw
        )
    return rk.masked_softmax_attention(
        q, k, v, mask, key_padding_mask=key_padding_mask, backend=backend, **kw
    )


def _numpy_attention(q, k, v, allowed, scale):
    """Independent float64 formula: loops over rows, numpy softmax."""
    q, k, v = (t.numpy() for t in (q, k, v))
    B, H, NQ, D = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(NQ):
                ok = allowed[b, h, i]
                if not ok.any():
                    continue
                s = (k[b, h] @ q[b, h, i]) * scale
                s = np.where(ok, s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, i] = p @ v[b, h]
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- reference


MODES = ["none", "kpm", "mask", "causal", "causal_kpm", "mask_kpm"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("NQ,NK", [(5, 5), (7, 3), (3, 7)])
def test_reference_matches_independent_formula(mode, NQ, NK):
    B, H, D = 2, 2, 6
    q, k, v, _ = _inputs(B, H, NQ, NK, D)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    allowed = np.ones((B, H, NQ, NK), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(mask.numpy(), allowed.shape)
    if kpm is not None:
        allowed &= kpm.numpy()[:, None, None, :]
    if causal:
        i, j = np.arange(NQ)[:, None], np.arange(NK)[None, :]
        allowed &= j <= i + NK - NQ
    scale = 0.37
    want = _numpy_attention(q, k, v, allowed, scale)
    got = R.attention(q, k, v, mask=mask, key_padding_mask=kpm, scale=scale, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    B, H, NQ, NK, D = 2, 1, 4, 5, 3
    q, k, v, _ = _inputs(B, H, NQ, NK, D)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    ts = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: R.attention(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal), ts
    )


@pytest.mark.parametrize("mode", MODES)
def test_eager_backend_explicit_backward_matches_autograd(mode):
    """The eager custom op (explicit FlashAttention-style backward) vs autograd of the oracle."""
    B, H, NQ, NK, D = 2, 2, 9, 7, 5
    q, k, v, do = _inputs(B, H, NQ, NK, D)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    ref, ref_g = _run(
        lambda q, k, v: R.attention(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal),
        (q, k, v),
        do,
    )
    out, g = _run(lambda q, k, v: _call(q, k, v, mask, kpm, causal, backend="eager"), (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v: _call(q, k, v, mask, kpm, causal, backend="eager"),
        [t.detach().clone().requires_grad_() for t in (q, k, v)],
    )


# --------------------------------------------------------------------------- kernels

# (B, H, Nq, Nk, D): every N in {1, 17, 100, 130} and D in {16, 40, 64, 72, 128, 200, 256}
# (every head-dim bucket, 256 partial and full) appears, with Nq == Nk, Nq < Nk and Nq > Nk.
SHAPES = [
    (2, 3, 1, 1, 16),
    (2, 2, 17, 17, 40),
    (1, 2, 100, 100, 64),
    (2, 1, 130, 130, 72),
    (1, 2, 17, 100, 128),
    (2, 1, 100, 17, 40),
    (1, 1, 1, 130, 72),
    (1, 2, 17, 100, 200),
    (2, 1, 33, 33, 256),
]


def _check_kernel(backend, device, dtype, shape, mode, seed=0, deterministic=None):
    B, H, NQ, NK, D = shape
    q, k, v, do = _inputs(B, H, NQ, NK, D, seed=seed)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    ref, ref_g = _run(
        lambda q, k, v: R.attention(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal),
        (q, k, v),
        do,
    )
    # the eager reference in the same (low) precision: the baseline of the tolerance rule
    low, low_g = _run(
        lambda q, k, v: R.attention(q, k, v, mask=mask, key_padding_mask=kpm, causal=causal),
        [t.to(dtype) for t in (q, k, v)],
        do.to(dtype),
    )
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out, g = _run(
        lambda q, k, v: _call(
            q, k, v, dev(mask), dev(kpm), causal, backend=backend, deterministic=deterministic
        ),
        [t.to(device=device, dtype=dtype) for t in (q, k, v)],
        do.to(device=device, dtype=dtype),
    )
    assert out.dtype == dtype and out.device.type == torch.device(device).type
    assert out.transpose(1, 2).is_contiguous(), "output must be stored (B, Nq, H, D)-contiguous"
    out, g = out.cpu(), [t.cpu() for t in g]
    assert_rule("out", out, ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
        assert a.dtype == dtype
        assert_rule(name, a, b, c, dtype)
    return out, g, (mask, kpm, causal)


@pytest.mark.parametrize("backend,device", attention_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(backend, device, dtype, shape, mode):
    if mode != "none" and dtype != torch.bfloat16 and shape[2] * shape[3] > 2000:
        # the big shapes run every mask mode in bf16 and the plain mode in every dtype;
        # the small ones run everything (keeps the interpreter suite short)
        pytest.skip("covered: large shapes run all masks in bf16 only (interpreter time)")
    _check_kernel(backend, device, dtype, shape, mode)


def test_kpm_bounds_and_their_cache():
    """masks.kpm_bounds: (leading real keys, one past the last real key) per sequence;
    the same mask object gives the cached tensor, an in-place change or another object with
    the same values computes them again."""
    from recon_kernels import masks as CA  # (both backends' kernels take these)

    kpm = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]).bool()
    b = CA.kpm_bounds(kpm)
    assert b.dtype == torch.int32 and b.is_contiguous()
    assert b.tolist() == [[2, 4], [0, 0], [5, 5], [0, 3]]
    assert CA.kpm_bounds(kpm) is b
    other = kpm.clone()
    assert CA.kpm_bounds(other) is not b and CA.kpm_bounds(other).tolist() == b.tolist()
    other[1, 2] = True  # in place: _version moves
    assert CA.kpm_bounds(other).tolist()[1] == [0, 3]
    assert CA.kpm_bounds(torch.zeros(2, 0, dtype=torch.bool)).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("backend,device", attention_cases())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "mode,det",
    [
        ("rpad", None),
        ("rpad_causal", None),
        ("rpad_mask", None),
        ("rpad", True),
        ("rpad_holes", None),
    ],
    ids=["rpad", "rpad_causal", "rpad_mask", "rpad-deterministic", "rpad_holes"],
)
def test_right_padded_batches_over_many_tiles(backend, device, dtype, mode, det):
    """A right-padded key padding mask (lengths 0, Nk, Nk/2 + 1, 129, 63) over several key
    tiles: the CUDA kernels take the unmasked path on the all-real tiles and skip the
    all-padding key blocks (AttnArgs::kpm_bounds; the deterministic backward's dQ turns
    too), and the Triton forward skips the per-key test on the full key tiles before a
    sequence's first padding key (KVHI[2 b]; rpad_holes: padding inside a sequence after
    several real tiles); output and every gradient against the float64 oracle, padded keys
    get zero dK and dV."""
    shape = (5, 1, 150, 290, 64) if "causal" not in mode else (5, 1, 290, 290, 64)
    out, g, (mask, kpm, causal) = _check_kernel(
        backend, device, dtype, shape, mode, deterministic=det
    )
    assert g[1][0].abs().max() == 0 and g[2][0].abs().max() == 0  # batch 0: all padding
    assert g[1][2, :, 146:].abs().max() == 0 and g[2][4, :, 63:].abs().max() == 0


@pytest.mark.parametrize("backend,device", attention_cases())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_fully_masked_rows_zero_output_and_gradient(backend, device, dtype):
    B, H, NQ, NK, D = 2, 2, 17, 23, 40
    out, g, (mask, kpm, causal) = _check_kernel(
        backend, device, dtype, (B, H, NQ, NK, D), "mask_kpm"
    )
    # batch 0 is all padding; row NQ//2 of head 0 is masked everywhere
    assert out[0].abs().max() == 0 and out[1, 0, NQ // 2].abs().max() == 0
    assert g[0][0].abs().max() == 0 and g[0][1, 0, NQ // 2].abs().max() == 0
    assert g[1][0].abs().max() == 0 and g[2][0].abs().max() == 0  # padded keys of batch 0
    for t in (out, *g):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend,device", attention_cases())
def test_causal_decode_and_more_queries_than_keys(backend, device):
    """Nq > Nk: the first Nq - Nk rows see no key (bottom-right alignment) and give 0."""
    out, g, _ = _check_kernel(backend, device, torch.float16, (2, 4, 40, 12, 64), "causal")
    assert out[:, :, :28].abs().max() == 0 and out[:, :, 28:].abs().amax(-1).min() > 0
    assert g[0][:, :, :28].abs().max() == 0
    # decode step: one query sees every key
    _check_kernel(backend, device, torch.float16, (2, 2, 1, 37, 16), "causal")


@pytest.mark.parametrize("backend,device", attention_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_qkv_views_and_noncontiguous_grad(backend, device, dtype):
    """q, k, v as strided views of one packed (B, N, 3, H, D) tensor; dO non-contiguous."""
    B, N, H, D = 2, 33, 3, 24
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)  # strided
    kpm = torch.rand(B, N, generator=g) > 0.2
    kpm[:, 0] = True

    def f(packed):
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views
        return q, k, v

    ref, (ref_g,) = _run(lambda p: R.attention(*f(p), key_padding_mask=kpm), [qkv], do)
    low, (low_g,) = _run(
        lambda p: R.attention(*f(p), key_padding_mask=kpm), [qkv.to(dtype)], do.to(dtype)
    )
    qd = qkv.to(device=device, dtype=dtype)
    assert not f(qd)[0].is_contiguous()
    out, (gq,) = _run(
        lambda p: rk.masked_softmax_attention(
            *f(p), key_padding_mask=kpm.to(device), backend=backend
        ),
        [qd],
        do.to(device=device, dtype=dtype),
    )
    assert_rule("out", out.cpu(), ref, low, dtype)
    assert_rule("dqkv", gq.cpu(), ref_g, low_g, dtype)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_many_batch_heads_and_scale(backend, device):
    """B*H well above one wave of programs; a custom scale."""
    B, H, N, D = 16, 24, 3, 16
    q, k, v, do = _inputs(B, H, N, N, D)
    ref = R.attention(q, k, v, scale=0.2, causal=True)
    out = rk.causal_attention(
        *(t.to(device=device, dtype=torch.float32) for t in (q, k, v)), scale=0.2, backend=backend
    )
    low = R.attention(*(t.float() for t in (q, k, v)), scale=0.2, causal=True)
    assert_rule("out", out.cpu(), ref, low, torch.float32)


# --------------------------------------------------------------------------- registration


def test_torch_ops_namespace_and_default_backend():
    q, k, v, _ = _inputs(1, 2, 5, 6, 8)
    kpm = torch.tensor([[True, True, False, True, False, True]])
    want = R.attention(q, k, v, key_padding_mask=kpm)
    got = torch.ops.recon.masked_softmax_attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(got, want)
    got = torch.ops.recon.causal_attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(got, R.attention(q, k, v, key_padding_mask=kpm, causal=True))


@pytest.mark.parametrize("mode", ["none", "mask_kpm", "causal_kpm"])
def test_opcheck(mode):
    B, H, NQ, NK, D = 2, 2, 5, 7, 8
    q, k, v, do = (t.float() for t in _inputs(B, H, NQ, NK, D))
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(A.attention_fwd, (q, k, v, mask, kpm, 0.3, causal, "eager"))
    out, lse = A.attention_fwd(q, k, v, mask, kpm, 0.3, causal, "eager")
    torch.library.opcheck(
        A.attention_bwd,
        (
            do,
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse,
            mask,
            kpm,
            0.3,
            causal,
            "eager",
        ),
    )


def test_opcheck_triton_interpreter():
    if rk.why_unavailable("triton", "cpu") is not None:
        pytest.skip("triton on CPU needs the interpreter (TRITON_INTERPRET=1); a GPU run covers it")
    q, k, v, _ = (t.float() for t in _inputs(1, 2, 5, 7, 16))
    q.requires_grad_()
    kpm = torch.tensor([[True, False, True, True, True, False, True]])
    torch.library.opcheck(
        A.attention_fwd,
        (q, k, v, None, kpm, 0.25, True, "triton"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_torch_compile_fullgraph(causal):
    B, H, N, D = 2, 2, 9, 8
    q, k, v, do = (t.float() for t in _inputs(B, H, N, N, D))
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1, 5:] = False

    def f(q, k, v):
        fn = rk.causal_attention if causal else rk.masked_softmax_attention
        return fn(q, k, v, key_padding_mask=kpm, backend="eager") * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, g = _run(compiled, (q, k, v), do)
    ref, ref_g = _run(f, (q, k, v), do)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor():
    q, k, v, _ = (t.float() for t in _inputs(1, 2, 7, 7, 8))
    f = lambda q, k, v: rk.causal_attention(q.sin(), k, v, backend="eager").cos()  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_multihead_attention_module():
    torch.manual_seed(0)
    m = rk.nn.MultiheadAttention(24, 3, backend="eager").double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, 4:] = False
    # the same computation through torch.nn.MultiheadAttention (inverted padding convention)
    ref = torch.nn.MultiheadAttention(24, 3, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(m.qkv.weight)
        ref.in_proj_bias.copy_(m.qkv.bias)
        ref.out_proj.weight.copy_(m.proj.weight)
        ref.out_proj.bias.copy_(m.proj.bias)
    want, _ = ref(x, x, x, key_padding_mask=~kpm, need_weights=False)
    torch.testing.assert_close(m(x, key_padding_mask=kpm), want)
    mc = rk.nn.MultiheadAttention(24, 3, causal=True, backend="eager").double()
    mc.load_state_dict(m.state_dict())
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    want, _ = ref(x, x, x, attn_mask=~causal, need_weights=False)
    torch.testing.assert_close(mc(x), want)
    # dropout: on in training (the op's hash mask for the drawn seed), off in eval
    md = rk.nn.MultiheadAttention(24, 3, dropout=0.4, backend="eager").double()
    md.load_state_dict(m.state_dict())
    torch.manual_seed(1)
    y = md(x)
    torch.manual_seed(1)
    qkv = md.qkv(x).view(2, 7, 3, 3, 8).permute(2, 0, 3, 1, 4)
    o = rk.masked_softmax_attention(*qkv.unbind(0), dropout_p=0.4, backend="eager")
    torch.testing.assert_close(y, md.proj(o.transpose(1, 2).reshape(2, 7, 24)))
    assert (y - m(x)).abs().max() > 1e-3
    torch.testing.assert_close(md.eval()(x), m(x))
    with pytest.raises(ValueError, match="^dropout: expected a probability"):
        rk.nn.MultiheadAttention(24, 3, dropout=1.0)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_multihead_attention_module_kernels(backend, device):
    torch.manual_seed(0)
    m = rk.nn.MultiheadAttention(32, 2, causal=True, backend=backend).to(device)
    x = torch.randn(2, 11, 32, device=device)
    kpm = torch.ones(2, 11, dtype=torch.bool, device=device)
    kpm[1, 7:] = False
    out = m(x, key_padding_mask=kpm)
    m.backend = "eager"
    torch.testing.assert_close(out, m(x, key_padding_mask=kpm), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _ok():
    return [torch.randn(2, 3, 5, 8) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (
            lambda q, k, v: (q[0], k, v),
            r"q: expected a 4-D tensor \(B, H, Nq, D\), got shape \(3, 5, 8\)",
        ),
        (lambda q, k, v: (q, k[:, :2], v), r"k: expected shape \(2, 3, Nk, 8\)"),
        (lambda q, k, v: (q, k, v[..., :4]), r"v: expected shape \(2, 3, 5, 8\) \(same as k\)"),
        (
            lambda q, k, v: (q, k.double(), v),
            r"k: expected dtype torch.float32 \(same as q\), got torch.float64",
        ),
        (lambda q, k, v: (q.int(), k, v), r"q: expected dtype in"),
        (lambda q, k, v: (q[:, :, :0], k, v), r"expected B, H, Nq, Nk >= 1"),
        (
            lambda q, k, v: tuple(torch.randn(1, 1, 2, 257) for _ in range(3)),
            r"q: head dim D must be in \[1, 256\], got D=257",
        ),
        (
            lambda q, k, v: (q, k.to("meta"), v),
            r"k: expected a tensor on cpu \(same as q\), got meta",
        ),
        (lambda q, k, v: (q.numpy(), k, v), r"q: expected a torch.Tensor, got ndarray"),
    ],
)
def test_bad_tensors(mutate, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rk.masked_softmax_attention(*mutate(*_ok()))


def test_bad_masks_and_scale():
    q, k, v = _ok()
    with pytest.raises(
        ValueError, match=r"mask: expected dtype in \['torch.bool'\], got torch.float32"
    ):
        rk.masked_softmax_attention(q, k, v, torch.zeros(5, 5))
    with pytest.raises(
        ValueError, match=r"mask: expected a shape broadcastable to .*\(2, 3, 5, 5\), got \(4, 5\)"
    ):
        rk.masked_softmax_attention(q, k, v, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask: expected a 2-D or 3-D or 4-D tensor"):
        rk.masked_softmax_attention(q, k, v, torch.ones(5, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"key_padding_mask: expected shape \(B, Nk\) = \(2, 5\), got \(2, 4\)"
    ):
        rk.masked_softmax_attention(q, k, v, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(
        ValueError, match=r"key_padding_mask: expected dtype in \['torch.bool'\], got torch.int64"
    ):
        rk.causal_attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scale: expected a finite float, got nan"):
        rk.causal_attention(q, k, v, scale=math.nan)
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'fast'"):
        rk.causal_attention(q, k, v, backend="fast")


def test_unavailable_backend_says_why():
    q, k, v = _ok()
    with pytest.raises(RuntimeError, match=r"backend='cuda' is unavailable for tensors on cpu: .*"):
        rk.masked_softmax_attention(q, k, v, backend="cuda")


def test_float64_only_on_eager():
    q, k, v = (t.double() for t in _ok())
    if rk.why_unavailable("triton", "cpu") is not None:
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (no GPU here)")
    with pytest.raises(ValueError, match=r"dtype: backend 'triton' supports .* got torch.float64"):
        rk.masked_softmax_attention(q, k, v, backend="triton")
    # auto picks eager for float64
    torch.testing.assert_close(rk.masked_softmax_attention(q, k, v), R.attention(q, k, v))


@pytest.mark.parametrize("backend,device", attention_cases())
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_right_padded_batches(backend, device, causal):
    """HF-style right padding: the kernels stop at each sequence's last real key, and the
    padded key blocks get exactly zero dK/dV."""
    B, H, N, D = 4, 2, 70, 32
    q, k, v, do = _inputs(B, H, N, N, D, seed=5)
    lengths = torch.tensor([70, 5, 37, 0])
    kpm = torch.arange(N)[None, :] < lengths[:, None]
    ref, ref_g = _run(
        lambda q, k, v: R.attention(q, k, v, key_padding_mask=kpm, causal=causal), (q, k, v), do
    )
    dt = torch.bfloat16
    low, low_g = _run(
        lambda q, k, v: R.attention(q, k, v, key_padding_mask=kpm, causal=causal),
        [t.to(dt) for t in (q, k, v)],
        do.to(dt),
    )
    out, g = _run(
        lambda q, k, v: _call(q, k, v, None, kpm.to(device), causal, backend=backend),
        [t.to(device=device, dtype=dt) for t in (q, k, v)],
        do.to(device=device, dtype=dt),
    )
    assert_rule("out", out.cpu(), ref, low, dt)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
        assert_rule(name, a.cpu(), b, c, dt)
    assert g[1][1, :, 5:].abs().max() == 0 and g[2][2, :, 37:].abs().max() == 0


# --------------------------------------------------------------------------- dropout


def test_dropout_keep_mask_statistics():
    """The hash mask keeps 1 - p of the probabilities (binomial 6-sigma band), differs
    between seeds and between (batch, head) pairs, and p = 0 keeps everything."""
    B, H, NQ, NK = 3, 4, 64, 96
    n = B * H * NQ * NK
    for p in (0.1, 0.5, 0.9):
        keep = R.dropout_keep(7, B, H, NQ, NK, p)
        assert keep.shape == (B, H, NQ, NK)
        assert abs(keep.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
        # rows and columns are not correlated: every row keeps about 1 - p of its keys
        per_row = keep.float().mean(-1)
        assert (per_row - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / NK) + 0.01
    a, b = R.dropout_keep(7, B, H, NQ, NK, 0.5), R.dropout_keep(8, B, H, NQ, NK, 0.5)
    assert (a != b).float().mean() > 0.4
    assert (a[0, 0] != a[0, 1]).float().mean() > 0.4 and (a[0, 0] != a[1, 0]).float().mean() > 0.4
    assert R.dropout_keep(7, B, H, NQ, NK, 0.0).all()
    assert R.dropout_threshold(0.25) == 1 << 22


def _seed_after(torch_seed: int) -> int:
    """The dropout seed the public op draws after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**32, (1,), dtype=torch.int64).item())


DROP_CASES = [
    # (shape (B, H, Nq, Nk, D), mask mode, dropout_p)
    ((2, 3, 17, 100, 40), "mask_kpm", 0.3),
    ((2, 2, 100, 17, 72), "causal_kpm", 0.5),
    ((1, 2, 1, 130, 64), "none", 0.1),
    # whole blocks below the causal diagonal: the backward's interior loop with dropout
    ((1, 2, 70, 100, 64), "causal", 0.2),
]


@pytest.mark.parametrize("backend,device", [*attention_cases(), pytest.param("eager", "cpu")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROP_CASES, ids=lambda c: f"{c[1]}-p{c[2]}")
def test_dropout_matches_reference(backend, device, dtype, case):
    """Output and dq, dk, dv with attention dropout vs the float64 reference with the same
    keep mask (the seed the op draws from torch's generator), under the 2x rule; the
    backward regenerates the forward's mask (a mismatch would break the gradients)."""
    (B, H, NQ, NK, D), mode, p = case
    q, k, v, do = _inputs(B, H, NQ, NK, D, seed=3)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    seed = _seed_after(11)

    def ref_fn(q, k, v):
        return R.attention(q, k, v, mask, kpm, None, causal, dropout_p=p, seed=seed)

    ref, ref_g = _run(ref_fn, (q, k, v), do)
    low, low_g = _run(ref_fn, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731

    def op(q, k, v):
        torch.manual_seed(11)
        if causal:
            return rk.causal_attention(
                q, k, v, key_padding_mask=dev(kpm), dropout_p=p, backend=backend
            )
        return rk.masked_softmax_attention(
            q, k, v, dev(mask), key_padding_mask=dev(kpm), dropout_p=p, backend=backend
        )

    out, g = _run(op, [t.to(device=device, dtype=dtype) for t in (q, k, v)], do.to(device, dtype))
    assert_rule("out", out.cpu(), ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
        assert_rule(name, a.cpu(), b, c, dtype)
    # dropout really happened: without it the output is far from this one
    nodrop = R.attention(q, k, v, mask, kpm, None, causal)
    assert (nodrop - ref).abs().max() > 0.1


@pytest.mark.parametrize("backend,device", [*kernel_cases(), pytest.param("eager", "cpu")])
def test_dropout_seeding_and_eval(backend, device):
    """torch.manual_seed repeats the mask; the next call draws a new one; dropout_p = 0 is
    the plain op bit for bit."""
    q, k, v, _ = (t.float().to(device) for t in _inputs(2, 2, 17, 17, 40))
    f = lambda p: rk.masked_softmax_attention(q, k, v, dropout_p=p, backend=backend)  # noqa: E731
    torch.manual_seed(0)
    a, b = f(0.2), f(0.2)
    torch.manual_seed(0)
    assert torch.equal(f(0.2), a)
    assert not torch.equal(a, b)
    assert torch.equal(f(0.0), rk.masked_softmax_attention(q, k, v, backend=backend))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.1", True])
def test_dropout_p_validation(bad):
    q, k, v, _ = (t.float() for t in _inputs(1, 1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"^dropout_p: expected a float in \[0, 1\), got"):
        rk.masked_softmax_attention(q, k, v, dropout_p=bad, backend="eager")


def test_dropout_opcheck_and_compile():
    """The fwd/bwd ops with dropout pass opcheck, and the public op compiles fullgraph with
    dropout (the seed is drawn inside the graph), its backward reusing the forward's mask."""
    q, k, v, do = (t.float() for t in _inputs(2, 2, 5, 7, 8))
    seed = torch.tensor([123], dtype=torch.int64)
    q.requires_grad_()
    args = (q, k, v, None, None, 0.3, False, "eager", 0.25, seed)
    torch.library.opcheck(A.attention_fwd, args)
    out, lse = A.attention_fwd(*args)
    torch.library.opcheck(
        A.attention_bwd,
        (do, q.detach(), k, v, out.detach(), lse, None, None, 0.3, False, "eager", 0.25, seed),
    )

    def f(q, k, v):
        return rk.masked_softmax_attention(q, k, v, dropout_p=0.5, backend="eager")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = compiled(qg, kg, vg)
    out.backward(do)
    # whatever seed the graph drew, out = W V with W = P∘Z/(1-p), Z a 0/1 mask; with
    # Nk = 7 <= D = 8, W is recovered from out by least squares, and dV must be Wᵀ dO
    P = (qg @ kg.transpose(-1, -2) * 8**-0.5).softmax(-1).detach()
    vt = vg.detach().transpose(-1, -2)  # (B, H, D, Nk)
    w = torch.linalg.lstsq(vt.double(), out.detach().transpose(-1, -2).double()).solution
    w = w.transpose(-1, -2).float()  # (B, H, Nq, Nk)
    z = w / (P / 0.5)
    torch.testing.assert_close(z, z.round(), rtol=0, atol=1e-3)
    assert set(z.round().unique().tolist()) <= {0.0, 1.0} and 0 < z.round().mean() < 1
    torch.testing.assert_close(vg.grad, w.transpose(-1, -2) @ do, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- deterministic=

TRITON_CASES = triton_cases()
BWD_KERNELS = (
    "_attn_bwd_atomic_kernel",
    "_bwd_dq_convert_kernel",
    "_attn_bwd_dkdv_kernel",
    "_attn_bwd_dq_kernel",
)


class _Spy:
    """Wraps a Triton kernel: counts its launches (kernel[grid](...)) in ``counts``."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] += 1
            return launch(*args, **kwargs)

        return run


def _spy_backward(monkeypatch) -> dict:
    from recon_kernels.triton import attention as TA

    counts = dict.fromkeys(BWD_KERNELS, 0)
    for name in BWD_KERNELS:
        monkeypatch.setattr(TA, name, _Spy(getattr(TA, name), name, counts))
    return counts


ATOMIC = {"atomic": 1, "convert": 1, "dkdv": 0, "dq": 0}
TWO_PASS = {"atomic": 0, "convert": 0, "dkdv": 1, "dq": 1}


def _launched(counts) -> dict:
    return dict(zip(("atomic", "convert", "dkdv", "dq"), (counts[n] for n in BWD_KERNELS)))


# (B, H, Nq, Nk, D): N in {1, 17, 100}, D in {40, 72}, Nq == Nk, Nq < Nk and Nq > Nk
DET_SHAPES = [
    (2, 2, 17, 17, 40),
    (1, 2, 100, 17, 72),
    (2, 1, 1, 100, 40),
    (1, 1, 17, 100, 72),
]


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DET_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["none", "mask_kpm", "causal", "causal_kpm"])
def test_both_backwards_match_reference(
    backend, device, deterministic, dtype, shape, mode, monkeypatch
):
    """The fused atomic-dQ backward and the two-kernel one, each asked for explicitly: output
    and every gradient vs the float64 oracle under the 2x rule (masks with fully masked rows,
    causal with Nq != Nk), and the kernels launched are the ones the flag names."""
    counts = _spy_backward(monkeypatch)
    _check_kernel(backend, device, dtype, shape, mode, deterministic=deterministic)
    assert _launched(counts) == (TWO_PASS if deterministic else ATOMIC)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "shape,mode",
    [
        ((2, 1, 130, 130, 72), "kpm"),
        ((2, 2, 37, 45, 40), "mask_kpm"),
        ((1, 2, 17, 100, 72), "causal"),
    ],
    ids=["130x72-kpm", "37x45x40-mask_kpm", "17x100x72-causal"],
)
def test_padded_head_dim_backward_matches_reference(
    backend, device, deterministic, dtype, shape, mode, monkeypatch
):
    """RECON_ATTN_BWD_PAD_D=1 (what "auto" does on a GPU for a head dim below its block):
    the backward kernels see zero-padded inputs of the block's width and the gradients,
    cut back to D, still match the float64 oracle under the 2x rule. The shapes are the
    ones whose unpadded fused backward faulted on an H200 under triton 3.6."""
    from recon_kernels.triton import attention as TA

    monkeypatch.setenv("RECON_ATTN_BWD_PAD_D", "1")
    seen = []
    name = "_attn_bwd_dkdv_kernel" if deterministic else "_attn_bwd_atomic_kernel"
    kernel = getattr(TA, name)

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((args[0].shape[-1], kwargs["BLOCK_D"]))
                return kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(TA, name, Spy())
    _check_kernel(backend, device, dtype, shape, mode, deterministic=deterministic)
    block = TA._block_d(shape[-1])
    assert seen == [(block, block)], seen


def test_backward_head_dim_padding_switch(monkeypatch):
    from recon_kernels.triton import attention as TA
    from recon_kernels.triton.attention import bwd_pad_d

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("RECON_ATTN_BWD_PAD_D", raising=False)
    monkeypatch.setattr(TA, "_is_hopper", lambda device: True)
    assert bwd_pad_d(gpu, 72) and bwd_pad_d(gpu, 40) and not bwd_pad_d(gpu, 64)
    assert not bwd_pad_d(cpu, 72)  # auto: Hopper GPUs only (the fault was wgmma code's)
    monkeypatch.setattr(TA, "_is_hopper", lambda device: False)
    assert not bwd_pad_d(gpu, 72)
    monkeypatch.setattr(TA, "_is_hopper", lambda device: True)
    monkeypatch.setenv("RECON_ATTN_BWD_PAD_D", "1")
    assert bwd_pad_d(cpu, 72) and not bwd_pad_d(cpu, 128)
    monkeypatch.setenv("RECON_ATTN_BWD_PAD_D", "0")
    assert not bwd_pad_d(gpu, 72)
    monkeypatch.setenv("RECON_ATTN_BWD_PAD_D", "yes")
    with pytest.raises(ValueError, match=r"RECON_ATTN_BWD_PAD_D: expected one of .*'yes'"):
        bwd_pad_d(gpu, 72)


def _spy_d_split(monkeypatch, deterministic):
    """Records (kernel, D_SPLIT, grid size) of each backward kernel launch."""
    from recon_kernels.triton import attention as TA

    seen = []
    names = ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel") if deterministic else (
        "_attn_bwd_atomic_kernel",
    )  # fmt: skip
    for name in names:
        kernel = getattr(TA, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def run(*args, **kwargs):
                    meta = {"BLOCK_M": 32, "BLOCK_N": 16}  # the interpreter's one config
                    seen.append((name, kwargs["D_SPLIT"], grid(meta)[0]))
                    return kernel[grid](*args, **kwargs)

                return run

        monkeypatch.setattr(TA, name, Spy())
    return seen


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "shape,mode",
    [
        ((2, 1, 130, 130, 72), "kpm"),
        ((2, 2, 37, 45, 40), "mask_kpm"),
        ((1, 2, 17, 100, 72), "causal"),
        ((2, 1, 20, 33, 64), "none"),
    ],
    ids=["130x72-kpm", "37x45x40-mask_kpm", "17x100x72-causal", "20x33x64-none"],
)
def test_backward_d_split_matches_reference(
    backend, device, deterministic, dtype, shape, mode, monkeypatch
):
    """RECON_ATTN_BWD_DSPLIT=2 (what "auto" does at BLOCK_D = 256): two programs per
    backward tile, each owning half of dK, dV, dQ's columns (the scores over all of D), at
    head dims below and at their block, every mask mode: the 2x rule on every gradient, and
    the kernels launched with D_SPLIT = 2 on twice the programs."""
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", "2")
    seen = _spy_d_split(monkeypatch, deterministic)
    _check_kernel(backend, device, dtype, shape, mode, deterministic=deterministic)
    B, H, NQ, NK, _ = shape
    blocks = {"_attn_bwd_dq_kernel": -(-NQ // 32)}
    want = [
        (name, 2, 2 * B * H * blocks.get(name, -(-NK // 16)))
        for name in (
            ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
            if deterministic
            else ("_attn_bwd_atomic_kernel",)
        )
    ]
    assert seen == want, seen


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
def test_backward_d_split_with_dropout(backend, device, deterministic, monkeypatch):
    """D_SPLIT = 2 with dropout: both programs of a tile regenerate the same keep mask."""
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", "2")
    seen = _spy_d_split(monkeypatch, deterministic)
    (B, H, NQ, NK, D), mode, p = DROP_CASES[0]
    dtype = torch.bfloat16
    q, k, v, do = _inputs(B, H, NQ, NK, D, seed=3)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    seed = _seed_after(11)

    def ref_fn(q, k, v):
        return R.attention(q, k, v, mask, kpm, None, causal, dropout_p=p, seed=seed)

    ref, ref_g = _run(ref_fn, (q, k, v), do)
    low, low_g = _run(ref_fn, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731

    def op(q, k, v):
        torch.manual_seed(11)
        return rk.masked_softmax_attention(
            q, k, v, dev(mask), key_padding_mask=dev(kpm), dropout_p=p, backend=backend,
            deterministic=deterministic,
        )  # fmt: skip

    out, g = _run(op, [t.to(device=device, dtype=dtype) for t in (q, k, v)], do.to(device, dtype))
    assert seen and all(ds == 2 for _, ds, _ in seen), seen
    assert_rule("out", out.cpu(), ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
        assert_rule(name, a.cpu(), b, c, dtype)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("fast", ["1", "0"], ids=["fast", "one-loop"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize(
    "shape,mode,d_split",
    [
        ((1, 2, 100, 70, 64), "causal", "auto"),
        ((1, 2, 70, 100, 64), "causal", "auto"),
        ((3, 1, 96, 80, 64), "rpad_causal", "auto"),
        ((2, 1, 64, 96, 32), "none", "auto"),
        ((3, 1, 70, 100, 64), "rpad", "2"),
    ],
    ids=["100x70-causal", "70x100-causal", "96x80-rpad_causal", "64x96-none", "rpad-dsplit2"],
)
def test_backward_interior_blocks_match_reference(
    backend, device, fast, deterministic, shape, mode, d_split, monkeypatch
):
    """RECON_ATTN_BWD_FAST=1 (default): the backward's interior blocks (whole query and key
    blocks, every pair allowed) run a loop with no load masks and no test, the causal
    diagonal, the partial last blocks and the padding keys the tested loop; at Nq > Nk and
    Nq < Nk (the diagonal offset), right padding (whole key blocks before a sequence's first
    padding key), whole blocks only, and with D_SPLIT = 2. "0" (one tested loop) too."""
    monkeypatch.setenv("RECON_ATTN_BWD_FAST", fast)
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", d_split)
    _check_kernel(backend, device, torch.bfloat16, shape, mode, deterministic=deterministic)


def test_backward_fast_switch(monkeypatch):
    from recon_kernels.triton.attention import bwd_fast, bwd_interior, static_constexprs

    monkeypatch.delenv("RECON_ATTN_BWD_FAST", raising=False)
    assert bwd_fast() and static_constexprs("dkdv")["INTERIOR"]
    # the interior needs head dim = block, no general mask, and not D = 256 with dropout
    assert bwd_interior(128, 128, False, True) and bwd_interior(256, 256, False, False)
    assert not bwd_interior(128, 72, False, False) and not bwd_interior(64, 64, True, False)
    assert not bwd_interior(256, 256, False, True)
    assert not static_constexprs("dq", 128, has_mask=True)["INTERIOR"]
    monkeypatch.setenv("RECON_ATTN_BWD_FAST", "0")
    assert not bwd_fast() and not static_constexprs("atomic")["INTERIOR"]
    assert not bwd_interior(128, 128, False, False)
    monkeypatch.setenv("RECON_ATTN_BWD_FAST", "yes")
    with pytest.raises(ValueError, match=r"RECON_ATTN_BWD_FAST: expected one of .*'yes'"):
        bwd_fast()


def test_backward_d_split_switch(monkeypatch):
    from recon_kernels.triton.attention import bwd_d_split

    monkeypatch.delenv("RECON_ATTN_BWD_DSPLIT", raising=False)
    monkeypatch.delenv("RECON_ATTN_TILES", raising=False)
    # auto: 16-bit operands at BLOCK_D = 256 only
    assert bwd_d_split(256, 2) == 2 and bwd_d_split(256, 4) == 1 and bwd_d_split(128, 2) == 1
    monkeypatch.setenv("RECON_ATTN_TILES", "legacy")
    assert bwd_d_split(256, 2) == 1
    monkeypatch.delenv("RECON_ATTN_TILES")
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", "1")
    assert bwd_d_split(256, 2) == 1
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", "2")
    assert bwd_d_split(64, 4) == 2 and bwd_d_split(32, 2) == 2 and bwd_d_split(16, 2) == 1
    monkeypatch.setenv("RECON_ATTN_BWD_DSPLIT", "on")
    with pytest.raises(ValueError, match=r"RECON_ATTN_BWD_DSPLIT: expected one of .*'on'"):
        bwd_d_split(256, 2)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", DROP_CASES[:2], ids=lambda c: f"{c[1]}-p{c[2]}")
def test_both_backwards_with_dropout(backend, device, deterministic, dtype, case, monkeypatch):
    """Dropout: both backwards regenerate the forward's keep mask (2x rule, every gradient)."""
    (B, H, NQ, NK, D), mode, p = case
    q, k, v, do = _inputs(B, H, NQ, NK, D, seed=3)
    mask, kpm, causal = _masks(mode, B, H, NQ, NK)
    seed = _seed_after(11)

    def ref_fn(q, k, v):
        return R.attention(q, k, v, mask, kpm, None, causal, dropout_p=p, seed=seed)

    ref, ref_g = _run(ref_fn, (q, k, v), do)
    low, low_g = _run(ref_fn, [t.to(dtype) for t in (q, k, v)], do.to(dtype))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731

    def op(q, k, v):
        torch.manual_seed(11)
        kw = dict(dropout_p=p, backend=backend, deterministic=deterministic)
        if causal:
            return rk.causal_attention(q, k, v, key_padding_mask=dev(kpm), **kw)
        return rk.masked_softmax_attention(q, k, v, dev(mask), key_padding_mask=dev(kpm), **kw)

    counts = _spy_backward(monkeypatch)
    out, g = _run(op, [t.to(device=device, dtype=dtype) for t in (q, k, v)], do.to(device, dtype))
    assert _launched(counts) == (TWO_PASS if deterministic else ATOMIC)
    assert_rule("out", out.cpu(), ref, low, dtype)
    for name, a, b, c in zip(("dq", "dk", "dv"), g, ref_g, low_g):
        assert_rule(name, a.cpu(), b, c, dtype)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_default_is_atomic_and_global_switch_is_deterministic(backend, device, monkeypatch):
    """deterministic defaults to False (FlashAttention's default): the fused kernel runs;
    torch.use_deterministic_algorithms(True) selects the two-kernel backward whatever the
    argument."""
    q, k, v, do = (t.float().to(device) for t in _inputs(1, 2, 17, 23, 16))
    counts = _spy_backward(monkeypatch)
    _run(lambda q, k, v: rk.causal_attention(q, k, v, backend=backend), (q, k, v), do)
    assert _launched(counts) == ATOMIC
    prev = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    counts.update(dict.fromkeys(counts, 0))
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        _run(
            lambda q, k, v: rk.causal_attention(q, k, v, backend=backend, deterministic=False),
            (q, k, v),
            do,
        )
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)
    assert _launched(counts) == TWO_PASS


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("mode", ["mask_kpm", "causal"])
def test_deterministic_backward_is_bit_reproducible(backend, device, mode):
    """deterministic=True: two runs give bit-identical gradients. The atomic path: dK and dV
    are bit-identical too (no atomics), dQ equal up to the order of fp32 additions. On a GPU
    the shape has many key blocks adding into each dQ row concurrently."""
    B, H, N, D = (2, 4, 1000, 64) if device == "cuda" else (1, 2, 70, 40)
    q, k, v, do = (t.to(device=device, dtype=torch.bfloat16) for t in _inputs(B, H, N, N, D))
    mask, kpm, causal = _masks(mode, B, H, N, N, device=device)

    def grads(deterministic):
        return _run(
            lambda q, k, v: _call(q, k, v, mask, kpm, causal, backend, deterministic),
            (q, k, v),
            do,
        )[1]

    a, b = grads(True), grads(True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name}: deterministic=True differs between two runs"
    (dq1, dk1, dv1), (dq2, dk2, dv2) = grads(False), grads(False)
    assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2)
    # fp32 sums in another order, rounded to bf16: at most an ulp or two apart
    torch.testing.assert_close(dq1, dq2, rtol=2**-6, atol=1e-3)


CUDA_ATTN_CASES = [c for c in attention_cases() if c.values[0] == "cuda"]


@pytest.mark.parametrize("backend,device", CUDA_ATTN_CASES)
@pytest.mark.parametrize("mode", ["mask_kpm", "causal"])
def test_cuda_deterministic_backward(backend, device, mode):
    """cuda: deterministic=True keeps to the kernel the choice names (the sm_90a backward
    where "cuda-emu-sm90" asks for it, as auto does on a Hopper GPU, with its dQ sums in
    key-block order; the emulator's launch counts show which kernel ran), two runs are
    bit-identical and pass the 2x rule; deterministic=False gives the same dK and dV bits
    and dQ up to the order of its fp32 sums. (The order itself: test_cuda_emulator's
    test_emulated_sm90_backward_deterministic_order, with several blocks resident.)"""
    from recon_kernels import cuda as rkcuda
    from recon_kernels.cuda import _loader

    dtype = torch.bfloat16
    B, H, NQ, NK, D = (2, 4, 700, 700, 64) if device == "cuda" else (1, 2, 70, 65, 40)
    q, k, v, do = (t.to(device=device, dtype=dtype) for t in _inputs(B, H, NQ, NK, D))
    mask, kpm, causal = _masks(mode, B, H, NQ, NK, device=device)
    sm90 = rkcuda.attention.bwd_choice(q, k, v, do) == "sm90"
    emu = _loader.emulator()
    count = lambda: emu.launch_counts().get("attention_bwd_sm90", 0) if emu else 0  # noqa: E731

    def grads(deterministic):
        before = count()
        g = _run(
            lambda q, k, v: _call(q, k, v, mask, kpm, causal, backend, deterministic),
            (q, k, v),
            do,
        )[1]
        ran = count() - before
        if emu is not None:
            assert (ran > 0) == sm90, f"attention_bwd_sm90 ran {ran} times, choice sm90={sm90}"
        return g

    a, b = grads(True), grads(True)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name}: deterministic=True differs between two runs"
    dq, dk, dv = grads(False)
    assert torch.equal(dk, a[1]) and torch.equal(dv, a[2])
    torch.testing.assert_close(dq, a[0], rtol=2**-6, atol=1e-3)
    _check_kernel(backend, device, dtype, (B, H, NQ, NK, D), mode, deterministic=True)


@pytest.mark.parametrize("backend,device", [*kernel_cases(), pytest.param("eager", "cpu")])
def test_every_backend_accepts_deterministic(backend, device):
    """The flag is accepted everywhere. eager has only a deterministic backward, and cuda's
    float32 one is the portable kernel either way: the flag changes nothing there; triton's
    two backwards agree under the tolerance rule elsewhere."""
    q, k, v, do = (t.float().to(device) for t in _inputs(2, 2, 9, 12, 16))
    kpm = torch.ones(2, 12, dtype=torch.bool, device=device)
    kpm[1, 7:] = False

    def f(det):
        return lambda q, k, v: rk.masked_softmax_attention(
            q, k, v, key_padding_mask=kpm, backend=backend, deterministic=det
        )

    out1, g1 = _run(f(True), (q, k, v), do)
    out2, g2 = _run(f(False), (q, k, v), do)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        if backend == "triton":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, 1.0, torch.tensor(True)], ids=repr)
def test_deterministic_validation(bad):
    q, k, v, _ = (t.float() for t in _inputs(1, 1, 3, 3, 8))
    msg = r"^deterministic: expected a bool, got "
    with pytest.raises(ValueError, match=msg):
        rk.masked_softmax_attention(q, k, v, deterministic=bad, backend="eager")
    with pytest.raises(ValueError, match=msg):
        rk.causal_attention(q, k, v, deterministic=bad, backend="eager")
    with pytest.raises(ValueError, match=msg):
        rk.nn.MultiheadAttention(8, 1, deterministic=bad)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "two-pass"])
def test_deterministic_under_torch_compile(backend, device, deterministic, monkeypatch):
    """fullgraph compile: the flag is a constant of the opaque op's schema, and the compiled
    backward launches the kernels it names; the schema of torch.ops.recon.* carries it."""
    q, k, v, do = (t.float().to(device) for t in _inputs(1, 2, 9, 9, 16))

    def f(q, k, v):
        out = rk.causal_attention(q, k, v, backend=backend, deterministic=deterministic)
        return out * 2.0

    counts = _spy_backward(monkeypatch)
    out, g = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), (q, k, v), do)
    assert _launched(counts) == (TWO_PASS if deterministic else ATOMIC)
    ref, ref_g = _run(f, (q, k, v), do)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b)
    for op in (torch.ops.recon.masked_softmax_attention, torch.ops.recon.causal_attention):
        assert "bool deterministic=False" in str(op.default._schema)


def test_deterministic_opcheck():
    q, k, v, do = (t.float() for t in _inputs(2, 2, 5, 7, 8))
    q.requires_grad_()
    for det in (False, True):
        args = (q, k, v, None, None, 0.3, True, "eager", 0.0, None, det)
        torch.library.opcheck(A.attention_fwd, args)
        out, lse = A.attention_fwd(*args)
        bwd = (do, q.detach(), k, v, out.detach(), lse, None, None, 0.3, True, "eager")
        torch.library.opcheck(A.attention_bwd, (*bwd, 0.0, None, det))


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_multihead_attention_passes_deterministic(backend, device, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 11, 32, device=device)
    counts = _spy_backward(monkeypatch)
    for det, want in ((False, ATOMIC), (True, TWO_PASS)):
        m = rk.nn.MultiheadAttention(32, 2, causal=True, backend=backend, deterministic=det)
        m.to(device)(x).sum().backward()
        assert _launched(counts) == want, f"deterministic={det}"
        counts.update(dict.fromkeys(counts, 0))
