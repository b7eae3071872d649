"""tests/sticky_cuda.py: one sticky CUDA fault costs one test, not the rest of its process."""

from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytest_plugins = ["pytester"]

FAKE = """
import pytest

@pytest.mark.parametrize("i", range(6))
def test_cuda(i):
    if i == 1:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_cpu_only():
    pass
"""


def _run(pytester, *args):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {HERE!r})\nfrom sticky_cuda import *\n")
    pytester.makepyfile(test_fake=FAKE)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_plain_run_skips_the_gpu_tests_after_a_sticky_fault(pytester):
    res = _run(pytester, "-rs")
    res.assert_outcomes(passed=2, failed=1, skipped=4)  # test_cuda[0], test_cpu_only pass
    res.stdout.fnmatch_lines(
        ["*the CUDA context was lost in test_fake.py::test_cuda?1? (sticky fault)*"]
    )


def test_xdist_worker_restarts_after_a_sticky_fault(pytester):
    pytest.importorskip("xdist")
    res = _run(pytester, "-n", "1", "--max-worker-restart", "4")
    out = res.stdout.str() + res.stderr.str()
    assert "replacing crashed worker" in out, out[-2000:]
    # the faulting test fails (its traceback, then the crash); every other test runs and passes
    res.assert_outcomes(passed=6, failed=2)
    assert "an illegal memory access" in out
