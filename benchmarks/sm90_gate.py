"""Gate of the device run: the sm_90a CUDA attention kernels, probed before any step uses them.

    python benchmarks/sm90_gate.py --env-file runs/device/gate.env [--probe-timeout 25]

Those kernels (csrc/attention_{fwd,bwd}_sm90.cu) are checked in CI by the emulator only; a
first real run may hang (an mbarrier phase, a named barrier, the deterministic backward's
turns) or compute garbage. Each probe runs in its own process under a hard timeout:

* ``fwd``: the forward (RECON_CUDA_ATTN_FWD=sm90) on small odd shapes, plain and
  causal + key padding, D = 64 and 128, against the float64 reference;
* ``bwd``: the backward (RECON_CUDA_ATTN_BWD=sm90, deterministic=False) from the reference
  out / lse, every gradient against the float64 reference;
* ``det``: the same with deterministic=True, twice: bit-identical, and right;
* ``pp``: the forward with its pingpong schedule (RECON_CUDA_ATTN_PINGPONG=1);
* ``tws``: the Triton forward's warp-specialised loop (RECON_ATTN_FWD_WS=1, never run on
  a GPU before: tl.range(warp_specialize=True) with device descriptors), dense D = 128.

A probe that hangs or fails turns its kernel off for the rest of the run: --env-file gets
``export RECON_CUDA_ATTN_FWD=sm80`` (fwd) or ``..._BWD=sm80`` (bwd, det), which
device_check.sh sources before every later step, so the benches and tests still report the
portable CUDA kernels and Triton instead of timing out one after another; a failed ``pp``
exports ``RECON_GATE_PINGPONG=off`` (bench_attention then skips recon-cuda-pingpong), a failed
``tws`` ``RECON_GATE_TRITON_WS=off`` (the same for recon-triton-ws). Nothing is
written when every probe passes or the gate does not apply (no Hopper GPU, no sm_90a build).
Exit status 0 either way: the gate's lines say what happened.

RECON_GATE_STUB="fwd=ok,bwd=hang,det=fail" replaces the probes (tests of the gate itself).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# probe -> the variable that selects its kernel (set to sm90 by the probe, sm80 when it fails)
GATES = {
    "fwd": "RECON_CUDA_ATTN_FWD",
    "bwd": "RECON_CUDA_ATTN_BWD",
    "det": "RECON_CUDA_ATTN_BWD",
    "pp": "RECON_GATE_PINGPONG",
    "tws": "RECON_GATE_TRITON_WS",
}
OFF = {"pp": "off", "tws": "off"}  # the value that turns a probe's kernel off (default sm80)
PROBES = tuple(GATES)
# (B, H, Nq, Nk, D, causal, key padding): odd lengths, a partial last tile, both head dims
SHAPES = ((2, 3, 333, 333, 64, False, False), (1, 2, 200, 257, 128, True, True))
# tws: where the launcher takes the warp-specialised loop (dense, D = 128, Nk a multiple of
# 128), with a partial last query block and several key blocks
WS_SHAPES = ((2, 3, 333, 384, 128, False, False), (1, 2, 128, 1024, 128, False, False))
# max |kernel - float64 reference| / max |reference| (bf16: a right kernel is near 2^-8)
TOL = {"out": 2e-2, "grad": 5e-2}


def _stub(name: str) -> int | None:
    spec = os.environ.get("RECON_GATE_STUB")
    if not spec:
        return None
    want = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    what = want.get(name, "ok")
    if what == "hang":
        time.sleep(3600)
    if what == "fail":
        print(f"{name}: stub failure")
        return 1
    return 0


def _inputs(shape, seed: int, device: str):
    import torch

    B, H, NQ, NK, D, causal, padded = shape
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(torch.bfloat16).to(device)

    q, k, v, do = rnd(B, H, NQ, D), rnd(B, H, NK, D), rnd(B, H, NK, D), rnd(B, H, NQ, D)
    kpm = None
    if padded:
        kpm = torch.ones(B, NK, dtype=torch.bool)
        kpm[:, NK - NK // 3 :] = False
        kpm = kpm.to(device)
    return q, k, v, do, kpm, causal, D**-0.5


def _rel(name: str, got, ref, tol: float) -> str | None:
    err = (got.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    if not err / scale <= tol:  # (NaN fails too)
        return f"{name}: max error {err:.3g} = {err / scale:.3g} of max |ref| (tolerance {tol})"
    return None


def probe(name: str, emulator=None, device: str = "cuda") -> int:
    """Run one probe in this process: 0 if right, 1 (and why) if not. emulator: the CPU
    emulation module of the extension (tests: the probe itself checked without a GPU);
    device: where ``tws`` runs (tests: "cpu", the Triton interpreter)."""
    stub = _stub(name)
    if stub is not None:
        return stub
    if name == "tws":
        os.environ["RECON_ATTN_FWD_WS"] = "1"
        return _probe_triton_ws(device)
    from recon_kernels import cuda as rkcuda

    if name == "pp":
        os.environ["RECON_CUDA_ATTN_FWD"] = "sm90"
        os.environ["RECON_CUDA_ATTN_PINGPONG"] = "1"
    else:
        os.environ[GATES[name]] = "sm90"
    if emulator is None:
        return _probe(name, "cuda")
    with rkcuda.use_emulator(emulator):
        return _probe(name, "cpu")


def _probe(name: str, device: str) -> int:
    import torch

    from recon_kernels import cuda as rkcuda
    from recon_kernels import reference as R

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    problems = []
    for i, shape in enumerate(SHAPES):
        q, k, v, do, kpm, causal, scale = _inputs(shape, i, device)
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = R.attention_fwd(q64, k64, v64, None, kpm, scale, causal)
        tag = (
            "x".join(map(str, shape[:5]))
            + (" causal" if causal else "")
            + (" kpm" if kpm is not None else "")
        )
        if name in ("fwd", "pp"):
            out, lse = rkcuda.attention_fwd(q, k, v, None, kpm, scale, causal)
            sync()
            problems.append(_rel(f"{tag} out", out, ref_out.detach(), TOL["out"]))
            continue
        ref = R.attention(q64, k64, v64, None, kpm, scale, causal)
        ref_g = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        out_c, lse_c = ref_out.detach().to(q.dtype), ref_lse.detach().float()
        runs = 2 if name == "det" else 1
        grads = [
            rkcuda.attention_bwd(
                do, q, k, v, out_c, lse_c, None, kpm, scale, causal, deterministic=name == "det"
            )
            for _ in range(runs)
        ]
        sync()
        for gname, a, b in zip(("dq", "dk", "dv"), grads[0], ref_g):
            problems.append(_rel(f"{tag} {gname}", a, b, TOL["grad"]))
        if runs == 2 and not all(torch.equal(a, b) for a, b in zip(*grads)):
            problems.append(f"{tag}: two deterministic runs differ")
    problems = [p for p in problems if p]
    for p in problems:
        print(f"{name}: {p}")
    return 1 if problems else 0


def _probe_triton_ws(device: str) -> int:
    import torch

    from recon_kernels import reference as R
    from recon_kernels.triton import attention as tri

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    problems = []
    for i, shape in enumerate(WS_SHAPES):
        q, k, v, _, kpm, causal, scale = _inputs(shape, 10 + i, device)
        ref_out, _ = R.attention_fwd(*(t.double() for t in (q, k, v)), None, kpm, scale, causal)
        out, _ = tri.attention_fwd(q, k, v, None, kpm, scale, causal)
        sync()
        problems.append(_rel("x".join(map(str, shape[:5])) + " out", out, ref_out, TOL["out"]))
    problems = [p for p in problems if p]
    for p in problems:
        print(f"tws: {p}")
    return 1 if problems else 0


def applies() -> str | None:
    """None when the gate applies (an sm_90 GPU and an extension that runs the sm_90a kernels
    there), else why not."""
    if os.environ.get("RECON_GATE_STUB"):
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if torch.cuda.get_device_capability()[0] != 9:
        return f"not an sm_90 GPU ({torch.cuda.get_device_name()})"
    import recon_kernels as rk
    from recon_kernels import cuda as rkcuda

    why = rk.why_unavailable("cuda", "cuda")
    if why is not None:
        return f"the CUDA extension is unavailable: {why}"
    t = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16, device="cuda")
    os.environ.pop("RECON_CUDA_ATTN_FWD", None)
    choice = rkcuda.attention.fwd_choice(t, t, t)
    return None if choice == "sm90" else f"auto does not pick the sm_90a forward ({choice})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-file", help="where to write the exports that turn failed kernels off")
    ap.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)  # (internal: one probe)
    ap.add_argument("--probe-timeout", type=float, default=25.0)
    args = ap.parse_args(argv)
    if args.probe:
        return probe(args.probe)
    if not args.env_file:
        ap.error("--env-file is required")
    if os.path.exists(args.env_file):
        os.unlink(args.env_file)
    why = applies()
    if why is not None:
        print(f"gate: not applicable ({why}); nothing turned off")
        return 0
    status = {}
    for name in PROBES:
        t0 = time.monotonic()
        try:
            p = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--probe", name],
                capture_output=True,
                text=True,
                timeout=args.probe_timeout,
            )
        except subprocess.TimeoutExpired:
            status[name] = f"HANG (no result in {args.probe_timeout:g} s)"
        else:
            if p.returncode == 0:
                status[name] = "ok"
            else:
                lines = (p.stdout + p.stderr).strip().splitlines()
                status[name] = f"FAILED (rc={p.returncode}): " + " | ".join(lines[-3:])
        print(f"gate: {name:4s} {status[name]}  [{time.monotonic() - t0:.1f} s]", flush=True)
    off = sorted({(GATES[n], OFF.get(n, "sm80")) for n, s in status.items() if s != "ok"})
    if off:
        with open(args.env_file, "w") as f:
            for var, val in off:
                f.write(f"export {var}={val}\n")
        print("gate: turned off for the rest of the run: " + ", ".join(f"{v}={x}" for v, x in off))
    else:
        print("gate: every sm_90a attention probe passed; nothing turned off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
