"""Attention benchmark: recon kernels vs PyTorch SDPA backends, eager, torch.compile, flex.

    python benchmarks/bench_attention.py --out DIR [--quick] [--dry-run]

Shapes (bf16): BERT/MAE-like bidirectional with key padding (16k tokens, N=512, D=64,
H=12, padding 0/25/50%) and GPT-like causal (16k tokens, N=1k/4k/8k, D=64 (H=12) and
D=128 (H=16)), and two training cases with attention dropout 0.1 (against SDPA's
flash/efficient dropout; no error column there). Forward and forward+backward, median and p20/p80 of
``triton.testing.do_bench``, TFLOP/s on useful FLOPs (4·B·H·Nq·Nk_real·D forward, halved
for causal, x3.5 for forward+backward), peak memory above the inputs, and each provider's
max error against a float32 SDPA reference (a benchmark of a wrong kernel is worthless).
Writes DIR/bench_attention.csv and DIR/bench_attention.md and prints the markdown.
``--dry-run`` runs tiny shapes on the CPU (interpreter, wall clock) to test this script.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import write

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timer(fn: Callable[[], object], device: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if device == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=40 if quick else 100, quantiles=[0.5, 0.2, 0.8]
        )
        return med, lo, hi
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[0], ts[-1]


def shapes(quick: bool, dry: bool) -> list[dict]:
    if dry:
        return [
            dict(name="bert-pad25", N=40, D=16, H=2, B=2, causal=False, pad=0.25),
            dict(name="gpt", N=48, D=32, H=2, B=1, causal=True, pad=0.0),
            dict(name="gpt-drop10", N=48, D=32, H=2, B=1, causal=True, pad=0.0, drop=0.1),
        ]
    out = []
    for pad in (0.0, 0.25, 0.5) if not quick else (0.0, 0.5):
        out.append(
            dict(name=f"bert-pad{int(pad * 100)}", N=512, D=64, H=12, B=32, causal=False, pad=pad)
        )
    for D, H in ((64, 12), (128, 16)):
        for N in (1024, 4096, 8192) if not quick else (1024, 8192):
            out.append(
                dict(name=f"gpt-N{N}-D{D}", N=N, D=D, H=H, B=16384 // N, causal=True, pad=0.0)
            )
    # training with attention dropout (BERT / GPT-2 use 0.1): SDPA's flash and efficient
    # kernels take dropout_p too; the error column is left empty (other random numbers)
    out.append(
        dict(name="bert-pad25-drop10", N=512, D=64, H=12, B=32, causal=False, pad=0.25, drop=0.1)
    )
    if not quick:
        out.append(
            dict(
                name="gpt-N4096-D64-drop10", N=4096, D=64, H=12, B=4, causal=True, pad=0.0, drop=0.1
            )
        )
    return out


def _lengths(B: int, N: int, pad: float, device: str) -> torch.Tensor:
    """Sequence lengths with an average padding fraction ``pad`` (uniform in [N(1-2pad), N])."""
    g = torch.Generator().manual_seed(0)
    lo = max(1, int(N * (1 - 2 * pad)))
    return torch.randint(lo, N + 1, (B,), generator=g).to(device)


def providers(case: dict, device: str, kpm, bool_mask) -> dict[str, Callable]:
    """name -> fn(q, k, v) returning (B, H, N, D); only those that accept the case."""
    import recon_kernels as rk
    from recon_kernels import reference as R

    causal = case["causal"]
    p = case.get("drop", 0.0)
    out: dict[str, Callable] = {}
    for b in ("triton", "cuda"):
        if rk.why_unavailable(b, device) is None:
            if causal:
                out[f"recon-{b}"] = lambda q, k, v, b=b: rk.causal_attention(
                    q, k, v, dropout_p=p, backend=b
                )
            else:
                out[f"recon-{b}"] = lambda q, k, v, b=b: rk.masked_softmax_attention(
                    q, k, v, key_padding_mask=kpm, dropout_p=p, backend=b
                )
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, be in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):

            def f(q, k, v, be=be):
                with sdpa_kernel([be]):
                    if causal:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=p)

            out[label] = f
    eager = lambda q, k, v: R.attention(  # noqa: E731
        q, k, v, key_padding_mask=None if causal else kpm, causal=causal, dropout_p=p, seed=1
    )
    if case["N"] <= 4096 or device != "cuda":
        out["eager"] = eager
        out["compiled-eager"] = torch.compile(eager, dynamic=False)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if device == "cuda" and p == 0:  # flex_attention has no dropout
            B, N = case["B"], case["N"]
            if causal:
                mm = lambda b, h, qi, kj: kj <= qi  # noqa: E731
            else:
                kp = kpm
                mm = lambda b, h, qi, kj: kp[b, kj]  # noqa: E731
            bm = create_block_mask(mm, B, None, N, N, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            out["flex"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
    except Exception:  # flex_attention absent or unsupported here: not a provider
        pass
    return out


def _make_step(fn, q, k, v, do):
    """One timed call: forward only (do is None) or forward + backward."""
    if do is None:

        def step():
            with torch.no_grad():
                return fn(q, k, v)

    else:

        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)

    return step


def run(args) -> list[dict]:
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    rows = []
    for case in shapes(args.quick, args.dry_run):
        B, H, N, D = case["B"], case["H"], case["N"], case["D"]
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v, do = (
            torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4)
        )
        lengths = _lengths(B, N, case["pad"], device)
        kpm = torch.arange(N, device=device)[None, :] < lengths[:, None]  # (B, N) True = real
        bool_mask = kpm[:, None, None, :]  # (B, 1, 1, N) for SDPA
        real_keys = lengths.sum().item() if not case["causal"] else B * N
        fwd_flops = 4 * H * N * real_keys * D * (0.5 if case["causal"] else 1.0)
        with torch.no_grad():  # float32 reference for the error column
            qf, kf, vf = (t.float() for t in (q, k, v))
            ref = (
                F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
                if case["causal"]
                else F.scaled_dot_product_attention(qf, kf, vf, attn_mask=bool_mask)
            )
            del qf, kf, vf
        for name, fn in providers(case, device, kpm, bool_mask).items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(case=case["name"], B=B, H=H, N=N, D=D, provider=name, mode=mode)
                try:
                    qq, kk, vv = (
                        t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)
                    )
                    err = float("nan")
                    if mode == "fwd" and not case.get("drop"):
                        with torch.no_grad():
                            o = fn(qq, kk, vv)
                            err = (
                                (o.float() - ref)[kpm[:, None, :, None].expand_as(ref)]
                                .abs()
                                .max()
                                .item()
                            )
                    step = _make_step(fn, qq, kk, vv, do if mode != "fwd" else None)
                    step()  # compile / autotune outside the timing and the memory peak
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        step()
                        torch.cuda.synchronize()
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    else:
                        peak = float("nan")
                    med, lo, hi = _timer(step, device, args.quick)
                    flops = fwd_flops * (3.5 if mode != "fwd" else 1.0)
                    row.update(
                        ms=med, p20=lo, p80=hi, tflops=flops / med / 1e9, peak_mb=peak, max_err=err
                    )
                except Exception as e:  # a provider that rejects the case is reported, not fatal
                    row.update(
                        ms=float("nan"), error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    )
                rows.append(row)
                print(_fmt_row(row), flush=True)
        del q, k, v, do, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['case']} | {r['mode']} | {r['provider']} | n/a | | | | | {r['error']} |"
    err = "" if math.isnan(r["max_err"]) else f"{r['max_err']:.1e}"
    return (
        f"| {r['case']} | {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['p20']:.3f}-{r['p80']:.3f} "
        f"| {r['tflops']:.1f} | {r['peak_mb']:.0f} | {r.get('speedup', '')} | {err} |"
    )


def _add_speedups(rows: list[dict]) -> None:
    """speedup of each provider vs the best SDPA backend on the same case and mode."""
    best: dict = {}
    for r in rows:
        if r["provider"].startswith("sdpa") and not math.isnan(r.get("ms", float("nan"))):
            key = (r["case"], r["mode"])
            best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        b = best.get((r["case"], r["mode"]))
        if b and not math.isnan(r.get("ms", float("nan"))):
            r["speedup"] = f"{b / r['ms']:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run to test the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(
            "bench_attention: no CUDA GPU visible; nothing to measure (use --dry-run to test the script)"
        )
        return 0
    import triton

    os.makedirs(args.out, exist_ok=True)
    gpu = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and not args.dry_run
        else "CPU (dry run)"
    )
    header = (
        f"# Attention benchmark\n\n- GPU: {gpu}\n- torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, Python {platform.python_version()}\n"
        f"- dtype bf16; times in ms (median, p20-p80 of do_bench); TFLOP/s on useful FLOPs; "
        f"peak MB above inputs; speedup vs the best SDPA backend; max err vs float32 SDPA (forward, real rows)\n\n"
        "| case | mode | provider | ms | p20-p80 | TFLOP/s | peak MB | speedup | max err |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    print(header)
    rows = run(args)
    _add_speedups(rows)
    keys = [
        "case",
        "B",
        "H",
        "N",
        "D",
        "provider",
        "mode",
        "ms",
        "p20",
        "p80",
        "tflops",
        "peak_mb",
        "speedup",
        "max_err",
        "error",
    ]
    # the csv keeps this column order (a row lacks the columns that do not apply to it)
    rows = [{k: r[k] for k in keys if k in r} for r in rows]
    write(
        args.out,
        "bench_attention",
        header + "\n" + "\n".join(_fmt_row(r) for r in rows) + "\n",
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
