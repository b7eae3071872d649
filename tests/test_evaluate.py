"""python_models.evaluate: k-shot draws, shot validation, linear probe, LoRA fine-tune."""

from __future__ import annotations

import pytest
import torch
from test_models_common import tiny_model_cpu

from python_models.data import ImageData, load_images
from python_models.models.vit import EncoderConfig, ViTEncoder
from python_models.runs import evaluate as E
from python_models.runs.seeding import generator


@pytest.fixture(autouse=True)
def _one_thread():
    with tiny_model_cpu():
        yield


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_images()


def test_draw_shots_k_per_class_seeded(digits):
    a = E.draw_shots(digits.y_train, 5, 10, generator(0, "shots", 5, 0))
    assert a.shape == (50,) and len(set(a.tolist())) == 50
    assert digits.y_train[a].tolist() == [c for c in range(10) for _ in range(5)]
    b = E.draw_shots(digits.y_train, 5, 10, generator(0, "shots", 5, 0))
    c = E.draw_shots(digits.y_train, 5, 10, generator(0, "shots", 5, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_check_shots_names_the_limit(digits):
    assert E.check_shots([10, 1, 5, 5], digits) == [1, 5, 10]
    fewest = int(digits.class_counts().min())
    with pytest.raises(ValueError, match=rf"shots: expected at most {fewest} .* got {fewest + 1}"):
        E.check_shots([1, fewest + 1], digits)
    with pytest.raises(ValueError, match="shots: expected positive integers"):
        E.check_shots([0], digits)


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y_tr, y_te = torch.arange(4).repeat(3), torch.arange(4).repeat(50)
    f_tr = centers[y_tr] + 0.1 * torch.randn(12, 16, generator=g)
    f_te = centers[y_te] + 0.1 * torch.randn(200, 16, generator=g)
    assert E.linear_probe(f_tr, y_tr, f_te, y_te) == 1.0
    # features unrelated to the labels: near chance (0.25), far from 1
    noise_te = torch.randn(200, 16, generator=g)
    assert E.linear_probe(f_tr, y_tr, noise_te, y_te) < 0.5


def test_raw_pixel_probe_on_digits(digits):
    res = E.probe_accuracies(None, digits, [1, 5], draws=2, seed=0)
    assert sorted(res.accuracies) == [1, 5] and all(len(v) == 2 for v in res.accuracies.values())
    # raw pixels of digits: ~0.55 at 1 shot, ~0.8 at 5 (chance 0.1)
    assert 0.3 < res.summary(1)[0] < res.summary(5)[0] <= 1.0
    again = E.probe_accuracies(None, digits, [1, 5], draws=2, seed=0)
    assert again.accuracies == res.accuracies
    assert "| 5 |" in res.table() and res.to_dict()["summary"]["1"]["mean"] == res.summary(1)[0]


def test_lora_finetune_learns_and_leaves_the_encoder_alone(digits):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig.from_name("tiny"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = E.FinetuneConfig(rank=4, steps=40)
    idx = E.draw_shots(digits.y_train, 10, 10, generator(0, "shots", 10, 0))
    acc = E.finetune_one(
        enc, digits.x_train[idx], digits.y_train[idx], digits.x_test, digits.y_test, 10, cfg, seed=0
    )
    # a random-init encoder + LoRA reaches ~0.6 at 10 shots; chance is 0.1
    assert 0.3 < acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not any("lora" in n for n, _ in enc.named_modules())
    res = E.finetune_accuracies(enc, digits, [1], draws=2, seed=0, cfg=E.FinetuneConfig(steps=2))
    assert len(res.accuracies[1]) == 2 and all(0.0 <= a <= 1.0 for a in res.accuracies[1])


def test_finetune_config_validation():
    with pytest.raises(ValueError, match="lora_rank: expected a positive integer, got 0"):
        E.FinetuneConfig(rank=0)
    with pytest.raises(ValueError, match="lr"):
        E.FinetuneConfig(lr=-1)
