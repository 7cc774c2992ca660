"""Argument validation and the opt-in checking mode.

Checks on shapes, dtypes and Python scalars are free (no device work) and always
run. Checks on tensor *values* (targets in range, finite logits) need a host
sync, so they only run inside :func:`checking`, which is meant for debugging in
eager mode; the hot path never synchronises.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterator

import torch

# Context-local, so a thread or asyncio task that enters checking() never turns
# checks on (or off) for another one running at the same time.
_checking_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("cggr_fn_checking", default=False)


@contextlib.contextmanager
def checking(enabled: bool = True) -> Iterator[None]:
    """Turn on value checks that need a host synchronisation.

    Inside the context, functions that take logits or targets also verify that
    every target is in ``[0, vocab)`` or equal to ``ignore_index`` and that the
    logits hold no NaN or ``+inf``; they raise ``ValueError`` otherwise. Outside
    it (the default) those checks are skipped so a training step never waits on
    the device: out-of-range targets then give a NaN ``nll`` and NaN logits
    surface as NaN scores (selected first) and a NaN loss.

    Checking mode is for eager debugging: a function traced by
    ``torch.compile`` inside it raises ``RuntimeError`` instead of breaking the
    graph (the mode is read at trace time: a graph compiled outside the block
    and reused inside it runs without the checks). The mode is context-local
    (a :mod:`contextvars` variable): it applies to the current thread or
    asyncio task only, and threads started inside the block do not inherit it.

    Args:
      enabled: whether checks run inside the block.

    Example:
      >>> import torch, cggr_fn
      >>> logits = torch.zeros(2, 3)
      >>> with cggr_fn.checking():
      ...     cggr_fn.token_stats(logits, torch.tensor([0, 7]))
      Traceback (most recent call last):
      ...
      ValueError: targets: expected values in [0, 3) or ignore_index=-100, got values in [0, 7]
    """
    token = _checking_enabled.set(bool(enabled))
    try:
        yield
    finally:
        _checking_enabled.reset(token)


@torch.compiler.assume_constant_result
def _checking_requested() -> bool:
    # Dynamo cannot trace ContextVar.get; as a constant it reads the mode once per trace.
    return _checking_enabled.get()


def value_checks_enabled() -> bool:
    if not _checking_requested():
        return False
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "cggr_fn.checking() synchronises with the device to inspect values and "
            "cannot run under torch.compile; leave checking mode to compile"
        )
    return True


def check_logits(logits: object, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (..., vocab), got a 0-d tensor")
    if logits.shape[-1] < 2:
        raise ValueError(f"{name}: expected a vocabulary of at least 2 (last dim), got {logits.shape[-1]}")
    if value_checks_enabled():
        bad = torch.isnan(logits) | torch.isposinf(logits)
        if bool(bad.any()):  # sync-ok: checking mode only
            raise ValueError(f"{name}: contains NaN or +inf ({int(bad.sum())} elements)")  # sync-ok


def check_targets(targets: object, logits: torch.Tensor, ignore_index: int, name: str = "targets") -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an integer tensor of class indices (int64 or int32), got dtype {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name}: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"{name}: expected device {logits.device} (the logits' device), got {targets.device}")
    check_int(ignore_index, "ignore_index")
    if value_checks_enabled() and targets.numel() > 0:
        vocab = logits.shape[-1]
        valid = targets != ignore_index
        out_of_range = valid & ((targets < 0) | (targets >= vocab))
        if bool(out_of_range.any()):  # sync-ok: checking mode only
            lo, hi = int(targets[valid].min()), int(targets[valid].max())  # sync-ok
            raise ValueError(
                f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                f"got values in [{lo}, {hi}]"
            )


def shown(value: object) -> object:
    """``value`` for an error message.

    Dynamo cannot format a traced (symbolic) scalar, and inside a trace it
    cannot be told from a constant one, so under compile the message names it
    without its value instead of breaking on the f-string.
    """
    if torch.compiler.is_compiling():
        return "a value traced by torch.compile (call eagerly to see it)"
    return value


def check_int(value: object, name: str, *, minimum: int | None = None) -> None:
    """A Python int (a ``SymInt`` under ``torch.compile`` with dynamic shapes counts as one)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    # A symbolic value's range check becomes a guard: a value that fails it
    # recompiles and raises while tracing, with eager's message.
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {shown(value)}")


def check_step(step: object, name: str = "step") -> None:
    """A curriculum step: a non-negative Python int or a 0-d integer tensor."""
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype.is_complex or step.dtype == torch.bool:
            raise TypeError(f"{name}: expected a Python int or a 0-d integer tensor, got {step.dtype} of shape {tuple(step.shape)}")
        if value_checks_enabled() and bool(step < 0):  # sync-ok: checking mode only
            raise ValueError(f"{name}: expected a step >= 0, got {int(step)}")  # sync-ok
        return
    check_int(step, name, minimum=0)


def check_seed(seed: object, name: str = "seed") -> None:
    """A hash seed: any Python int or a 0-d integer tensor (never a float: it would be truncated)."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"{name}: expected a Python int or a 0-d integer tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return
    check_int(seed, name)


def check_ratio(ratio: object, name: str = "ratio") -> None:
    """A keep ratio in (0, 1]: a Python number or a 0-d floating tensor."""
    if isinstance(ratio, torch.Tensor):
        if ratio.dim() != 0 or not ratio.is_floating_point():
            raise TypeError(f"{name}: expected a float or a 0-d floating tensor, got {ratio.dtype} of shape {tuple(ratio.shape)}")
        if value_checks_enabled():
            if not bool((ratio > 0) & (ratio <= 1)):  # sync-ok: checking mode only
                raise ValueError(f"{name}: expected a value in (0, 1], got {float(ratio)}")  # sync-ok
        return
    check_fraction(ratio, name, low_open=True)


def check_fraction(value: object, name: str, *, low_open: bool = False) -> None:
    """A Python real in [0, 1] (or (0, 1] with ``low_open``); NaN fails the comparison."""
    check_real(value, name)
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a value in {interval}, got {shown(value)}")


def check_real(value: object, name: str, *, minimum: float | None = None) -> None:
    """A Python real (``SymInt``/``SymFloat`` under ``torch.compile`` count as one).

    With ``minimum``: a finite value >= minimum. Comparisons, not
    ``math.isnan``, so a symbolic value becomes a guard instead of a graph break.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if minimum is not None and not (minimum <= value < math.inf):
        raise ValueError(f"{name}: expected a finite float >= {minimum}, got {shown(value)}")


def check_scores(scores: object, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {scores.dtype}")


def check_mask(mask: object, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a boolean torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
