"""``recon compare``: which pretraining objective gives the best few-shot image classifier?

Every objective trains the same ViT encoder (one ``EncoderConfig``; image-GPT reads it
causally and pools by mean, since its [CLS]/start token sees nothing) on the unlabelled
training split, at several step budgets and seeds:

    ae      autoencoder with a bottleneck (reconstruct every patch)
    mae     masked autoencoder (reconstruct the 75% hidden patches)
    simclr  contrastive (two augmented views, NT-Xent)
    igpt    autoregressive next-patch regression

Each encoder is then evaluated with a linear probe on frozen features and a LoRA fine-tune
(python_models.evaluate) on k labelled examples per class, over several random draws of the
k-shot set, next to two baselines that need no pretraining: raw pixels (probe) and the
random initial encoder (probe and fine-tune).

The claims of the pretraining notes are tested per budget with paired tests over matched
(seed, k, draw) units (every method sees the same k-shot sets): a one-sample t-test on the
paired differences, Holm-corrected within each claim and budget. With three or more
pretraining seeds the unit is (seed, k), averaged over draws, so that the test sees the
seed-to-seed variation of pretraining rather than only draw-to-draw noise. Verdicts come
from those tests alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .data import load_images
from .evaluate import (
    FewShotResult,
    FinetuneConfig,
    check_shots,
    finetune_accuracies,
    probe_accuracies,
)
from .train import TrainConfig, build_model, data_fingerprint, pick_device, train

logger = logging.getLogger(__name__)

METHODS = ("ae", "mae", "simclr", "igpt")
BASELINES = ("pixels", "random")
LABELS = {
    "ae": "autoencoder",
    "mae": "MAE",
    "simclr": "SimCLR",
    "igpt": "image-GPT",
    "pixels": "raw pixels",
    "random": "random init",
}
PROTOCOLS = ("probe", "finetune")
PROTOCOL_LABELS = {"probe": "linear probe", "finetune": "LoRA fine-tune"}


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Comparison:
    """sum(coef * accuracy(method, protocol)) > 0 is what the claim predicts."""

    label: str
    terms: tuple[tuple[float, str, str], ...]  # (coef, method, protocol)


def _gt(a: str, pa: str, b: str, pb: str) -> Comparison:
    short = {"probe": "probe", "finetune": "LoRA"}
    return Comparison(
        f"{LABELS[a]} {short[pa]} > {LABELS[b]} {short[pb]}", ((1.0, a, pa), (-1.0, b, pb))
    )


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    comparisons: tuple[Comparison, ...]


CLAIMS = (
    Claim(
        "ae_poor",
        "Plain autoencoders few-shot poorly",
        tuple(_gt(m, p, "ae", p) for p in PROTOCOLS for m in ("mae", "simclr", "igpt")),
    ),
    Claim(
        "mae_finetune",
        "Masked autoencoders do better when fine-tuned",
        (
            _gt("mae", "finetune", "mae", "probe"),
            _gt("mae", "finetune", "ae", "finetune"),
            _gt("mae", "finetune", "simclr", "finetune"),
            Comparison(
                "MAE gains more from LoRA than SimCLR",
                (
                    (1.0, "mae", "finetune"),
                    (-1.0, "mae", "probe"),
                    (-1.0, "simclr", "finetune"),
                    (1.0, "simclr", "probe"),
                ),
            ),
        ),
    ),
    Claim(
        "contrastive_probe",
        "Contrastive features probe better linearly",
        tuple(_gt("simclr", "probe", m, "probe") for m in ("mae", "ae", "igpt")),
    ),
)


# --------------------------------------------------------------------------- config


@dataclass
class CompareConfig:
    out: str = os.path.join("runs", "compare")  # output directory
    data: str | None = None  # image data (see python_models.data); None = digits
    preset: str = "tiny"  # model size of every objective
    budgets: list[int] = field(default_factory=lambda: [400, 1000, 2000])  # pretraining steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # pretraining seeds
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # k labelled examples per class
    draws: int = 5  # random k-shot sets per (seed, k)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    batch_size: int = 128  # pretraining batch
    lr: float | None = None  # pretraining peak learning rate; None = PRESET_LR[preset]
    patch_size: int | None = None  # None = default_patch_size(image size)
    lora_rank: int = 8  # fine-tune LoRA rank
    ft_steps: int = 100  # fine-tune steps
    ft_lr: float = 1e-2  # fine-tune learning rate
    alpha: float = 0.05  # significance level (after Holm correction)
    backend: str | None = None  # recon_kernels backend; None = auto (kernels on GPU)
    device: str = "auto"
    quick: bool = False  # low-powered smoke run: labelled as such in the verdicts

    QUICK = dict(budgets=[100, 250, 500], seeds=[0], draws=3)
    # tuned on digits for tiny (3e-3 beat 1e-3 on every objective's probe at 500 steps)
    PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "base": 3e-4}

    def __post_init__(self) -> None:
        for name in ("budgets", "seeds", "shots", "methods"):
            if not getattr(self, name):
                raise ValueError(f"{name}: expected at least one value, got none")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: expected a subset of {METHODS}, got {bad}")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets: expected positive step counts, got {self.budgets}")
        if self.draws < 1:
            raise ValueError(f"draws: expected a positive integer, got {self.draws}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a value in (0, 1), got {self.alpha}")
        if self.lr is None:
            self.lr = self.PRESET_LR[self.preset]
        self.budgets = sorted(set(self.budgets))
        self.seeds = sorted(set(self.seeds))
        self.shots = sorted(set(self.shots))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareConfig:
        given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None
        }
        if args.quick:
            given = {**cls.QUICK, **given}
        return cls(**given)

    @property
    def finetune(self) -> FinetuneConfig:
        return FinetuneConfig(
            rank=self.lora_rank, alpha=2.0 * self.lora_rank, steps=self.ft_steps, lr=self.ft_lr
        )

    @property
    def seed_level(self) -> bool:
        """Test units are (seed, k) means over draws when there are >= 3 seeds."""
        return len(self.seeds) >= 3


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from .cli import int_list, positive_int, seed_list

    d = CompareConfig()
    q = CompareConfig.QUICK
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a few CPU minutes: budgets {q['budgets']}, seeds {q['seeds']}, {q['draws']} draws (low-powered)",
    )
    p.add_argument("--out", default=None, help=f"output directory (default {d.out})")
    p.add_argument(
        "--data", default=None, help="images: digits (default), MNIST IDX dir, .npz, image folder"
    )
    p.add_argument(
        "--preset",
        choices=("tiny", "small", "base"),
        default=None,
        help="encoder size (default tiny)",
    )
    p.add_argument(
        "--budgets",
        type=int_list,
        default=None,
        help=f"pretraining steps (default {','.join(map(str, d.budgets))})",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help=f"pretraining seeds (default {','.join(map(str, d.seeds))})",
    )
    p.add_argument("--shots", type=int_list, default=None, help="k values (default 1,5,10)")
    p.add_argument(
        "--draws",
        type=positive_int,
        default=None,
        help=f"k-shot draws per seed and k (default {d.draws})",
    )
    p.add_argument(
        "--methods",
        type=lambda s: s.split(","),
        default=None,
        help=f"subset of {','.join(METHODS)}",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"pretraining batch (default {d.batch_size})",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="pretraining lr (default 3e-3 tiny, 1e-3 small, 3e-4 base)",
    )
    p.add_argument("--patch-size", type=positive_int, default=None)
    p.add_argument("--lora-rank", type=positive_int, default=None, help=f"default {d.lora_rank}")
    p.add_argument(
        "--ft-steps",
        type=positive_int,
        default=None,
        help=f"fine-tune steps (default {d.ft_steps})",
    )
    p.add_argument("--ft-lr", type=float, default=None, help=f"fine-tune lr (default {d.ft_lr})")
    p.add_argument(
        "--alpha", type=float, default=None, help=f"significance level (default {d.alpha})"
    )
    p.add_argument(
        "--backend", default=None, help="recon_kernels backend (default auto: kernels on GPU)"
    )
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda[:N]")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default 1 for tiny on CPU)"
    )
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- statistics


def paired_test(diffs: Sequence[float]) -> tuple[float, float]:
    """(mean difference, two-sided p) of a one-sample t-test of paired differences against 0.
    All-zero differences give p = 1; constant non-zero ones p = 0."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2 or np.allclose(d, d[0]):
        return mean, 1.0 if abs(mean) < 1e-12 or len(d) < 2 else 0.0
    return mean, float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj


# --------------------------------------------------------------------------- results


class Results:
    """Accuracy of every (method, budget, seed, protocol, k, draw); baselines have budget None."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, method: str, budget: int | None, seed: int, res: FewShotResult) -> None:
        for k, accs in res.accuracies.items():
            for d, a in enumerate(accs):
                self.rows.append(
                    dict(
                        method=method,
                        budget=budget,
                        seed=seed,
                        protocol=res.protocol,
                        k=k,
                        draw=d,
                        acc=a,
                    )
                )

    def units(
        self, method: str, protocol: str, budget: int | None, seed_level: bool
    ) -> dict[tuple, float]:
        """(seed, k, draw) -> accuracy, or (seed, k) -> mean over draws when seed_level.
        Baselines (budget-free) answer for any budget."""
        out: dict[tuple, list[float]] = {}
        for r in self.rows:
            if r["method"] != method or r["protocol"] != protocol:
                continue
            if r["budget"] is not None and r["budget"] != budget:
                continue
            key = (r["seed"], r["k"]) if seed_level else (r["seed"], r["k"], r["draw"])
            out.setdefault(key, []).append(r["acc"])
        return {k: float(np.mean(v)) for k, v in out.items()}

    def values(self, method: str, protocol: str, budget: int | None, k: int) -> np.ndarray:
        return np.array(
            [
                r["acc"]
                for r in self.rows
                if r["method"] == method
                and r["protocol"] == protocol
                and r["k"] == k
                and (r["budget"] is None or r["budget"] == budget)
            ]
        )

    def has(self, method: str, protocol: str) -> bool:
        return any(r["method"] == method and r["protocol"] == protocol for r in self.rows)


@dataclass
class TestRow:
    claim: str
    budget: int
    comparison: str
    n: int
    mean_diff: float
    p: float
    p_holm: float = 1.0
    outcome: str = ""  # supports | contradicts | n.s. | missing


def test_claims(results: Results, cfg: CompareConfig) -> list[TestRow]:
    rows = []
    for claim in CLAIMS:
        for budget in cfg.budgets:
            batch = []
            for comp in claim.comparisons:
                tables = [
                    (coef, results.units(m, p, budget, cfg.seed_level)) for coef, m, p in comp.terms
                ]
                if any(not t for _, t in tables):
                    batch.append(
                        TestRow(claim.key, budget, comp.label, 0, float("nan"), 1.0, 1.0, "missing")
                    )
                    continue
                keys = sorted(set.intersection(*(set(t) for _, t in tables)))
                diffs = [sum(coef * t[key] for coef, t in tables) for key in keys]
                mean, p = paired_test(diffs)
                batch.append(TestRow(claim.key, budget, comp.label, len(keys), mean, p))
            tested = [r for r in batch if r.outcome != "missing"]
            for r, q in zip(tested, holm([r.p for r in tested])):
                r.p_holm = q
                r.outcome = (
                    ("supports" if r.mean_diff > 0 else "contradicts") if q < cfg.alpha else "n.s."
                )
            rows += batch
    return rows


def _verdict(rows: list[TestRow]) -> str:
    tested = [r for r in rows if r.outcome != "missing"]
    if not tested:
        return "untested"
    sup = sum(r.outcome == "supports" for r in tested)
    if sup == len(tested):
        return "reproduced"
    return "not reproduced" if sup == 0 else "mixed"


def verdicts(tests: list[TestRow], cfg: CompareConfig) -> list[dict[str, Any]]:
    """Per claim: the verdict at each budget and overall, with the numbers behind it."""
    out = []
    for claim in CLAIMS:
        per_budget = {}
        for b in cfg.budgets:
            rows = [r for r in tests if r.claim == claim.key and r.budget == b]
            tested = [r for r in rows if r.outcome != "missing"]
            per_budget[b] = dict(
                verdict=_verdict(rows),
                supports=sum(r.outcome == "supports" for r in tested),
                contradicts=sum(r.outcome == "contradicts" for r in tested),
                agree=sum(r.mean_diff > 0 for r in tested),
                n=len(tested),
            )
        vs = {v["verdict"] for v in per_budget.values()} - {"untested"}
        overall = vs.pop() if len(vs) == 1 else ("untested" if not vs else "mixed")
        parts = []
        for b, v in per_budget.items():
            parts.append(
                f"{b} steps: {v['verdict']} ({v['supports']}/{v['n']} comparisons significant in the "
                f"claimed direction, {v['contradicts']} against, {v['agree']}/{v['n']} point the claimed way)"
            )
        big = cfg.budgets[-1]
        numbers = ", ".join(
            f"{r.comparison} {r.mean_diff:+.3f} (p_Holm {r.p_holm:.2g})"
            for r in tests
            if r.claim == claim.key and r.budget == big and r.outcome != "missing"
        )
        out.append(
            dict(
                claim=claim.key,
                text=claim.text,
                verdict=overall,
                per_budget=per_budget,
                detail="; ".join(parts) + f". Mean accuracy differences at {big} steps: {numbers}",
            )
        )
    return out


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- the run


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _cached_eval(path: str, compute) -> list[FewShotResult]:
    """Few-shot results cached as JSON (keyed by the evaluation settings in the name)."""
    if os.path.isfile(path):
        with open(path) as f:
            blob = json.load(f)
        return [
            FewShotResult(r["protocol"], {int(k): v for k, v in r["accuracies"].items()})
            for r in blob
        ]
    res = compute()
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump([r.to_dict() for r in res], f)
    os.replace(tmp, path)
    return res


@dataclass
class CompareReport:
    markdown: str  # the full report (also in OUT/report.md)
    summary: str  # the final table(s) and verdicts, for the terminal
    verdicts: list[dict[str, Any]]
    tests: list[TestRow]
    results: Results
    files: list[str]


def run_compare(cfg: CompareConfig, *, progress: bool = True) -> CompareReport:
    """Pretrain, evaluate, test, plot and report (see the module docstring)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    data = load_images(cfg.data)
    check_shots(cfg.shots, data)
    os.makedirs(cfg.out, exist_ok=True)
    fp = data_fingerprint(data)
    eval_key = _hash(
        dict(shots=cfg.shots, draws=cfg.draws, ft=dataclasses.asdict(cfg.finetune), data=fp)
    )
    results = Results()
    throughput: dict[str, list[float]] = {}
    encoder_cfgs: dict[str, dict] = {}
    ft = cfg.finetune
    n_stages = len(cfg.seeds) * (len(cfg.budgets) * len(cfg.methods) + 2)
    stage = 0

    def evaluate(encoder, tag: str, seed: int, protocols=PROTOCOLS) -> list[FewShotResult]:
        def compute() -> list[FewShotResult]:
            out = []
            if "probe" in protocols:
                out.append(
                    probe_accuracies(encoder, data, cfg.shots, cfg.draws, seed, device=device)
                )
            if "finetune" in protocols:
                total = len(cfg.shots) * cfg.draws
                with tqdm(
                    total=total, desc=f"LoRA {tag}", leave=False, disable=not progress
                ) as bar:
                    out.append(
                        finetune_accuracies(
                            encoder,
                            data,
                            cfg.shots,
                            cfg.draws,
                            seed,
                            ft,
                            device=device,
                            progress=lambda: bar.update(1),
                        )
                    )
            return out

        return compute

    def log_stage(what: str, t: float, res: list[FewShotResult]) -> None:
        accs = ", ".join(
            f"{r.protocol} k={k} {r.summary(k)[0]:.3f}"
            for r in res
            for k in (cfg.shots[0], cfg.shots[-1])
        )
        logger.info("[%d/%d] %s (%.1fs): %s", stage, n_stages, what, time.perf_counter() - t, accs)

    logger.info(
        "compare: %s; methods %s; budgets %s; seeds %s; k %s x %d draws; device %s",
        data.describe(),
        ",".join(cfg.methods),
        cfg.budgets,
        cfg.seeds,
        cfg.shots,
        cfg.draws,
        device,
    )
    for seed in cfg.seeds:
        # baselines: raw pixels, and the encoder every objective starts from (MAE's init)
        t = time.perf_counter()
        stage += 1
        path = os.path.join(cfg.out, "baselines", f"pixels_s{seed}_{eval_key}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        res = _cached_eval(path, evaluate(None, "pixels", seed, ("probe",)))
        for r in res:
            results.add("pixels", None, seed, r)
        log_stage(f"raw pixels, seed {seed}", t, res)

        t = time.perf_counter()
        stage += 1
        init_cfg = TrainConfig(
            model="mae",
            preset=cfg.preset,
            seed=seed,
            data=cfg.data,
            patch_size=cfg.patch_size,
            backend=cfg.backend,
        )
        encoder = build_model(init_cfg, data).encoder.to(device)
        path = os.path.join(cfg.out, "baselines", f"random_s{seed}_{eval_key}.json")
        res = _cached_eval(path, evaluate(encoder, "random init", seed))
        for r in res:
            results.add("random", None, seed, r)
        log_stage(f"random init, seed {seed}", t, res)

        for budget in cfg.budgets:
            for m in cfg.methods:
                t = time.perf_counter()
                stage += 1
                tc = TrainConfig(
                    model=m,
                    preset=cfg.preset,
                    steps=budget,
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    seed=seed,
                    data=cfg.data,
                    patch_size=cfg.patch_size,
                    log_every=max(1, budget // 20),
                    backend=cfg.backend,
                    device=cfg.device,
                )
                run_dir = os.path.join(cfg.out, "pretrain", f"{m}_b{budget}_s{seed}")
                try:
                    tr = train(tc, run_dir, resume="auto", progress=progress, data=data)
                except ValueError as e:
                    if str(e).startswith("resume:"):
                        raise ValueError(
                            f"out: {run_dir} holds a run with other settings ({e}); use a fresh --out"
                        ) from None
                    raise
                throughput.setdefault(m, []).append(tr.tokens_per_s)
                enc = tr.model.encoder
                e = dataclasses.asdict(enc.cfg)
                encoder_cfgs[m] = e
                path = os.path.join(run_dir, f"fewshot_{eval_key}.json")
                res = _cached_eval(path, evaluate(enc, f"{m}@{budget}", seed))
                for r in res:
                    results.add(m, budget, seed, r)
                log_stage(f"{LABELS[m]} {budget} steps, seed {seed}, loss {tr.loss:.4f}", t, res)

    _check_same_encoder(encoder_cfgs)
    tests = test_claims(results, cfg)
    verdict_rows = verdicts(tests, cfg)
    files = plot_results(results, cfg, cfg.out)
    md, summary = _report(
        results,
        cfg,
        data,
        tests,
        verdict_rows,
        encoder_cfgs,
        throughput,
        device,
        time.perf_counter() - t0,
    )
    for name, text in (("report.md", md),):
        with open(os.path.join(cfg.out, name), "w") as f:
            f.write(text)
    with open(os.path.join(cfg.out, "results.jsonl"), "w") as f:
        for r in results.rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(cfg.out, "verdicts.json"), "w") as f:
        json.dump(
            dict(
                config=dataclasses.asdict(cfg),
                verdicts=verdict_rows,
                tests=[dataclasses.asdict(r) for r in tests],
            ),
            f,
            indent=2,
            default=str,
        )
    files = [
        os.path.join(cfg.out, n) for n in ("report.md", "results.jsonl", "verdicts.json")
    ] + files
    return CompareReport(md, summary, verdict_rows, tests, results, files)


def _check_same_encoder(cfgs: dict[str, dict]) -> None:
    """Every objective must train the same encoder (pool aside: image-GPT pools by mean)."""
    strip = {m: {k: v for k, v in c.items() if k != "pool"} for m, c in cfgs.items()}
    ref = next(iter(strip.values()), None)
    for m, c in strip.items():
        if c != ref:
            raise RuntimeError(f"compare: the {m} encoder differs from the others: {c} vs {ref}")


def _report(results, cfg, data, tests, verdict_rows, encoder_cfgs, throughput, device, elapsed):
    import recon_kernels as rk

    enc = next(iter(encoder_cfgs.values()), {})
    enc_txt = ", ".join(f"{k}={v}" for k, v in enc.items() if k != "pool")
    backend = cfg.backend or "auto"
    resolved = "eager" if device.type == "cpu" and backend == "auto" else backend
    if device.type == "cuda" and backend == "auto":
        resolved = "cuda" if rk.why_unavailable("cuda", device) is None else "triton"
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
