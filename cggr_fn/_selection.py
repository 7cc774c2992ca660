"""Token selection: a fixed number of tokens, chosen by difficulty (a mask) or sampled by importance (a mask and weights)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio, Step
from cggr_fn._ranking import capacity, difficulty_order, difficulty_rank, inverse_permutation, selectable
from cggr_fn._stats import compute_dtype

STRATEGIES = ("topk", "stratified", "sequence_aware")


def select(
    scores: torch.Tensor,
    *,
    ratio: Ratio,
    strategy: str = "topk",
    num_strata: int = 4,
    min_per_sequence: int = 1,
    seed: Step = 0,
) -> torch.Tensor:
    """Select ``k = capacity(scores.numel(), ratio=ratio)`` tokens as a boolean mask.

    Exactly ``k`` positions are selected over the whole tensor, fewer only when
    fewer than ``k`` are selectable (scores other than ``-inf``; ignored
    positions score ``-inf``). NaN scores count as the hardest (before
    ``+inf``), so NaN logits are always trained on and show in the loss. Ties
    break by position (earlier first). The mask's shape is static; nothing
    synchronises with the host, also for a 0-d tensor ``ratio`` (then ``k`` is
    computed on-device, and a ratio outside ``(0, 1]`` or NaN is handled as
    :func:`capacity` documents: clamped, NaN selects every selectable token;
    :func:`checking` raises on it). The same scores give bitwise the same mask
    on every device (stable sorts that put NaN before ``+inf``, then integer
    arithmetic); scores of the same logits computed on different devices agree
    only within the tolerance that :class:`TokenStats` states.

    Strategies:
      * ``"topk"``: the ``k`` hardest.
      * ``"stratified"``: the selectable tokens are split by difficulty rank
        into ``num_strata`` equal strata, and each stratum gets an equal share
        of ``k`` (``k // num_strata``, one more for the hardest ``k %
        num_strata`` strata), drawn without replacement by a hash of (position,
        ``seed``). A stratum too small for its share cedes the rest to the
        hardest unselected tokens, so the total is still ``k``.
      * ``"sequence_aware"``: the ``min_per_sequence`` hardest tokens of every
        sequence (last dim; all of a shorter sequence's) first, then the hardest of the rest up to ``k``.
        A Python ``ratio`` whose ``k`` cannot cover every sequence's minimum is
        an error; with a tensor ratio the total ``k`` wins (the hardest of the
        per-sequence picks are kept).

    Args:
      scores: floating tensor of difficulties, higher = harder.
      ratio: keep ratio in ``(0, 1]``, a float or a 0-d floating tensor.
      strategy: one of ``"topk"``, ``"stratified"``, ``"sequence_aware"``.
      num_strata: strata for ``"stratified"``, >= 1.
      min_per_sequence: per-sequence minimum for ``"sequence_aware"``, >= 0.
      seed: Python int or 0-d integer tensor (e.g. the step) for ``"stratified"`` draws.

    Returns:
      A boolean tensor of ``scores.shape``.

    Example:
      >>> import torch, cggr_fn
      >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, float("-inf"), 0.4]])
      >>> cggr_fn.select(scores, ratio=0.5).int()
      tensor([[0, 1, 1, 1],
              [0, 0, 0, 1]], dtype=torch.int32)
      >>> cggr_fn.select(scores, ratio=0.5, strategy="sequence_aware", min_per_sequence=2).int()
      tensor([[0, 1, 0, 1],
              [1, 0, 0, 1]], dtype=torch.int32)
    """
    _checks.check_scores(scores)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    _checks.check_seed(seed)
    k = capacity(scores.numel(), ratio=ratio)
    flat = scores.reshape(-1)
    rank = difficulty_rank(flat)
    if strategy == "topk":
        # Unselectable tokens rank last, so the k first ranks hold min(k, selectable) of them.
        return ((rank < k) & selectable(flat)).reshape(scores.shape)
    if strategy == "stratified":
        _checks.check_int(num_strata, "num_strata", minimum=1)
        first = _stratified_first_round(flat, rank, k, num_strata, seed)
    else:
        _checks.check_int(min_per_sequence, "min_per_sequence", minimum=0)
        rows = flat.reshape(math.prod(scores.shape[:-1]), scores.shape[-1]) if scores.dim() > 0 else flat.reshape(1, 1)
        needed = rows.shape[0] * min(min_per_sequence, rows.shape[1])
        if not isinstance(k, torch.Tensor) and needed > k:
            raise ValueError(
                f"min_per_sequence: {rows.shape[0]} sequences x {min_per_sequence} exceed the "
                f"k={k} tokens that ratio={ratio} selects; lower min_per_sequence or raise ratio"
            )
        first = (difficulty_rank(rows) < min_per_sequence).reshape(-1)
    return _fill_to_capacity(first, rank, selectable(flat), k).reshape(scores.shape)


class Sample(NamedTuple):
    """A fixed-size importance sample of tokens; see :func:`priority_sample`.

    Attributes:
      mask: boolean, true at the sampled tokens.
      weights: the estimator weight of every sampled token (``>= 1``), 0 elsewhere;
        pass it to :func:`selective_loss` as ``weights=``.
    """

    mask: torch.Tensor
    weights: torch.Tensor


def priority_sample(
    importance: torch.Tensor, *, ratio: Ratio, seed: Step = 0, uniform_mix: float = 0.0
) -> Sample:
    """Sample exactly ``k = capacity(n, ratio=ratio)`` tokens with probability increasing in ``importance``, unbiasedly.

    Priority sampling: token ``i`` draws ``u_i`` in ``(0, 1]`` from a hash of
    (position, ``seed``), gets the priority ``w_i / u_i``, and the ``k`` largest
    priorities are kept. With ``tau`` the ``(k+1)``-th largest priority, a kept
    token's weight is ``max(w_i, tau) / w_i`` (one over its inclusion
    probability given ``tau``), so for any per-token values ``x``,
    ``sum(weights * x)`` is an unbiased estimate of ``sum(x)``: with
    ``selective_loss(logits, targets, mask, weights=weights, normalize="valid")``
    the loss (and its gradient) estimates the dense mean without bias, while
    the tokens that matter most are sampled most often. Unlike top-k by
    difficulty, which biases training toward the hardest tokens, this spends
    the same fixed budget without changing what is learned in expectation.

    A token of importance 0 is never sampled while ``k`` positive-importance
    tokens exist, so the estimate is unbiased for values that vanish where the
    importance does (e.g. importance = the logits-gradient norm). For any
    values, mix in a uniform share: ``w' = (1 - uniform_mix) * w / mean(w) +
    uniform_mix`` gives every token a positive probability (defensive
    importance sampling). ``-inf`` marks tokens that cannot be sampled
    (ignored positions, as :func:`score` gives them); a NaN importance is
    sampled first and gets a NaN weight, so it shows in the loss. Negative
    importance counts as 0 (:func:`checking` raises on it). Static shapes,
    no host sync, no generator state: the same ``seed`` gives the same sample
    on every device; pass the step as the seed for a new draw each step.

    Args:
      importance: floating tensor of non-negative importances (e.g.
        ``score(logits, targets, method="grad_norm")``), any shape.
      ratio: keep ratio in ``(0, 1]``, a float or a 0-d floating tensor.
      seed: int or 0-d integer tensor (e.g. the step).
      uniform_mix: share of uniform sampling mixed into the importances, in ``[0, 1]``.

    Returns:
      A :class:`Sample` ``(mask, weights)`` of ``importance.shape``; weights in
      the importance's dtype (float32 for narrower floats).

    Example:
      >>> import torch, cggr_fn
      >>> importance = torch.tensor([4.0, 1.0, 0.0, 1.0, 2.0, float("-inf")])
      >>> sample = cggr_fn.priority_sample(importance, ratio=0.5, seed=0)
      >>> sample.mask.int()
      tensor([1, 0, 0, 1, 1, 0], dtype=torch.int32)
      >>> sample.weights
      tensor([1.0000, 0.0000, 0.0000, 1.0951, 1.0000, 0.0000])
    """
    _checks.check_scores(importance, "importance")
    _checks.check_seed(seed)
    _checks.check_fraction(uniform_mix, "uniform_mix")
    k = capacity(importance.numel(), ratio=ratio)
    w = importance.reshape(-1).to(compute_dtype(importance.dtype))
    allowed = selectable(w)
    if _checks.value_checks_enabled() and bool((allowed & (w < 0)).any()):  # sync-ok: checking mode only
        raise ValueError("importance: expected values >= 0 (or -inf for tokens that cannot be sampled), got negative values")
    w = torch.where(allowed, w.clamp_min(0.0), 0.0)  # clamp_min keeps NaN
    if uniform_mix:
        mean = w.sum() / allowed.sum().clamp_min(1)
        w = (1.0 - uniform_mix) * torch.where(mean > 0, w / mean, 0.0) + uniform_mix
    u = (_position_hash(w.numel(), seed, w.device).to(w.dtype) + 1.0) / 2.0**32
    priority = torch.where(allowed, w / u, float("-inf"))
    order = difficulty_order(priority)
    mask = (inverse_permutation(order) < k) & allowed
    tau = _next_priority(priority.gather(0, order), k)
    weights = torch.where(w == 0, 1.0, torch.maximum(w, tau) / w)  # NaN importance: NaN weight
    weights = torch.where(mask, weights, 0.0)
    return Sample(mask.reshape(importance.shape), weights.reshape(importance.shape))


def _next_priority(descending: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """tau: the (k+1)-th largest priority; 0 when every sampleable token is kept
    (each is then kept with certainty and weighs 1)."""
    # capacity() keeps k <= n, so index k of the zero-padded priorities exists;
    # a tensor k is gathered on its device (indexing by it would copy it to the host).
    padded = torch.cat([descending, descending.new_zeros(1)])
    tau = padded.gather(0, k.reshape(1)).squeeze(0) if isinstance(k, torch.Tensor) else padded[k]
    return torch.where(torch.isneginf(tau), 0.0, tau)


def _fill_to_capacity(first: torch.Tensor, rank: torch.Tensor, allowed: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """The ``first`` tokens, then the hardest others, up to ``k`` allowed tokens."""
    n = rank.numel()
    # Unique integer keys: every allowed first-round token before every other
    # token, each group in difficulty order. Unselectable tokens rank after all
    # selectable ones, so they can only fill places past the selectable count.
    key = torch.where(first & allowed, rank, rank + n)
    final_rank = inverse_permutation(torch.argsort(key))
    return (final_rank < k) & allowed


def _stratified_first_round(
    flat: torch.Tensor, rank: torch.Tensor, k: int | torch.Tensor, num_strata: int, seed: Step
) -> torch.Tensor:
    """Each difficulty stratum's share of ``k``, drawn by a seeded hash of position."""
    n = flat.numel()
    allowed = selectable(flat)
    num_allowed = allowed.sum().clamp_min(1)
    # Allowed tokens hold ranks 0..num_allowed-1; the rest go to an extra stratum.
    stratum = torch.where(allowed, rank * num_strata // num_allowed, num_strata)
    draw = _position_hash(n, seed, flat.device)
    order = torch.argsort(stratum * (1 << 32) + draw)  # strata in turn, shuffled inside
    position_in_order = inverse_permutation(order)
    counts = torch.zeros(num_strata + 1, dtype=torch.int64, device=flat.device).scatter_add(
        0, stratum, torch.ones_like(stratum)
    )
    stratum_start = torch.cumsum(counts, 0) - counts
    index_in_stratum = position_in_order - stratum_start[stratum]
    strata = torch.arange(num_strata + 1, device=flat.device)
    share = torch.where(strata < num_strata, k // num_strata + (strata < k % num_strata).long(), 0)
    return index_in_stratum < share[stratum]


_GOLDEN, _SEED_MIX = 0x9E3779B1, 0x7FEB352D


def _signed32(value: int) -> int:
    """``value`` modulo 2**32, in ``[-2**31, 2**31)``."""
    return (value + 2**31) % 2**32 - 2**31


def _position_hash(n: int, seed: Step, device: torch.device, offset: int = 0) -> torch.Tensor:
    """A 32-bit hash of (position, seed) for positions ``offset`` to ``offset + n - 1``, identical on every device.

    Integer arithmetic only (a multiply-xorshift mix with products below 2**63),
    so a draw depends on nothing but its inputs: pure, reproducible, and free
    of generator state that would break ``torch.compile``.
    """
    mask = 0xFFFFFFFF
    # Inductor folds positions * constant + constant into 32-bit index
    # arithmetic on CUDA, where a constant of 2**31 or more does not compile.
    # Only the low 32 bits are kept, so every constant can be taken modulo
    # 2**32 into the signed 32-bit range, and wraparound leaves the result exact.
    constant = offset * _GOLDEN
    if isinstance(seed, torch.Tensor):
        seed_term = (seed.long() & mask) * _SEED_MIX  # a 0-d tensor on any device: data, not a constant
    else:
        seed_term, constant = 0, constant + (seed & mask) * _SEED_MIX
    h = (torch.arange(n, dtype=torch.int64, device=device) * _signed32(_GOLDEN) + _signed32(constant) + seed_term) & mask
    for multiplier, shift in ((0x2C1B3C6D, 16), (0x297A2D39, 15), (0x5BD1E995, 13)):
        h = ((h ^ (h >> shift)) * multiplier) & mask
    return h ^ (h >> 16)
