"""LoRA injection: identity at init, merged == unmerged, freezing, adapters round trip,
kernel path of a LoRA-wrapped model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import kernel_cases
from test_models_common import assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm
from python_models import lora
from recon_kernels.nn import LoRALinear

ALL_LINEARS = "(qkv|proj|fc1|fc2)"


class Probe(nn.Module):
    """An MAE encoder + a linear head: the few-shot setting of the later issue."""

    def __init__(self, backend: str = "eager") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mae = pm.MAE.from_name("tiny", backend=backend)
        self.head = nn.Linear(32, 10)

    def forward(self, images, labels):
        logits = self.head(self.mae.features(images))
        return (nn.functional.cross_entropy(logits, labels), logits)


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(0.3 * torch.randn(m.lora_B.weight.shape, generator=g))


def test_inject_matches_names_and_is_identity_at_init():
    model = Probe()
    images = torch.rand(4, 1, 8, 8)
    before = model.mae.features(images)
    names = lora.inject_lora(model.mae.encoder, ALL_LINEARS, r=4, alpha=8)
    assert names == [
        f"blocks.{i}.{x}" for i in range(2) for x in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    assert isinstance(model.mae.encoder.blocks[0].attn.qkv, LoRALinear)
    assert not isinstance(model.mae.encoder.patch_embed, LoRALinear)  # not matched
    assert not isinstance(model.mae.decoder_blocks[0].attn.qkv, LoRALinear)  # outside the encoder
    torch.testing.assert_close(model.mae.features(images), before, rtol=0, atol=0)
    # a regex limited to block 1's attention
    m2 = Probe()
    assert lora.inject_lora(m2, r"encoder\.blocks\.1\.attn\..*", r=2) == [
        "mae.encoder.blocks.1.attn.qkv",
        "mae.encoder.blocks.1.attn.proj",
    ]
    with pytest.raises(ValueError, match=r"targets: \['nothing'\] matched no nn.Linear"):
        lora.inject_lora(Probe(), "nothing")


def test_only_lora_and_head_are_trainable():
    model = Probe()
    lora.inject_lora(model, ALL_LINEARS, r=4, trainable=("head",))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= set(trainable)
    n_lora = sum(1 for n in trainable if ".lora_" in n)
    assert n_lora == 2 * (2 * 4 + 1 * 4)  # A and B per wrapped linear: encoder 2x4 + decoder 1x4
    # training moves only those
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = torch.rand(8, 1, 8, 8), torch.arange(8)
    first, last = train_smoke(model, lambda m: m(images, labels), steps=25)
    assert last < first
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved but is frozen"


def test_merge_equals_unmerged_and_unmerge_restores():
    model = Probe().eval()
    w0 = model.mae.encoder.blocks[0].attn.qkv.weight.detach().clone()
    lora.inject_lora(model, ALL_LINEARS, r=4, alpha=8, trainable="head")
    randomize_lora(model)
    images, labels = torch.rand(4, 1, 8, 8), torch.arange(4)
    unmerged = model(images, labels)[1]
    assert (
        unmerged - model.head(Probe().eval().mae.features(images))
    ).abs().max() > 1e-3  # LoRA acts
    lora.merge_lora(model)
    assert all(m.merged for m in lora.lora_modules(model).values())
    torch.testing.assert_close(model(images, labels)[1], unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge_lora(model)
    torch.testing.assert_close(model.mae.encoder.blocks[0].attn.qkv.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(images, labels)[1], unmerged, rtol=1e-5, atol=1e-5)
    # unwrap: plain nn.Linear again, merged, same function, loadable by save_pretrained
    lora.unwrap_lora(model.mae)
    assert not lora.lora_modules(model) and type(model.mae.encoder.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(model(images, labels)[1], unmerged, rtol=1e-5, atol=1e-5)


def test_adapters_round_trip(tmp_path):
    model = Probe()
    lora.inject_lora(model, ALL_LINEARS, r=4, alpha=8, use_rslora=True, trainable="head")
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    images, labels = torch.rand(4, 1, 8, 8), torch.arange(4)
    want = model(images, labels)[1]
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(model, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {"head.weight", "head.bias"} <= keys
    assert all(".lora_" in k or k.startswith("head.") for k in keys)  # no base weights
    fresh = Probe()  # same base weights (same seed), no LoRA yet
    loaded = lora.load_adapters(fresh, path)
    assert sorted(keys) == loaded
    torch.testing.assert_close(fresh(images, labels)[1], want, rtol=0, atol=0)
    m = fresh.mae.encoder.blocks[0].attn.qkv
    assert isinstance(m, LoRALinear) and m.use_rslora and m.r == 4
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    # a file from another configuration is refused, not silently misloaded
    other = Probe()
    lora.inject_lora(other, ALL_LINEARS, r=2)
    with pytest.raises(ValueError, match="differs from the file's"):
        lora.load_adapters(other, path)
    with pytest.raises(ValueError, match="expected LoRA-wrapped layers"):
        lora.save_adapters(Probe(), tmp_path / "x.safetensors")


def test_name_matching():
    assert lora.name_matches("encoder.blocks.3.attn.qkv", "qkv")
    assert lora.name_matches("encoder.blocks.3.attn.qkv", r"blocks\.3\..*")
    assert not lora.name_matches("encoder.blocks.3.attn.qkv", "attn")  # suffix of whole parts
    assert not lora.name_matches("decoder_blocks.0.attn.qkv", r"blocks\.0\..*")


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_lora_model_kernel_matches_eager(backend, device):
    """LoRA on the attention projections (fused lora_linear) and on the MLP (W + s·BA fed to
    conv1d_mlp): the LoRA-path gradients match eager."""
    model = Probe()
    lora.inject_lora(model.mae.encoder, ALL_LINEARS, r=4, alpha=8)
    lora.freeze_except_lora(model, "head")
    randomize_lora(model)
    model = model.to(device)
    images = torch.rand(3, 1, 8, 8, device=device)
    labels = torch.tensor([1, 4, 7], device=device)
    assert_kernel_parity(model, lambda m, x: m(x, labels), backend, images)


def test_documented_few_shot_recipe():
    """The recipe of the python_models docstring: encoder + head in one ModuleDict."""
    torch.manual_seed(0)
    mae = pm.MAE.from_name("tiny", backend="eager")
    clf = nn.ModuleDict({"encoder": mae.encoder, "head": nn.Linear(32, 10)})
    names = lora.inject_lora(clf, r"encoder\..*(qkv|proj|fc1|fc2)", r=4, trainable=("head",))
    assert len(names) == 8 and mae.encoder is clf["encoder"]
    assert isinstance(mae.encoder.blocks[1].mlp.fc2, LoRALinear)  # the MAE sees the adapters
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"} | {
        "head.weight",
        "head.bias",
    }


def test_compile_lora_model_training_step():
    model = Probe()
    lora.inject_lora(model, ALL_LINEARS, r=4, trainable="head")
    randomize_lora(model)
    images, labels = torch.rand(4, 1, 8, 8), torch.arange(4)
    ref = model(images, labels)[0].detach()
    loss = compile_train_step(model, lambda m: m(images, labels))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)
