"""Settings of the two kinds of run, each one dataclass validated on construction:

* ``TrainConfig``: one pretraining run (model and preset, optimiser and schedule, data, how
  often to log, evaluate and checkpoint); saved in every checkpoint (``trainer_state.json``)
  so a resumed run can be checked against it.
* ``CompareConfig``: the pretraining-objective comparison of ``recon compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .claims import METHODS
from .evaluate import FinetuneConfig

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
class CompareConfig:
    out: str = os.path.join("runs", "compare")  # output directory
    data: str | None = None  # image data (see python_models.data); None = digits
    preset: str = "tiny"  # model size of every objective
    budgets: list[int] = field(default_factory=lambda: [400, 1000, 2000])  # pretraining steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # pretraining seeds
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # k labelled examples per class
    draws: int = 5  # random k-shot sets per (seed, k)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 128  # pretraining batch
    lr: float | None = None  # pretraining peak learning rate; None = PRESET_LR[preset]
    patch_size: int | None = None  # None = default_patch_size(image size)
    lora_rank: int = 8  # fine-tune LoRA rank
    ft_steps: int = 100  # fine-tune steps
    ft_lr: float = 1e-2  # fine-tune learning rate
    alpha: float = 0.05  # significance level (after Holm correction)
    backend: str | None = None  # recon_kernels backend; None = auto (kernels on GPU)
    device: str = "auto"
    quick: bool = False  # low-powered smoke run: labelled as such in the verdicts

    QUICK = dict(budgets=[100, 250, 500], seeds=[0], draws=3)
    # tuned on digits for tiny (3e-3 beat 1e-3 on every objective's probe at 500 steps)
    PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "base": 3e-4}

    def __post_init__(self) -> None:
        for name in ("budgets", "seeds", "shots", "methods"):
            if not getattr(self, name):
                raise ValueError(f"{name}: expected at least one value, got none")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: expected a subset of {METHODS}, got {bad}")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets: expected positive step counts, got {self.budgets}")
        if self.draws < 1:
            raise ValueError(f"draws: expected a positive integer, got {self.draws}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a value in (0, 1), got {self.alpha}")
        if self.lr is None:
            self.lr = self.PRESET_LR[self.preset]
        self.budgets = sorted(set(self.budgets))
        self.seeds = sorted(set(self.seeds))
        self.shots = sorted(set(self.shots))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareConfig:
        given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None
        }
        if args.quick:
            given = {**cls.QUICK, **given}
        return cls(**given)

    @property
    def finetune(self) -> FinetuneConfig:
        return FinetuneConfig(
            rank=self.lora_rank, alpha=2.0 * self.lora_rank, steps=self.ft_steps, lr=self.ft_lr
        )

    @property
    def seed_level(self) -> bool:
        """Test units are (seed, k) means over draws when there are >= 3 seeds."""
        return len(self.seeds) >= 3
