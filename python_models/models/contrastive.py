"""SimCLR-style contrastive baseline (Chen et al. 2020) on the shared ViT encoder: two
random augmentations of each image, a projection head (one fused MLP), NT-Xent loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .blocks import MLP, init_weights
from .common import ModelConfig, ReconModel
from .vit import EncoderConfig, ViTEncoder


@dataclass
class SimCLRConfig(ModelConfig):
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the shared ViT encoder
    proj_hidden: int = 64  # projection head hidden width
    proj_dim: int = 32  # projection output width (the space of the loss)
    temperature: float = 0.2  # NT-Xent softmax temperature
    # augmentations (per image, on (B, C, H, W) tensors)
    aug_translate: float = 0.125  # max shift as a fraction of the image side
    aug_rotate: float = 15.0  # max rotation, degrees
    aug_scale: tuple[float, float] = (0.9, 1.1)  # zoom range
    aug_noise: float = 0.05  # std of additive Gaussian noise, relative to the image's std

    presets = {
        "tiny": dict(encoder="tiny", proj_hidden=64, proj_dim=32),
        "small": dict(encoder="small", proj_hidden=256, proj_dim=64),
        "base": dict(encoder="base", proj_hidden=2048, proj_dim=128, temperature=0.1),
    }

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")


class SimCLROutput(NamedTuple):
    loss: torch.Tensor  # () NT-Xent over the 2B views
    z1: torch.Tensor  # (B, proj_dim) projections of view 1 (not normalised)
    z2: torch.Tensor  # (B, proj_dim) projections of view 2


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross entropy: each of the 2B views must pick its partner
    among the other 2B-1. z1, z2: (B, d) -> () mean loss."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=-1)  # (2B, d)
    sim = (z @ z.t()) / temperature  # (2B, 2B)
    eye = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))  # a view is not its own candidate
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # partner index
    return F.cross_entropy(sim, targets)


def augment(
    images: torch.Tensor, cfg: SimCLRConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random affine view (shift, rotation, zoom; zero fill) plus Gaussian noise.
    (B, C, H, W) -> (B, C, H, W)."""
    B = images.shape[0]
    dev, dt = images.device, images.dtype

    def uniform(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(
            B, generator=generator, device=dev if generator is None else generator.device
        )
        return (lo + (hi - lo) * u).to(device=dev, dtype=dt)

    angle = uniform(-cfg.aug_rotate, cfg.aug_rotate) * (math.pi / 180)
    scale = uniform(*cfg.aug_scale)
    t = 2 * cfg.aug_translate  # affine_grid coordinates span [-1, 1]
    tx, ty = uniform(-t, t), uniform(-t, t)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.aug_noise > 0:
        noise = torch.randn(
            images.shape, generator=generator, device=dev if generator is None else generator.device
        ).to(device=dev, dtype=dt)
        out = out + cfg.aug_noise * images.std() * noise
    return out


class SimCLR(ReconModel):
    """Contrastive model over images (B, C, H, W).

    forward(images, views=None) -> SimCLROutput(loss, z1, z2). views: a pair of (B, C, H, W)
    tensors to use instead of drawing two augmentations of ``images`` (which may then be None).
    features(images) -> (B, dim) encoder representation (before the projection head).
    """

    model_type = "simclr"
    config_class = SimCLRConfig

    def __init__(self, config: SimCLRConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        e = config.encoder
        self.encoder = ViTEncoder(e, backend=backend)
        self.projector = MLP(
            e.dim, config.proj_hidden, config.proj_dim, activation="relu", backend=backend
        )
        init_weights(self.projector, linear="xavier")

    def views(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent augmentations of ``images``."""
        return augment(images, self.config, generator), augment(images, self.config, generator)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, proj_dim)."""
        return self.projector(self.encoder.features(images))

    def forward(
        self,
        images: torch.Tensor | None = None,
        views: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SimCLROutput:
        if views is None:
            if images is None:
                raise ValueError(
                    "images: expected a (B, C, H, W) tensor when views is None, got None"
                )
            views = self.views(images)
        v1, v2 = views
        B = v1.shape[0]
        z = self.project(torch.cat([v1, v2], dim=0))  # (2B, proj_dim), one encoder pass
        z1, z2 = z[:B], z[B:]
        return SimCLROutput(nt_xent(z1, z2, self.config.temperature), z1, z2)

    def features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, dim)."""
        return self.encoder.features(images, pool)
