"""The report of ``recon compare``: markdown tables (accuracies, tests, throughput), the
statistics note, and the plots."""

from __future__ import annotations

import os

import numpy as np
import torch

from .claims import BASELINES, LABELS, METHODS, PROTOCOL_LABELS, PROTOCOLS
from .config import CompareConfig
from .stats import Results, TestRow


def _fmt(v: np.ndarray) -> str:
    if len(v) == 0:
        return "—"
    s = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.3f} ± {s:.3f}"


def accuracy_table(results: Results, cfg: CompareConfig, budget: int) -> str:
    head = ["method"] + [
        f"{'probe' if p == 'probe' else 'LoRA'} k={k}" for p in PROTOCOLS for k in cfg.shots
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for m in [*cfg.methods, *BASELINES]:
        cells = [LABELS[m] + ("" if m in METHODS else " (baseline)")]
        for p in PROTOCOLS:
            for k in cfg.shots:
                cells.append(_fmt(results.values(m, p, budget, k)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tests_table(tests: list[TestRow]) -> str:
    lines = [
        "| claim | budget | comparison | n | mean diff | p | p (Holm) | outcome |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in tests:
        lines.append(
            f"| {r.claim} | {r.budget} | {r.comparison} | {r.n} | {r.mean_diff:+.3f} | "
            f"{r.p:.2g} | {r.p_holm:.2g} | {r.outcome} |"
        )
    return "\n".join(lines)


def power_note(cfg: CompareConfig) -> str:
    unit = "(seed, k) means over draws" if cfg.seed_level else "(seed, k, draw)"
    n = len(cfg.seeds) * len(cfg.shots) * (1 if cfg.seed_level else cfg.draws)
    note = (
        f"{len(cfg.seeds)} seed(s) x {len(cfg.shots)} k x {cfg.draws} draws; test unit {unit}, "
        f"n = {n} pairs per test; one-sample t-test on paired differences, Holm within claim "
        f"and budget, alpha {cfg.alpha}"
    )
    if not cfg.seed_level:
        note += (
            "; with fewer than 3 seeds the p-values see only draw-to-draw variation, not the "
            "variation between pretraining runs"
        )
    if cfg.quick:
        note = "LOW-POWERED quick run: " + note
    return note


def plot_results(results: Results, cfg: CompareConfig, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip([*METHODS, *BASELINES], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    files = []
    fig, axes = plt.subplots(2, len(cfg.shots), figsize=(4 * len(cfg.shots), 7), squeeze=False)
    for i, p in enumerate(PROTOCOLS):
        for j, k in enumerate(cfg.shots):
            ax = axes[i][j]
            for m in cfg.methods:
                vals = [results.values(m, p, b, k) for b in cfg.budgets]
                mean = [v.mean() for v in vals]
                std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
                ax.errorbar(
                    cfg.budgets,
                    mean,
                    yerr=std,
                    marker="o",
                    capsize=3,
                    label=LABELS[m],
                    color=colors[m],
                )
            for m in BASELINES:
                v = results.values(m, p, None, k)
                if len(v):
                    ax.axhline(v.mean(), ls="--", color=colors[m], label=LABELS[m])
            ax.set_xscale("log")
            ax.set_xticks(cfg.budgets, [str(b) for b in cfg.budgets])
            ax.minorticks_off()
            ax.set_title(f"{PROTOCOL_LABELS[p]}, k={k}")
            ax.set_xlabel("pretraining steps")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "accuracy_vs_budget.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    big = cfg.budgets[-1]
    names = [*cfg.methods, *BASELINES]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    width = 0.8 / len(names)
    for i, p in enumerate(PROTOCOLS):
        ax = axes[0][i]
        for n_i, m in enumerate(names):
            vals = [results.values(m, p, big, k) for k in cfg.shots]
            if not any(len(v) for v in vals):
                continue
            mean = [v.mean() if len(v) else 0.0 for v in vals]
            std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
            xs = np.arange(len(cfg.shots)) + (n_i - (len(names) - 1) / 2) * width
            ax.bar(xs, mean, width, yerr=std, capsize=2, label=LABELS[m], color=colors[m])
        ax.set_xticks(np.arange(len(cfg.shots)), [f"k={k}" for k in cfg.shots])
        ax.set_ylim(0, 1)
        ax.set_title(f"{PROTOCOL_LABELS[p]} at {big} steps")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "accuracy_bars.png"))
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files


def build_report(
    results, cfg, data, tests, verdict_rows, encoder_cfgs, throughput, device, elapsed
):
    from recon_kernels import backends

    enc = next(iter(encoder_cfgs.values()), {})
    enc_txt = ", ".join(f"{k}={v}" for k, v in enc.items() if k != "pool")
    backend = cfg.backend or "auto"
    resolved = backend
    if backend == "auto":  # what auto ran per op family (backends.AUTO_TABLE)
        picks = {f: backends.auto_backend(f, device) for f in backends.FAMILIES}
        resolved = ", ".join(f"{f} {b}" for f, b in picks.items())
        if len(set(picks.values())) == 1:
            resolved = picks["attention"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        "# Few-shot comparison of pretraining objectives",
        "",
        f"Data: {data.describe()}. Encoder (every objective): {enc_txt}; [CLS] features, "
        "image-GPT mean-pooled (causal). "
        f"Pretraining: batch {cfg.batch_size}, AdamW lr {cfg.lr} (warmup + cosine), budgets "
        f"{', '.join(map(str, cfg.budgets))} steps, seeds {', '.join(map(str, cfg.seeds))}. "
        f"Few-shot: k = {', '.join(map(str, cfg.shots))}, {cfg.draws} draws per seed and k; "
        f"linear probe = logistic regression on standardised frozen features; LoRA = rank "
        f"{cfg.lora_rank} on every block linear + linear head, {cfg.ft_steps} steps, lr {cfg.ft_lr}. "
        f"Device {gpu}, backend {resolved}. Mean ± std over seeds x draws.",
        "",
        f"Statistics: {power_note(cfg)}.",
        "",
    ]
    for b in cfg.budgets:
        lines += [f"## Accuracy at {b} pretraining steps", "", accuracy_table(results, cfg, b), ""]
    verdict_lines = []
    for v in verdict_rows:
        tag = " [low-powered]" if cfg.quick else ""
        verdict_lines.append(f"- **{v['text']}**: {v['verdict'].upper()}{tag}. {v['detail']}.")
    lines += ["## Verdicts", "", *verdict_lines, "", "## Paired tests", "", tests_table(tests), ""]
    if throughput:
        lines += [
            "## Pretraining throughput",
            "",
            "| method | tokens/s (mean over runs) |",
            "|---|---:|",
        ]
        lines += [f"| {LABELS[m]} | {np.mean(v):,.0f} |" for m, v in throughput.items()]
        lines += ["", f"(tokens = image patches; device {gpu}, backend {resolved})", ""]
    lines += [
        "Plots: accuracy_vs_budget.png (accuracy against budget per method), "
        "accuracy_bars.png (the largest budget).",
        "",
        f"Total time {elapsed:.0f}s.",
    ]
    md = "\n".join(lines) + "\n"
    big = cfg.budgets[-1]
    summary = "\n".join(
        [
            f"Few-shot accuracy at {big} pretraining steps ({data.describe()}; mean ± std over "
            f"{len(cfg.seeds)} seed(s) x {cfg.draws} draws):",
            "",
            accuracy_table(results, cfg, big),
            "",
            f"Verdicts ({power_note(cfg)}):",
            *verdict_lines,
            "",
            f"Pretraining throughput on {gpu} (backend {resolved}), tokens (patches)/s: "
            + ", ".join(f"{LABELS[m]} {np.mean(v):,.0f}" for m, v in throughput.items()),
            f"Report: {os.path.join(cfg.out, 'report.md')} (all budgets, every paired test); "
            f"plots: accuracy_vs_budget.png, accuracy_bars.png. {elapsed:.0f}s.",
        ]
    )
    return md, summary
