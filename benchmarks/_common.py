"""What every benchmark script shares (they run as ``python benchmarks/bench_X.py``, so this
folder is on sys.path): the command line, the timer, peak memory, the environment header,
unavailable-peer records, a time budget and the csv/markdown writer.

A bench script keeps only its shapes, its providers (ours and the peers) and its FLOP or
byte formulas; it hands rows of this schema to :func:`write`:

    case, mode, provider, ms, p20, p80   (+ any bench-specific columns)
    status: "ok" | "unavailable: why" | "error: why" | "skipped: why"

Timing (:func:`time_ms`): on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed
between repetitions) asked for the median and the 20th / 80th percentiles; on the CPU
(``--smoke``: tiny shapes, eager / Triton-interpreter path, to prove a script runs) a
wall-clock fallback over a few calls. CPU numbers are smoke output, never a speed claim.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from a source checkout: import recon_kernels here
    sys.path.insert(0, ROOT)

STATUS_OK = "ok"


# --------------------------------------------------------------------------- command line


def add_args(ap: argparse.ArgumentParser, name: str) -> None:
    """The options every bench takes."""
    ap.add_argument("--out", required=True, help=f"directory for {name}.csv / {name}.md")
    ap.add_argument("--quick", action="store_true", help="the short subset (the device run)")
    ap.add_argument(
        "--smoke",
        "--dry-run",
        dest="smoke",
        action="store_true",
        help="tiny shapes on the CPU (eager / Triton interpreter, wall clock): tests the script",
    )
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds; the rest are recorded as "
        "'skipped: time budget' (device_check.sh passes what is left of its step)",
    )
    ap.add_argument(
        "--autotune",
        choices=("auto", "on", "off"),
        default="auto",
        help="Triton autotuning (auto: off with --quick/--smoke, the first config that fits)",
    )


class Budget:
    """Seconds since the bench started against its ``--deadline-s`` (None: no limit)."""

    def __init__(self, deadline_s: float | None) -> None:
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def expired(self) -> bool:
        return self.deadline_s is not None and self.elapsed() >= self.deadline_s

    def skip_status(self) -> str:
        return f"skipped: time budget {self.deadline_s:.0f}s spent"


def setup(args: argparse.Namespace) -> str:
    """Environment for the run; returns the device ("cpu" for --smoke, else "cuda").

    Must run before ``recon_kernels`` is imported (TRITON_INTERPRET, the autotune switch)."""
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    autotune = args.autotune
    if autotune == "auto":
        autotune = "off" if (args.quick or args.smoke) else "on"
    os.environ["RECON_TRITON_AUTOTUNE"] = "1" if autotune == "on" else "0"
    args.autotune = autotune
    # one torch.compile'd function per provider recompiles for every case (dynamic=False);
    # past dynamo's default limit (8) it would silently run uncompiled under its label
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    return "cpu" if args.smoke else "cuda"


def no_gpu(args: argparse.Namespace, name: str) -> bool:
    """True (after writing a note) when a GPU run was asked for and none is visible."""
    if args.smoke or torch.cuda.is_available():
        return False
    write(
        args.out,
        name,
        f"# {name}\n\nskipped: no CUDA GPU is visible (this benchmark needs one; "
        "--smoke runs a tiny CPU version of the script).\n",
        [],
    )
    return True


def start(
    argv: list[str] | None, name: str, description: str
) -> tuple[argparse.Namespace, str] | None:
    """A bench's ``main()`` preamble: the common options parsed, :func:`setup` run, and
    (args, device) returned; None (after :func:`no_gpu`'s note) when there is nothing to run."""
    ap = argparse.ArgumentParser(description=description)
    add_args(ap, name)
    args = ap.parse_args(argv)
    device = setup(args)
    return None if no_gpu(args, name) else (args, device)


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """``env`` set in os.environ for the block (A/B switches the launchers read at every
    call, forward and backward alike), the previous values restored after."""
    prev = {n: os.environ.get(n) for n in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for n, v in prev.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def quantiles(times_ms: Iterable[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a sample of times (ms)."""
    ts = sorted(float(t) for t in times_ms)
    if not ts:
        raise ValueError("quantiles: expected at least one time, got an empty sample")
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[1], q[7]


def time_ms(
    fn: Callable[[], object],
    device: str,
    quick: bool,
    warmup_ms: float | None = None,
    rep_ms: float | None = None,
) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn()``, after one untimed call (compilation / autotuning
    stay out of the numbers). ``warmup_ms`` / ``rep_ms``: do_bench's budgets (defaults
    10 / 50 quick, 25 / 200 full; give a slow ``fn`` more, so that it repeats enough)."""
    fn()
    _sync(device)
    if device == "cuda":
        import triton.testing

        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - t) * 1e3
        warmup = warmup_ms if warmup_ms is not None else 10 if quick else 25
        rep = rep_ms if rep_ms is not None else 50 if quick else 200
        # at least ~10 (quick) / 25 timed calls, so that p20 / p80 mean something
        warmup, rep = max(warmup, 2 * once_ms), max(rep, (10 if quick else 25) * once_ms)
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(m) for m in ms)  # type: ignore[return-value]
    times: list[float] = []  # wall clock: a smoke test of the script, never a measurement
    t_end = time.perf_counter() + 0.2
    while not times or (len(times) < 20 and time.perf_counter() < t_end):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return quantiles(times)


def kernel_profile(fn: Callable[[], object], device: str, reps: int = 5, top: int = 12) -> str:
    """Markdown: where ``fn()``'s time goes, per kernel (torch.profiler, after one warm call):
    calls and GPU microseconds per call of ``fn``, and the GPU kernel total against the wall
    time per call (profiler on), and the host time per call: ``reps`` calls timed on the CPU
    without the profiler and without a sync, i.e. what launching them costs. Host time
    above the kernel total means the GPU idles between kernels (host-bound: a benchmark of
    it times Python, not kernels); one kernel far above its FLOP share, a slow kernel. On
    the CPU (smoke runs) the CPU operators' self time instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    # host time: the calls alone, no sync between them (the GPU queue takes far more than
    # `reps` calls' launches, so only a sync inside fn would make the CPU wait here)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    host_us = (time.perf_counter() - t) * 1e6 / reps
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    wall_us = (time.perf_counter() - t) * 1e6 / reps
    want = DeviceType.CUDA if device == "cuda" else DeviceType.CPU
    evs = []
    for ev in prof.key_averages():
        if ev.device_type != want:
            continue
        us = getattr(ev, "self_device_time_total" if device == "cuda" else "self_cpu_time_total")
        if device == "cuda" and not us:
            us = getattr(ev, "self_cuda_time_total", 0)  # older torch
        if us > 0:
            evs.append((us / reps, ev.count / reps, ev.key))
    evs.sort(reverse=True)
    total = sum(e[0] for e in evs)
    what = "GPU kernel" if device == "cuda" else "CPU operator (self)"
    if device == "cuda":
        verdict = (
            "host-bound: the GPU waits for the launches"
            if host_us > total
            else "GPU-bound: the launches run ahead of the kernels"
        )
        host = f"; host {host_us:.0f} us per call without the profiler or a sync ({verdict})"
    else:
        host = f"; host {host_us:.0f} us per call"
    lines = [
        f"{what} time {total:.0f} us per call of {wall_us:.0f} us wall (profiler on, {reps} "
        f"calls){host}",
        "",
        "| kernel | calls | us | % |",
        "|---|---:|---:|---:|",
    ]
    for us, calls, key in evs[:top]:
        name = key if len(key) <= 90 else key[:87] + "..."
        lines.append(f"| `{name}` | {calls:g} | {us:.1f} | {100 * us / max(total, 1e-9):.0f} |")
    if len(evs) > top:
        rest = sum(e[0] for e in evs[top:])
        lines.append(
            f"| ({len(evs) - top} more) | | {rest:.1f} | {100 * rest / max(total, 1e-9):.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_profile(out: str, name: str, sections: list[tuple[str, str]]) -> None:
    """OUT/NAME_profile.md: one kernel_profile section per (label, markdown)."""
    os.makedirs(out, exist_ok=True)
    body = "".join(f"## {label}\n\n{md}\n" for label, md in sections)
    with open(os.path.join(out, f"{name}_profile.md"), "w") as f:
        f.write(f"# {name}: kernel profiles (torch.profiler)\n\n{body}")


def memory_mb(
    forward: Callable[[], object], backward: Callable[[object], object] | None, device: str
) -> tuple[float, float]:
    """(MB held after ``forward()`` returns, peak MB above the starting point during forward
    and ``backward(out)``); NaN on the CPU (no allocator statistics)."""
    if device != "cuda":
        return math.nan, math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    if backward is not None:
        backward(out)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return kept / 2**20, peak / 2**20


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- environment


def _driver() -> str:
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else "-"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "-"


def env_info(device: str) -> dict[str, str]:
    """GPU, driver and versions: the columns every csv row carries."""
    try:
        import triton

        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001  (an environment without triton still reports)
        triton_v = f"unavailable: {type(e).__name__}"
    import recon_kernels as rk

    gpu = torch.cuda.get_device_name() if device == "cuda" else f"CPU smoke ({platform.machine()})"
    return {
        "gpu": gpu,
        "driver": _driver() if device == "cuda" else "-",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_v,
        "python": platform.python_version(),
        "recon_kernels": getattr(rk, "__version__", "?"),
        "recon_cuda_ext": "built" if rk.why_unavailable("cuda") is None else "not available",
    }


def header(title: str, info: dict[str, str], args: argparse.Namespace, notes: list[str]) -> str:
    lines = [
        f"# {title}",
        "",
        f"- GPU: {info['gpu']} (driver {info['driver']}, CUDA {info['cuda']}); "
        f"torch {info['torch']}, triton {info['triton']}, Python {info['python']}, "
        f"recon_kernels {info['recon_kernels']} (CUDA extension {info['recon_cuda_ext']})",
        f"- mode: {'smoke (CPU, tiny shapes: not a measurement)' if args.smoke else 'quick' if args.quick else 'full'}; "
        f"Triton autotuning {args.autotune}; times in ms: median and p20-p80 "
        f"({'do_bench, CUDA events' if not args.smoke else 'wall clock'})",
        *notes,
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- rows


def short_error(e: BaseException, n: int = 120) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}"


def unavailable(why: BaseException | str) -> str:
    return "unavailable: " + (why if isinstance(why, str) else short_error(why))


def skipped(why: str) -> str:
    """A provider left out on purpose (time), not one that cannot run."""
    return "skipped: " + why


def is_ok(r: dict) -> bool:
    return r.get("status", STATUS_OK) == STATUS_OK and isinstance(r.get("ms"), float)


def measure_row(
    row: dict,
    call: Callable[[], torch.Tensor],
    grads_of: Sequence[torch.Tensor],
    dy: torch.Tensor,
    device: str,
    quick: bool,
    flops: float,
    *,
    ref: torch.Tensor | None = None,
    profiles: list | None = None,
    profiled: Collection[str] = (),
) -> dict:
    """Fill ``row`` (its "mode" fwd or fwd+bwd, its "provider") for the op ``call()``: the
    forward's max error against ``ref`` (when given), the time, for fwd+bwd the memory
    (gradients of ``grads_of`` for the output gradient ``dy``), TFLOP/s for ``flops`` and
    the status; a :func:`kernel_profile` of fwd+bwd into ``profiles`` for the providers in
    ``profiled``. An exception becomes the row's status (an error for recon's own
    providers, unavailable for a peer), so one failing row does not hide the others."""
    name, mode = row["provider"], row["mode"]
    try:
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    return call()

            if ref is not None:
                row["max_err"] = (run().float() - ref).abs().max().item()
        else:

            def run():
                torch.autograd.grad(call(), grads_of, dy)

        # timing first: compilation and autotuning (with do_bench's L2-flush buffer) must
        # not count towards the memory peak
        row["ms"], row["p20"], row["p80"] = time_ms(run, device, quick)
        if mode == "fwd+bwd":
            row["saved_mb"], row["peak_mb"] = memory_mb(
                call, lambda y: torch.autograd.grad(y, grads_of, dy), device
            )
        row["tflops"] = flops / row["ms"] * 1e-9
        row["status"] = STATUS_OK
        if profiles is not None and mode == "fwd+bwd" and name in profiled:
            profiles.append((f"{row['case']} {mode} {name}", kernel_profile(run, device)))
    except Exception as e:  # noqa: BLE001  (one failing row must not hide the others)
        row["status"] = f"error: {short_error(e)}" if name.startswith("recon-") else unavailable(e)
    return row


def add_peer_ratios(rows: list[dict], is_peer: Callable[[str], bool]) -> None:
    """``best_peer`` / ``x_best_peer`` (best peer ms over this row's ms) per (case, mode)."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if is_ok(r) and is_peer(r["provider"]):
            key = (r["case"], r["mode"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], r["provider"])
    for r in rows:
        b = best.get((r["case"], r["mode"]))
        if b and is_ok(r):
            r["best_peer"] = b[1]
            r["x_best_peer"] = b[0] / r["ms"]


def fmt(v, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def table(
    rows: list[dict],
    rate: tuple[str, str] | None = ("tflops", "TFLOP/s"),
    extra: tuple[tuple[str, str, str], ...] = (),
) -> str:
    """The markdown table of rows in the common schema; ``extra``: (key, label, format)
    columns of the bench's own."""
    head = ["case", "mode", "provider", "ms", "p20-p80"]
    if rate:
        head.append(rate[1])
    head += ["peak MB", *(label for _, label, _ in extra), "x best peer", "max err", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = is_ok(r)
        cells = [str(r["case"]), str(r["mode"]), str(r["provider"])]
        cells += [fmt(r.get("ms"), ".3f"), f"{fmt(r.get('p20'), '.3f')}-{fmt(r.get('p80'), '.3f')}"]
        if rate:
            cells.append(fmt(r.get(rate[0]), ".1f"))
        cells.append(fmt(r.get("peak_mb"), ".0f"))
        cells += [fmt(r.get(key), spec) for key, _, spec in extra]
        xp = r.get("x_best_peer")
        cells.append(f"{fmt(xp)}x ({r['best_peer']})" if ok and xp is not None else "-")
        cells.append(fmt(r.get("max_err"), ".1e"))
        cells.append(str(r.get("status", STATUS_OK)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write(
    out: str, name: str, md: str, rows: list[dict], info: dict | None = None, quiet: bool = False
) -> None:
    """OUT/NAME.md (markdown) and OUT/NAME.csv (every field of every row, plus the ``info``
    columns); prints the markdown. Safe to call after every case (partial results survive
    a kill; ``quiet`` then skips the print)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(md)
    if rows:
        rows = [{"bench": name, **r, **(info or {})} for r in rows]
        fields = list(dict.fromkeys(k for r in rows for k in r))
        tmp = os.path.join(out, f".{name}.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, os.path.join(out, f"{name}.csv"))
    if not quiet:
        print(md, flush=True)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
