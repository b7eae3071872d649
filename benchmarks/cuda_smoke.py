"""A small pass of every CUDA kernel, forward and backward, on odd shapes with masks.

Made for compute-sanitizer (benchmarks/sanitize_cuda.sh runs it under memcheck, racecheck
and synccheck): every kernel launches a few times on shapes that cross tile edges (partial
tiles, head dims padded inside their bucket, odd feature sizes, inputs the launchers must
copy to align), and each result is compared loosely with the float64 reference, so a kernel
that is silently wrong fails too. Exit status 1 on a mismatch.

    python benchmarks/cuda_smoke.py [--quick] [--emulate]

--quick    fewer cases (racecheck is slow)
--emulate  run on the CPU through the emulation build of the same kernels (no GPU needed;
           builds build/cuda-emu with the host compiler)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recon_kernels as rk  # noqa: E402
from recon_kernels import cuda as rkcuda  # noqa: E402
from recon_kernels import reference as R  # noqa: E402

# relative max error allowed against float64 (loose: this is a smoke test; the 2x rule
# lives in tests/)
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAILURES: list[str] = []


def rand(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def check(label: str, got, want, dtype) -> str:
    if got is None and want is None:
        return ""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    rel = err / (want.abs().max().item() + 1e-6) if want.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and rel <= TOL[dtype]
    if not ok:
        FAILURES.append(f"{label}: relative error {rel:.2e} > {TOL[dtype]:.0e}")
    return f"{rel:.1e}" + ("" if ok else "!")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_case(
    device, dtype, B, H, NQ, NK, D, mode, dropout_p: float = 0.0, *, path: str, public: bool
) -> None:
    q, k, v, do = (
        rand(*s, seed=i)
        for i, s in enumerate([(B, H, NQ, D), (B, H, NK, D), (B, H, NK, D), (B, H, NQ, D)])
    )
    g = torch.Generator().manual_seed(9)
    kpm = mask = None
    if "kpm" in mode:
        kpm = torch.rand(B, NK, generator=g) > 0.3
        kpm[0] = False  # a batch with every row fully masked
    if "mask" in mode:
        mask = torch.rand(1, H, NQ, NK, generator=g) > 0.25
    causal = "causal" in mode
    scale = D**-0.5
    drop = (dropout_p, 1234)  # the kernels draw reference.dropout_keep's mask
    ro, rl = R.attention_fwd(q, k, v, mask, kpm, scale, causal, *drop)
    rg = R.attention_bwd(do, q, k, v, ro, rl, mask, kpm, scale, causal, *drop)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    qd, kd, vd, dod = (t.to(device=device, dtype=dtype) for t in (q, k, v, do))
    out, lse = rkcuda.attention_fwd(qd, kd, vd, to(mask), to(kpm), scale, causal, *drop)
    grads = rkcuda.attention_bwd(dod, qd, kd, vd, out, lse, to(mask), to(kpm), scale, causal, *drop)
    sync(device)
    label = f"attention[{path}] {str(dtype)[6:]} {B}x{H}x{NQ}x{NK}x{D} {mode}"
    if dropout_p:
        label += f" drop={dropout_p}"
    errs = [check(f"{label} out", out, ro, dtype)]
    errs += [check(f"{label} {n}", a, b, dtype) for n, a, b in zip(("dq", "dk", "dv"), grads, rg)]
    if public:  # the registered op + autograd path, once
        qs, ks, vs = (t.clone().requires_grad_() for t in (qd, kd, vd))
        if causal:
            o = rk.causal_attention(
                qs, ks, vs, key_padding_mask=to(kpm), scale=scale, backend="cuda"
            )
        else:
            o = rk.masked_softmax_attention(
                qs, ks, vs, to(mask), key_padding_mask=to(kpm), scale=scale, backend="cuda"
            )
        o.backward(dod)
        sync(device)
        errs.append(check(f"{label} op dq", qs.grad, rg[0], dtype))
    print(f"{label:56s} {' '.join(errs)}", flush=True)


def mlp_case(device, dtype, M, C, Hd, Co, act, bias: bool, public: bool) -> None:
    x, w1, w2, dy = (
        rand(M, C, seed=0),
        rand(Hd, C, seed=1) / C**0.5,
        rand(Co, Hd, seed=2) / Hd**0.5,
        rand(M, Co, seed=3),
    )
    b1 = rand(Hd, seed=4) if bias else None
    b2 = rand(Co, seed=5) if bias else None
    ry, rh = R.conv1d_mlp_fwd(x, w1, b1, w2, b2, act)
    rg = R.conv1d_mlp_bwd(dy, x, w1, w2, rh, act, bias, bias)
    cv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    xd, w1d, b1d, w2d, b2d, dyd = map(cv, (x, w1, b1, w2, b2, dy))
    y, h = rkcuda.conv1d_mlp_fwd(xd, w1d, b1d, w2d, b2d, act)
    grads = rkcuda.conv1d_mlp_bwd(dyd, xd, w1d, w2d, h, act, bias, bias)
    sync(device)
    label = f"conv1d_mlp {str(dtype)[6:]} {M}x{C}x{Hd}x{Co} {act}"
    errs = [check(f"{label} y", y, ry, dtype), check(f"{label} h", h, rh, dtype)]
    errs += [
        check(f"{label} {n}", a, b, dtype)
        for n, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, rg)
    ]
    if public:
        xs = xd.clone().requires_grad_()
        rk.conv1d_mlp(xs, w1d, b1d, w2d, b2d, activation=act, backend="cuda").backward(dyd)
        sync(device)
        errs.append(check(f"{label} op dx", xs.grad, rg[0], dtype))
    print(f"{label:56s} {' '.join(e for e in errs if e)}", flush=True)


def lora_case(device, dtype, M, In, Out, r, scale, bias: bool, public: bool) -> None:
    x, w = rand(M, In, seed=0), rand(Out, In, seed=1) / In**0.5
    a, b, dy = rand(r, In, seed=2) / In**0.5, rand(Out, r, seed=3), rand(M, Out, seed=4)
    bs = rand(Out, seed=5) if bias else None
    ry, rxa = R.lora_linear_fwd(x, w, bs, a, b, scale)
    rg = R.lora_linear_bwd(dy, x, w, a, b, rxa, scale, True, bias)
    rm = R.merge_lora(w, a, b, scale)
    cv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    xd, wd, bsd, ad, bd, dyd = map(cv, (x, w, bs, a, b, dy))
    y, xa = rkcuda.lora_linear_fwd(xd, wd, bsd, ad, bd, scale)
    grads = rkcuda.lora_linear_bwd(dyd, xd, wd, ad, bd, xa, scale, True, bias)
    merged = rkcuda.merge_lora(wd, ad, bd, scale)
    sync(device)
    label = f"lora_linear {str(dtype)[6:]} {M}x{In}x{Out} r={r}"
    errs = [check(f"{label} y", y, ry, dtype), check(f"{label} xa", xa, rxa, dtype)]
    errs += [
        check(f"{label} {n}", g_, w_, dtype)
        for n, g_, w_ in zip(("dx", "dw", "dbias", "dA", "dB"), grads, rg)
    ]
    errs.append(check(f"{label} merge", merged, rm, dtype))
    if public:
        xs = xd.clone().requires_grad_()
        rk.lora_linear(xs, wd, bsd, ad, bd, scale, backend="cuda").backward(dyd)
        rk.merge_lora(wd, ad, bd, scale, backend="cuda")
        sync(device)
        errs.append(check(f"{label} op dx", xs.grad, rg[0], dtype))
    print(f"{label:56s} {' '.join(e for e in errs if e)}", flush=True)


def load_emulator():
    import build_cuda

    path = build_cuda.build_emulator(os.path.join(ROOT, "build", "cuda-emu"))
    spec = importlib.util.spec_from_file_location("_cuda_emu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases (for racecheck)")
    ap.add_argument("--emulate", action="store_true", help="CPU emulation of the kernels")
    args = ap.parse_args()

    if args.emulate:
        ctx = rkcuda.use_emulator(load_emulator())
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("cuda_smoke: no CUDA GPU visible (use --emulate to run on the CPU)")
            return 2
        rkcuda.extension()  # RuntimeError saying why when the extension is not built
        import contextlib

        ctx = contextlib.nullcontext()
        device = torch.device("cuda")
    public = not args.emulate and not args.quick  # the op + autograd path: full pass only
    # (B, H, Nq, Nk, D, mask mode[, dropout_p]): every head-dim bucket, partial tiles,
    # Nq != Nk, attention dropout
    attn = [
        (2, 2, 37, 45, 40, "mask_kpm"),
        (1, 2, 70, 33, 128, "causal"),
        (2, 1, 19, 77, 200, "causal_kpm"),
        (2, 2, 37, 100, 72, "causal_kpm", 0.1),
    ]
    mlp = [(37, 40, 72, 24, "gelu", True), (130, 59, 136, 33, "gelu_tanh", False)]
    lora = [(37, 48, 20, 4, 0.5, True), (130, 40, 136, 3, 2.0, False)]
    if args.quick:
        attn, mlp, lora = attn[:1] + attn[2:], mlp[:1], lora[:1]  # keeps the dropout case
    # both attention kernel families where the sm_90a ones can run (RECON_CUDA_ATTN_FWD /
    # _BWD): the emulator, or an sm_90 GPU
    paths = ["sm80"]
    if args.emulate or torch.cuda.get_device_capability(device) == (9, 0):
        paths.append("sm90")
    t0 = time.time()
    with ctx:
        for dtype in DTYPES:
            for path in paths:
                os.environ["RECON_CUDA_ATTN_FWD"] = os.environ["RECON_CUDA_ATTN_BWD"] = path
                for i, c in enumerate(attn):
                    attention_case(device, dtype, *c, path=path, public=public and i == 0)
            os.environ.pop("RECON_CUDA_ATTN_FWD")
            os.environ.pop("RECON_CUDA_ATTN_BWD")
            for i, c in enumerate(mlp):
                mlp_case(device, dtype, *c, public=public and i == 0)
            for i, c in enumerate(lora):
                lora_case(device, dtype, *c, public=public and i == 0)
    print(f"cuda_smoke: {time.time() - t0:.1f} s, {len(FAILURES)} failure(s)")
    for f in FAILURES:
        print("  FAIL", f)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
