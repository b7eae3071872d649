"""Run client libraries' own test suites twice -- stock, and with recon-kernels forced in --
and report pass/fail/skip counts, the tests that changed outcome, and how many recon kernel
calls each test made (``recon_plugin.py``).

    python benchmarks/client_tests/run.py --hf-tests /path/to/transformers-checkout \
        --peft-tests /path/to/peft-checkout [--suites gpt2,bert,vit_mae,llama,peft_lora]

``--hf-tests``/``--peft-tests``: a directory holding the library's ``tests/`` package (a git
checkout at the installed version's tag; nothing of it is committed here). Results go to
``--out`` (default benchmarks/results/): client_tests.json and client_tests.md.
Backend: whatever ``RECON_BACKEND`` says (CPU default: eager); e.g. ``RECON_BACKEND=triton
TRITON_INTERPRET=1`` for the Triton kernels in the interpreter (slow: use ``--k``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# name -> (library, test path inside the checkout, extra pytest args, plugin mode, env)
SUITES = {
    "gpt2": ("hf", "tests/models/gpt2", [], {}),
    "bert": ("hf", "tests/models/bert", [], {}),
    "llama": ("hf", "tests/models/llama", [], {}),
    # ViT-MAE's tester asks for attn_implementation="eager" in its config: map it too
    "vit_mae": ("hf", "tests/models/vit_mae", [], {"RECON_CLIENT_MAP": "sdpa,eager"}),
    "peft_lora": ("peft", "tests/test_custom_models.py", ["-k", "lora or Lora or LoRA"], {}),
}


def run_suite(name: str, root: Path, mode: str, out: Path, k: str | None, timeout: int) -> dict:
    lib, path, extra, env_extra = SUITES[name]
    xml = out / f"_{name}_{mode}.xml"
    counts = out / f"_{name}_{mode}_counts.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env["RECON_CLIENT_MODE"] = "baseline" if mode == "baseline" else lib
    env["RECON_CLIENT_COUNTS"] = str(counts)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(env_extra)
    if k:  # narrow the suite: AND with its own -k expression
        base_k = None
        if "-k" in extra:
            i = extra.index("-k")
            base_k, extra = extra[i + 1], extra[:i] + extra[i + 2 :]
        extra = [*extra, "-k", f"({base_k}) and ({k})" if base_k else k]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        path,
        "-q",
        "-p",
        "recon_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        f"--junitxml={xml}",
        *extra,
    ]
    t0 = time.perf_counter()
    try:
        subprocess.run(
            cmd,
            cwd=root,
            env=env,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pass
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 1), **parse(xml, counts)}


def parse(xml: Path, counts: Path) -> dict:
    tests = {}
    if xml.exists():
        for tc in ET.parse(xml).getroot().iter("testcase"):
            nodeid = f"{tc.get('classname')}::{tc.get('name')}"
            outcome, msg = "passed", ""
            for child in tc:
                if child.tag in ("failure", "error"):
                    outcome, msg = (
                        ("failed" if child.tag == "failure" else "error"),
                        (child.get("message") or ""),
                    )
                elif child.tag == "skipped":
                    outcome, msg = "skipped", child.get("message") or ""
            tests[nodeid] = (outcome, msg.splitlines()[0][:200] if msg else "")
    c = json.loads(counts.read_text()) if counts.exists() else {"by_family": {}, "per_test": {}}
    per = {}
    for nodeid, n in c["per_test"].items():  # pytest nodeid -> junit classname::name
        path, _, rest = nodeid.partition("::")
        cls = path.removesuffix(".py").replace("/", ".")
        parts = rest.split("::")
        per[".".join([cls, *parts[:-1]]) + "::" + parts[-1]] = n
    summary = {
        s: sum(1 for o, _ in tests.values() if o == s)
        for s in ("passed", "failed", "error", "skipped")
    }
    summary["recon_calls"] = c["by_family"]
    summary["passed_calling_recon"] = sum(
        1 for t, (o, _) in tests.items() if o == "passed" and per.get(t, 0) > 0
    )
    return {"summary": summary, "tests": tests, "calls": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-tests", type=Path, help="transformers checkout (holds tests/)")
    ap.add_argument("--peft-tests", type=Path, help="peft checkout (holds tests/)")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--modes", default="baseline,recon")
    ap.add_argument("--k", default=None, help="extra pytest -k expression (subset)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per suite and mode")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument(
        "--from-files", action="store_true", help="no runs: report the _*.xml already in --out"
    )
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in a.suites.split(","):
        root = a.hf_tests if SUITES[name][0] == "hf" else a.peft_tests
        if root is None and not a.from_files:
            print(f"{name}: skipped (no --{SUITES[name][0]}-tests)")
            continue
        results[name] = {
            m: (
                {
                    "wall_s": None,
                    **parse(a.out / f"_{name}_{m}.xml", a.out / f"_{name}_{m}_counts.json"),
                }
                if a.from_files
                else run_suite(name, root, m, a.out, a.k, a.timeout)
            )
            for m in a.modes.split(",")
        }
        for m, r in results[name].items():
            print(name, m, r["wall_s"], "s", json.dumps(r["summary"]), flush=True)
    backend = os.environ.get("RECON_BACKEND", "auto (CPU: eager)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        backend += " + TRITON_INTERPRET=1"
    stem = f"client_tests{a.tag}"
    (a.out / f"{stem}.json").write_text(json.dumps({"backend": backend, "results": results}))
    (a.out / f"{stem}.md").write_text(report(results, backend))
    print(report(results, backend))


def report(results: dict, backend: str) -> str:
    lines = [
        f"Backend: {backend}",
        "",
        "| suite | mode | passed | failed | error | skipped | passed tests calling recon | "
        "recon kernel calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    for name, modes in results.items():
        for m, r in modes.items():
            s = r["summary"]
            calls = ", ".join(f"{k} {v}" for k, v in sorted(s["recon_calls"].items())) or "0"
            lines.append(
                f"| {name} | {m} | {s['passed']} | {s['failed']} | {s['error']} | "
                f"{s['skipped']} | {s['passed_calling_recon']} | {calls} |"
            )
        if "baseline" in modes and "recon" in modes:
            b, r = modes["baseline"]["tests"], modes["recon"]["tests"]
            for t in sorted(set(b) | set(r)):
                ob, orr = b.get(t, ("missing", "")), r.get(t, ("missing", ""))
                if ob[0] != orr[0]:
                    diffs.append(f"- {name} `{t}`: {ob[0]} -> {orr[0]} {orr[1] or ob[1]}")
    lines += ["", "Outcome changes (baseline -> recon):", ""] + (diffs or ["- none"])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
