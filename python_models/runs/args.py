"""Command-line arguments of the ``recon`` model commands: the parser class with one-line
errors, argument types, and the flags of pretrain, probe/finetune and compare (the commands
themselves are in ``runs.cli``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .claims import METHODS
from .config import MODELS, PRESETS, CompareConfig


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text: str) -> list[int]:
    """'1,5,10' -> [1, 5, 10] (positive integers)."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return vals


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (non-negative integers)."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-negative integers, got {text!r}"
        )
    return vals


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """['encoder.dim=64', 'mask_ratio=0.6'] -> {'encoder': {'dim': 64}, 'mask_ratio': 0.6};
    values are JSON (numbers, true/false/null, lists) or plain strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"set: expected KEY=VALUE (e.g. encoder.dim=64), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"set: {key!r} conflicts with another --set")
        node[leaf] = value
    return out


# --------------------------------------------------------------------------- flags


def add_pretrain_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``recon pretrain``; their defaults are None (see PRETRAIN_DEFAULTS) so that
    --resume can tell given from not given."""
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default=None,
        help="ae, mae, simclr, igpt (images); gpt, bert (text)",
    )
    p.add_argument("--preset", choices=PRESETS, default=None, help="model size (default tiny)")
    p.add_argument(
        "--data",
        default=None,
        help="images: digits (default), MNIST IDX dir, .npz, image folder; text: a file (default: built-in corpus)",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/pretrain/MODEL-PRESET)")
    p.add_argument(
        "--resume", action="store_true", help="continue the newest checkpoint of --out exactly"
    )
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default 200)")
    p.add_argument(
        "--stop-at",
        type=positive_int,
        default=None,
        help="stop this invocation after N steps (resume later)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="global batch (default 64)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--min-lr-ratio", type=float, default=None, help="final lr / peak (default 0.1)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of steps)")
    p.add_argument(
        "--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.05)"
    )
    p.add_argument(
        "--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default 1)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    p.add_argument(
        "--tokenizer", choices=("byte", "char"), default=None, help="text tokenizer (default byte)"
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help="text tokens per example (default: the preset's)",
    )
    p.add_argument(
        "--patch-size",
        type=positive_int,
        default=None,
        help="image patch size (default: fits the images)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. encoder.dim=64 (repeatable)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="checkpoint every N steps (default: at the end only)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="validate every N steps (default: at the end only)",
    )
    p.add_argument(
        "--log-every", type=positive_int, default=None, help="metrics every N steps (default 10)"
    )
    p.add_argument("--keep", type=positive_int, default=None, help="checkpoints kept (default 2)")
    p.add_argument(
        "--backend", default=None, help="recon_kernels backend: auto | eager | triton | cuda"
    )
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda[:N]")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on GPU)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default 1 for tiny on CPU)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory or run directory (its latest)"
    )
    p.add_argument(
        "--shots", type=int_list, default=[1, 5, 10], help="k values, e.g. 1,5,10 (default)"
    )
    p.add_argument(
        "--draws", type=positive_int, default=5, help="random k-shot sets per k (default 5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the k-shot draws and heads")
    p.add_argument("--data", default=None, help="image data (default: the checkpoint's)")
    p.add_argument(
        "--pool",
        choices=("cls", "mean"),
        default=None,
        help="features: [CLS] or mean (default: the model's)",
    )
    p.add_argument("--backend", default=None, help="recon_kernels backend (default auto)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    p.add_argument("--out", default=None, help="write the accuracies as JSON here")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    add_eval_args(p)
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument(
        "--steps", type=positive_int, default=100, help="fine-tuning steps (default 100)"
    )
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    p.add_argument("--no-progress", action="store_true")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    d = CompareConfig()
    q = CompareConfig.QUICK
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a few CPU minutes: budgets {q['budgets']}, seeds {q['seeds']}, {q['draws']} draws (low-powered)",
    )
    p.add_argument("--out", default=None, help=f"output directory (default {d.out})")
    p.add_argument(
        "--data", default=None, help="images: digits (default), MNIST IDX dir, .npz, image folder"
    )
    p.add_argument(
        "--preset",
        choices=("tiny", "small", "base"),
        default=None,
        help="encoder size (default tiny)",
    )
    p.add_argument(
        "--budgets",
        type=int_list,
        default=None,
        help=f"pretraining steps (default {','.join(map(str, d.budgets))})",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help=f"pretraining seeds (default {','.join(map(str, d.seeds))})",
    )
    p.add_argument("--shots", type=int_list, default=None, help="k values (default 1,5,10)")
    p.add_argument(
        "--draws",
        type=positive_int,
        default=None,
        help=f"k-shot draws per seed and k (default {d.draws})",
    )
    p.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=None,
        help=f"subset of {','.join(METHODS)}",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"pretraining batch (default {d.batch_size})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="pretraining lr (default 3e-3 tiny, 1e-3 small, 3e-4 base)",
    )
    p.add_argument("--patch-size", type=positive_int, default=None)
    p.add_argument("--lora-rank", type=positive_int, default=None, help=f"default {d.lora_rank}")
    p.add_argument(
        "--ft-steps",
        type=positive_int,
        default=None,
        help=f"fine-tune steps (default {d.ft_steps})",
    )
    p.add_argument("--ft-lr", type=float, default=None, help=f"fine-tune lr (default {d.ft_lr})")
    p.add_argument(
        "--alpha", type=float, default=None, help=f"significance level (default {d.alpha})"
    )
    p.add_argument(
        "--backend", default=None, help="recon_kernels backend (default auto: kernels on GPU)"
    )
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda[:N]")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default 1 for tiny on CPU)"
    )
    p.add_argument("--no-progress", action="store_true")
