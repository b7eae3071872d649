"""``recon compare``: which pretraining objective gives the best few-shot image classifier?

Every objective trains the same ViT encoder (one ``EncoderConfig``; image-GPT reads it
causally and pools by mean, since its [CLS]/start token sees nothing) on the unlabelled
training split, at several step budgets and seeds:

    ae      autoencoder with a bottleneck (reconstruct every patch)
    mae     masked autoencoder (reconstruct the 75% hidden patches)
    simclr  contrastive (two augmented views, NT-Xent)
    igpt    autoregressive next-patch regression

Each encoder is then evaluated with a linear probe on frozen features and a LoRA fine-tune
(python_models.runs.evaluate) on k labelled examples per class, over several random draws of the
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

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..data import load_images
from .claims import LABELS, PROTOCOLS
from .config import CompareConfig, TrainConfig
from .distributed import pick_device
from .evaluate import FewShotResult, check_shots, finetune_accuracies, probe_accuracies
from .report import build_report, plot_results
from .stats import Results, TestRow, test_claims, verdicts
from .tasks import build_model, data_fingerprint
from .train import train

logger = logging.getLogger(__name__)


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
    md, summary = build_report(
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
