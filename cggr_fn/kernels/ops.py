"""torch.library registration of the fused token-statistics kernel.

The kernel is registered as a kernel-only custom op, ``cggr_fn::token_stats``
(``torch.library.custom_op`` with ``register_fake`` and ``register_vmap``, no
autograd): the statistics are constants, so :func:`fused_token_stats` detaches
its input and the op never sees a tensor that requires grad. That keeps it
usable in eager mode, under ``torch.compile(fullgraph=True)``, ``torch.func.vmap``,
inside functions that ``torch.func.grad``/``vjp``/``jvp`` transform (the
outputs are constants with no tangent), and inside CUDA graph capture.
``triton_op``/``wrap_triton`` are not used because they fail under
``TRITON_INTERPRET=1``, which CI relies on.
"""

from __future__ import annotations

import torch

from cggr_fn._stats import KERNEL_DTYPES
from cggr_fn.kernels import token_stats as _kernel

_Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("cggr_fn::token_stats", mutates_args=())
def token_stats_op(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int) -> _Stats:
    """Entropy, confidence, margin, logsumexp, nll and grad_norm of ``(..., vocab)`` logits.

    Args:
      logits: floating ``(..., vocab)`` tensor (fp32, bf16 or fp16).
      targets: integer tensor of shape ``logits.shape[:-1]``, or None.
      ignore_index: target value that marks a position without a label.

    Returns:
      Six new float32 tensors of shape ``logits.shape[:-1]``.
    """
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    if logits.stride(-1) != 1:
        # The kernel needs unit stride along the vocabulary.
        logits = logits.contiguous()
    # The kernel addresses rows in two levels (outer, inner), so a (batch, seq,
    # vocab) view with any strides, e.g. logits[:, :-1], is read in place; only
    # further leading dims that do not collapse into one make reshape copy.
    rows = logits.reshape(1, -1, vocab) if logits.dim() <= 2 else logits.reshape(-1, *logits.shape[-2:])
    n = rows.shape[0] * rows.shape[1]
    outputs = tuple(torch.empty(n, device=logits.device, dtype=torch.float32) for _ in range(6))
    flat_targets = None if targets is None else targets.reshape(-1)
    _kernel.launch(rows, flat_targets, ignore_index, outputs)
    return tuple(out.view(lead) for out in outputs)


@token_stats_op.register_fake
def _token_stats_fake(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int) -> _Stats:
    shape = logits.shape[:-1]
    return tuple(logits.new_empty(shape, dtype=torch.float32) for _ in range(6))


@token_stats_op.register_vmap
def _token_stats_vmap(info, in_dims, logits, targets, ignore_index):
    # The op takes any leading dims, so a vmapped call is one call with the
    # batch dim moved to the front.
    logits_dim, targets_dim, _ = in_dims
    if logits_dim is None:
        logits = logits.expand(info.batch_size, *logits.shape)
    else:
        logits = logits.movedim(logits_dim, 0)
    if targets is not None:
        if targets_dim is None:
            targets = targets.expand(info.batch_size, *targets.shape)
        else:
            targets = targets.movedim(targets_dim, 0)
    return token_stats_op(logits, targets, ignore_index), (0,) * 6


def fused_token_stats(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int) -> _Stats:
    """The fused kernel behind :func:`cggr_fn.token_stats` (same semantics).

    Arguments are assumed validated by the caller. CUDA tensors run the
    compiled kernel; CPU tensors run it under ``TRITON_INTERPRET=1`` (for
    tests; without the interpreter Triton has no CPU backend).

    Args:
      logits: float32, bfloat16 or float16 ``(..., vocab)`` tensor (the kernel
        computes in float32, so float64 is refused rather than silently
        rounded; :func:`cggr_fn.token_stats` takes float64 to the float64
        reference instead); the last dim is read in place
        when it has stride 1, whatever the strides of a (batch, seq) pair of
        leading dims (``logits[:, :-1]`` is not copied).
      targets: integer tensor of shape ``logits.shape[:-1]``, or None (nll and
        grad_norm are then NaN).
      ignore_index: target value that marks a position without a label (nll
        and grad_norm 0).

    Returns:
      ``(entropy, confidence, margin, logsumexp, nll, grad_norm)``, float32 tensors of
      shape ``logits.shape[:-1]``, constants with respect to any autograd or
      ``torch.func`` transform.
    """
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"logits: the fused kernel computes in float32 and takes {', '.join(map(str, KERNEL_DTYPES))}, "
            f"got {logits.dtype}; cggr_fn.token_stats computes float64 logits in float64 on any device"
        )
    # Constants by definition: detaching here is what keeps the op free of
    # autograd and lets it run inside torch.func.grad / vjp / jvp.
    if targets is not None:
        targets = targets.detach()
    return token_stats_op(logits.detach(), targets, int(ignore_index))
