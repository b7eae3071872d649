"""MAE: patchify, random masking, masked-only loss, norm_pix_loss, sin-cos positions,
kernel-vs-eager parity, training, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kernel_cases
from test_models_common import assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm
from python_models.models.blocks import patchify, sincos_pos_embed_2d, unpatchify


def tiny_mae(**kw) -> pm.MAE:
    torch.manual_seed(0)
    return pm.MAE.from_name("tiny", backend="eager", **kw)


def test_patchify_layout_and_inverse():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    p = patchify(images, 2)
    assert p.shape == (2, 6, 12)
    # patch 4 = grid row 1, col 1; its pixel (row 0, col 1), channel 2 is at (1*2+1)*3+2 = 5
    assert p[1, 4, 5] == images[1, 2, 2, 3]
    assert torch.equal(unpatchify(p, 2, 3, 4, 6), images)
    with pytest.raises(
        ValueError, match="images: expected H and W divisible by patch_size=4, got 4x6"
    ):
        patchify(images, 4)


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (17, 0.75), (49, 0.6), (4, 0.5)])
def test_random_masking_counts_and_restore(L, ratio):
    B = 5
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(B, L, generator=g)
    ids_keep, mask, ids_restore = pm.random_masking(B, L, ratio, noise=noise)
    keep = int(L * (1 - ratio))
    assert ids_keep.shape == (B, keep)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    # kept patches: the ones with the smallest noise, and exactly the unmasked ones
    assert torch.equal(ids_keep, noise.argsort(1)[:, :keep])
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(B, keep))
    # ids_restore inverts the shuffle
    ids_shuffle = noise.argsort(1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(L).expand(B, L))
    x = torch.randn(B, L)
    assert torch.equal(x.gather(1, ids_shuffle).gather(1, ids_restore), x)
    with pytest.raises(ValueError, match=r"noise: expected shape \(B, L\)"):
        pm.random_masking(B, L + 1, ratio, noise=noise)


def test_shared_noise_shares_the_mask_and_loss():
    model = tiny_mae().eval()
    images = torch.rand(3, 1, 8, 8)
    noise = torch.rand(3, 16)
    a, b = model(images, noise), model(images, noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.loss, b.loss)
    c = model(images, torch.rand(3, 16))
    assert not torch.equal(a.mask, c.mask)
    assert a.mask.sum() == 3 * (16 - int(16 * 0.25))


def test_loss_only_on_masked_patches():
    model = tiny_mae()
    images = torch.rand(3, 1, 8, 8)
    noise = torch.rand(3, 16)
    out = model(images, noise)
    target = model.patchify(images)
    m = out.mask.bool()
    ref = ((out.pred - target) ** 2).mean(-1)[m].mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    # changing visible pixels' targets does not change the loss... through the target path:
    # the gradient of the loss w.r.t. the prediction is zero on visible patches
    pred = out.pred.detach().requires_grad_(True)
    loss = (((pred - target) ** 2).mean(-1) * out.mask).sum() / out.mask.sum()
    (g,) = torch.autograd.grad(loss, pred)
    assert g[~m].abs().max() == 0 and g[m].abs().max() > 0


def test_norm_pix_loss_target():
    model = tiny_mae(norm_pix_loss=True)
    images = torch.rand(2, 1, 8, 8)
    out = model(images, torch.rand(2, 16))
    t = model.patchify(images)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    ref = ((out.pred - t) ** 2).mean(-1)[out.mask.bool()].mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)


def test_sincos_positions():
    grid, dim = 3, 8
    pe = sincos_pos_embed_2d(grid, dim)
    assert pe.shape == (grid * grid + 1, dim) and pe[0].abs().max() == 0
    # patch (row h=2, col w=1) = index 7: [sin w·ω, cos w·ω, sin h·ω, cos h·ω], ω = 10000^(-i/2)
    om = [1.0, 1.0 / 100.0]
    want = [math.sin(1 * o) for o in om] + [math.cos(1 * o) for o in om]
    want += [math.sin(2 * o) for o in om] + [math.cos(2 * o) for o in om]
    torch.testing.assert_close(pe[1 + 7], torch.tensor(want), rtol=1e-6, atol=1e-7)
    model = tiny_mae()
    assert not any(n.endswith("pos_embed") for n, _ in model.named_parameters())  # fixed


def test_image_size_error():
    with pytest.raises(
        ValueError, match=r"images: expected shape \(B, 1, 8, 8\), got \(2, 1, 8, 6\)"
    ):
        tiny_mae()(torch.rand(2, 1, 8, 6))


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("patch", [2, 4])
def test_mae_kernel_matches_eager(backend, device, patch):
    model = tiny_mae(encoder=dict(patch_size=patch)).to(device)
    L = (8 // patch) ** 2
    images = torch.rand(3, 1, 8, 8, device=device)
    noise = torch.rand(3, L, device=device)
    assert_kernel_parity(model, lambda m, x, n: m(x, n), backend, images, noise)


def test_mae_trains():
    model = tiny_mae()
    images = torch.rand(8, 1, 8, 8)
    noise = torch.rand(8, 16)
    first, last = train_smoke(model, lambda m: m(images, noise))
    assert last < 0.5 * first, (first, last)


def test_compile_mae_training_step():
    model = tiny_mae()
    images = torch.rand(2, 1, 8, 8)
    noise = torch.rand(2, 16)
    ref = model(images, noise).loss.detach()
    loss = compile_train_step(model, lambda m: m(images, noise))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)
    # without noise (torch.rand inside the graph) it still compiles in one graph
    compile_train_step(model, lambda m: m(images))
