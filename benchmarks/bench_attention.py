"""Attention benchmark: recon kernels vs PyTorch SDPA backends, eager, torch.compile, flex.

    python benchmarks/bench_attention.py --out DIR [--quick] [--smoke] [--deadline-s S]

Shapes (bf16): BERT/MAE-like bidirectional with key padding (16k tokens, N=512, D=64,
H=12, padding 0/25/50%), GPT-like causal (16k tokens, N=1k/4k/8k, D=64 (H=12) and
D=128 (H=16)), encoder-like dense (bidirectional, no mask: 16k tokens, N=4k/8k, D=128,
H=16, the FlashAttention-3 paper's non-causal anchors; N=4k, D=256, H=8), and training
cases with attention dropout 0.1 (against SDPA's flash/efficient dropout; no error column
there). Cases run most important first, so a time budget cuts the least important.

Providers: recon-triton, recon-cuda (when built; recon-cuda-sm80 forces the portable
kernels, RECON_CUDA_ATTN_FWD and _BWD=sm80, the A/B of the sm_90a ones;
recon-cuda-pingpong, RECON_CUDA_ATTN_PINGPONG=1, the sm_90a forward's warpgroups taking
turns at their GEMMs), recon-triton-ws (RECON_ATTN_FWD_WS=1, the Triton forward's
warp-specialised loop: dense cases at D=128 only, forward only), recon-triton-tma-off and
recon-triton-bn64 (RECON_ATTN_FWD_TMA=off, RECON_ATTN_FWD_BN=64: the forward's other A/B
switches, unmasked D=128 cases, tma-off D=256 too, forward only), recon-triton-dsplit1
(RECON_ATTN_BWD_DSPLIT=1: the D=256 backward unsplit, fwd+bwd only), recon-triton-bwd1loop
(RECON_ATTN_BWD_FAST=0: the backward without its interior loop, fwd+bwd only), recon-triton-det and
recon-cuda-det (deterministic=True, fwd+bwd only: Triton's two-kernel backward, the A/B of its atomic-dQ
one; the CUDA sm_90a backward with its dQ sums in order); peers sdpa-flash, sdpa-efficient,
sdpa-cudnn (torch.nn.attention.sdpa_kernel with one backend each), flex (compiled
flex_attention with a block mask, none in dense cases; no dropout), eager (the float
reference as written) and compiled-eager (torch.compile of it), the last two only where
N x N scores fit (N <= 4096); --quick compiles it for the first bert and the first gpt
case only.
A peer that cannot run here or rejects a case is a row "unavailable: why", never a crash.

Forward and forward+backward; TFLOP/s on useful FLOPs (4·B·H·Nq·Nk_real·D forward, halved
for causal, x3.5 for forward+backward); peak memory above the inputs; each provider's max
error against a float32 SDPA reference (a benchmark of a wrong kernel is worthless);
"x best peer" = the fastest peer's median over this row's. Writes DIR/bench_attention.csv
and DIR/bench_attention.md (rewritten after every case) and prints the markdown, and
DIR/bench_attention_profile.md: per-kernel GPU time and host time of the forward + backward
of recon-triton, recon-cuda, sdpa-cudnn and flex in the PROFILED_CASES.
``--smoke`` runs tiny shapes on the CPU (eager + Triton interpreter, wall clock).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import _common as C
import torch
import torch.nn.functional as F

NAME = "bench_attention"


def shapes(quick: bool, smoke: bool) -> list[dict]:
    """Cases, most important first."""
    if smoke:
        return [
            # crossing one Triton interpreter tile (32 x 16), kept small: the interpreter is slow
            dict(name="bert-pad25", N=33, D=16, H=1, B=2, causal=False, pad=0.25),
            dict(name="gpt-drop10", N=20, D=16, H=1, B=1, causal=True, pad=0.0, drop=0.1),
            # the dense case, where recon-triton-ws runs (head dim 128, whole key blocks)
            dict(name="enc-N128-D128", N=128, D=128, H=1, B=1, causal=False, pad=0.0, dense=True),
            # head dim 256: the backward's column split and its A/B (recon-triton-dsplit1)
            dict(name="enc-N40-D256", N=40, D=256, H=1, B=1, causal=False, pad=0.0, dense=True),
        ]

    def bert(pad, drop=0.0):
        name = f"bert-pad{int(pad * 100)}" + (f"-drop{int(drop * 100)}" if drop else "")
        return dict(name=name, N=512, D=64, H=12, B=32, causal=False, pad=pad, drop=drop)

    def gpt(N, D, drop=0.0):
        name = f"gpt-N{N}-D{D}" + (f"-drop{int(drop * 100)}" if drop else "")
        H = 12 if D == 64 else 16
        return dict(name=name, N=N, D=D, H=H, B=16384 // N, causal=True, pad=0.0, drop=drop)

    def enc(N, D):
        # bidirectional without a mask (a ViT / MAE encoder): the FlashAttention-3 paper's
        # non-causal anchors (benchmarks/results/static-sm90) and RECON_ATTN_FWD_WS's case
        H = {64: 12, 128: 16, 256: 8}[D]
        return dict(
            name=f"enc-N{N}-D{D}", N=N, D=D, H=H, B=16384 // N, causal=False, pad=0.0, dense=True
        )

    if quick:
        return [
            bert(0.25),
            gpt(1024, 64),
            gpt(8192, 128),
            enc(8192, 128),
            gpt(8192, 64),
            bert(0.0),
            gpt(1024, 128),
            bert(0.25, drop=0.1),
            bert(0.5),
            enc(4096, 256),
        ]
    out = [bert(0.25), bert(0.0), bert(0.5)]
    out += [gpt(N, D) for D in (64, 128) for N in (1024, 4096, 8192)]
    out += [enc(N, 128) for N in (4096, 8192)]
    # head dim 256 (the Triton forward's descriptor loop with 128 x 64 tiles split over two
    # warpgroups, A/B: recon-triton-tma-off)
    out += [enc(4096, 256)]
    # training with attention dropout (BERT / GPT-2 use 0.1): SDPA's flash and efficient
    # kernels take dropout_p too; the error column is left empty (other random numbers)
    out += [bert(0.25, drop=0.1), gpt(4096, 64, drop=0.1)]
    return out


def _lengths(B: int, N: int, pad: float, device: str) -> torch.Tensor:
    """Sequence lengths with an average padding fraction ``pad`` (uniform in [N(1-2pad), N])."""
    g = torch.Generator().manual_seed(0)
    lo = max(1, int(N * (1 - 2 * pad)))
    return torch.randint(lo, N + 1, (B,), generator=g).to(device)


def providers(
    case: dict, device: str, kpm, bool_mask, compile_peer: bool = True
) -> dict[str, Callable | str]:
    """name -> fn(q, k, v) returning (B, H, N, D), or "unavailable: why" / "skipped: why"."""
    import recon_kernels as rk
    from recon_kernels import reference as R

    causal = case["causal"]
    p = case.get("drop", 0.0)
    out: dict[str, Callable | str] = {}

    def recon(b: str, deterministic: bool = False) -> Callable | str:
        why = rk.why_unavailable(b, device)
        if why is not None:
            return C.unavailable(why)
        if causal:
            return lambda q, k, v: rk.causal_attention(
                q, k, v, dropout_p=p, backend=b, deterministic=deterministic
            )
        return lambda q, k, v: rk.masked_softmax_attention(
            q, k, v, key_padding_mask=kpm, dropout_p=p, backend=b, deterministic=deterministic
        )

    for b in ("triton", "cuda"):
        out[f"recon-{b}"] = recon(b)

    def recon_under(b: str, env: dict[str, str]) -> Callable | str:
        """recon-<b> run with the A/B switches ``env`` set around each timed step."""
        why = rk.why_unavailable(b, device)
        if why is not None:
            return C.unavailable(why)

        def f(q, k, v):
            return out[f"recon-{b}"](q, k, v)

        f.env = env
        return f

    # recon-cuda-sm80: the portable CUDA kernels forced (RECON_CUDA_ATTN_FWD and _BWD=sm80)
    # beside recon-cuda (auto: the sm_90a ones on Hopper), the A/B of csrc/attention_*_sm90.cu
    # (the variables are read at every call, forward and backward alike)
    out["recon-cuda-sm80"] = recon_under(
        "cuda", {"RECON_CUDA_ATTN_FWD": "sm80", "RECON_CUDA_ATTN_BWD": "sm80"}
    )
    # recon-cuda-pingpong: the sm_90a forward's consumer warpgroups taking turns at their
    # GEMMs (RECON_CUDA_ATTN_PINGPONG=1), the A/B of FlashAttention-3's schedule. (The lazy
    # rescaling A/B, RECON_CUDA_ATTN_LAZY=0, ran on the H200: no measurable difference.)
    out["recon-cuda-pingpong"] = recon_under("cuda", {"RECON_CUDA_ATTN_PINGPONG": "1"})
    if os.environ.get("RECON_GATE_PINGPONG") == "off" and callable(out["recon-cuda-pingpong"]):
        out["recon-cuda-pingpong"] = C.unavailable(
            "turned off by the device gate (benchmarks/sm90_gate.py: its pp probe failed)"
        )
    # recon-triton-ws: the Triton forward's warp-specialised loop (RECON_ATTN_FWD_WS=1: a
    # TMA producer warpgroup, two consumers, USETMAXREG), which the launcher takes only
    # without causality, masks or dropout, at head dim 128 with whole key blocks
    ws_case = not causal and kpm is None and not p and case["D"] == 128 and case["N"] % 128 == 0
    if not ws_case:
        out["recon-triton-ws"] = C.skipped(
            "RECON_ATTN_FWD_WS=1 changes only non-causal, unmasked forwards at head dim 128 "
            "(here recon-triton's kernel)"
        )
    elif os.environ.get("RECON_GATE_TRITON_WS") == "off":
        out["recon-triton-ws"] = C.unavailable(
            "turned off by the device gate (benchmarks/sm90_gate.py: its tws probe failed)"
        )
    else:
        out["recon-triton-ws"] = recon_under("triton", {"RECON_ATTN_FWD_WS": "1"})
        out["recon-triton-ws"].modes = ("fwd",)
    # the Triton forward's other A/B switches (never timed on a GPU; forward only: they
    # change nothing in the backward): K/V by cp.async pointers instead of device-side TMA
    # descriptors (head dim 128 and 256, where "auto" takes descriptors), and 128 x 64
    # tiles before 128 x 128 (head dim 128)
    for label, env, dims in (
        ("recon-triton-tma-off", {"RECON_ATTN_FWD_TMA": "off"}, (128, 256)),
        ("recon-triton-bn64", {"RECON_ATTN_FWD_BN": "64"}, (128,)),
    ):
        if case["D"] not in dims or kpm is not None or p:
            where = " and ".join(str(d) for d in dims)
            out[label] = C.skipped(
                f"{next(iter(env))}={next(iter(env.values()))}: timed at head dim {where} "
                "without masks or dropout only"
            )
        else:
            out[label] = recon_under("triton", env)
            out[label].modes = ("fwd",)

    def backward_switch(env: dict[str, str], skip: str | None) -> Callable | str:
        """recon-triton under a backward A/B switch, fwd+bwd only (skip: why not here)."""
        if skip is not None:
            return C.skipped(skip)
        fn = recon_under("triton", env)
        if callable(fn):
            fn.modes = ("fwd+bwd",)
            fn.skip_why = "skipped: a backward switch (the forward is recon-triton's)"
        return fn

    # recon-triton-dsplit1: the Triton backward at head dim 256 without its column split
    # (RECON_ATTN_BWD_DSPLIT=1: 32 x 32 mma.sync tiles, rows replicated)
    out["recon-triton-dsplit1"] = backward_switch(
        {"RECON_ATTN_BWD_DSPLIT": "1"},
        None
        if case["D"] == 256
        else "RECON_ATTN_BWD_DSPLIT=1 changes the backward at head dim 256 only",
    )
    # recon-triton-bwd1loop: the Triton backward with one tested loop (RECON_ATTN_BWD_FAST=0,
    # no interior loop without load masks or tests), where that loop runs many blocks
    out["recon-triton-bwd1loop"] = backward_switch(
        {"RECON_ATTN_BWD_FAST": "0"},
        None
        if case["D"] in (64, 128, 256) and case["N"] >= 128
        else "RECON_ATTN_BWD_FAST=0: timed at head dims 64, 128, 256 and N >= 128 only",
    )
    # recon-<b>-det: deterministic=True (triton: the two-kernel backward; cuda: the sm_90a
    # backward with its dQ sums in order), fwd+bwd only, the A/B of recon-<b>'s backward
    for b in ("triton", "cuda"):
        out[f"recon-{b}-det"] = recon(b, deterministic=True)
    # the same peers on every device: on the CPU (--smoke) the SDPA backends that do not
    # exist there and flex's compiled kernel exercise the "unavailable: why" path
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        out["sdpa"] = C.unavailable(e)
    else:
        sdpa = [
            ("sdpa-flash", "FLASH_ATTENTION"),
            ("sdpa-efficient", "EFFICIENT_ATTENTION"),
            ("sdpa-cudnn", "CUDNN_ATTENTION"),
        ]
        for label, be_name in sdpa:
            be = getattr(SDPBackend, be_name, None)
            if be is None:
                out[label] = C.unavailable(f"torch {torch.__version__} has no SDPBackend.{be_name}")
                continue

            def f(q, k, v, be=be):
                with sdpa_kernel([be]):
                    if causal:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=p)

            out[label] = f
    if p:
        out["flex"] = C.unavailable("flex_attention has no dropout")
    else:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            B, N = case["B"], case["N"]
            if causal:
                mm = lambda b, h, qi, kj: kj <= qi  # noqa: E731
            elif kpm is not None:
                kp = kpm
                mm = lambda b, h, qi, kj: kp[b, kj]  # noqa: E731
            else:
                mm = None  # dense: no block mask
            bm = create_block_mask(mm, B, None, N, N, device=device) if mm is not None else None
            # compiled on the GPU (its real kernel); --smoke: the eager path, no C++ build
            flex = (
                torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
            )
            out["flex"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
        except Exception as e:  # noqa: BLE001  (absent or unsupported here: a row that says so)
            out["flex"] = C.unavailable(e)

    def eager(q, k, v):
        return R.attention(
            q, k, v, key_padding_mask=None if causal else kpm, causal=causal, dropout_p=p, seed=1
        )

    if case["N"] <= 4096 or device != "cuda":
        out["eager"] = eager
        if not compile_peer:
            out["compiled-eager"] = C.skipped("--quick: compiled on the first bert and gpt cases")
            return out
        # --smoke: dynamo's trace without inductor's C++ build (the script path, in seconds)
        out["compiled-eager"] = torch.compile(
            eager, dynamic=False, backend="inductor" if device == "cuda" else "eager"
        )
    else:
        why = f"N={case['N']} > 4096: the N x N scores do not fit the time budget"
        out["eager"] = out["compiled-eager"] = C.skipped(why)
    return out


def _provider_env(fn):
    """The environment a provider runs under (its ``env`` attribute: the A/B switches,
    read by the launchers at every forward and backward call), restored afterwards."""
    return C.environ(getattr(fn, "env", {}))


def _make_step(fn, q, k, v, do):
    """One timed call: forward only (do is None) or forward + backward."""
    if do is None:

        def step():
            with torch.no_grad(), _provider_env(fn):
                return fn(q, k, v)

    else:

        def step():
            q.grad = k.grad = v.grad = None
            with _provider_env(fn):
                fn(q, k, v).backward(do)

    return step


# kernel profiles (NAME_profile.md) of these providers' forward + backward in these cases:
# where the time goes and whether it is host-bound (the H200 run had every recon-triton row
# of the short cases at 0.3-0.4 ms forward with a wide p20-p80, against 0.12-0.16 ms for
# cuDNN and recon-cuda)
PROFILED = ("recon-triton", "recon-cuda", "sdpa-cudnn", "flex")
PROFILED_CASES = ("bert-pad25", "gpt-N1024-D64", "gpt-N8192-D128")


def bench_case(
    case: dict,
    device: str,
    dtype: torch.dtype,
    quick: bool,
    compile_peer: bool = True,
    profiles: list[tuple[str, str]] | None = None,
) -> list[dict]:
    """Rows of every provider and mode; with ``profiles``, the PROFILED providers' forward +
    backward kernel profiles are appended there."""
    B, H, N, D = case["B"], case["H"], case["N"], case["D"]
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v, do = (
        torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4)
    )
    lengths = _lengths(B, N, case["pad"], device)
    real = torch.arange(N, device=device)[None, :] < lengths[:, None]  # (B, N) True = real
    # dense cases (enc-*): no mask at all (every provider runs its unmasked kernel)
    kpm = None if case.get("dense") else real
    bool_mask = None if kpm is None else kpm[:, None, None, :]  # (B, 1, 1, N) for SDPA
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
    real_rows = real[:, None, :, None].expand_as(ref)
    rows: list[dict] = []
    failed: dict[str, str] = {}
    for name, fn in providers(case, device, kpm, bool_mask, compile_peer).items():
        for mode in ("fwd", "fwd+bwd"):
            row = dict(case=case["name"], mode=mode, provider=name, B=B, H=H, N=N, D=D)
            if isinstance(fn, str):
                rows.append({**row, "status": fn})
                continue
            if mode == "fwd" and name.endswith("-det"):
                rows.append({**row, "status": f"skipped: {name[:-4]}'s forward (same kernel)"})
                continue
            if mode not in getattr(fn, "modes", (mode,)):
                why = "skipped: a forward switch (the backward is recon-triton's)"
                rows.append({**row, "status": getattr(fn, "skip_why", why)})
                continue
            if mode != "fwd" and name in failed:  # do not pay a failing compile twice
                rows.append({**row, "status": failed[name] + " (as in fwd)"})
                continue
            try:
                qq, kk, vv = (t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v))
                if mode == "fwd" and not case.get("drop"):
                    with torch.no_grad(), _provider_env(fn):
                        o = fn(qq, kk, vv)
                        row["max_err"] = (o.float() - ref)[real_rows].abs().max().item()
                        del o
                step = _make_step(fn, qq, kk, vv, do if mode != "fwd" else None)
                if device == "cuda":
                    step()  # compile / autotune outside the memory peak and the timing
                    _, row["peak_mb"] = C.memory_mb(step, None, device)
                row["ms"], row["p20"], row["p80"] = C.time_ms(step, device, quick)
                if profiles is not None and mode == "fwd+bwd" and name in PROFILED:
                    profiles.append(
                        (f"{case['name']} {mode} {name}", C.kernel_profile(step, device))
                    )
                flops = fwd_flops * (3.5 if mode != "fwd" else 1.0)
                row["tflops"] = flops / row["ms"] / 1e9
                row["status"] = C.STATUS_OK
            except Exception as e:  # noqa: BLE001  (a provider that rejects the case is a row)
                ours = name.startswith("recon-")
                row["status"] = f"error: {C.short_error(e)}" if ours else C.unavailable(e)
                failed[name] = row["status"]
            rows.append(row)
    del q, k, v, do, ref
    C.free(device)
    return rows


def main(argv=None) -> int:
    started = C.start(argv, NAME, __doc__.splitlines()[0])
    if started is None:
        return 0
    args, device = started
    dtype = torch.float32 if args.smoke else torch.bfloat16
    info = C.env_info(device)
    budget = C.Budget(args.deadline_s)
    head = C.header(
        f"Attention: recon kernels vs SDPA (flash, efficient, cuDNN), flex_attention, eager, torch.compile ({str(dtype).replace('torch.', '')})",
        info,
        args,
        [
            "- TFLOP/s on useful FLOPs; peak MB above the inputs; x best peer: the fastest "
            "non-recon provider's median over this row's; max err vs float32 SDPA (forward, real rows)"
        ],
    )
    rows: list[dict] = []
    profiles: list[tuple[str, str]] = []
    families: set[str] = set()
    for case in shapes(args.quick, args.smoke):
        family = case["name"].split("-")[0]
        compile_peer = not args.quick or family not in families  # first bert, first gpt
        families.add(family)
        if budget.expired():
            rows.append(
                dict(case=case["name"], mode="-", provider="-", status=budget.skip_status())
            )
            continue
        C.progress(f"{NAME}: {case['name']} ...")
        prof = profiles if case["name"] in PROFILED_CASES else None
        rows += bench_case(case, device, dtype, args.quick, compile_peer, prof)
        if profiles:
            C.write_profile(args.out, NAME, profiles)
        C.add_peer_ratios(rows, lambda p: not p.startswith("recon-"))
        C.write(args.out, NAME, head + C.table(rows), rows, info, quiet=True)
    C.write(args.out, NAME, head + C.table(rows), rows, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
