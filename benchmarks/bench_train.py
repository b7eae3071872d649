"""End-to-end training steps of the python_models on the fused kernels vs stock PyTorch.

    python benchmarks/bench_train.py --out DIR [--quick] [--precision bf16|autocast]

One full step (forward, backward, fused AdamW) of GPT-2 small (``GPT`` "base": 12 x 768,
T = 1024), BERT base (T = 512, MLM with 15% masking) and MAE base (ViT-B/16 at 224, 75%
masking), same initial weights and batch in every variant:

=================  =======================================================================
recon-<backend>    the model as written: rk.causal_attention / masked_softmax_attention /
                   conv1d_mlp on the cuda (if built) or triton kernels
eager              the same model with those three calls replaced by stock PyTorch
                   (F.scaled_dot_product_attention, F.linear + activation + F.linear)
torch.compile      ``torch.compile(model)`` of the eager variant (inductor, default mode)
recon+compile      ``torch.compile`` of the kernel model (custom ops stay opaque)
=================  =======================================================================

Precision: ``bf16`` (default) keeps parameters, activations and optimizer state in bf16 —
the same dtypes in every variant. ``autocast`` runs fp32 master weights under
torch.autocast(bf16); note that LayerNorm outputs stay fp32 there, so the fused MLP (which
takes its input and weights as given) then runs in fp32 while eager nn.Linear runs in bf16.

Timing: CUDA events around each step after warm-up (compilation and autotuning excluded);
median and p20/p80 over the timed steps; tokens/s from the median (tokens = B x T for text,
B x patches for MAE). Peak memory: ``torch.cuda.max_memory_allocated`` during the timed
steps. Numerics: the first step's loss against the eager variant's. Writes DIR/bench_train.csv
and DIR/bench_train.md and prints the markdown. Target on an H200 (GPT-2 small, bf16):
recon >= 1.3x eager and >= 1.0x torch.compile. Without a CUDA GPU it says so and exits 0
(``--device cpu`` runs the tiny presets once, a smoke test of this script).
--quick (~1.5 min on an H200): Triton autotuning off, fewer steps, no recon+compile, and a
time budget after which the remaining rows are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator

import _common as C
import torch
import torch.nn.functional as F
from _common import write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, ROOT)

from recon_kernels.reference import apply_activation  # noqa: E402  (stock torch: F.gelu etc.)

MODELS = ("gpt", "bert", "mae")
# model -> (preset on GPU, batch on GPU); the CPU smoke run uses "tiny" and batch 4
SIZES = {"gpt": ("base", 8), "bert": ("base", 16), "mae": ("base", 64)}


# --------------------------------------------------------------------------- stock ops


class TorchOps:
    """Stock-PyTorch stand-ins for the recon ops the model blocks call (same signatures):
    attention through recon_kernels.nn.MultiheadAttention, the MLP through blocks.MLP."""

    @staticmethod
    def causal_attention(
        q, k, v, key_padding_mask=None, dropout_p=0.0, backend=None, deterministic=False
    ):
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        n, m = q.shape[-2], k.shape[-2]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal & key_padding_mask[:, None, None, :], dropout_p=dropout_p
        )

    @staticmethod
    def masked_softmax_attention(
        q, k, v, mask=None, key_padding_mask=None, dropout_p=0.0, backend=None, deterministic=False
    ):
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            mask = kpm if mask is None else mask & kpm
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    @staticmethod
    def conv1d_mlp(x, w1, b1, w2, b2, activation="gelu", backend=None):
        return F.linear(apply_activation(F.linear(x, w1, b1), activation), w2, b2)

    @staticmethod
    def merge_lora(weight, lora_a, lora_b, scale, backend=None):
        return weight + scale * (lora_b @ lora_a)


class _StockRK:
    """``rk`` as the model modules see it, with the ops swapped for TorchOps; every other
    attribute (rk.nn, rk.set_backend, ...) is recon_kernels' own."""

    def __getattr__(self, name: str):
        import recon_kernels

        return getattr(TorchOps, name, None) or getattr(recon_kernels, name)


@contextlib.contextmanager
def stock_ops() -> Iterator[None]:
    """Route the python_models through TorchOps (the 'eager' / 'torch.compile' baselines):
    every python_models module that calls ``rk.<op>`` (found by looking, so this does not
    depend on how the package is laid out) sees the stock ops while the context is open, and
    so does recon_kernels.nn.MultiheadAttention (the blocks' attention)."""
    import python_models  # noqa: F401  (imports the model modules)
    import recon_kernels
    import recon_kernels.nn as rk_nn

    mods = [
        m
        for n, m in list(sys.modules.items())
        if n.split(".")[0] == "python_models" and getattr(m, "rk", None) is recon_kernels
    ]
    if not mods:
        raise RuntimeError(
            "bench_train: expected python_models modules that call recon_kernels as `rk`, "
            "found none (the eager baseline would time the kernels)"
        )
    attn = {n: getattr(rk_nn, n) for n in ("causal_attention", "masked_softmax_attention")}
    stock = _StockRK()
    for m in mods:
        m.rk = stock
    for n in attn:
        setattr(rk_nn, n, getattr(TorchOps, n))
    try:
        yield
    finally:
        for m in mods:
            m.rk = recon_kernels
        for n, f in attn.items():
            setattr(rk_nn, n, f)


# --------------------------------------------------------------------------- models


def build(name: str, preset: str, batch: int, device: torch.device, dtype: torch.dtype | None):
    """(model, batch kwargs, tokens per step) with weights seeded identically every call."""
    import python_models as pm

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        model = pm.GPT.from_name(preset)
        T = model.config.block_size
        idx = torch.randint(model.config.vocab_size, (batch, T + 1), generator=g)
        kw = {"idx": idx[:, :-1], "targets": idx[:, 1:]}
        tokens = batch * T
    elif name == "bert":
        model = pm.BERT.from_name(preset)
        c = model.config
        T = c.max_position
        allowed = torch.tensor([i for i in range(c.vocab_size) if i not in c.special_token_ids])
        ids = allowed[torch.randint(len(allowed), (batch, T), generator=g)]  # no specials
        ids[:, 0] = c.cls_token_id
        b = pm.MLMCollator.from_config(c)(ids, generator=g)
        kw = {"input_ids": b["input_ids"], "labels": b["labels"]}
        tokens = batch * T
    elif name == "mae":
        model = pm.MAE.from_name(preset)
        e = model.config.encoder
        images = torch.rand(batch, e.in_chans, e.image_size, e.image_size, generator=g)
        kw = {"images": images, "noise": torch.rand(batch, e.num_patches, generator=g)}
        tokens = batch * e.num_patches
    else:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
        kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
    return model, {k: v.to(device) for k, v in kw.items()}, tokens


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(
    name: str,
    variant: str,
    preset: str,
    batch: int,
    device: torch.device,
    precision: str,
    warmup: int,
    steps: int,
) -> dict:
    """Build, warm up, time ``steps`` training steps; a row of the table."""
    import python_models as pm

    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None
    autocast = precision == "autocast" and device.type == "cuda"
    stock = variant in ("eager", "torch.compile")
    backend = variant.split("-", 1)[1] if variant.startswith("recon-") else None
    with stock_ops() if stock else contextlib.nullcontext():
        model, kw, tokens = build(name, preset, batch, device, dtype)
        if backend is not None:
            pm.set_backend(model, backend)
        fn = model
        if variant in ("torch.compile", "recon+compile"):
            fn = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step() -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = fn(**kw)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        t0 = time.perf_counter()
        first_loss = float(step().detach().float())
        for _ in range(max(0, warmup - 1)):
            step()
        _sync(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
        peak = (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else float("nan")
        )
    med, p20, p80 = C.quantiles(times)
    return dict(
        model=name,
        preset=preset,
        variant=variant,
        batch=batch,
        tokens_per_step=tokens,
        median_ms=med,
        p20_ms=p20,
        p80_ms=p80,
        tokens_per_s=tokens / (med / 1e3),
        peak_mem_mb=peak,
        first_loss=first_loss,
        warmup_s=warm_s,
        status="ok",
    )


def _free(device: torch.device) -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def fmt(v, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def add_ratios(rows: list[dict]) -> None:
    """speedup vs eager / vs torch.compile (tokens/s ratios) and |loss - eager loss|."""
    ok = {(r["model"], r["variant"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        eager = ok.get((r["model"], "eager"))
        comp = ok.get((r["model"], "torch.compile"))
        r["x_eager"] = r["tokens_per_s"] / eager["tokens_per_s"] if eager else float("nan")
        r["x_compile"] = r["tokens_per_s"] / comp["tokens_per_s"] if comp else float("nan")
        r["dloss_vs_eager"] = abs(r["first_loss"] - eager["first_loss"]) if eager else float("nan")


def markdown(header: list[str], rows: list[dict]) -> str:
    lines = header + [
        "| model | variant | batch | tokens/step | median ms (p20-p80) | tokens/s | peak MB | x eager | x compile | loss-1 | Δ vs eager | status |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['model']} | {r['variant']} | {r.get('batch', '-')} | - | - | - | - | - | - | - | - | {r['status']} |"
            )
            continue
        lines.append(
            f"| {r['model']} ({r['preset']}) | {r['variant']} | {r['batch']} | {r['tokens_per_step']} | "
            f"{fmt(r['median_ms'])} ({fmt(r['p20_ms'])}-{fmt(r['p80_ms'])}) | "
            f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_mem_mb'], ',.0f')} | "
            f"{fmt(r.get('x_eager'))} | {fmt(r.get('x_compile'))} | {fmt(r['first_loss'], '.4f')} | "
            f"{fmt(r.get('dloss_vs_eager'), '.1e')} | ok |"
        )
    lines.append("")
    for r in rows:
        if r.get("preset") != "base":
            continue  # the target is stated for GPT-2 small on the GPU
        if r["model"] == "gpt" and r["variant"].startswith("recon-") and r["status"] == "ok":
            xe, xc = r.get("x_eager", float("nan")), r.get("x_compile", float("nan"))
            met = lambda v, t: "met" if math.isfinite(v) and v >= t else "NOT met"  # noqa: E731
            lines.append(
                f"- target, GPT {r['preset']} {r['variant']}: {fmt(xe)}x eager (>= 1.3: {met(xe, 1.3)}), "
                f"{fmt(xc)}x torch.compile (>= 1.0: {met(xc, 1.0)})"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def plan(quick: bool, device: torch.device, models: list[str]) -> list[tuple[str, str]]:
    """(model, variant) in priority order."""
    import recon_kernels as rk

    if device.type == "cuda":
        # auto first (each op family on the backend AUTO_TABLE names: on Hopper attention
        # on cuda, the MLP and LoRA on triton); the single backends in full runs
        kernels = ["cuda"] if rk.why_unavailable("cuda", device) is None else []
        kernels = ["auto"] if quick else ["auto", "triton", *kernels]
    else:
        kernels = ["eager"]  # the CPU smoke run: the model's own (reference) path
    out = []
    for i, m in enumerate(models):
        out += [(m, f"recon-{b}") for b in kernels] + [(m, "eager")]
        if device.type == "cuda" and (not quick or i == 0):
            out.append((m, "torch.compile"))
        if device.type == "cuda" and not quick:
            out.append((m, "recon+compile"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_train.csv / bench_train.md")
    ap.add_argument("--quick", action="store_true", help="~1.5 min on an H200")
    ap.add_argument("--precision", choices=("bf16", "autocast"), default="bf16")
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    ap.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (tiny-preset smoke run)"
    )
    ap.add_argument(
        "--time-budget", type=float, default=None, help="seconds; default 80 with --quick"
    )
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(
            f"bench_train: error: --models: expected a subset of {MODELS}, got {bad}",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        write(
            args.out,
            "bench_train",
            "# bench_train\n\nskipped: no CUDA GPU is visible (this benchmark needs one; "
            "--device cpu runs a tiny smoke version).\n",
            [],
        )
        return 0
    if args.quick:
        os.environ.setdefault("RECON_TRITON_AUTOTUNE", "0")
    budget = (
        args.time_budget if args.time_budget is not None else (80.0 if args.quick else math.inf)
    )
    warmup, steps = (3, 10) if args.quick else (5, 30)
    if device.type == "cpu":
        warmup, steps = 1, 3
    import recon_kernels as rk

    t0 = time.time()
    rows = []
    for name, variant in plan(args.quick, device, models):
        preset, batch = SIZES[name] if device.type == "cuda" else ("tiny", 4)
        if time.time() - t0 > budget:
            rows.append(
                dict(
                    model=name,
                    variant=variant,
                    batch=batch,
                    status=f"skipped: time budget {budget:.0f}s",
                )
            )
            continue
        print(f"bench_train: {name} {variant} ...", file=sys.stderr, flush=True)
        try:
            rows.append(
                run_variant(name, variant, preset, batch, device, args.precision, warmup, steps)
            )
        except Exception as e:  # one failing variant must not lose the table
            traceback.print_exc(file=sys.stderr)
            msg = " ".join(str(e).split())[:120]
            rows.append(
                dict(
                    model=name,
                    variant=variant,
                    batch=batch,
                    status=f"error: {type(e).__name__}: {msg}",
                )
            )
        _free(device)
    add_ratios(rows)
    import triton

    gpu = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "CPU (smoke run, tiny presets)"
    )
    header = [
        "# Training step: recon kernels vs eager PyTorch (SDPA) vs torch.compile",
        "",
        f"- device: {gpu}" + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else ""),
        f"- torch {torch.__version__}, triton {triton.__version__}, recon_kernels {rk.__version__}",
        f"- precision: {args.precision}; fused AdamW; {warmup} warm-up + {steps} timed steps",
        f"- mode: {'quick (Triton autotuning off)' if args.quick else 'full (autotuned)'}; "
        f"wall time {time.time() - t0:.0f} s",
        "",
    ]
    meta = {
        "device": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "precision": args.precision,
    }
    rows = [{**r, **meta} for r in rows]
    write(args.out, "bench_train", markdown(header, rows), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
