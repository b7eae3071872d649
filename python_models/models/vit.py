"""The one ViT-style image encoder that every image model shares (AE, MAE, SimCLR,
image-GPT), so that pretraining objectives are compared on the same network.

images (B, C, H, W) -> patchify (B, L, p*p*C) -> linear patch embedding + fixed 2-D sin-cos
positions -> [CLS] + (a subset of) the patch tokens -> pre-LN blocks -> LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .blocks import init_weights, make_blocks, patchify, sincos_pos_embed_2d
from .common import ModelConfig


@dataclass
class EncoderConfig(ModelConfig):
    image_size: int = 8  # square images, H = W = image_size pixels
    patch_size: int = 2  # square patches; image_size must be a multiple
    in_chans: int = 1  # image channels C
    dim: int = 32  # token width
    depth: int = 2  # number of transformer blocks
    n_heads: int = 2  # attention heads (dim % n_heads == 0)
    mlp_hidden: int | None = None  # MLP hidden width; None = 4 * dim
    activation: str = "gelu"  # MLP activation: gelu | gelu_tanh | relu
    norm_eps: float = 1e-6  # LayerNorm epsilon (ViT-MAE checkpoints use 1e-12)
    qkv_bias: bool = True  # bias on the qkv projection
    dropout: float = 0.0  # residual and embedding dropout
    attn_dropout: float = 0.0  # on the attention probabilities (training only)
    pool: str = "cls"  # features(): "cls" token or "mean" of the patch tokens

    presets = {
        # sklearn digits (1x8x8): 16 patches of 2x2
        "tiny": dict(dim=32, depth=2, n_heads=2),
        "small": dict(dim=128, depth=4, n_heads=4),
        # ViT-B/16 at 224 (the ViT-MAE base encoder)
        "base": dict(image_size=224, patch_size=16, in_chans=3, dim=768, depth=12, n_heads=12),
    }

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size: expected a divisor of image_size={self.image_size}, got {self.patch_size}"
            )
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {self.pool!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans


class ViTEncoder(nn.Module):
    """ViT encoder over patches with a [CLS] token. ``causal=True`` makes it an
    autoregressive (image-GPT) encoder over [CLS=start, patch_0, ..., patch_{L-1}].

    Submodules (names used by LoRA patterns): ``patch_embed`` (Linear p*p*C -> dim),
    ``blocks.{i}.attn.qkv|proj``, ``blocks.{i}.mlp.fc1|fc2``, ``norm``.
    """

    def __init__(
        self, cfg: EncoderConfig, *, causal: bool = False, backend: str | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.causal, self.backend = cfg, causal, backend
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.grid, cfg.dim)[None]
        )  # (1, L+1, dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = make_blocks(
            cfg.depth,
            cfg.dim,
            cfg.n_heads,
            cfg.mlp_hidden,
            pre_norm=True,
            causal=causal,
            activation=cfg.activation,
            norm_eps=cfg.norm_eps,
            dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout,
            qkv_bias=cfg.qkv_bias,
            backend=backend,
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        init_weights(self, linear="xavier")  # MAE's init
        nn.init.normal_(self.cls_token, std=0.02)

    def check_images(self, images: torch.Tensor) -> None:
        c = self.cfg
        want = (c.in_chans, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images: expected shape (B, {', '.join(map(str, want))}), got {tuple(images.shape)}"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions, no [CLS]: (B, C, H, W) -> (B, L, dim)."""
        self.check_images(images)
        x = self.patch_embed(patchify(images, self.cfg.patch_size))  # (B, L, dim)
        return x + self.pos_embed[:, 1:]

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + L', dim) after the final LayerNorm; token 0 is
        [CLS]. ids_keep (B, L') long: encode only those patches, in that order (MAE); None = all."""
        x = self.embed(images)  # (B, L, dim)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, L', dim)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, dim)
        x = self.drop(torch.cat([cls, x], dim=1))  # (B, 1+L', dim)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, 1+L', dim) -> (B, dim): the [CLS] token or the mean of the patch tokens."""
        pool = self.cfg.pool if pool is None else pool
        if pool == "cls":
            return tokens[:, 0]
        if pool == "mean":
            return tokens[:, 1:].mean(dim=1)
        raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")

    def features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """images (B, C, H, W) -> (B, dim) representation (cfg.pool unless ``pool`` given)."""
        return self.pool(self(images), pool)
