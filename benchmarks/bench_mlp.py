"""conv1d_mlp microbenchmark: the fused MLP kernels vs eager Linear-GELU-Linear, its
torch.compile, and cuBLASLt's fused GEMM + bias + GELU (torch._addmm_activation).

    python benchmarks/bench_mlp.py --out DIR [--quick]

bf16, tokens T in {8k, 32k} x (C, hidden) in {(768, 3072), (1024, 4096), (4096, 16384)},
forward and forward + backward (gradients of x, W1, b1, W2, b2). Timing:
``triton.testing.do_bench`` median / p20 / p80 (ms); TFLOP/s counts the GEMM flops only
(4 T C hidden forward, 3x that for forward + backward). Memory, per fwd+bwd row: MB kept
alive by the autograd graph after forward (x and h for ours; x, h and act(h) for eager)
and the peak above the inputs during forward + backward. Writes DIR/bench_mlp.csv and
DIR/bench_mlp.md and prints the markdown. Exits 0 with a message when no CUDA GPU is
visible. --quick (~1 min on an H200): T = 8k, two shapes, torch.compile on one, Triton
autotuning off (the first config that fits).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _common import write

SHAPES = ((768, 3072), (1024, 4096), (4096, 16384))
TOKENS = (8192, 32768)
QUICK_SHAPES = ((1024, 4096), (4096, 16384))
DEVICE = "cuda"  # the measured functions take it from here (a CPU dry run can patch it)


def gpu_header(title: str, quick: bool, extra: list[str]) -> list[str]:
    import triton

    import recon_kernels as rk

    cuda_ok = rk.why_unavailable("cuda", "cuda") is None
    return [
        f"# {title}",
        "",
        f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})",
        f"- torch {torch.__version__}, triton {triton.__version__}, recon_kernels {rk.__version__}",
        f"- recon backends measured: triton{', cuda' if cuda_ok else ''}",
        f"- mode: {'quick (Triton autotuning off: first config that fits)' if quick else 'full (autotuned)'}",
        *extra,
        "",
    ]


def time_ms(fn, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) ms of fn() after a warm-up call (compile / autotune excluded)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(
        fn, warmup=25 if quick else 50, rep=100 if quick else 300, quantiles=[0.5, 0.2, 0.8]
    )
    return tuple(float(m) for m in ms)


def memory_mb(forward, backward) -> tuple[float, float]:
    """(MB held by the graph after forward, peak MB above the starting point during
    forward + backward). ``forward()`` returns what ``backward(out)`` needs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - base
    backward(out)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return kept / 2**20, peak / 2**20


def fmt(v, spec=".2f") -> str:
    return format(v, spec) if isinstance(v, float) and math.isfinite(v) else "-"


# --------------------------------------------------------------------------- MLP


BOTH = ("fwd", "fwd+bwd")


def mlp_impls(shape_idx: int, quick: bool, backends: list[str]):
    """name -> (forward(x, w1, b1, w2, b2) -> y, activation label, modes, Triton dW2 strategy
    or None)."""
    import recon_kernels as rk

    def eager(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    impls = {}
    for be in backends:
        impls[f"recon-{be}"] = (
            lambda x, w1, b1, w2, b2, be=be: rk.conv1d_mlp(x, w1, b1, w2, b2, backend=be),
            "gelu",
            BOTH,
            None,
        )
    if "triton" in backends:
        # A/B of the dW2 strategy (recon_kernels/triton/mlp.py): act(h) recomputed on the dW2
        # GEMM's loads (default, the row above) or stored by the dh GEMM's epilogue
        impls["recon-triton (dW2 store)"] = (
            impls["recon-triton"][0],
            "gelu",
            ("fwd+bwd",),
            "store",
        )
    impls["eager"] = (eager, "gelu", BOTH, None)
    if not quick or shape_idx == 0:
        impls["torch.compile"] = (torch.compile(eager, dynamic=False), "gelu", BOTH, None)

    def addmm_act(x, w1, b1, w2, b2):
        # cuBLASLt epilogue: GEMM + bias + GELU in one call (its GELU is the tanh form)
        return torch.addmm(b2, torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2.t())

    impls["cublaslt-addmm-gelu"] = (addmm_act, "gelu_tanh", ("fwd",), None)
    impls["recon-triton (tanh)"] = (
        lambda x, w1, b1, w2, b2: rk.conv1d_mlp(
            x, w1, b1, w2, b2, activation="gelu_tanh", backend="triton"
        ),
        "gelu_tanh",
        ("fwd",),
        None,
    )
    return impls


def bench_mlp(T: int, C: int, H: int, shape_idx: int, quick: bool, backends) -> list[dict]:
    dev, dt = torch.device(DEVICE), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device=dev, dtype=dt, generator=g) * scale).requires_grad_()

    x = rnd(T, C)
    w1, b1 = rnd(H, C, scale=C**-0.5), rnd(H, scale=0.1)
    w2, b2 = rnd(C, H, scale=H**-0.5), rnd(C, scale=0.1)
    params = (x, w1, b1, w2, b2)
    dy = torch.randn(T, C, device=dev, dtype=dt, generator=g)
    flops_fwd = 4.0 * T * C * H
    rows = []
    for name, (fn, act, modes, strategy) in mlp_impls(shape_idx, quick, backends).items():
        for mode in modes:
            row = {"impl": name, "activation": act, "T": T, "C": C, "hidden": H, "mode": mode}
            prev = _set_dw2_strategy(strategy)
            try:
                if mode == "fwd":

                    def run(fn=fn):
                        with torch.no_grad():
                            fn(*params)

                    flops = flops_fwd
                else:

                    def run(fn=fn):
                        torch.autograd.grad(fn(*params), params, dy)

                    flops = 3 * flops_fwd
                # timing first: compilation and autotuning (with do_bench's L2-flush
                # buffer) must not count towards the memory peak
                med, p20, p80 = time_ms(run, quick)
                if mode == "fwd+bwd":
                    row["saved_mb"], row["peak_mb"] = memory_mb(
                        lambda fn=fn: fn(*params),
                        lambda y: torch.autograd.grad(y, params, dy),
                    )
                row.update(ms=med, ms_p20=p20, ms_p80=p80, tflops=flops / med * 1e-9, error="")
            except Exception as e:  # one failing row must not hide the others
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            finally:
                _set_dw2_strategy(prev)
            rows.append(row)
    return rows


def _set_dw2_strategy(strategy: str | None) -> str | None:
    """Set the Triton MLP's dW2 strategy (None: leave it); returns the one to restore."""
    if strategy is None:
        return None
    from recon_kernels.triton import mlp as triton_mlp

    return triton_mlp.set_dw2_strategy(strategy)


def markdown(header: list[str], rows: list[dict]) -> str:
    lines = [
        *header,
        "| T | C x hidden | mode | impl | act | ms median (p20-p80) | TFLOP/s | vs eager | "
        "saved after fwd MB | peak fwd+bwd MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {
        (r["T"], r["C"], r["mode"]): r["ms"]
        for r in rows
        if r["impl"] == "eager" and not r.get("error")
    }
    for r in rows:
        key = (r["T"], r["C"], r["mode"])
        if r.get("error"):
            lines.append(
                f"| {r['T']} | {r['C']} x {r['hidden']} | {r['mode']} | {r['impl']} | "
                f"{r['activation']} | {r['error']} | | | | |"
            )
            continue
        if key in eager:
            r["speedup_vs_eager"] = eager[key] / r["ms"]
        lines.append(
            f"| {r['T']} | {r['C']} x {r['hidden']} | {r['mode']} | {r['impl']} | "
            f"{r['activation']} | {r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
            f"{r['tflops']:.0f} | {fmt(r.get('speedup_vs_eager'))}x | "
            f"{fmt(r.get('saved_mb'), '.0f')} | {fmt(r.get('peak_mb'), '.0f')} |"
        )
    lines += [
        "",
        "saved after fwd: memory the autograd graph holds between forward and backward "
        "(the output y included); peak: above the inputs, during forward + backward. "
        "cublaslt-addmm-gelu uses the tanh GELU: compare it with recon-triton (tanh). "
        "recon-triton (dW2 store): the backward stores act(h) from the dh GEMM instead of "
        "recomputing it on every dW2 tile (RECON_MLP_DW2=store); the faster of the two "
        "should become the default.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_mlp.csv / bench_mlp.md")
    ap.add_argument("--quick", action="store_true", help="a subset, ~1 min on an H200")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        write(
            args.out,
            "bench_mlp",
            "# bench_mlp\n\nskipped: no CUDA GPU is visible (this benchmark needs one).\n",
            [],
        )
        return 0
    if args.quick:
        os.environ["RECON_TRITON_AUTOTUNE"] = "0"
    import triton

    import recon_kernels as rk

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backends = ["triton"] + (["cuda"] if rk.why_unavailable("cuda", "cuda") is None else [])
    t0 = time.time()
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for T in TOKENS[:1] if args.quick else TOKENS:
        for i, (C, H) in enumerate(shapes):
            print(f"bench_mlp: T={T} C={C} hidden={H} ...", file=sys.stderr, flush=True)
            rows += bench_mlp(T, C, H, i, args.quick, backends)
            torch.cuda.empty_cache()
    header = gpu_header(
        "conv1d_mlp: fused Triton MLP vs eager / torch.compile / cuBLASLt (bf16)",
        args.quick,
        [f"- wall time: {time.time() - t0:.0f} s"],
    )
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["triton"] = triton.__version__
    rows = [{**r, **meta} for r in rows]
    write(args.out, "bench_mlp", markdown(header, rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
