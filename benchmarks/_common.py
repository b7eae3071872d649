"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_X.py``, so this
folder is on sys.path)."""

from __future__ import annotations

import csv
import os


def write(out: str, name: str, md: str, rows: list[dict]) -> None:
    """OUT/NAME.md (the markdown table) and OUT/NAME.csv (every field of every row); prints
    the markdown."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    print(md)
