"""pytest plugin that puts recon-kernels under a client library's own test suite.

Load it with ``-p recon_plugin`` (this folder on PYTHONPATH); configured by env vars:

* ``RECON_CLIENT_MODE``: ``baseline`` (count only), ``hf`` (transformers: every model that
  would get ``attn_implementation="sdpa"`` -- the default, or asked for -- gets ``"recon"``),
  ``peft`` (every peft LoRA ``Linear`` created is swapped to the accelerated class, as
  ``rk_peft.accelerate`` does).
* ``RECON_CLIENT_MAP``: for ``hf``, the implementation names mapped to ``"recon"``
  (comma-separated, default ``sdpa``; add ``eager`` for test files whose configs ask for
  eager explicitly, e.g. ViT-MAE).
* ``RECON_CLIENT_COUNTS``: a JSON file written at the end: recon custom-op calls per test
  (counted where the ops dispatch to a backend, ``recon_kernels.ops._dispatch.impl``: every
  forward and backward kernel call of every op) and by op family.
"""

from __future__ import annotations

import collections
import json
import os

import pytest

_calls = collections.Counter()  # family -> calls, whole session
_per_test: dict[str, int] = {}
_current = [0]


def _install_counter() -> None:
    from recon_kernels.ops import _dispatch

    orig = _dispatch.impl

    def impl(backend, family):
        _calls[f"{family}:{backend}"] += 1
        _current[0] += 1
        return orig(backend, family)

    _dispatch.impl = impl


def _install_hf(mapped: set[str]) -> None:
    from transformers import modeling_utils

    from recon_kernels.integrations import transformers as rk_hf

    rk_hf.register()
    orig = modeling_utils.PreTrainedModel.get_correct_attn_implementation

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        name = orig(self, requested_attention, is_init_check)
        return "recon" if name in mapped else name

    modeling_utils.PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


def _install_peft() -> None:
    from peft.tuners.lora.layer import Linear

    from recon_kernels.integrations.peft import ReconLoraLinear

    orig = Linear.__init__

    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if type(self) is Linear:
            self.__class__ = ReconLoraLinear
            self._recon_backend = None

    Linear.__init__ = __init__


def pytest_configure(config):
    mode = os.environ.get("RECON_CLIENT_MODE", "baseline")
    _install_counter()
    if mode == "hf":
        mapped = {s for s in os.environ.get("RECON_CLIENT_MAP", "sdpa").split(",") if s}
        _install_hf(mapped)
    elif mode == "peft":
        _install_peft()
    elif mode != "baseline":
        raise pytest.UsageError(f"RECON_CLIENT_MODE: expected baseline, hf or peft, got {mode!r}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = 0
    yield
    _per_test[item.nodeid] = _current[0]


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("RECON_CLIENT_COUNTS")
    if out:
        with open(out, "w") as f:
            json.dump({"by_family": dict(_calls), "per_test": _per_test}, f, indent=0)
