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
    assert all("-> triton" in ln and "HGMMA" in ln for ln in lines[1:])
