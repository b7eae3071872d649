"""A drop-in ``torch.nn.functional.scaled_dot_product_attention`` routed to the fused ops.

``scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
is_causal=False, scale=None, enable_gqa=False)`` has torch's signature and semantics:

* query (..., L, E), key (..., S, E), value (..., S, Ev); batch dims broadcast as in torch;
  any rank >= 2 (flattened to the ops' (B, H, N, D) layout and back).
* attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
  (..., L, S). A bool mask that only varies over batch and key (shape (B, 1, 1, S), or an
  ``expand`` of it, like Hugging Face's padding masks) takes the key-padding fast path, which
  reads B*S bytes; any other bool mask is read through its broadcast strides.
* is_causal: TOP-LEFT aligned, as torch does: query i sees keys j <= i, whatever L and S.
  ``rk.causal_attention`` is bottom-right aligned (query i sees j <= i + S - L, the kv-cache
  convention); the two agree only when L == S. Here L < S runs causal_attention on the first
  L keys (the others are never visible), L > S runs a (L, S) lower-triangular mask.
  is_causal with a bool attn_mask computes the AND of both, as torch's CPU path does.
* scale: defaults to 1/sqrt(E).
* dropout_p: applied, as torch does, whatever the caller's training mode, by the fused
  kernels' own dropout (a hash of the seed and the position, the seed drawn from torch's
  generator): the same distribution as torch's dropout, other random numbers.
* Rows with no allowed key return 0, as torch (>= 2.5) does for bool and -inf masks.

Float masks: the kernels take boolean masks only. ``float_masks=`` says what to do with
a float attn_mask:

==========  ===========================================================================
fallback    (default) torch's SDPA computes it. Safe for any additive bias; no sync.
binary      the caller states the mask holds 0 where attention is allowed and a large
            negative number (-inf, finfo.min, -1e4) elsewhere: ``mask == 0`` becomes the
            bool mask, no data check (compile-friendly). A fully masked row then gives 0,
            where torch gives the uniform average for finfo.min masks.
check       verify the values once per mask tensor (one device sync, cached on the tensor
            object and its version counter, so a mask shared by all layers is checked
            once per forward); converted when every value is 0 or <= finfo(dtype).min and
            no fully masked row uses finfo.min (torch gives uniform attention there, we
            would give 0); otherwise torch computes it. The check is data-dependent: a graph
            break under torch.compile.
==========  ===========================================================================

Falls back to torch's own SDPA (logging one warning per reason, never a silent difference) for:

* ``enable_gqa=True`` with fewer key/value heads than query heads;
* a float attn_mask (per ``float_masks`` above), including float mask + is_causal;
* what the kernels do not take: value head dim != query head dim, head dim > 256,
  dtypes other than float16/bfloat16/float32/float64, empty tensors;
* inputs torch itself rejects (mixed dtypes or devices, shapes that do not broadcast, a mask
  of another dtype): torch raises its own error.

Under ``torch.autocast`` the inputs are cast to the autocast dtype first (torch's policy for
SDPA) and the op runs with autocast off. ``patch_sdpa()`` swaps
``torch.nn.functional.scaled_dot_product_attention`` for this function for the duration of a
``with`` block (restored on exit, also on exceptions); code that imported the function by
name before the patch (``from torch.nn.functional import scaled_dot_product_attention``)
keeps torch's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..ops import causal_attention, masked_softmax_attention
from ..ops.attention import MAX_HEAD_DIM
from ._log import warn_once

logger = logging.getLogger(__name__)

# The builtin itself, not the (possibly patched) attribute of torch.nn.functional.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

FLOAT_MASK_POLICIES = ("fallback", "binary", "check")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _warn_once(reason: str) -> None:
    warn_once(
        logger,
        reason,
        "recon_kernels scaled_dot_product_attention: %s; falling back to "
        "torch.nn.functional.scaled_dot_product_attention (said once per reason)",
    )


# --------------------------------------------------------------------------- helpers


def collapse_broadcast(mask: torch.Tensor) -> torch.Tensor:
    """View of ``mask`` with every stride-0 (expanded) dim of size > 1 cut to size 1.

    Exact for any tensor (an expanded dim holds one value), decided on metadata only, so it
    costs nothing and does not break a torch.compile graph."""
    idx = tuple(
        slice(0, 1) if (n > 1 and st == 0) else slice(None)
        for n, st in zip(mask.shape, mask.stride())
    )
    return mask[idx]


# Per-tensor cache of the "check" policy's verdict: (weakref to the mask, its version) -> bool.
_check_cache: dict[int, tuple[weakref.ref, int, bool]] = {}


def _check_float_mask_values(mask: torch.Tensor) -> bool:
    """True when every value is 0 or <= finfo.min (-inf included) and no fully masked row
    uses a finite finfo.min (where torch's softmax is uniform and ours is 0). One sync."""
    with torch.no_grad():
        zero = mask == 0
        neg = mask <= torch.finfo(mask.dtype).min
        all_binary = (zero | neg).all()
        row_masked = ~zero.any(-1)
        finite_min_row = (row_masked & (mask > float("-inf")).any(-1)).any()
        return bool((all_binary & ~finite_min_row).item())


def _float_mask_is_binary(mask: torch.Tensor) -> bool:
    """``_check_float_mask_values``, cached on the tensor object and its version counter."""
    key = id(mask)
    hit = _check_cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    ok = _check_float_mask_values(mask)
    if len(_check_cache) > 64:
        _check_cache.clear()
    _check_cache[key] = (weakref.ref(mask), mask._version, ok)
    return ok


def _to_4d(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """(*lead, N, D) -> (B, H, N, D), a view whenever possible."""
    if len(lead) == 0:
        return t[None, None]
    if len(lead) == 1:
        return t[:, None]
    if len(lead) == 2:
        return t
    return t.reshape(-1, *t.shape[-3:])


# --------------------------------------------------------------------------- the entry point


def _fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, float_masks):
    """Why torch must compute this call (None: the fused ops can). Metadata only."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
    if min(query.dim(), key.dim(), value.dim()) < 2:
        return "query/key/value of rank < 2"
    if query.dtype not in _KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes query {query.dtype}, key {key.dtype}, value {value.dtype} (need one of float16/bfloat16/float32/float64)"
    if not (query.device == key.device == value.device):
        return "query/key/value on different devices"
    E = query.shape[-1]
    if key.shape[-1] != E or value.shape[-1] != E:
        return "key/value head dims differ from query's (E, Ev must equal)"
    if E > MAX_HEAD_DIM:
        return f"head dim {E} > {MAX_HEAD_DIM}"
    if key.shape[-2] != value.shape[-2]:
        return "key and value sequence lengths differ"
    if query.numel() == 0 or key.numel() == 0:
        return "empty inputs"
    if enable_gqa and query.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        return "enable_gqa with fewer key/value heads than query heads"
    try:
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    except RuntimeError:
        return "batch dims of query/key/value do not broadcast"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return "attn_mask is not a tensor"
        if attn_mask.device != query.device:
            return "attn_mask on another device"
        full = (*lead, query.shape[-2], key.shape[-2])
        try:
            if torch.broadcast_shapes(attn_mask.shape, full) != torch.Size(full):
                return "attn_mask does not broadcast to (..., L, S)"
        except RuntimeError:
            return "attn_mask does not broadcast to (..., L, S)"
        if attn_mask.dtype != torch.bool:
            if attn_mask.dtype != query.dtype:
                return f"attn_mask dtype {attn_mask.dtype} is neither bool nor query's dtype"
            if float_masks == "fallback":
                return "a float attn_mask (float_masks='fallback'; pass a bool mask for the fused path)"
            if is_causal:
                return "a float attn_mask together with is_causal"
            if attn_mask.requires_grad:
                return "a float attn_mask that requires grad (a learned bias)"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
    float_masks: str = "fallback",
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by the fused ops.

    query: (..., L, E); key, value: (..., S, E). attn_mask: bool (True = attend) or float
    (additive), broadcastable to (..., L, S). is_causal is top-left aligned (torch's rule;
    ``rk.causal_attention`` is bottom-right). Returns (..., L, E) in query's dtype (the
    autocast dtype under autocast). ``backend`` (keyword only, not in torch's signature):
    None takes the process default. ``float_masks``: "fallback" | "binary" | "check", see the
    module docstring, which also lists every case torch's own SDPA computes instead.
    """
    if float_masks not in FLOAT_MASK_POLICIES:
        raise ValueError(f"float_masks: expected one of {FLOAT_MASK_POLICIES}, got {float_masks!r}")
    reason = _fallback_reason(
        query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, float_masks
    )
    if reason is None and attn_mask is not None and attn_mask.dtype != torch.bool:
        if float_masks == "check" and not _float_mask_is_binary(attn_mask):
            reason = "a float attn_mask with values other than 0 and -inf/finfo.min (or a fully masked finfo.min row)"
    if reason is not None:
        _warn_once(reason)
        kw = {"enable_gqa": True} if enable_gqa else {}
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **kw,
        )
    return _fused_sdpa(query, key, value, attn_mask, is_causal, scale, backend, dropout_p)


def _fused_sdpa(query, key, value, attn_mask, is_causal, scale, backend, dropout_p=0.0):
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask == 0  # verified (check) or stated (binary) to be 0 / -inf
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    q = _to_4d(query.expand(*lead, L, E), lead)  # (B, H, L, E)
    k = _to_4d(key.expand(*lead, S, E), lead)  # (B, H, S, E)
    v = _to_4d(value.expand(*lead, S, E), lead)  # (B, H, S, E)
    B = q.shape[0]

    mask = None
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < len(lead) + 2:
            m = m[None]
        if len(lead) > 2:
            m = m.expand(*lead[:-1], *m.shape[-3:]).reshape(-1, *m.shape[-3:])
        mask = collapse_broadcast(_to_4d(m, lead) if len(lead) <= 2 else m)  # (B|1, H|1, L|1, S|1)

    # the ops follow torch.autocast themselves (inputs cast like torch does for SDPA)
    if is_causal and mask is None and L <= S:
        # top-left == bottom-right on the first L keys; keys >= L are never visible
        out = causal_attention(
            q, k[:, :, :L], v[:, :, :L], scale=scale, dropout_p=dropout_p, backend=backend
        )
    else:
        if is_causal:
            tril = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()  # j <= i
            mask = tril[None, None] if mask is None else mask & tril
        kpm = None
        if mask is not None and mask.shape[1] == 1 and mask.shape[2] == 1:
            kpm = mask[:, 0, 0, :].expand(B, S)  # (B, S): the key-padding fast path
            mask = None
        out = masked_softmax_attention(
            q,
            k,
            v,
            mask,
            key_padding_mask=kpm,
            scale=scale,
            dropout_p=dropout_p,
            backend=backend,
        )
    return out.reshape(*lead, L, E)  # (..., L, E)


@contextlib.contextmanager
def patch_sdpa(*, backend: str | None = None, float_masks: str = "fallback") -> Iterator[None]:
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` with the fused version
    while the block runs; the original is restored on exit, also when the block raises.

    Everything that looks the function up as ``F.scaled_dot_product_attention`` /
    ``torch.nn.functional.scaled_dot_product_attention`` at call time is covered (Hugging
    Face's ``attn_implementation="sdpa"``, ``nn.MultiheadAttention``'s fast path does NOT
    use it). Not re-entrant across threads: the patch is process-wide.
    """
    if float_masks not in FLOAT_MASK_POLICIES:
        raise ValueError(f"float_masks: expected one of {FLOAT_MASK_POLICIES}, got {float_masks!r}")
    original = F.scaled_dot_product_attention

    @functools.wraps(scaled_dot_product_attention)
    def patched(
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
    ):
        return scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            backend=backend,
            float_masks=float_masks,
        )

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
