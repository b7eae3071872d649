"""What a pretraining step feeds the model: the data of each model kind (images or text),
the batch of a step (a fixed per-epoch permutation, all random draws seeded by (seed, step)),
the validation batches, and the model fitted to the data (image size, vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from ..data import ImageData, TextData, default_patch_size, load_images, load_text_data
from ..models.bert import MLMCollator
from ..models.common import MODEL_REGISTRY, ReconModel
from ..models.contrastive import augment
from .config import IMAGE_MODELS, MODELS, TrainConfig
from .seeding import derive_seed, generator


def slice_batch(v: Any, sl: slice) -> Any:
    """Rows ``sl`` of every tensor in a (nested) batch: a process's share of the global batch."""
    if isinstance(v, torch.Tensor):
        return v[sl]
    if isinstance(v, dict):
        return {k: slice_batch(x, sl) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(slice_batch(x, sl) for x in v)
    return v


def to_device(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, dict):
        return {k: to_device(x, device) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(to_device(x, device) for x in v)
    return v


class EpochSampler:
    """Indices of the global batch of a step: an endless stream of per-epoch permutations
    (permutation e seeded by (seed, e)), cut into consecutive batches."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (
                epoch,
                torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch)),
            )
        return self._cache[1]

    def indices(self, step: int, batch: int) -> torch.Tensor:
        out, pos, end = [], step * batch, (step + 1) * batch
        while pos < end:
            e, off = divmod(pos, self.n)
            take = min(end - pos, self.n - off)
            out.append(self._perm(e)[off : off + take])
            pos += take
        return torch.cat(out)


class ImageTask:
    """Unlabelled pretraining on the train split; validation loss on the test split."""

    def __init__(self, kind: str, data: ImageData, model: ReconModel, seed: int) -> None:
        self.kind, self.data, self.seed = kind, data, seed
        self.model_config = model.config
        self.num_patches = model.config.encoder.num_patches
        self.sampler = EpochSampler(len(data.x_train), seed)

    def inputs(self, x: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        """Model keyword arguments for images x (G, C, H, W), all random draws from gen."""
        if self.kind == "mae":
            return {"images": x, "noise": torch.rand(x.shape[0], self.num_patches, generator=gen)}
        if self.kind == "simclr":
            v1 = augment(x, self.model_config, gen)
            return {"views": (v1, augment(x, self.model_config, gen))}
        return {"images": x}

    def batch(self, step: int, size: int) -> dict[str, Any]:
        x = self.data.x_train[self.sampler.indices(step, size)]
        return self.inputs(x, generator(self.seed, "batch", step))

    def tokens(self, size: int) -> int:
        return size * self.num_patches

    def val_batches(self, size: int) -> Iterator[tuple[int, dict[str, Any]]]:
        x = self.data.x_test
        for i, start in enumerate(range(0, len(x), size)):
            chunk = x[start : start + size]
            yield len(chunk), self.inputs(chunk, generator(self.seed, "val", i))


class TextTask:
    """Random windows of the training token stream (GPT: next token; BERT: [CLS] window [SEP]
    with 15% masking); validation on fixed windows of the held-out tail."""

    VAL_WINDOWS = 256

    def __init__(
        self, kind: str, data: TextData, model: ReconModel, seq_len: int, seed: int
    ) -> None:
        self.kind, self.data, self.seq_len, self.seed = kind, data, seq_len, seed
        span = seq_len + 1 if kind == "gpt" else seq_len - 2
        if span < 1:
            raise ValueError(
                f"seq_len: expected at least 3 for BERT ([CLS] x [SEP]), got {seq_len}"
            )
        for split, ids in (("train", data.train), ("validation", data.val)):
            if len(ids) < span + 1:
                raise ValueError(
                    f"data: the {split} split has {len(ids)} tokens, expected more than "
                    f"{span} (seq_len={seq_len}); use a longer text or a smaller --seq-len"
                )
        self.span = span
        if kind == "bert":
            c = model.config
            self.collator = MLMCollator.from_config(c)
            self.cls, self.sep = c.cls_token_id, c.sep_token_id

    def _windows(self, ids: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - self.span, (n,), generator=gen)
        return torch.stack([ids[s : s + self.span] for s in starts.tolist()])  # (n, span)

    def inputs(self, w: torch.Tensor, gen: torch.Generator) -> dict[str, Any]:
        if self.kind == "gpt":
            return {"idx": w[:, :-1], "targets": w[:, 1:]}
        n = w.shape[0]
        ids = torch.cat(
            [torch.full((n, 1), self.cls), w, torch.full((n, 1), self.sep)], dim=1
        )  # (n, seq_len)
        b = self.collator(ids, generator=gen)
        return {"input_ids": b["input_ids"], "labels": b["labels"]}  # no padding: no mask

    def batch(self, step: int, size: int) -> dict[str, Any]:
        gen = generator(self.seed, "batch", step)
        return self.inputs(self._windows(self.data.train, size, gen), gen)

    def tokens(self, size: int) -> int:
        return size * self.seq_len

    def val_batches(self, size: int) -> Iterator[tuple[int, dict[str, Any]]]:
        gen = generator(self.seed, "val")
        w = self._windows(self.data.val, self.VAL_WINDOWS, gen)
        for start in range(0, len(w), size):
            chunk = w[start : start + size]
            yield len(chunk), self.inputs(chunk, gen)


# --------------------------------------------------------------------------- model + data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_task_data(cfg: TrainConfig) -> ImageData | TextData:
    if cfg.model in IMAGE_MODELS:
        return load_images(cfg.data)
    return load_text_data(cfg.data, cfg.tokenizer)


def model_overrides(cfg: TrainConfig, data: ImageData | TextData) -> dict[str, Any]:
    """Config overrides that fit the preset to the data (image size, vocabulary), then the
    user's ``cfg.overrides`` on top."""
    if isinstance(data, ImageData):
        patch = cfg.patch_size or default_patch_size(data.image_size)
        fit = {
            "encoder": {
                "image_size": data.image_size,
                "in_chans": data.in_chans,
                "patch_size": patch,
            }
        }
    else:
        v = data.tokenizer.vocab_size
        cls = MODEL_REGISTRY[MODELS[cfg.model]].config_class
        preset = cls.from_name(cfg.preset)
        if cfg.model == "gpt":
            fit = {"vocab_size": v}
            if cfg.seq_len and cfg.seq_len > preset.block_size:
                fit["block_size"] = cfg.seq_len
        else:
            fit = dict(
                vocab_size=v + 4,
                pad_token_id=v,
                cls_token_id=v + 1,
                sep_token_id=v + 2,
                mask_token_id=v + 3,
            )
            if cfg.seq_len and cfg.seq_len > preset.max_position:
                fit["max_position"] = cfg.seq_len
    return _merge(fit, cfg.overrides)


def build_model(cfg: TrainConfig, data: ImageData | TextData) -> ReconModel:
    """A freshly initialised model (weights seeded by cfg.seed) fitted to the data."""
    cls = MODEL_REGISTRY[MODELS[cfg.model]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init"))
        return cls.from_name(cfg.preset, backend=cfg.backend, **model_overrides(cfg, data))


def make_task(
    cfg: TrainConfig, data: ImageData | TextData, model: ReconModel
) -> ImageTask | TextTask:
    if isinstance(data, ImageData):
        return ImageTask(cfg.model, data, model, cfg.seed)
    limit = model.config.block_size if cfg.model == "gpt" else model.config.max_position
    seq_len = cfg.seq_len or limit
    if seq_len > limit:
        raise ValueError(f"seq_len: expected at most the model's {limit} positions, got {seq_len}")
    return TextTask(cfg.model, data, model, seq_len, cfg.seed)


def data_fingerprint(data: ImageData | TextData) -> str:
    h = hashlib.sha256()
    if isinstance(data, ImageData):
        for t in (data.x_train, data.y_train, data.x_test, data.y_test):
            h.update(t.contiguous().numpy().tobytes())
    else:
        h.update(data.train.numpy().tobytes())
        h.update(data.val.numpy().tobytes())
        h.update(json.dumps(data.tokenizer.to_dict()).encode())
    return h.hexdigest()[:16]
