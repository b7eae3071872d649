"""Pretraining loop for every model here: AdamW with linear warmup + cosine decay, gradient
clipping, bf16 autocast on GPU, a progress bar, metrics as JSONL, a loss-curve PNG,
safetensors checkpoints written atomically, exact resume, DistributedDataParallel.

    from python_models.train import TrainConfig, train
    result = train(TrainConfig(model="mae", preset="tiny", steps=500), "runs/mae")

Reproducibility: every random draw of a step (which examples, MAE masks, SimCLR views, BERT
masking, dropout) comes from a generator seeded by (seed, step), never from a running RNG,
and the data order is a fixed permutation per epoch. So a resumed run repeats the
uninterrupted one exactly, and the global batch of a step is the same for any number of
processes: under torchrun each rank takes its slice of it, DDP averages the gradients, and the
update equals the one-process update (for losses that are means over examples; SimCLR's
negatives are then per rank, as in the original code).

A run directory holds:

    metrics.jsonl      one JSON object per logged step (loss, lr, grad_norm, tokens_per_s, ...)
                       and per evaluation (val_loss, val_ppl for text)
    loss.png           the loss curve
    latest             the name of the newest complete checkpoint
    step_0000500/      config.json + model.safetensors (``load_pretrained`` reads it),
                       optimizer.safetensors, trainer_state.json, tokenizer.json (text)

A checkpoint is written to a temporary directory, fsynced and renamed into place, then
``latest`` is replaced atomically: a crash never leaves a partial checkpoint behind, and an
existing checkpoint is never overwritten by a partial one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .bert import MLMCollator
from .common import MODEL_REGISTRY, ReconModel, load_pretrained
from .contrastive import augment
from .data import (
    ImageData,
    TextData,
    default_patch_size,
    load_images,
    load_text_data,
    load_tokenizer,
    save_tokenizer,
)

logger = logging.getLogger(__name__)

# CLI name -> model_type of the registry
MODELS = {
    "ae": "autoencoder",
    "mae": "mae",
    "simclr": "simclr",
    "igpt": "image_gpt",
    "gpt": "gpt",
    "bert": "bert",
}
IMAGE_MODELS = ("ae", "mae", "simclr", "igpt")
TEXT_MODELS = ("gpt", "bert")
PRESETS = ("tiny", "small", "base")
STATE_FORMAT = "recon-train-v1"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TOKENIZER_NAME = "tokenizer.json"
LATEST = "latest"


@dataclass
class TrainConfig:
    model: str  # one of MODELS: ae | mae | simclr | igpt (images), gpt | bert (text)
    preset: str = "tiny"  # model size: tiny | small | base
    steps: int = 200  # optimizer steps of the whole run (sets the schedule)
    batch_size: int = 64  # global batch (examples per step, split over the processes)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup: int | None = None  # linear warmup steps; None = 5% of steps (at least 1)
    weight_decay: float = 0.05  # AdamW decay of matrices (not biases, norms, tokens)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0  # initial weights, data order and every random draw
    data: str | None = None  # images: None/'digits', IDX dir, .npz, folder; text: file or None
    tokenizer: str = "byte"  # text: byte | char
    seq_len: int | None = None  # text: tokens per example; None = the preset's maximum
    patch_size: int | None = None  # images: None = default_patch_size(image_size)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields (nested dicts)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    eval_every: int = 0  # validation every N steps (0: only at the end)
    log_every: int = 10  # metrics line every N steps
    keep: int = 2  # step checkpoints kept on disk (the newest)
    backend: str | None = None  # recon_kernels backend; None = process default (auto)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool | None = None  # bf16 autocast; None = on for CUDA, off on CPU
    stop_at: int | None = None  # end this invocation after this many steps (resume later)

    # fields that may differ between a run and its resumption
    RESUMABLE = (
        "steps",
        "save_every",
        "eval_every",
        "log_every",
        "keep",
        "backend",
        "device",
        "bf16",
        "stop_at",
    )

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {sorted(MODELS)}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {PRESETS}, got {self.preset!r}")
        for name in ("steps", "batch_size", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup: expected 0..steps={self.steps}, got {self.warmup}")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at: expected 1..steps={self.steps}, got {self.stop_at}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip: expected >= 0, got {self.grad_clip}")

    @property
    def warmup_steps(self) -> int:
        return max(1, round(0.05 * self.steps)) if self.warmup is None else self.warmup

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    model: ReconModel  # the trained model (unwrapped, on its device)
    out: str  # the run directory
    checkpoint: str  # the newest checkpoint directory
    step: int  # steps done
    loss: float  # mean training loss of the last logged window
    val: dict[str, float]  # last validation metrics
    tokens_per_s: (
        float  # training throughput of this invocation, steps only (tokens = patches or ids)
    )
    elapsed_s: float  # wall time of this invocation


# --------------------------------------------------------------------------- randomness


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from (seed, parts): independent streams per purpose and step."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to cfg.lr over
    warmup_steps, then cosine to cfg.lr * min_lr_ratio at the last step."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * (step + 1) / w
    span = max(1, cfg.steps - 1 - w)
    t = min(1.0, (step - w) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- data tasks


def _slice(v: Any, sl: slice) -> Any:
    """Rows ``sl`` of every tensor in a (nested) batch: a process's share of the global batch."""
    if isinstance(v, torch.Tensor):
        return v[sl]
    if isinstance(v, dict):
        return {k: _slice(x, sl) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(_slice(x, sl) for x in v)
    return v


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(_to(x, device) for x in v)
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


# --------------------------------------------------------------------------- optimizer


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not biases, LayerNorms, [CLS]/mask tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not name.endswith("_token") else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _optimizer_tensors(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {})["optimizer"])
        state: dict[int, dict[str, Any]] = {}
        for key in f.keys():
            pid, k = key.split(".", 1)
            state.setdefault(int(pid), {})[k] = f.get_tensor(key)
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    out: str,
    step: int,
    model: ReconModel,
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    tokenizer: Any = None,
    keep: int = 2,
) -> str:
    """Write checkpoint ``out/step_N`` atomically (temp dir, fsync, rename), then point
    ``out/latest`` at it and prune older step directories beyond ``keep``. Returns its path."""
    from safetensors.torch import save_file

    final = os.path.join(out, step_dir_name(step))
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tensors, meta = _optimizer_tensors(opt)
        save_file(
            tensors, os.path.join(tmp, OPTIMIZER_NAME), metadata={"optimizer": json.dumps(meta)}
        )
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            json.dump({**state, "format": STATE_FORMAT, "step": step}, f, indent=2)
        if tokenizer is not None:
            save_tokenizer(tokenizer, os.path.join(tmp, TOKENIZER_NAME))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(final):  # rewriting the same step (e.g. after a resume): swap
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(out)
    atomic_write_text(os.path.join(out, LATEST), step_dir_name(step) + "\n")
    if old:
        shutil.rmtree(old, ignore_errors=True)
    steps = sorted(d for d in os.listdir(out) if d.startswith("step_") and "." not in d)
    for d in steps[:-keep] if keep else []:
        if d != step_dir_name(step):
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint of run directory ``out`` (None if it has none)."""
    if not os.path.isdir(out):
        return None
    p = os.path.join(out, LATEST)
    if os.path.isfile(p):
        with open(p) as f:
            d = os.path.join(out, f.read().strip())
        if os.path.isfile(os.path.join(d, TRAINER_STATE)):
            return d
    # `latest` missing or stale (a crash between the rename and its update): newest complete
    done = [
        d
        for d in sorted(os.listdir(out))
        if d.startswith("step_")
        and "." not in d
        and os.path.isfile(os.path.join(out, d, TRAINER_STATE))
    ]
    return os.path.join(out, done[-1]) if done else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory (holds config.json) or a run directory (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"checkpoint: expected a checkpoint directory (config.json) or a run directory "
            f"with one, got {path}"
        )
    return ckpt


def read_trainer_state(ckpt: str) -> dict[str, Any]:
    p = os.path.join(ckpt, TRAINER_STATE)
    with open(p) as f:
        st = json.load(f)
    if st.get("format") != STATE_FORMAT:
        raise ValueError(f"{p}: expected format {STATE_FORMAT!r}, got {st.get('format')!r}")
    return st


def load_checkpoint_model(
    path: str, *, backend: str | None = None, device: str | torch.device = "cpu"
) -> tuple[ReconModel, dict[str, Any]]:
    """(model, trainer state or {}) of a checkpoint or run directory. Errors say which file
    is missing or unreadable."""
    ckpt = resolve_checkpoint(path)
    try:
        model = load_pretrained(ckpt, backend=backend, device=device)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # safetensors / json errors on a damaged file
        raise ValueError(f"checkpoint: cannot load {ckpt} ({type(e).__name__}: {e})") from None
    st = read_trainer_state(ckpt) if os.path.isfile(os.path.join(ckpt, TRAINER_STATE)) else {}
    return model, st


# --------------------------------------------------------------------------- metrics + plot


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines after ``step`` (written after the checkpoint we resume from)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
    atomic_write_text(path, "".join(keep))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, png: str, title: str = "") -> None:
    """Training (and validation) loss against step, written atomically to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for _, v in tr + va) and tr:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{png}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group (nccl on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        info.initialized_here = True
    return info


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: expected 'cpu' or 'auto' without a visible GPU, got {name!r}"
            )
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


# --------------------------------------------------------------------------- the loop


def _check_resume(saved: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """The saved config with the fields that may change on resume taken from ``cfg``."""
    diff = [
        f"{f.name} (checkpoint {getattr(saved, f.name)!r}, given {getattr(cfg, f.name)!r})"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in TrainConfig.RESUMABLE and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if diff:
        raise ValueError("resume: the run was started with different settings: " + "; ".join(diff))
    merged = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in TrainConfig.RESUMABLE})
    if merged.steps != saved.steps:
        logger.warning(
            "resume: steps changed from %d to %d; the cosine schedule is stretched from here",
            saved.steps,
            merged.steps,
        )
    return merged


def train(
    cfg: TrainConfig,
    out: str,
    *,
    resume: bool | str = False,
    progress: bool = True,
    data: ImageData | TextData | None = None,
) -> TrainResult:
    """Pretrain ``cfg.model`` into run directory ``out``.

    resume: False = a new run (``out`` must hold no checkpoint); True = continue the newest
    checkpoint of ``out`` (must exist); "auto" = continue if there is one, else start.
    data: pre-loaded data (must match cfg.data); loaded from cfg when None.
    Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 writes the files.
    """
    ckpt = latest_checkpoint(out)
    if resume is True and ckpt is None:
        raise FileNotFoundError(f"resume: expected a checkpoint in {out}, found none")
    if resume is False and ckpt is not None:
        raise FileExistsError(
            f"out: {out} already holds a run (checkpoint {os.path.basename(ckpt)}); "
            f"pass --resume to continue it or choose another --out"
        )
    start_step, state0 = 0, {}
    if ckpt is not None:
        state0 = read_trainer_state(ckpt)
        cfg = _check_resume(TrainConfig.from_dict(state0["train_config"]), cfg)
        start_step = state0["step"]
    end = min(cfg.steps, cfg.stop_at or cfg.steps)

    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL initialisation: one GPU per process
    dinfo = init_distributed(device.type)
    if cfg.batch_size % dinfo.world:
        raise ValueError(
            f"batch_size: expected a multiple of the {dinfo.world} processes, got {cfg.batch_size}"
        )
    local_bs = cfg.batch_size // dinfo.world
    use_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    if use_bf16 and device.type != "cuda":
        raise ValueError(f"bf16: expected a CUDA device for bf16 autocast, got {device}")

    if data is None:
        data = load_task_data(cfg)
    fingerprint = data_fingerprint(data)
    if ckpt is not None:
        if state0.get("data_fingerprint") != fingerprint:
            raise ValueError(
                f"data: the checkpoint was trained on data with fingerprint "
                f"{state0.get('data_fingerprint')}, got {fingerprint} ({cfg.data or 'default'})"
            )
        model, _ = load_checkpoint_model(ckpt, backend=cfg.backend, device=device)
    else:
        model = build_model(cfg, data).to(device)
    tokenizer = getattr(data, "tokenizer", None)
    if ckpt is not None and tokenizer is not None:
        tokenizer = load_tokenizer(os.path.join(ckpt, TOKENIZER_NAME))
    task = make_task(cfg, data, model)
    opt = make_optimizer(model, cfg)
    if ckpt is not None:
        _load_optimizer(opt, os.path.join(ckpt, OPTIMIZER_NAME))

    ddp = model
    if dinfo.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    metrics = os.path.join(out, "metrics.jsonl")
    png = os.path.join(out, "loss.png")
    if dinfo.is_main:
        os.makedirs(out, exist_ok=True)
        for d in os.listdir(out):  # leftovers of a crashed checkpoint write
            if d.startswith("step_") and ".tmp-" in d:
                shutil.rmtree(os.path.join(out, d), ignore_errors=True)
        if ckpt is None:
            atomic_write_text(metrics, "")
        else:
            _truncate_metrics(metrics, start_step)
        logger.info(
            "pretrain %s/%s: %s params, %s, device %s, %d process(es), steps %d..%d",
            cfg.model,
            cfg.preset,
            f"{model.num_params():,}",
            data.describe(),
            device,
            dinfo.world,
            start_step,
            end,
        )
    state = {
        "train_config": cfg.to_dict(),
        "data_fingerprint": fingerprint,
        "data": data.describe(),
        "world_size": dinfo.world,
        "tokens_seen": state0.get("tokens_seen", 0),
    }

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=f"pretrain {cfg.model}",
        disable=not (progress and dinfo.is_main),
        dynamic_ncols=True,
        leave=False,
    )
    tokens_per_step = task.tokens(cfg.batch_size)
    sl = slice(dinfo.rank * local_bs, (dinfo.rank + 1) * local_bs)
    win_loss = torch.zeros((), device=device)
    win_norm = torch.zeros((), device=device)
    win_n, win_t0 = 0, time.perf_counter()
    run_t0, last_loss, val = time.perf_counter(), float("nan"), {}
    step_time = 0.0  # seconds spent in training steps (not evaluation or checkpoints)
    ckpt_dir = ckpt or ""

    def log(row: dict[str, Any]) -> None:
        if dinfo.is_main:
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    model.train()
    for step in range(start_step, end):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = _to(_slice(task.batch(step, cfg.batch_size), sl), device)
        torch.manual_seed(derive_seed(cfg.seed, "dropout", step, dinfo.rank))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = ddp(**batch)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
            )
        opt.step()
        win_loss += loss.detach().float()
        win_norm += norm.detach().float()
        win_n += 1
        done = step + 1
        state["tokens_seen"] += tokens_per_step
        bar.update(1)

        if done % cfg.log_every == 0 or done == end:
            stats = torch.stack([win_loss, win_norm]) / win_n
            extra = {}
            if dinfo.world > 1:
                per_rank = [torch.zeros_like(stats) for _ in range(dinfo.world)]
                dist.all_gather(per_rank, stats)
                extra["rank_loss"] = [r[0].item() for r in per_rank]  # each rank's own slice
                stats = torch.stack(per_rank).mean(0)
            mean_loss, mean_norm = stats.tolist()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"loss: expected a finite value, got {mean_loss} at step {done}; "
                    f"try a lower --lr (now {cfg.lr})"
                )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - win_t0
            step_time += dt
            tps = tokens_per_step * win_n / max(dt, 1e-9)
            last_loss = mean_loss
            log(
                {
                    "step": done,
                    "loss": mean_loss,
                    "lr": lr,
                    "grad_norm": mean_norm,
                    "tokens_per_s": tps,
                    "elapsed_s": time.perf_counter() - run_t0,
                    **extra,
                }
            )
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            win_loss.zero_()
            win_norm.zero_()
            win_n, win_t0 = 0, time.perf_counter()

        final = done == cfg.steps
        if dinfo.is_main and ((cfg.eval_every and done % cfg.eval_every == 0) or final):
            val = evaluate_loss(
                model, task, cfg.batch_size, device, use_bf16, cfg.model in TEXT_MODELS
            )
            log({"step": done, **val})
            model.train()
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            if dinfo.is_main:
                state["elapsed_s"] = time.perf_counter() - run_t0
                ckpt_dir = save_checkpoint(out, done, model, opt, state, tokenizer, cfg.keep)
                plot_loss(metrics, png, f"{cfg.model} ({cfg.preset})")
            if dinfo.world > 1:
                dist.barrier()
        if win_n == 0:  # the window restarts after the log line and any evaluation/checkpoint
            win_t0 = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - run_t0
    n_run = max(0, end - start_step)
    tokens_per_s = tokens_per_step * n_run / step_time if step_time > 0 else 0.0
    if n_run == 0 and os.path.isfile(metrics):  # a finished run, reopened: its last numbers
        rates = []
        for row in read_metrics(metrics):
            if "loss" in row:
                last_loss = row["loss"]
                rates.append(row["tokens_per_s"])
            elif "val_loss" in row:
                val = {k: v for k, v in row.items() if k != "step"}
        tokens_per_s = float(np.median(rates)) if rates else 0.0
    result = TrainResult(
        model=model,
        out=out,
        checkpoint=ckpt_dir or (latest_checkpoint(out) or ""),
        step=max(end, start_step),
        loss=last_loss,
        val=val,
        tokens_per_s=tokens_per_s,
        elapsed_s=elapsed,
    )
    if dinfo.initialized_here:
        dist.barrier()
        dist.destroy_process_group()
    return result


@torch.no_grad()
def evaluate_loss(
    model: ReconModel,
    task: ImageTask | TextTask,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
    perplexity: bool = False,
) -> dict[str, float]:
    """Mean loss over the fixed validation batches (and exp of it for text)."""
    model.eval()
    total, n = 0.0, 0
    for size, kw in task.val_batches(batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**_to(kw, device))[0]
        total += loss.float().item() * size
        n += size
    mean = total / max(n, 1)
    out = {"val_loss": mean}
    if perplexity:
        out["val_ppl"] = math.exp(min(mean, 50.0))
    return out
