"""Shared helpers of the model tests (kernel-vs-eager parity, training smoke test) and the
tests of python_models.models.common: configs, presets, save/load, backend switching.

Tolerance of the kernel-vs-eager parity: both paths compute in float32 and differ only in
the order of floating-point reductions (matmul tiling, online softmax). Each reordered sum
of K terms moves the result by ~sqrt(K)·2^-24 relative to the magnitude of its terms; a
tiny model chains a few dozen such sums (K <= 128) forward and backward, so the expected
discrepancy is ~1e-6 of a tensor's scale. We allow RTOL = 1e-4 of each tensor's max-abs
(two orders of margin, still far below what a wrong mask, scale, activation or gradient
formula produces: those give O(1e-2..1) relative errors).
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

import python_models as pm

RTOL = 1e-4
KERNEL_MODULES = ("recon_kernels.triton.mlp", "recon_kernels.triton.lora")


@contextlib.contextmanager
def tiny_model_cpu():
    """One intra-op thread (tiny matmuls gain nothing from more, and with pytest -n 2 on 2
    cores extra OpenMP threads oversubscribe the CPU ~5x) and flushed denormals (exp() of
    very negative numbers otherwise slows CPU steps ~3x). Restores both afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref| (0 if both are all-zero)."""
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    return err / scale if scale > 0 else err


def loss_and_grads(model: torch.nn.Module, run) -> tuple[tuple, dict[str, torch.Tensor]]:
    """Run ``run(model)`` (returns a model output, field 0 the loss), backprop the loss;
    returns (detached outputs, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    out[0].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out), grads


def _as64(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def assert_kernel_parity(
    model: torch.nn.Module, run, backend: str, *inputs, rtol: float = RTOL
) -> None:
    """The same weights on backend='eager' and on ``backend``: loss, every floating output
    and every parameter gradient agree to ``rtol`` of their scale (integer outputs exactly).

    ``run(model, *inputs)`` returns a model output (loss first). The case is first checked
    to be well conditioned: eager float32 must agree with eager float64 to rtol / 10, so
    that ``rtol`` is 10x the float32 reordering noise this very case can produce.
    ``model`` is not modified.
    """
    eager = copy.deepcopy(model).train()
    pm.set_backend(eager, "eager")
    kern = copy.deepcopy(model).train()
    pm.set_backend(kern, backend)
    with tiny_model_cpu():
        out_e, g_e = loss_and_grads(eager, lambda m: run(m, *inputs))
        out_64, g_64 = loss_and_grads(eager.double(), lambda m: run(m, *map(_as64, inputs)))
        try:
            out_k, g_k = loss_and_grads(kern, lambda m: run(m, *inputs))
        except ModuleNotFoundError as e:  # a kernel family another engineer has not landed yet
            if e.name in KERNEL_MODULES:
                pytest.skip(
                    f"{e.name} is not in the tree yet: kernel path of this model untestable"
                )
            raise
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g_e) == trainable, f"eager grads missing for {sorted(trainable - set(g_e))}"
    assert set(g_k) == trainable, f"{backend} grads missing for {sorted(trainable - set(g_k))}"
    nonzero = [n for n, g in g_e.items() if g.abs().max() > 0]
    assert len(nonzero) >= len(g_e) // 2, f"eager grads mostly zero: only {nonzero} are non-zero"
    pairs = [("loss", out_k[0], out_e[0], out_64[0])]
    pairs += [
        (f"output {i}", a, b, c)
        for i, (a, b, c) in enumerate(zip(out_k[1:], out_e[1:], out_64[1:]), start=1)
        if isinstance(a, torch.Tensor)
    ]
    pairs += [(f"grad {n}", g_k[n], g_e[n], g_64[n]) for n in g_e]
    for name, k, e, e64 in pairs:
        if not k.is_floating_point():
            assert torch.equal(k, e), f"{name}: {backend} differs from eager"
            continue
        assert torch.isfinite(k).all(), f"{name}: {backend} has non-finite values"
        noise = max_rel_err(e.double(), e64)
        assert noise <= rtol / 10, (
            f"{name}: ill-conditioned test case, eager float32 vs float64 already differ by "
            f"{noise:.2e} (> rtol/10 = {rtol / 10:.0e}); pick better-conditioned inputs/weights"
        )
        err = max_rel_err(k, e)
        assert err <= rtol, f"{name}: {backend} vs eager rel error {err:.2e} > {rtol:.0e}"


def train_smoke(
    model: torch.nn.Module, run, steps: int = 40, lr: float = 3e-3
) -> tuple[float, float]:
    """A few dozen AdamW steps on one fixed batch; returns (first loss, mean of last 5)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    with tiny_model_cpu():
        for _ in range(steps):
            loss = run(model)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses[0], sum(losses[-5:]) / 5


def compile_train_step(model: torch.nn.Module, run) -> torch.Tensor:
    """One training step through torch.compile(fullgraph=True): raises on any graph break."""
    torch._dynamo.reset()
    cmodel = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with tiny_model_cpu():
        loss = run(cmodel)[0]
        loss.backward()
        opt.step()
    return loss


# --------------------------------------------------------------------------- common tests

ALL_MODELS = [pm.GPT, pm.BERT, pm.MAE, pm.Autoencoder, pm.SimCLR, pm.ImageGPT]


def test_presets_and_overrides():
    cfg = pm.MAEConfig.from_name("tiny", mask_ratio=0.5, encoder=dict(dim=48, n_heads=3))
    assert cfg.mask_ratio == 0.5 and cfg.encoder.dim == 48 and cfg.encoder.n_heads == 3
    assert cfg.encoder.depth == pm.EncoderConfig.from_name("tiny").depth  # rest from the preset
    small = pm.MAEConfig.from_name("small", encoder=dict(patch_size=4))
    assert (small.encoder.dim, small.encoder.depth, small.encoder.patch_size) == (128, 4, 4)
    assert pm.MAEConfig.from_name("small", encoder="tiny").encoder.dim == 32  # a preset name
    base = pm.GPTConfig.from_name("base")
    assert (base.n_layer, base.n_embd, base.vocab_size) == (12, 768, 50257)
    for cls in ALL_MODELS:
        for name in ("tiny", "small", "base"):
            cls.config_class.from_name(name)  # every preset builds a valid config


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="name: expected one of"):
        pm.GPTConfig.from_name("huge")
    with pytest.raises(ValueError, match=r"unknown fields \['n_layers'\]"):
        pm.GPTConfig.from_name("tiny", n_layers=3)
    with pytest.raises(ValueError, match="patch_size: expected a divisor of image_size=8, got 3"):
        pm.EncoderConfig(patch_size=3)
    with pytest.raises(ValueError, match="mask_ratio"):
        pm.MAEConfig(mask_ratio=1.0)
    with pytest.raises(TypeError, match="config: expected a GPTConfig, got BERTConfig"):
        pm.GPT(pm.BERTConfig())


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_save_load_round_trip(cls, tmp_path):
    torch.manual_seed(0)
    model = cls.from_name("tiny", backend="eager")
    model.save_pretrained(tmp_path)
    blob = json.loads((tmp_path / "config.json").read_text())
    assert blob["model_type"] == cls.model_type
    loaded = pm.load_pretrained(tmp_path, backend="eager")
    assert type(loaded) is cls and loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    if cls is pm.GPT:  # tying survives the round trip
        assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    with pytest.raises(ValueError, match="path: expected a"):
        (pm.BERT if cls is not pm.BERT else pm.GPT).from_pretrained(tmp_path)


def test_set_backend_reaches_every_op_caller():
    model = pm.MAE.from_name("tiny", backend="eager")
    model.set_backend("triton")
    callers = [
        m for m in model.modules() if hasattr(m, "backend") and not isinstance(m, pm.ReconModel)
    ]
    assert len(callers) >= 2 * 3  # attn + mlp per block, 3 blocks
    assert all(m.backend == "triton" for m in callers)
