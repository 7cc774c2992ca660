"""Difficulty scores: one float per token, higher = harder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

from cggr_fn import _checks
from cggr_fn._stats import TokenStats, token_stats

ScoreMethod = Union[str, Callable[[TokenStats], torch.Tensor]]

_METHODS: dict[str, Callable[[TokenStats], torch.Tensor]] = {
    "entropy": lambda s: s.entropy,
    "confidence": lambda s: 1.0 - s.confidence,
    "margin": lambda s: 1.0 - s.margin,
    "loss": lambda s: s.nll,
    "grad_norm": lambda s: s.grad_norm,
    # The seed's D_t = H(p) - max(p).
    "combined": lambda s: s.entropy - s.confidence,
}

#: Methods that score by the target and so need targets.
_NEEDS_TARGETS = {"loss": "the nll", "grad_norm": "||softmax - onehot(target)||"}

#: Score given to positions that must never be selected (target == ignore_index).
UNSELECTABLE = float("-inf")


def score(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    method: ScoreMethod = "combined",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Difficulty of every token, higher = harder.

    Methods: ``"entropy"`` (H), ``"confidence"`` (1 - max p), ``"margin"``
    (1 - (p1 - p2)), ``"loss"`` (the nll; needs targets), ``"grad_norm"``
    (``||softmax - onehot(target)||``, the norm of the token's logits
    gradient, in ``[0, sqrt(2)]``; needs targets), ``"combined"`` (H - max p,
    the seed's D_t), or a callable that maps a :class:`TokenStats` to a tensor
    of the same shape.

    Positions whose target is ``ignore_index`` score ``-inf``: every selection
    function treats ``-inf`` as "not selectable", so they are never selected.
    A NaN score (a row with NaN or ``+inf`` logits, an out-of-range target
    under ``"loss"`` or ``"grad_norm"``) is never hidden: selection ranks it as the hardest.

    Scores inherit the precision statement of :class:`TokenStats`: the same
    logits on the same path give bitwise the same scores run after run, the
    CUDA kernel and the reference agree within that tolerance, so tokens whose
    scores lie within it of each other may rank in a different order on the
    two paths. Given the same scores, :func:`select` and :func:`bucket` are
    bitwise identical on every device.

    Args:
      logits: ``(..., vocab)`` floating tensor.
      targets: optional integer tensor of shape ``logits.shape[:-1]``.
      method: one of the names above or a callable on :class:`TokenStats`.
      ignore_index: target value that marks a position without a label.

    Returns:
      A detached tensor of shape ``logits.shape[:-1]``, float32 or float64
      for float64 logits.

    Example:
      >>> import torch, cggr_fn
      >>> logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> cggr_fn.score(logits, method="confidence")
      tensor([0.0133, 0.5777, 0.6667])
      >>> cggr_fn.score(logits, torch.tensor([0, 1, -100]), method="loss")
      tensor([0.0134, 0.8620,   -inf])
      >>> cggr_fn.score(logits, torch.tensor([0, 1, -100]), method="grad_norm")
      tensor([0.0163, 0.7323,   -inf])
      >>> cggr_fn.score(logits.double()).dtype
      torch.float64
    """
    to_score = resolve_method(method, targets)
    stats = token_stats(logits, targets, ignore_index=ignore_index)
    return scores_from_stats(stats, targets, to_score, ignore_index)


def resolve_method(method: ScoreMethod, targets: torch.Tensor | None) -> Callable[[TokenStats], torch.Tensor]:
    """The function of :class:`TokenStats` that ``method`` names, checked before any statistic is computed."""
    if isinstance(method, str):
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {sorted(_METHODS)} or a callable, got {method!r}")
        if method in _NEEDS_TARGETS and targets is None:
            raise ValueError(f'method: "{method}" scores by {_NEEDS_TARGETS[method]} and needs targets, got targets=None')
        return _METHODS[method]
    if callable(method):
        return method
    raise TypeError(f"method: expected a str or a callable on TokenStats, got {type(method).__name__}")


def scores_from_stats(
    stats: TokenStats, targets: torch.Tensor | None, to_score: Callable[[TokenStats], torch.Tensor], ignore_index: int
) -> torch.Tensor:
    """:func:`score` from statistics already computed (the fused LM head computes them without logits)."""
    scores = to_score(stats)
    if not isinstance(scores, torch.Tensor) or scores.shape != stats.entropy.shape:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"method: the callable must return a tensor of shape {tuple(stats.entropy.shape)}, got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"method: the callable must return a floating-point tensor, got dtype {scores.dtype}")
    scores = scores.detach().to(stats.entropy.dtype)
    if targets is not None:
        scores = torch.where(targets == ignore_index, UNSELECTABLE, scores)
    return scores
