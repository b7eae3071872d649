"""Masked autoencoder (He et al. 2021): encode a random 25% of the patches (+ [CLS]),
decode all patches with mask tokens through a light decoder, regress the pixels of the
masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from .blocks import (
    decoder_stack,
    init_weights,
    patchify,
    pixel_targets,
    sincos_pos_embed_2d,
    unpatchify,
)
from .common import ModelConfig, ReconModel
from .vit import EncoderConfig, ViTEncoder


@dataclass
class MAEConfig(ModelConfig):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the shared ViT encoder
    decoder_dim: int = 32  # decoder token width
    decoder_depth: int = 1  # decoder blocks
    decoder_heads: int = 2  # decoder attention heads
    decoder_mlp_hidden: int | None = None  # decoder MLP width; None = 4 * decoder_dim
    mask_ratio: float = 0.75  # fraction of patches removed; int(L * (1 - ratio)) are kept
    norm_pix_loss: bool = False  # regress per-patch normalised pixels (mean 0, var 1)

    presets = {
        "tiny": dict(encoder="tiny", decoder_dim=32, decoder_depth=1, decoder_heads=2),
        "small": dict(encoder="small", decoder_dim=64, decoder_depth=2, decoder_heads=4),
        "base": dict(
            encoder="base", decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True
        ),
    }

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: expected a value in (0, 1), got {self.mask_ratio}")


class MAEOutput(NamedTuple):
    loss: torch.Tensor  # () mean squared error over the masked patches
    pred: (
        torch.Tensor
    )  # (B, L, p*p*C) predicted pixels of every patch (normalised if norm_pix_loss)
    mask: torch.Tensor  # (B, L) float, 1 = masked (predicted), 0 = visible
    ids_restore: torch.Tensor  # (B, L) long, undoes the shuffle: gather(shuffled, ids_restore)


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (the patches with the smallest noise
    are kept). Returns ids_keep (B, L_keep), mask (B, L) float 1 = removed, ids_restore (B, L),
    with L_keep = int(L * (1 - mask_ratio)). noise: (B, L) float, for reproducible masks."""
    if noise is None:
        noise = torch.rand(batch, length, device=device)
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(
            f"noise: expected shape (B, L) = ({batch}, {length}), got {tuple(noise.shape)}"
        )
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending noise first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L) inverse permutation
    ids_keep = ids_shuffle[:, :keep]  # (B, L_keep)
    mask = (torch.arange(length, device=noise.device) >= keep).to(noise.dtype)  # shuffled order
    mask = torch.gather(mask.expand(batch, -1), 1, ids_restore)  # (B, L) original order
    return ids_keep, mask, ids_restore


class MAE(ReconModel):
    """Masked autoencoder over images (B, C, H, W).

    forward(images, noise=None) -> MAEOutput(loss, pred, mask, ids_restore).
    features(images) -> (B, dim) from the encoder on all patches (no masking).
    """

    model_type = "mae"
    config_class = MAEConfig

    def __init__(self, config: MAEConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        e = config.encoder
        self.encoder = ViTEncoder(e, backend=backend)
        self.decoder_embed = nn.Linear(e.dim, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(e.grid, config.decoder_dim)[None]
        )  # (1, L+1, decoder_dim)
        self.decoder_blocks, self.decoder_norm, self.decoder_pred = decoder_stack(config, backend)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_weights(m, linear="xavier")
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C)."""
        return patchify(images, self.config.encoder.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        e = self.config.encoder
        return unpatchify(patches, e.patch_size, e.in_chans, e.image_size, e.image_size)

    def encode(
        self,
        images: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches: (latent (B, 1+L_keep, dim), mask (B, L), ids_restore (B, L))."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        L = self.config.encoder.num_patches
        ids_keep, mask, ids_restore = random_masking(
            images.shape[0], L, ratio, noise=noise, device=images.device
        )
        return self.encoder(images, ids_keep), mask.to(images.dtype), ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+L_keep, dim), ids_restore (B, L) -> predicted patches (B, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (B, 1+L_keep, Dd)
        B, n, Dd = x.shape
        L = ids_restore.shape[1]
        masked = self.mask_token.expand(B, L + 1 - n, Dd)  # (B, L-L_keep, Dd)
        x_ = torch.cat([x[:, 1:], masked], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, Dd))  # original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, L, p*p*C), [CLS] dropped

    def forward(
        self,
        images: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
    ) -> MAEOutput:
        """images (B, C, H, W); noise (B, L) fixes the mask (two runs with the same noise share
        it). Loss: mean over masked patches of the per-patch mean squared pixel error."""
        latent, mask, ids_restore = self.encode(images, noise, mask_ratio)
        pred = self.decode(latent, ids_restore)
        target = pixel_targets(self.patchify(images), self.config.norm_pix_loss)
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
        loss = (per_patch * mask).sum() / mask.sum()
        return MAEOutput(loss, pred, mask, ids_restore)

    def features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, dim): the encoder on all patches, [CLS] or mean pooled."""
        return self.encoder.features(images, pool)
