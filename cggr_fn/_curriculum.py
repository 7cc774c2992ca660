"""Curriculum: how much of a batch trains at full depth, as pure functions of the step."""

from __future__ import annotations

import torch

from cggr_fn import _checks
from cggr_fn._stats import compute_dtype

Step = int | torch.Tensor
Ratio = float | torch.Tensor


def warmup_progress(step: Step, warmup_steps: int) -> tuple[Step, int]:
    """Progress through warmup as an exact fraction ``(numerator, denominator)``.

    Integer arithmetic keeps bucket sizes identical on every device and for
    Python-int and tensor steps alike; a tensor step is widened to int64 first,
    so products with token counts cannot overflow a narrow step dtype.
    ``warmup_steps == 0`` means no warmup.
    """
    _checks.check_step(step)
    _checks.check_int(warmup_steps, "warmup_steps", minimum=0)
    if isinstance(step, torch.Tensor):
        step = step.long()
        done = step.clamp(0, warmup_steps) if warmup_steps else torch.ones_like(step)
        return done, max(warmup_steps, 1)
    return (int_min(step, warmup_steps), warmup_steps) if warmup_steps else (1, 1)


def int_min(a: int, b: int) -> int:
    """``min`` of two ints, either of which may be a SymInt under dynamic shapes.

    A SymInt goes through ``torch.sym_min`` and stays symbolic instead of
    guarding on its value; plain ints take the builtin (Dynamo in torch 2.11
    cannot trace ``torch.sym_min`` of two plain ints).
    """
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return torch.sym_min(a, b)
    return min(a, b)


def ratio_schedule(step: Step, *, warmup_steps: int, final_ratio: float) -> Ratio:
    """Keep ratio that falls linearly from 1.0 at step 0 to ``final_ratio`` at ``warmup_steps``.

    Args:
      step: the curriculum step, a Python int or a 0-d integer tensor. Pass a
        tensor under ``torch.compile`` so a new step does not recompile.
      warmup_steps: steps until ``final_ratio`` is reached; 0 starts there.
      final_ratio: the keep ratio after warmup, in ``(0, 1]``.

    Returns:
      A Python float for an int step, else a 0-d float64 tensor on the step's
      device with the same value (the same float64 operations), so both kinds
      of step select the same ``k``.

    Example:
      >>> import cggr_fn
      >>> [cggr_fn.ratio_schedule(s, warmup_steps=4, final_ratio=0.5) for s in (0, 1, 2, 4, 9)]
      [1.0, 0.875, 0.75, 0.5, 0.5]
    """
    _checks.check_fraction(final_ratio, "final_ratio", low_open=True)
    done, total = warmup_progress(step, warmup_steps)
    if isinstance(done, torch.Tensor):
        done = done.double()
    return final_ratio + (1.0 - final_ratio) * (total - done) / total


def dynamic_ratio(
    ratio: Ratio,
    confidence: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    sensitivity: float = 0.5,
    target_confidence: float = 0.5,
    min_ratio: float = 0.1,
    max_ratio: float = 1.0,
) -> torch.Tensor:
    """Adjust a keep ratio to the batch: confident batches lower it, uncertain ones raise it.

    ``ratio + sensitivity * (target_confidence - mean confidence)``, clamped to
    ``[min_ratio, max_ratio]``. The adjustment is symmetric: a batch whose mean
    confidence is above the target trains fewer tokens, one below it more (the
    seed's dynamic threshold could only raise the ratio). A NaN mean confidence
    (NaN logits; the loss will show them) gives ``max_ratio``. On-device, no
    host sync. The result is float64 when ``ratio`` or ``confidence`` is
    float64 (e.g. the ratio of :func:`ratio_schedule` at a tensor step), else
    float32.

    Args:
      ratio: the scheduled keep ratio (e.g. from :func:`ratio_schedule`).
      confidence: per-token max probability, e.g. ``token_stats(...).confidence``.
      valid: optional boolean mask of the tokens to average over (e.g. non-padding).
      sensitivity: ratio change per unit of confidence below the target, a finite float >= 0.
      target_confidence: mean confidence at which the ratio is left unchanged.
      min_ratio: lower bound of the result, in ``(0, 1]``.
      max_ratio: upper bound of the result, in ``[min_ratio, 1]``.

    Returns:
      A 0-d float32 or float64 tensor in ``[min_ratio, max_ratio]``.

    Example:
      >>> import torch, cggr_fn
      >>> confident, unsure = torch.full((8,), 0.9), torch.full((8,), 0.1)
      >>> cggr_fn.dynamic_ratio(0.5, confident), cggr_fn.dynamic_ratio(0.5, unsure)
      (tensor(0.3000), tensor(0.7000))
    """
    _checks.check_ratio(ratio)
    _checks.check_scores(confidence, "confidence")
    _checks.check_real(sensitivity, "sensitivity", minimum=0)
    _checks.check_fraction(target_confidence, "target_confidence")
    _checks.check_fraction(min_ratio, "min_ratio", low_open=True)
    _checks.check_fraction(max_ratio, "max_ratio", low_open=True)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio: expected min_ratio <= max_ratio, got {min_ratio} > {max_ratio}")
    confidence = confidence.to(compute_dtype(confidence.dtype))
    if valid is None:
        mean = confidence.mean()
    else:
        _checks.check_mask(valid, "valid")
        if valid.shape != confidence.shape:
            raise ValueError(f"valid: expected shape {tuple(confidence.shape)} (confidence's), got {tuple(valid.shape)}")
        count = valid.sum().clamp_min(1)
        mean = torch.where(valid, confidence, 0.0).sum() / count
    # A Python ratio stays a Python number and a tensor ratio a 0-d scalar on its
    # own device: no host-to-device copy, so nothing synchronises. Type
    # promotion keeps a float64 ratio or confidence float64.
    adjusted = ratio + sensitivity * (target_confidence - mean)
    return torch.nan_to_num(adjusted, nan=max_ratio).clamp(min_ratio, max_ratio)
