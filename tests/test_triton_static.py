"""Static checks of the Triton attention kernels for Hopper (sm_90), no GPU needed.

Compiles the configurations the autotuner may pick (after pruning) with
triton.compile(target=GPUTarget("cuda", 90, 32)) in a subprocess without the
interpreter, and checks the cubin: no register spills (stack 0) and tensor-core
instructions (HGMMA/HMMA) in the SASS. benchmarks/triton_static.py prints the full table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_static(tmp_path, filt: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "triton_static.py"),
            "--out",
            str(tmp_path),
            "--filter",
            filt,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "triton_static.json") as f:
        return json.load(f)


@pytest.mark.parametrize(
    "filt",
    [
        "bf16 D=128 N=8192 causal=1 kpm=0 mask=0 drop=0",
        "fp16 D=64 N=512 causal=0 kpm=1 mask=0 drop=0",
        "bf16 D=256 N=1024 causal=0 kpm=0 mask=1 drop=0",
        "bf16 D=128 N=8192 causal=1 kpm=0 mask=0 drop=1",  # attention dropout
    ],
)
def test_attention_kernels_compile_for_sm90_without_spills(tmp_path, filt):
    pytest.importorskip("triton")
    rows = _run_static(tmp_path, filt)
    kinds = {r["case"].split()[0] for r in rows}
    assert kinds == {"fwd", "dkdv", "dq"}, f"missing kernels for {filt}: {kinds}"
    for r in rows:
        assert r["stack"] == 0 and r["local"] == 0, f"spills: {r}"
        assert r["tensor_core"], f"no HGMMA/HMMA instruction: {r}"
        assert r["shared"] <= 227 * 1024, f"shared memory over the sm_90 limit: {r}"
