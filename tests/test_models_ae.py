"""Autoencoder with a bottleneck."""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_cases
from test_models_common import assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm
from python_models.models.blocks import patchify


def tiny_ae(**kw) -> pm.Autoencoder:
    torch.manual_seed(0)
    return pm.Autoencoder.from_name("tiny", backend="eager", **kw)


def test_shapes_and_bottleneck():
    model = tiny_ae(bottleneck=5)
    images = torch.rand(3, 1, 8, 8)
    out = model(images)
    assert out.latent.shape == (3, 5) and out.pred.shape == (3, 16, 4)
    ref = ((out.pred - patchify(images, 2)) ** 2).mean()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    assert model.reconstruct(images).shape == images.shape
    assert model.features(images).shape == (3, 32)
    # the decoder sees the image only through z: same z, same reconstruction
    z = model.encode(images)
    torch.testing.assert_close(model.decode(z), out.pred, rtol=0, atol=0)


def test_bottleneck_error():
    with pytest.raises(ValueError, match="bottleneck: expected a positive width, got 0"):
        pm.AutoencoderConfig(bottleneck=0)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_ae_kernel_matches_eager(backend, device):
    model = tiny_ae(encoder=dict(pool="mean")).to(device)
    images = torch.rand(3, 1, 8, 8, device=device)
    assert_kernel_parity(model, lambda m, x: m(x), backend, images)


def test_ae_trains():
    model = tiny_ae()
    images = torch.rand(8, 1, 8, 8)
    first, last = train_smoke(model, lambda m: m(images))
    assert last < 0.5 * first, (first, last)


def test_compile_ae_training_step():
    model = tiny_ae()
    images = torch.rand(2, 1, 8, 8)
    ref = model(images).loss.detach()
    torch.testing.assert_close(
        compile_train_step(model, lambda m: m(images)).detach(), ref, rtol=1e-5, atol=0
    )
