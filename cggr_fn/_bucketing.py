"""Depth buckets: which tokens train how many layers, under a linear curriculum."""

from __future__ import annotations

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Step, int_min, warmup_progress
from cggr_fn._ranking import difficulty_rank


def bucket_sizes(num_tokens: int, step: Step, *, num_buckets: int = 4, warmup_steps: int = 1000) -> torch.Tensor | list[int]:
    """How many tokens each bucket holds at ``step``: a static function of (tokens, step).

    After warmup the partition is equal: bucket ``b`` holds
    ``num_tokens // num_buckets`` tokens, plus one for the first
    ``num_tokens % num_buckets`` buckets. At step 0 every token is in bucket 0.
    In between, the boundary between buckets ``b - 1`` and ``b`` moves linearly
    (rounded down, in exact integer arithmetic) from ``num_tokens`` to its
    final rank, so tokens move into shallower buckets in proportion to progress.

    Args:
      num_tokens: number of positions.
      step: curriculum step, a Python int or a 0-d integer tensor.
      num_buckets: number of buckets, >= 1.
      warmup_steps: steps until the final partition, >= 0.

    Returns:
      A list of ``num_buckets`` ints for an int step, else an int64 tensor
      (int64 whatever the step's integer dtype).

    Example:
      >>> import cggr_fn
      >>> [cggr_fn.bucket_sizes(10, s, num_buckets=4, warmup_steps=4) for s in (0, 2, 4)]
      [[10, 0, 0, 0], [7, 1, 1, 1], [3, 3, 2, 2]]
    """
    starts = _bucket_starts(num_tokens, step, num_buckets, warmup_steps)
    sizes = [end - start for start, end in zip(starts, starts[1:] + [num_tokens])]
    return torch.stack(sizes) if isinstance(step, torch.Tensor) else sizes


def _bucket_starts(num_tokens: int, step: Step, num_buckets: int, warmup_steps: int) -> list[Step]:
    """First rank of every bucket: Python ints, or 0-d tensors on the step's device.

    Bucket 0 always starts at rank 0; the start of bucket ``b >= 1`` moves from
    ``num_tokens`` (empty) to its final rank as warmup progresses. Only scalar
    arithmetic on the step: no host-to-device copy, so nothing synchronises
    and CUDA graphs can capture it.
    """
    _checks.check_int(num_tokens, "num_tokens", minimum=0)
    _checks.check_int(num_buckets, "num_buckets", minimum=1)
    done, total = warmup_progress(step, warmup_steps)
    # // and % rather than divmod: under dynamic shapes num_tokens is a SymInt,
    # which divmod rejects.
    base, extra = num_tokens // num_buckets, num_tokens % num_buckets
    finals = [b * base + int_min(b, extra) for b in range(1, num_buckets)]
    return [done * 0] + [num_tokens - (num_tokens - final) * done // total for final in finals]


def bucket(scores: torch.Tensor, step: Step, *, num_buckets: int = 4, warmup_steps: int = 1000) -> torch.Tensor:
    """Assign every token a depth bucket, 0 = hardest = full gradient depth.

    Tokens are ranked over the whole tensor (all dims flattened) by
    :func:`difficulty_rank` semantics: higher score = harder, NaN hardest,
    ``-inf`` (ignored positions) easiest, ties broken by position (earlier =
    harder). Bucket ``b`` takes the next :func:`bucket_sizes` ranks. Sizes
    depend only on the number of tokens and the step, never on the data.
    On-device; no host sync.

    Args:
      scores: floating tensor of difficulties, any shape.
      step: curriculum step, a Python int or a 0-d integer tensor (pass a
        tensor under ``torch.compile``: a new step then does not recompile).
      num_buckets: number of buckets, >= 1.
      warmup_steps: steps of linear curriculum, >= 0 (0 = final partition at once).

    Returns:
      An int64 tensor of ``scores.shape`` with values in ``[0, num_buckets)``.

    Example:
      >>> import torch, cggr_fn
      >>> scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4])
      >>> cggr_fn.bucket(scores, step=0, num_buckets=4, warmup_steps=10)
      tensor([0, 0, 0, 0, 0, 0, 0, 0])
      >>> cggr_fn.bucket(scores, step=10, num_buckets=4, warmup_steps=10)
      tensor([3, 0, 1, 1, 2, 3, 0, 2])
    """
    _checks.check_scores(scores)
    starts = _bucket_starts(scores.numel(), step, num_buckets, warmup_steps)
    rank = difficulty_rank(scores.reshape(-1))
    buckets = torch.zeros_like(rank)
    for start in starts[1:]:
        buckets = buckets + (rank >= start)
    return buckets.reshape(scores.shape)


def bucket_depth(
    scores: torch.Tensor, step: Step, *, num_layers: int, num_buckets: int = 4, warmup_steps: int = 1000
) -> torch.Tensor:
    """Gradient depth of every token: how many of the top layers it trains.

    :func:`bucket` followed by the bucket-to-depth map, so the two always use
    the same ``num_buckets``. Bucket ``b`` of ``B`` trains the top
    ``ceil(num_layers * (B - b) / B)`` layers: for 4 buckets 100/75/50/25% of
    the layers. Rounding up means every bucket trains at least one layer, and
    the hardest bucket all of them. With 6 layers and 4 buckets the depths
    are 6, 5, 3, 2. On-device; no host sync.

    Args:
      scores: floating tensor of difficulties, any shape (as for :func:`bucket`).
      step: curriculum step, a Python int or a 0-d integer tensor.
      num_layers: number of layers in the stack, >= 1.
      num_buckets: number of buckets, >= 1.
      warmup_steps: steps of linear curriculum, >= 0.

    Returns:
      An int64 tensor of ``scores.shape`` with values in ``[1, num_layers]``.

    Example:
      >>> import torch, cggr_fn
      >>> scores = torch.tensor([0.9, 0.7, 0.5, 0.3])
      >>> cggr_fn.bucket_depth(scores, step=10, num_layers=6, warmup_steps=10)
      tensor([6, 5, 3, 2])
      >>> cggr_fn.bucket_depth(scores, step=0, num_layers=6, warmup_steps=10)
      tensor([6, 6, 6, 6])
    """
    _checks.check_int(num_layers, "num_layers", minimum=1)
    buckets = bucket(scores, step, num_buckets=num_buckets, warmup_steps=warmup_steps)
    share = num_buckets - buckets
    return (num_layers * share + num_buckets - 1) // num_buckets


def bucket_capacity(
    num_tokens: int, step: int, *, num_layers: int, num_buckets: int = 4, warmup_steps: int = 1000
) -> list[int]:
    """How many tokens train each layer under :func:`bucket_depth` at ``step``: static layer capacities.

    Layer ``i`` (bottom first) is trained by the tokens of depth at least
    ``num_layers - i``, so its count is the sum of the sizes of the buckets
    deep enough to reach it. These are the per-layer capacities of compacted
    execution (``capacity=`` of :class:`cggr_fn.models.DepthRoutedForward`).
    Bucket sizes only shrink as the curriculum advances, so the capacities of
    ``step`` hold for every later step too.

    Args:
      num_tokens: number of positions.
      step: curriculum step, a Python int (capacities are static sizes).
      num_layers: number of layers in the stack, >= 1.
      num_buckets: number of buckets, >= 1.
      warmup_steps: steps of linear curriculum, >= 0.

    Returns:
      ``num_layers`` ints, bottom layer first.

    Example:
      >>> import cggr_fn
      >>> cggr_fn.bucket_capacity(8, 10, num_layers=4, warmup_steps=10)
      [2, 4, 6, 8]
    """
    _checks.check_int(step, "step", minimum=0)
    _checks.check_int(num_layers, "num_layers", minimum=1)
    sizes = bucket_sizes(num_tokens, step, num_buckets=num_buckets, warmup_steps=warmup_steps)
    depths = tier_depths(num_layers, num_buckets)
    return [sum(size for size, depth in zip(sizes, depths) if depth >= num_layers - layer) for layer in range(num_layers)]


def tier_depths(num_layers: int, num_buckets: int) -> list[int]:
    """The depth of each bucket under :func:`bucket_depth`, hardest first: every value it can give."""
    return [(num_layers * (num_buckets - b) + num_buckets - 1) // num_buckets for b in range(num_buckets)]
