"""Host cost of a launch: Triton's launcher, our op wrappers, torch, on tiny problems.

    python benchmarks/bench_launch.py --out DIR [--quick] [--smoke]

The H200 run had every recon-triton row of the short cases well above its kernels' time,
with a wide p20-p80 (attention forward 0.34 ms where recon-cuda took 0.16, MLP forward +
backward 2.6 ms against 0.71 for eager), the mark of a host-bound benchmark. This one
separates the pieces: each provider runs a problem so small that its GPU time is a few
microseconds, so the time per call is what the CPU spends launching it.

Rows per provider (mode):

* ``host``: CPU time per call of a batch of calls without a sync in between (the GPU
  queue holds far more launches than a batch makes, so the CPU never waits);
* ``wall``: a batch and one sync at its end, per call (host-bound: about ``host``).

Providers: ``torch add`` (one aten kernel, the baseline), ``triton empty (1 arg)``,
``triton 48 args`` (an empty kernel with our kernels' argument count: 8 pointers, 40
integers), ``triton autotuned 48 args`` (the same behind triton.autotune with 4 configs
pruned to 1, as RECON_TRITON_AUTOTUNE=0 runs ours), ``recon gemm`` (recon_kernels.triton
GEMM, 64 x 64 x 64, one launch), ``recon-<backend> attention fwd`` / ``fwd+bwd`` (the
public op, 1 x 1 x 64 x 64) and ``recon-<backend> mlp fwd+bwd`` (the public op, 64 tokens,
64 -> 128 -> 64). Times in microseconds per call: median and p20-p80 of 7 batches.
Writes DIR/bench_launch.csv and DIR/bench_launch.md. ``--smoke``: the CPU (the Triton
interpreter runs the kernels in Python: a test of the script, not a measurement).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import _common as C
import torch

NAME = "bench_launch"
BATCHES = 7
EXTRA = (("us", "us per call", ".1f"),)


def _kernels():
    """The empty Triton kernels (defined after C.setup: TRITON_INTERPRET is read at
    decoration)."""
    import triton
    import triton.language as tl

    @triton.jit
    def empty1(X):
        pass

    @triton.jit
    def empty48(
        P0, P1, P2, P3, P4, P5, P6, P7,
        i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18,
        i19, i20, i21, i22, i23, i24, i25, i26, i27, i28, i29, i30, i31, i32, i33, i34, i35,
        i36, i37, i38, i39,
        BLOCK: tl.constexpr, FLAG: tl.constexpr,
    ):  # fmt: skip
        pass

    def prune(configs, named_args, **kwargs):
        return configs[:1]

    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64, 128)],
        key=["i0", "i1", "i2"],
        prune_configs_by={"early_config_prune": prune},
    )(empty48)
    return empty1, empty48, tuned


def providers(device: str) -> dict[str, Callable[[], object] | str]:
    import recon_kernels as rk

    empty1, empty48, tuned = _kernels()
    x = torch.zeros(64, device=device)
    ptrs = [torch.zeros(16, device=device) for _ in range(8)]
    # strides and sizes of the kind our launchers pass (some divisible by 16, some not)
    ints = [(i * 37 + 64) if i % 3 else 1 for i in range(40)]
    out: dict[str, Callable[[], object] | str] = {
        "torch add": lambda: torch.add(x, 1.0),
        "triton empty (1 arg)": lambda: empty1[(1,)](x),
        "triton 48 args": lambda: empty48[(1,)](*ptrs, *ints, BLOCK=16, FLAG=True),
        "triton autotuned 48 args": lambda: tuned[(1,)](*ptrs, *ints, FLAG=True),
    }
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, grad=False):
        return torch.randn(*s, device=device, dtype=dt, generator=g).requires_grad_(grad)

    why = rk.why_unavailable("triton", device)
    if why is None:
        from recon_kernels.triton._gemm import gemm

        a, b, c = rnd(64, 64), rnd(64, 64), rnd(64, 64)
        out["recon gemm"] = lambda: gemm(a, b, c)
    else:
        out["recon gemm"] = C.unavailable(why)
    q, k, v = (rnd(1, 1, 64, 64, grad=True) for _ in range(3))
    do = rnd(1, 1, 64, 64)
    xm, w1, b1, w2, b2 = rnd(64, 64, grad=True), rnd(128, 64), rnd(128), rnd(64, 128), rnd(64)
    dy = rnd(64, 64)
    for be in ("triton", "cuda"):
        why = rk.why_unavailable(be, device)
        if why is not None:
            for what in ("attention fwd", "attention fwd+bwd", "mlp fwd+bwd"):
                out[f"recon-{be} {what}"] = C.unavailable(why)
            continue

        def att_fwd(be=be):
            with torch.no_grad():
                return rk.causal_attention(q, k, v, backend=be)

        def att_fb(be=be):
            q.grad = k.grad = v.grad = None
            rk.causal_attention(q, k, v, backend=be).backward(do)

        def mlp_fb(be=be):
            xm.grad = None
            rk.conv1d_mlp(xm, w1, b1, w2, b2, backend=be).backward(dy)

        out[f"recon-{be} attention fwd"] = att_fwd
        out[f"recon-{be} attention fwd+bwd"] = att_fb
        out[f"recon-{be} mlp fwd+bwd"] = mlp_fb
    return out


def measure(
    fn: Callable[[], object], device: str, calls: int, batches: int = BATCHES
) -> dict[str, list[float]]:
    """Per-call microseconds of each batch: host (no sync) and wall (one sync per batch)."""
    C._sync(device)
    host, wall = [], []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        C._sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6 / calls)
        wall.append((t2 - t0) * 1e6 / calls)
    return {"host": host, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    started = C.start(argv, NAME, __doc__.split("\n\n")[0])
    if started is None:
        return 0
    args, device = started
    info = C.env_info(device)
    budget = C.Budget(args.deadline_s)
    calls = 3 if args.smoke else 50 if args.quick else 200
    head = C.header(
        "Launch cost: Triton's launcher, the recon op wrappers and torch on tiny problems",
        info,
        args,
        [
            f"- microseconds per call ({BATCHES} batches of {calls} calls: median, p20-p80); "
            "host: the batch without a sync (what launching costs the CPU), wall: the batch "
            "and one sync; problems small enough that the GPU time is a few microseconds, "
            "so wall well above the kernels' time means host-bound"
        ],
    )
    rows: list[dict] = []
    for name, fn in providers(device).items():
        if budget.expired():
            rows.append(dict(case="tiny", mode="-", provider=name, status=budget.skip_status()))
            continue
        if isinstance(fn, str):
            rows += [dict(case="tiny", mode=m, provider=name, status=fn) for m in ("host", "wall")]
            continue
        try:
            fn()  # compile / autotune outside the numbers
            fn()
            per = measure(fn, device, calls, 2 if args.smoke else BATCHES)
        except Exception as e:  # noqa: BLE001  (a provider that fails is a row that says why)
            rows += [
                dict(case="tiny", mode=m, provider=name, status=f"error: {C.short_error(e)}")
                for m in ("host", "wall")
            ]
            continue
        for mode, us in per.items():
            med, p20, p80 = C.quantiles(us)
            rows.append(
                dict(
                    case="tiny",
                    mode=mode,
                    provider=name,
                    us=med,
                    # the common columns are milliseconds
                    ms=med / 1e3,
                    p20=p20 / 1e3,
                    p80=p80 / 1e3,
                    status=C.STATUS_OK,
                )
            )
        C.progress(f"{NAME}: {name}: host {C.quantiles(per['host'])[0]:.1f} us per call")
        # rewritten after every provider: a step cut by its timeout keeps what it measured
        C.write(
            args.out, NAME, head + C.table(rows, rate=None, extra=EXTRA), rows, info, quiet=True
        )
    C.write(args.out, NAME, head + C.table(rows, rate=None, extra=EXTRA), rows, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
