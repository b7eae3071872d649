"""Transformer building blocks on the recon_kernels ops.

* ``SelfAttention``: packed qkv projection -> rk.masked_softmax_attention or
  rk.causal_attention -> output projection.
* ``MLP``: act(x W1ᵀ + b1) W2ᵀ + b2 as one rk.conv1d_mlp call.
* ``Block``: pre-LN (GPT-2, ViT, MAE) or post-LN (BERT) residual block.
* ``KVCache``: keys and values of the tokens already seen, for incremental causal decoding
  (the new queries attend to the cached keys through rk.causal_attention, whose causal
  mask is aligned bottom-right, so Nq < Nk needs no offset).

Every linear layer is a plain ``nn.Linear`` attribute, so ``python_models.lora`` can wrap
any of them in ``rk.nn.LoRALinear`` by name. A LoRA-wrapped ``qkv``/``proj`` runs the fused
``lora_linear`` op; a LoRA-wrapped ``fc1``/``fc2`` keeps the MLP fused by passing the
effective weight W + s·B A (``merge_lora``, differentiable in A and B) to conv1d_mlp.

Dropout: on the attention probabilities (``attn_dropout``, the fused ops' own dropout,
in training only), on the residual branches and on the embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import recon_kernels as rk
from recon_kernels.nn import LoRALinear
from recon_kernels.reference import ACTIVATIONS, apply_activation


class KVCache:
    """Keys and values of every layer for the tokens decoded so far.

    Buffers (n_layers, B, n_heads, max_len, head_dim) are allocated on the first
    ``update`` (dtype and device of the first keys). ``length`` tokens are cached; a forward
    pass writes its T new tokens into every layer with ``update`` and then calls
    ``advance(T)``.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        if n_layers < 1 or max_len < 1:
            raise ValueError(
                f"KVCache: expected n_layers >= 1 and max_len >= 1, got {n_layers}, {max_len}"
            )
        self.n_layers, self.max_len, self.length = n_layers, max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_heads, T, head_dim) after the cached tokens of ``layer``; returns
        that layer's keys and values for all ``length + T`` tokens (strided views)."""
        B, nh, T, hd = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"kv_cache: {self.length} cached + {T} new tokens exceed max_len={self.max_len}"
            )
        if self.k is None:
            shape = (self.n_layers, B, nh, self.max_len, hd)
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        elif self.k.shape[1:3] != (B, nh) or self.k.shape[-1] != hd:
            raise ValueError(
                f"kv_cache: expected keys of shape ({self.k.shape[1]}, {self.k.shape[2]}, T, "
                f"{self.k.shape[-1]}), got {tuple(k.shape)}"
            )
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class SelfAttention(nn.Module):
    """Multi-head self-attention. x: (B, N, dim) -> (B, N, dim).

    key_padding_mask: bool (B, N), True = real token (HF ``attention_mask`` convention).
    causal=True: query i sees keys j <= i (GPT).
    kv_cache=(cache, layer): causal decoding; x holds only the new tokens, which attend to the
    cached ones and themselves (no key_padding_mask then).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        causal: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dropout: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if n_heads < 1 or dim % n_heads != 0:
            raise ValueError(f"n_heads: expected a divisor of dim={dim}, got {n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"attn_dropout: expected a probability in [0, 1), got {dropout}")
        self.dropout = dropout  # on the attention probabilities, in training
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        B, N, E = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim)  # (B, N, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd), strided views
        if kv_cache is not None:
            if not self.causal or key_padding_mask is not None:
                raise ValueError(
                    "kv_cache: expected causal attention without key_padding_mask, got "
                    f"causal={self.causal}, key_padding_mask "
                    f"{'given' if key_padding_mask is not None else 'None'}"
                )
            k, v = kv_cache[0].update(kv_cache[1], k, v)  # (B, nh, cached + N, hd)
        p = self.dropout if self.training else 0.0
        if self.causal:
            y = rk.causal_attention(
                q, k, v, key_padding_mask=key_padding_mask, dropout_p=p, backend=self.backend
            )
        else:
            y = rk.masked_softmax_attention(
                q, k, v, key_padding_mask=key_padding_mask, dropout_p=p, backend=self.backend
            )
        y = y.transpose(1, 2).reshape(B, N, E)  # (B, N, nh*hd)
        return self.proj(y)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, causal={self.causal}, dropout={self.dropout}, "
            f"backend={self.backend!r}"
        )


def _effective_linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that ``layer`` applies, for the fused MLP; None if it cannot be fused
    (LoRA dropout active in training: the dropped input feeds only the LoRA branch)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    if isinstance(layer, LoRALinear):
        base = layer.base_layer
        if layer.merged:
            return base.weight, base.bias
        if layer.training and isinstance(layer.lora_dropout, nn.Dropout):
            return None
        w = rk.merge_lora(
            base.weight,
            layer.lora_A.weight,
            layer.lora_B.weight,
            layer.scaling,
            backend=layer.backend,
        )
        return w, base.bias
    raise TypeError(f"MLP layer: expected nn.Linear or LoRALinear, got {type(layer).__name__}")


class MLP(nn.Module):
    """act(x W1ᵀ + b1) W2ᵀ + b2 through rk.conv1d_mlp. x: (..., dim) -> (..., out_dim)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        out_dim: int | None = None,
        *,
        activation: str = "gelu",
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim if out_dim is None else out_dim, bias=bias)
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1, p2 = _effective_linear(self.fc1), _effective_linear(self.fc2)
        if p1 is None or p2 is None:  # LoRA dropout in training: unfused
            return self.fc2(apply_activation(self.fc1(x), self.activation))
        return rk.conv1d_mlp(
            x, p1[0], p1[1], p2[0], p2[1], activation=self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"


class Block(nn.Module):
    """Transformer block. x: (B, N, dim) -> (B, N, dim).

    pre_norm=True (GPT-2/ViT):  x = x + drop(attn(ln_1(x)));  x = x + drop(mlp(ln_2(x)))
    pre_norm=False (BERT):      x = ln_1(x + drop(attn(x)));  x = ln_2(x + drop(mlp(x)))
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        mlp_hidden: int,
        *,
        pre_norm: bool = True,
        causal: bool = False,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        qkv_bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(
            dim, n_heads, causal=causal, qkv_bias=qkv_bias, dropout=attn_dropout, backend=backend
        )
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_hidden, activation=activation, backend=backend)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask, kv_cache))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, key_padding_mask, kv_cache)))
        return self.ln_2(x + self.drop(self.mlp(x)))


def make_blocks(
    depth: int,
    dim: int,
    n_heads: int,
    mlp_hidden: int | None,
    **kw,
) -> nn.ModuleList:
    """``depth`` identical Blocks; mlp_hidden None means 4 * dim."""
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    return nn.ModuleList(Block(dim, n_heads, hidden, **kw) for _ in range(depth))


def init_weights(module: nn.Module, std: float = 0.02, linear: str = "normal") -> None:
    """Linear weights ~ N(0, std) (GPT-2/BERT, linear="normal") or Xavier-uniform (ViT/MAE,
    linear="xavier"); Embedding ~ N(0, std); biases 0; LayerNorm 1/0."""
    if linear not in ("normal", "xavier"):
        raise ValueError(f"linear: expected 'normal' or 'xavier', got {linear!r}")
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if linear == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def scale_residual_init(blocks: nn.ModuleList, std: float = 0.02) -> None:
    """GPT-2: the projections that write into the residual stream get std / sqrt(2 n_layer)."""
    s = std / math.sqrt(2 * len(blocks))
    for b in blocks:
        nn.init.normal_(b.attn.proj.weight, std=s)
        nn.init.normal_(b.mlp.fc2.weight, std=s)


# --------------------------------------------------------------------------- images


def sincos_pos_embed_2d(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings of a grid x grid patch layout (MAE).

    Returns (grid*grid [+1], dim) float32, patches in row-major order, a zero row first for
    [CLS]. Layout per patch at (row h, col w): [sin(w·ω) | cos(w·ω) | sin(h·ω) | cos(h·ω)],
    ω_i = 10000^(-i / (dim/4)) — the layout of the original MAE code and of ViT-MAE
    checkpoints (width coordinate first).
    """
    if dim % 4 != 0:
        raise ValueError(f"dim: expected a multiple of 4 for 2-D sin-cos embeddings, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    h, w = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    ew = w.reshape(-1, 1) * omega  # (L, dim/4)
    eh = h.reshape(-1, 1) * omega  # (L, dim/4)
    emb = torch.cat([ew.sin(), ew.cos(), eh.sin(), eh.cos()], dim=1)  # (L, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)  # (L+1, dim)
    return emb.float()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches row-major, pixels ordered (p_row, p_col, channel)
    (the MAE / ViT-MAE order)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"images: expected H and W divisible by patch_size={p}, got {H}x{W}")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, L, p*p*C)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, height: int, width: int
) -> torch.Tensor:
    """Inverse of ``patchify``: (B, L, p*p*C) -> (B, C, H, W)."""
    B, L, D = patches.shape
    p, h, w = patch_size, height // patch_size, width // patch_size
    if L != h * w or D != p * p * channels:
        raise ValueError(
            f"patches: expected shape (B, {h * w}, {p * p * channels}) for {channels}x{height}x{width} "
            f"images with patch_size={p}, got {tuple(patches.shape)}"
        )
    x = patches.reshape(B, h, w, p, p, channels)  # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)  # (B, C, H, W)
