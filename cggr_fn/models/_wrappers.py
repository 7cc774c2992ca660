"""The seed's wrappers (CGGRModel, CGGRScorer, CGGRLoss) as pure functions over logits and a router."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio, Step
from cggr_fn._loss import selective_loss
from cggr_fn._ranking import capacity, difficulty_order
from cggr_fn._reference import excess
from cggr_fn._scoring import ScoreMethod, score
from cggr_fn._selection import select
from cggr_fn._stats import compute_dtype
from cggr_fn.models._common import check_model, default_kwargs
from cggr_fn.models._router import TruncatedRouter


def lm_targets(
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-position targets aligned with the logits: what position ``t``'s logits predict.

    For a causal LM, position ``t`` predicts token ``t + 1``: the targets are
    ``labels`` shifted left by one, and the last position has none
    (``ignore_index``) -- the shift Hugging Face applies inside its loss when
    ``labels=`` is passed. For a masked LM (``causal=False``) the targets are
    the labels. With an ``attention_mask``, a target that is padding becomes
    ``ignore_index`` too, so padding is never predicted whatever its labels
    hold. Only targets are masked, as in the model's own loss: with left
    padding the last pad position predicts the first real token and keeps
    that target, so a loss over these targets equals the model's loss from
    ``labels=torch.where(attention_mask, input_ids, -100)``.

    Args:
      labels: ``(..., seq)`` integer tensor; ``ignore_index`` marks no label.
      attention_mask: optional ``(..., seq)`` tensor, nonzero at real tokens.
      causal: shift for next-token prediction.
      ignore_index: the "no label" value.

    Returns:
      An int64 tensor of ``labels.shape``.

    Example:
      >>> import torch
      >>> from cggr_fn.models import lm_targets
      >>> lm_targets(torch.tensor([[5, 6, 7, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))  # right padding
      tensor([[   6,    7, -100, -100]])
      >>> lm_targets(torch.tensor([[0, 5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1, 1]]))  # left padding
      tensor([[   5,    6,    7, -100]])
    """
    _check_labels(labels, "labels")
    _checks.check_int(ignore_index, "ignore_index")
    labels = labels.long()
    if attention_mask is not None:
        labels = torch.where(_real_tokens(attention_mask, labels.shape), labels, ignore_index)
    if causal:
        labels = torch.cat([labels[..., 1:], labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    return labels


def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    method: ScoreMethod = "combined",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Difficulty of every position of a language-model batch, aligned with the logits.

    :func:`cggr_fn.score` of ``logits`` against :func:`lm_targets` of
    ``labels`` (shifted for a causal LM), so position ``t`` is scored by its own
    prediction. Positions without a target score ``-inf``, so no selection
    ever picks them: the last position of a causal LM, ``ignore_index``
    labels, and every position whose target is padding (``attention_mask ==
    0``). These are exactly the positions the model's own loss from
    ``labels=`` leaves out, so a position is scored iff :func:`lm_loss`
    trains it; with left padding that includes the last pad position, which
    predicts the first real token. Without labels there are no targets:
    every non-padding position is scored (methods that need no target only).

    Args:
      logits: ``(batch, seq, vocab)`` floating tensor, e.g. from a :class:`TruncatedRouter`.
      labels: optional ``(batch, seq)`` integer labels, as passed to a Hugging Face model.
      attention_mask: optional ``(batch, seq)`` mask, nonzero at real tokens.
      causal: labels are next-token labels (shift by one); ``False`` for masked LMs.
      method: a :func:`cggr_fn.score` method.
      ignore_index: the "no label" value.

    Returns:
      A ``(batch, seq)`` tensor, detached, as :func:`cggr_fn.score` returns it.

    Example:
      >>> import torch
      >>> from cggr_fn.models import token_scores
      >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]])
      >>> token_scores(logits, torch.tensor([[0, 1, 0]]), method="loss")
      tensor([[2.1269, 0.6931,   -inf]])
    """
    _checks.check_logits(logits)
    if labels is not None:
        targets = lm_targets(labels, attention_mask=attention_mask, causal=causal, ignore_index=ignore_index)
        return score(logits, targets, method=method, ignore_index=ignore_index)
    scores = score(logits, method=method, ignore_index=ignore_index)
    if attention_mask is not None:
        scores = torch.where(_real_tokens(attention_mask, scores.shape), scores, float("-inf"))
    return scores


def sequence_scores(scores: torch.Tensor) -> torch.Tensor:
    """Mean difficulty of every sequence over its scored positions (those above ``-inf``).

    A sequence with no scored position gets ``-inf`` (never among the
    hardest); a NaN score makes its sequence NaN (ranked hardest, never hidden).

    Args:
      scores: ``(batch, seq)`` floating scores, e.g. from :func:`token_scores`.

    Returns:
      A ``(batch,)`` tensor: float32 for 16-bit scores, else the scores' dtype.

    Example:
      >>> import torch
      >>> from cggr_fn.models import sequence_scores
      >>> inf = float("inf")
      >>> sequence_scores(torch.tensor([[1.0, 3.0, -inf], [-inf, -inf, -inf]]))
      tensor([2., -inf])
    """
    _checks.check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores: expected a (batch, seq) tensor, got shape {tuple(scores.shape)}")
    scores = scores.to(compute_dtype(scores.dtype))
    scored = ~torch.isneginf(scores)
    count = scored.sum(-1)
    mean = torch.where(scored, scores, 0.0).sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, mean, float("-inf"))


def hardest_sequences(scores: torch.Tensor, *, ratio: float) -> torch.Tensor:
    """Indices of the ``capacity(batch, ratio=ratio)`` sequences of highest mean difficulty.

    A static number of sequences (``ratio`` must be a Python float, so the
    training subset has a fixed shape), ranked by :func:`sequence_scores`
    with the core's order: NaN hardest, ties by position. Returned in
    ascending batch order.

    Args:
      scores: ``(batch, seq)`` per-position scores, e.g. from :func:`token_scores`.
      ratio: fraction of the sequences to keep, in ``(0, 1]``.

    Returns:
      An int64 tensor of ``capacity(batch, ratio=ratio)`` distinct indices.

    Example:
      >>> import torch
      >>> from cggr_fn.models import hardest_sequences
      >>> hardest_sequences(torch.tensor([[0.1, 0.2], [0.9, 0.8], [0.5, 0.5], [0.7, 0.0]]), ratio=0.5)
      tensor([1, 2])
    """
    if isinstance(ratio, torch.Tensor):
        raise TypeError("ratio: expected a Python float (the number of sequences is a static shape), got a tensor")
    per_sequence = sequence_scores(scores)
    k = capacity(per_sequence.numel(), ratio=ratio)
    order = difficulty_order(per_sequence)
    return order[:k].sort().values


def take_sequences(
    batch: Mapping[str, Any], indices: torch.Tensor, *, batch_shape: tuple[int, int]
) -> dict[str, Any]:
    """Rows ``indices`` of every per-token tensor in ``batch``; other values pass unchanged.

    The rule is by shape, not by name: a tensor is gathered when its leading
    dims are ``batch_shape``, the ``(batch, seq)`` shape of ``input_ids``
    (``input_ids``, ``labels``, a 2-d ``attention_mask``, per-sequence
    ``position_ids``, ``inputs_embeds``). Every other value passes unchanged:
    scalars, 1-d tensors (a ``cache_position`` of shape ``(seq,)`` even when
    ``seq == batch``), a broadcast ``position_ids`` of shape ``(1, seq)``. A
    tensor that starts with the batch dim but not with ``(batch, seq)`` (a
    4-d attention mask, say) is ambiguous and raises rather than being
    guessed. Static shapes; no host sync.

    Args:
      batch: keyword arguments of a model call, e.g. ``input_ids``, ``labels``, ``attention_mask``.
      indices: int64 ``(k,)`` indices, e.g. from :func:`hardest_sequences`.
      batch_shape: ``(batch, seq)``, e.g. ``input_ids.shape``.

    Returns:
      A new dict with the same keys.

    Example:
      >>> import torch
      >>> from cggr_fn.models import take_sequences
      >>> batch = {"input_ids": torch.arange(6).reshape(3, 2), "cache_position": torch.arange(2), "use_cache": False}
      >>> take_sequences(batch, torch.tensor([2]), batch_shape=(3, 2))
      {'input_ids': tensor([[4, 5]]), 'cache_position': tensor([0, 1]), 'use_cache': False}
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a mapping of model keyword arguments, got {type(batch).__name__}")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
        raise TypeError(f"indices: expected a 1-d int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    shape = tuple(batch_shape) if isinstance(batch_shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 2:
        raise TypeError(f"batch_shape: expected the (batch, seq) shape of input_ids, got {batch_shape!r}")
    for size in shape:
        _checks.check_int(size, "batch_shape", minimum=0)
    return {key: _take(key, value, indices, shape) for key, value in batch.items()}


def _take(key: str, value: Any, indices: torch.Tensor, shape: tuple[int, ...]) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return value
    if tuple(value.shape[:2]) == shape:
        return value.index_select(0, indices.to(value.device))
    if value.shape[0] == shape[0] and shape[0] != 1:
        raise ValueError(
            f"batch: {key!r} of shape {tuple(value.shape)} starts with the batch dim but not with the (batch, seq) "
            f"shape {shape} of input_ids, so it is neither gathered nor passed whole; gather it yourself "
            "(value.index_select(0, indices)) or pass a 2-d attention_mask"
        )
    return value


def hardest_sequence_loss(
    model: nn.Module,
    router: TruncatedRouter,
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    ratio: float,
    causal: bool = True,
    method: ScoreMethod = "combined",
    ignore_index: int = -100,
    reference: torch.Tensor | None = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Train on the hardest sequences of the batch: router pass, pick, full forward on the subset.

    Replaces the seed's ``CGGRModel(model, router, min_tokens_ratio)``. Scores
    every position with the router (:func:`token_scores`, next-token aligned
    for a causal LM, padding excluded), keeps the :func:`hardest_sequences`
    (a static ``capacity(batch, ratio=ratio)`` of them), gathers
    ``input_ids``, ``labels`` and every per-token model keyword argument
    (leading dims ``(batch, seq)``, e.g. ``attention_mask``) with
    :func:`take_sequences`, runs ``model`` on that
    subset through :func:`torch.func.functional_call` with ``params``, and
    returns :func:`lm_loss` of its logits (the mean over labelled positions,
    as the model computes from ``labels=``). With ``reference`` (per-token
    scores of a reference model on the same batch, aligned like
    :func:`token_scores`), sequences are ranked by their mean excess score
    (:func:`cggr_fn.excess`), the excess-loss rule at sequence granularity.
    Differentiable in ``params``
    (the selection is a constant); compiles with
    ``torch.compile(fullgraph=True)``.

    Args:
      model: a Hugging Face model that returns ``.logits``.
      router: a :class:`TruncatedRouter` of ``model``.
      params: the model's parameters by name, e.g. ``dict(model.named_parameters())``.
      input_ids: ``(batch, seq)`` token ids.
      labels: ``(batch, seq)`` labels (``ignore_index`` = no label).
      ratio: fraction of sequences to train on, a Python float in ``(0, 1]``.
      causal: ``labels`` are next-token labels; ``False`` for masked LMs.
      method: a :func:`cggr_fn.score` method for the router's logits.
      ignore_index: the "no label" value.
      reference: optional ``(batch, seq)`` reference scores to subtract.
      **model_kwargs: further model arguments, e.g. ``attention_mask``.

    Returns:
      The model's 0-d loss on the selected sequences.

    Example:
      >>> import torch, transformers
      >>> from cggr_fn.models import hardest_sequence_loss, truncated_router
      >>> config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=8)
      >>> model = transformers.GPT2LMHeadModel(config)
      >>> router = truncated_router(model, num_layers=1)
      >>> params = dict(model.named_parameters())
      >>> ids = torch.randint(0, 32, (4, 6))
      >>> loss = hardest_sequence_loss(model, router, params, ids, ids, ratio=0.5)
      >>> loss.backward()  # trains on 2 of the 4 sequences
    """
    check_model(model)
    if not isinstance(router, TruncatedRouter):
        raise TypeError(f"router: expected a TruncatedRouter (from truncated_router), got {type(router).__name__}")
    logits = router(params, input_ids, **model_kwargs)
    scores = token_scores(
        logits, labels, attention_mask=model_kwargs.get("attention_mask"), causal=causal, method=method,
        ignore_index=ignore_index,
    )
    if reference is not None:
        scores = excess(scores, reference)
    subset = take_sequences(
        {"input_ids": input_ids, "labels": labels, **model_kwargs}, hardest_sequences(scores, ratio=ratio),
        batch_shape=input_ids.shape,
    )
    subset_labels = subset.pop("labels")
    out = functional_call(model, params, (), {**default_kwargs(model), **subset})
    return lm_loss(
        out.logits, subset_labels, attention_mask=subset.get("attention_mask"), causal=causal, ignore_index=ignore_index
    )


def lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy over every labelled position: the dense loss Hugging Face computes from ``labels=``.

    The mean of ``-log p[target]`` over :func:`lm_targets` (shifted for a
    causal LM; padding targets excluded when ``attention_mask`` is given),
    computed by :func:`cggr_fn.selective_loss` in its precision. It equals
    the model's ``.loss`` from ``labels=`` whenever padding is labelled
    ``ignore_index`` (e.g. ``labels=torch.where(attention_mask, input_ids,
    -100)``), for right and left padding alike; given the
    ``attention_mask``, it also leaves out padding targets that carry a
    label, which the model's loss would count. Computing it here rather than passing ``labels=`` to the model
    keeps Hugging Face's loss dispatch, which logs a warning for some models
    (GPT-2), out of a compiled step.

    Args:
      logits: ``(batch, seq, vocab)`` logits.
      labels: ``(batch, seq)`` labels as passed to a Hugging Face model (unshifted).
      attention_mask: optional ``(batch, seq)`` mask, nonzero at real tokens.
      causal: ``labels`` are next-token labels; ``False`` for masked LMs.
      ignore_index: the "no label" value.

    Returns:
      A 0-d loss (0 when nothing is labelled).

    Example:
      >>> import torch
      >>> from cggr_fn.models import lm_loss
      >>> logits = torch.tensor([[[0.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
      >>> lm_loss(logits, torch.tensor([[0, 1, 1]]))  # (0.6931 + 0.0181) / 2
      tensor(0.3556)
    """
    targets = lm_targets(labels, attention_mask=attention_mask, causal=causal, ignore_index=ignore_index)
    return selective_loss(logits, targets, targets != ignore_index, ignore_index=ignore_index)


class ScoredMask(NamedTuple):
    """The selected positions of a batch, their scores, and the statistics worth logging.

    Every field is a tensor on the scores' device; none is read back to the
    host, so logging them costs no sync until you print them.

    Attributes:
      difficulty: ``(batch, seq)`` scores, higher = harder, ``-inf`` at
        positions that cannot be selected (padding, no target).
      mask: ``(batch, seq)`` boolean, true at the selected (hard) positions.
      k: 0-d int64, the number of selected positions.
      ratio: 0-d, the fraction of the selectable positions that were
        selected (``k`` over the positions scoring above ``-inf``; 0 when
        there are none): the requested ratio, corrected for padding.
      mean_difficulty: 0-d, the mean score over the selectable positions
        (NaN when there are none, or when a score is NaN).
      threshold: 0-d, the lowest selected score, ignoring NaN scores (which
        rank hardest): every selectable position scoring above it was
        selected by ``"topk"``. ``+inf`` when nothing is selected, NaN when
        only NaN scores are.
    """

    difficulty: torch.Tensor
    mask: torch.Tensor
    k: torch.Tensor
    ratio: torch.Tensor
    mean_difficulty: torch.Tensor
    threshold: torch.Tensor


def routing_mask(
    router: TruncatedRouter,
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    *,
    ratio: Ratio,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    method: ScoreMethod = "combined",
    strategy: str = "topk",
    num_strata: int = 4,
    min_per_sequence: int = 1,
    seed: Step = 0,
    ignore_index: int = -100,
    **model_kwargs: Any,
) -> ScoredMask:
    """Score a batch with the router and select a fixed number of hard positions, as a mask.

    Replaces the seed's ``CGGRScorer(router, min_tokens_ratio)`` (its
    ``difficulty, mask, info`` are the :class:`ScoredMask` fields) for
    "null routing" in mixture-of-experts style models: the mask has the
    batch's static shape and exactly ``capacity(batch * seq, ratio=ratio)``
    true entries (fewer only when fewer positions are selectable), so it can
    gate an expert (``expert(x) * mask[..., None]``) or feed a fixed-capacity
    dispatch without data-dependent shapes. Scores are :func:`token_scores`
    (padding and positions without a target never selected); selection is
    :func:`cggr_fn.select`.

    Args:
      router: a :class:`TruncatedRouter`.
      params: the model's parameters by name.
      input_ids: ``(batch, seq)`` token ids.
      ratio: keep ratio in ``(0, 1]``, a float or a 0-d tensor (e.g. from :func:`cggr_fn.dynamic_ratio`).
      labels: optional labels; without them positions are scored by the
        method alone (``"loss"`` needs labels).
      attention_mask: optional ``(batch, seq)`` mask, nonzero at real tokens;
        passed to the router too.
      causal: ``labels`` are next-token labels; ``False`` for masked LMs.
      method: a :func:`cggr_fn.score` method.
      strategy, num_strata, min_per_sequence, seed: as in :func:`cggr_fn.select`.
      ignore_index: the "no label" value.
      **model_kwargs: further router arguments, e.g. ``position_ids``.

    Returns:
      A :class:`ScoredMask`.

    Example:
      >>> import torch, transformers
      >>> from cggr_fn.models import routing_mask, truncated_router
      >>> config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=8)
      >>> model = transformers.GPT2LMHeadModel(config)
      >>> router = truncated_router(model, num_layers=1)
      >>> out = routing_mask(router, dict(model.named_parameters()), torch.randint(0, 32, (2, 8)), ratio=0.25)
      >>> out.mask.shape, out.k, out.ratio
      (torch.Size([2, 8]), tensor(4), tensor(0.2500))
    """
    if not isinstance(router, TruncatedRouter):
        raise TypeError(f"router: expected a TruncatedRouter (from truncated_router), got {type(router).__name__}")
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    logits = router(params, input_ids, **model_kwargs)
    difficulty = token_scores(
        logits, labels, attention_mask=attention_mask, causal=causal, method=method, ignore_index=ignore_index
    )
    mask = select(
        difficulty, ratio=ratio, strategy=strategy, num_strata=num_strata, min_per_sequence=min_per_sequence, seed=seed
    )
    return ScoredMask(difficulty, mask, *_mask_statistics(difficulty, mask))


def _mask_statistics(difficulty: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    selectable = ~torch.isneginf(difficulty)
    k = mask.sum()
    num_selectable = selectable.sum()
    ratio = k.to(difficulty.dtype) / num_selectable.clamp_min(1)
    mean = torch.where(selectable, difficulty, 0.0).sum() / num_selectable
    ranked = mask & ~torch.isnan(difficulty)
    lowest = torch.where(ranked, difficulty, float("inf")).amin()
    threshold = torch.where(ranked.any() | (k == 0), lowest, float("nan"))
    return k, ratio, mean, threshold


def selective_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ratio: Ratio,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    method: ScoreMethod = "combined",
    strategy: str = "topk",
    num_strata: int = 4,
    min_per_sequence: int = 1,
    seed: Step = 0,
    normalize: str = "selected",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Language-model cross-entropy over the hardest positions only, from the model's logits.

    Replaces the seed's ``CGGRLoss``: the curriculum and the dynamic
    threshold are not hidden state here but the ``ratio`` you pass (e.g.
    ``cggr_fn.ratio_schedule(step, ...)``, optionally through
    :func:`cggr_fn.dynamic_ratio`). Positions are scored by
    :func:`token_scores` (next-token aligned for a causal LM; padding and
    unlabelled positions never selected), ``capacity(batch * seq, ratio=ratio)``
    are selected with :func:`cggr_fn.select`, and the loss is
    :func:`cggr_fn.selective_loss` over them against the same shifted
    targets. Only the loss is gated, not the depth: every selected token
    trains the whole model.

    Args:
      logits: ``(batch, seq, vocab)`` logits of the full model.
      labels: ``(batch, seq)`` labels as passed to a Hugging Face model (unshifted).
      ratio: keep ratio in ``(0, 1]``, a float or a 0-d tensor.
      attention_mask: optional ``(batch, seq)`` mask, nonzero at real tokens.
      causal: ``labels`` are next-token labels; ``False`` for masked LMs.
      method: a :func:`cggr_fn.score` method.
      strategy, num_strata, min_per_sequence, seed: as in :func:`cggr_fn.select`.
      normalize: ``"selected"`` or ``"valid"``, as in :func:`cggr_fn.selective_loss`.
      ignore_index: the "no label" value.

    Returns:
      A 0-d loss, as :func:`cggr_fn.selective_loss` returns it.

    Example:
      >>> import torch
      >>> from cggr_fn.models import selective_lm_loss
      >>> logits = torch.tensor([[[0.0, 4.0], [0.0, 0.0], [0.0, 4.0], [0.0, 0.0]]])
      >>> labels = torch.tensor([[1, 0, 1, 1]])  # position t is scored against labels[t + 1]
      >>> selective_lm_loss(logits, labels, ratio=0.25, method="loss")  # k = 1 of 4 positions: the hardest
      tensor(4.0181)
    """
    targets = lm_targets(labels, attention_mask=attention_mask, causal=causal, ignore_index=ignore_index)
    scores = score(logits, targets, method=method, ignore_index=ignore_index)
    mask = select(scores, ratio=ratio, strategy=strategy, num_strata=num_strata, min_per_sequence=min_per_sequence, seed=seed)
    return selective_loss(logits, targets, mask, ignore_index=ignore_index, normalize=normalize)


def _check_labels(labels: object, name: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if labels.dim() < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (..., seq), got a 0-d tensor")


def _real_tokens(attention_mask: object, shape: torch.Size) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask: expected shape {tuple(shape)}, got {tuple(attention_mask.shape)}")
    return attention_mask != 0
