"""What both kernel backends derive from a key padding mask: per sequence, the number of
leading real keys and one past its last real key (``kpm_bounds``). The CUDA kernels take
the unmasked path on key tiles below the first (csrc AttnArgs::kpm_bounds) and every
kernel of both backends skips the key blocks from the second on.
"""

from __future__ import annotations

import torch

# the last mask's bounds: (mask, its _version, the stream, bounds). A model passes one
# padding mask to every layer, forward and backward: 7 small launches once per step
# instead of per call.
# Held by reference (its memory cannot be reused for another mask while cached); an
# in-place change bumps _version; never read while a CUDA graph captures (a replay must
# recompute them from the mask it is given).
_bounds_cache: tuple[torch.Tensor, int, int, torch.Tensor] | None = None


def kpm_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """int32 (B, 2) contiguous: per sequence the number of leading real keys and one past its
    last real key (0 for an all-padding one). A right-padded batch: every key tile but the
    boundary one is all real or all padding."""
    global _bounds_cache
    on_gpu = key_padding_mask.is_cuda
    capturing = on_gpu and torch.cuda.is_current_stream_capturing()
    # the stream that made them: another one could see their memory reused once replaced
    stream = torch.cuda.current_stream(key_padding_mask.device).cuda_stream if on_gpu else 0
    key = (key_padding_mask._version, stream)
    hit = _bounds_cache
    if not capturing and hit is not None and hit[0] is key_padding_mask and hit[1:3] == key:
        return hit[3]
    bounds = _kpm_bounds(key_padding_mask)
    _bounds_cache = (key_padding_mask, *key, bounds)
    return bounds


def _kpm_bounds(key_padding_mask: torch.Tensor) -> torch.Tensor:
    kp = key_padding_mask.to(torch.int32)
    nk = kp.shape[1]
    lead = kp.cumprod(1).sum(1)  # leading real keys
    pos = torch.arange(1, nk + 1, device=kp.device, dtype=torch.int32)
    end = (kp * pos).amax(1) if nk else lead  # one past the last real key (0: none)
    return torch.stack((lead, end), 1).to(torch.int32).contiguous()
