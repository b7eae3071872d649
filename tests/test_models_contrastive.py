"""SimCLR: NT-Xent against an explicit formula, augmentations, parity, training, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_cases
from test_models_common import assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm
from python_models.models.contrastive import augment, nt_xent


def tiny_simclr(**kw) -> pm.SimCLR:
    torch.manual_seed(0)
    return pm.SimCLR.from_name("tiny", backend="eager", **kw)


def test_nt_xent_matches_loop_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    tau = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = 8
    total = 0.0
    for i in range(n):
        j = (i + 4) % n
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
    torch.testing.assert_close(nt_xent(z1, z2, tau), torch.tensor(total / n), rtol=1e-5, atol=0)
    # identical, well separated views: near-zero loss
    e = torch.eye(4, 6) * 10
    assert nt_xent(e, e, 0.05) < 1e-3


def test_augment_is_random_and_shape_preserving():
    cfg = pm.SimCLRConfig()
    images = torch.rand(6, 1, 8, 8)
    a = augment(images, cfg, torch.Generator().manual_seed(0))
    b = augment(images, cfg, torch.Generator().manual_seed(0))
    c = augment(images, cfg, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    # zero augmentation strength is the identity
    none = pm.SimCLRConfig(aug_translate=0, aug_rotate=0, aug_scale=(1.0, 1.0), aug_noise=0)
    torch.testing.assert_close(augment(images, none), images, rtol=0, atol=1e-6)


def test_forward_views_and_errors():
    model = tiny_simclr()
    images = torch.rand(3, 1, 8, 8)
    out = model(images)
    assert out.z1.shape == (3, 32) and out.z2.shape == (3, 32) and out.loss > 0
    v = (images, images.flip(-1))
    out2 = model(views=v)
    torch.testing.assert_close(out2.z1, model.project(images), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="images: expected a"):
        model()
    with pytest.raises(ValueError, match="temperature"):
        pm.SimCLRConfig(temperature=0)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_simclr_kernel_matches_eager(backend, device):
    # At the N(0, 0.02) init all 2B projections are nearly parallel and the NT-Xent gradient
    # is a difference of nearly equal numbers (float32 vs float64 differ by 1e-3 already):
    # use PyTorch's default Linear init and distinct views for a well-conditioned case.
    model = tiny_simclr()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    v1 = torch.randn(3, 1, 8, 8, generator=g)
    v2 = v1 + 0.5 * torch.randn(3, 1, 8, 8, generator=g)
    run = lambda m, a, b: m(views=(a, b))
    assert_kernel_parity(model, run, backend, v1.to(device), v2.to(device))


def test_simclr_trains():
    model = tiny_simclr()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=g)
    views = model.views(images, g)
    first, last = train_smoke(model, lambda m: m(views=views))
    assert last < 0.5 * first, (first, last)


def test_compile_simclr_training_step():
    model = tiny_simclr()
    images = torch.rand(4, 1, 8, 8)
    views = model.views(images)
    ref = model(views=views).loss.detach()
    loss = compile_train_step(model, lambda m: m(views=views))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)
