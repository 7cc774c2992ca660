"""Per-token statistics of a softmax distribution: the raw material of every score."""

from __future__ import annotations

from typing import NamedTuple

import torch

from cggr_fn import _checks

#: Logits dtypes that the fused CUDA kernel takes; it computes in float32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TokenStats(NamedTuple):
    """Per-token statistics of ``softmax(logits)``, shape ``logits.shape[:-1]``.

    float32, or float64 for float64 logits (16-bit logits are upcast to
    float32).

    Attributes:
      entropy: Shannon entropy in nats, in ``[0, log(vocab)]``.
      confidence: the largest probability, in ``(0, 1]``.
      margin: largest minus second-largest probability; exactly 0 when the
        two largest logits tie.
      logsumexp: ``log(sum(exp(logits)))``.
      nll: ``-log p[target]``. It is 0.0 where the target is ``ignore_index``
        (as ``torch.nn.functional.cross_entropy(reduction="none")`` gives), NaN
        where the target is out of range, ``+inf`` where the target is a
        ``-inf`` class of a valid row, and NaN everywhere when no targets were
        given. :func:`cggr_fn.selective_loss` uses the same definition.
      grad_norm: ``||softmax(logits) - onehot(target)||_2``, the norm of the
        gradient of the token's cross-entropy with respect to its logits, in
        ``[0, sqrt(2)]``: near 0 for a confident correct token, near 1 for a
        spread-out distribution, near ``sqrt(2)`` for a confident wrong one,
        ``sqrt(1 + sum p**2)`` where the target is a ``-inf`` class. Computed as
        ``sqrt((1 - p_t)**2 + sum_{j != t} p_j**2)`` with ``p_t = exp(-nll)``,
        two sums of non-negative terms, so a confident token (``p_t`` near 1)
        loses nothing to cancellation: its grad_norm is as accurate as its
        nll. 0.0 where the target is ``ignore_index`` and NaN where ``nll`` is
        NaN (out-of-range target, no targets given, rows without a
        distribution), like ``nll``.

    A row that holds a NaN or ``+inf``, or only ``-inf``, has no well-defined
    distribution: every statistic of it is NaN (``nll`` and ``grad_norm`` too,
    unless ignored).
    ``-inf`` entries in an otherwise finite row are probability-zero classes.

    What is identical and what is not: each path (the CUDA kernel, the PyTorch
    reference) is deterministic, giving bitwise the same statistics for the
    same logits run after run. The two paths compute the same function in
    float32 but not the same float operations (the kernel sums in another
    order and uses the GPU's ``exp2``), so they agree within a tolerance, not
    bitwise: ``|kernel - reference| <= 4e-6`` for entropy, confidence and
    margin, and ``<= 4e-6 + 5e-7 * |logsumexp|`` for logsumexp, nll and
    grad_norm (measured worst on an H100 over float32, bfloat16 and float16
    rows of up to 262144 classes: 1.9e-6, and two float32 ulps of logsumexp;
    grad_norm inherits the nll's bound, since ``|d grad_norm / d nll| <= 1``
    and its sum of squares is accurate to float32 rounding). Against exact
    arithmetic on the same logits, grad_norm's float32 error is the nll's, a
    few float32 ulps of the logsumexp: within ``5e-7 * (1 + |logsumexp|)`` on
    both paths over confident (``1 - p_t`` from 1e-2 down to 1e-9), uniform,
    random and offset rows of up to 300 classes (worst measured 3.6e-7, at
    ``logsumexp`` near 0), growing with the vocabulary as the nll's does.
    That is an absolute accuracy: a token with ``1 - p_t`` near 1e-7 has a
    grad_norm near 1e-7 known to a few 1e-7, like its nll. NaN and infinite values, and the exact 0 margin of a tie, are
    the same on both. Summation order also depends on where each logit sits in
    the row, so rows that are permutations of one another can differ in the
    last bits on either path. float64 logits take the reference on every
    device.
    """

    entropy: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    logsumexp: torch.Tensor
    nll: torch.Tensor
    grad_norm: torch.Tensor


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> TokenStats:
    """Entropy, confidence, margin, logsumexp, nll and grad_norm of every token, in one call.

    Computed in float32, or float64 for float64 logits, without gradient (the
    statistics are constants to any enclosing ``torch.func.grad``). CUDA
    tensors of float32, bfloat16 or float16 take the fused one-pass Triton
    kernel (float32 arithmetic); float64 logits and other devices take the
    PyTorch reference. Both compute the same function; :class:`TokenStats`
    states how closely their float32 results agree.

    Args:
      logits: ``(..., vocab)`` floating tensor, ``vocab >= 2``.
      targets: optional integer tensor of shape ``logits.shape[:-1]``.
      ignore_index: target value that marks a position without a label.

    Returns:
      A :class:`TokenStats` of tensors of shape ``logits.shape[:-1]``, float32
      or float64 for float64 logits.

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
      >>> stats.grad_norm  # ||softmax - onehot(target)||
      tensor([0.8660, 0.0601])
      >>> cggr_fn.token_stats(logits.double()).confidence.dtype
      torch.float64
    """
    _checks.check_logits(logits)
    if targets is not None:
        _checks.check_targets(targets, logits, ignore_index)
    if logits.is_cuda and logits.dtype in KERNEL_DTYPES:
        from cggr_fn.kernels import fused_token_stats

        return TokenStats(*fused_token_stats(logits, targets, ignore_index))
    return TokenStats(*token_stats_reference(logits, targets, ignore_index))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and losses are computed in: float64 stays, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nll_and_logsumexp(
    logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one definition of ``-log p[target]`` and ``logsumexp``, differentiable.

    In :func:`compute_dtype` of the logits, with the semantics of
    :class:`TokenStats`: a row without a distribution (NaN or ``+inf``, or only
    ``-inf``) has a NaN logsumexp and so a NaN nll; ignored targets give 0,
    out-of-range ones NaN, no targets NaN. The stats reference and
    :func:`cggr_fn.selective_loss` both call this, so they cannot disagree.
    """
    x = logits.to(compute_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    # torch.logsumexp gives +inf for a row holding +inf and -inf for a row of
    # only -inf; a finite row never reaches +-inf (max + log(vocab) rounds to at
    # most the largest finite float), so infinity marks exactly the rows
    # without a distribution. torch.where keeps the gradient of the others.
    lse = torch.where(torch.isinf(lse), float("nan"), lse)
    if targets is None:
        return torch.full_like(lse, float("nan")), lse
    vocab = x.shape[-1]
    in_range = (targets >= 0) & (targets < vocab)
    safe = torch.where(in_range, targets, 0).long()
    target_logit = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(in_range, lse - target_logit, float("nan"))
    return torch.where(targets != ignore_index, nll, 0.0), lse


def grad_norm_from(
    exp_shifted: torch.Tensor, total: torch.Tensor, nll: torch.Tensor, targets: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """``||softmax - onehot(target)||`` from ``exp(x - max)``, its row sum and the nll.

    ``sqrt((1 - p_t)**2 + sum_{j != t} p_j**2)``: the target's own square is
    left out of the sum rather than subtracted from ``sum p**2`` (for a
    confident token that difference is all rounding), and ``1 - p_t`` is
    ``-expm1(-nll)``. Semantics of :class:`TokenStats`: 0 where ignored, NaN
    where the nll is NaN or no targets were given.
    """
    if targets is None:
        return torch.full_like(total, float("nan"))
    # Out-of-range targets match no column; their NaN nll makes the result NaN.
    columns = torch.arange(exp_shifted.shape[-1], device=exp_shifted.device)
    others = torch.where(columns == targets.unsqueeze(-1), 0.0, exp_shifted)
    others_sq = others.square().sum(dim=-1) / total.square()
    one_minus_p = -torch.expm1(-nll)
    return torch.where(targets != ignore_index, (one_minus_p.square() + others_sq).sqrt(), 0.0)


def token_stats_reference(
    logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch definition of :func:`token_stats`; the ground truth for kernels."""
    with torch.no_grad():
        x = logits.detach().to(compute_dtype(logits.dtype))
        top2 = x.topk(2, dim=-1).values
        row_max = x.amax(dim=-1)  # NaN-propagating, unlike topk
        # Subtracting a +inf or -inf maximum gives NaN, which is exactly the
        # documented result for rows without a well-defined distribution.
        shifted = x - row_max.unsqueeze(-1)
        exp_shifted = shifted.exp()
        total = exp_shifted.sum(dim=-1)
        # H = log(total) - sum(p * shifted); a -inf logit has p = 0 and
        # contributes nothing (0 * -inf would be NaN).
        weighted = torch.where(torch.isneginf(shifted), 0.0, exp_shifted * shifted).sum(dim=-1)
        entropy = total.log() - weighted / total
        confidence = total.reciprocal()
        margin = (1.0 - (top2[..., 1] - row_max).exp()) / total
        nll, logsumexp = nll_and_logsumexp(x, targets, ignore_index)
        grad_norm = grad_norm_from(exp_shifted, total, nll, targets, ignore_index)
        return entropy, confidence, margin, logsumexp, nll, grad_norm
