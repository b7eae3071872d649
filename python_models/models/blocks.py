"""Transformer building blocks on the recon_kernels ops.

* attention: ``rk.nn.MultiheadAttention`` (packed qkv projection -> the fused attention
  op -> output projection), with its ``rk.nn.KVCache`` for incremental causal decoding.
* ``MLP``: act(x W1ᵀ + b1) W2ᵀ + b2 as one rk.conv1d_mlp call.
* ``Block``: pre-LN (GPT-2, ViT, MAE) or post-LN (BERT) residual block.
* ``pixel_targets`` / ``decoder_stack``: the regression target and the light decoder that
  MAE and the autoencoder share.

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
from recon_kernels.nn import KVCache, LoRALinear, MultiheadAttention
from recon_kernels.reference import ACTIVATIONS, apply_activation


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

    ``bias=False`` drops every bias (LayerNorms, projections, MLP), as nanoGPT's ``bias``;
    ``qkv_bias`` overrides it for the qkv projection alone (None: follow ``bias``).
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
        qkv_bias: bool | None = None,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout: expected a probability in [0, 1), got {attn_dropout}")
        self.pre_norm = pre_norm
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.attn = MultiheadAttention(
            dim,
            n_heads,
            bias=bias,
            qkv_bias=qkv_bias,
            causal=causal,
            dropout=attn_dropout,
            backend=backend,
        )
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.mlp = MLP(dim, mlp_hidden, activation=activation, bias=bias, backend=backend)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        kv_cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.ln_1(x), key_padding_mask, kv_cache=kv_cache))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, key_padding_mask, kv_cache=kv_cache)))
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
            if m.bias is not None:
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


def pixel_targets(patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """(B, L, P) -> the regression target; per-patch standardised if norm_pix (unbiased var,
    eps 1e-6, as MAE)."""
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1.0e-6) ** 0.5


def decoder_stack(config, backend: str | None) -> tuple[nn.ModuleList, nn.LayerNorm, nn.Linear]:
    """The light pre-LN decoder of MAE and the autoencoder: blocks, final LayerNorm, pixel
    head. config: an MAEConfig or AutoencoderConfig (decoder_* fields and its encoder's
    activation, eps, dropouts, qkv_bias and patch size)."""
    e = config.encoder
    blocks = make_blocks(
        config.decoder_depth,
        config.decoder_dim,
        config.decoder_heads,
        config.decoder_mlp_hidden,
        pre_norm=True,
        activation=e.activation,
        norm_eps=e.norm_eps,
        dropout=e.dropout,
        attn_dropout=e.attn_dropout,
        qkv_bias=e.qkv_bias,
        backend=backend,
    )
    norm = nn.LayerNorm(config.decoder_dim, eps=e.norm_eps)
    return blocks, norm, nn.Linear(config.decoder_dim, e.patch_dim)
