"""Under torch.autocast the fused ops run in the autocast dtype, like nn.Linear and SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import recon_kernels as rk


def test_ops_follow_autocast_dtype_and_grads_reach_fp32_params():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    l1, l2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    q = torch.randn(2, 2, 5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rk.conv1d_mlp(x, l1.weight, l1.bias, l2.weight, l2.bias, backend="eager")
        ref = l2(F.gelu(l1(x)))
        z = rk.lora_linear(x, l1.weight, l1.bias, a, b, 0.5, backend="eager")
        o = rk.causal_attention(q, q, q, backend="eager")
        o_ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert y.dtype == z.dtype == o.dtype == torch.bfloat16
    assert ref.dtype == o_ref.dtype == torch.bfloat16
    # same bf16 operands as nn.Linear under autocast; fp32 accumulation on both sides
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)
    (y.float().sum() + z.float().sum() + o.float().sum()).backward()
    for t in (x, l1.weight, l2.weight, a, b, q):
        assert t.grad is not None and t.grad.dtype == torch.float32


def test_no_autocast_keeps_input_dtype():
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    assert rk.conv1d_mlp(x, w1, None, w2, None, backend="eager").dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x64 = x.double()
        # float64 is never downcast (autocast leaves it alone for matmuls too)
        assert rk.conv1d_mlp(x64, w1.double(), None, w2.double(), None).dtype == torch.float64
