"""peft LoRA models after rk.integrations.peft.accelerate(): same outputs and gradients as
peft's own forward, same merge/unmerge and adapter files.

Oracle: the peft model in float64; tolerance: the FlashAttention rule (conftest.assert_rule).
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from conftest import assert_rule, kernel_cases

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from recon_kernels.integrations import peft as rkp  # noqa: E402

BACKENDS = [pytest.param("eager", "cpu", id="eager-cpu"), *kernel_cases()]
V = 61
N_LORA = {"gpt2": 4, "bert": 6}  # LoRA Linear layers in the models below


def needs_lora_kernels(backend: str) -> None:
    if backend == "triton" and importlib.util.find_spec("recon_kernels.triton.lora") is None:
        pytest.skip("recon_kernels.triton.lora has not landed yet")


def make(arch: str, device: str = "cpu", seed: int = 0, **lora_kw):
    """A tiny random model with LoRA adapters whose B is non-zero (so they matter)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=2,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
        )  # fmt: skip
        base = transformers.GPT2LMHeadModel(cfg)
        # GPT-2 keeps Conv1D (in, out) weights: peft's fan_in_fan_out
        kw = {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}
    else:
        cfg = transformers.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        base = transformers.BertForMaskedLM(cfg)
        kw = {"target_modules": ["query", "value", "intermediate.dense"]}
    kw.update(lora_kw)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **kw))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    return model.to(device).train()


def batch(arch: str, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    labels = ids.clone()
    labels[am == 0] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": am.to(device),
        "labels": labels.to(device),
    }


def run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_like_peft(ours, stock32, ref64, inputs):
    real = inputs["attention_mask"].bool()
    (lo, lso, go), (l32, ls32, g32), (l64, ls64, g64) = ours, stock32, ref64
    assert_rule("logits", lo[real], l64[real], l32[real], torch.float32)
    assert_rule("loss", lso, ls64, ls32, torch.float32)
    assert go.keys() == g64.keys() and all("lora_" in n for n in go) and len(go) > 0
    for n in g64:
        assert_rule(f"grad {n}", go[n], g64[n], g32[n], torch.float32)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = rkp.lora_linear

    def spy(*a, **k):
        calls.append(k.get("backend"))
        return real(*a, **k)

    monkeypatch.setattr(rkp, "lora_linear", spy)
    return calls


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_accelerate_matches_peft(arch, backend, device, fused_calls):
    needs_lora_kernels(backend)
    stock = make(arch, device)
    ours = copy.deepcopy(stock)
    report = rkp.accelerate(ours, backend=backend)
    assert len(report.accelerated) == N_LORA[arch] and not report.skipped
    inputs = batch(arch, device)
    got = run(ours, inputs)
    assert fused_calls == [backend] * N_LORA[arch]
    ref = copy.deepcopy(stock).double()
    assert_like_peft(got, run(stock, inputs), run(ref, inputs), inputs)


def test_autocast_bf16_takes_the_fused_path(fused_calls):
    stock = make("bert")
    ours = copy.deepcopy(stock)
    rkp.accelerate(ours, backend="eager")
    inputs = batch("bert")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(**inputs).logits
        want = stock(**inputs).logits
    assert len(fused_calls) == N_LORA["bert"] and got.dtype == want.dtype == torch.bfloat16
    exact = copy.deepcopy(stock).double()(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert_rule("logits", got[real], exact[real], want[real], torch.bfloat16)


# --------------------------------------------------------------------------- merge, save, load


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_merge_unmerge_as_peft(arch, fused_calls):
    plain = make(arch).eval()
    ours = copy.deepcopy(plain)
    rkp.accelerate(ours, backend="eager")
    inputs = batch(arch)
    before = ours(**inputs).logits
    for m in (plain, ours):
        m.merge_adapter()
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ours.state_dict().values())
    )
    n = len(fused_calls)
    merged = ours(**inputs).logits  # merged weights: peft's base-layer path
    assert len(fused_calls) == n
    exact = copy.deepcopy(plain).double()(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert_rule("merged logits", merged[real], exact[real], before[real], torch.float32)
    for m in (plain, ours):
        m.unmerge_adapter()
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ours.state_dict().values())
    )
    merged_plain = copy.deepcopy(plain).merge_and_unload()
    merged_ours = copy.deepcopy(ours).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged_ours.modules())
    torch.testing.assert_close(merged_ours(**inputs).logits, merged_plain(**inputs).logits)
    # W + dW - dW is not W bit for bit: compare with peft on the same unmerged weights
    exact = copy.deepcopy(plain).double()(**inputs).logits
    got, want = ours(**inputs).logits, plain(**inputs).logits
    assert_rule("unmerged logits", got[real], exact[real], want[real], torch.float32)


def test_adapters_save_and_load_unchanged(tmp_path):
    from safetensors.torch import load_file

    plain = make("gpt2").eval()
    ours = copy.deepcopy(plain)
    rkp.accelerate(ours, backend="eager")
    plain.save_pretrained(tmp_path / "plain")
    ours.save_pretrained(tmp_path / "ours")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ours").iterdir())
    for f in files:  # the same bytes (the JSON config is compared parsed, below)
        if f.endswith(".json"):
            continue
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "ours" / f).read_bytes(), f
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = [
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("plain", "ours")
    ]
    # peft keeps target_modules as a set and writes it in iteration order, which a
    # deepcopy (or another hash seed) may change: compare it as a set
    for c in cfg:
        c["target_modules"] = sorted(c["target_modules"])
    assert cfg[0] == cfg[1]

    torch.manual_seed(0)  # the same random base model as make()
    base = transformers.GPT2LMHeadModel(plain.base_model.model.config)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    rkp.accelerate(loaded, backend="eager")
    inputs = batch("gpt2")
    torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- fallbacks, restore


def test_falls_back_to_peft_where_documented(fused_calls):
    inputs = batch("bert")
    # lora_dropout > 0: peft's forward in training, fused in eval
    model = make("bert", lora_dropout=0.1)
    ref = copy.deepcopy(model).eval()
    rkp.accelerate(model, backend="eager")
    model(**inputs)
    assert fused_calls == []
    model.eval()
    model(**inputs)
    assert len(fused_calls) == N_LORA["bert"]
    # adapters disabled: the base model, peft's path
    n = len(fused_calls)
    with model.disable_adapter(), ref.disable_adapter():
        got, want = model(**inputs).logits, ref(**inputs).logits
    assert len(fused_calls) == n
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # DoRA: a LoRA variant, peft's forward
    dora = make("bert", use_dora=True).eval()
    ref = copy.deepcopy(dora)
    rkp.accelerate(dora, backend="eager")
    n = len(fused_calls)
    torch.testing.assert_close(dora(**inputs).logits, ref(**inputs).logits, rtol=0, atol=0)
    assert len(fused_calls) == n


def test_two_active_adapters_fall_back():
    model = make("bert").eval()
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query", "value"]))
    model.base_model.set_adapter(["default", "other"])
    ref = copy.deepcopy(model)
    rkp.accelerate(model, backend="eager")
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(2, 3, 32)
    assert "2 active adapters" in rkp.fused_path_blocker(layer, x, (), {})
    inputs = batch("bert")
    torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=0, atol=0)


def test_restore_and_refusal():
    model = make("gpt2")
    rkp.accelerate(model)
    assert rkp.restore(model) == N_LORA["gpt2"]
    assert not any(type(m) is rkp.ReconLoraLinear for m in model.modules())
    with pytest.raises(ValueError, match="no.*LoRA|found none"):
        rkp.accelerate(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_compile_accelerated_fullgraph_forward():
    model = make("bert").eval()
    rkp.accelerate(model, backend="eager")
    inputs = batch("bert")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(**inputs).logits, model(**inputs).logits, rtol=0, atol=0
        )


def test_lora_added_after_apply_recon_kernels_is_honoured(monkeypatch):
    from recon_kernels.integrations import transformers as rkt

    mlp_calls = []
    real = rkt.conv1d_mlp
    monkeypatch.setattr(rkt, "conv1d_mlp", lambda *a, **k: (mlp_calls.append(1), real(*a, **k))[1])
    plain = make("gpt2").eval()  # LoRA on c_attn and on the MLP's c_fc
    torch.manual_seed(0)
    stock = transformers.GPT2LMHeadModel(plain.base_model.model.config)
    rkt.apply_recon_kernels(stock, backend="eager")  # fused MLPs first ...
    lora = peft.get_peft_model(stock, plain.peft_config["default"])  # ... then LoRA on c_fc
    lora.load_state_dict(plain.state_dict())
    lora.eval()
    inputs = batch("gpt2")
    got, want = lora(**inputs).logits, plain(**inputs).logits
    assert mlp_calls == []  # c_fc is a LoRA layer now: the stock MLP forward runs
    exact = copy.deepcopy(plain).double()(**inputs).logits
    real_pos = inputs["attention_mask"].bool()
    assert_rule("logits", got[real_pos], exact[real_pos], want[real_pos], torch.float32)
