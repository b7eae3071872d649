"""conv1d_mlp microbenchmark: the fused MLP kernels vs eager Linear-GELU-Linear, its
torch.compile, and cuBLASLt's fused GEMM + bias + GELU (torch._addmm_activation).

    python benchmarks/bench_mlp.py --out DIR [--quick] [--smoke] [--deadline-s S]

bf16, tokens T in {8k, 32k} x (C, hidden) in {(768, 3072), (1024, 4096), (4096, 16384)},
forward and forward + backward (gradients of x, W1, b1, W2, b2). Two cases per shape:

- ``gelu`` (exact erf): recon-triton, recon-cuda (when built), recon-triton (dW2 recompute)
  (the backward recomputes act(h) on every dW2 tile instead of storing it from the dh GEMM,
  the default), recon-triton (persistent) (RECON_GEMM_PERSISTENT=1: one program per SM
  walking the tiles), against eager and torch.compile of eager;
- ``gelu_tanh``: recon-* with the tanh GELU against eager and cuBLASLt's
  GEMM + bias + GELU epilogue (``torch._addmm_activation(use_gelu=True)``, whose GELU is
  the tanh form; forward only: autograd has no derivative for it).

TFLOP/s counts the GEMM flops only (4 T C hidden forward, 3x that for forward + backward).
Memory, per fwd+bwd row: MB kept alive by the autograd graph after forward and the peak
above the inputs during forward + backward. Writes DIR/bench_mlp.csv and DIR/bench_mlp.md
(rewritten after every case), and DIR/bench_mlp_profile.md: per-kernel GPU time of the
first case's forward + backward (recon-triton, recon-cuda, eager). --quick (the device
run): T = 8k, two shapes, torch.compile on the first, Triton autotuning off. --smoke: tiny
shapes on the CPU (script test).
"""

from __future__ import annotations

import sys

import _common as C
import torch
import torch.nn.functional as F

NAME = "bench_mlp"
SHAPES = ((768, 3072), (1024, 4096), (4096, 16384))
TOKENS = (8192, 32768)
QUICK_SHAPES = ((1024, 4096), (4096, 16384))
SMOKE = dict(tokens=(40,), shapes=((24, 48),))


def mlp_flops(T: int, C_: int, H: int, mode: str) -> float:
    return 4.0 * T * C_ * H * (1 if mode == "fwd" else 3)


def _set_dw2_strategy(strategy: str | None) -> str | None:
    """Set the Triton MLP's dW2 strategy (None: leave it); returns the one to restore."""
    if strategy is None:
        return None
    from recon_kernels.triton import mlp as triton_mlp

    return triton_mlp.set_dw2_strategy(strategy)


def providers(act: str, compile_peer: bool, device: str, backends: dict[str, str | None]):
    """name -> (fn(x, w1, b1, w2, b2) | "unavailable: why", modes, Triton dW2 strategy)."""
    import recon_kernels as rk
    from recon_kernels.reference import apply_activation

    both = ("fwd", "fwd+bwd")
    out = {}
    for be, why in backends.items():
        out[f"recon-{be}"] = (
            C.unavailable(why)
            if why
            else lambda x, w1, b1, w2, b2, be=be: rk.conv1d_mlp(
                x, w1, b1, w2, b2, activation=act, backend=be
            ),
            both,
            None,
        )
    if act == "gelu" and not backends["triton"]:
        out["recon-triton (dW2 recompute)"] = (out["recon-triton"][0], ("fwd+bwd",), "recompute")
        # RECON_GEMM_PERSISTENT=1 (ENV): one program per SM walking the tiles (never timed)
        out["recon-triton (persistent)"] = (out["recon-triton"][0], both, None)

    def eager(x, w1, b1, w2, b2):
        return F.linear(apply_activation(F.linear(x, w1, b1), act), w2, b2)

    out["eager"] = (eager, both, None)
    if act == "gelu":
        if compile_peer:
            backend = "inductor" if device == "cuda" else "eager"  # --smoke: no C++ build
            out["torch.compile"] = (
                torch.compile(eager, dynamic=False, backend=backend),
                both,
                None,
            )
        else:
            out["torch.compile"] = (
                C.unavailable("--quick: compiled on the first shape only"),
                both,
                None,
            )
    else:

        def addmm_act(x, w1, b1, w2, b2):
            # cuBLASLt epilogue: GEMM + bias + GELU (tanh form) in one call
            return torch.addmm(b2, torch._addmm_activation(b1, x, w1.t(), use_gelu=True), w2.t())

        ok = hasattr(torch, "_addmm_activation")
        why = f"torch {torch.__version__} has no torch._addmm_activation"
        # forward only: autograd has no derivative for aten::_addmm_activation
        out["cublaslt-addmm-gelu"] = (addmm_act if ok else C.unavailable(why), ("fwd",), None)
    return out


# the A/B switches a provider runs under (around its forward and backward)
ENV = {"recon-triton (persistent)": {"RECON_GEMM_PERSISTENT": "1"}}

# kernel profiles of the first case's forward + backward (NAME_profile.md): where the time
# of these providers goes (the H200 run had recon-triton fwd+bwd at 0.27x eager there)
PROFILED = ("recon-triton", "recon-cuda", "eager")


def bench_case(
    T: int, C_: int, H: int, act: str, first: bool, args, device, backends, profiles=None
) -> list[dict]:
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device=device, dtype=dt, generator=g) * scale).requires_grad_()

    x = rnd(T, C_)
    w1, b1 = rnd(H, C_, scale=C_**-0.5), rnd(H, scale=0.1)
    w2, b2 = rnd(C_, H, scale=H**-0.5), rnd(C_, scale=0.1)
    params = (x, w1, b1, w2, b2)
    dy = torch.randn(T, C_, device=device, dtype=dt, generator=g)
    case = f"T{T} C{C_}x{H} {act}"
    with torch.no_grad():  # float32 reference for the error column (forward rows)
        from recon_kernels.reference import apply_activation

        f32 = [t.detach().float() for t in params]
        ref = F.linear(apply_activation(F.linear(f32[0], f32[1], f32[2]), act), f32[3], f32[4])
        del f32
    compile_peer = first or not args.quick
    rows = []
    for name, (fn, modes, strategy) in providers(act, compile_peer, device, backends).items():
        for mode in modes:
            row = {"case": case, "mode": mode, "provider": name, "T": T, "C": C_, "hidden": H}
            row["activation"] = act
            if isinstance(fn, str):
                rows.append({**row, "status": fn})
                continue
            prev = _set_dw2_strategy(strategy)
            try:
                with C.environ(ENV.get(name, {})):
                    C.measure_row(
                        row,
                        lambda fn=fn: fn(*params),
                        params,
                        dy,
                        device,
                        args.quick,
                        mlp_flops(T, C_, H, mode),
                        ref=ref,
                        profiles=profiles,
                        profiled=PROFILED,
                    )
            finally:
                _set_dw2_strategy(prev)
            rows.append(row)
    del ref
    C.free(device)
    return rows


EXTRA = (("saved_mb", "saved after fwd MB", ".0f"),)
NOTES = [
    "- max err: forward vs float32 eager; TFLOP/s: GEMM flops only (4 T C hidden forward, x3 forward+backward); peak MB: above "
    "the inputs during forward+backward; x best peer: fastest non-recon provider of the same "
    "case and mode over this row. cublaslt-addmm-gelu uses the tanh GELU: it is a peer in the "
    "gelu_tanh cases only. recon-triton (dW2 recompute): RECON_MLP_DW2=recompute, the A/B of "
    'the default "store" (act(h) evaluated on the dW2 GEMM\'s loads instead of stored by the dh GEMM).'
]


def main(argv: list[str] | None = None) -> int:
    started = C.start(argv, NAME, __doc__.split("\n\n")[0])
    if started is None:
        return 0
    args, device = started
    import recon_kernels as rk

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    backends = {b: rk.why_unavailable(b, device) for b in ("triton", "cuda")}
    info = C.env_info(device)
    head = C.header("conv1d_mlp: fused MLP vs eager / torch.compile / cuBLASLt", info, args, NOTES)
    budget = C.Budget(args.deadline_s)
    if args.smoke:
        tokens, shapes = SMOKE["tokens"], SMOKE["shapes"]
    else:
        tokens = TOKENS[:1] if args.quick else TOKENS
        shapes = QUICK_SHAPES if args.quick else SHAPES
    rows: list[dict] = []
    profiles: list[tuple[str, str]] = []
    first = True
    for T in tokens:
        for C_, H in shapes:
            for act in ("gelu", "gelu_tanh"):
                case = f"T{T} C{C_}x{H} {act}"
                if budget.expired():
                    rows.append(
                        dict(case=case, mode="-", provider="-", status=budget.skip_status())
                    )
                    continue
                C.progress(f"{NAME}: {case} ...")
                prof = profiles if first and act == "gelu" else None
                rows += bench_case(T, C_, H, act, first, args, device, backends, prof)
                if prof:
                    C.write_profile(args.out, NAME, profiles)
                C.add_peer_ratios(rows, lambda p: not p.startswith("recon-"))
                C.write(args.out, NAME, head + C.table(rows, extra=EXTRA), rows, info, quiet=True)
            first = False
    C.write(args.out, NAME, head + C.table(rows, extra=EXTRA), rows, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
