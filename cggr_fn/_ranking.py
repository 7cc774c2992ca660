"""Difficulty ranks: the one ordering that bucketing and every selection strategy share."""

from __future__ import annotations

import math
import sys

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio
from cggr_fn._stats import compute_dtype

# A product ratio * n within a few ulps of the ratio's dtype from an integer is
# the rounding of a decimal ratio (0.3 * 10 is 3.0000000000000004 in float64;
# float32 0.3 is 0.30000001): it snaps to the integer instead of rounding up
# past it. Anything farther is a genuine fraction and rounds up.
_CAPACITY_ULPS = 4


def capacity(num_tokens: int, *, ratio: Ratio) -> int | torch.Tensor:
    """How many tokens a keep ratio selects: ``k = ceil(ratio * num_tokens)``.

    A product within a few ulps of the ratio's dtype from an integer counts as
    that integer (the rounding of a decimal ratio, e.g. ``0.3 * 10``), and
    ``k`` is at least 1 (when there is a token). A Python ``ratio`` gives a
    Python int: static, to size fixed-capacity buffers. A 0-d floating tensor
    ratio gives ``k`` by the same rule as a 0-d int64 tensor on the ratio's
    device, without a host sync; a float32 ratio determines ``k`` only to
    about ``1e-6 * k``, so pass a float64 ratio (as :func:`ratio_schedule`
    returns for a tensor step) for exact counts beyond ~10**5.

    A tensor ratio is not checked outside :func:`checking` (that would need a
    sync): one outside ``(0, 1]`` is clamped into it (at most 0 selects one
    token, above 1 every token), and NaN selects every token, the side that
    keeps a broken ratio visible as standard training instead of hiding
    tokens. :func:`checking` raises on all of these.

    Args:
      num_tokens: number of positions, >= 0.
      ratio: keep ratio in ``(0, 1]``, a float or a 0-d floating tensor.

    Returns:
      ``k`` in ``[min(1, num_tokens), num_tokens]``: an int for a Python
      ratio, a 0-d int64 tensor for a tensor ratio.

    Example:
      >>> import torch, cggr_fn
      >>> cggr_fn.capacity(10, ratio=0.3), cggr_fn.capacity(10, ratio=0.25), cggr_fn.capacity(10, ratio=1e-9)
      (3, 3, 1)
      >>> cggr_fn.capacity(10, ratio=torch.tensor(0.25, dtype=torch.float64))
      tensor(3)
    """
    _checks.check_int(num_tokens, "num_tokens", minimum=0)
    _checks.check_ratio(ratio)
    if isinstance(ratio, torch.Tensor):
        return _tensor_capacity(ratio, num_tokens)
    product = ratio * num_tokens
    nearest = round(product)
    tolerance = _CAPACITY_ULPS * sys.float_info.epsilon * max(product, 1.0)
    k = nearest if abs(product - nearest) <= tolerance else math.ceil(product)
    return min(num_tokens, max(k, min(1, num_tokens)))


def _tensor_capacity(ratio: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """:func:`capacity`'s rule on-device; out-of-range and NaN ratios as documented there."""
    # NaN counts as "all tokens"; clamping the product before the int cast
    # keeps ratios such as 2.0 or inf from overflowing int64.
    product = torch.nan_to_num(ratio.double() * num_tokens, nan=num_tokens).clamp(0, num_tokens)
    nearest = product.round()
    tolerance = _CAPACITY_ULPS * torch.finfo(ratio.dtype).eps * product.clamp_min(1.0)
    snap = (product - nearest).abs() <= tolerance
    k = torch.where(snap, nearest, product.ceil()).long()
    return k.clamp(min(1, num_tokens), num_tokens)


def difficulty_order(scores: torch.Tensor) -> torch.Tensor:
    """Positions along the last dim, hardest first: NaN, ``+inf``, finite descending, ``-inf``.

    Equal scores keep their positional order (``-0.0`` equals ``0.0``), so ties
    break by position on every device. float64 scores sort in float64, every
    other float dtype widens exactly to float32.
    """
    scores = scores.to(compute_dtype(scores.dtype))
    # -0.0 and 0.0 are distinct keys to a radix sort; a where() (not "+ 0.0",
    # which a compiler may drop as a no-op) makes them one value.
    nan = torch.isnan(scores)
    key = torch.where(nan, float("inf"), torch.where(scores == 0, 0.0, scores))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # No float lies above +inf for NaN to take, so NaN and +inf share a key; a
    # second stable pass over NaN-ness alone moves NaN first. (Viewing the
    # floats' bits as integers would avoid it, but has no vmap rule in torch 2.11.)
    nan_first = torch.sort(nan.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return order.gather(-1, nan_first)


def selectable(scores: torch.Tensor) -> torch.Tensor:
    """Positions that may be selected: every score except ``-inf``."""
    return ~torch.isneginf(scores)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``rank`` with ``rank[order[i]] = i`` along the last dim."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter(-1, order, positions)


def difficulty_rank(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every score along the last dim, 0 = hardest.

    Descending by score, NaN first (before ``+inf``), ``-inf`` last; equal scores rank by
    position (earlier = harder). A stable sort makes the ties deterministic on
    every device.
    """
    return inverse_permutation(difficulty_order(scores))
