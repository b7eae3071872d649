"""lora_linear microbenchmark: the fused LoRA linear vs eager peft-style
(base(x) + B(A(x))·s) and vs the frozen base matmul alone; plus merge_lora.

    python benchmarks/bench_lora.py --out DIR [--quick]

bf16, tokens T in {8k, 32k}, in = out = 4096, r in {8, 16, 64}, the fine-tuning case
(W and bias frozen: gradients of x, A, B). Forward and forward + backward; timing with
``triton.testing.do_bench`` median / p20 / p80 (ms); TFLOP/s counts every GEMM's flops
(base and rank-r); "vs base" is the time of the frozen base matmul alone (x Wᵀ + b and
its dx) over ours: 1.0 would mean the adapter is free. merge_lora is memory-bound: GB/s
of reading W and writing the merged copy (in-place merge: the same traffic). Writes
DIR/bench_lora.csv and DIR/bench_lora.md and prints the markdown; exits 0 with a message
when no CUDA GPU is visible. --quick (~1 min on an H200): T = 8k, r in {16, 64}, Triton
autotuning off (the first config that fits).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _common import write
from bench_mlp import fmt, gpu_header, memory_mb, time_ms

TOKENS = (8192, 32768)
RANKS = (8, 16, 64)
FEATURES = 4096
SCALE = 2.0
DEVICE = "cuda"


def lora_flops(T: int, k: int, n: int, r: int, mode: str) -> float:
    fwd = 2.0 * T * (k * n + r * k + r * n)  # x Wᵀ, x Aᵀ, xa Bᵀ
    if mode == "fwd":
        return fwd
    # dx = dy W + (dy B) A; dy B; dA = (dy B)ᵀ x; dB = dyᵀ xa
    bwd = 2.0 * T * (n * k + r * k + n * r + r * k + n * r)
    return fwd + bwd


def base_flops(T: int, k: int, n: int, mode: str) -> float:
    return 2.0 * T * k * n * (1 if mode == "fwd" else 2)


def bench_lora(T: int, r: int, quick: bool, backends: list[str]) -> list[dict]:
    import recon_kernels as rk

    dev, dt = torch.device(DEVICE), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    k = n = FEATURES

    def rnd(*s, scale=1.0, grad=True):
        t = torch.randn(*s, device=dev, dtype=dt, generator=g) * scale
        return t.requires_grad_(grad)

    x = rnd(T, k)
    w, b = rnd(n, k, scale=k**-0.5, grad=False), rnd(n, scale=0.1, grad=False)
    a, bb = rnd(r, k, scale=k**-0.5), rnd(n, r, scale=r**-0.5)
    dy = torch.randn(T, n, device=dev, dtype=dt, generator=g)

    impls = {}
    for be in backends:
        impls[f"recon-{be}"] = (
            lambda be=be: rk.lora_linear(x, w, b, a, bb, SCALE, backend=be),
            (x, a, bb),
            lora_flops,
        )
    impls["eager peft-style"] = (
        lambda: F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * SCALE,
        (x, a, bb),
        lora_flops,
    )
    impls["base matmul alone"] = (
        lambda: F.linear(x, w, b),
        (x,),
        lambda T, k, n, r, mode: base_flops(T, k, n, mode),
    )
    rows, base_ms = [], {}
    for name, (fn, inputs, flops_fn) in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            row = {"impl": name, "T": T, "in": k, "out": n, "r": r, "mode": mode}
            try:
                if mode == "fwd":

                    def run(fn=fn):
                        with torch.no_grad():
                            fn()

                else:

                    def run(fn=fn, inputs=inputs):
                        torch.autograd.grad(fn(), inputs, dy)

                # timing first: autotuning must not count towards the memory peak
                med, p20, p80 = time_ms(run, quick)
                if mode == "fwd+bwd":
                    row["saved_mb"], row["peak_mb"] = memory_mb(
                        fn, lambda y, inputs=inputs: torch.autograd.grad(y, inputs, dy)
                    )
                flops = flops_fn(T, k, n, r, mode)
                row.update(ms=med, ms_p20=p20, ms_p80=p80, tflops=flops / med * 1e-9, error="")
                if name == "base matmul alone":
                    base_ms[mode] = med
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
    for row in rows:
        if not row.get("error") and row["mode"] in base_ms:
            row["base_over_ours"] = base_ms[row["mode"]] / row["ms"]
    return rows


def bench_merge(r: int, quick: bool, backends: list[str]) -> list[dict]:
    import recon_kernels as rk
    from recon_kernels.ops.lora import merge_lora_

    dev, dt = torch.device(DEVICE), torch.bfloat16
    w = torch.randn(FEATURES, FEATURES, device=dev, dtype=dt)
    a = torch.randn(r, FEATURES, device=dev, dtype=dt)
    bb = torch.randn(FEATURES, r, device=dev, dtype=dt)
    nbytes = 2 * w.numel() * w.element_size()  # read W, write the result
    cases = {
        f"merge_lora recon-{be}": (lambda be=be: rk.merge_lora(w, a, bb, 1e-3, backend=be))
        for be in backends
    }
    # in place: +s then -s alternate, so W stays bounded over the timed repetitions
    sign = [1.0]

    def inplace():
        sign[0] = -sign[0]
        merge_lora_(w, a, bb, sign[0] * 1e-3, backend="triton")

    cases["merge_lora_ (in place) recon-triton"] = inplace
    cases["eager: W + s·(B @ A)"] = lambda: w + 1e-3 * (bb @ a)
    rows = []
    for name, fn in cases.items():
        row = {"impl": name, "T": 0, "in": FEATURES, "out": FEATURES, "r": r, "mode": "merge"}
        try:
            med, p20, p80 = time_ms(fn, quick)
            row.update(ms=med, ms_p20=p20, ms_p80=p80, gbps=nbytes / med * 1e-6, error="")
        except Exception as e:
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def markdown(header: list[str], rows: list[dict]) -> str:
    lines = [
        *header,
        "| T | r | mode | impl | ms median (p20-p80) | TFLOP/s | vs eager | vs base alone | "
        "saved after fwd MB | peak fwd+bwd MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {
        (r["T"], r["r"], r["mode"]): r["ms"]
        for r in rows
        if r["impl"] == "eager peft-style" and not r.get("error")
    }
    merges = []
    for r in rows:
        if r["mode"] == "merge":
            merges.append(r)
            continue
        if r.get("error"):
            lines.append(
                f"| {r['T']} | {r['r']} | {r['mode']} | {r['impl']} | {r['error']} | | | | | |"
            )
            continue
        key = (r["T"], r["r"], r["mode"])
        if key in eager:
            r["speedup_vs_eager"] = eager[key] / r["ms"]
        lines.append(
            f"| {r['T']} | {r['r']} | {r['mode']} | {r['impl']} | "
            f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | {r['tflops']:.0f} | "
            f"{fmt(r.get('speedup_vs_eager'))}x | {fmt(r.get('base_over_ours'))} | "
            f"{fmt(r.get('saved_mb'), '.0f')} | {fmt(r.get('peak_mb'), '.0f')} |"
        )
    lines += [
        "",
        f"in = out = {FEATURES}, scale {SCALE}, W and bias frozen. vs base alone: time of "
        "the frozen base matmul (forward, or forward + dx) over the row's time.",
        "",
        f"## merge_lora ({FEATURES} x {FEATURES} bf16)",
        "",
        "| r | impl | ms median (p20-p80) | GB/s |",
        "|---|---|---|---|",
    ]
    for r in merges:
        if r.get("error"):
            lines.append(f"| {r['r']} | {r['impl']} | {r['error']} | |")
        else:
            lines.append(
                f"| {r['r']} | {r['impl']} | {r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
                f"{r['gbps']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_lora.csv / bench_lora.md")
    ap.add_argument("--quick", action="store_true", help="a subset, ~1 min on an H200")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        write(
            args.out,
            "bench_lora",
            "# bench_lora\n\nskipped: no CUDA GPU is visible (this benchmark needs one).\n",
            [],
        )
        return 0
    if args.quick:
        os.environ["RECON_TRITON_AUTOTUNE"] = "0"
    import triton

    import recon_kernels as rk

    backends = ["triton"] + (["cuda"] if rk.why_unavailable("cuda", "cuda") is None else [])
    t0 = time.time()
    rows = []
    ranks = (16, 64) if args.quick else RANKS
    for T in TOKENS[:1] if args.quick else TOKENS:
        for r in ranks:
            print(f"bench_lora: T={T} r={r} ...", file=sys.stderr, flush=True)
            rows += bench_lora(T, r, args.quick, backends)
            torch.cuda.empty_cache()
    rows += bench_merge(16, args.quick, backends)
    header = gpu_header(
        "lora_linear: fused LoRA linear vs eager peft-style and the base matmul (bf16)",
        args.quick,
        [f"- wall time: {time.time() - t0:.0f} s"],
    )
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["triton"] = triton.__version__
    rows = [{**r, **meta} for r in rows]
    write(args.out, "bench_lora", markdown(header, rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
