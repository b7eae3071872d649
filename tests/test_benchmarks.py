"""benchmarks/: the deadline-driven device script and the benches' CPU smoke mode.

No GPU needed. The device script's deadline, ordering, skipped-for-time records and
``--part 2`` are tested with stub steps (RECON_DEVICE_STUB: each step a short sleep), so
the timing asserts are deterministic; ``--dry-run`` then runs the real step commands in
their CPU smoke form (the benches' ``--smoke``) under a tiny deadline.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
ORDER = [
    "build", "gate", "check", "bench_attn", "bench_mlp", "bench_lora", "launch", "tests",
    "bench_train", "pad0", "sanitize", "tests_e2e", "bench_hf", "static",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="device_check.sh needs bash and coreutils' timeout",
)


def _run(tmp_path, *args, **env):
    e = {
        **os.environ,
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "RECON_DEVICE_WORK": str(tmp_path / "work"),
        "RECON_DEVICE_STATE": str(tmp_path / "state.tsv"),
        **env,
    }
    t0 = time.monotonic()
    p = subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=300
    )
    return p, time.monotonic() - t0


def _steps(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_lists_the_steps_in_priority_order():
    p = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    names = [ln.split()[0] for ln in p.stdout.splitlines()[1:]]
    assert names == ORDER
    caps = {ln.split()[0]: int(ln.split()[2].rstrip("s")) for ln in p.stdout.splitlines()[1:]}
    # one call at the 540 s default fits the build, the sm_90a gate, check and the attention
    # and MLP benches at their caps
    assert ORDER[:6] == ["build", "gate", "check", "bench_attn", "bench_mlp", "bench_lora"]
    assert sum(caps[n] for n in ORDER[:5]) <= 540 - 20


def test_bad_arguments_name_what_was_expected(tmp_path):
    p, _ = _run(tmp_path, "--part", "3", str(tmp_path / "out"))
    assert p.returncode == 2 and "--part: expected 1 or 2, got '3'" in p.stderr
    p, _ = _run(tmp_path, str(tmp_path / "out"), RECON_DEVICE_DEADLINE="soon")
    assert p.returncode == 2 and "expected whole seconds, got 'soon'" in p.stderr
    p, _ = _run(tmp_path, str(tmp_path / "out"), RECON_DEVICE_STEPS="bench_everything")
    assert p.returncode == 2 and "unknown step 'bench_everything'" in p.stderr


def test_deadline_order_timeouts_and_skipped_for_time(tmp_path):
    """Stub steps sleep 1 s, except 'tests' (30 s under a 2 s cap: cut at its cap) and
    'sanitize' (60 s under its 120 s cap: granted only what is left before the reserve, and
    cut there). The call still ends within its 24 s deadline, every step is recorded in
    priority order, and the three after 'sanitize' are skipped-for-time."""
    out = tmp_path / "out"
    stub = "case $STEP in tests) sleep 30 ;; sanitize) sleep 60 ;; *) sleep 1 ;; esac"
    deadline, reserve = 24, 4
    p, wall = _run(
        tmp_path,
        str(out),
        RECON_DEVICE_STUB=stub,
        RECON_DEVICE_DEADLINE=str(deadline),
        RECON_DEVICE_RESERVE=str(reserve),
        RECON_DEVICE_MIN_STEP="2",
        RECON_DEVICE_CAPS="tests=2",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert wall <= deadline + 1, f"the call took {wall:.1f} s, over its {deadline} s deadline"
    steps = _steps(out / "steps.csv")
    assert [s["step"] for s in steps] == ORDER
    status = {s["step"]: s["status"] for s in steps}
    for n in ORDER[:7] + ["bench_train"]:
        assert status[n] == "ok", steps
    assert status["tests"] == "TIMEOUT(2s)"
    san = next(s for s in steps if s["step"] == "sanitize")
    granted = int(san["granted_s"])
    assert status["sanitize"] == f"TIMEOUT({granted}s)" and 2 <= granted < 120, san
    # granted = what was left minus the reserve: it ends where the reserve begins
    assert int(san["used_s"]) <= granted + 1
    for n in ("tests_e2e", "bench_hf", "static"):
        assert status[n].startswith("skipped-for-time(left "), status
    # the files the device tool brings back (it returns at most 8)
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    assert {"steps.csv", "results.md", "summary.txt", "logs.tar.gz", "env.txt"} <= set(files)
    # the summary comes last and names what did not run
    last = p.stdout.strip().splitlines()[-2:]
    assert last[0] == "-- NOT RUN (skipped for time): tests_e2e, bench_hf, static", last
    assert "--part 2" in last[1]


def test_part2_runs_only_what_part1_skipped(tmp_path):
    ran = tmp_path / "ran.txt"
    stub = f'echo "$STEP" >> {ran}; sleep 1'
    env = dict(RECON_DEVICE_STUB=stub, RECON_DEVICE_RESERVE="3", RECON_DEVICE_MIN_STEP="2")
    p1, _ = _run(tmp_path, str(tmp_path / "out"), RECON_DEVICE_DEADLINE="10", **env)
    assert p1.returncode == 0, p1.stdout + p1.stderr
    part1 = {s["step"]: s["status"] for s in _steps(tmp_path / "out" / "steps.csv")}
    done = [n for n in ORDER if not part1[n].startswith("skipped-for-time")]  # ok (or cut)
    rest = [n for n in ORDER if part1[n].startswith("skipped-for-time")]
    assert done and rest and done + rest == ORDER, part1
    assert ran.read_text().split() == done
    ran.unlink()
    p2, _ = _run(tmp_path, "--part", "2", str(tmp_path / "out"), RECON_DEVICE_DEADLINE="60", **env)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert ran.read_text().split() == rest  # in the same order, nothing twice
    part2 = {s["step"]: s["status"] for s in _steps(tmp_path / "out" / "steps_part2.csv")}
    for n in done:
        assert part2[n] == "part 1: " + part1[n]
    for n in rest:
        assert part2[n] == "ok"
    assert "every selected step was started" in p2.stdout


def test_gate_verdict_reaches_every_later_step_and_part2(tmp_path):
    """What the gate step writes to the gate file (sm90_gate.py: the exports that turn a
    hung or failed sm_90a kernel off) is in the environment of every later step, in part 2
    too; a new part 1 starts without it."""
    ran = tmp_path / "ran.txt"
    gate = tmp_path / "gate.env"
    stub = (
        'case $STEP in gate) echo "export RECON_CUDA_ATTN_BWD=sm80" > "$GATE_ENV" ;; '
        f'*) echo "$STEP ${{RECON_CUDA_ATTN_BWD:-auto}}" >> {ran} ;; esac'
    )
    env = dict(RECON_DEVICE_STUB=stub, RECON_DEVICE_GATE=str(gate), RECON_DEVICE_MIN_STEP="1")
    p, _ = _run(tmp_path, str(tmp_path / "out"), RECON_DEVICE_STEPS="build,gate,check,tests", **env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ran.read_text().split("\n")[:3] == ["build auto", "check sm80", "tests sm80"]
    ran.unlink()
    p, _ = _run(
        tmp_path, "--part", "2", str(tmp_path / "out"), RECON_DEVICE_STEPS="bench_attn", **env
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert ran.read_text().split() == ["bench_attn", "sm80"]
    ran.unlink()
    p, _ = _run(tmp_path, str(tmp_path / "out"), RECON_DEVICE_STEPS="check", **env)
    assert p.returncode == 0 and not gate.exists()
    assert ran.read_text().split() == ["check", "auto"]


GATE = os.path.join(ROOT, "benchmarks", "sm90_gate.py")


def _gate(tmp_path, stub: str | None):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("RECON_GATE_STUB", None)
    if stub is not None:
        env["RECON_GATE_STUB"] = stub
    f = tmp_path / "gate.env"
    p = subprocess.run(
        [sys.executable, GATE, "--env-file", str(f), "--probe-timeout", "4"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, (f.read_text() if f.exists() else None)


def test_gate_turns_off_the_kernel_of_a_hung_or_failed_probe(tmp_path):
    """Each probe in its own process under a hard timeout (stubbed: the probes themselves
    need a Hopper GPU): a hang and a failure both turn their kernel off, a pass does not."""
    out, env = _gate(tmp_path, "fwd=ok,bwd=hang,det=fail")
    assert "gate: fwd  ok" in out and "gate: bwd  HANG (no result in 4 s)" in out, out
    assert "gate: det  FAILED (rc=1): det: stub failure" in out, out
    assert env == "export RECON_CUDA_ATTN_BWD=sm80\n"
    out, env = _gate(tmp_path, "fwd=fail")
    assert env == "export RECON_CUDA_ATTN_FWD=sm80\n", out
    out, env = _gate(tmp_path, "fwd=ok")
    assert env is None and "every sm_90a attention probe passed" in out, out
    out, env = _gate(tmp_path, "pp=fail")  # the pingpong schedule alone: its bench row off
    assert env == "export RECON_GATE_PINGPONG=off\n", out
    out, env = _gate(tmp_path, "tws=hang")  # the Triton warp-specialised forward: its row off
    assert env == "export RECON_GATE_TRITON_WS=off\n", out


def test_gate_tws_probe_runs_the_warp_specialised_triton_forward(monkeypatch):
    """The gate's tws probe (a failure turns recon-triton-ws off for the run) takes the
    warp-specialised launch, passes on the right kernel and fails on a wrong result; here in
    the Triton interpreter with the GPU's tiles, on a small shape of the same kind (dense,
    D = 128, whole 128-key blocks, a partial query block)."""
    from recon_kernels.triton import attention as A

    if not A.INTERPRET:
        pytest.skip("interpreter test (TRITON_INTERPRET=1)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import sm90_gate as gate

    monkeypatch.delenv("RECON_GATE_STUB", raising=False)
    monkeypatch.setenv("RECON_ATTN_FWD_WS", "0")  # (the probe sets 1; restored after)
    monkeypatch.setenv("RECON_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(gate, "WS_SHAPES", ((1, 1, 40, 128, 128, False, False),))
    kern = A._attn_fwd_kernel
    monkeypatch.setattr(kern, "configs", A._configs("fwd", interpret=False))
    monkeypatch.setattr(kern, "cache", {})
    seen = []
    real = kern.run
    monkeypatch.setattr(kern, "run", lambda *a, **kw: seen.append(kw["WS"]) or real(*a, **kw))
    assert gate.probe("tws", device="cpu") == 0
    assert seen == [True], seen
    right = A.attention_fwd
    monkeypatch.setattr(
        A, "attention_fwd", lambda *a, **kw: (lambda o, lse: (o * 1.05, lse))(*right(*a, **kw))
    )
    assert gate.probe("tws", device="cpu") == 1


def test_gate_without_a_hopper_gpu_turns_nothing_off(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the gate runs its real probes (device_check.sh)")
    out, env = _gate(tmp_path, None)
    assert env is None and "gate: not applicable (no CUDA GPU)" in out, out


def test_dry_run_runs_the_smoke_benches_within_a_tiny_deadline(tmp_path):
    """The real step commands in CPU smoke form: the benches write their csv/markdown in the
    common schema, the call ends within its deadline, and what did not fit is recorded."""
    out = tmp_path / "out"
    # alone the steps take ~45 s; CI runs another pytest worker beside this one, which
    # can double that (a CI run with a deadline of 100 left bench_mlp 31 s and timed it out)
    deadline = 160
    p, wall = _run(
        tmp_path,
        "--dry-run",
        str(out),
        RECON_DEVICE_DEADLINE=str(deadline),
        RECON_DEVICE_RESERVE="10",
        RECON_DEVICE_STEPS="build,bench_attn,bench_mlp,bench_lora,static",
        RECON_DEVICE_CAPS="static=1",  # under the minimum grant: skipped-for-time
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert wall <= deadline + 1
    status = {s["step"]: s["status"] for s in _steps(out / "steps.csv")}
    for n in ("build", "bench_attn", "bench_mlp", "bench_lora"):
        assert status[n] == "ok", (status, open(tmp_path / "work" / f"{n}.log").read()[-2000:])
    assert status["check"] == "not selected"
    assert status["static"].startswith("skipped-for-time")
    rows = list(csv.DictReader(open(out / "results.csv")))
    by_bench = {}
    for r in rows:
        by_bench.setdefault(r["bench"], []).append(r)
    assert set(by_bench) == {"bench_attention", "bench_mlp", "bench_lora"}
    for name, rs in by_bench.items():
        for r in rs:
            assert r["gpu"].startswith("CPU smoke") and r["torch"] and r["triton"]
            assert r["status"] == "ok" or r["status"].startswith(("unavailable: ", "skipped: "))
        ok = [r for r in rs if r["status"] == "ok"]
        # ours and a peer, timed, with a spread, in the same run
        assert any(r["provider"] == "recon-triton" for r in ok), name
        assert any(not r["provider"].startswith("recon-") for r in ok), name
        for r in ok:
            assert float(r["p20"]) <= float(r["ms"]) <= float(r["p80"]), r
    att = {r["provider"] for r in by_bench["bench_attention"]}
    assert att == {
        "recon-triton", "recon-cuda", "recon-cuda-sm80", "recon-cuda-pingpong", "recon-triton-ws", "recon-triton-tma-off", "recon-triton-bn64", "recon-triton-dsplit1", "recon-triton-bwd1loop", "recon-triton-det", "recon-cuda-det", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex",
        "eager", "compiled-eager",
    }  # fmt: skip
    mlp = {r["provider"] for r in by_bench["bench_mlp"]}
    assert {"eager", "torch.compile", "cublaslt-addmm-gelu", "recon-triton (persistent)"} <= mlp
    assert "recon-triton (persistent)" in {r["provider"] for r in by_bench["bench_lora"]}
    # a peer that cannot run here is a row that says why, not a crash (SDPA's CUDA-only
    # backends on the CPU; flex_attention without dropout support)
    st = {(r["case"], r["mode"], r["provider"]): r["status"] for r in by_bench["bench_attention"]}
    assert st[("bert-pad25", "fwd", "sdpa-efficient")].startswith("unavailable: RuntimeError")
    assert st[("gpt-drop10", "fwd", "flex")] == "unavailable: flex_attention has no dropout"
    assert st[("bert-pad25", "fwd", "sdpa-flash")] == "ok"
    # the D = 256 backward A/B: timed fwd+bwd at head dim 256, skipped elsewhere and in fwd
    assert st[("enc-N40-D256", "fwd+bwd", "recon-triton-dsplit1")] == "ok"
    assert st[("enc-N40-D256", "fwd", "recon-triton-dsplit1")].startswith("skipped: a backward")
    assert st[("bert-pad25", "fwd+bwd", "recon-triton-dsplit1")].startswith("skipped:")
    assert st[("enc-N128-D128", "fwd+bwd", "recon-triton-bwd1loop")] == "ok"
    assert st[("enc-N128-D128", "fwd", "recon-triton-bwd1loop")].startswith("skipped: a backward")
    assert st[("bert-pad25", "fwd+bwd", "recon-triton-bwd1loop")].startswith("skipped:")
    md = (out / "results.md").read_text()
    assert "## steps" in md and "| bench_attn | ok |" in md and "x best peer" in md
    # the kernel profiles (the first MLP / LoRA case, attention's PROFILED_CASES) travel in
    # the logs' folder
    for name in ("bench_mlp", "bench_lora", "bench_attention"):
        prof = (tmp_path / "work" / f"{name}_profile.md").read_text()
        assert "fwd+bwd recon-triton" in prof and "| kernel | calls | us | % |" in prof


def test_report_counts_tests_under_xdist_and_plain_v(tmp_path):
    """device_report.py reads pytest -v logs in both layouts (a run cut by its timeout has
    no final line, so the per-test lines are what counts)."""
    work, out = tmp_path / "w", tmp_path / "o"
    work.mkdir()
    (work / "tests.log").write_text(
        "tests/test_attention.py::test_a[cuda-cuda] PASSED          [  1%]\n"
        "[gw0] [  2%] PASSED tests/test_attention.py::test_b[triton-cuda] \n"
        "[gw1] [  3%] FAILED tests/test_attention.py::test_c[triton-cuda] \n"
        "tests/test_mlp.py::test_d[cuda] SKIPPED (no)               [  4%]\n"
        "FAILED tests/test_attention.py::test_c[triton-cuda] - AssertionError\n"
    )
    (work / "steps.tsv").write_text(
        "step\tstatus\tcap_s\tgranted_s\tused_s\tpart\n"
        "tests\tTIMEOUT(150s)\t150\t150\t155\t1\nsanitize\tskipped-for-time(left 3s)\t120\t0\t0\t1\n"
    )
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device_report.py"),
         "--work", str(work), "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "tests: 2 passed, 1 failed, 1 skipped" in p.stdout
    assert "FAILED tests/test_attention.py::test_c[triton-cuda]" in p.stdout
    assert p.stdout.strip().splitlines()[-2].startswith("-- NOT RUN (skipped for time): sanitize")
    assert (out / "summary.txt").read_text().strip() == p.stdout.strip()


def test_a_call_killed_from_outside_still_leaves_its_results(tmp_path):
    """The device tool kills a command at its timeout_s: the OUT files are rewritten after
    every step, so what ran comes back anyway."""
    import signal

    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RECON_DEVICE_WORK": str(tmp_path / "work"),
        "RECON_DEVICE_STATE": str(tmp_path / "state.tsv"),
        "RECON_DEVICE_STUB": "sleep 1",
        "RECON_DEVICE_MIN_STEP": "2",
    }
    p = subprocess.Popen(
        ["bash", SCRIPT, str(out)], env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end and not (out / "steps.csv").exists():
            time.sleep(0.2)
        time.sleep(1.5)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    steps = _steps(out / "steps.csv")
    assert steps and steps[0]["step"] == "build" and steps[0]["status"] == "ok", steps
    assert len(steps) < len(ORDER)  # cut before the end
    assert (out / "logs.tar.gz").exists() and (out / "summary.txt").exists()


def test_bench_launch_smoke_rows_per_provider(tmp_path):
    """bench_launch.py (host cost per launch: the H200 run's short recon-triton rows looked
    host-bound): every provider gives a host and a wall row, timed (p20 <= median <= p80,
    wall >= host per batch) or saying why not; in the common csv schema."""
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_launch.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "bench_launch.csv")))
    by = {(r["provider"], r["mode"]): r for r in rows}
    for prov in ("torch add", "triton empty (1 arg)", "triton 48 args",
                 "triton autotuned 48 args", "recon gemm", "recon-triton attention fwd",
                 "recon-triton attention fwd+bwd", "recon-triton mlp fwd+bwd"):  # fmt: skip
        host, wall = by[(prov, "host")], by[(prov, "wall")]
        for r in (host, wall):
            assert r["status"] == "ok", r
            assert float(r["p20"]) <= float(r["ms"]) <= float(r["p80"]), r
            assert abs(float(r["us"]) - 1e3 * float(r["ms"])) < 1e-6 * float(r["us"]) + 1e-9
        assert float(wall["ms"]) >= float(host["ms"]) > 0
    assert by[("recon-cuda attention fwd", "host")]["status"].startswith("unavailable: ")
    assert "| tiny | host | recon gemm |" in (tmp_path / "bench_launch.md").read_text()
