"""Seeds derived from (run seed, purpose, step): every random draw of a run comes from its own
generator, never from a running RNG, so a resumed run repeats the uninterrupted one exactly
and the global batch of a step is the same for any number of processes."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from (seed, parts): independent streams per purpose and step."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
