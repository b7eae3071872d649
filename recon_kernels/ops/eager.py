"""The ``eager`` backend: ``reference.py``'s explicit forward/backward formulas, plus fast
paths onto torch's own fused CPU kernels where they compute the same thing.

``reference.py`` stays the test oracle (plain formulas, float64 capable); this module is
what the custom ops call for ``backend="eager"``. Same function names and signatures as
``reference`` (see ``_dispatch``). The fast paths, taken on CPU tensors only:

* attention, float32/bfloat16/float16, no dropout, no mask and no key_padding_mask, and
  causal only with Nq == Nk (where bottom-right and torch's top-left alignment agree): torch's
  flash attention for CPU (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward). No query row can be empty there, so the "empty row gives 0" rule is untouched;
  every other case (masks, fully-masked rows, Nq != Nk causal, dropout, float64) runs the
  reference formulas.
* conv1d_mlp backward, float32: the activation derivative as one fused
  ``aten.gelu_backward`` / ``threshold_backward`` instead of the reference's elementwise
  formula (same math: d gelu(h)/dh, exact or tanh, and the relu step).

Everything else delegates to ``reference``.
"""

from __future__ import annotations

import torch

from .. import reference
from ..reference import (  # noqa: F401  (the rest of the backend interface)
    conv1d_mlp_fwd,
    lora_linear_bwd,
    lora_linear_fwd,
    merge_lora,
)

_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flash_ok(q, k, mask, key_padding_mask, causal, dropout_p) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in _FLASH_DTYPES
        and dropout_p == 0
        and mask is None
        and key_padding_mask is None
        and (not causal or q.shape[-2] == k.shape[-2])
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    )


def attention_fwd(q, k, v, mask, key_padding_mask, scale, causal, dropout_p=0.0, seed=0):
    """(out (B, H, Nq, D) laid out (B, Nq, H, D)-contiguous, lse (B, H, Nq) float32)."""
    if not (_flash_ok(q, k, mask, key_padding_mask, causal, dropout_p) and v.stride(-1) == 1):
        return reference.attention_fwd(
            q, k, v, mask, key_padding_mask, scale, causal, dropout_p, seed
        )
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    if out.transpose(1, 2).stride() != out.transpose(1, 2).contiguous().stride():
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the layout every backend returns
    return out, lse.contiguous()


def attention_bwd(
    dout,
    q,
    k,
    v,
    out,
    lse,
    mask,
    key_padding_mask,
    scale,
    causal,
    dropout_p=0.0,
    seed=0,
    deterministic=False,
):
    """(dq, dk, dv), contiguous, in the input dtypes (deterministic whatever
    ``deterministic`` says: both routes below are)."""
    if not (
        _flash_ok(q, k, mask, key_padding_mask, causal, dropout_p)
        and v.stride(-1) == 1
        and lse.dtype == torch.float32
    ):
        return reference.attention_bwd(
            dout, q, k, v, out, lse, mask, key_padding_mask, scale, causal, dropout_p, seed
        )
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _act_backward(g: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """g * d act(h) / dh in one fused op."""
    if act == "gelu":
        return torch.ops.aten.gelu_backward(g, h, approximate="none")
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_backward(g, h, approximate="tanh")
    if act == "relu":
        return torch.ops.aten.threshold_backward(g, h, 0.0)
    raise ValueError(f"activation: expected one of {reference.ACTIVATIONS}, got {act!r}")


def conv1d_mlp_bwd(dy, x, w1, w2, h, act: str, has_b1: bool, has_b2: bool, needs_dw: bool = True):
    """Returns dx, dw1|None, db1|None, dw2|None, db2|None (as reference.conv1d_mlp_bwd)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32):
        return reference.conv1d_mlp_bwd(dy, x, w1, w2, h, act, has_b1, has_b2, needs_dw)
    dw2 = dy.t().mm(reference.apply_activation(h, act)) if needs_dw else None
    db2 = dy.sum(0) if has_b2 else None
    dh = _act_backward(dy.mm(w2), h, act)
    dw1 = dh.t().mm(x) if needs_dw else None
    db1 = dh.sum(0) if has_b1 else None
    return dh.mm(w1), dw1, db1, dw2, db2
