"""Scores relative to a reference: excess loss, a parameter average to take the reference from, and trimming.

Ranking tokens by their own loss selects the hardest ones, and in pretraining
that biases the model (the hardest tokens are often noise or unlearnable).
The rules that beat random selection subtract a reference: a token is worth
training on when the model is worse on it than a reference is (Rho-1,
RHO-LOSS). The reference is data here -- per-token scores from a small proxy
model, a checkpoint, the base model of a fine-tune, or an average of the
model's own past parameters (:func:`ema`) -- so every function stays pure.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from cggr_fn import _checks
from cggr_fn._ranking import difficulty_rank, selectable
from cggr_fn._scoring import UNSELECTABLE
from cggr_fn._stats import compute_dtype


def excess(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``scores - reference``: how much harder each token is for the model than for a reference.

    With ``scores`` the model's per-token loss and ``reference`` a reference
    model's loss on the same tokens (both e.g. from
    ``cggr_fn.score(logits, targets, method="loss")``), this is the excess
    loss of Rho-1 and RHO-LOSS: high where the model still has something to
    learn that the reference shows is learnable, low on noise that both find
    hard. Feed it to :func:`select` (top-k) or, clamped at 0, to
    :func:`priority_sample`.

    A position unselectable in either input (``-inf``, e.g. no target) is
    unselectable in the result; NaN in either input gives NaN, as does
    ``+inf`` in both (under :func:`checking` a NaN ``reference`` raises).

    Args:
      scores: floating tensor, any shape.
      reference: floating tensor of the same shape, on the same device.

    Returns:
      A tensor of ``scores.shape``, detached, in the wider of the two dtypes
      (float32 for 16-bit inputs).

    Example:
      >>> import torch, cggr_fn
      >>> nll = torch.tensor([3.0, 3.0, 0.5, float("-inf")])
      >>> reference_nll = torch.tensor([1.0, 3.0, 0.4, 2.0])
      >>> cggr_fn.excess(nll, reference_nll)
      tensor([2.0000, 0.0000, 0.1000,   -inf])
    """
    _checks.check_scores(scores, "scores")
    _checks.check_scores(reference, "reference")
    if reference.shape != scores.shape:
        raise ValueError(f"reference: expected the shape of scores {tuple(scores.shape)}, got {tuple(reference.shape)}")
    if reference.device != scores.device:
        raise ValueError(f"reference: expected the device of scores ({scores.device}), got {reference.device}")
    if _checks.value_checks_enabled() and bool(torch.isnan(reference).any()):  # sync-ok: checking mode only
        raise ValueError("reference: contains NaN")
    dtype = compute_dtype(torch.promote_types(scores.dtype, reference.dtype))
    scores, reference = scores.detach().to(dtype), reference.detach().to(dtype)
    return torch.where(selectable(scores) & selectable(reference), scores - reference, UNSELECTABLE)


def trim(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Make the hardest ``fraction`` of the selectable positions unselectable (``-inf``).

    Noise-aware selection: the very hardest tokens are disproportionately
    noise (misspellings, tables, boilerplate with unpredictable numbers), so
    selecting from below the top keeps a band of hard-but-learnable tokens,
    e.g. ``select(trim(scores, 0.05), ratio=0.25)``. The count is
    ``floor(fraction * m)`` of the ``m`` selectable positions (a 0-d tensor,
    no host sync); ranking as in :func:`select` (NaN first, ties by position).

    Args:
      scores: floating tensor, any shape; ``-inf`` marks unselectable positions.
      fraction: share of the selectable positions to drop, in ``[0, 1]``.

    Returns:
      A tensor like ``scores`` (detached, same dtype) with the dropped positions at ``-inf``.

    Example:
      >>> import torch, cggr_fn
      >>> cggr_fn.trim(torch.tensor([0.1, 9.0, 0.5, 0.3, float("-inf")]), 0.25)
      tensor([0.1000,   -inf, 0.5000, 0.3000,   -inf])
    """
    _checks.check_scores(scores, "scores")
    _checks.check_fraction(fraction, "fraction")
    flat = scores.detach().reshape(-1)
    count = torch.floor(float(fraction) * selectable(flat).sum().to(torch.float64)).to(torch.int64)
    dropped = difficulty_rank(flat) < count
    return torch.where(dropped, UNSELECTABLE, flat).reshape(scores.shape)


class EmaState(NamedTuple):
    """The state of :func:`ema`: ``average``, a pytree of tensors shaped like the parameters."""

    average: Any


class Ema(NamedTuple):
    """An exponential moving average as two pure functions (optax style); see :func:`ema`.

    Attributes:
      init: ``init(params) -> EmaState``, the average starting at ``params``.
      update: ``update(state, params) -> EmaState``, one step towards ``params``.
    """

    init: Any
    update: Any


def ema(step_size: float) -> Ema:
    """An exponential moving average of parameters, as explicit state: a reference without a second model.

    ``update`` moves every tensor of the average ``step_size`` of the way to
    the current parameters (``average + step_size * (params - average)``,
    in the average's dtype). The average is a pytree like the parameters, so
    ``torch.func.functional_call(model, state.average, ...)`` evaluates the
    averaged model: the loss under it minus the current loss (or the other
    way round) is a reference-free excess score (ssToken). Nothing is hidden
    in module state; ``init`` copies and ``update`` returns new tensors, so
    both are pure and compile.

    Args:
      step_size: weight of the current parameters in each update, in ``(0, 1]``
        (1 - the decay); ``0.05`` averages over about the last 20 steps.

    Returns:
      An :class:`Ema` ``(init, update)``.

    Example:
      >>> import torch, cggr_fn
      >>> average = cggr_fn.ema(0.5)
      >>> state = average.init({"w": torch.zeros(2)})
      >>> state = average.update(state, {"w": torch.ones(2)})
      >>> state.average["w"]
      tensor([0.5000, 0.5000])
    """
    _checks.check_fraction(step_size, "step_size", low_open=True)
    step_size = float(step_size)

    def init(params: Any) -> EmaState:
        return EmaState(pytree.tree_map(lambda p: p.detach().clone(), params))

    def update(state: EmaState, params: Any) -> EmaState:
        if not isinstance(state, EmaState):
            raise TypeError(f"state: expected an EmaState (from init), got {type(state).__name__}")
        if pytree.tree_structure(state.average) != pytree.tree_structure(params):
            raise ValueError("params: expected the structure of the average (the params given to init)")

        def step(average: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            if average.shape != p.shape:
                raise ValueError(f"params: expected a tensor of shape {tuple(average.shape)}, got {tuple(p.shape)}")
            return torch.lerp(average, p.detach().to(average.dtype), step_size)

        return EmaState(pytree.tree_map(step, state.average, params))

    return Ema(init, update)
