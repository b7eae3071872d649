"""Hugging Face models on the fused kernels: attn_implementation="recon" and
apply_recon_kernels, against the stock model (sdpa) on tiny random configs.

Oracle: the stock model in float64; tolerance: the FlashAttention rule (our float32 error
<= 2 x the stock float32 model's error + atol, conftest.assert_rule). Text logits are
compared at real (non-padding) positions; the loss and every parameter gradient in full.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import assert_rule, kernel_cases

transformers = pytest.importorskip("transformers")

import recon_kernels as rk  # noqa: E402
from recon_kernels.integrations import transformers as rkt  # noqa: E402

BACKENDS = [pytest.param("eager", "cpu", id="eager-cpu"), *kernel_cases()]
V = 61  # vocab


def needs_kernels(backend: str, *families: str) -> None:
    for fam in families:
        if backend == "triton" and importlib.util.find_spec(f"recon_kernels.triton.{fam}") is None:
            pytest.skip(f"recon_kernels.triton.{fam} has not landed yet")


# --------------------------------------------------------------------------- tiny models


def _config(arch: str, **over):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=2,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, activation_function="gelu_new",
        )  # fmt: skip
    elif arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    elif arch == "vit_mae":
        cfg = transformers.ViTMAEConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
            decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, mask_ratio=0.5, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
    elif arch == "vit":
        cfg = transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, num_labels=3,
        )  # fmt: skip
    else:  # llama: grouped-query attention, RoPE
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
        )  # fmt: skip
    for k, val in over.items():
        setattr(cfg, k, val)
    return cfg


_MODEL_CLS = {
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "vit": "ViTForImageClassification",
    "vit_mae": "ViTMAEForPreTraining",
    "llama": "LlamaForCausalLM",
}
N_ATTENTION = {"gpt2": 2, "bert": 2, "vit": 2, "vit_mae": 3, "llama": 2}  # calls per forward
N_MLP = {"gpt2": 2, "bert": 2, "vit": 2, "vit_mae": 3}


def make(arch: str, impl: str, device: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cls = getattr(transformers, _MODEL_CLS[arch])
    # _from_config stores attn_implementation on the config object: one config per model
    model = cls._from_config(_config(arch, **over), attn_implementation=impl)
    return model.to(device).train()  # dropout probabilities are 0


def batch(arch: str, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":
        return {
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g).to(device),
            "labels": torch.tensor([0, 2]).to(device),
        }
    if arch == "vit_mae":
        return {
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g).to(device),
            "noise": torch.rand(2, 16, generator=g).to(device),
        }
    ids = torch.randint(0, V, (2, 11), generator=g)
    am = torch.ones(2, 11, dtype=torch.long)
    if arch == "bert":
        am[1, 7:] = 0  # right padding
        labels = torch.full_like(ids, -100)
        labels[:, 1::3] = ids[:, 1::3]
    else:
        am[1, :3] = 0  # left padding under a causal mask: fully masked query rows
        labels = ids.clone()
    labels[am == 0] = -100
    return {
        k: t.to(device) for k, t in (("input_ids", ids), ("attention_mask", am), ("labels", labels))
    }


def run(model, inputs: dict, dtype=None):
    model.zero_grad(set_to_none=True)
    if dtype is not None:
        inputs = {k: t.to(dtype) if t.is_floating_point() else t for k, t in inputs.items()}
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_like_stock(arch, ours, stock32, ref64, inputs):
    """Logits (real positions), loss and all parameter gradients by the 2x rule."""
    (lo, lso, go), (l32, ls32, g32), (l64, ls64, g64) = ours, stock32, ref64
    real = inputs.get("attention_mask")
    sel = (lambda t: t[real.bool()]) if real is not None else (lambda t: t)
    assert_rule("logits", sel(lo), sel(l64), sel(l32), torch.float32)
    assert_rule("loss", lso, ls64, ls32, torch.float32)
    assert go.keys() == g64.keys() and len(go) > 0
    for name in g64:
        assert_rule(f"grad {name}", go[name], g64[name], g32[name], torch.float32)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the fused attention / MLP calls the integration makes."""
    calls = {"attention": 0, "mlp": 0}

    def counting(fn, key):
        def inner(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        return inner

    for name in ("causal_attention", "masked_softmax_attention", "scaled_dot_product_attention"):
        monkeypatch.setattr(rkt, name, counting(getattr(rkt, name), "attention"))
    monkeypatch.setattr(rkt, "conv1d_mlp", counting(rkt.conv1d_mlp, "mlp"))
    return calls


# --------------------------------------------------------------------------- recon attention


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "bert", "vit", "vit_mae", "llama"])
def test_attn_implementation_recon(arch, backend, device, op_calls):
    rkt.register()
    stock = make(arch, "sdpa", device)
    ours = make(arch, "recon", device)
    ours.load_state_dict(stock.state_dict())
    ref = copy.deepcopy(stock).double()
    inputs = batch(arch, device)
    with rk.use_backend(backend):
        got = run(ours, inputs)
    assert op_calls["attention"] == N_ATTENTION[arch]
    assert_like_stock(arch, got, run(stock, inputs), run(ref, inputs, torch.float64), inputs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "bert", "vit", "vit_mae"])
def test_apply_recon_kernels(arch, backend, device, op_calls):
    needs_kernels(backend, "mlp")
    stock = make(arch, "sdpa", device)
    patched = copy.deepcopy(stock)
    report = rkt.apply_recon_kernels(patched, backend=backend)
    assert len(report.mlp_patched) == N_MLP[arch] and not report.skipped
    assert (report.attention_before, report.attention_after) == ("sdpa", "recon")
    ref = copy.deepcopy(stock).double()
    inputs = batch(arch, device)
    got = run(patched, inputs)
    assert op_calls == {"attention": N_ATTENTION[arch], "mlp": N_MLP[arch]}
    assert_like_stock(arch, got, run(stock, inputs), run(ref, inputs, torch.float64), inputs)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "vit_mae"])
def test_patching_keeps_parameters_and_reverts(arch, tmp_path):
    stock = make(arch, "sdpa", "cpu")
    patched = copy.deepcopy(stock)
    params_before = {n: p for n, p in patched.named_parameters()}
    rkt.apply_recon_kernels(patched, backend="eager")
    # the same Parameter objects (optimizers keep working) and the same state dict
    assert {n: p for n, p in patched.named_parameters()} == params_before
    sd, sd_stock = patched.state_dict(), stock.state_dict()
    assert sd.keys() == sd_stock.keys()
    assert all(torch.equal(sd[k], sd_stock[k]) for k in sd)
    patched.save_pretrained(tmp_path)
    reloaded = type(stock).from_pretrained(tmp_path, attn_implementation="sdpa")
    assert all(torch.equal(reloaded.state_dict()[k], sd_stock[k]) for k in sd_stock)
    with pytest.raises(RuntimeError, match="already patched"):
        rkt.apply_recon_kernels(patched)

    rkt.revert_recon_kernels(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in stock.modules()]
    assert patched.config._attn_implementation == "sdpa"
    inputs = batch(arch, "cpu")
    for a, b in zip(run(patched, inputs)[:2], run(stock, inputs)[:2]):
        assert torch.equal(a, b)  # the stock code again, bit for bit
    with pytest.raises(ValueError, match="not patched"):
        rkt.revert_recon_kernels(patched)


def test_refuses_unknown_architecture():
    model = make("llama", "sdpa", "cpu")
    with pytest.raises(ValueError, match=r"knows model types .*'llama'"):
        rkt.apply_recon_kernels(model)
    assert all(not type(m).__name__.startswith("Recon") for m in model.modules())


def test_unsupported_activation_left_stock(op_calls):
    stock = make("gpt2", "sdpa", "cpu", activation_function="gelu_fast")
    patched = copy.deepcopy(stock)
    report = rkt.apply_recon_kernels(patched, backend="eager")
    assert report.mlp_patched == []
    assert [why for _, why in report.skipped] == [
        "activation FastGELUActivation has no fused kernel"
    ] * 2
    inputs = batch("gpt2", "cpu")
    got = run(patched, inputs)
    assert op_calls == {"attention": 2, "mlp": 0}
    ref = copy.deepcopy(stock).double()
    assert_like_stock("gpt2", got, run(stock, inputs), run(ref, inputs, torch.float64), inputs)


@pytest.mark.parametrize(
    "act,name",
    [
        ("gelu", "gelu"),
        ("gelu_new", "gelu_tanh"),
        ("gelu_pytorch_tanh", "gelu_tanh"),
        ("relu", "relu"),
        ("quick_gelu", None),
    ],
)
def test_activation_names(act, name):
    assert rkt.activation_name(transformers.activations.ACT2FN[act]) == name


def _compiled_gpt2():
    stock = make("gpt2", "sdpa", "cpu", use_cache=False)
    patched = copy.deepcopy(stock)
    patched.loss_type = "ForCausalLM"  # else HF's loss_function logs: a graph break in HF
    rkt.apply_recon_kernels(patched, backend="eager")
    torch._dynamo.reset()
    # fullgraph=True fails on any graph break, in HF's code or in ours
    return patched, torch.compile(patched, fullgraph=True, backend="aot_eager")


def test_compile_patched_model_fullgraph_forward():
    patched, compiled = _compiled_gpt2()
    inputs = batch("gpt2", "cpu")
    with torch.no_grad():
        got, want = compiled(**inputs), patched(**inputs)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_compile_patched_model_fullgraph_backward():
    patched, compiled = _compiled_gpt2()
    inputs = batch("gpt2", "cpu")
    eager_run = run(patched, inputs)
    got = run(compiled, inputs)
    # the compiled wrapper prefixes parameter names with "_orig_mod."
    got = (got[0], got[1], {n.removeprefix("_orig_mod."): g for n, g in got[2].items()})
    assert got[2].keys() == eager_run[2].keys()
    torch.testing.assert_close(got[1], eager_run[1], rtol=0, atol=0)
    for n in eager_run[2]:
        torch.testing.assert_close(got[2][n], eager_run[2][n], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- masks and fallbacks


def test_mask_builder_forms():
    from transformers.masking_utils import (
        bidirectional_mask_function,
        causal_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[1, :2] = False
    # plain causal: the padding mask itself, or None
    assert torch.equal(rkt.recon_attention_mask(2, 6, 6, attention_mask=pad), pad)
    assert rkt.recon_attention_mask(2, 6, 6) is None
    # decode step with a cache (q_offset = 5 past tokens): still plain, bottom-right
    assert torch.equal(rkt.recon_attention_mask(2, 1, 6, q_offset=5, attention_mask=pad), pad)
    # plain bidirectional: (B, 1, L, S), an expand of the padding mask
    m = rkt.recon_attention_mask(
        2, 4, 6, mask_function=bidirectional_mask_function, attention_mask=pad
    )
    assert m.shape == (2, 1, 4, 6) and m.stride(2) == 0
    assert torch.equal(m, pad[:, None, None, :].expand(2, 1, 4, 6))
    m = rkt.recon_attention_mask(2, 4, 6, mask_function=bidirectional_mask_function)
    assert m.shape == (2, 1, 4, 6) and bool(m.all())
    # anything else: HF's materialised mask
    sw = sliding_window_causal_mask_function(3)
    for kw in ({"mask_function": sw}, {"mask_function": causal_mask_function, "kv_offset": 2}):
        got = rkt.recon_attention_mask(2, 4, 6, attention_mask=pad, **kw)
        want = sdpa_mask(2, 4, 6, attention_mask=pad, allow_is_causal_skip=False, **kw)
        assert torch.equal(got, want)


def test_attention_dropout_runs_fused(monkeypatch, op_calls):
    """Training with attn_pdrop > 0 stays on the fused attention (its own dropout), never
    on transformers' sdpa; the same torch seed repeats the step, eval has no dropout."""
    from transformers.integrations import sdpa_attention

    rkt.register()
    hf_calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(
        sdpa_attention,
        "sdpa_attention_forward",
        lambda *a, **k: (hf_calls.append(1), real(*a, **k))[1],
    )
    model = make("gpt2", "recon", "cpu", attn_pdrop=0.3)
    inputs = batch("gpt2", "cpu")
    real_tok = inputs["attention_mask"].bool()
    torch.manual_seed(3)
    got = model(**inputs).logits  # training mode: dropout is active
    assert len(hf_calls) == 0 and op_calls["attention"] == 2
    torch.manual_seed(3)
    torch.testing.assert_close(model(**inputs).logits, got, rtol=0, atol=0)
    model.eval()
    evaluated = model(**inputs).logits
    assert (got - evaluated)[real_tok].abs().max() > 1e-3
    stock = make("gpt2", "sdpa", "cpu", attn_pdrop=0.3).eval()
    stock.load_state_dict(model.state_dict())
    want = stock(**inputs).logits
    torch.testing.assert_close(evaluated[real_tok], want[real_tok], rtol=1e-4, atol=1e-4)
    assert len(hf_calls) == 0


def test_generate_with_kv_cache_matches_stock():
    # Nq = 1 decode steps against a growing cache: bottom-right alignment, 2-D padding masks
    rkt.register()
    stock = make("llama", "sdpa", "cpu").eval()
    ours = make("llama", "recon", "cpu").eval()
    ours.load_state_dict(stock.state_dict())
    ref = copy.deepcopy(stock).double()
    b = batch("llama", "cpu")
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with rk.use_backend("eager"):
        got = ours.generate(b["input_ids"], attention_mask=b["attention_mask"], **kw)
    want = stock.generate(b["input_ids"], attention_mask=b["attention_mask"], **kw)
    exact = ref.generate(b["input_ids"], attention_mask=b["attention_mask"], **kw)
    assert torch.equal(got.sequences, want.sequences)
    for i, (a, w, e) in enumerate(zip(got.logits, want.logits, exact.logits)):
        assert_rule(f"step {i} logits", a, e, w, torch.float32)


def test_patch_sdpa_under_hf_sdpa_models(monkeypatch):
    from recon_kernels.integrations import sdpa as sdpa_mod

    fused = []
    real = sdpa_mod._fused_sdpa
    monkeypatch.setattr(sdpa_mod, "_fused_sdpa", lambda *a: (fused.append(1), real(*a))[1])
    stock = make("bert", "sdpa", "cpu")
    ref = copy.deepcopy(stock).double()
    inputs = batch("bert", "cpu")
    with rk.patch_sdpa(backend="eager"):
        got = run(stock, inputs)
    assert len(fused) == N_ATTENTION["bert"]  # HF's sdpa attention called ours
    assert_like_stock("bert", got, run(stock, inputs), run(ref, inputs, torch.float64), inputs)
