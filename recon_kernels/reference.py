"""Eager PyTorch references of every op: the test oracle AND the CPU (``eager``) kernels.

Everything here is plain differentiable PyTorch, float64 capable, and written for clarity
rather than speed. Two kinds of functions live here:

* ``attention``, ``conv1d_mlp``, ``lora_linear``, ``merge_lora``: the oracle. Autograd
  through them gives the reference gradients. They compute in the input dtype, so running
  them on fp16/bf16 inputs gives "what eager PyTorch gets in low precision" (the
  baseline of the 2x-error tolerance rule).
* ``*_fwd`` / ``*_bwd``: the ``eager`` backend of the custom ops. Same math with explicit
  backward formulas (the ones the kernels implement), accumulating in float32 for
  half-precision inputs like the kernels do. ``ops/eager.py`` (what the ops dispatch to)
  calls these, except where torch's fused CPU kernels compute the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")


# --------------------------------------------------------------------------- attention


def attention_allowed(
    nq: int,
    nk: int,
    *,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(B|1, H|1, Nq, Nk)`` tensor of allowed (query, key) pairs, or None for all.

    mask: bool broadcastable to (B, H, Nq, Nk), True = may attend.
    key_padding_mask: bool (B, Nk), True = real token.
    causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned).
    """
    allowed = None
    if mask is not None:
        allowed = mask
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        allowed = kpm if allowed is None else allowed & kpm
    if causal:
        i = torch.arange(nq, device=device)[:, None]
        j = torch.arange(nk, device=device)[None, :]
        cm = j <= i + (nk - nq)
        allowed = cm if allowed is None else allowed & cm
    return allowed


# Attention dropout. Every backend draws the same keep mask from a counter-based hash, so
# the kernels are testable against this reference bit for bit (no RNG state involved):
#   mix32(x): x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
#             (all uint32, multiplications wrap)
#   key(b, h) = mix32(seed + (b * H + h) * 0x9E3779B9)      seed: uint32
#   r(b, h, i, j) = mix32((i * Nk + j) ^ key(b, h))          i: query row, j: key column
#   keep  <=>  (r >> 8) >= threshold,  threshold = round(dropout_p * 2^24)
# Kept probabilities are scaled by 1 / (1 - dropout_p); lse stays the undropped one.
_M32 = 0xFFFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """The 24-bit integer threshold that stands for dropout_p (0 means no dropout)."""
    return min(1 << 24, max(0, round(dropout_p * (1 << 24))))


def dropout_params(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(uint32 seed, 24-bit threshold, 1 / (1 - p)): what the kernels take to draw the keep
    mask of ``dropout_keep`` and scale the kept probabilities."""
    if not 0.0 <= dropout_p < 1.0:  # also rejects NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    return int(seed) & _M32, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap mod 2^64, and the
    low 32 bits are what the uint32 arithmetic of the kernels keeps)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(
    seed: int, B: int, H: int, nq: int, nk: int, dropout_p: float, device=None
) -> torch.Tensor:
    """Boolean (B, H, Nq, Nk): which attention probabilities survive dropout."""
    bh = torch.arange(B * H, dtype=torch.int64, device=device)
    key = _mix32((seed + bh * 0x9E3779B9) & _M32).view(B, H, 1, 1)
    i = torch.arange(nq, dtype=torch.int64, device=device)[:, None]
    j = torch.arange(nk, dtype=torch.int64, device=device)[None, :]
    r = _mix32(((i * nk + j) & _M32) ^ key)
    return (r >> 8) >= dropout_threshold(dropout_p)


def _masked_scores(q, k, mask, key_padding_mask, scale: float, causal: bool):
    """(q kᵀ·scale (B, H, Nq, Nk) in q's dtype with -inf where a pair may not attend,
    the allowed-pairs tensor or None)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = attention_allowed(
        q.shape[-2],
        k.shape[-2],
        mask=mask,
        key_padding_mask=key_padding_mask,
        causal=causal,
        device=q.device,
    )
    return (s if allowed is None else s.masked_fill(~allowed, float("-inf"))), allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """softmax(q kᵀ·scale + mask) v in the input dtype; rows with no allowed key give 0.
    dropout_p > 0: the probabilities dropped by ``dropout_keep(seed, ...)`` are zeroed and
    the kept ones scaled by 1 / (1 - dropout_p).

    q: (B, H, Nq, D); k, v: (B, H, Nk, D). Returns (B, H, Nq, D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s, allowed = _masked_scores(q, k, mask, key_padding_mask, scale, causal)  # (B, H, Nq, Nk)
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        # fully-masked rows are NaN after softmax: define them as 0 (and 0 gradient)
        p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype))
    if dropout_p > 0:
        B, H, NQ, NK = p.shape[0], p.shape[1], p.shape[2], p.shape[3]
        keep = dropout_keep(seed, B, H, NQ, NK, dropout_p, p.device)
        p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros((), dtype=p.dtype))
    return torch.matmul(p, v)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dropped(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """x (B, H, Nq, Nk) with the dropped entries zeroed and the kept ones / (1 - p)."""
    if dropout_p <= 0:
        return x
    B, H, NQ, NK = x.shape
    keep = dropout_keep(seed, B, H, NQ, NK, dropout_p, x.device)
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=x.dtype))


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager kernel: returns (out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) float32/64).

    lse is the natural log-sum-exp of the scaled, masked scores (before dropout); +inf for
    rows with no allowed key (so that exp(s - lse) == 0 in backward).
    """
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s, _ = _masked_scores(qf, kf, mask, key_padding_mask, scale, causal)
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = _dropped(torch.exp(s - lse[..., None]), dropout_p, seed)
    out = torch.matmul(p, vf).to(q.dtype)
    # the layout every backend returns: (B, Nq, H, D)-contiguous, seen as (B, H, Nq, D)
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager kernel backward (FlashAttention formulas): returns dq, dk, dv (deterministic:
    the kernel backends' choice between atomic and atomic-free backwards; this one is
    deterministic whatever its value). With dropout,
    Z = keep / (1 - p): out = (P∘Z) V, so dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ)∘Z and, as
    rowsum(P∘dP) = rowsum(dO∘out) still, dS = P∘(dP - delta)."""
    acc = _acc_dtype(q.dtype)
    qf, kf, vf, of, dof = (t.to(acc) for t in (q, k, v, out, dout))
    s, _ = _masked_scores(qf, kf, mask, key_padding_mask, scale, causal)
    p = torch.exp(s - lse.to(acc)[..., None])  # (B, H, Nq, Nk); 0 where masked / empty row
    delta = (dof * of).sum(-1, keepdim=True)  # (B, H, Nq, 1)
    dv = torch.matmul(_dropped(p, dropout_p, seed).transpose(-1, -2), dof)
    dp = _dropped(torch.matmul(dof, vf.transpose(-1, -2)), dropout_p, seed)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------- MLP


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "relu":
        return F.relu(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_grad(h: torch.Tensor, name: str) -> torch.Tensor:
    """d act(h) / dh, elementwise."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (h + 0.044715 * h**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * h * h)
    if name == "relu":
        return (h > 0).to(h.dtype)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def conv1d_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
) -> torch.Tensor:
    """act(x W1ᵀ + b1) W2ᵀ + b2. x: (..., C); w1: (hidden, C); w2: (C_out, hidden)."""
    h = F.linear(x, w1, b1)
    return F.linear(apply_activation(h, activation), w2, b2)


def conv1d_mlp_fwd(x, w1, b1, w2, b2, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager kernel: x (M, C) -> (y (M, C_out), h (M, hidden) pre-activation, x.dtype)."""
    accd = _acc_dtype(x.dtype)
    h = F.linear(x.to(accd), w1.to(accd), None if b1 is None else b1.to(accd))
    y = F.linear(apply_activation(h, act), w2.to(accd), None if b2 is None else b2.to(accd))
    return y.to(x.dtype), h.to(x.dtype)


def conv1d_mlp_bwd(dy, x, w1, w2, h, act: str, has_b1: bool, has_b2: bool, needs_dw: bool = True):
    """Eager kernel backward. All 2-D. Returns dx, dw1|None, db1|None, dw2|None, db2|None
    (the weight gradients only with needs_dw: frozen MLP weights skip two of four GEMMs)."""
    accd = _acc_dtype(x.dtype)
    dyf, xf, w1f, w2f, hf = (t.to(accd) for t in (dy, x, w1, w2, h))
    a = apply_activation(hf, act)
    dw2 = dyf.t() @ a if needs_dw else None
    db2 = dyf.sum(0) if has_b2 else None
    dh = (dyf @ w2f) * activation_grad(hf, act)
    dw1 = dh.t() @ xf if needs_dw else None
    db1 = dh.sum(0) if has_b1 else None
    dx = dh @ w1f
    cast = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
    return dx.to(x.dtype), cast(dw1, w1), cast(db1, w1), cast(dw2, w2), cast(db2, w2)


# --------------------------------------------------------------------------- LoRA


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """x Wᵀ + b + scale·(x Aᵀ) Bᵀ. weight: (out, in); lora_a: (r, in); lora_b: (out, r)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)


def merge_lora(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """weight + scale · lora_b @ lora_a, in weight's dtype (computed in fp32 or better)."""
    accd = _acc_dtype(weight.dtype)
    return (weight.to(accd) + scale * (lora_b.to(accd) @ lora_a.to(accd))).to(weight.dtype)


def lora_linear_fwd(x, weight, bias, lora_a, lora_b, scale: float):
    """Eager kernel: x (M, in) -> (y (M, out), xa (M, r)), both in x.dtype."""
    accd = _acc_dtype(x.dtype)
    xf = x.to(accd)
    xa = xf @ lora_a.to(accd).t()
    y = xf @ weight.to(accd).t() + scale * (xa @ lora_b.to(accd).t())
    if bias is not None:
        y = y + bias.to(accd)
    return y.to(x.dtype), xa.to(x.dtype)


def lora_linear_bwd(
    dy, x, weight, lora_a, lora_b, xa, scale: float, needs_dw: bool, has_bias: bool
):
    """Eager kernel backward. Returns dx, dweight|None, dbias|None, dA, dB."""
    accd = _acc_dtype(x.dtype)
    dyf, xf, wf, af, bf, xaf = (t.to(accd) for t in (dy, x, weight, lora_a, lora_b, xa))
    dyb = dyf @ bf  # (M, r)
    dx = dyf @ wf + scale * (dyb @ af)
    da = scale * (dyb.t() @ xf)
    db = scale * (dyf.t() @ xaf)
    dw = (dyf.t() @ xf).to(weight.dtype) if needs_dw else None
    dbias = dyf.sum(0).to(weight.dtype) if has_bias else None
    return dx.to(x.dtype), dw, dbias, da.to(lora_a.dtype), db.to(lora_b.dtype)
