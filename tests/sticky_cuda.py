"""pytest hooks for sticky CUDA faults (imported by conftest.py; a plugin of its own so
tests/test_sticky_cuda.py can load it into a scratch pytest run).

An illegal address (or any other sticky fault) kills the process's CUDA context: every later
GPU test in that process fails with the same message, hiding what they would have shown (the
first H200 run lost 26 of its 30 failures to such cascades). So after a test dies of one, a
pytest-xdist worker exits during that test's teardown (xdist reports the test as crashed
beside its traceback and starts a fresh worker for the rest); a plain run skips the
remaining tests whose id names cuda, naming the test that faulted.
"""

from __future__ import annotations

import os
import sys

import pytest

STICKY_CUDA = (
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "device-side assert",
)
_dead: list[str] = []


def is_sticky_cuda_error(exc: BaseException) -> bool:
    msg = str(exc)
    return ("CUDA" in msg or type(exc).__name__ == "AcceleratorError") and any(
        s in msg for s in STICKY_CUDA
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.when == "call" and rep.failed and call.excinfo is not None:
        if is_sticky_cuda_error(call.excinfo.value):
            _dead.append(item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    # an xdist worker has config.workerinput (PYTEST_XDIST_WORKER is inherited by any child
    # pytest, e.g. pytester's, which is not one)
    if _dead and _dead[-1] == item.nodeid and hasattr(item.config, "workerinput"):
        sys.stderr.write(f"\nCUDA context lost in {item.nodeid}: restarting this worker\n")
        sys.stderr.flush()
        os._exit(3)


def pytest_runtest_setup(item):
    if _dead and "cuda" in item.nodeid:
        pytest.skip(f"the CUDA context was lost in {_dead[0]} (sticky fault)")
