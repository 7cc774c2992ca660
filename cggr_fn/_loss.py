"""Cross-entropy over the selected tokens only."""

from __future__ import annotations

import torch

from cggr_fn import _checks

NORMALIZATIONS = ("selected", "valid")


def selective_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    ignore_index: int = -100,
    normalize: str = "selected",
) -> torch.Tensor:
    """Mean cross-entropy over the selected, labelled tokens.

    The sum of ``-log p[target]`` over tokens where ``mask`` is true and the
    target is not ``ignore_index``, divided by:

    * ``"selected"``: the number of such tokens -- the mean over the trained
      tokens, so the loss scale does not depend on the ratio; the gradient of
      each trained token grows as the ratio falls.
    * ``"valid"``: the number of labelled tokens, selected or not -- each
      trained token keeps the weight it has in a dense mean, so the effective
      learning rate of a token does not drift as the ratio changes (the loss
      value shrinks with the ratio instead).

    A denominator of 0 (nothing selected or labelled) gives a loss of 0 with
    zero gradient. Computed in float32 whatever the logits dtype. A labelled
    row whose nll is NaN (NaN or ``+inf`` logits, an out-of-range target)
    makes the loss NaN even when it is not selected, so broken logits are
    never hidden; :func:`cggr_fn.checking` raises on them instead. Rows whose
    target is ``ignore_index`` are not looked at.

    Args:
      logits: ``(..., vocab)`` floating tensor.
      targets: integer tensor of shape ``logits.shape[:-1]``.
      mask: boolean tensor of shape ``logits.shape[:-1]``, e.g. from :func:`select`.
      ignore_index: target value of positions without a label.
      normalize: ``"selected"`` or ``"valid"``.

    Returns:
      A 0-d float32 tensor.

    Example:
      >>> import torch, cggr_fn
      >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> targets = torch.tensor([0, 0, 1])
      >>> mask = torch.tensor([False, True, True])
      >>> cggr_fn.selective_loss(logits, targets, mask)  # (2.1269 + 0.6931) / 2
      tensor(1.4100)
      >>> cggr_fn.selective_loss(logits, targets, mask, normalize="valid")  # ... / 3
      tensor(0.9400)
    """
    _checks.check_logits(logits)
    _checks.check_targets(targets, logits, ignore_index)
    _checks.check_mask(mask)
    if mask.shape != targets.shape:
        raise ValueError(f"mask: expected shape {tuple(targets.shape)} (logits.shape[:-1]), got {tuple(mask.shape)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    nll = token_nll(logits, targets, ignore_index)
    labelled = targets != ignore_index
    trained = mask & labelled
    denominator = (trained if normalize == "selected" else labelled).sum().clamp_min(1)
    loss = torch.where(trained, nll, 0.0).sum() / denominator
    # Adds exactly 0, or NaN if any labelled row is broken (an unselected row
    # whose target has probability 0 has nll = +inf, which is legitimate).
    broken = (labelled & torch.isnan(nll.detach())).any()
    return loss + torch.where(broken, float("nan"), 0.0)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Differentiable float32 ``-log p[target]``; 0 where ignored, NaN where out of range."""
    x = logits.float()
    vocab = x.shape[-1]
    in_range = (targets >= 0) & (targets < vocab)
    safe = torch.where(in_range, targets, 0).long()
    target_logit = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(in_range, torch.logsumexp(x, dim=-1) - target_logit, float("nan"))
    return torch.where(targets != ignore_index, nll, 0.0)
