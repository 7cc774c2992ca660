"""The softmax-gradient kernel of the fused LM head: ``coef * (softmax(x) - onehot(target))`` in place.

The fused selective loss (:mod:`cggr_fn._head`) computes a chunk of logits with
one GEMM, their log-sum-exp with the token-statistics kernel, and then needs the
cross-entropy's gradient with respect to those logits, scaled per row, before
the two backward GEMMs. Writing it over the logits chunk itself (Liger-Kernel's
trick) keeps one ``(rows, vocab)`` buffer alive instead of two: the logits are
read once more and overwritten, never stored for a backward pass.

:func:`softmax_grad_reference` is the definition; :func:`launch` runs the
Triton kernel (on CUDA, or on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def softmax_grad_kernel(
    x_ptr, lse_ptr, tgt_ptr, coef_ptr, vocab, row_stride, tgt_stride, BLOCK: tl.constexpr,
):
    """Program (row, block): overwrite ``BLOCK`` logits of one row with their gradient."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    coef = tl.load(coef_ptr + row)
    lse = tl.load(lse_ptr + row)
    tgt = tl.load(tgt_ptr + row.to(tl.int64) * tgt_stride).to(tl.int64)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab
    # int64: a chunk of rows x 128256 classes passes 2**31 elements.
    ptrs = x_ptr + row.to(tl.int64) * row_stride + cols
    x = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    p = tl.exp2((x - lse) * _LOG2E)
    # An ignored or out-of-range target matches no column: no onehot term.
    onehot = (cols == tgt).to(tl.float32)
    # A zero coefficient is an untrained row: exactly 0, even where its
    # logits are broken (NaN * 0 would be NaN).
    grad = tl.where(coef == 0.0, 0.0, coef * (p - onehot))
    tl.store(ptrs, grad.to(x_ptr.dtype.element_ty), mask=inside)


def block_size(vocab: int) -> int:
    """Elements per program: small when interpreting (tests span several blocks), 2048 on a GPU."""
    if INTERPRETING:
        return 8
    return min(2048, triton.next_power_of_2(vocab))


def launch(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, block: int | None = None) -> None:
    """Overwrite ``(rows, vocab)`` logits with ``coef * (softmax - onehot(target))`` in their own dtype.

    Args:
      logits: float32, bfloat16 or float16 ``(rows, vocab)`` tensor with
        ``stride(-1) == 1``, overwritten.
      lse: float32 ``(rows,)`` contiguous log-sum-exp of each row (NaN for a
        row without a distribution, which makes its gradient NaN).
      targets: ``(rows,)`` integer tensor (any stride); values outside
        ``[0, vocab)`` (e.g. ``ignore_index``) subtract no onehot.
      coef: float32 ``(rows,)`` contiguous per-row scale; rows with 0 are
        written as exact zeros.
      block: elements per program (tests); :func:`block_size` by default.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = block or block_size(vocab)
    grid = (rows, triton.cdiv(vocab, block))
    softmax_grad_kernel[grid](
        logits, lse, targets, coef, int(vocab), int(logits.stride(0)), int(targets.stride(0)), BLOCK=block,
        num_warps=1 if INTERPRETING else 4,
    )


def softmax_grad_reference(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition of the kernel: a new tensor in ``logits.dtype``.

    Computed in ``lse.dtype`` (float32, or float64 for float64 logits).
    """
    x = logits.to(lse.dtype)
    p = torch.exp(x - lse.unsqueeze(-1))
    columns = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (columns == targets.unsqueeze(-1)).to(lse.dtype)
    c = coef.to(lse.dtype).unsqueeze(-1)
    return torch.where(c == 0, 0.0, c * (p - onehot)).to(logits.dtype)
