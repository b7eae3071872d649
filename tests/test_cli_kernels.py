"""`python -m recon_kernels info|check|bench`: the kernel-level commands `make run` uses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recon_kernels", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=600,
    )


def test_info_lists_every_backend_with_a_reason():
    p = _run("info")
    assert p.returncode == 0, p.stderr
    for b in ("eager", "triton", "cuda"):
        assert f"  {b}" in p.stdout
    if not torch.cuda.is_available():
        assert "cuda    unavailable: " in p.stdout


def test_check_table_covers_every_op_and_passes():
    p = _run("check", "--no-timing")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [
        ln
        for ln in p.stdout.splitlines()
        if ln.rstrip().endswith(("pass", "FAIL")) or "ERROR" in ln
    ]
    ops = {ln.split()[0] for ln in rows}
    assert ops == {
        "masked_softmax_attention",
        "causal_attention",
        "attention(dropout=0.3)",
        "conv1d_mlp",
        "lora_linear",
        "merge_lora",
    }
    assert all(ln.rstrip().endswith("pass") for ln in rows), "\n".join(rows)
    backends = {ln.split()[1] for ln in rows}
    assert "eager" in backends
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        assert "triton" in backends
    assert "all checks passed" in p.stdout


def test_bench_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: bench runs the real tables (benchmarks/device_check.sh)")
    p = _run("bench", "--quick", "--out", os.path.join(ROOT, "runs", "bench-test"))
    assert p.returncode == 0 and "no CUDA GPU visible" in p.stdout
