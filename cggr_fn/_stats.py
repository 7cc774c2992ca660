"""Per-token statistics of a softmax distribution: the raw material of every score."""

from __future__ import annotations

from typing import NamedTuple

import torch

from cggr_fn import _checks


class TokenStats(NamedTuple):
    """Per-token statistics of ``softmax(logits)``, float32, shape ``logits.shape[:-1]``.

    Attributes:
      entropy: Shannon entropy in nats, in ``[0, log(vocab)]``.
      confidence: the largest probability, in ``(0, 1]``.
      margin: largest minus second-largest probability; exactly 0 when the
        two largest logits tie.
      logsumexp: ``log(sum(exp(logits)))``.
      nll: ``-log p[target]``. It is 0.0 where the target is ``ignore_index``
        (as ``torch.nn.functional.cross_entropy(reduction="none")`` gives), NaN
        where the target is out of range, and NaN everywhere when no targets
        were given.

    A row that holds a NaN or ``+inf``, or only ``-inf``, has no well-defined
    distribution: every statistic of it is NaN (``nll`` too, unless ignored).
    ``-inf`` entries in an otherwise finite row are probability-zero classes.
    """

    entropy: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    logsumexp: torch.Tensor
    nll: torch.Tensor


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> TokenStats:
    """Entropy, confidence, margin, logsumexp and nll of every token, in one call.

    Computed in float32 whatever the input dtype, without gradient (the
    statistics are constants to any enclosing ``torch.func.grad``). CUDA
    tensors take the fused one-pass Triton kernel; other devices take the
    PyTorch reference. Both compute the same function.

    Args:
      logits: ``(..., vocab)`` floating tensor, ``vocab >= 2``.
      targets: optional integer tensor of shape ``logits.shape[:-1]``.
      ignore_index: target value that marks a position without a label.

    Returns:
      A :class:`TokenStats` of float32 tensors of shape ``logits.shape[:-1]``.

    Example:
      >>> import torch, cggr_fn
      >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
      >>> stats = cggr_fn.token_stats(logits, torch.tensor([1, 0]))
      >>> stats.entropy  # uniform over 4 classes: log(4)
      tensor([1.3863, 0.2618])
      >>> stats.margin  # the two largest logits tie in row 0
      tensor([0.0000, 0.9306])
      >>> stats.nll
      tensor([1.3863, 0.0535])
    """
    _checks.check_logits(logits)
    if targets is not None:
        _checks.check_targets(targets, logits, ignore_index)
    if logits.is_cuda:
        from cggr_fn.kernels import fused_token_stats

        return TokenStats(*fused_token_stats(logits, targets, ignore_index))
    return TokenStats(*token_stats_reference(logits, targets, ignore_index))


def token_stats_reference(
    logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch definition of :func:`token_stats`; the ground truth for kernels."""
    with torch.no_grad():
        x = logits.detach().float()
        top2 = x.topk(2, dim=-1).values
        row_max = x.amax(dim=-1)  # NaN-propagating, unlike topk
        # Subtracting a +inf or -inf maximum gives NaN, which is exactly the
        # documented result for rows without a well-defined distribution.
        shifted = x - row_max.unsqueeze(-1)
        exp_shifted = shifted.exp()
        total = exp_shifted.sum(dim=-1)
        log_total = total.log()
        # H = log(total) - sum(p * shifted); a -inf logit has p = 0 and
        # contributes nothing (0 * -inf would be NaN).
        weighted = torch.where(torch.isneginf(shifted), 0.0, exp_shifted * shifted).sum(dim=-1)
        entropy = log_total - weighted / total
        confidence = total.reciprocal()
        margin = (1.0 - (top2[..., 1] - row_max).exp()) / total
        logsumexp = row_max + log_total
        if targets is None:
            nll = torch.full_like(entropy, float("nan"))
        else:
            vocab = x.shape[-1]
            labelled = targets != ignore_index
            in_range = (targets >= 0) & (targets < vocab)
            safe = torch.where(in_range, targets, 0).long()
            target_logit = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            nll = torch.where(in_range, logsumexp - target_logit, float("nan"))
            nll = torch.where(labelled, nll, 0.0)
        return entropy, confidence, margin, logsumexp, nll
