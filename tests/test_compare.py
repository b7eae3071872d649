"""python_models.runs.compare (claims, stats, report): paired statistics, verdicts that follow the numbers, and a tiny
end-to-end comparison (every objective, two budgets, reports and plots)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats
from test_models_common import tiny_model_cpu

from python_models.runs import claims as CL
from python_models.runs import compare as C
from python_models.runs import report as R
from python_models.runs import stats as S
from python_models.runs.config import CompareConfig
from python_models.runs.evaluate import FewShotResult


@pytest.fixture(autouse=True)
def _one_thread():
    with tiny_model_cpu():
        yield


def test_paired_test_matches_scipy_and_edge_cases():
    rng = np.random.default_rng(0)
    d = rng.normal(0.05, 0.1, 30)
    mean, p = S.paired_test(d)
    assert mean == pytest.approx(d.mean()) and p == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert S.paired_test([0.0, 0.0, 0.0]) == (0.0, 1.0)
    assert S.paired_test([0.1, 0.1, 0.1])[1] == 0.0  # consistent non-zero difference
    assert S.paired_test([0.2])[1] == 1.0  # one pair: no test


def test_holm():
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert S.holm([0.5]) == [0.5]


def _synthetic(cfg: CompareConfig, means: dict, noise: float = 0.01) -> S.Results:
    """Results whose accuracy is means[(method, protocol)] (a number, or a dict budget ->
    number) plus small per-unit noise."""
    rng = np.random.default_rng(0)
    res = S.Results()
    for (m, p), v in means.items():
        for b in cfg.budgets:
            base = v[b] if isinstance(v, dict) else v
            for s in cfg.seeds:
                acc = {k: list(base + noise * rng.standard_normal(cfg.draws)) for k in cfg.shots}
                res.add(m, b, s, FewShotResult(p, acc))
    return res


def _verdict(verdicts: list[dict], key: str) -> dict:
    return next(v for v in verdicts if v["claim"] == key)


def test_verdicts_follow_the_numbers():
    cfg = CompareConfig(budgets=[100, 500], seeds=[0], draws=4, shots=[1, 5])
    means = {
        # SimCLR probes best at every budget -> contrastive claim reproduced
        ("simclr", "probe"): 0.8,
        ("mae", "probe"): 0.5,
        ("ae", "probe"): 0.5,
        ("igpt", "probe"): 0.5,
        # AE fine-tunes best: "AE few-shots poorly" holds only for SimCLR's probe -> mixed
        ("ae", "finetune"): 0.9,
        ("simclr", "finetune"): 0.6,
        ("igpt", "finetune"): 0.6,
        # MAE fine-tune wins only at the large budget -> mixed over budgets
        ("mae", "finetune"): {100: 0.25, 500: 0.95},
    }
    res = _synthetic(cfg, means)
    tests = S.test_claims(res, cfg)
    v = S.verdicts(tests, cfg)
    assert _verdict(v, "contrastive_probe")["verdict"] == "reproduced"
    ae = _verdict(v, "ae_poor")
    assert ae["verdict"] == "mixed"
    assert ae["per_budget"][100] == dict(verdict="mixed", supports=1, contradicts=3, agree=1, n=6)
    mae = _verdict(v, "mae_finetune")
    assert mae["verdict"] == "mixed"
    assert mae["per_budget"][500]["verdict"] == "reproduced"
    assert mae["per_budget"][100]["verdict"] == "not reproduced"
    assert mae["per_budget"][100]["contradicts"] >= 1
    # every test row carries its numbers; n = seeds x k x draws
    row = next(t for t in tests if t.claim == "contrastive_probe" and t.budget == 100)
    assert row.n == 1 * 2 * 4 and row.mean_diff == pytest.approx(0.3, abs=0.02)
    assert row.outcome == "supports"


def test_no_differences_reproduce_nothing():
    cfg = CompareConfig(budgets=[100], seeds=[0], draws=4, shots=[1, 5])
    means = {(m, p): 0.5 for m in CL.METHODS for p in CL.PROTOCOLS}
    tests = S.test_claims(_synthetic(cfg, means, noise=0.02), cfg)
    assert {t.outcome for t in tests} == {"n.s."}
    assert {v["verdict"] for v in S.verdicts(tests, cfg)} == {"not reproduced"}


def test_seed_level_units_average_the_draws():
    cfg = CompareConfig(budgets=[10], seeds=[0, 1, 2], draws=3, shots=[1, 2])
    assert cfg.seed_level
    res = _synthetic(cfg, {("mae", "probe"): 0.5})
    units = res.units("mae", "probe", 10, seed_level=True)
    assert len(units) == 3 * 2
    rows = [r["acc"] for r in res.rows if r["seed"] == 1 and r["k"] == 2]
    assert units[(1, 2)] == pytest.approx(np.mean(rows))
    assert "variation between pretraining runs" not in R.power_note(cfg)
    quick = CompareConfig(**{**CompareConfig.QUICK, "quick": True})
    assert R.power_note(quick).startswith("LOW-POWERED") and not quick.seed_level


def test_config_validation():
    with pytest.raises(ValueError, match="methods: expected a subset"):
        CompareConfig(methods=["vae"])
    with pytest.raises(ValueError, match="budgets"):
        CompareConfig(budgets=[])
    assert CompareConfig(preset="tiny").lr == 3e-3


def test_tiny_end_to_end_compare(tmp_path):
    out = str(tmp_path / "cmp")
    cfg = CompareConfig(
        out=out,
        budgets=[2, 4],
        seeds=[0],
        shots=[1, 2],
        draws=2,
        batch_size=16,
        ft_steps=2,
        quick=True,
    )
    rep = C.run_compare(cfg, progress=False)
    for name in (
        "report.md",
        "results.jsonl",
        "verdicts.json",
        "accuracy_vs_budget.png",
        "accuracy_bars.png",
    ):
        assert os.path.isfile(os.path.join(out, name)), name
    # 4 objectives x 2 budgets x (probe + LoRA) + pixels (probe) + random (both), x 2 k x 2 draws
    assert len(rep.results.rows) == (4 * 2 * 2 + 1 + 2) * 2 * 2
    assert all(0.0 <= r["acc"] <= 1.0 for r in rep.results.rows)
    assert {v["verdict"] for v in rep.verdicts} <= {"reproduced", "not reproduced", "mixed"}
    assert len(rep.tests) == sum(len(c.comparisons) for c in CL.CLAIMS) * 2
    for m in ("autoencoder", "MAE", "SimCLR", "image-GPT", "raw pixels", "random init"):
        assert f"| {m}" in rep.summary
    assert "[low-powered]" in rep.summary and "## Paired tests" in rep.markdown
    saved = json.load(open(os.path.join(out, "verdicts.json")))
    assert [v["verdict"] for v in saved["verdicts"]] == [v["verdict"] for v in rep.verdicts]
    # a second run reuses the pretrained models and cached evaluations: same numbers
    again = C.run_compare(cfg, progress=False)
    assert again.results.rows == rep.results.rows
