"""lora_linear microbenchmark: the fused LoRA linear vs eager peft-style
(base(x) + B(A(x))·s), its torch.compile, and the frozen base matmul alone; plus merge_lora.

    python benchmarks/bench_lora.py --out DIR [--quick] [--smoke] [--deadline-s S]

bf16, tokens T in {8k, 32k}, in = out = 4096, r in {8, 16, 64}, the fine-tuning case
(W and bias frozen: gradients of x, A, B). Forward and forward + backward. TFLOP/s counts
every GEMM's flops (base and rank-r); "vs base alone" is the time of the frozen base matmul
(x Wᵀ + b and its dx; a floor, not a peer) over the row's: 1.0 would mean the adapter is
free. Peers: eager peft-style and torch.compile of it. recon-triton (persistent) runs
recon-triton under RECON_GEMM_PERSISTENT=1 (one program per SM walking the tiles).
merge_lora is memory-bound: GB/s of reading W and writing the merged copy (in-place merge:
the same traffic), against eager W + s·(B @ A). Writes DIR/bench_lora.csv and
DIR/bench_lora.md (rewritten after every case) and DIR/bench_lora_profile.md (per-kernel
time of the first case's forward + backward: recon-triton, recon-cuda, eager peft-style).
--quick (the device run): T = 8k, r in {16, 64}, torch.compile on the first case, Triton
autotuning off. --smoke: tiny shapes on the CPU (script test).
"""

from __future__ import annotations

import sys

import _common as C
import torch
import torch.nn.functional as F

NAME = "bench_lora"
TOKENS = (8192, 32768)
RANKS = (8, 16, 64)
FEATURES = 4096
SCALE = 2.0
SMOKE = dict(tokens=(40,), ranks=(4,), features=24)
BASE = "base matmul alone"


def lora_flops(T: int, k: int, n: int, r: int, mode: str) -> float:
    fwd = 2.0 * T * (k * n + r * k + r * n)  # x Wᵀ, x Aᵀ, xa Bᵀ
    if mode == "fwd":
        return fwd
    # dx = dy W + (dy B) A; dy B; dA = (dy B)ᵀ x; dB = dyᵀ xa
    bwd = 2.0 * T * (n * k + r * k + n * r + r * k + n * r)
    return fwd + bwd


def base_flops(T: int, k: int, n: int, r: int, mode: str) -> float:
    return 2.0 * T * k * n * (1 if mode == "fwd" else 2)


def is_peer(p: str) -> bool:
    return not p.startswith("recon-") and p != BASE


# the A/B switches a provider runs under (around its forward and backward)
ENV = {"recon-triton (persistent)": {"RECON_GEMM_PERSISTENT": "1"}}

# kernel profiles of the first case's forward + backward (NAME_profile.md; the H200 run had
# recon-triton fwd+bwd at 0.53x peft-style while its forward was 1.05x)
PROFILED = ("recon-triton", "recon-cuda", "eager peft-style")


def bench_case(
    T: int, r: int, feats: int, compile_peer: bool, args, device, backends, profiles=None
):
    import recon_kernels as rk

    dt = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    k = n = feats

    def rnd(*s, scale=1.0, grad=True):
        t = torch.randn(*s, device=device, dtype=dt, generator=g) * scale
        return t.requires_grad_(grad)

    x = rnd(T, k)
    w, b = rnd(n, k, scale=k**-0.5, grad=False), rnd(n, scale=0.1, grad=False)
    a, bb = rnd(r, k, scale=k**-0.5), rnd(n, r, scale=r**-0.5)
    dy = torch.randn(T, n, device=device, dtype=dt, generator=g)
    with torch.no_grad():
        xf, wf, bf, af, bbf = (t.detach().float() for t in (x, w, b, a, bb))
        ref = F.linear(xf, wf, bf) + F.linear(F.linear(xf, af), bbf) * SCALE
        del xf, wf, bf, af, bbf

    def peft():
        return F.linear(x, w, b) + F.linear(F.linear(x, a), bb) * SCALE

    impls: dict = {}
    for be, why in backends.items():
        fn = (lambda be=be: rk.lora_linear(x, w, b, a, bb, SCALE, backend=be)) if not why else None
        impls[f"recon-{be}"] = (fn or C.unavailable(why), (x, a, bb), lora_flops)
    if callable(impls.get("recon-triton", (None,))[0]):
        # RECON_GEMM_PERSISTENT=1 (ENV): one program per SM walking the tiles (never timed)
        impls["recon-triton (persistent)"] = impls["recon-triton"]
    impls["eager peft-style"] = (peft, (x, a, bb), lora_flops)
    if compile_peer:
        backend = "inductor" if device == "cuda" else "eager"  # --smoke: no C++ build
        impls["torch.compile peft-style"] = (
            torch.compile(peft, dynamic=False, backend=backend),
            (x, a, bb),
            lora_flops,
        )
    else:
        why = C.unavailable("--quick: compiled on the first case only")
        impls["torch.compile peft-style"] = (why, (x, a, bb), lora_flops)
    impls[BASE] = (lambda: F.linear(x, w, b), (x,), base_flops)
    rows, base_ms = [], {}
    case = f"T{T} {k}x{n} r{r}"
    for name, (fn, inputs, flops_fn) in impls.items():
        for mode in ("fwd", "fwd+bwd"):
            row = {"case": case, "mode": mode, "provider": name, "T": T, "in": k, "out": n, "r": r}
            if isinstance(fn, str):
                rows.append({**row, "status": fn})
                continue
            with C.environ(ENV.get(name, {})):
                C.measure_row(
                    row,
                    fn,
                    inputs,
                    dy,
                    device,
                    args.quick,
                    flops_fn(T, k, n, r, mode),
                    ref=None if name == BASE else ref,
                    profiles=profiles,
                    profiled=PROFILED,
                )
            if name == BASE and C.is_ok(row):
                base_ms[mode] = row["ms"]
            rows.append(row)
    for row in rows:
        if C.is_ok(row) and row["mode"] in base_ms:
            row["base_over_ours"] = base_ms[row["mode"]] / row["ms"]
    del ref
    C.free(device)
    return rows


def bench_merge(r: int, feats: int, args, device, backends) -> list[dict]:
    import recon_kernels as rk
    from recon_kernels.ops.lora import merge_lora_

    dt = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(feats, feats, device=device, dtype=dt, generator=g)
    a = torch.randn(r, feats, device=device, dtype=dt, generator=g)
    bb = torch.randn(feats, r, device=device, dtype=dt, generator=g)
    nbytes = 2 * w.numel() * w.element_size()  # read W, write the result
    cases: dict = {}
    for be, why in backends.items():
        fn = (lambda be=be: rk.merge_lora(w, a, bb, 1e-3, backend=be)) if not why else None
        cases[f"recon-{be}"] = fn or C.unavailable(why)
    if not backends["triton"]:
        sign = [1.0]  # in place: +s then -s alternate, so W stays bounded over the repetitions

        def inplace():
            sign[0] = -sign[0]
            merge_lora_(w, a, bb, sign[0] * 1e-3, backend="triton")

        cases["recon-triton (in place)"] = inplace
    cases["eager W + s·(B @ A)"] = lambda: w + 1e-3 * (bb @ a)
    rows = []
    for name, fn in cases.items():
        row = {"case": f"merge {feats}x{feats} r{r}", "mode": "merge", "provider": name, "r": r}
        if isinstance(fn, str):
            rows.append({**row, "status": fn})
            continue
        try:
            row["ms"], row["p20"], row["p80"] = C.time_ms(fn, device, args.quick)
            row["gbps"] = nbytes / row["ms"] * 1e-6
            row["status"] = C.STATUS_OK
        except Exception as e:  # noqa: BLE001
            row["status"] = f"error: {C.short_error(e)}"
        rows.append(row)
    C.free(device)
    return rows


EXTRA = (("base_over_ours", "vs base alone", ".2f"), ("saved_mb", "saved after fwd MB", ".0f"))


def markdown(head: str, rows: list[dict]) -> str:
    lora = [r for r in rows if r["mode"] != "merge"]
    merge = [r for r in rows if r["mode"] == "merge"]
    md = head + C.table(lora, extra=EXTRA)
    if merge:
        md += "\n## merge_lora\n\n" + C.table(merge, rate=("gbps", "GB/s"))
    return md


def main(argv: list[str] | None = None) -> int:
    started = C.start(argv, NAME, __doc__.split("\n\n")[0])
    if started is None:
        return 0
    args, device = started
    import recon_kernels as rk

    backends = {b: rk.why_unavailable(b, device) for b in ("triton", "cuda")}
    info = C.env_info(device)
    notes = [
        f"- scale {SCALE}, W and bias frozen; vs base alone: the frozen base matmul's time "
        "(forward, or forward + dx) over the row's; x best peer: eager / compiled peft-style "
        "over the row; max err: forward vs float32 eager"
    ]
    head = C.header(
        "lora_linear: fused LoRA linear vs peft-style eager / torch.compile", info, args, notes
    )
    budget = C.Budget(args.deadline_s)
    if args.smoke:
        tokens, ranks, feats = SMOKE["tokens"], SMOKE["ranks"], SMOKE["features"]
    else:
        tokens = TOKENS[:1] if args.quick else TOKENS
        ranks, feats = ((16, 64) if args.quick else RANKS), FEATURES
    rows: list[dict] = []
    profiles: list[tuple[str, str]] = []
    todo = [("lora", T, r) for T in tokens for r in ranks] + [("merge", 0, ranks[0])]
    for i, (kind, T, r) in enumerate(todo):
        case = f"T{T} r{r}" if kind == "lora" else f"merge r{r}"
        if budget.expired():
            rows.append(dict(case=case, mode="-", provider="-", status=budget.skip_status()))
            continue
        C.progress(f"{NAME}: {case} ...")
        if kind == "lora":
            prof = profiles if i == 0 else None
            rows += bench_case(T, r, feats, i == 0 or not args.quick, args, device, backends, prof)
            if prof:
                C.write_profile(args.out, NAME, profiles)
        else:
            rows += bench_merge(r, feats, args, device, backends)
        C.add_peer_ratios(rows, is_peer)
        C.write(args.out, NAME, markdown(head, rows), rows, info, quiet=True)
    C.write(args.out, NAME, markdown(head, rows), rows, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
