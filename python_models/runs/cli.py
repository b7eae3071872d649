"""The ``recon`` command (also ``python -m python_models``).

    recon info                                   versions, device, backends (and why not)
    recon check                                  every op x backend vs the eager reference
    recon bench                                  the benchmark suite (benchmarks/*.py)
    recon pretrain --model mae --preset tiny     pretrain a model (torchrun for DDP)
    recon probe --checkpoint runs/mae --shots 1,5,10
    recon finetune --checkpoint runs/mae --lora-rank 8 --shots 1,5,10
    recon compare --quick                        AE vs MAE vs SimCLR vs image-GPT, few-shot

``info``/``check``/``bench`` come from ``recon_kernels.cli``; this module adds the
model-layer commands. Errors print one line and exit non-zero
(``RECON_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .args import (
    Parser,
    add_compare_args,
    add_eval_args,
    add_finetune_args,
    add_pretrain_args,
    parse_overrides,
)

# --------------------------------------------------------------------------- environment


def setup_cpu(device: str, threads: int | None, preset: str | None = None) -> None:
    """On CPU: flush denormals (exp() of very negative numbers is ~3x slower otherwise) and
    set the intra-op threads (default 1 for the tiny preset, whose matmuls are too small to
    gain from more, and which oversubscribe shared cores)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        torch.set_flush_denormal(True)
        if threads is None and preset == "tiny":
            torch.set_num_threads(1)


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if not verbose:  # per-save and per-injection lines would drown the progress output
        for name in ("python_models.models.common", "python_models.lora", "python_models.data"):
            logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- commands


def _train_config(args: argparse.Namespace):
    from .config import TrainConfig

    return TrainConfig(
        model=args.model,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        data=args.data,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        patch_size=args.patch_size,
        overrides=parse_overrides(args.set),
        save_every=args.save_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
        keep=args.keep,
        backend=args.backend,
        device=args.device,
        bf16=args.bf16,
        stop_at=args.stop_at,
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint, read_trainer_state
    from .config import TrainConfig
    from .train import train

    out = args.out
    if args.resume:
        if out is None:
            raise ValueError("out: expected the run directory to resume (--out DIR), got none")
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise FileNotFoundError(f"resume: expected a checkpoint in {out}, found none")
        saved = TrainConfig.from_dict(read_trainer_state(ckpt)["train_config"])
        # flags given on the command line override the run's (train() rejects changes to
        # anything but the resumable fields); --stop-at applies to one invocation only
        cfg = TrainConfig(**{**saved.to_dict(), **_given(args, saved), "stop_at": args.stop_at})
    else:
        if args.model is None:
            raise ValueError("model: expected --model {ae,mae,simclr,igpt,gpt,bert}, got none")
        _fill_defaults(args)
        cfg = _train_config(args)
        out = out or os.path.join("runs", "pretrain", f"{cfg.model}-{cfg.preset}")
    setup_cpu(cfg.device, args.threads, cfg.preset)
    res = train(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        val = ", ".join(f"{k} {v:.4f}" for k, v in res.val.items())
        print(
            f"pretrain {cfg.model}/{cfg.preset}: step {res.step}, loss {res.loss:.4f}"
            + (f", {val}" if val else "")
            + f", {res.tokens_per_s:,.0f} tokens/s, {res.elapsed_s:.1f}s"
        )
        print(f"checkpoint: {res.checkpoint}")
        print(
            f"metrics: {os.path.join(out, 'metrics.jsonl')}  plot: {os.path.join(out, 'loss.png')}"
        )
    return 0


# defaults of the pretrain flags: argparse defaults are None so that --resume can tell
# "given" from "not given"
PRETRAIN_DEFAULTS = dict(
    preset="tiny",
    steps=200,
    batch_size=64,
    lr=1e-3,
    min_lr_ratio=0.1,
    weight_decay=0.05,
    grad_clip=1.0,
    seed=0,
    tokenizer="byte",
    save_every=0,
    eval_every=0,
    log_every=10,
    keep=2,
    device="auto",
)


def _fill_defaults(args: argparse.Namespace) -> None:
    for k, v in PRETRAIN_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _given(args: argparse.Namespace, saved: Any) -> dict[str, Any]:
    """The pretrain flags given on a --resume command line (they must match the run's,
    except the resumable ones; train() checks)."""
    given = {}
    for k in saved.to_dict():
        if k == "overrides":
            if args.set:
                given[k] = parse_overrides(args.set)
            continue
        v = getattr(args, k, None)
        if v is not None and v != getattr(saved, k):
            given[k] = v
    return given


def _preset_of(checkpoint: str) -> str | None:
    """The preset a checkpoint was pretrained with (None when unknown), for thread defaults."""
    from .checkpoint import read_trainer_state, resolve_checkpoint

    try:
        return read_trainer_state(resolve_checkpoint(checkpoint))["train_config"]["preset"]
    except Exception:  # unknown or unreadable: the loader reports the real problem
        return None


def _image_eval_setup(args: argparse.Namespace):
    """(model, encoder, data, device) for probe/finetune of a checkpoint."""
    import torch

    from ..data import load_images
    from .checkpoint import load_checkpoint_model
    from .config import IMAGE_MODELS, MODELS
    from .distributed import pick_device

    device = pick_device(args.device)
    model, state = load_checkpoint_model(args.checkpoint, backend=args.backend, device=device)
    image_types = {MODELS[m] for m in IMAGE_MODELS}
    if model.model_type not in image_types:
        raise ValueError(
            f"checkpoint: expected an image model ({', '.join(sorted(image_types))}) for few-shot "
            f"image classification, got a {model.model_type!r} checkpoint"
        )
    data_path = args.data if args.data is not None else state.get("train_config", {}).get("data")
    data = load_images(data_path)
    e = model.config.encoder
    if (e.in_chans, e.image_size) != (data.in_chans, data.image_size):
        raise ValueError(
            f"data: the checkpoint's encoder takes {e.in_chans}x{e.image_size}x{e.image_size} "
            f"images, got {data.describe()}"
        )
    torch.manual_seed(args.seed)
    return model, data, device


def _report(res, args: argparse.Namespace, title: str) -> None:
    print(title)
    print(res.table())
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {**res.to_dict(), "checkpoint": args.checkpoint, "seed": args.seed}, f, indent=2
            )
        print(f"results: {args.out}")


def cmd_probe(args: argparse.Namespace) -> int:
    from .evaluate import check_shots, probe_accuracies

    setup_cpu(args.device, args.threads, _preset_of(args.checkpoint))
    model, data, device = _image_eval_setup(args)
    shots = check_shots(args.shots, data)
    res = probe_accuracies(
        model.encoder, data, shots, args.draws, args.seed, pool=args.pool, device=device
    )
    _report(
        res, args, f"linear probe of {args.checkpoint} on {data.describe()}, {args.draws} draws"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .evaluate import FinetuneConfig, check_shots, finetune_accuracies

    setup_cpu(args.device, args.threads, _preset_of(args.checkpoint))
    cfg = FinetuneConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha or 2.0 * args.lora_rank,
        steps=args.steps,
        lr=args.lr,
    )
    model, data, device = _image_eval_setup(args)
    shots = check_shots(args.shots, data)
    with tqdm(
        total=len(shots) * args.draws, desc="finetune", leave=False, disable=args.no_progress
    ) as bar:
        res = finetune_accuracies(
            model.encoder,
            data,
            shots,
            args.draws,
            args.seed,
            cfg,
            pool=args.pool,
            device=device,
            progress=lambda: bar.update(1),
        )
    _report(
        res,
        args,
        f"LoRA fine-tune (r={cfg.rank}, {cfg.steps} steps) of {args.checkpoint} on "
        f"{data.describe()}, {args.draws} draws",
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare
    from .config import CompareConfig

    cfg = CompareConfig.from_args(args)
    setup_cpu(cfg.device, args.threads, cfg.preset)
    report = run_compare(cfg, progress=not args.no_progress)
    print(report.summary)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="recon",
        description="Fused-kernel transformer pretraining: pretrain, few-shot evaluation, "
        "the pretraining-objective comparison, kernel checks and benchmarks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from recon_kernels.cli import add_kernel_subcommands

    add_kernel_subcommands(sub)  # info, check, bench

    p = sub.add_parser(
        "pretrain",
        help="pretrain a model (DDP under torchrun)",
        description="Pretrain with AdamW, warmup + cosine, gradient clipping, bf16 on GPU; "
        "writes metrics.jsonl, loss.png and atomic safetensors checkpoints to --out. "
        "Multi-process: torchrun --nproc_per_node N -m python_models pretrain ...",
    )
    add_pretrain_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("probe", help="few-shot linear probe on frozen features")
    add_eval_args(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("finetune", help="few-shot LoRA fine-tune of the encoder + a linear head")
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "compare",
        help="AE vs MAE vs SimCLR vs image-GPT: few-shot probe and LoRA over budgets and seeds",
        description="Pretrain every objective on the same encoder at several budgets and seeds, "
        "evaluate each with a linear probe and a LoRA fine-tune at k shots, plus raw-pixel and "
        "random-init baselines; paired tests per claim per budget, tables, plots, verdicts.",
    )
    add_compare_args(p)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        rc = func(args)
    except KeyboardInterrupt:
        print(f"recon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("RECON_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"recon {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
