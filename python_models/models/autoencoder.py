"""Autoencoder with an explicit bottleneck: the shared ViT encoder pools the image to one
vector, a linear map squeezes it to ``bottleneck`` numbers, and a transformer decoder
expands them back to every patch (positions from fixed sin-cos embeddings).
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
class AutoencoderConfig(ModelConfig):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the shared ViT encoder
    bottleneck: int = 8  # width of the latent code z, the only path from encoder to decoder
    decoder_dim: int = 32  # decoder token width
    decoder_depth: int = 1  # decoder blocks
    decoder_heads: int = 2  # decoder attention heads
    decoder_mlp_hidden: int | None = None  # decoder MLP width; None = 4 * decoder_dim
    norm_pix_loss: bool = False  # regress per-patch normalised pixels

    presets = {
        "tiny": dict(encoder="tiny", bottleneck=8, decoder_dim=32, decoder_depth=1),
        "small": dict(
            encoder="small", bottleneck=16, decoder_dim=64, decoder_depth=2, decoder_heads=4
        ),
        "base": dict(
            encoder="base", bottleneck=256, decoder_dim=512, decoder_depth=8, decoder_heads=16
        ),
    }

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck: expected a positive width, got {self.bottleneck}")


class AutoencoderOutput(NamedTuple):
    loss: torch.Tensor  # () mean squared pixel error over all patches
    pred: torch.Tensor  # (B, L, p*p*C) reconstructed patches (normalised if norm_pix_loss)
    latent: torch.Tensor  # (B, bottleneck) the code z


class Autoencoder(ReconModel):
    """images (B, C, H, W) -> z (B, bottleneck) -> patches (B, L, p*p*C).

    forward(images) -> AutoencoderOutput(loss, pred, latent).
    features(images) -> (B, dim) pooled encoder output (before the bottleneck), like the
    other image models; encode(images) -> z.
    """

    model_type = "autoencoder"
    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        e = config.encoder
        self.encoder = ViTEncoder(e, backend=backend)
        self.to_latent = nn.Linear(e.dim, config.bottleneck)
        self.from_latent = nn.Linear(config.bottleneck, config.decoder_dim)
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed_2d(e.grid, config.decoder_dim, cls_token=False)[None],
        )  # (1, L, decoder_dim)
        self.decoder_blocks, self.decoder_norm, self.decoder_pred = decoder_stack(config, backend)
        for m in (
            self.to_latent,
            self.from_latent,
            self.decoder_blocks,
            self.decoder_norm,
            self.decoder_pred,
        ):
            init_weights(m, linear="xavier")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> z (B, bottleneck)."""
        return self.to_latent(self.encoder.features(images))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, bottleneck) -> patches (B, L, p*p*C)."""
        x = self.from_latent(z)[:, None, :] + self.decoder_pos_embed  # (B, L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, images: torch.Tensor) -> AutoencoderOutput:
        z = self.encode(images)
        pred = self.decode(z)
        e = self.config.encoder
        target = pixel_targets(patchify(images, e.patch_size), self.config.norm_pix_loss)
        loss = ((pred - target) ** 2).mean()
        return AutoencoderOutput(loss, pred, z)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> reconstructed (B, C, H, W) (meaningful without norm_pix_loss)."""
        e = self.config.encoder
        return unpatchify(
            self.decode(self.encode(images)), e.patch_size, e.in_chans, e.image_size, e.image_size
        )

    def features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, dim): the pooled encoder output."""
        return self.encoder.features(images, pool)
