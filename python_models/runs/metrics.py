"""The run's metrics: one JSON object per line in ``metrics.jsonl`` (training windows and
evaluations), and the loss-curve PNG drawn from it."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from .checkpoint import atomic_write_text


def truncate_metrics(path: str, step: int) -> None:
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
