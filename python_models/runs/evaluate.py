"""Few-shot evaluation of image encoders: k labelled examples per class, several random draws
of the k-shot set, accuracy on the whole test split.

* ``probe_accuracies``: a linear probe (multinomial logistic regression on standardised
  features) on frozen features: the encoder's [CLS] or mean-pooled output, or raw pixels
  when ``encoder`` is None.
* ``finetune_accuracies``: LoRA adapters on every linear layer of the encoder's blocks plus
  a linear head, trained on the k-shot set (full batch, AdamW), the rest frozen.

Draw d of k shots is seeded by (seed, k, d) and nothing else, so every method sees the same
k-shot sets and probe/fine-tune results pair up draw by draw (the paired tests of
python_models.runs.compare rely on this).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import lora
from ..data import ImageData
from .seeding import derive_seed, generator

logger = logging.getLogger(__name__)

LORA_TARGETS = r"encoder\.blocks\..*(qkv|proj|fc1|fc2)"


@dataclass
class FewShotResult:
    """Accuracies of one protocol: shots k -> one accuracy per draw (draw order)."""

    protocol: str  # "probe" | "finetune"
    accuracies: dict[int, list[float]] = field(default_factory=dict)

    def summary(self, k: int) -> tuple[float, float]:
        """(mean, sample std) over the draws of k shots (std 0 for one draw)."""
        a = np.asarray(self.accuracies[k], dtype=np.float64)
        return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0

    def table(self) -> str:
        lines = [
            f"| shots | {self.protocol} accuracy (mean ± std) | draws |",
            "|---:|---:|---:|",
        ]
        for k in sorted(self.accuracies):
            m, s = self.summary(k)
            lines.append(f"| {k} | {m:.3f} ± {s:.3f} | {len(self.accuracies[k])} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "accuracies": {str(k): v for k, v in self.accuracies.items()},
            "summary": {
                str(k): dict(zip(("mean", "std"), self.summary(k))) for k in self.accuracies
            },
        }


def check_shots(shots: Sequence[int], data: ImageData) -> list[int]:
    """Validate k values against the training split: each class must have at least k examples."""
    if not shots:
        raise ValueError("shots: expected at least one positive integer, got none")
    counts = data.class_counts("train")
    fewest = int(counts.min())
    for k in shots:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"shots: expected positive integers, got {k!r}")
        if k > fewest:
            c = data.classes[int(counts.argmin())]
            raise ValueError(
                f"shots: expected at most {fewest} (the training examples of class {c!r}, the "
                f"smallest of {data.n_classes} classes), got {k}"
            )
    return sorted(set(shots))


def draw_shots(labels: torch.Tensor, k: int, n_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of k random examples of each class, (k * n_classes,) long, class-major."""
    out = []
    for c in range(n_classes):
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    return torch.cat(out)


def shot_indices(
    data: ImageData, shots: Sequence[int], draws: int, seed: int
) -> dict[tuple[int, int], torch.Tensor]:
    """(k, draw) -> training indices of that k-shot set."""
    return {
        (k, d): draw_shots(data.y_train, k, data.n_classes, generator(seed, "shots", k, d))
        for k in shots
        for d in range(draws)
    }


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """fn over images (N, C, H, W) in batches -> (N, D) float32 on the CPU."""
    outs = []
    for start in range(0, len(images), batch_size):
        with _autocast(device):
            outs.append(fn(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(outs)


def _feature_fn(encoder: nn.Module | None, pool: str | None):
    if encoder is None:
        return lambda x: x.flatten(1)  # raw pixels
    return lambda x: encoder.features(x, pool)


def linear_probe(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    f_test: torch.Tensor,
    y_test: torch.Tensor,
    c: float = 1.0,
) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression fitted on
    standardised training features (scaler fitted on the k-shot set only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train.numpy())
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(scaler.transform(f_train.numpy()), y_train.numpy())
    pred = clf.predict(scaler.transform(f_test.numpy()))
    return float((pred == y_test.numpy()).mean())


def probe_accuracies(
    encoder: nn.Module | None,
    data: ImageData,
    shots: Sequence[int],
    draws: int,
    seed: int = 0,
    *,
    pool: str | None = None,
    device: torch.device | str = "cpu",
    c: float = 1.0,
) -> FewShotResult:
    """Linear probe on frozen features of ``encoder`` (None: raw pixels) for every k and draw."""
    device = torch.device(device)
    shots = check_shots(list(shots), data)
    sets = shot_indices(data, shots, draws, seed)
    fn = _feature_fn(encoder, pool)
    if encoder is not None:
        encoder.eval()
    needed = torch.unique(torch.cat(list(sets.values())))
    f_needed = extract_features(fn, data.x_train[needed], device)
    row = {int(i): j for j, i in enumerate(needed.tolist())}
    f_test = extract_features(fn, data.x_test, device)
    res = FewShotResult("probe")
    for (k, _), idx in sets.items():
        f_tr = f_needed[[row[int(i)] for i in idx.tolist()]]
        acc = linear_probe(f_tr, data.y_train[idx], f_test, data.y_test, c)
        res.accuracies.setdefault(k, []).append(acc)
    return res


@dataclass
class FinetuneConfig:
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scale alpha (update scaled by alpha / r)
    steps: int = 100  # optimizer steps on the k-shot set
    lr: float = 1e-2  # AdamW learning rate of the adapters and the head
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 256  # k-shot sets larger than this are sampled in minibatches

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank: expected a positive integer, got {self.rank}")
        if self.steps < 1:
            raise ValueError(f"steps: expected a positive integer, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")


def finetune_one(
    encoder: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    cfg: FinetuneConfig,
    seed: int,
    *,
    pool: str | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """LoRA-fine-tune a copy of ``encoder`` plus a linear head on (x, y); test accuracy.
    ``encoder`` itself is not modified."""
    device = torch.device(device)
    gen = generator(seed, "finetune")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(encoder.cfg.dim, n_classes)
    clf = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": head}).to(device)
    lora.inject_lora(
        clf,
        LORA_TARGETS,
        r=cfg.rank,
        alpha=cfg.alpha,
        trainable=("head",),
        backend=getattr(encoder, "backend", None),
    )
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = x.to(device), y.to(device)
    clf.train()
    for _ in range(cfg.steps):
        if len(x) > cfg.batch_size:
            idx = torch.randperm(len(x), generator=gen)[: cfg.batch_size].to(device)
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        with _autocast(device):
            logits = clf["head"](clf["encoder"].features(xb, pool))
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not math.isfinite(loss.item()):
        logger.warning("finetune: non-finite loss %s; accuracy will be chance", loss.item())
    clf.eval()
    logits = extract_features(
        lambda b: clf["head"](clf["encoder"].features(b, pool)), x_test, device
    )
    return float((logits.argmax(-1) == y_test).float().mean())


def finetune_accuracies(
    encoder: nn.Module,
    data: ImageData,
    shots: Sequence[int],
    draws: int,
    seed: int = 0,
    cfg: FinetuneConfig | None = None,
    *,
    pool: str | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] | None = None,
) -> FewShotResult:
    """LoRA fine-tune for every k and draw (same k-shot sets as ``probe_accuracies``)."""
    cfg = cfg or FinetuneConfig()
    shots = check_shots(list(shots), data)
    res = FewShotResult("finetune")
    for (k, d), idx in shot_indices(data, shots, draws, seed).items():
        acc = finetune_one(
            encoder,
            data.x_train[idx],
            data.y_train[idx],
            data.x_test,
            data.y_test,
            data.n_classes,
            cfg,
            seed=derive_seed(seed, "head", k, d) % 2**31,
            pool=pool,
            device=device,
        )
        res.accuracies.setdefault(k, []).append(acc)
        if progress is not None:
            progress()
    return res
