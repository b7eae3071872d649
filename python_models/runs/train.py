"""Pretraining loop for every model here: AdamW with linear warmup + cosine decay, gradient
clipping, bf16 autocast on GPU, a progress bar, metrics as JSONL, a loss-curve PNG,
safetensors checkpoints written atomically, exact resume, DistributedDataParallel.

    from python_models.runs.train import TrainConfig, train
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

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import ImageData, TextData, load_tokenizer
from ..models.common import ReconModel
from .checkpoint import (
    OPTIMIZER_NAME,
    TOKENIZER_NAME,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint_model,
    load_optimizer,
    read_trainer_state,
    save_checkpoint,
)
from .config import TEXT_MODELS, TrainConfig
from .distributed import DistInfo, init_distributed, pick_device, shutdown_distributed
from .metrics import plot_loss, read_metrics, truncate_metrics
from .seeding import derive_seed
from .tasks import (
    ImageTask,
    TextTask,
    build_model,
    data_fingerprint,
    load_task_data,
    make_task,
    slice_batch,
    to_device,
)

logger = logging.getLogger(__name__)


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


@dataclass
class Run:
    """An opened run: everything the steps need, set up by ``open_run``."""

    cfg: TrainConfig  # the effective config (the saved one with resumable fields updated)
    out: str  # run directory
    start_step: int  # steps already done (from the resumed checkpoint)
    end: int  # this invocation stops after step ``end``
    device: torch.device
    dinfo: DistInfo
    bf16: bool  # bf16 autocast
    data: ImageData | TextData
    model: ReconModel  # unwrapped
    ddp: nn.Module  # model, or its DistributedDataParallel wrapper
    task: ImageTask | TextTask
    opt: torch.optim.Optimizer
    tokenizer: Any  # text runs: saved with every checkpoint
    state: dict[str, Any]  # trainer state written into checkpoints
    rows: slice  # this process's rows of the global batch
    ckpt_dir: str = ""  # the newest checkpoint written or resumed from
    t0: float = 0.0  # perf_counter() when the steps began

    @property
    def metrics(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row (rank 0 only)."""
        if self.dinfo.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")


def open_run(
    cfg: TrainConfig,
    out: str,
    resume: bool | str = False,
    data: ImageData | TextData | None = None,
) -> Run:
    """Check ``resume`` against ``out``, pick the device, join the process group, load the
    data, build or restore model and optimizer, and prepare the run directory."""
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
        load_optimizer(opt, os.path.join(ckpt, OPTIMIZER_NAME))

    ddp = model
    if dinfo.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    state = {
        "train_config": cfg.to_dict(),
        "data_fingerprint": fingerprint,
        "data": data.describe(),
        "world_size": dinfo.world,
        "tokens_seen": state0.get("tokens_seen", 0),
    }
    run = Run(
        cfg=cfg,
        out=out,
        start_step=start_step,
        end=end,
        device=device,
        dinfo=dinfo,
        bf16=use_bf16,
        data=data,
        model=model,
        ddp=ddp,
        task=task,
        opt=opt,
        tokenizer=tokenizer,
        state=state,
        rows=slice(dinfo.rank * local_bs, (dinfo.rank + 1) * local_bs),
        ckpt_dir=ckpt or "",
    )
    if dinfo.is_main:
        os.makedirs(out, exist_ok=True)
        for d in os.listdir(out):  # leftovers of a crashed checkpoint write
            if d.startswith("step_") and ".tmp-" in d:
                shutil.rmtree(os.path.join(out, d), ignore_errors=True)
        if ckpt is None:
            atomic_write_text(run.metrics, "")
        else:
            truncate_metrics(run.metrics, start_step)
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
    return run


def train_step(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step (0-based ``step``): schedule, this process's slice of the global
    batch, forward under autocast, backward, clipping, update. Returns (loss, grad norm, lr)
    with the tensors left on the device (no sync)."""
    cfg = run.cfg
    lr = lr_at(step, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    batch = to_device(slice_batch(run.task.batch(step, cfg.batch_size), run.rows), run.device)
    torch.manual_seed(derive_seed(cfg.seed, "dropout", step, run.dinfo.rank))
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        loss = run.ddp(**batch)[0]
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = run.model.parameters()
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in params if p.grad is not None])
        )
    run.opt.step()
    return loss.detach(), norm.detach(), lr


class LogWindow:
    """Loss and gradient norm summed on the device over the steps since the last log line,
    and the training time of those steps (evaluations and checkpoints excluded)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.norm = torch.zeros((), device=device)
        self.n = 0
        self.t0 = time.perf_counter()
        self.step_time = 0.0  # seconds of training steps over every window of the run

    def add(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.loss += loss.float()
        self.norm += norm.float()
        self.n += 1

    def flush(self, run: Run, done: int, lr: float, tokens_per_step: int) -> dict[str, Any]:
        """The metrics row of the window ending at step ``done`` (all ranks take part under
        DDP), written to metrics.jsonl; the window restarts."""
        stats = torch.stack([self.loss, self.norm]) / self.n
        extra = {}
        if run.dinfo.world > 1:
            per_rank = [torch.zeros_like(stats) for _ in range(run.dinfo.world)]
            dist.all_gather(per_rank, stats)
            extra["rank_loss"] = [r[0].item() for r in per_rank]  # each rank's own slice
            stats = torch.stack(per_rank).mean(0)
        mean_loss, mean_norm = stats.tolist()
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"loss: expected a finite value, got {mean_loss} at step {done}; "
                f"try a lower --lr (now {run.cfg.lr})"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        self.step_time += dt
        row = {
            "step": done,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": mean_norm,
            "tokens_per_s": tokens_per_step * self.n / max(dt, 1e-9),
            "elapsed_s": time.perf_counter() - run.t0,
            **extra,
        }
        run.log(row)
        self.loss.zero_()
        self.norm.zero_()
        self.n = 0
        self.restart()
        return row

    def restart(self) -> None:
        self.t0 = time.perf_counter()


def _evaluate_and_save(run: Run, done: int) -> dict[str, float] | None:
    """Validation when due (rank 0) and the checkpoint + loss plot when due; returns the
    validation metrics if it ran."""
    cfg, val = run.cfg, None
    if run.dinfo.is_main and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
        val = evaluate_loss(
            run.model, run.task, cfg.batch_size, run.device, run.bf16, cfg.model in TEXT_MODELS
        )
        run.log({"step": done, **val})
        run.model.train()
    if (cfg.save_every and done % cfg.save_every == 0) or done == run.end:
        if run.dinfo.is_main:
            run.state["elapsed_s"] = time.perf_counter() - run.t0
            run.ckpt_dir = save_checkpoint(
                run.out, done, run.model, run.opt, run.state, run.tokenizer, cfg.keep
            )
            plot_loss(run.metrics, os.path.join(run.out, "loss.png"), f"{cfg.model} ({cfg.preset})")
        if run.dinfo.world > 1:
            dist.barrier()
    return val


def _reopened_numbers(run: Run) -> tuple[float, dict[str, float], float]:
    """(last loss, last validation, median tokens/s) of a finished run that was reopened."""
    last_loss, val, rates = float("nan"), {}, []
    for row in read_metrics(run.metrics):
        if "loss" in row:
            last_loss = row["loss"]
            rates.append(row["tokens_per_s"])
        elif "val_loss" in row:
            val = {k: v for k, v in row.items() if k != "step"}
    return last_loss, val, float(np.median(rates)) if rates else 0.0


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
    run = open_run(cfg, out, resume, data)
    cfg = run.cfg
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=run.start_step,
        desc=f"pretrain {cfg.model}",
        disable=not (progress and run.dinfo.is_main),
        dynamic_ncols=True,
        leave=False,
    )
    tokens_per_step = run.task.tokens(cfg.batch_size)
    run.t0 = time.perf_counter()
    window = LogWindow(run.device)
    last_loss, val = float("nan"), {}

    run.model.train()
    for step in range(run.start_step, run.end):
        loss, norm, lr = train_step(run, step)
        window.add(loss, norm)
        done = step + 1
        run.state["tokens_seen"] += tokens_per_step
        bar.update(1)
        if done % cfg.log_every == 0 or done == run.end:
            row = window.flush(run, done, lr, tokens_per_step)
            last_loss = row["loss"]
            bar.set_postfix(
                loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}"
            )
        val = _evaluate_and_save(run, done) or val
        if window.n == 0:  # the window restarts after the log line and any evaluation/checkpoint
            window.restart()
    bar.close()
    elapsed = time.perf_counter() - run.t0
    n_run = max(0, run.end - run.start_step)
    step_time = window.step_time
    tokens_per_s = tokens_per_step * n_run / step_time if step_time > 0 else 0.0
    if n_run == 0 and os.path.isfile(run.metrics):  # a finished run, reopened
        last_loss, val, tokens_per_s = _reopened_numbers(run)
    result = TrainResult(
        model=run.model,
        out=out,
        checkpoint=run.ckpt_dir or (latest_checkpoint(out) or ""),
        step=max(run.end, run.start_step),
        loss=last_loss,
        val=val,
        tokens_per_s=tokens_per_s,
        elapsed_s=elapsed,
    )
    shutdown_distributed(run.dinfo)
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
            loss = model(**to_device(kw, device))[0]
        total += loss.float().item() * size
        n += size
    mean = total / max(n, 1)
    out = {"val_loss": mean}
    if perplexity:
        out["val_ppl"] = math.exp(min(mean, 50.0))
    return out
