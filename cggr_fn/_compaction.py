"""Compacted execution: run the rows that carry gradient with autograd and the rest without.

Gating rows with :func:`cggr_fn.route_grad` decides which rows train but saves
nothing: the backward still multiplies every row, zeros included. Compaction
makes the backward cost scale with the routed rows. The rows are split by a
fixed ``capacity`` (a static size, so shapes never depend on the data): the
mask's true rows, and as many of the first false rows as fill the capacity,
run with autograd in row order; the others run under ``torch.no_grad``.
Padding rows (false rows taken to fill the capacity) are gated exactly as
:func:`route_grad` gates them, so the gradients equal the masking version's
whenever the mask holds at most ``capacity`` true rows.

Plain tensor ops only (a permutation of the rows, two calls, the inverse
permutation), so every transform composes: ``torch.func.grad``/``vjp``/
``vmap``, ``torch.compile`` with ``fullgraph=True``, CUDA graphs. (An
``autograd.Function`` that saves only the routed rows of a linear map's input
would spare the permutations, but compiled ``torch.func.grad`` of such a
Function computes wrong gradients on torch 2.13: the gathered rows it saves
come back as the whole input.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from cggr_fn import _checks


class Partition(NamedTuple):
    """A static split of the flattened rows of a mask; see :func:`partition`.

    Attributes:
      order: int64 ``(rows,)`` row indices, the routed rows first: the first
        ``capacity`` run with autograd, the rest without; each part in row
        order (attention over the routed queries relies on it).
      place: int64 ``(rows,)``, where each row sits in ``order`` (its inverse permutation).
      routed: int64 ``(capacity,)``, ``order[:capacity]``.
      keep: bool ``(capacity,)``, the mask at ``routed`` (false at padding rows).
    """

    order: torch.Tensor
    place: torch.Tensor
    routed: torch.Tensor
    keep: torch.Tensor


def partition(mask: torch.Tensor, capacity: int) -> Partition:
    """Split the rows of ``mask`` (flattened) into ``capacity`` routed rows and the rest.

    The routed rows are the true rows, filled up to ``capacity`` with the
    first false rows (padding), all in row order; true rows beyond the
    capacity go to the rest. Linear time and sync-free: each row's place
    comes from two cumulative sums, and the order is their inverse by one
    scatter of a permutation.
    """
    flat = mask.reshape(-1)
    n = flat.numel()
    rows = torch.arange(1, n + 1, device=mask.device)  # rows up to and including each
    trues = torch.cumsum(flat, 0)
    padding = capacity - (trues[-1:] if n else trues.new_zeros(1))
    routed_rows = torch.where(flat, trues <= capacity, rows - trues <= padding)
    ins = torch.cumsum(routed_rows, 0)
    # min(capacity, n) rows are routed, so the rest start at `capacity` whenever there is a rest.
    place = torch.where(routed_rows, ins - 1, capacity + (rows - ins) - 1)
    order = torch.zeros_like(place).scatter(0, place, rows - 1)
    routed = order[:capacity]
    return Partition(order, place, routed, flat.index_select(0, routed))


# Rows move by index_copy, never index_select: both are permutations, but the
# backward of index_copy is a gather, where that of index_select is a
# scatter-add (atomics; for 16-bit floats a kernel the compiler cannot fuse,
# which cost a 1B-parameter step more than a tenth of its time).
def to_partition_order(rows: torch.Tensor, part: Partition) -> torch.Tensor:
    """``rows[part.order]``: the routed rows first, then the rest."""
    return rows.new_empty(rows.shape).index_copy(0, part.place, rows)


def from_partition_order(rows: torch.Tensor, part: Partition) -> torch.Tensor:
    """The inverse of :func:`to_partition_order`: row ``j`` goes back to ``part.order[j]``."""
    return rows.new_empty(rows.shape).index_copy(0, part.order, rows)


def check_capacity(capacity: object, mask: torch.Tensor, name: str = "capacity") -> None:
    """``capacity`` is an int in ``[0, rows]``; under :func:`cggr_fn.checking` the mask fits in it."""
    _checks.check_int(capacity, name, minimum=0)
    if capacity > mask.numel():
        raise ValueError(f"{name}: expected at most the {mask.numel()} rows of the mask, got {capacity}")
    if _checks.value_checks_enabled():
        routed = int(mask.sum())  # sync-ok: checking mode only
        if routed > capacity:
            raise ValueError(
                f"{name}: the mask routes {routed} rows, more than the capacity of {capacity}; "
                "rows beyond the capacity would get no gradient"
            )


def compact_rows(fn: Callable[..., Any], mask: torch.Tensor, capacity: int) -> Callable[..., Any]:
    """``fn`` with only the routed rows of its inputs and outputs under autograd.

    ``fn`` must be token-wise: row ``i`` of every output depends only on row
    ``i`` of the inputs (tensor arguments whose leading dims are ``mask``'s
    shape are split; other arguments, e.g. weights, are passed whole to both
    calls). Outputs must have one row per input row.
    """

    def compacted(*args: Any, **kwargs: Any) -> Any:
        return call_compacted(fn, partition(mask, capacity), tuple(mask.shape), args, kwargs)

    return compacted


def call_compacted(fn: Callable[..., Any], part: Partition, shape: tuple[int, ...], args: tuple[Any, ...],
                   kwargs: dict[str, Any], *, ordered_in: bool = False, ordered_out: bool = False) -> Any:
    """``fn(*args, **kwargs)`` run as two calls, on the routed rows (autograd) and the rest (no autograd).

    ``ordered_in``: the split inputs' rows are already in partition order
    (:func:`to_partition_order`); ``ordered_out``: the outputs stay in it.
    A chain of token-wise calls that keeps its rows in partition order moves
    them once, not at every call.
    """
    lead = len(shape)
    capacity = part.routed.numel()

    rests: list[torch.Tensor] = []

    def split(leaf: Any) -> bool:
        return isinstance(leaf, torch.Tensor) and tuple(leaf.shape[:lead]) == shape

    def routed_rows(leaf: Any) -> Any:
        if not split(leaf):
            return leaf
        rows = leaf.reshape(-1, *leaf.shape[lead:])
        if not ordered_in:
            rows = to_partition_order(rows, part)
        rests.append(rows[capacity:].detach())
        return rows[:capacity]

    routed_args, routed_kwargs = optree.tree_map(routed_rows, (args, kwargs), none_is_leaf=True)
    # The same traversal again: each split leaf takes its rest rows in turn.
    rest_rows = iter(rests)
    rest_args, rest_kwargs = optree.tree_map(lambda leaf: next(rest_rows) if split(leaf) else leaf, (args, kwargs),
                                             none_is_leaf=True)
    routed_out = fn(*routed_args, **routed_kwargs)
    with torch.no_grad():
        rest_out = fn(*rest_args, **rest_kwargs)

    def join(routed: Any, rest: Any) -> Any:
        if not isinstance(routed, torch.Tensor):
            return routed
        if routed.dim() == 0 or routed.shape[0] != part.routed.numel():
            raise ValueError(
                "fn: compacted execution needs a token-wise fn (one output row per input row); "
                f"got an output of shape {tuple(routed.shape)} for {part.routed.numel()} routed rows"
            )
        if routed.is_floating_point() or routed.is_complex():
            keep = part.keep.reshape(-1, *([1] * (routed.dim() - 1)))
            # Padding rows (false rows that fill the capacity) are gated as route_grad gates them.
            routed = torch.where(keep, routed, routed.detach())
        joined = torch.cat([routed, rest.to(routed.dtype)], 0)
        if not ordered_out:
            joined = from_partition_order(joined, part)
        return joined.reshape(*shape, *routed.shape[1:])

    return optree.tree_map(join, routed_out, rest_out, none_is_leaf=True)
