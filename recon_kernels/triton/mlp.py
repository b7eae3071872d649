"""conv1d_mlp in Triton: act(x W1ᵀ + b1) W2ᵀ + b2 as fused GEMMs (see ``_gemm.py``).

Forward (2 launches)
    h, a = x W1ᵀ + b1, act(·)     one GEMM, epilogue adds b1 and writes h (saved for
                                   backward) and a = act(h) (freed after the next GEMM)
    y = a W2ᵀ + b2                 bias in the epilogue
Backward (4 launches + a cheap db2 reduction)
    dh = (dy W2) ⊙ act'(h)         act' in the epilogue (h loaded there); db1 = Σ_rows dh
                                   fused as per-block column sums of the fp32 tile
    dW2ᵀ = act(h)ᵀ dy              act(h) written by the dh GEMM's epilogue beside dh (it
                                   evaluates act' there anyway) and read here, freed on
                                   return (strategy "store", the default)
    dW1 = dhᵀ x,  dx = dh W1       plain GEMMs through strides
    db2 = Σ_rows dy                torch reduction (reads dy once, fp32 accumulation)

Saved for backward: x and h only (eager autograd of Linear-act-Linear keeps h and act(h)).
All GEMMs accumulate in fp32; outputs are in the input dtype.

dW2 strategy (``RECON_MLP_DW2`` or ``set_dw2_strategy``), an A/B switch for the benchmark:
"store" (default) has the dh GEMM's epilogue, which evaluates the activation's derivative
anyway, write act(h) to a transient (M, hidden) buffer that the dW2 GEMM reads (the CUDA
backend's choice): 4 more bytes of traffic per element and the buffer during backward;
"recompute" evaluates act on every A tile of the dW2 GEMM instead, once per column block
of dW2 (C_out / BLOCK_N times per element: CUDA-core work beside the tensor cores; erf-GELU
is the costly one), never materialising act(h). On the H200 run (bf16, T = 8192, quick,
benchmarks/results/gpu-h200-2026-12-04) "store" was the faster one at both shapes: forward
+ backward 2.46 vs 2.61 ms at C 1024 x hidden 4096 and 10.76 vs 12.60 ms at 4096 x 16384
(peak memory 304 vs 240 MB and 1284 vs 1028 MB). The gradients are identical up to
rounding order (act(h) rounded once to the input dtype either way).
"""

from __future__ import annotations

import os

import torch

from ._common import check_dtype
from ._gemm import EPI_DACT, gemm

DW2_STRATEGIES = ("recompute", "store")
_dw2_strategy = os.environ.get("RECON_MLP_DW2", "store")
if _dw2_strategy not in DW2_STRATEGIES:
    raise ValueError(f"RECON_MLP_DW2: expected one of {DW2_STRATEGIES}, got {_dw2_strategy!r}")


def set_dw2_strategy(strategy: str) -> str:
    """Select how the backward gets act(h) for dW2 (see the module docstring); returns the
    previous strategy."""
    global _dw2_strategy
    if strategy not in DW2_STRATEGIES:
        raise ValueError(f"strategy: expected one of {DW2_STRATEGIES}, got {strategy!r}")
    prev, _dw2_strategy = _dw2_strategy, strategy
    return prev


def conv1d_mlp_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, C) any strides; w1 (hidden, C); w2 (C_out, hidden); b1 (hidden,) | None;
    b2 (C_out,) | None. Returns y (M, C_out) and the pre-activation h (M, hidden), both
    contiguous in x.dtype."""
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        check_dtype(name, t)
    M = x.shape[0]
    hidden, c_out = w1.shape[0], w2.shape[0]
    h = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    y = torch.empty((M, c_out), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, h
    a = torch.empty_like(h)  # act(h): GEMM2's input, not saved
    gemm(x, w1.t(), h, bias=b1, act=act, c2=a)
    gemm(a, w2.t(), y, bias=b2)
    return y, h


def conv1d_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    h: torch.Tensor,
    act: str,
    has_b1: bool,
    has_b2: bool,
    needs_dw: bool = True,
):
    """dy (M, C_out), x (M, C), h (M, hidden), any strides. Returns dx (M, C), dw1 | None,
    db1 | None, dw2 | None, db2 | None in the input dtype (weight gradients contiguous; None
    without needs_dw: frozen weights skip the dW1 and dW2 GEMMs)."""
    M, C = x.shape
    hidden, c_out = w1.shape[0], w2.shape[0]
    dev, dt = x.device, x.dtype
    dx = torch.empty((M, C), dtype=dt, device=dev)
    dw1 = torch.empty((hidden, C), dtype=w1.dtype, device=dev) if needs_dw else None
    dw2 = torch.empty((c_out, hidden), dtype=w2.dtype, device=dev) if needs_dw else None
    if M == 0:
        z = lambda n, t: torch.zeros(n, dtype=t.dtype, device=dev)
        return (
            dx,
            dw1.zero_() if needs_dw else None,
            z(hidden, w1) if has_b1 else None,
            dw2.zero_() if needs_dw else None,
            z(c_out, w2) if has_b2 else None,
        )
    dh = torch.empty((M, hidden), dtype=dt, device=dev)
    store = needs_dw and _dw2_strategy == "store"
    a = torch.empty_like(dh) if store else None  # act(h), freed when this returns
    db1 = gemm(dy, w2, dh, epi=EPI_DACT, z=h, act=act, c2=a, colsum=has_b1)
    if needs_dw:
        if store:
            gemm(a.t(), dy, dw2.t())  # dW2ᵀ = act(h)ᵀ dy
        else:
            gemm(h.t(), dy, dw2.t(), act=act, pro_act=True)  # act recomputed on load
        gemm(dh.t(), x, dw1)
    gemm(dh, w1, dx)
    db2 = dy.sum(0, dtype=torch.float32).to(w2.dtype) if has_b2 else None
    return dx, dw1, None if db1 is None else db1.to(w1.dtype), dw2, db2
