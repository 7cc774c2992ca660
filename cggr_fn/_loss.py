"""Cross-entropy over the selected tokens only."""

from __future__ import annotations

import torch

from cggr_fn import _checks
from cggr_fn._stats import nll_and_logsumexp

NORMALIZATIONS = ("selected", "valid")


def selective_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalize: str = "selected",
) -> torch.Tensor:
    """Mean cross-entropy over the selected, labelled tokens, optionally weighted per token.

    The sum of ``-log p[target]`` (times ``weights``, if given) over tokens
    where ``mask`` is true and the target is not ``ignore_index``, divided by:

    * ``"selected"``: the number of such tokens -- the mean over the trained
      tokens, so the loss scale does not depend on the ratio; the gradient of
      each trained token grows as the ratio falls.
    * ``"valid"``: the number of labelled tokens, selected or not -- each
      trained token keeps the weight it has in a dense mean, so the effective
      learning rate of a token does not drift as the ratio changes (the loss
      value shrinks with the ratio instead).

    Weights do not change the denominator: ``sum(w * nll) / count``. With
    importance weights of a sample of the tokens (e.g. ``1 / inclusion
    probability``) and ``"valid"``, that is an unbiased estimate of the dense
    mean loss. Weights of unselected or ignored tokens are never read (a NaN
    there does not reach the loss); a NaN weight of a trained token makes the
    loss NaN.

    A denominator of 0 (nothing selected or labelled) gives a loss of 0 with
    zero gradient. Computed in float32, or float64 for float64 logits (the
    nll is :class:`cggr_fn.TokenStats`' own definition). The loss is NaN
    whenever its gradient could be: a row without a distribution (NaN or
    ``+inf`` logits, or only ``-inf``) makes it NaN whether it is selected,
    unselected or ignored, and so does a labelled row with an out-of-range
    target, so broken logits are never hidden behind a finite loss;
    :func:`cggr_fn.checking` raises on them instead. A target that is a
    ``-inf`` class of a valid row has nll ``+inf``: the loss is ``+inf`` if that
    row is selected and unaffected (with a finite gradient) otherwise.

    Args:
      logits: ``(..., vocab)`` floating tensor.
      targets: integer tensor of shape ``logits.shape[:-1]``.
      mask: boolean tensor of shape ``logits.shape[:-1]`` on the logits'
        device, e.g. from :func:`select`.
      weights: optional floating tensor of shape ``logits.shape[:-1]`` on the
        logits' device, used in the loss's dtype; differentiable.
      ignore_index: target value of positions without a label.
      normalize: ``"selected"`` or ``"valid"``.

    Returns:
      A 0-d tensor, float32 or float64 for float64 logits.

    Example:
      >>> import torch, cggr_fn
      >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> targets = torch.tensor([0, 0, 1])
      >>> mask = torch.tensor([False, True, True])
      >>> cggr_fn.selective_loss(logits, targets, mask)  # (2.1269 + 0.6931) / 2
      tensor(1.4100)
      >>> cggr_fn.selective_loss(logits, targets, mask, normalize="valid")  # ... / 3
      tensor(0.9400)
      >>> weights = torch.tensor([5.0, 2.0, 1.0])  # row 0 is unselected: its weight is not read
      >>> cggr_fn.selective_loss(logits, targets, mask, weights=weights)  # (2 * 2.1269 + 0.6931) / 2
      tensor(2.4735)
      >>> big = torch.tensor([[1e8, 1e8 + 1, 1e8 - 1]], dtype=torch.float64)
      >>> cggr_fn.selective_loss(big, torch.tensor([0]), torch.tensor([True]))
      tensor(1.4076, dtype=torch.float64)
    """
    _checks.check_logits(logits)
    _checks.check_targets(targets, logits, ignore_index)
    _checks.check_mask(mask)
    if mask.shape != targets.shape:
        raise ValueError(f"mask: expected shape {tuple(targets.shape)} (logits.shape[:-1]), got {tuple(mask.shape)}")
    if mask.device != logits.device:
        raise ValueError(f"mask: expected device {logits.device} (the logits' device), got {mask.device}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if weights is not None:
        _check_weights(weights, logits)
    nll, logsumexp = nll_and_logsumexp(logits, targets, ignore_index)
    labelled = targets != ignore_index
    trained = mask & labelled
    per_token = nll
    if weights is not None:
        # where() before the product: an unread weight (NaN, inf) must not reach the loss.
        per_token = nll * torch.where(trained, weights.to(nll.dtype), 1.0)
    denominator = (trained if normalize == "selected" else labelled).sum().clamp_min(1)
    loss = torch.where(trained, per_token, 0.0).sum() / denominator
    # Adds exactly 0, or NaN where a row's gradient could be NaN (its
    # logsumexp is NaN, and its backward multiplies even a zero upstream
    # gradient by NaN) or a label is out of range. An nll of +inf is not
    # broken: its row is valid and its gradient finite.
    broken = (torch.isnan(logsumexp) | torch.isnan(nll)).any()
    return loss + torch.where(broken, float("nan"), 0.0)


def _check_weights(weights: object, logits: torch.Tensor) -> None:
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"weights: expected a floating-point tensor, got {got}")
    if weights.shape != logits.shape[:-1]:
        raise ValueError(f"weights: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(weights.shape)}")
    if weights.device != logits.device:
        raise ValueError(f"weights: expected device {logits.device} (the logits' device), got {weights.device}")
