"""python_models.runs (train, tasks, checkpoint, metrics): schedule, data order, exact resume, atomic checkpoints, and the
2-process torchrun/gloo run against the 1-process run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_models_common import tiny_model_cpu

from python_models.data import load_images
from python_models.runs import checkpoint as CK
from python_models.runs import metrics as M
from python_models.runs import tasks as K
from python_models.runs import train as T
from python_models.runs.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    with tiny_model_cpu():
        yield


def _cfg(model="mae", **kw) -> TrainConfig:
    base = dict(model=model, steps=6, batch_size=16, log_every=1)
    return TrainConfig(**{**base, **kw})


def _weights(ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(ckpt, "model.safetensors"))


def _losses(run: str) -> list[tuple[int, float, float]]:
    return [
        (r["step"], r["loss"], r["grad_norm"])
        for r in M.read_metrics(os.path.join(run, "metrics.jsonl"))
        if "loss" in r
    ]


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = _cfg(steps=100, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-4)
    assert TrainConfig(model="mae", steps=200).warmup_steps == 10


def test_epoch_sampler_covers_each_epoch_once_and_crosses_epochs():
    s = K.EpochSampler(10, seed=3)
    stream = torch.cat([s.indices(i, 4) for i in range(5)])  # 20 = two epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new permutation per epoch
    assert torch.equal(K.EpochSampler(10, seed=3).indices(3, 4), s.indices(3, 4))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model: expected one of"):
        TrainConfig(model="vae")
    with pytest.raises(ValueError, match="stop_at"):
        TrainConfig(model="mae", steps=5, stop_at=9)
    with pytest.raises(ValueError, match="bf16: expected a CUDA device"):
        T.train(_cfg(bf16=True, device="cpu"), "/nonexistent/never-created")


@pytest.mark.parametrize("model", ["mae", "simclr", "gpt", "bert"])
def test_resume_equals_uninterrupted(tmp_path, model):
    """Stop after 3 of 6 steps, resume from the checkpoint on disk: every weight, the
    optimizer state and the logged losses equal the uninterrupted run's, bit for bit."""
    kw = dict(seq_len=16) if model in ("gpt", "bert") else {}
    full = T.train(_cfg(model, **kw), str(tmp_path / "a"), progress=False)
    T.train(_cfg(model, stop_at=3, **kw), str(tmp_path / "b"), progress=False)
    assert os.path.basename(CK.latest_checkpoint(str(tmp_path / "b"))) == "step_0000003"
    resumed = T.train(_cfg(model, **kw), str(tmp_path / "b"), resume=True, progress=False)
    assert resumed.step == full.step == 6
    wa, wb = _weights(full.checkpoint), _weights(resumed.checkpoint)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = load_file(os.path.join(full.checkpoint, CK.OPTIMIZER_NAME))
    ob = load_file(os.path.join(resumed.checkpoint, CK.OPTIMIZER_NAME))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert _losses(str(tmp_path / "a")) == _losses(str(tmp_path / "b"))
    assert full.val == resumed.val
    # and the checkpoint differs from the initial weights (training happened)
    init = K.build_model(_cfg(model, **kw), K.load_task_data(_cfg(model, **kw))).state_dict()
    assert any(not torch.equal(init[k], wa[k]) for k in wa if k in init)


def test_run_directory_contents_and_text_metrics(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cfg = _cfg("gpt", data=str(txt), tokenizer="char", seq_len=16, save_every=2, keep=2)
    res = T.train(cfg, str(tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "latest",
        "loss.png",
        "metrics.jsonl",
        "step_0000004",
        "step_0000006",
    ]
    assert (run / "latest").read_text().strip() == "step_0000006"
    assert sorted(os.listdir(res.checkpoint)) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
        "trainer_state.json",
    ]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = M.read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    val = [r for r in rows if "val_loss" in r]
    assert len(val) == 1 and val[0]["val_ppl"] == pytest.approx(np.exp(val[0]["val_loss"]))
    # the checkpoint is a loadable model with a 27-symbol vocabulary (char tokenizer)
    model, state = CK.load_checkpoint_model(str(run))
    assert model.config.vocab_size == len(set(txt.read_text())) and state["step"] == 6


def test_refuses_to_overwrite_or_resume_wrongly(tmp_path):
    out = str(tmp_path / "run")
    T.train(_cfg(steps=2), out, progress=False)
    before = open(os.path.join(out, "step_0000002", "model.safetensors"), "rb").read()
    with pytest.raises(FileExistsError, match="already holds a run"):
        T.train(_cfg(steps=2, seed=1), out, progress=False)
    with pytest.raises(ValueError, match=r"resume: .*batch_size \(checkpoint 16, given 32\)"):
        T.train(_cfg(steps=2, batch_size=32), out, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="resume: expected a checkpoint"):
        T.train(_cfg(steps=2), str(tmp_path / "empty"), resume=True, progress=False)
    assert open(os.path.join(out, "step_0000002", "model.safetensors"), "rb").read() == before


def test_resume_rejects_changed_data(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x=rng.random((40, 8, 8)).astype(np.float32), y=np.arange(40) % 4)
    out = str(tmp_path / "run")
    T.train(_cfg(steps=2, stop_at=1, data=str(npz)), out, progress=False)
    np.savez(npz, x=rng.random((40, 8, 8)).astype(np.float32), y=np.arange(40) % 4)
    with pytest.raises(
        ValueError, match="data: the checkpoint was trained on data with fingerprint"
    ):
        T.train(_cfg(steps=2, data=str(npz)), out, resume=True, progress=False)


def test_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """A crash while writing step 4 (after a partial file is on disk) must leave step 2 and
    `latest` untouched, and no partial step directory behind."""
    import safetensors.torch

    out = str(tmp_path / "run")
    cfg = _cfg(steps=4, save_every=2)
    data = K.load_task_data(cfg)
    model = K.build_model(cfg, data)
    opt = T.make_optimizer(model, cfg)
    good = CK.save_checkpoint(out, 2, model, opt, {"train_config": cfg.to_dict()})
    files = {n: open(os.path.join(good, n), "rb").read() for n in os.listdir(good)}
    real = safetensors.torch.save_file

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        CK.save_checkpoint(out, 4, model, opt, {"train_config": cfg.to_dict()})
    # and rewriting the same step that exists: the old one must survive the failure too
    with pytest.raises(OSError, match="disk full"):
        CK.save_checkpoint(out, 2, model, opt, {"train_config": cfg.to_dict()})
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert sorted(os.listdir(out)) == ["latest", "step_0000002"]
    assert CK.latest_checkpoint(out) == good
    assert {n: open(os.path.join(good, n), "rb").read() for n in os.listdir(good)} == files


def test_checkpoint_pruning_and_stale_latest(tmp_path):
    out = str(tmp_path / "run")
    cfg = _cfg(steps=4)
    model = K.build_model(cfg, K.load_task_data(cfg))
    opt = T.make_optimizer(model, cfg)
    for step in (1, 2, 3):
        CK.save_checkpoint(out, step, model, opt, {}, keep=2)
    assert sorted(os.listdir(out)) == ["latest", "step_0000002", "step_0000003"]
    os.remove(os.path.join(out, "latest"))  # a crash between the rename and `latest`
    assert CK.latest_checkpoint(out).endswith("step_0000003")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = str(tmp_path / "run")
    res = T.train(_cfg(steps=1), out, progress=False)
    with open(os.path.join(res.checkpoint, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="checkpoint: cannot load"):
        CK.load_checkpoint_model(out)
    with pytest.raises(FileNotFoundError, match="checkpoint: expected a checkpoint directory"):
        CK.resolve_checkpoint(str(tmp_path))


def test_ddp_global_batch_is_independent_of_world_size():
    """Rank slices of the global batch, concatenated, are the 1-process batch (MAE noise
    included): the data side of the DDP equivalence."""
    cfg = _cfg("mae")
    data = load_images()
    model = K.build_model(cfg, data)
    task = K.make_task(cfg, data, model)
    full = task.batch(5, 16)
    halves = [K.slice_batch(task.batch(5, 16), slice(r * 8, (r + 1) * 8)) for r in range(2)]
    for key in ("images", "noise"):
        assert torch.equal(torch.cat([h[key] for h in halves]), full[key])


def _pretrain_cmd(out: str) -> list[str]:
    # no qkv bias: the key bias has an analytically zero gradient, whose rounding noise
    # Adam would normalise into lr-sized, order-dependent updates
    return [
        "-m",
        "python_models",
        "pretrain",
        "--model",
        "mae",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--set",
        "encoder.qkv_bias=false",
        "--no-progress",
        "--out",
        out,
    ]


def test_torchrun_two_processes_gloo_equals_one_process(tmp_path):
    """2 processes x 4 examples under DDP/gloo == 1 process x 8 examples: same losses and
    gradient norms every step (so the gradients were averaged, not summed) and the same
    final weights up to float reduction order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    r1 = subprocess.run(
        [sys.executable, *_pretrain_cmd(one)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r1.returncode == 0, r1.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # on a timeout torchrun gets SIGTERM, which it passes on to its ranks (each in a session
    # of its own: a SIGKILL of torchrun would leave a rank waiting in a collective), and
    # what they printed goes into the failure
    p2 = subprocess.Popen(
        [*cmd, *_pretrain_cmd(two)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out2, err2 = p2.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        p2.terminate()
        try:
            out2, err2 = p2.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p2.pid, signal.SIGKILL)
            out2, err2 = p2.communicate()
        # a rank still running prints its threads' stacks on the SIGTERM (init_distributed's
        # faulthandler): those come first, before torchrun's own traceback
        stacks = (
            err2[err2.find("(most recent call first)") - 40 :][:6000]
            if "most recent call first" in err2
            else ""
        )
        pytest.fail(
            f"torchrun did not finish in 180 s; rank stacks:\n{stacks}\n"
            f"stderr:\n{err2[-3000:]}\nstdout:\n{out2[-1500:]}"
        )
    assert p2.returncode == 0, err2[-3000:]
    state = json.load(open(os.path.join(two, "step_0000003", "trainer_state.json")))
    assert state["world_size"] == 2
    l1, l2 = _losses(one), _losses(two)
    assert [s for s, _, _ in l1] == [s for s, _, _ in l2] == [1, 2, 3]
    for (_, a, ga), (_, b, gb) in zip(l1, l2):
        assert b == pytest.approx(a, rel=1e-5) and gb == pytest.approx(ga, rel=1e-5)
    # each rank computed the loss of its own half (not the whole batch)
    for r in M.read_metrics(os.path.join(two, "metrics.jsonl")):
        if "loss" in r:
            assert len(r["rank_loss"]) == 2 and r["rank_loss"][0] != r["rank_loss"][1]
            assert np.mean(r["rank_loss"]) == pytest.approx(r["loss"], rel=1e-6)
    w1, w2 = (
        _weights(os.path.join(one, "step_0000003")),
        _weights(os.path.join(two, "step_0000003")),
    )
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6, msg=k)


def test_bench_train_cpu_smoke_and_no_gpu_exit(tmp_path):
    """benchmarks/bench_train.py: without a GPU it exits 0 with a message; --device cpu runs
    the tiny presets, and the stock-PyTorch baseline computes the same loss as the model's
    own path (so the eager/torch.compile rows time the same model)."""
    import csv

    script = os.path.join(ROOT, "benchmarks", "bench_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        r = subprocess.run(
            [sys.executable, script, "--out", str(tmp_path / "gpu")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "no CUDA GPU is visible" in r.stdout, r.stderr
    out = tmp_path / "cpu"
    r = subprocess.run(
        [sys.executable, script, "--out", str(out), "--device", "cpu", "--quick", "--models", "gpt,bert"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "bench_train.csv")))
    assert [(x["model"], x["variant"], x["status"]) for x in rows] == [
        ("gpt", "recon-eager", "ok"), ("gpt", "eager", "ok"), ("bert", "recon-eager", "ok"), ("bert", "eager", "ok")
    ]  # fmt: skip
    for x in rows:
        assert float(x["tokens_per_s"]) > 0 and float(x["dloss_vs_eager"]) < 1e-5
    assert "| gpt (tiny) | eager |" in (out / "bench_train.md").read_text()


def test_bench_train_plan_runs_auto_first_on_a_gpu():
    """On a GPU the training-step table leads with recon-auto (each op family on the
    backend AUTO_TABLE names); full runs add the single backends and recon+compile."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_train

    gpu = torch.device("cuda")
    assert bench_train.plan(True, gpu, ["gpt", "bert"]) == [
        ("gpt", "recon-auto"), ("gpt", "eager"), ("gpt", "torch.compile"),
        ("bert", "recon-auto"), ("bert", "eager"),
    ]  # fmt: skip
    full = bench_train.plan(False, gpu, ["gpt"])
    assert full[:2] == [("gpt", "recon-auto"), ("gpt", "recon-triton")]
    assert ("gpt", "recon+compile") in full


def test_rank_stopped_by_sigterm_prints_its_stack(tmp_path):
    """A rank that torchrun stops with SIGTERM (a hang timed out, or another rank failed)
    prints where it waits, then terminates (init_distributed's faulthandler). The rank here
    joined a 1-process group itself, so init_distributed only registers the handler."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, time\n"
        "import torch.distributed as dist\n"
        "from python_models.runs.distributed import init_distributed\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/pg', rank=0, world_size=1)\n"
        "os.environ.update(WORLD_SIZE='2', RANK='1')\n"
        "init_distributed('cpu')\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)[1][-3000:]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == -signal.SIGTERM, err[-3000:]
    # the handler dumps the frame the signal interrupts: the sleep (line 8), or line 7 when
    # SIGTERM lands before print() has returned (CI saw that once)
    assert "most recent call first" in err, err[-3000:]
    assert re.search(rf'File "{re.escape(str(script))}", line [78] in <module>', err), err[-3000:]
