"""The report of one device_check.sh part: OUT files and the summary printed last.

    python benchmarks/device_report.py --work WORK --out OUT [--tag _part2] [--part N]

Reads WORK (steps.tsv, env.txt, each step's log, the benches' csv/md) and writes to OUT
(the device tool returns at most 8 files, so few):

    results{tag}.md   environment, the step table, every bench table, check / tests / sanitizer
    results{tag}.csv  every benchmark row (bench, case, mode, provider, ms, p20, p80, ...,
                      gpu, driver, torch, cuda, triton): one table for all benches
    steps{tag}.csv    step, status, cap_s, granted_s, used_s, part
    env{tag}.txt      nvidia-smi, python / torch / triton / nvcc versions
    summary{tag}.txt  what is printed: steps, the sm_90a gate, check, tests, sanitizers,
                      recon vs best peer

Standard library only (no torch import: it runs inside the deadline's reserve).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import sys

BENCH_ORDER = (
    "bench_launch",
    "bench_attention",
    "bench_mlp",
    "bench_lora",
    "bench_train",
    "bench_hf",
)
MAX_SUMMARY_CHARS = 10000  # the device tool returns the last 12,000 characters of output


def read_tsv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tail(path: str, n: int) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        return [ln.rstrip("\n") for ln in f.readlines()[-n:]]


def num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None  # NaN -> None


def f3(v) -> str:
    x = num(v)
    return "-" if x is None else f"{x:.3f}"


def step_table(steps: list[dict]) -> list[str]:
    out = ["| step | status | cap s | granted s | used s |", "|---|---|---|---|---|"]
    for s in steps:
        out.append(
            f"| {s['step']} | {s['status']} | {s['cap_s']} | {s['granted_s']} | {s['used_s']} |"
        )
    return out


def check_lines(work: str) -> list[str]:
    path = os.path.join(work, "check.log")
    if not os.path.exists(path):
        return []
    lines = tail(path, 400)
    bad = [ln for ln in lines if ln.rstrip().endswith("FAIL") or " ERROR " in ln]
    last = [ln for ln in lines if "checks passed" in ln or "check(s) failed" in ln]
    timing = []
    if any(ln.startswith("GPU timing") for ln in lines):
        i = next(i for i, ln in enumerate(lines) if ln.startswith("GPU timing"))
        timing = [ln for ln in lines[i : i + 4] if ln.strip()]
    return (last or ["(no verdict line: cut by its timeout?)"]) + bad[:10] + timing


def test_lines(work: str, name: str) -> list[str]:
    path = os.path.join(work, f"{name}.log")
    if not os.path.exists(path):
        return []
    text = open(path, errors="replace").read()
    # "path::test PASSED" (-v) or "[gw0] [ 5%] PASSED path::test" (-v under xdist)
    per_test = [ln for ln in text.splitlines() if "::" in ln and not ln.startswith("FAILED ")]
    counts = {
        k: sum(1 for ln in per_test if re.search(rf"(^|\s){k}(\s|$)", ln))
        for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")
    }
    final = [
        ln
        for ln in text.splitlines()
        if re.match(r"^=+ .*(passed|failed|error|no tests ran).* =+$", ln)
    ]
    failed = re.findall(r"^FAILED (\S+)", text, re.M)[:8]
    line = ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
    return [
        f"{name}: {line or 'no per-test lines'}" + (f" | {final[-1].strip('= ')}" if final else "")
    ] + [f"  FAILED {t}" for t in failed]


def gate_lines(work: str) -> list[str]:
    """The sm_90a gate's verdict (benchmarks/sm90_gate.py): its "gate:" lines."""
    return [ln for ln in tail(os.path.join(work, "gate.log"), 40) if ln.startswith("gate:")]


def verdicts(work: str, sanitizer_lines: int) -> list[tuple[str, list[str]]]:
    """(title, lines) of the gate, check, GPU test and sanitizer steps, for results.md and
    the summary alike (the summary keeps fewer sanitizer lines)."""
    tests = test_lines(work, "tests") + test_lines(work, "tests_e2e") + test_lines(work, "pad0")
    return [
        ("sm_90a gate", gate_lines(work)),
        ("recon check", check_lines(work)),
        ("GPU tests", tests),
        ("sanitizers", tail(os.path.join(work, "sanitize", "summary.txt"), sanitizer_lines)),
    ]


def bench_summary(rows: list[dict]) -> list[str]:
    """recon rows vs the best peer of the same case and mode; unavailable peers once each."""
    out = []
    for r in rows:
        if r.get("provider", "").startswith("recon-") and r.get("status") == "ok":
            xp = num(r.get("x_best_peer"))
            peer = r.get("best_peer") or "-"
            out.append(
                f"  {r['case']:<22} {r['mode']:<7} {r['provider']:<24} {f3(r['ms']):>9} "
                f"({f3(r['p20'])}-{f3(r['p80'])})  vs {peer}: {'-' if xp is None else f'{xp:.2f}x'}"
            )
    errors = [r for r in rows if r.get("status", "ok").startswith("error")]
    for r in errors[:6]:
        out.append(f"  ERROR {r['case']} {r['mode']} {r['provider']}: {r['status'][:100]}")
    seen: dict[str, str] = {}
    for r in rows:
        st = r.get("status", "ok")
        if st.startswith(("unavailable", "skipped")) and r.get("provider") not in seen:
            seen[r.get("provider", "-")] = st
    for p, st in list(seen.items())[:8]:
        out.append(f"  {p}: {st[:110]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--part", default="1")
    ap.add_argument("--deadline", default="?")
    ap.add_argument("--elapsed", default="?")
    ap.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = ap.parse_args(argv)
    W, O, tag = args.work, args.out, args.tag
    os.makedirs(O, exist_ok=True)
    steps = read_tsv(os.path.join(W, "steps.tsv"))
    with open(os.path.join(O, f"steps{tag}.csv"), "w", newline="") as f:
        fields = ["step", "status", "cap_s", "granted_s", "used_s", "part"]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(steps)
    env = os.path.join(W, "env.txt")
    if os.path.exists(env):
        shutil.copyfile(env, os.path.join(O, f"env{tag}.txt"))

    benches = {}
    for path in glob.glob(os.path.join(W, "bench_*.csv")):
        name = os.path.basename(path)[: -len(".csv")]
        benches[name] = read_csv(path)
    names = sorted(benches, key=lambda n: BENCH_ORDER.index(n) if n in BENCH_ORDER else 99)
    all_rows = [{"bench": n, **r} for n in names for r in benches[n]]
    if all_rows:
        fields = list(dict.fromkeys(k for r in all_rows for k in r))
        with open(os.path.join(O, f"results{tag}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(all_rows)

    head = env_head(all_rows)
    md = [f"# device_check part {args.part}", "", head, ""] + tail(env, 12)
    md += ["", "## steps", ""] + step_table(steps)
    md += ["", f"elapsed {args.elapsed} s of the {args.deadline} s deadline", ""]
    for title, lines in verdicts(W, sanitizer_lines=10):
        if lines:
            md += [f"## {title}", "", "```", *lines, "```", ""]
    for n in names:
        p = os.path.join(W, f"{n}.md")
        if os.path.exists(p):
            md += [open(p).read().replace("\n# ", "\n## "), ""]
    static = os.path.join(W, "triton_static.md")
    if os.path.exists(static):
        md += [open(static).read(), ""]
    with open(os.path.join(O, f"results{tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    # the summary: printed last by device_check.sh
    s = [f"== device_check part {args.part} summary: {head}"]
    s += [f"   elapsed {args.elapsed} s of the {args.deadline} s deadline; files in {O}"]
    s += step_table(steps)
    for title, lines in verdicts(W, sanitizer_lines=5):
        if lines:
            s += [f"-- {title}", *lines]
    for n in names:
        if n == "bench_launch":  # host microseconds per call (the wall rows: in results.md)
            p = os.path.join(W, f"{n}.md")
            lines = [ln for ln in tail(p, 60) if ln.startswith("| tiny | host |")]
            s += [f"-- {n}: host cost per call (ms, p20-p80, us)", *lines[:12]]
        elif n in ("bench_train", "bench_hf"):
            p = os.path.join(W, f"{n}.md")
            lines = [ln for ln in tail(p, 40) if ln.startswith("|") or ln.startswith("- target")]
            s += [f"-- {n}", *lines[:14]]
        else:
            s += [f"-- {n}: recon (median ms, p20-p80) vs the best peer of the same case/mode"]
            s += bench_summary(benches[n])
    left = [x["step"] for x in steps if x["status"].startswith("skipped-for-time")]
    if left:
        s += [
            f"-- NOT RUN (skipped for time): {', '.join(left)}",
            "   next call, at once (warm machine): bash benchmarks/device_check.sh --part 2 OUTDIR"
            " (RECON_DEVICE_DEADLINE=<seconds left>)",
        ]
    else:
        s += ["-- every selected step was started"]
    text = "\n".join(s)
    if len(text) > MAX_SUMMARY_CHARS:  # keep the step table (the head) and the verdict (the end)
        text = text[: MAX_SUMMARY_CHARS // 2] + "\n[...]\n" + text[-MAX_SUMMARY_CHARS // 2 :]
    with open(os.path.join(O, f"summary{tag}.txt"), "w") as f:
        f.write(text + "\n")
    if not args.quiet:
        print(text)
    return 0


def env_head(rows: list[dict]) -> str:
    if not rows:
        return "(no benchmark rows: GPU and versions in env.txt)"
    r = rows[0]
    keys = ("gpu", "driver", "torch", "cuda", "triton", "python")
    return ", ".join(f"{k} {r.get(k, '?')}" for k in keys)


if __name__ == "__main__":
    sys.exit(main())
