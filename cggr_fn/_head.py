"""The fused LM head: statistics and a compacted selective cross-entropy of ``hidden @ weight.T``, never holding the logits.

Three public functions share one chunked computation:

* :func:`fused_linear_token_stats`: :class:`TokenStats` of every token, the
  logits computed ``chunk_size`` rows at a time and dropped after their
  statistics.
* :func:`fused_selective_loss`: the loss of :func:`cggr_fn.selective_loss` on
  selected tokens only. The selected rows are gathered (a fixed capacity), and
  their logits, log-sum-exp and logits gradient
  ``coef * (softmax - onehot)`` are computed chunk by chunk *in the forward*
  (Liger-Kernel's scheme), followed at once by the two backward GEMMs: the
  hidden-state gradient of the selected rows and their weight gradient. The
  backward only scales those by the upstream gradient and scatters the rows'
  gradient into zeros. Compute and memory scale with the number of selected
  rows; no logits are stored for the backward.
* :func:`fused_head_loss`: the whole step in one call -- statistics of all
  rows, a score, a selection (:func:`cggr_fn.select` or
  :func:`cggr_fn.priority_sample`), and the loss over the selected rows.

Registration follows the pattern that works under ``torch.func.grad``,
``vmap`` and ``torch.compile(fullgraph=True)``: one kernel-only custom op
(``cggr_fn::linear_cross_entropy_grad``, with a fake and a vmap rule, no
autograd) called by a module-level ``torch.autograd.Function`` with
``setup_context`` and ``generate_vmap_rule``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from cggr_fn import _checks
from cggr_fn._curriculum import Step
from cggr_fn._ranking import capacity as _capacity
from cggr_fn._scoring import ScoreMethod, resolve_method, scores_from_stats
from cggr_fn._selection import STRATEGIES, priority_sample, select
from cggr_fn._stats import KERNEL_DTYPES, TokenStats, compute_dtype, token_stats_reference

#: The smallest default chunk, in rows (a GEMM of fewer rows runs well
#: below the matmul rate; 256 rows of vocab 128256 bf16 logits are 64 MiB).
MIN_CHUNK_ROWS = 256

NORMALIZATIONS = ("selected", "valid")
#: Selection strategies of :func:`fused_head_loss`: those of :func:`cggr_fn.select`, and ``"priority"``.
HEAD_STRATEGIES = (*STRATEGIES, "priority")

_Nine = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def chunk_rows(rows: int, hidden_size: int, vocab: int) -> int:
    """Rows per chunk by default: a chunk of logits about as large as the hidden states.

    The smallest power of two at least ``rows / ceil(vocab / hidden_size)``
    (and at least :data:`MIN_CHUNK_ROWS`, or ``rows`` if fewer): a
    ``chunk x vocab`` logits chunk holds at most about twice the elements of
    the ``(rows, hidden_size)`` hidden states, so the head's peak memory is
    that of its own gradients (the rule Liger-Kernel uses). Larger chunks
    are faster -- the weight gradient is accumulated over chunks by GEMMs
    that read and write the whole ``(vocab, hidden_size)`` gradient once per
    chunk -- at the price of memory: ``chunk_size`` trades one for the other
    (``benchmarks/results/fused_head.json`` has the measured sweep).

    Example:
      >>> from cggr_fn._head import chunk_rows
      >>> chunk_rows(16384, 2048, 128256), chunk_rows(16384, 4096, 49152), chunk_rows(100, 2048, 128256)
      (512, 2048, 128)
    """
    per_chunk = -(-rows // -(-vocab // max(hidden_size, 1)))
    target = max(per_chunk, min(rows, MIN_CHUNK_ROWS), 1)
    return 1 << (target - 1).bit_length()


def _use_kernel(hidden: torch.Tensor) -> bool:
    return hidden.is_cuda and hidden.dtype in KERNEL_DTYPES


def _weight_grad(weight: torch.Tensor) -> bool:
    """Whether the loss pass computes the weight gradient: not for a frozen head (a third of its GEMMs).

    Always under ``torch.compile``: there ``requires_grad`` reads False for a
    weight that ``torch.func.grad`` differentiates (torch 2.13), and skipping
    would silently drop its gradient.
    """
    return weight.requires_grad or torch.compiler.is_compiling()


# ----------------------------------------------------------------- statistics


def fused_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenStats:
    """:func:`cggr_fn.token_stats` of the logits ``hidden @ weight.T + bias``, without holding them.

    The logits are computed ``chunk_size`` tokens at a time in the dtype of
    ``hidden`` (as ``torch.nn.functional.linear`` computes them), their
    statistics are taken by the same code as :func:`cggr_fn.token_stats` (the
    fused kernel for float32/bfloat16/float16 CUDA tensors, the PyTorch
    reference otherwise), and each chunk is freed before the next: at most
    ``chunk_size x vocab`` logits exist at a time (with the default,
    :func:`chunk_rows`, about twice the size of ``hidden`` at most). The
    statistics are those of :func:`cggr_fn.token_stats` on the same chunk's
    logits, bit for bit; against the logits of one full-size GEMM they agree
    as closely as two GEMMs of different shapes do. Constants (no gradient),
    no host sync, static shapes.

    Args:
      hidden: ``(..., hidden_size)`` floating tensor of final hidden states.
      weight: ``(vocab, hidden_size)`` LM-head weight, ``vocab >= 2``, same dtype and device.
      targets: optional integer tensor of shape ``hidden.shape[:-1]``.
      bias: optional ``(vocab,)`` bias, same dtype and device.
      ignore_index: target value that marks a position without a label.
      chunk_size: tokens per chunk; default :func:`chunk_rows` (logits about the size of ``hidden``).

    Returns:
      A :class:`cggr_fn.TokenStats` of tensors of shape ``hidden.shape[:-1]``,
      float32, or float64 for float64 inputs.

    Example:
      >>> import torch, cggr_fn
      >>> hidden, weight = torch.randn(2, 3, 8), torch.randn(50, 8)
      >>> targets = torch.randint(0, 50, (2, 3))
      >>> stats = cggr_fn.fused_linear_token_stats(hidden, weight, targets, chunk_size=4)
      >>> stats.entropy.shape
      torch.Size([2, 3])
      >>> want = cggr_fn.token_stats(hidden @ weight.T, targets)
      >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(stats, want))
      True
    """
    _check_head(hidden, weight, bias)
    if targets is not None:
        _check_targets(targets, hidden, weight.shape[0], ignore_index)
    chunk = _check_chunk(chunk_size, weight, hidden)
    lead = hidden.shape[:-1]
    flat_targets = None if targets is None else targets.reshape(-1)
    stats = linear_token_stats(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, ignore_index, chunk, _use_kernel(hidden)
    )
    return TokenStats(*(s.reshape(lead) for s in stats))


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | None,
    ignore_index: int,
    chunk: int,
    use_kernel: bool,
) -> tuple[torch.Tensor, ...]:
    """The six statistics of ``(n, hidden_size)`` rows, ``chunk`` rows at a time; arguments validated.

    ``use_kernel`` picks the fused statistics kernel (tests run it on CPU
    under ``TRITON_INTERPRET=1``) or the PyTorch reference.
    """
    if use_kernel:
        from cggr_fn.kernels import fused_token_stats as stats_of
    else:
        stats_of = token_stats_reference
    n = hidden.shape[0]
    dtype = torch.float32 if use_kernel else compute_dtype(hidden.dtype)
    if n == 0:
        return tuple(hidden.new_empty(0, dtype=dtype) for _ in range(6))
    # Constants: no graph through the logits, also inside torch.func.grad.
    with torch.no_grad():
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
        parts = []
        for start in range(0, n, chunk):
            logits = torch.nn.functional.linear(hidden[start : start + chunk], weight, bias)
            part_targets = None if targets is None else targets[start : start + chunk]
            parts.append(stats_of(logits, part_targets, ignore_index))
            # Released before the next chunk's GEMM allocates: one chunk alive at a time.
            del logits
        return tuple(torch.cat(columns) for columns in zip(*parts))


# ------------------------------------------------------------ the custom op


@torch.library.custom_op("cggr_fn::linear_cross_entropy_grad", mutates_args=())
def linear_cross_entropy_grad(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 -- torch.library parses the annotation
    targets: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    use_kernel: bool,
    weight_grad: bool,
) -> _Nine:
    """Statistics and cross-entropy gradients of ``rows @ weight.T + bias``, ``chunk_size`` rows at a time.

    For each chunk: logits (one GEMM, in the rows' dtype), the six token
    statistics, ``g = coef * (softmax - onehot(target))`` written over the
    logits (0 where ``coef`` is 0), then ``g @ weight`` (the rows' gradient)
    and ``g.T @ rows`` accumulated into the weight gradient in the weight's
    dtype (one rounding per chunk, as Liger-Kernel does; the GEMM itself
    accumulates in float32). ``use_kernel`` runs the statistics and gradient
    Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); otherwise the
    PyTorch reference computes the same in :func:`cggr_fn._stats.compute_dtype`.

    Args:
      rows: ``(k, hidden_size)`` floating tensor.
      weight: ``(vocab, hidden_size)``, rows' dtype.
      bias: ``(vocab,)`` or None.
      targets: ``(k,)`` integer tensor; ``ignore_index`` and out-of-range
        values subtract no onehot.
      coef: ``(k,)`` per-row scale of the gradient, in the compute dtype.
      ignore_index: target value of rows without a label.
      chunk_size: rows per chunk, >= 1.
      use_kernel: Triton kernels or the PyTorch reference.
      weight_grad: whether to compute the weight gradient (a third of the
        GEMMs); without it that output is an empty ``(0,)`` tensor.

    Returns:
      ``(entropy, confidence, margin, logsumexp, nll, grad_norm)`` of shape
      ``(k,)`` in the compute dtype, the rows' gradient ``(k, hidden_size)``,
      the weight gradient ``(vocab, hidden_size)`` (or ``(0,)``) and the bias
      gradient ``(vocab,)`` (``(0,)`` without a bias), all new tensors.
    """
    k = rows.shape[0]
    vocab = weight.shape[0]
    dtype = torch.float32 if use_kernel else compute_dtype(rows.dtype)
    stats = tuple(rows.new_empty(k, dtype=dtype) for _ in range(6))
    d_rows = torch.empty_like(rows, memory_format=torch.contiguous_format)
    if not weight_grad:
        d_weight = weight.new_empty(0)
    elif k == 0:
        d_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    else:  # written by the first chunk
        d_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    d_bias = torch.zeros(vocab if bias is not None else 0, dtype=dtype, device=weight.device)
    coef = coef.to(dtype).contiguous()
    if use_kernel:
        from cggr_fn.kernels import head as grad_kernel
        from cggr_fn.kernels import token_stats as stats_kernel

        # One logits buffer for every chunk (the allocator would reuse it
        # anyway; this also keeps the GEMM writing to the same pages).
        buffer = rows.new_empty(min(chunk_size, k), vocab)
    weight_t = weight.t()
    for start in range(0, k, chunk_size):
        stop = min(start + chunk_size, k)
        part, part_targets, part_coef = rows[start:stop], targets[start:stop], coef[start:stop]
        if use_kernel:
            logits = buffer[: stop - start]
            if bias is None:
                torch.mm(part, weight_t, out=logits)
            else:
                torch.addmm(bias, part, weight_t, out=logits)
            outputs = tuple(s[start:stop] for s in stats)
            stats_kernel.launch(logits, part_targets, ignore_index, outputs)
            grad_kernel.launch(logits, outputs[3], part_targets, part_coef)
            grad = logits
        else:
            from cggr_fn.kernels.head import softmax_grad_reference

            logits = torch.nn.functional.linear(part, weight, bias)
            part_stats = token_stats_reference(logits, part_targets, ignore_index)
            for whole, piece in zip(stats, part_stats):
                whole[start:stop] = piece
            grad = softmax_grad_reference(logits, part_stats[3], part_targets, part_coef)
            del logits
        torch.mm(grad, weight, out=d_rows[start:stop])
        if not weight_grad:
            pass
        elif start == 0:
            # The first chunk writes the weight gradient instead of adding to
            # zeros: one pass less over a (vocab, hidden_size) tensor.
            torch.mm(grad.t(), part, out=d_weight)
        else:
            d_weight.addmm_(grad.t(), part)
        if bias is not None:
            d_bias += grad.sum(0, dtype=dtype)
        del grad
    return (*stats, d_rows, d_weight, d_bias.to(weight.dtype))


@linear_cross_entropy_grad.register_fake
def _linear_cross_entropy_grad_fake(rows, weight, bias, targets, coef, ignore_index, chunk_size, use_kernel, weight_grad):
    dtype = torch.float32 if use_kernel else compute_dtype(rows.dtype)
    stats = tuple(rows.new_empty(rows.shape[0], dtype=dtype) for _ in range(6))
    d_weight = weight.new_empty(weight.shape if weight_grad else (0,))
    return (*stats, rows.new_empty(rows.shape), d_weight, weight.new_empty(weight.shape[0] if bias is not None else 0))


@linear_cross_entropy_grad.register_vmap
def _linear_cross_entropy_grad_vmap(
    info, in_dims, rows, weight, bias, targets, coef, ignore_index, chunk_size, use_kernel, weight_grad
):
    # Each batch element is a separate head (its own weight, possibly): one
    # call per element, stacked. vmap over this op is for composability
    # (torch.func.vmap of a training step), not throughput.
    def element(x, dim, i):
        return x if x is None or dim is None else x.select(dim, i)

    tensors = (rows, weight, bias, targets, coef)
    results = [
        linear_cross_entropy_grad(
            *(element(x, d, i) for x, d in zip(tensors, in_dims[:5])), ignore_index, chunk_size, use_kernel, weight_grad
        )
        for i in range(info.batch_size)
    ]
    return tuple(torch.stack(column) for column in zip(*results)), (0,) * 9


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(where(active, coef * nll, 0))`` of the rows' logits, with gradients computed in the forward.

    Outputs: the loss, the rows' six statistics and (saved for the backward,
    non-differentiable) the three gradients at unit upstream gradient.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rows, weight, bias, coef, targets, active, ignore_index, chunk_size, use_kernel, weight_grad):
        scale = torch.where(active, coef, 0.0)
        *stats, d_rows, d_weight, d_bias = linear_cross_entropy_grad(
            rows, weight, bias, targets, scale, ignore_index, chunk_size, use_kernel, weight_grad
        )
        # where(), not a product with 0: an untrained row's nll may be +inf.
        loss = torch.where(active, coef * stats[4], 0.0).sum()
        return (loss, *stats, d_rows, d_weight, d_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, bias, _, _, active, *_, weight_grad = inputs
        _, *stats, d_rows, d_weight, d_bias = output
        ctx.has_bias = bias is not None
        ctx.weight_grad = weight_grad
        # Only the loss is differentiable: without this, autograd would hand
        # backward zeros for every other output, a weight-sized one included.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(d_rows, d_weight, d_bias, stats[4], active)
        ctx.mark_non_differentiable(*stats, d_rows, d_weight, d_bias)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        in_place = not _out_of_place()
        if in_place and getattr(ctx, "scaled", False):
            raise RuntimeError(
                "fused head loss: its eager backward scales the gradients it computed in the forward in place, "
                "so it runs once per forward (retain_graph=True cannot reuse them); compute the loss again for "
                "another backward"
            )
        ctx.scaled = in_place
        d_rows, d_weight, d_bias, nll, active = ctx.saved_tensors
        # Scaled in place in eager autograd: a copy of the weight gradient
        # would double the backward's peak memory. torch.func transforms
        # refuse in-place ops on captured tensors, and under torch.compile
        # the compiler plans the buffers: there the product is out of place.
        # A 0-d upstream gradient keeps the 16-bit dtypes. Every gradient is
        # returned, needed or not: ctx.needs_input_grad reads False for the
        # weight under torch.compile of torch.func.grad (torch 2.13), which
        # would silently zero it.
        scale = torch.Tensor.mul_ if in_place else torch.mul
        return (
            scale(d_rows, grad_loss),
            scale(d_weight, grad_loss) if ctx.weight_grad else None,
            scale(d_bias, grad_loss) if ctx.has_bias else None,
            grad_loss * torch.where(active, nll, 0.0),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _out_of_place() -> bool:
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


# ------------------------------------------------------------------- losses


def fused_selective_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    selection: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    capacity: int | None = None,
    ignore_index: int = -100,
    normalize: str = "selected",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`cggr_fn.selective_loss` of ``hidden @ weight.T + bias``, at the cost of the selected tokens only.

    The same loss (``sum(w * nll) / count`` over the selected, labelled
    tokens; ``normalize`` and ``weights`` as there), computed on the selected
    rows alone: they are gathered into a fixed number of slots, their logits
    are computed ``chunk_size`` rows at a time, and the gradient with respect
    to each chunk's logits is formed in the forward and turned at once into
    the rows' gradient and their share of the weight gradient; the logits are
    never stored. Forward and backward cost scale with the number of slots;
    unselected tokens get an exact zero gradient, and the weight gradient
    comes from selected rows only. Gradients flow to ``hidden``, ``weight``,
    ``bias`` and ``weights``; a frozen head (a ``weight`` that does not
    require grad) skips the weight-gradient GEMMs, a third of the work
    (in eager mode and under ``torch.func``; under ``torch.compile`` they
    always run). The eager backward scales the forward's gradients in place
    (no second copy of the weight gradient), so it runs once per forward:
    a second backward through the same graph (``retain_graph=True``)
    raises.

    ``selection`` is either

    * a boolean mask of shape ``hidden.shape[:-1]`` (e.g. from
      :func:`cggr_fn.select`), with ``capacity`` the static number of slots:
      pass the ``k`` the mask was made with (``cggr_fn.capacity(n,
      ratio=ratio)``); by default every token gets a slot (exact, but no
      saving). A mask with more than ``capacity`` selected tokens gives a NaN
      loss (:func:`cggr_fn.checking` raises);
    * or a 1-D integer tensor of positions into the flattened tokens (e.g.
      ``torch.topk(scores.flatten(), k).indices``); a position listed twice
      counts twice; one outside ``[0, n)`` gives a NaN loss
      (:func:`cggr_fn.checking` raises).

    Precision and special values: the logits are computed in the dtype of
    ``hidden`` and the loss in float32 (float64 for float64 inputs), like
    ``selective_loss(torch.nn.functional.linear(hidden, weight, bias), ...)``;
    float32/bfloat16/float16 CUDA tensors take the fused kernels (agreeing
    with the reference within :class:`cggr_fn.TokenStats`' tolerance). The
    gradients are computed as autograd would in the input dtype, except that
    the weight gradient is accumulated over chunks in the weight's dtype (one
    rounding per chunk). NaN follows :func:`cggr_fn.selective_loss`: NaN when a
    labelled target is out of range or a *selected* row has no distribution
    (unselected rows' logits are never computed, so they cannot be checked;
    :func:`fused_head_loss` checks every row); an unselected or ignored row's
    gradient is exactly zero.

    Args:
      hidden: ``(..., hidden_size)`` floating tensor.
      weight: ``(vocab, hidden_size)`` LM-head weight, same dtype and device.
      targets: integer tensor of shape ``hidden.shape[:-1]``.
      selection: boolean mask of shape ``hidden.shape[:-1]``, or 1-D integer
        positions into ``hidden.shape[:-1]`` flattened; on ``hidden``'s device.
      weights: optional floating per-token weights of shape ``hidden.shape[:-1]``.
      bias: optional ``(vocab,)`` bias, same dtype and device.
      capacity: slots for a mask selection (static), in ``[0, n]``; default ``n``.
      ignore_index: target value of positions without a label.
      normalize: ``"selected"`` or ``"valid"``, as in :func:`cggr_fn.selective_loss`.
      chunk_size: rows per chunk; default :func:`chunk_rows` (logits about the size of ``hidden``).

    Returns:
      A 0-d tensor, float32 or float64 for float64 inputs.

    Example:
      >>> import torch, cggr_fn
      >>> hidden = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
      >>> weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
      >>> targets = torch.randint(0, 30, (2, 4))
      >>> mask = cggr_fn.select(cggr_fn.fused_linear_token_stats(hidden, weight, targets).nll, ratio=0.25)
      >>> loss = cggr_fn.fused_selective_loss(hidden, weight, targets, mask, capacity=2)
      >>> want = cggr_fn.selective_loss(hidden @ weight.T, targets, mask)
      >>> torch.allclose(loss, want)
      True
      >>> loss.backward()
      >>> (hidden.grad.abs().sum(-1) > 0).equal(mask)  # unselected tokens: exactly zero
      True
    """
    _check_head(hidden, weight, bias)
    vocab = weight.shape[0]
    _check_targets(targets, hidden, vocab, ignore_index)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if weights is not None:
        _check_per_token(weights, hidden, "weights")
    chunk = _check_chunk(chunk_size, weight, hidden)
    n = targets.numel()
    slots, valid, bad_selection = _slots(selection, hidden, capacity)
    flat_targets = targets.reshape(-1)
    flat_weights = None if weights is None else weights.reshape(-1)
    loss, slot_stats = _slot_loss(
        hidden.reshape(n, hidden.shape[-1]), weight, bias, flat_targets, slots, valid, flat_weights, normalize,
        ignore_index, chunk,
    )
    labelled = flat_targets != ignore_index
    out_of_range = labelled & ((flat_targets < 0) | (flat_targets >= vocab))
    # The rule of selective_loss, over the rows whose logits exist here.
    broken = out_of_range.any() | (valid & torch.isnan(slot_stats[3])).any() | bad_selection
    return loss + torch.where(broken, float("nan"), 0.0)


class HeadLoss(NamedTuple):
    """What :func:`fused_head_loss` computes in one call.

    Attributes:
      loss: the 0-d selective loss (differentiable).
      stats: the :class:`cggr_fn.TokenStats` of every token (constants).
      mask: boolean, the selected tokens.
      weights: the per-token weights the loss used: the estimator weights of
        ``"priority"`` (see :func:`cggr_fn.priority_sample`), otherwise 1 on
        the selected tokens; 0 elsewhere.
    """

    loss: torch.Tensor
    stats: TokenStats
    mask: torch.Tensor
    weights: torch.Tensor


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ratio: float,
    method: ScoreMethod = "combined",
    strategy: str = "topk",
    num_strata: int = 4,
    min_per_sequence: int = 1,
    seed: Step = 0,
    uniform_mix: float = 0.0,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    normalize: str = "selected",
    chunk_size: int | None = None,
) -> HeadLoss:
    """Score every token, select a fixed number, and return their loss: the CGGR head in one call.

    Equal to composing, on the logits ``hidden @ weight.T + bias`` that it
    never holds: :func:`fused_linear_token_stats` (pass 1, every row),
    ``score`` with ``method`` on those statistics, the selection (``strategy``
    ``"topk"``, ``"stratified"`` or ``"sequence_aware"``: :func:`cggr_fn.select`;
    ``"priority"``: :func:`cggr_fn.priority_sample`, whose weights enter the
    loss), and :func:`fused_selective_loss` over the ``k =
    capacity(n, ratio=ratio)`` selected rows (pass 2). Pass 2 recomputes the
    selected rows' logits, so the cost is one GEMM over every row plus three
    over the selected ones. At ``ratio=1.0`` with a named ``method`` every
    labelled token is selected whatever the scores, so both passes are one:
    three GEMMs over every row, like a fused linear cross-entropy. The NaN
    rule is :func:`cggr_fn.selective_loss`'s over every row (pass 1 sees them
    all). Pure, no host sync, static shapes.

    Args:
      hidden: ``(..., hidden_size)`` floating tensor.
      weight: ``(vocab, hidden_size)`` LM-head weight, same dtype and device.
      targets: integer tensor of shape ``hidden.shape[:-1]``.
      ratio: keep ratio in ``(0, 1]``, a Python float (the number of slots of
        pass 2 is static).
      method: a :func:`cggr_fn.score` method; for ``"priority"`` use a
        non-negative one such as ``"grad_norm"`` or ``"loss"``.
      strategy: ``"topk"``, ``"stratified"``, ``"sequence_aware"`` or ``"priority"``.
      num_strata: for ``"stratified"``.
      min_per_sequence: for ``"sequence_aware"``.
      seed: for ``"stratified"`` and ``"priority"`` (e.g. the step).
      uniform_mix: for ``"priority"``.
      bias: optional ``(vocab,)`` bias.
      ignore_index: target value of positions without a label.
      normalize: ``"selected"`` or ``"valid"`` (use ``"valid"`` with
        ``"priority"`` for an unbiased estimate of the dense mean).
      chunk_size: rows per chunk; default :func:`chunk_rows` (logits about the size of ``hidden``).

    Returns:
      A :class:`HeadLoss` ``(loss, stats, mask, weights)``.

    Example:
      >>> import torch, cggr_fn
      >>> hidden = torch.randn(4, 16, 8, dtype=torch.float64)
      >>> weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
      >>> targets = torch.randint(0, 30, (4, 16))
      >>> out = cggr_fn.fused_head_loss(hidden, weight, targets, ratio=0.25, method="grad_norm")
      >>> int(out.mask.sum())
      16
      >>> logits = hidden @ weight.T
      >>> torch.allclose(out.loss, cggr_fn.selective_loss(logits, targets, out.mask))
      True
      >>> out = cggr_fn.fused_head_loss(hidden, weight, targets, ratio=0.25, method="grad_norm",
      ...                               strategy="priority", normalize="valid", seed=7)
      >>> want = cggr_fn.selective_loss(logits, targets, out.mask, weights=out.weights, normalize="valid")
      >>> torch.allclose(out.loss, want)
      True
    """
    _check_head(hidden, weight, bias)
    vocab = weight.shape[0]
    _check_targets(targets, hidden, vocab, ignore_index)
    if isinstance(ratio, torch.Tensor):
        raise TypeError(
            "ratio: expected a Python float (pass 2 runs on a static number of rows, "
            "capacity(n, ratio=ratio)), got a tensor; use fused_selective_loss with a mask and capacity"
        )
    _checks.check_ratio(ratio)
    if strategy not in HEAD_STRATEGIES:
        raise ValueError(f"strategy: expected one of {HEAD_STRATEGIES}, got {strategy!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    _checks.check_seed(seed)
    to_score = resolve_method(method, targets)
    chunk = _check_chunk(chunk_size, weight, hidden)
    lead = targets.shape
    n = targets.numel()
    flat_hidden = hidden.reshape(n, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    dtype = compute_dtype(hidden.dtype)

    if ratio == 1.0 and isinstance(method, str):
        # Every named method scores -inf exactly at ignored tokens, and ratio 1
        # selects every other token: the loss needs no scores, so the
        # statistics come out of the loss pass itself.
        labelled = flat_targets != ignore_index
        coef = torch.ones(n, dtype=dtype, device=hidden.device) / labelled.sum().clamp_min(1)
        loss, *flat_stats = _LinearCrossEntropy.apply(
            flat_hidden, weight, bias, coef, flat_targets, labelled, ignore_index, chunk, _use_kernel(hidden),
            _weight_grad(weight),
        )[:7]
        stats = TokenStats(*(s.reshape(lead) for s in flat_stats))
        mask, sample_weights = _selection(scores_from_stats(stats, targets, to_score, ignore_index), ratio, strategy,
                                          num_strata, min_per_sequence, seed, uniform_mix)
    else:
        stats = TokenStats(*(s.reshape(lead) for s in linear_token_stats(
            flat_hidden, weight, bias, flat_targets, ignore_index, chunk, _use_kernel(hidden))))
        mask, sample_weights = _selection(scores_from_stats(stats, targets, to_score, ignore_index), ratio, strategy,
                                          num_strata, min_per_sequence, seed, uniform_mix)
        slots, valid, _ = _slots(mask, hidden, _capacity(n, ratio=ratio))
        loss, _ = _slot_loss(
            flat_hidden, weight, bias, flat_targets, slots, valid,
            None if sample_weights is None else sample_weights.reshape(-1), normalize, ignore_index, chunk,
        )
    broken = torch.isnan(stats.logsumexp).any() | torch.isnan(stats.nll).any()
    loss = loss + torch.where(broken, float("nan"), 0.0)
    weights_out = mask.to(dtype) if sample_weights is None else sample_weights
    return HeadLoss(loss, stats, mask, weights_out)


def _selection(
    scores: torch.Tensor, ratio: float, strategy: str, num_strata: int, min_per_sequence: int, seed: Step, uniform_mix: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if strategy == "priority":
        sample = priority_sample(scores, ratio=ratio, seed=seed, uniform_mix=uniform_mix)
        return sample.mask, sample.weights
    mask = select(scores, ratio=ratio, strategy=strategy, num_strata=num_strata, min_per_sequence=min_per_sequence, seed=seed)
    return mask, None


def _slot_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor | None,
    normalize: str,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The loss over the rows ``hidden[slots]`` (flat inputs), where ``valid``; and their statistics."""
    dtype = compute_dtype(hidden.dtype)
    labelled = targets != ignore_index
    slot_targets = targets.gather(0, slots)
    trained = valid & labelled.gather(0, slots)
    numerator = torch.ones(slots.shape, dtype=dtype, device=hidden.device)
    if weights is not None:
        # where() first: a weight that is never read (NaN, inf) must not reach the loss.
        numerator = torch.where(trained, weights.gather(0, slots).to(dtype), 1.0)
    denominator = (trained if normalize == "selected" else labelled).sum().clamp_min(1)
    rows = hidden.index_select(0, slots)
    loss, *stats = _LinearCrossEntropy.apply(
        rows, weight, bias, numerator / denominator, slot_targets, trained, ignore_index, chunk, _use_kernel(hidden),
        _weight_grad(weight),
    )[:7]
    return loss, tuple(stats)


def _slots(selection: object, hidden: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-capacity slots of a selection: (positions, slot holds a selected token, selection is broken)."""
    n = hidden.shape[:-1].numel()
    lead = tuple(hidden.shape[:-1])
    if not isinstance(selection, torch.Tensor):
        raise TypeError(f"selection: expected a boolean mask or integer positions (a torch.Tensor), got {type(selection).__name__}")
    if selection.device != hidden.device:
        raise ValueError(f"selection: expected device {hidden.device} (hidden's device), got {selection.device}")
    if selection.dtype == torch.bool:
        if selection.shape != hidden.shape[:-1]:
            raise ValueError(f"selection: a mask must have shape {lead} (hidden.shape[:-1]), got {tuple(selection.shape)}")
        if capacity is None:
            capacity = n
        _checks.check_int(capacity, "capacity", minimum=0)
        if capacity > n:
            raise ValueError(f"capacity: expected an int <= {n} (the number of tokens), got {_checks.shown(capacity)}")
        flat = selection.reshape(-1)
        if _checks.value_checks_enabled() and int(flat.sum()) > capacity:  # sync-ok: checking mode only
            raise ValueError(f"selection: the mask selects {int(flat.sum())} tokens, more than capacity={capacity}")  # sync-ok
        # Selected positions first, in order; the rest pad the slots.
        slots = torch.argsort(flat.logical_not().to(torch.int8), stable=True)[:capacity]
        overflow = flat.sum() > capacity
        return slots, flat.gather(0, slots), overflow
    if selection.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"selection: expected a boolean mask or int64/int32 positions, got dtype {selection.dtype}")
    if selection.dim() != 1:
        raise ValueError(f"selection: positions must be a 1-D tensor, got shape {tuple(selection.shape)}")
    if capacity is not None:
        raise ValueError("capacity: applies to a mask selection; positions already fix the number of slots")
    if n == 0 and selection.numel() > 0:
        raise ValueError(f"selection: {selection.numel()} positions into 0 tokens")
    in_range = (selection >= 0) & (selection < n)
    if _checks.value_checks_enabled() and not bool(in_range.all()):  # sync-ok: checking mode only
        raise ValueError(f"selection: expected positions in [0, {n}), got values in "
                         f"[{int(selection.min())}, {int(selection.max())}]")  # sync-ok
    slots = torch.where(in_range, selection, 0).long()
    return slots, in_range, ~in_range.all()


# ------------------------------------------------------------------- checks


def _check_head(hidden: object, weight: object, bias: object) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden: expected a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden: expected at least 1 dimension (..., hidden_size), got a 0-d tensor")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (vocab, {hidden.shape[-1]}) (hidden_size = hidden.shape[-1]), got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"weight: expected a vocabulary of at least 2 (weight.shape[0]), got {weight.shape[0]}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(tensor).__name__}")
        if tensor.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected dtype {hidden.dtype} (hidden's dtype), got {tensor.dtype}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name}: expected device {hidden.device} (hidden's device), got {tensor.device}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (weight.shape[0]), got {tuple(bias.shape)}")
    if _checks.value_checks_enabled():
        for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if tensor is not None and not bool(torch.isfinite(tensor).all()):  # sync-ok: checking mode only
                raise ValueError(f"{name}: contains NaN or infinite values")


def _check_targets(targets: object, hidden: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets: expected an integer tensor of class indices (int64 or int32), got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets: expected device {hidden.device} (hidden's device), got {targets.device}")
    _checks.check_int(ignore_index, "ignore_index")
    if _checks.value_checks_enabled() and targets.numel() > 0:
        valid = targets != ignore_index
        if bool((valid & ((targets < 0) | (targets >= vocab))).any()):  # sync-ok: checking mode only
            lo, hi = int(targets[valid].min()), int(targets[valid].max())  # sync-ok
            raise ValueError(f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}, got values in [{lo}, {hi}]")


def _check_per_token(tensor: object, hidden: torch.Tensor, name: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"{name}: expected a floating-point tensor, got {got}")
    if tensor.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(tensor.shape)}")
    if tensor.device != hidden.device:
        raise ValueError(f"{name}: expected device {hidden.device} (hidden's device), got {tensor.device}")


def _check_chunk(chunk_size: object, weight: torch.Tensor, hidden: torch.Tensor) -> int:
    if chunk_size is None:
        return chunk_rows(hidden.numel() // max(hidden.shape[-1], 1), hidden.shape[-1], weight.shape[0])
    _checks.check_int(chunk_size, "chunk_size", minimum=1)
    return chunk_size
