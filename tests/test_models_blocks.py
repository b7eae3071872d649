"""Transformer blocks against an independent eager formula, and their kernel path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import kernel_cases
from test_models_common import assert_kernel_parity

import python_models as pm
from python_models import lora
from python_models.models.blocks import MLP, Block
from recon_kernels.nn import MultiheadAttention


def reference_block(blk: Block, x: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """The block written out with plain torch ops (float64 capable)."""
    a, m = blk.attn, blk.mlp
    B, N, E = x.shape
    H, D = a.num_heads, a.head_dim

    def attn(h):
        q, k, v = F.linear(h, a.qkv.weight, a.qkv.bias).split(E, dim=-1)
        q, k, v = (t.reshape(B, N, H, D).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
        if kpm is not None:
            allowed = allowed & kpm[:, None, None, :]
        if a.causal:
            allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        y = (p @ v).transpose(1, 2).reshape(B, N, E)
        return F.linear(y, a.proj.weight, a.proj.bias)

    def mlp(h):
        act = {"gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
        return F.linear(
            act[m.activation](F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias
        )

    ln1 = lambda t: F.layer_norm(t, (E,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    ln2 = lambda t: F.layer_norm(t, (E,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    if blk.pre_norm:
        x = x + attn(ln1(x))
        return x + mlp(ln2(x))
    x = ln1(x + attn(x))
    return ln2(x + mlp(x))


def make_block(pre_norm: bool, causal: bool, activation: str = "gelu") -> Block:
    torch.manual_seed(0)
    blk = Block(24, 3, 40, pre_norm=pre_norm, causal=causal, activation=activation, backend="eager")
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for ln in (blk.ln_1, blk.ln_2):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    return blk


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_block_matches_formula_float64(pre_norm, causal, activation):
    blk = make_block(pre_norm, causal, activation).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    got = blk(x, kpm)
    ref = reference_block(blk, x, kpm)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("pre_norm,causal", [(True, True), (False, False)], ids=["gpt", "bert"])
def test_block_kernel_matches_eager(backend, device, pre_norm, causal):
    blk = make_block(pre_norm, causal).to(device)
    x = torch.randn(2, 17, 24, device=device)
    kpm = torch.ones(2, 17, dtype=torch.bool, device=device)
    kpm[0, 11:] = False
    w = torch.randn(2, 17, 24, device=device)  # a generic upstream gradient

    class Wrap(nn.Module):  # parity helper wants loss-first outputs
        def __init__(self, blk):
            super().__init__()
            self.blk = blk

        def forward(self, x, w):
            y = self.blk(x, kpm)
            return ((y * w).sum(), y)

    assert_kernel_parity(Wrap(blk), lambda m, x, w: m(x, w), backend, x, w)


def test_lora_wrapped_mlp_stays_fused_and_exact():
    """A LoRA-wrapped fc1/fc2 feeds W + s·BA to conv1d_mlp: same output and gradients as
    the unfused Linear -> act -> Linear path."""
    torch.manual_seed(0)
    mlp = MLP(16, 32, activation="gelu", backend="eager")
    lora.inject_lora(mlp, "(fc1|fc2)", r=4, alpha=8)
    with torch.no_grad():
        for m in lora.lora_modules(mlp).values():
            m.lora_B.weight.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    fused = mlp(x)
    unfused = mlp.fc2(F.gelu(mlp.fc1(x)))
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(
        fused.square().sum(), [x, mlp.fc1.lora_A.weight, mlp.fc2.lora_B.weight]
    )
    g2 = torch.autograd.grad(
        unfused.square().sum(), [x, mlp.fc1.lora_A.weight, mlp.fc2.lora_B.weight]
    )
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # LoRA dropout in training falls back to the unfused path (still a valid forward)
    drop = MLP(16, 32, backend="eager")
    lora.inject_lora(drop, "fc1", r=2, dropout=0.5)
    assert drop(x).shape == (5, 16)


def test_attention_errors():
    with pytest.raises(ValueError, match="num_heads: expected a divisor of embed_dim=24, got 5"):
        MultiheadAttention(24, 5)
    with pytest.raises(ValueError, match="activation: expected one of"):
        MLP(8, 16, activation="swish")


def test_residual_dropout_train_only():
    torch.manual_seed(0)
    blk = Block(24, 3, 40, dropout=0.5, backend="eager")
    x = torch.randn(2, 5, 24)
    a, b = blk(x), blk(x)
    assert (a - b).abs().max() > 1e-3  # dropout active in training
    blk.eval()
    torch.testing.assert_close(blk(x), reference_block(blk, x, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", kernel_cases())
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_attention_dropout_kernel_matches_eager(backend, device, causal):
    """attn_dropout in training: the kernels draw the same hash mask as the eager backend
    for the same torch seed, so output and every gradient agree; eval has no dropout; the
    same seed repeats the mask and another seed changes it."""
    torch.manual_seed(0)
    blk = Block(24, 3, 40, causal=causal, attn_dropout=0.3, backend="eager")
    kern = copy.deepcopy(blk).to(device)
    pm.set_backend(kern, backend)
    x = torch.randn(2, 17, 24)
    kpm = torch.ones(2, 17, dtype=torch.bool)
    kpm[1, 11:] = False

    def run(m, dev):
        torch.manual_seed(5)
        xi = x.to(dev).requires_grad_()
        y = m(xi, kpm.to(dev))
        y.square().sum().backward()
        grads = [xi.grad] + [p.grad for p in m.parameters()]
        m.zero_grad()
        return y.detach().cpu(), [g.cpu() for g in grads]

    y_e, g_e = run(blk, "cpu")
    y_k, g_k = run(kern, device)
    torch.testing.assert_close(y_k, y_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_k, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    y_again, _ = run(blk, "cpu")
    assert torch.equal(y_again, y_e)
    torch.manual_seed(6)
    assert (blk(x, kpm) - y_e).abs().max() > 1e-3
    blk.eval()
    with torch.no_grad():
        torch.testing.assert_close(blk(x, kpm), reference_block(blk, x, kpm), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_dropout: expected a probability"):
        Block(24, 3, 40, attn_dropout=1.0)
