"""Difficulty ranks: the one ordering that bucketing and every selection strategy share."""

from __future__ import annotations

import math

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio

# Two ratios whose products with n differ by less than this relative amount are
# rounding noise (0.3 * 10 is 3.0000000000000004 in float64; float32 0.3 is
# 0.30000001): they snap to the integer instead of rounding up past it.
_CAPACITY_RTOL = 1e-6


def capacity(ratio: float, num_tokens: int) -> int:
    """How many tokens a keep ratio selects: ``k = ceil(ratio * num_tokens)``.

    A product within a relative 1e-6 of an integer counts as that integer (float
    rounding, e.g. ``0.3 * 10``). Static: use it to size fixed-capacity buffers.

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
    k = nearest if abs(product - nearest) <= _CAPACITY_RTOL * max(product, 1.0) else math.ceil(product)
    return min(num_tokens, max(k, min(1, num_tokens)))


def capacity_tensor(ratio: Ratio, num_tokens: int, device: torch.device) -> int | torch.Tensor:
    """:func:`capacity` for a Python ratio, or the same rule on-device for a tensor ratio."""
    _checks.check_ratio(ratio)
    if not isinstance(ratio, torch.Tensor):
        return capacity(ratio, num_tokens)
    product = ratio.to(device=device, dtype=torch.float64) * num_tokens
    nearest = product.round()
    snap = (product - nearest).abs() <= _CAPACITY_RTOL * product.clamp_min(1.0)
    k = torch.where(snap, nearest, product.ceil()).long()
    return k.clamp(min(1, num_tokens), num_tokens)


def sort_key(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a sort key: NaN counts as the hardest (+inf), never hidden."""
    scores = scores.float()
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
