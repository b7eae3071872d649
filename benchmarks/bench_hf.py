"""Hugging Face training steps on the fused kernels: GPT-2 small and BERT base, bf16.

    python benchmarks/bench_hf.py --out DIR [--quick]

For each model, one full training step (forward, backward, AdamW) under
``torch.autocast(bfloat16)`` with float32 master weights (what HF Trainer's ``bf16=True``
does), random weights from the config (no download), every dropout at 0 (attention dropout
would send "recon" back to torch's SDPA, see integrations/transformers.py), no padding:

=========================  ================================================================
sdpa                       stock model, ``attn_implementation="sdpa"`` (the baseline)
recon-attn                 ``attn_implementation="recon"``
recon-kernels              ``apply_recon_kernels(model)``: fused attention + fused MLP
lora                       peft LoRA (attention projections, r=16), stock sdpa model
lora+accelerate            the same after ``rk.integrations.peft.accelerate``
lora+accelerate+kernels    and ``apply_recon_kernels`` on the base model (full stack)
=========================  ================================================================

Timing: ``triton.testing.do_bench`` median / p20 / p80 of the step; tokens/s from the
median. Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps. Numerics: the
loss of the first step with the same initial weights and batch, against the variant's
baseline (sdpa, or lora for the LoRA variants). A per-op table times each fused op against its
torch equivalent at the model's shapes (forward + backward), so a variant that is not faster
says which op holds it back. Writes DIR/bench_hf.csv and DIR/bench_hf.md and prints the
markdown. Without a CUDA GPU (or without transformers/peft) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
import traceback

import _common as C
import torch
import torch.nn.functional as F
from _common import write

log = logging.getLogger("bench_hf")

VARIANTS = (
    "sdpa",
    "recon-attn",
    "recon-kernels",
    "lora",
    "lora+accelerate",
    "lora+accelerate+kernels",
)
LORA_TARGETS = {"gpt2": ["c_attn", "attn.c_proj"], "bert": ["query", "key", "value"]}


class _Collect(logging.Handler):
    """Collects the warnings the integrations log (their fallbacks) during one variant."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------- models


def make_config(name: str, quick: bool):
    import transformers

    if name == "gpt2":  # GPT-2 small, 124M
        cfg = transformers.GPT2Config(
            n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, use_cache=False,
        )  # fmt: skip
        shape = (4, 512) if quick else (8, 1024)
    else:  # BERT base, 110M
        cfg = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        shape = (8, 512) if quick else (16, 512)
    return cfg, shape


def make_batch(name: str, cfg, shape, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, N = shape
    ids = torch.randint(0, cfg.vocab_size, (B, N), generator=g)
    if name == "gpt2":
        labels = ids.clone()
    else:  # MLM: 15% of positions carry a label
        labels = torch.where(torch.rand(B, N, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def build(name: str, variant: str, cfg, device):
    """A fresh model (same seed, same initial weights) set up as ``variant``."""
    import copy

    import peft
    import transformers

    from recon_kernels.integrations import peft as rkp
    from recon_kernels.integrations import transformers as rkt

    rkt.register()
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.BertForMaskedLM
    impl = "recon" if variant == "recon-attn" else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl)
    model.train()
    report = []
    if variant == "recon-kernels":
        report.append(str(rkt.apply_recon_kernels(model)))
    if variant.startswith("lora"):
        lcfg = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS[name],
            fan_in_fan_out=name == "gpt2",
        )
        if variant.endswith("kernels"):
            report.append(str(rkt.apply_recon_kernels(model)))
        model = peft.get_peft_model(model, lcfg)
        if "accelerate" in variant:
            report.append(str(rkp.accelerate(model)))
    return model, report


def train_step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def first_loss(model, batch) -> float:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return float(model(**batch).loss)


def bench_variant(name, variant, cfg, shape, device, quick) -> dict:

    collect = _Collect()
    logging.getLogger("recon_kernels").addHandler(collect)
    row = {"model": name, "variant": variant, "batch": shape[0], "seq": shape[1]}
    try:
        model, report = build(name, variant, cfg, device)
        batch = make_batch(name, cfg, shape, device)
        row["loss0"] = first_loss(model, batch)
        step = train_step_fn(model, batch)
        for _ in range(2):  # compile / autotune outside the measured region
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()  # before do_bench adds its L2-flush buffer
        ms = C.time_ms(
            step, "cuda", quick, warmup_ms=100 if quick else 300, rep_ms=400 if quick else 2000
        )
        tokens = shape[0] * shape[1]
        row.update(
            step_ms=ms[0],
            step_ms_p20=ms[1],
            step_ms_p80=ms[2],
            tokens_per_s=tokens / ms[0] * 1e3,
            peak_mem_mb=peak / 2**20,
            error="",
        )
        row["patched"] = " | ".join(r.replace("\n", "; ") for r in report)
        del model, step
    except Exception as e:  # one variant failing must not hide the others
        log.error("%s %s failed:\n%s", name, variant, traceback.format_exc())
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        logging.getLogger("recon_kernels").removeHandler(collect)
        torch.cuda.empty_cache()
    row["fallbacks"] = "; ".join(sorted(set(collect.messages)))[:300]
    return row


# --------------------------------------------------------------------------- per-op table


def _bench_ms(fn, quick) -> float:
    return C.time_ms(fn, "cuda", quick, warmup_ms=25, rep_ms=100 if quick else 400)[0]


def op_table(name, cfg, shape, device, quick) -> list[dict]:
    """Each fused op vs its torch equivalent at this model's shapes, fwd + bwd, bf16."""
    import recon_kernels as rk

    B, N = shape
    E = cfg.hidden_size
    H = cfg.num_attention_heads
    D = E // H
    hidden = getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or 4 * E
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, grad=True):
        return torch.randn(*s, device=device, dtype=dt, generator=g).requires_grad_(grad)

    causal = name == "gpt2"
    q, k, v = rnd(B, H, N, D), rnd(B, H, N, D), rnd(B, H, N, D)
    dout = torch.randn_like(q)
    x, w1, b1, w2, b2 = rnd(B * N, E), rnd(hidden, E), rnd(hidden), rnd(E, hidden), rnd(E)
    dy = torch.randn(B * N, E, device=device, dtype=dt)
    out_f = 3 * E if name == "gpt2" else E
    wl, bl = rnd(out_f, E, grad=False), rnd(out_f, grad=False)
    la, lb = rnd(16, E), rnd(out_f, 16)
    dyl = torch.randn(B * N, out_f, device=device, dtype=dt)
    act = "gelu_tanh" if name == "gpt2" else "gelu"

    def attn_ours():
        f = rk.causal_attention if causal else rk.masked_softmax_attention
        f(q, k, v).backward(dout)

    def attn_torch():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

    def mlp_ours():
        rk.conv1d_mlp(x, w1, b1, w2, b2, activation=act).backward(dy)

    def mlp_torch():
        h = F.gelu(F.linear(x, w1, b1), approximate="tanh" if act == "gelu_tanh" else "none")
        F.linear(h, w2, b2).backward(dy)

    def lora_ours():
        rk.lora_linear(x, wl, bl, la, lb, 2.0).backward(dyl)

    def lora_torch():
        (F.linear(x, wl, bl) + F.linear(F.linear(x, la), lb) * 2.0).backward(dyl)

    rows = []
    for op, ours, ref, what in (
        ("attention", attn_ours, attn_torch, f"(B,H,N,D)=({B},{H},{N},{D}) causal={causal}"),
        ("conv1d_mlp", mlp_ours, mlp_torch, f"(M,C,hidden)=({B * N},{E},{hidden}) {act}"),
        ("lora_linear", lora_ours, lora_torch, f"(M,in,out,r)=({B * N},{E},{out_f},16) frozen W"),
    ):
        row = {"model": name, "op": op, "shape": what}
        try:
            t_ours, t_ref = _bench_ms(ours, quick), _bench_ms(ref, quick)
            row.update(ours_ms=t_ours, torch_ms=t_ref, speedup=t_ref / t_ours, error="")
        except Exception as e:
            log.error("op %s failed:\n%s", op, traceback.format_exc())
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def _fmt(v, spec=".1f"):
    return format(v, spec) if isinstance(v, float) and math.isfinite(v) else "-"


def markdown(header: list[str], rows: list[dict], ops: list[dict]) -> str:
    lines = ["# Hugging Face training step: stock sdpa vs recon kernels", "", *header, ""]
    lines += [
        "| model | variant | batch x seq | step ms (p20-p80) | tokens/s | speedup | vs sdpa | peak MB | loss0 | Δloss0 | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for r in rows:
        if r["variant"] in ("sdpa", "lora") and not r.get("error"):
            base[(r["model"], r["variant"])] = r
    for r in rows:
        ref = base.get((r["model"], "lora" if r["variant"].startswith("lora") else "sdpa"))
        sdpa = base.get((r["model"], "sdpa"))
        speed = dl = "-"
        if not r.get("error") and ref is not None:
            r["speedup_vs_baseline"] = ref["step_ms"] / r["step_ms"]
            r["dloss0"] = abs(r["loss0"] - ref["loss0"])
            speed, dl = f"{r['speedup_vs_baseline']:.2f}x", f"{r['dloss0']:.2e}"
        vs_sdpa = "-"
        if not r.get("error") and sdpa is not None:
            r["speedup_vs_sdpa"] = sdpa["step_ms"] / r["step_ms"]
            vs_sdpa = f"{r['speedup_vs_sdpa']:.2f}x"
        notes = r.get("error") or r.get("fallbacks") or ""
        if r.get("error"):
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['batch']}x{r['seq']} | - | - | - | - | - | - | - | {notes} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch']}x{r['seq']} | "
            f"{r['step_ms']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}) | "
            f"{r['tokens_per_s']:,.0f} | {speed} | {vs_sdpa} | {r['peak_mem_mb']:,.0f} | {r['loss0']:.4f} | "
            f"{dl} | {notes} |"
        )
    lines += ["", "Baseline: sdpa for the full-model variants, lora for the LoRA variants.", ""]
    lines += [
        "## Per op at the model's shapes (bf16, forward + backward)",
        "",
        "| model | op | shape | ours ms | torch ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for o in ops:
        if o.get("error"):
            lines.append(f"| {o['model']} | {o['op']} | {o['shape']} | {o['error']} | | |")
        else:
            lines.append(
                f"| {o['model']} | {o['op']} | {o['shape']} | {o['ours_ms']:.3f} | "
                f"{o['torch_ms']:.3f} | {o['speedup']:.2f}x |"
            )
    lines += ["", "## Notes", ""]
    slow_ops = {(o["model"], o["op"]) for o in ops if not o.get("error") and o["speedup"] < 1.0}
    uses = {
        "recon-attn": ("attention",),
        "recon-kernels": ("attention", "conv1d_mlp"),
        "lora+accelerate": ("lora_linear",),
        "lora+accelerate+kernels": ("attention", "conv1d_mlp", "lora_linear"),
    }
    for r in rows:
        if r["variant"] not in uses or r.get("error") or "speedup_vs_baseline" not in r:
            continue
        if r["speedup_vs_baseline"] >= 1.0:
            lines.append(
                f"- {r['model']} {r['variant']}: faster than its baseline ({r['speedup_vs_baseline']:.2f}x)."
            )
        else:
            held = [op for op in uses[r["variant"]] if (r["model"], op) in slow_ops]
            why = (
                f"held back by {', '.join(held)} (slower than torch's equivalent, table above)"
                if held
                else "every fused op is faster alone: the loss is in the glue (casts under "
                "autocast, layout copies, kernels torch fuses with its neighbours)"
            )
            lines.append(
                f"- {r['model']} {r['variant']}: slower than its baseline ({r['speedup_vs_baseline']:.2f}x), {why}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_hf.csv / bench_hf.md")
    ap.add_argument(
        "--quick", action="store_true", help="smaller batches, fewer steps (~1.5 min on an H200)"
    )
    ap.add_argument("--models", default="gpt2,bert", help="comma-separated: gpt2, bert")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if not torch.cuda.is_available():
        write(
            args.out,
            "bench_hf",
            "# bench_hf\n\nskipped: no CUDA GPU is visible (this benchmark needs one).\n",
            [],
        )
        return 0
    try:
        import peft
        import transformers
        import triton
    except ImportError as e:
        write(
            args.out,
            "bench_hf",
            f"# bench_hf\n\nskipped: {e} (pip install transformers peft).\n",
            [],
        )
        return 0

    import recon_kernels as rk
    from recon_kernels import backends

    device = torch.device("cuda")
    t0 = time.time()
    header = [
        f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})",
        f"- torch {torch.__version__}, triton {triton.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, recon_kernels {rk.__version__}",
        f"- backend: {backends.resolve(None, device)} (process default {rk.get_backend()!r})",
        f"- mode: {'quick' if args.quick else 'full'}; bf16 autocast, fp32 master weights, "
        "AdamW (fused), dropout 0, no padding",
    ]
    rows, ops = [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("gpt2", "bert"):
            raise SystemExit(f"--models: expected gpt2 and/or bert, got {name!r}")
        cfg, shape = make_config(name, args.quick)
        for variant in VARIANTS:
            log.info("%s %s %s ...", name, variant, shape)
            rows.append(bench_variant(name, variant, cfg, shape, device, args.quick))
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        ops += op_table(name, cfg, shape, device, args.quick)
    header.append(f"- wall time: {time.time() - t0:.0f} s")
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "backend": backends.resolve(None, device),
    }
    rows = [{**r, **meta} for r in rows]
    write(args.out, "bench_hf", markdown(header, rows, ops), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
