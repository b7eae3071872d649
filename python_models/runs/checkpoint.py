"""Checkpoints of a run directory, written atomically: model (config.json + model.safetensors),
optimizer state (safetensors), trainer state (JSON) and the tokenizer of text runs.

A checkpoint is written to a temporary directory, fsynced and renamed into place, then
``latest`` is replaced atomically: a crash never leaves a partial checkpoint behind, and an
existing checkpoint is never overwritten by a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import torch

from ..data import save_tokenizer
from ..models.common import ReconModel, load_pretrained

STATE_FORMAT = "recon-train-v1"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TOKENIZER_NAME = "tokenizer.json"
LATEST = "latest"


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


def load_optimizer(opt: torch.optim.Optimizer, path: str) -> None:
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
