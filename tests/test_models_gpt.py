"""GPT (causal LM) and ImageGPT (next-patch regression)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rule, kernel_cases
from test_models_common import KERNEL_MODULES, assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm


def tiny_gpt(**kw) -> pm.GPT:
    torch.manual_seed(0)
    return pm.GPT.from_name("tiny", backend="eager", vocab_size=61, block_size=32, **kw)


def padded_batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 61, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    mask[2, 4:] = False
    return idx.to(device), mask.to(device)


def test_loss_is_next_token_cross_entropy():
    model = tiny_gpt()
    idx, mask = padded_batch()
    out = model(idx, attention_mask=mask)
    # independent formula: positions t with a real token at t+1 predict idx[t+1]
    logits = out.logits[:, :-1]
    tgt = idx[:, 1:]
    keep = mask[:, 1:]
    ref = F.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    # explicit aligned targets give the same loss
    targets = torch.where(keep, tgt, torch.full_like(tgt, -100))
    targets = torch.cat([targets, torch.full((3, 1), -100)], dim=1)
    torch.testing.assert_close(model(idx, targets, mask).loss, ref, rtol=1e-6, atol=0)


def test_causality_and_padding():
    model = tiny_gpt().eval()
    idx, mask = padded_batch()
    base = model(idx, attention_mask=mask).logits
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 61  # change token 7: only positions >= 7 may change
    out2 = model(idx2, attention_mask=mask).logits
    torch.testing.assert_close(out2[:, :7], base[:, :7], rtol=0, atol=0)
    assert (out2[0, 7:] - base[0, 7:]).abs().max() > 1e-4
    # a padded row equals the same tokens run alone without padding
    alone = model(idx[1:2, :9]).logits
    torch.testing.assert_close(base[1:2, :9], alone, rtol=1e-5, atol=1e-5)


def test_generate_greedy_and_top_k():
    model = tiny_gpt().eval()
    idx = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(idx, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], idx)
    # greedy = argmax of the full forward at every step
    for t in range(5, 11):
        assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))
    # top_k=1 sampling is greedy whatever the temperature
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(idx, 6, temperature=2.0, top_k=1, generator=g), out)
    # sampled tokens stay in the top k
    g = torch.Generator().manual_seed(0)
    s = model.generate(idx, 1, temperature=1.5, top_k=3, generator=g)
    top3 = model(idx).logits[:, -1].topk(3).indices
    assert all(s[b, -1] in top3[b] for b in range(2))
    # context longer than block_size is cropped, not an error
    long = model.generate(torch.zeros(1, 32, dtype=torch.long), 2, temperature=0)
    assert long.shape == (1, 34)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=0)


def test_kv_cache_generate_equals_full_recompute():
    """Cached decoding (one token per step) picks the tokens that recomputing the whole
    context picks, also after the context passes block_size (the window then slides and the
    cache is rebuilt every step); float64 so that no argmax is a near tie."""
    model = tiny_gpt().double().eval()
    idx = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(4))
    cached = model.generate(idx, 40, temperature=0)  # 45 > block_size=32
    full = model.generate(idx, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, full)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = model.generate(idx, 12, temperature=1.3, top_k=5, generator=g1)
    b = model.generate(idx, 12, temperature=1.3, top_k=5, generator=g2, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "backend,device", [pytest.param("eager", "cpu", id="eager-cpu"), *kernel_cases()]
)
def test_kv_cache_hidden_states_match_full_pass(backend, device):
    """Prefill 7 tokens, then 1, 3 and 1 more through the cache (the new queries attend to
    cached keys: causal_attention with Nq < Nk, aligned bottom-right): every position's
    hidden state equals the full pass's, under the 2x rule against float64."""
    torch.manual_seed(0)
    model = pm.GPT.from_name("tiny", backend=backend, vocab_size=61, block_size=32).eval()
    model = model.to(device)
    exact = tiny_gpt().double().eval()
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model.hidden_states(idx.to(device))
        want = exact.hidden_states(idx)
        cache = model.new_cache()
        parts = [
            model.hidden_states(idx[:, a:b].to(device), kv_cache=cache)
            for a, b in ((0, 7), (7, 8), (8, 11), (11, 12))
        ]
    assert cache.length == 12
    assert_rule("cached hidden states", torch.cat(parts, 1).cpu(), want, full.cpu(), torch.float32)
    # the cache is causal-only, bounded by block_size, and one batch shape
    with pytest.raises(ValueError, match="kv_cache: expected causal attention"):
        model.hidden_states(
            idx[:, :2].to(device),
            attention_mask=torch.ones(2, 2, dtype=torch.bool, device=device),
            kv_cache=cache,
        )
    with pytest.raises(ValueError, match="after 12 cached"):
        model.hidden_states(torch.zeros(2, 21, dtype=torch.long, device=device), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache: expected keys of shape"):
        model.hidden_states(torch.zeros(3, 1, dtype=torch.long, device=device), kv_cache=cache)


def test_block_size_error():
    with pytest.raises(ValueError, match="idx: expected at most block_size=32 tokens, got T=33"):
        tiny_gpt()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_gpt_kernel_matches_eager(backend, device):
    model = tiny_gpt().to(device)
    idx, mask = padded_batch(device)
    assert_kernel_parity(model, lambda m: m(idx, attention_mask=mask), backend)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_image_gpt_kernel_matches_eager(backend, device):
    torch.manual_seed(0)
    model = pm.ImageGPT.from_name("tiny", backend="eager").to(device)
    images = torch.rand(3, 1, 8, 8, device=device)
    assert_kernel_parity(model, lambda m, x: m(x), backend, images)


def test_gpt_trains():
    model = tiny_gpt()
    idx, mask = padded_batch()
    first, last = train_smoke(model, lambda m: m(idx, attention_mask=mask))
    assert last < 0.5 * first, (first, last)


def test_image_gpt_is_causal_and_trains():
    torch.manual_seed(0)
    model = pm.ImageGPT.from_name("tiny", backend="eager")
    images = torch.rand(4, 1, 8, 8)
    pred = model.predict(images)
    assert pred.shape == (4, 16, 4)
    # prediction of patch t must not depend on patches >= t: change the last patch
    images2 = images.clone()
    images2[:, :, 6:, 6:] += 1.0  # patch 15 (row-major, 2x2 patches)
    torch.testing.assert_close(model.predict(images2), pred, rtol=0, atol=0)
    images3 = images.clone()
    images3[:, :, :2, :2] += 1.0  # patch 0 changes every later prediction
    assert (model.predict(images3)[:, 1:] - pred[:, 1:]).abs().amax(dim=(0, 2)).min() > 0
    torch.testing.assert_close(model.predict(images3)[:, 0], pred[:, 0], rtol=0, atol=0)
    first, last = train_smoke(model, lambda m: m(images))
    assert last < 0.5 * first, (first, last)
    assert model.complete(images, 8).shape == images.shape
    assert model.features(images).shape == (4, 32)


def test_compile_gpt_training_step():
    model = tiny_gpt()
    idx, mask = padded_batch()
    ref = model(idx, attention_mask=mask).loss.detach()
    loss = compile_train_step(model, lambda m: m(idx, attention_mask=mask))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)


def test_compile_image_gpt_training_step():
    torch.manual_seed(0)
    model = pm.ImageGPT.from_name("tiny", backend="eager")
    images = torch.rand(2, 1, 8, 8)
    ref = model(images).loss.detach()
    torch.testing.assert_close(
        compile_train_step(model, lambda m: m(images)).detach(), ref, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_compile_gpt_kernel_path(backend, device):
    """torch.compile(fullgraph=True) over the kernel backend: the custom ops stay opaque
    nodes (the Triton launch itself runs at run time, in the interpreter here)."""
    model = tiny_gpt().to(device)
    idx, mask = padded_batch(device)
    ref = model(idx, attention_mask=mask).loss.detach()
    model.set_backend(backend)
    try:
        loss = compile_train_step(model, lambda m: m(idx, attention_mask=mask))
    except ModuleNotFoundError as e:
        if e.name in KERNEL_MODULES:
            pytest.skip(f"{e.name} is not in the tree yet")
        raise
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=0)


def _plain_gpt_loss(model: pm.GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nanoGPT's forward (bias=False, exact GELU) in plain torch, on ``model``'s parameters."""
    c = model.config
    B, T = idx.shape
    x = model.wte.weight[idx] + model.wpe.weight[:T]
    hd = c.n_embd // c.n_head
    for blk in model.blocks:
        h = F.layer_norm(x, (c.n_embd,), blk.ln_1.weight, None, c.norm_eps)
        q, k, v = (h @ blk.attn.qkv.weight.t()).split(c.n_embd, dim=2)
        q, k, v = (t.view(B, T, c.n_head, hd).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + y.transpose(1, 2).reshape(B, T, c.n_embd) @ blk.attn.proj.weight.t()
        h = F.layer_norm(x, (c.n_embd,), blk.ln_2.weight, None, c.norm_eps)
        x = x + F.gelu(h @ blk.mlp.fc1.weight.t()) @ blk.mlp.fc2.weight.t()
    x = F.layer_norm(x, (c.n_embd,), model.ln_f.weight, None, c.norm_eps)
    logits = x @ model.wte.weight.t()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_bias_false_is_nanogpt_architecture():
    """bias=False drops every bias (as nanoGPT's bias=False); with activation="gelu" the
    model is nanoGPT's, checked in float64 against a plain-torch forward: loss and every
    parameter gradient."""
    model = tiny_gpt(bias=False, activation="gelu").double()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.endswith("bias")], names
    biased = tiny_gpt()
    assert sum(p.numel() for p in biased.parameters()) > sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 61, (2, 17), generator=g)
    targets = torch.randint(0, 61, (2, 17), generator=g)
    # the biases that init would zero must not hide a difference: perturb every weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    loss = model(idx, targets).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = _plain_gpt_loss(model, idx, targets)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for n, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")
