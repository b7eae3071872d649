"""Kept for benchmarks/device_check.sh: the attention part of benchmarks/sass_report.py.

    python benchmarks/triton_static.py [--out DIR] [--filter WORDS]

Same options as sass_report.py; compiles in as many processes as there are cores.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sass_report import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--jobs" not in args:
        args += ["--jobs", str(min(16, os.cpu_count() or 1))]
    sys.exit(main(["--family", "attention", *args]))
