"""Drop-in modules built on the ops."""

from __future__ import annotations

import torch
import torch.nn as nn

from .ops import causal_attention, masked_softmax_attention


class MultiheadAttention(nn.Module):
    """Self-attention with a packed qkv projection, like ``nn.MultiheadAttention`` with
    ``batch_first=True`` but calling the fused ops.

    x: (B, N, E) -> (B, N, E). ``key_padding_mask``: bool (B, N), True = real token
    (the Hugging Face convention, the opposite of nn.MultiheadAttention's).
    ``mask``: bool broadcastable to (B, H, N, N), True = may attend.
    ``causal=True`` uses causal_attention (mask must then be None).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        causal: bool = False,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.backend = causal, backend
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **kw)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x: expected shape (B, N, {self.embed_dim}), got {tuple(x.shape)}"
            )
        B, N, E = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        # views of the packed tensor, no copies: the kernels take any strides
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        if self.causal:
            if mask is not None:
                raise ValueError("mask: must be None when causal=True (use key_padding_mask)")
            y = causal_attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.backend)
        else:
            y = masked_softmax_attention(
                q, k, v, mask, key_padding_mask=key_padding_mask, backend=self.backend
            )
        y = y.transpose(1, 2).reshape(B, N, E)  # (B, N, E)
        return self.proj(y)
