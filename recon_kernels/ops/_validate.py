"""Input checks shared by every op: errors name the argument, the expected and received value."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    layout: str = "",
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ok = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ok:
            want = " or ".join(f"{n}-D" for n in ok)
            lay = f" {layout}" if layout else ""
            raise ValueError(f"{name}: expected a {want} tensor{lay}, got shape {shape_str(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as the reference tensor."""
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: expected dtype {ref.dtype} (same as {ref_name}), got {t.dtype}")
    check_device(name, t, ref_name, ref)


def check_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name}: expected a tensor on {ref.device} (same as {ref_name}), got {t.device}"
        )


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected size {expected} ({what}) at dim {dim}, got shape {shape_str(t)}"
        )


def check_scale(name: str, scale: object) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"{name}: expected a Python float, got a tensor of shape {shape_str(scale)}"
            )
        scale = float(scale)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name}: expected a float, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite float, got {scale}")
    return scale
