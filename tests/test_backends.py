"""backends.AUTO_TABLE: what ``auto`` runs per op family and GPU architecture, with evidence,
and the fall back to the next backend when the first is unavailable."""

from __future__ import annotations

import pytest
import torch

from recon_kernels import backends


def test_table_covers_every_family_and_arch_with_evidence():
    for fam in backends.FAMILIES:
        assert set(backends.AUTO_TABLE[fam]) == {"sm90", "sm80", "other"}
        for arch, order in backends.AUTO_TABLE[fam].items():
            assert order and set(order) <= {"triton", "cuda"}, (fam, arch, order)
            assert backends.AUTO_EVIDENCE[fam][arch], (fam, arch)


@pytest.mark.parametrize("arch", ["sm90", "sm80", "other"])
@pytest.mark.parametrize("family", backends.FAMILIES)
def test_auto_takes_the_first_available_of_the_table(monkeypatch, family, arch):
    monkeypatch.setattr(backends, "arch_class", lambda index: arch)
    gpu = torch.device("cuda", 0)
    order = backends.AUTO_TABLE[family][arch]
    monkeypatch.setattr(backends, "why_unavailable", lambda name, device=None: None)
    assert backends.auto_backend(family, gpu) == order[0]
    assert backends.resolve("auto", gpu, family) == order[0]
    # the first choice unavailable (e.g. the extension not built): the next one
    first_out = lambda name, device=None: "not here" if name == order[0] else None  # noqa: E731
    monkeypatch.setattr(backends, "why_unavailable", first_out)
    assert backends.auto_backend(family, gpu) == (order[1] if len(order) > 1 else order[0])


def test_auto_on_cpu_is_eager_and_bad_family_is_named():
    assert backends.auto_backend("mlp", torch.device("cpu")) == "eager"
    assert backends.resolve("auto", torch.device("cpu"), "lora") == "eager"
    with pytest.raises(ValueError, match="family: expected one of"):
        backends.auto_backend("conv", torch.device("cuda", 0))


def test_explain_says_what_auto_does(monkeypatch):
    if not torch.cuda.is_available():
        assert "no GPU visible" in backends.explain_auto()[0]
    monkeypatch.setattr(backends, "arch_class", lambda index: "sm90")
    monkeypatch.setattr(backends, "why_unavailable", lambda name, device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    lines = backends.explain_auto(torch.device("cuda", 0))
    assert lines[0] == "auto on NVIDIA H200 (sm90):"
    assert [ln.split()[0] for ln in lines[1:]] == list(backends.FAMILIES)
    for fam, ln in zip(backends.FAMILIES, lines[1:]):
        assert f"-> {backends.AUTO_TABLE[fam]['sm90'][0]} " in ln
        assert "measured on an H200" in ln and backends.AUTO_RESULTS["sm90"] in ln


BENCH = {"attention": "bench_attention", "mlp": "bench_mlp", "lora": "bench_lora"}


@pytest.mark.parametrize("family", backends.FAMILIES)
def test_sm90_first_choice_is_the_faster_in_the_committed_gpu_run(family):
    """AUTO_TABLE's sm90 column follows the committed H200 results: over the cases that ran
    both backends forward+backward (the training step's mode), the first choice has the
    smaller geometric-mean time."""
    import csv
    import math
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, backends.AUTO_RESULTS["sm90"])
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["bench"] == BENCH[family]]
    assert {r["gpu"] for r in rows} == {"NVIDIA H200"}
    ms: dict = {}
    for r in rows:
        if r["mode"] == "fwd+bwd" and r["status"] == "ok" and r["ms"]:
            ms.setdefault(r["case"], {})[r["provider"]] = float(r["ms"])
    pairs = [
        (m["recon-cuda"], m["recon-triton"])
        for m in ms.values()
        if len(m.keys() & {"recon-cuda", "recon-triton"}) == 2
    ]
    assert len(pairs) >= 2, f"{path}: fewer than two {family} cases timed both backends"
    log_ratio = sum(math.log(c / t) for c, t in pairs) / len(pairs)  # < 0: cuda faster
    faster = "cuda" if log_ratio < 0 else "triton"
    assert backends.AUTO_TABLE[family]["sm90"][0] == faster, (family, math.exp(log_ratio))
