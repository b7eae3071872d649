"""Kernel-level commands: ``info``, ``check`` and ``bench``.

``python -m recon_kernels {info,check,bench}``; the ``recon`` console script
(python_models.runs.cli) registers the same subcommands through ``add_kernel_subcommands``.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from . import backends
from . import reference as R


def cmd_info(args: argparse.Namespace) -> int:
    print(backends.explain())
    return 0


# --------------------------------------------------------------------------- check


def _cases(device: str) -> list[tuple[str, Callable, Callable, list[torch.Tensor]]]:
    """(name, op(tensors, backend), reference(tensors), float64 inputs) per op."""
    import recon_kernels as rk

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B, H, NQ, NK, D = 2, 2, 37, 45, 40
    kpm = torch.rand(B, NK, generator=g) > 0.3
    kpm[0] = False  # a fully padded sequence: zero output/gradient rows
    mask = torch.rand(1, H, NQ, NK, generator=g) > 0.2
    dev = lambda t: t.to(device)  # noqa: E731
    C, HID, OUT, M, RANK = 40, 72, 24, 50, 8
    return [
        (
            "masked_softmax_attention",
            lambda t, b: rk.masked_softmax_attention(
                *t, dev(mask), key_padding_mask=dev(kpm), backend=b
            ),
            lambda t: R.attention(*t, mask=mask, key_padding_mask=kpm),
            [rnd(B, H, NQ, D), rnd(B, H, NK, D), rnd(B, H, NK, D)],
        ),
        (
            "causal_attention",
            lambda t, b: rk.causal_attention(*t, key_padding_mask=dev(kpm), backend=b),
            lambda t: R.attention(*t, key_padding_mask=kpm, causal=True),
            [rnd(B, H, NQ, D), rnd(B, H, NK, D), rnd(B, H, NK, D)],
        ),
        (
            "attention(dropout=0.3)",
            lambda t, b: _with_seed(
                lambda: rk.masked_softmax_attention(
                    *t, key_padding_mask=dev(kpm), dropout_p=0.3, backend=b
                )
            ),
            lambda t: R.attention(*t, key_padding_mask=kpm, dropout_p=0.3, seed=_drop_seed()),
            [rnd(B, H, NQ, D), rnd(B, H, NK, D), rnd(B, H, NK, D)],
        ),
        (
            "conv1d_mlp",
            lambda t, b: rk.conv1d_mlp(*t, activation="gelu", backend=b),
            lambda t: R.conv1d_mlp(*t, activation="gelu"),
            [rnd(2, M // 2, C), rnd(HID, C) / 6, rnd(HID), rnd(OUT, HID) / 8, rnd(OUT)],
        ),
        (
            "lora_linear",
            lambda t, b: rk.lora_linear(*t, 0.5, backend=b),
            lambda t: R.lora_linear(*t, 0.5),
            [rnd(M, C), rnd(OUT, C) / 6, rnd(OUT), rnd(RANK, C) / 6, rnd(OUT, RANK) / 3],
        ),
        (
            "merge_lora",
            lambda t, b: rk.merge_lora(*t, 0.5, backend=b),
            lambda t: R.merge_lora(*t, 0.5),
            [rnd(OUT, C), rnd(RANK, C), rnd(OUT, RANK)],
        ),
    ]


_CHECK_SEED = 1234


def _with_seed(fn):
    """fn() with torch's generator at _CHECK_SEED (the ops draw their dropout seed from it),
    leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_CHECK_SEED)
        return fn()


def _drop_seed() -> int:
    """The dropout seed an op draws under _with_seed."""
    return int(_with_seed(lambda: torch.randint(0, 2**32, (1,), dtype=torch.int64)).item())


def _fwd_bwd(fn, tensors, dout_seed=1):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(ts)
    g = torch.Generator().manual_seed(dout_seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    out.backward(do)
    return [out.detach()] + [t.grad for t in ts]


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.detach().double().cpu() - y.double()).abs().max().item() for x, y in zip(a, b))


def cmd_check(args: argparse.Namespace) -> int:
    """Every op x available backend vs the float64 reference: forward and all gradients.

    Pass rule (DESIGN.md section 7): error <= 2 x the eager reference's own error in the
    same dtype + a tiny atol."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [b for b in backends.BACKENDS if backends.why_unavailable(b, device) is None]
    skipped = [b for b in backends.BACKENDS if b not in names]
    dtypes = (
        [torch.float32, torch.bfloat16]
        if not args.all_dtypes
        else [torch.float32, torch.float16, torch.bfloat16]
    )
    atol = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4}
    print(f"device: {device}; backends: {', '.join(names)}")
    for b in skipped:
        # the machine-level reason first (not built / no GPU), else the device mismatch
        print(
            f"  skipped {b}: {backends.why_unavailable(b) or backends.why_unavailable(b, device)}"
        )
    header = f"{'op':26s} {'backend':8s} {'dtype':9s} {'max err':>10s} {'2x eager':>10s} {'ms':>8s}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for name, op, ref, inputs in _cases(device):
        want = _fwd_bwd(ref, inputs)
        for dtype in dtypes:
            base = _max_err(_fwd_bwd(ref, [t.to(dtype) for t in inputs]), want)
            for b in names:
                t0 = time.perf_counter()
                try:
                    got = _fwd_bwd(
                        lambda t, op=op, b=b: op(t, b), [t.to(device, dtype) for t in inputs]
                    )
                    err = _max_err(got, want)
                    ok = err <= 2 * base + atol[dtype]
                    result = "pass" if ok else "FAIL"
                except Exception as e:  # report and continue: the table is the product
                    err, ok, result = float("nan"), False, f"ERROR {type(e).__name__}: {e}"
                ms = (time.perf_counter() - t0) * 1e3
                failures += not ok
                dt = str(dtype).replace("torch.", "")
                print(f"{name:26s} {b:8s} {dt:9s} {err:10.2e} {2 * base:10.2e} {ms:8.1f}  {result}")
    if device == "cuda" and not args.no_timing:
        _timing_table()
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


def _timing_table() -> None:
    """Short GPU timing of each op per backend vs its PyTorch peer (bf16, forward+backward)."""
    import torch.nn.functional as F
    import triton.testing

    import recon_kernels as rk

    dev, dt = "cuda", torch.bfloat16
    B, H, N, D = 8, 16, 1024, 64
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    x = torch.randn(8192, 1024, device=dev, dtype=dt, requires_grad=True)
    w1, w2 = (
        torch.randn(s, device=dev, dtype=dt, requires_grad=True) * 0.02
        for s in ((4096, 1024), (1024, 4096))
    )
    w = torch.randn(1024, 1024, device=dev, dtype=dt)
    a = torch.randn(16, 1024, device=dev, dtype=dt, requires_grad=True)
    bb = torch.randn(1024, 16, device=dev, dtype=dt, requires_grad=True)
    runs = {
        "causal_attention": (
            lambda b: rk.causal_attention(q, k, v, backend=b),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ),
        "conv1d_mlp": (
            lambda b: rk.conv1d_mlp(x, w1, None, w2, None, backend=b),
            lambda: F.linear(F.gelu(F.linear(x, w1)), w2),
        ),
        "lora_linear": (
            lambda b: rk.lora_linear(x, w, None, a, bb, 2.0, backend=b),
            lambda: F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), bb),
        ),
    }
    print("\nGPU timing, bf16, forward+backward, median ms (p20-p80)")
    for name, (ours, peer) in runs.items():
        cells = []
        for label, fn in [("torch", peer)] + [
            (b, (lambda b=b, ours=ours: ours(b)))
            for b in ("triton", "cuda")
            if backends.why_unavailable(b, dev) is None
        ]:

            def step(fn=fn):
                fn().sum().backward()

            try:
                med, lo, hi = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
                cells.append(f"{label} {med:.3f} ({lo:.3f}-{hi:.3f})")
            except Exception as e:
                cells.append(f"{label} error: {type(e).__name__}")
        print(f"  {name:18s} " + " | ".join(cells))


# --------------------------------------------------------------------------- bench


def _bench_dir() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(here, "benchmarks")
    return d if os.path.isdir(d) else None


def cmd_bench(args: argparse.Namespace) -> int:
    d = _bench_dir()
    if d is None:
        print(
            "recon bench: benchmarks/ not found (it ships with the source checkout, not the wheel)"
        )
        return 2
    if not torch.cuda.is_available():
        print(
            "recon bench: no CUDA GPU visible; the benchmarks measure GPU kernels (nothing to run)"
        )
        return 0
    scripts = sorted(glob.glob(os.path.join(d, "bench_*.py")))
    if args.only:
        scripts = [
            s for s in scripts if any(o in os.path.basename(s) for o in args.only.split(","))
        ]
    os.makedirs(args.out, exist_ok=True)
    rc = 0
    for s in scripts:
        print(f"== {os.path.basename(s)}", flush=True)
        cmd = [sys.executable, s, "--out", args.out] + (["--quick"] if args.quick else [])
        rc |= subprocess.call(cmd)
    return rc


# --------------------------------------------------------------------------- parser


def add_kernel_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, device, backends available and why not")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every op x backend vs the float64 reference")
    p.add_argument("--all-dtypes", action="store_true", help="also float16")
    p.add_argument("--no-timing", action="store_true", help="skip the GPU timing table")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("bench", help="run the benchmark suite (benchmarks/bench_*.py)")
    p.add_argument("--out", default="runs/bench", help="output folder for CSV/markdown")
    p.add_argument("--quick", action="store_true", help="the short subset of every benchmark")
    p.add_argument("--only", default="", help="comma-separated substrings of script names")
    p.set_defaults(func=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m recon_kernels", description=__doc__.splitlines()[0]
    )
    sub = ap.add_subparsers(dest="command", required=True)
    add_kernel_subcommands(sub)
    args = ap.parse_args(argv)
    return args.func(args)
