"""What ``recon compare`` tests: the pretraining objectives and baselines, the evaluation
protocols, and the claims of the pretraining notes as signed sums of accuracies."""

from __future__ import annotations

from dataclasses import dataclass

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
