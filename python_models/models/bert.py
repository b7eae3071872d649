"""BERT (Devlin et al. 2018): post-LN bidirectional encoder, masked-language-model head tied
to the token embeddings, and the 15% / 80-10-10 masking collator.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon_kernels.reference import apply_activation

from .blocks import init_weights, make_blocks
from .common import IGNORE_INDEX, ModelConfig, ReconModel


@dataclass
class BERTConfig(ModelConfig):
    vocab_size: int = 260  # tokens; the tiny/small presets: 256 bytes + 4 specials
    max_position: int = 64  # maximum sequence length (learned position embeddings)
    type_vocab_size: int = 2  # token types (segments A/B); 0 disables token-type embeddings
    n_layer: int = 2  # transformer blocks
    n_head: int = 2  # attention heads
    dim: int = 32  # model width
    mlp_hidden: int | None = None  # MLP width; None = 4 * dim
    activation: str = "gelu"  # MLP and MLM-head activation (BERT: exact gelu)
    norm_eps: float = 1e-12  # LayerNorm epsilon (BERT's)
    dropout: float = 0.0  # embedding and residual dropout
    attn_dropout: float = 0.0  # on the attention probabilities (training only)
    pad_token_id: int = 256  # padding id (no special meaning in the model; for collators)
    cls_token_id: int = 257  # [CLS], prepended by the data pipeline
    sep_token_id: int = 258  # [SEP]
    mask_token_id: int = 259  # [MASK]

    presets = {
        "tiny": dict(vocab_size=260, max_position=64, n_layer=2, n_head=2, dim=32),
        "small": dict(vocab_size=260, max_position=256, n_layer=4, n_head=4, dim=128),
        # bert-base-uncased
        "base": dict(
            vocab_size=30522,
            max_position=512,
            n_layer=12,
            n_head=12,
            dim=768,
            pad_token_id=0,
            cls_token_id=101,
            sep_token_id=102,
            mask_token_id=103,
        ),
    }

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        return (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)


class BERTOutput(NamedTuple):
    loss: torch.Tensor | None  # () MLM cross entropy over labels != -100; None without labels
    logits: torch.Tensor  # (B, T, vocab_size)


class BERT(ReconModel):
    """Bidirectional encoder with an MLM head.

    forward(input_ids, attention_mask=None, token_type_ids=None, labels=None) -> BERTOutput.
    features(input_ids, attention_mask=None) -> (B, dim): the final [CLS] (position 0) state.
    """

    model_type = "bert"
    config_class = BERTConfig

    def __init__(self, config: BERTConfig, backend: str | None = None) -> None:
        super().__init__(config, backend)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = nn.Embedding(c.max_position, c.dim)
        self.type_emb = nn.Embedding(c.type_vocab_size, c.dim) if c.type_vocab_size > 0 else None
        self.emb_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = make_blocks(
            c.n_layer,
            c.dim,
            c.n_head,
            c.mlp_hidden,
            pre_norm=False,
            activation=c.activation,
            norm_eps=c.norm_eps,
            dropout=c.dropout,
            attn_dropout=c.attn_dropout,
            backend=backend,
        )
        # MLM head: dense -> act -> LayerNorm -> tied decoder + bias
        self.mlm_dense = nn.Linear(c.dim, c.dim)
        self.mlm_norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        init_weights(self)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, dim). attention_mask (B, T): 1/True =
        real token; padding is excluded as a key (padded positions still get outputs)."""
        B, T = input_ids.shape
        if T > self.config.max_position:
            raise ValueError(
                f"input_ids: expected at most max_position={self.config.max_position} tokens, got T={T}"
            )
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)  # (B, T, dim)
        if self.type_emb is not None:
            if token_type_ids is None:
                x = x + self.type_emb.weight[0]
            else:
                x = x + self.type_emb(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids: expected None with type_vocab_size=0, got a tensor")
        x = self.drop(self.emb_norm(x))
        kpm = None if attention_mask is None else attention_mask.bool()
        for blk in self.blocks:
            x = blk(x, kpm)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, vocab_size) through the head tied to tok_emb."""
        h = self.mlm_norm(apply_activation(self.mlm_dense(hidden), self.config.activation))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> BERTOutput:
        """labels: (B, T) original ids at the positions to predict, -100 elsewhere (from
        MLMCollator). Returns the MLM loss (None without labels) and the logits."""
        logits = self.mlm_logits(self.encode(input_ids, attention_mask, token_type_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return BERTOutput(loss, logits)

    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) -> (B, dim): the final hidden state of the [CLS] token (position 0)."""
        return self.encode(input_ids, attention_mask, token_type_ids)[:, 0]


class MLMCollator:
    """BERT masking: choose ``mlm_probability`` of the non-special tokens; of those 80%
    become [MASK], 10% a uniformly random token, 10% stay. labels hold the original id at
    chosen positions and -100 elsewhere.

    __call__(input_ids (B, T) long, generator=None) -> dict(input_ids, labels, attention_mask);
    attention_mask is ``input_ids != pad_token_id``. The input is not modified.
    """

    def __init__(
        self,
        vocab_size: int,
        mask_token_id: int,
        special_token_ids: Iterable[int],
        pad_token_id: int,
        mlm_probability: float = 0.15,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability: expected a value in (0, 1), got {mlm_probability}")
        for name, v in (("mask_token_id", mask_token_id), ("pad_token_id", pad_token_id)):
            if not 0 <= v < vocab_size:
                raise ValueError(f"{name}: expected an id in [0, {vocab_size}), got {v}")
        self.vocab_size, self.mask_token_id, self.pad_token_id = (
            vocab_size,
            mask_token_id,
            pad_token_id,
        )
        self.special = torch.tensor(sorted(set(special_token_ids) | {pad_token_id, mask_token_id}))
        self.mlm_probability = mlm_probability

    @classmethod
    def from_config(cls, config: BERTConfig, mlm_probability: float = 0.15) -> MLMCollator:
        return cls(
            config.vocab_size,
            config.mask_token_id,
            config.special_token_ids,
            config.pad_token_id,
            mlm_probability,
        )

    def __call__(
        self, input_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids: expected a (B, T) long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        dev = input_ids.device

        def rand(shape) -> torch.Tensor:  # uniform [0, 1) on the generator's device, moved
            g_dev = dev if generator is None else generator.device
            return torch.rand(shape, generator=generator, device=g_dev).to(dev)

        special = torch.isin(input_ids, self.special.to(dev))  # (B, T) never masked
        chosen = (rand(input_ids.shape) < self.mlm_probability) & ~special
        labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
        u = rand(input_ids.shape)  # one draw splits the chosen into 80 / 10 / 10
        to_mask = chosen & (u < 0.8)
        to_random = chosen & (u >= 0.8) & (u < 0.9)
        g_dev = dev if generator is None else generator.device
        random_ids = torch.randint(
            self.vocab_size, input_ids.shape, generator=generator, device=g_dev
        ).to(dev)
        out = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        out = torch.where(to_random, random_ids, out)
        return {
            "input_ids": out,
            "labels": labels,
            "attention_mask": input_ids != self.pad_token_id,
        }
