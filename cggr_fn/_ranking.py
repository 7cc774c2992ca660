"""Difficulty ranks: the one ordering that bucketing and every selection strategy share."""

from __future__ import annotations

import math
import sys

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio

# A product ratio * n within a few ulps of the ratio's dtype from an integer is
# the rounding of a decimal ratio (0.3 * 10 is 3.0000000000000004 in float64;
# float32 0.3 is 0.30000001): it snaps to the integer instead of rounding up
# past it. Anything farther is a genuine fraction and rounds up.
_CAPACITY_ULPS = 4


def capacity(ratio: float, num_tokens: int) -> int:
    """How many tokens a keep ratio selects: ``k = ceil(ratio * num_tokens)``.

    A product within a few float64 ulps of an integer counts as that integer
    (the rounding of a decimal ratio, e.g. ``0.3 * 10``). Static: use it to size fixed-capacity buffers.

    Args:
      ratio: keep ratio in ``(0, 1]``.
      num_tokens: number of positions, >= 0.

    Returns:
      ``k`` in ``[min(1, num_tokens), num_tokens]``.

    Example:
      >>> import cggr_fn
      >>> cggr_fn.capacity(0.3, 10), cggr_fn.capacity(0.25, 10), cggr_fn.capacity(1e-9, 10)
      (3, 3, 1)
    """
    _checks.check_fraction(ratio, "ratio", low_open=True)
    _checks.check_int(num_tokens, "num_tokens", minimum=0)
    product = ratio * num_tokens
    nearest = round(product)
    tolerance = _CAPACITY_ULPS * sys.float_info.epsilon * max(product, 1.0)
    k = nearest if abs(product - nearest) <= tolerance else math.ceil(product)
    return min(num_tokens, max(k, min(1, num_tokens)))


def capacity_tensor(ratio: Ratio, num_tokens: int) -> int | torch.Tensor:
    """:func:`capacity` for a Python ratio, or the same rule as a 0-d tensor for a tensor ratio.

    The tensor stays on the ratio's device: a 0-d tensor mixes with tensors on
    any device without a copy, so nothing synchronises. The snap tolerance is a
    few ulps of the ratio's dtype: a float32 ratio determines ``k`` only to
    about ``1e-6 * k``; pass a float64 ratio for exact counts beyond ~10**5.
    """
    _checks.check_ratio(ratio)
    if not isinstance(ratio, torch.Tensor):
        return capacity(ratio, num_tokens)
    product = ratio.double() * num_tokens
    nearest = product.round()
    tolerance = _CAPACITY_ULPS * torch.finfo(ratio.dtype).eps * product.clamp_min(1.0)
    snap = (product - nearest).abs() <= tolerance
    k = torch.where(snap, nearest, product.ceil()).long()
    return k.clamp(min(1, num_tokens), num_tokens)


def sort_key(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a sort key: NaN counts as the hardest (+inf), never hidden."""
    # float64 scores keep their precision; everything else ranks in float32.
    scores = scores if scores.dtype == torch.float64 else scores.float()
    return torch.where(torch.isnan(scores), float("inf"), scores)


def selectable(scores: torch.Tensor) -> torch.Tensor:
    """Positions that may be selected: every score except ``-inf``."""
    return ~torch.isneginf(scores)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``rank`` with ``rank[order[i]] = i`` along the last dim."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter(-1, order, positions)


def difficulty_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score along the last dim, 0 = hardest.

    Descending by score, NaN first, ``-inf`` last; equal scores rank by
    position (earlier = harder). A stable sort makes the ties deterministic on
    every device.
    """
    order = torch.sort(sort_key(scores), dim=-1, descending=True, stable=True).indices
    return inverse_permutation(order)
