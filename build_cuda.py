"""CUDA extension build helpers used by setup.py (kept out of setup.py so it stays short).

Filled in by the CUDA backend: until ``csrc/`` has sources, nothing is built.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[recon-kernels build] {msg}", file=sys.stderr)


def cuda_build_config():
    mode = os.environ.get("RECON_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"RECON_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    sources = sorted(glob.glob(os.path.join(HERE, "csrc", "*.cu")))
    if mode == "0":
        _log("RECON_BUILD_CUDA=0: installing the pure-Python package only")
        return [], {}
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    if not sources or nvcc is None or not os.path.exists(nvcc):
        why = "no CUDA sources in csrc/" if not sources else "nvcc not found"
        if mode == "1":
            raise SystemExit(f"RECON_BUILD_CUDA=1 but the extension cannot be built: {why}")
        _log(f"not building the CUDA extension ({why}); installing pure Python")
        return [], {}
    raise SystemExit("CUDA build not implemented yet")
