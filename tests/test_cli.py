"""The ``recon`` CLI end to end, as a user runs it (``python -m python_models ...`` in a
subprocess): pretrain outputs, resume equality, probe/finetune reports, and bad arguments
that must fail with one line and a non-zero exit, never touching an existing checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# third-party import-time warnings (numpy's subnormal notice under flush-to-zero, say) are
# not the CLI's output: one_line_error judges what recon itself prints
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}


def recon(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "python_models", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


PRETRAIN = ("pretrain", "--model", "mae", "--batch-size", "16", "--log-every", "1", "--no-progress")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "mae")
    r = recon(*PRETRAIN, "--steps", "4", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_help_lists_every_command():
    r = recon("--help")
    assert r.returncode == 0
    for cmd in ("info", "bench", "pretrain", "probe", "finetune", "compare"):
        assert cmd in r.stdout


def test_info():
    r = recon("info")
    assert r.returncode == 0, r.stderr
    assert f"torch {torch.__version__}" in r.stdout and "eager" in r.stdout


def test_pretrain_writes_checkpoint_metrics_and_plot(mae_run):
    assert sorted(os.listdir(mae_run)) == ["latest", "loss.png", "metrics.jsonl", "step_0000004"]
    ckpt = os.path.join(mae_run, "step_0000004")
    assert {
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    } <= set(os.listdir(ckpt))
    rows = [json.loads(line) for line in open(os.path.join(mae_run, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in rows if "loss" in r)
    assert any("val_loss" in r for r in rows)
    assert open(os.path.join(mae_run, "loss.png"), "rb").read(4) == b"\x89PNG"


def test_resume_continues_exactly(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert recon(*PRETRAIN, "--steps", "4", "--out", a).returncode == 0
    r = recon(*PRETRAIN, "--steps", "4", "--stop-at", "2", "--out", b)
    assert r.returncode == 0 and "step 2" in r.stdout, r.stderr
    r = recon("pretrain", "--resume", "--out", b, "--no-progress")
    assert r.returncode == 0 and "step 4" in r.stdout, r.stderr
    wa = load_file(os.path.join(a, "step_0000004", "model.safetensors"))
    wb = load_file(os.path.join(b, "step_0000004", "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("cmd", ["probe", "finetune"])
def test_probe_and_finetune_report_accuracies(mae_run, tmp_path, cmd):
    out = str(tmp_path / f"{cmd}.json")
    extra = ("--steps", "3", "--lora-rank", "2", "--no-progress") if cmd == "finetune" else ()
    r = recon(cmd, "--checkpoint", mae_run, "--shots", "1,3", "--draws", "2", "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    res = json.load(open(out))
    assert res["protocol"] == cmd and sorted(res["accuracies"]) == ["1", "3"]
    for accs in res["accuracies"].values():
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
    assert "| 3 |" in r.stdout and "±" in r.stdout


def test_text_pretraining_reports_perplexity(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("to be or not to be, that is the question. " * 50)
    out = str(tmp_path / "gpt")
    r = recon(
        "pretrain", "--model", "bert", "--data", str(txt), "--tokenizer", "char",
        "--seq-len", "16", "--steps", "3", "--batch-size", "8", "--no-progress", "--out", out,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "val_ppl" in r.stdout
    r = recon("probe", "--checkpoint", out)
    one_line_error(r, "recon probe: error: checkpoint: expected an image model", "'bert'")


def test_bad_arguments_fail_with_one_line(mae_run, tmp_path):
    one_line_error(recon("pretrain", "--model", "vae"), "argument --model: invalid choice: 'vae'")
    one_line_error(
        recon("probe", "--checkpoint", str(tmp_path / "none")),
        "checkpoint: expected a checkpoint directory",
    )
    one_line_error(
        recon("probe", "--checkpoint", mae_run, "--shots", "1,500"),
        "shots: expected at most",
        "got 500",
    )
    one_line_error(
        recon("probe", "--checkpoint", mae_run, "--shots", "1,x"), "--shots", "positive integers"
    )
    one_line_error(
        recon("pretrain", "--resume", "--out", str(tmp_path / "none")),
        "resume: expected a checkpoint",
    )
    one_line_error(recon("pretrain", "--steps", "2"), "model: expected --model")
    one_line_error(
        recon(
            "pretrain", "--model", "mae", "--set", "encoder.dims=3", "--out", str(tmp_path / "x")
        ),
        "unknown fields ['dims']",
    )


def test_corrupt_checkpoint_and_no_overwrite(mae_run, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(mae_run, run)
    ckpt = os.path.join(run, "step_0000004")
    before = {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)}
    # a fresh run into a directory that holds one is refused, the checkpoint untouched
    one_line_error(
        recon(*PRETRAIN, "--steps", "2", "--out", run), "already holds a run", "--resume"
    )
    # resuming with a changed non-resumable setting is refused too
    one_line_error(
        recon("pretrain", "--resume", "--out", run, "--batch-size", "8"),
        "batch_size (checkpoint 16, given 8)",
    )
    assert {n: open(os.path.join(ckpt, n), "rb").read() for n in os.listdir(ckpt)} == before
    with open(os.path.join(ckpt, "model.safetensors"), "r+b") as f:
        f.truncate(64)
    one_line_error(recon("probe", "--checkpoint", run), "checkpoint: cannot load")
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{not json")
    one_line_error(recon("finetune", "--checkpoint", ckpt), "recon finetune: error")
