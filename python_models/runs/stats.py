"""The statistics of ``recon compare``: accuracies per (method, budget, seed, protocol, k,
draw), paired one-sample t-tests per comparison, Holm correction within a claim and budget,
and the verdict of each claim."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .claims import CLAIMS
from .config import CompareConfig
from .evaluate import FewShotResult


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
