"""lora_linear and merge_lora in Triton (GEMMs from ``_gemm.py``).

y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W (out, in), A (r, in), B (out, r) (peft layout), never
forming W + s·B A:

Forward (2 launches)
    xa, xs = x Aᵀ, s·x Aᵀ          one skinny GEMM (M, r); xa is saved for backward, xs
                                   (s applied in fp32 before rounding) feeds the next GEMM
    y = x Wᵀ + xs Bᵀ + b           one GEMM: the rank-r update is a short extra K-loop into
                                   the same fp32 accumulator, the bias is in the epilogue
Backward (4 launches, 5 when W is trainable, + a cheap dbias reduction)
    g = s·(dy B)                   skinny GEMM (M, r), s in the fp32 epilogue
    dx = dy W + g A                one GEMM with the short K-loop again
    dA = gᵀ x,  dB = s·dyᵀ xa      long-K GEMMs with tiny outputs: split-K, fp32 partials
    dW = dyᵀ x                     only when W requires grad

Saved for backward: x and xa (M, r). merge_lora is one GEMM (K = r) whose epilogue adds
W; ``merge_lora_`` runs it in place (C = Z = W), each element read then written by the
one program that owns it: W + s·B A correctly rounded from fp32, like the copy.
"""

from __future__ import annotations

import torch

from ._common import check_dtype
from ._gemm import EPI_ADD, gemm


def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, in) any strides; weight (out, in); lora_a (r, in); lora_b (out, r); bias (out,)
    | None. Returns y (M, out) and xa = x Aᵀ (M, r), contiguous in x.dtype."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_dtype(name, t)
    M = x.shape[0]
    out_f, r = weight.shape[0], lora_a.shape[0]
    xa = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, out_f), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, xa
    xs = torch.empty_like(xa)  # s·x Aᵀ, a temporary of M x r elements
    gemm(x, lora_a.t(), xa, c2=xs, alpha2=scale)
    gemm(x, weight.t(), y, bias=bias, ab2=(xs, lora_b.t()))
    return y, xa


def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    scale: float,
    needs_dw: bool,
    has_bias: bool,
):
    """dy (M, out), x (M, in), xa (M, r), any strides. Returns dx (M, in), dweight | None,
    dbias | None, dA (r, in), dB (out, r) in the input dtype."""
    M, in_f = x.shape
    out_f, r = weight.shape[0], lora_a.shape[0]
    dev = x.device
    dx = torch.empty((M, in_f), dtype=x.dtype, device=dev)
    da = torch.empty((r, in_f), dtype=lora_a.dtype, device=dev)
    db = torch.empty((out_f, r), dtype=lora_b.dtype, device=dev)
    dw = torch.empty((out_f, in_f), dtype=weight.dtype, device=dev) if needs_dw else None
    if M == 0:
        dbias = torch.zeros(out_f, dtype=weight.dtype, device=dev) if has_bias else None
        return dx, None if dw is None else dw.zero_(), dbias, da.zero_(), db.zero_()
    g = torch.empty((M, r), dtype=x.dtype, device=dev)
    gemm(dy, lora_b, g, alpha=scale)  # g = s·(dy B)
    gemm(dy, weight, dx, ab2=(g, lora_a))  # dx = dy W + g A
    gemm(g.t(), x, da)  # dA = gᵀ x
    gemm(dy.t(), xa, db, alpha=scale)  # dB = s·dyᵀ xa
    if dw is not None:
        gemm(dy.t(), x, dw)
    dbias = dy.sum(0, dtype=torch.float32).to(weight.dtype) if has_bias else None
    return dx, dw, dbias, da, db


def _merge_into(
    out: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale
) -> None:
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check_dtype(name, t)
    # out = s·(B A) + W: A operand = lora_b (out, r), B operand = lora_a (r, in), K = r
    gemm(lora_b, lora_a, out, alpha=scale, epi=EPI_ADD, z=weight, tune=False)


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a as a new contiguous tensor in weight's dtype."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    _merge_into(out, weight, lora_a, lora_b, scale)
    return out


def merge_lora_(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """In place: weight <- weight + scale · lora_b @ lora_a (unmerge: pass -scale). Returns weight."""
    _merge_into(weight, weight, lora_a, lora_b, scale)
    return weight
