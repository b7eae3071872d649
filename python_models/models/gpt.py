"""Autoregressive models: a GPT-2 style causal language model, and image-GPT, the same
objective on images (regress the next patch's pixels from the previous ones) on the
shared ViT encoder run causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    KVCache,
    init_weights,
    make_blocks,
    patchify,
    pixel_targets,
    scale_residual_init,
    unpatchify,
)
from .common import IGNORE_INDEX, ModelConfig, ReconModel
from .vit import EncoderConfig, ViTEncoder


@dataclass
class GPTConfig(ModelConfig):
    vocab_size: int = 256  # tokens (256 = raw bytes)
    block_size: int = 64  # maximum sequence length (learned position embeddings)
    n_layer: int = 2  # transformer blocks
    n_head: int = 2  # attention heads
    n_embd: int = 32  # model width
    mlp_hidden: int | None = None  # MLP width; None = 4 * n_embd
    activation: str = "gelu_tanh"  # GPT-2's "gelu_new"
    norm_eps: float = 1e-5  # LayerNorm epsilon
    dropout: float = 0.0  # embedding and residual dropout
    attn_dropout: float = 0.0  # on the attention probabilities (training only)
    bias: bool = True  # biases in Linears and LayerNorms (GPT-2: True; nanoGPT's bias=False)

    presets = {
        "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32),
        "small": dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=128),
        # GPT-2 124M
        "base": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    }


class GPTOutput(NamedTuple):
    loss: torch.Tensor  # () mean next-token cross entropy over the non-ignored targets
    logits: torch.Tensor  # (B, T, vocab_size)


class GPT(ReconModel):
    """Causal LM with tied input/output embeddings.

    forward(idx, targets=None, attention_mask=None) -> GPTOutput(loss, logits).
    """

    model_type = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = make_blocks(
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.mlp_hidden,
            pre_norm=True,
            causal=True,
            activation=c.activation,
            norm_eps=c.norm_eps,
            dropout=c.dropout,
            attn_dropout=c.attn_dropout,
            bias=c.bias,
            backend=backend,
        )
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        init_weights(self)
        scale_residual_init(self.blocks)

    def new_cache(self) -> KVCache:
        """An empty KV cache for ``hidden_states(..., kv_cache=)`` (up to block_size tokens)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """idx (B, T) long -> final hidden states (B, T, n_embd).

        kv_cache: idx continues the cached tokens (positions start at kv_cache.length); the
        new keys and values are appended to it. No attention_mask with a cache.
        """
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"idx: expected at most block_size={self.config.block_size} tokens, got T={T}"
                + (f" after {start} cached" if start else "")
            )
        kpm = None if attention_mask is None else attention_mask.bool()
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, blk in enumerate(self.blocks):
            x = blk(x, kpm, None if kv_cache is None else (kv_cache, i))
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> GPTOutput:
        """idx: (B, T) token ids. targets: (B, T), targets[:, t] is the token that follows
        idx[:, t] (IGNORE_INDEX = -100 skips a position); None means idx shifted left, i.e.
        Hugging Face ``labels=input_ids`` (last position and padding ignored).
        attention_mask: (B, T), 1/True = real token, 0 = padding (excluded as keys and targets).
        """
        logits = self.lm_head(self.hidden_states(idx, attention_mask))  # (B, T, V)
        if targets is None:
            targets = F.pad(idx[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
            if attention_mask is not None:
                next_real = F.pad(attention_mask[:, 1:].bool(), (0, 1), value=False)  # (B, T)
                targets = targets.masked_fill(~next_real, IGNORE_INDEX)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return GPTOutput(loss, logits)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after idx (B, T) -> (B, T + max_new_tokens).
        temperature 0 is greedy; top_k keeps the k most likely tokens. The context is cropped
        to the last block_size tokens. use_cache: keep the keys and values of the context
        (KVCache) so each new token costs one token's forward; once the context fills
        block_size the window slides (learned absolute positions), which needs a full pass
        per token, exactly what use_cache=False does at every step."""
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: expected None or >= 1, got {top_k}")
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and cache.length < self.config.block_size:
                ctx = idx[:, -1:]  # the cache holds everything before the newest token
            else:
                ctx = idx[:, -self.config.block_size :]
                cache = self.new_cache() if use_cache else None
            logits = self.lm_head(self.hidden_states(ctx, kv_cache=cache)[:, -1])  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def features(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) -> (B, n_embd): mean of the final hidden states over real tokens."""
        h = self.hidden_states(idx, attention_mask)
        if attention_mask is None:
            return h.mean(dim=1)
        m = attention_mask.to(h.dtype)[..., None]  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)


# --------------------------------------------------------------------------- image GPT


@dataclass
class ImageGPTConfig(ModelConfig):
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(pool="mean")
    )  # run causally
    norm_pix_loss: bool = False  # regress per-patch normalised pixels

    presets = {
        "tiny": dict(encoder=dict(EncoderConfig.presets["tiny"], pool="mean")),
        "small": dict(encoder=dict(EncoderConfig.presets["small"], pool="mean")),
        "base": dict(encoder=dict(EncoderConfig.presets["base"], pool="mean")),
    }


class ImageGPTOutput(NamedTuple):
    loss: torch.Tensor  # () mean squared pixel error of the next-patch predictions
    pred: torch.Tensor  # (B, L, p*p*C) prediction of patch t from patches < t


class ImageGPT(ReconModel):
    """Next-patch prediction over patches in raster order (iGPT with pixel regression).

    The causal encoder reads [start, patch_0, ..., patch_{L-1}] (the [CLS] token is the start
    token); output t predicts patch t. forward(images) -> ImageGPTOutput(loss, pred).
    features(images) -> (B, dim), mean of the patch-token outputs by default (under causal
    attention the [CLS]/start token sees nothing).
    """

    model_type = "image_gpt"
    config_class = ImageGPTConfig

    def __init__(self, config: ImageGPTConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        e = config.encoder
        self.encoder = ViTEncoder(e, causal=True, backend=backend)
        self.head = nn.Linear(e.dim, e.patch_dim)
        init_weights(self.head, linear="xavier")

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C): prediction of each patch from the ones before it."""
        return self.head(self.encoder(images)[:, :-1])  # outputs 0..L-1 (the last sees all)

    def forward(self, images: torch.Tensor) -> ImageGPTOutput:
        pred = self.predict(images)
        target = pixel_targets(
            patchify(images, self.config.encoder.patch_size), self.config.norm_pix_loss
        )
        return ImageGPTOutput(((pred - target) ** 2).mean(), pred)

    @torch.no_grad()
    def complete(self, images: torch.Tensor, n_given: int) -> torch.Tensor:
        """Keep the first ``n_given`` patches of images (B, C, H, W) and predict the rest one
        patch at a time, each from the previous predictions -> (B, C, H, W). Meaningful for
        models trained without norm_pix_loss (predictions are then raw pixels)."""
        e = self.config.encoder
        patches = patchify(images, e.patch_size).clone()  # (B, L, P)
        for t in range(n_given, e.num_patches):
            img = unpatchify(patches, e.patch_size, e.in_chans, e.image_size, e.image_size)
            patches[:, t] = self.predict(img)[:, t]
        return unpatchify(patches, e.patch_size, e.in_chans, e.image_size, e.image_size)

    def features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, dim)."""
        return self.encoder.features(images, pool)
