"""Fused one-pass token statistics: the Triton kernel and its launch configuration.

One program handles one row of a ``(rows, vocab)`` logits matrix and reads it
exactly once, block by block, keeping an online softmax (running maximum, sum of
``exp`` and sum of ``exp * shifted``, and with targets the sum of ``exp**2``
over the non-target classes) and the two largest values seen. From that state
it writes the entropy, the top-1 probability, the top-1 minus top-2
probability, the logsumexp, the target's negative log-likelihood and the norm
of the logits gradient of the cross-entropy, ``||softmax - onehot(target)||``.

Why the block has the shape ``(K, LANES, VEC)``: on a GPU each thread owns one
lane and loads ``K`` vectors of ``VEC`` contiguous elements (16 bytes) per
block, the warp's loads of one ``k`` being contiguous (coalesced). Every lane
keeps its *own* online softmax (maximum, sums) and top-2, so the loop has no
cross-thread reduction, shuffle or barrier at all: the bf16 loop body is about a
dozen SASS instructions per element (sm_90), under the ~19 instruction slots
per element that an H100 has at full memory bandwidth. Lanes are merged once,
at the end of the row. With targets, the sum of squares for grad_norm adds an
FMA per element and a rescale per block (sm_90, bf16, 4 warps: 129 SASS
instructions per 8-element loop iteration against 117 without targets); the
loads are the same.

The arithmetic follows :func:`cggr_fn._stats.token_stats_reference`, which is
the definition; this module holds only the kernel and :func:`launch`, with no
torch.library glue (that lives in :mod:`cggr_fn.kernels.ops`).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels are interpreted, so this
# module decides its launch configuration by the same variable.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _finite_exponent(delta):
    """A rescaling exponent kept finite: the difference of two finite logits
    beyond +-1.7e38 overflows to -inf, and -inf * 0 sums would be NaN; any
    exponent below -1e30 already scales to exactly 0."""
    return tl.maximum(delta, -1.0e30)


@triton.jit
def _fold_block(x, is_target, m1v, m2v, m_l, s_l, t_l, q_l, SQUARES: tl.constexpr, MASK: tl.constexpr):
    """Fold one block ``x`` (fp32, shape (K, LANES, VEC), padding -inf) into the state.

    State: ``m1v``/``m2v`` the elementwise largest and second-largest values
    seen (duplicates kept, so ties survive), shape (K, LANES, VEC); per lane
    (shape (LANES,)) the running maximum ``m_l`` and the sums ``s_l`` of
    ``e = 2**d2`` and ``t_l`` of ``e * d2``, ``d2 = (x - m_l) * log2(e)``, and
    with ``SQUARES`` ``q_l`` of ``e**2``, leaving out the slot where
    ``is_target`` (shape (K, LANES, VEC)) is True if ``MASK``.
    """
    m2v = tl.maximum(m2v, tl.minimum(m1v, x))
    m1v = tl.maximum(m1v, x)
    m_new = tl.maximum(m_l, tl.max(tl.max(x, axis=2), axis=0))
    # Exponents are differences taken *before* scaling by log2(e): the
    # maximum's own d2 is then exactly 0 (its e exactly 1), and the shift
    # cannot be contracted with the scaling into an FMA whose rounding
    # residual (about an ulp of |x| * log2(e)) would push the confidence of a
    # large-magnitude row above 1 or compound across blocks. While a lane has
    # seen only -inf there is nothing to shift by: shift by 0 so -inf entries
    # give exp2(-inf) = 0 rather than NaN. A lane's sums are 0 while its
    # maximum is -inf, so any finite scale is right there; 1 avoids exp2
    # overflow when the first finite maximum is very negative.
    old_is_empty = m_l == _NEG_INF
    delta = tl.where(old_is_empty, 0.0, _finite_exponent((m_l - m_new) * _LOG2E))
    scale = tl.where(old_is_empty, 1.0, tl.exp2(delta))
    base = tl.where(m_new == _NEG_INF, 0.0, m_new)
    d2 = (x - base[None, :, None]) * _LOG2E
    e = tl.exp2(d2)
    # A -inf logit has e = 0 and contributes nothing; clamping d2 avoids the
    # NaN of 0 * -inf. A NaN logit still poisons the sums through e.
    ed = e * tl.maximum(d2, -1.0e30)
    t_l = scale * (t_l + delta * s_l) + tl.sum(tl.sum(ed, axis=2), axis=0)
    s_l = scale * s_l + tl.sum(tl.sum(e, axis=2), axis=0)
    if SQUARES:
        if MASK:
            e_other = tl.where(is_target, 0.0, e)
        else:
            e_other = e
        q_l = scale * scale * q_l + tl.sum(tl.sum(e_other * e_other, axis=2), axis=0)
    return m1v, m2v, m_new, s_l, t_l, q_l


@triton.jit
def _fold_blocks(
    row_ptr, offs, start, stop, m1v, m2v, m_l, s_l, t_l, q_l,
    SQUARES: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Fold the full blocks ``start <= b < stop`` (none if ``stop <= start``), unmasked."""
    # Full blocks load unmasked so the loads stay 16-byte vectors whatever the
    # vocabulary; only the last, partial block pays for a mask.
    if PREFETCH:
        # Software pipelining by hand: the next block's loads are in flight
        # while this block is folded. A uniform scalar mask keeps them vectors.
        nxt = tl.load(row_ptr + start * BLOCK + offs, mask=start < stop)
        for b in range(start, stop):
            x = nxt.to(tl.float32)
            nxt = tl.load(row_ptr + (b + 1) * BLOCK + offs, mask=b + 1 < stop)
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_block(x, None, m1v, m2v, m_l, s_l, t_l, q_l, SQUARES, False)
    else:
        for b in range(start, stop):
            x = tl.load(row_ptr + b * BLOCK + offs).to(tl.float32)
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_block(x, None, m1v, m2v, m_l, s_l, t_l, q_l, SQUARES, False)
    return m1v, m2v, m_l, s_l, t_l, q_l


@triton.jit
def token_stats_kernel(
    x_ptr,
    tgt_ptr,
    entropy_ptr,
    confidence_ptr,
    margin_ptr,
    lse_ptr,
    nll_ptr,
    grad_norm_ptr,
    vocab,
    inner,
    outer_stride,
    row_stride,
    tgt_stride,
    ignore_index,
    HAS_TARGETS: tl.constexpr,
    TWO_LEVEL: tl.constexpr,
    K: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One program per row: read the row once, write its six statistics.

    With ``TWO_LEVEL``, rows are addressed as ``row = outer * inner + i`` at
    ``outer * outer_stride + i * row_stride``, so a ``(batch, seq, vocab)``
    view such as ``logits[:, :-1]`` is read in place; rows with one stride
    skip that arithmetic.
    """
    BLOCK: tl.constexpr = K * LANES * VEC
    row = tl.program_id(0)
    # int64: row offsets exceed 2**31 elements on large batches.
    if TWO_LEVEL:
        outer = row // inner
        row_ptr = x_ptr + outer.to(tl.int64) * outer_stride + (row - outer * inner).to(tl.int64) * row_stride
    else:
        row_ptr = x_ptr + row.to(tl.int64) * row_stride
    offs = (
        tl.arange(0, K)[:, None, None] * (LANES * VEC)
        + tl.arange(0, LANES)[None, :, None] * VEC
        + tl.arange(0, VEC)[None, None, :]
    )

    m1v = tl.full((K, LANES, VEC), _NEG_INF, tl.float32)
    m2v = tl.full((K, LANES, VEC), _NEG_INF, tl.float32)
    m_l = tl.full((LANES,), _NEG_INF, tl.float32)
    s_l = tl.zeros((LANES,), tl.float32)
    t_l = tl.zeros((LANES,), tl.float32)
    q_l = tl.zeros((LANES,), tl.float32)

    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + row.to(tl.int64) * tgt_stride).to(tl.int64)
        labelled = tgt != ignore_index
        in_range = (tgt >= 0) & (tgt < vocab)
        # The column whose e**2 the sum of squares leaves out; -1 (no column)
        # for an ignored or out-of-range target, whose grad_norm is not used.
        tgt_col = tl.where(in_range & labelled, tgt, -1).to(tl.int32)

    n_full = vocab // BLOCK
    # With targets, the sum of squares leaves the target's own e**2 out rather
    # than subtracting it at the end: for a confident token it is ~1 and would
    # round away the ~1e-14 squares of the other classes, and the difference
    # would keep only that rounding (1e-7 where the answer is 1e-14). Masking
    # costs a compare and a select per element, so the hot loop runs unmasked
    # on the blocks before and after the one full block that holds the target
    # (``split``; n_full when the target is in the tail or there is none), and
    # only that block and the tail pay for the mask.
    if HAS_TARGETS:
        split = tl.where(tgt_col >= 0, tl.minimum(tgt_col // BLOCK, n_full), n_full)
    else:
        split = n_full
    m1v, m2v, m_l, s_l, t_l, q_l = _fold_blocks(
        row_ptr, offs, 0, split, m1v, m2v, m_l, s_l, t_l, q_l, HAS_TARGETS, BLOCK, PREFETCH
    )
    if HAS_TARGETS:
        if split < n_full:
            x = tl.load(row_ptr + split * BLOCK + offs).to(tl.float32)
            is_target = offs == tgt_col - split * BLOCK
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_block(x, is_target, m1v, m2v, m_l, s_l, t_l, q_l, True, True)
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_blocks(
                row_ptr, offs, split + 1, n_full, m1v, m2v, m_l, s_l, t_l, q_l, True, BLOCK, PREFETCH
            )
    tail = n_full * BLOCK
    if tail < vocab:
        cols = tail + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=_NEG_INF).to(tl.float32)
        if HAS_TARGETS:
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_block(x, cols == tgt_col, m1v, m2v, m_l, s_l, t_l, q_l, True, True)
        else:
            m1v, m2v, m_l, s_l, t_l, q_l = _fold_block(x, None, m1v, m2v, m_l, s_l, t_l, q_l, False, False)

    # Merge the lanes' online softmaxes into one, relative to the row maximum.
    m = tl.max(m_l, axis=0)
    lane_is_empty = m_l == _NEG_INF
    delta = tl.where(lane_is_empty, 0.0, _finite_exponent((m_l - m) * _LOG2E))
    # Empty lanes hold s = t = 0; weight 0 keeps them out without 0 * NaN.
    weight = tl.where(lane_is_empty, 0.0, tl.exp2(delta))
    s = tl.sum(weight * s_l, axis=0)
    t2 = tl.sum(weight * (t_l + delta * s_l), axis=0)
    q = tl.sum(weight * weight * q_l, axis=0)

    # Exact top-2 with duplicates: the maximum counts twice if two slots hold
    # it or if one slot holds it in both m1v and m2v (then max(m2v) equals it).
    top1 = tl.max(tl.max(tl.max(m1v, axis=2), axis=1), axis=0)
    n_top1 = tl.sum(tl.sum(tl.sum((m1v == top1).to(tl.int32), axis=2), axis=1), axis=0)
    others = tl.where(m1v == top1, _NEG_INF, m1v)
    top2 = tl.maximum(tl.max(tl.max(tl.max(m2v, axis=2), axis=1), axis=0), tl.max(tl.max(tl.max(others, axis=2), axis=1), axis=0))
    top2 = tl.where(n_top1 >= 2, top1, top2)

    log2_s = tl.log2(s)
    # All -inf rows have no distribution: NaN, as the reference gives. NaN and
    # +inf rows are already NaN through s.
    empty = m == _NEG_INF
    # A local, not a module constexpr: NaN != NaN defeats Triton's check that
    # globals did not change since compilation.
    nan = float("nan")
    entropy = tl.where(empty, nan, _LN2 * (log2_s - t2 / s))
    confidence = tl.where(empty, nan, 1.0 / s)
    # 1 - exp(gap), with a series near 0 so that near-ties keep their digits
    # (exp2 is approximate); a tie gives exactly 0, -inf gives exactly 1.
    gap = top2 - top1
    near = gap > -0.0009765625
    one_minus = tl.where(near, 0.0 - gap * (1.0 + gap * (0.5 + gap * 0.16666666666666666)), 1.0 - tl.exp2(gap * _LOG2E))
    margin = tl.where(empty, nan, one_minus / s)
    lse = tl.where(empty, nan, m + _LN2 * log2_s)

    tl.store(entropy_ptr + row, entropy)
    tl.store(confidence_ptr + row, confidence)
    tl.store(margin_ptr + row, margin)
    tl.store(lse_ptr + row, lse)
    if HAS_TARGETS:
        # Never dereference an ignored or out-of-range target.
        safe = tl.where(in_range & labelled, tgt, 0)
        x_t = tl.load(row_ptr + safe, mask=in_range & labelled, other=0.0).to(tl.float32)
        nll = tl.where(in_range, lse - x_t, nan)
        # ||p - e_t||**2 = (1 - p_t)**2 + sum_{j != t} p_j**2: two sums of
        # non-negative terms, no cancellation. 1 - p_t = 1 - exp(-nll) takes a
        # series below 2**-10, where 1 - exp2 would keep only exp2's rounding.
        near = nll < 0.0009765625
        one_minus_p = tl.where(near, nll * (1.0 - nll * (0.5 - nll * 0.16666666666666666)), 1.0 - tl.exp2(-nll * _LOG2E))
        # NaN nll (broken row, out-of-range target) gives NaN through one_minus_p.
        grad_norm = tl.sqrt(one_minus_p * one_minus_p + q / (s * s))
        tl.store(nll_ptr + row, tl.where(labelled, nll, 0.0))
        tl.store(grad_norm_ptr + row, tl.where(labelled, grad_norm, 0.0))
    else:
        tl.store(nll_ptr + row, tl.full((), nan, tl.float32))
        tl.store(grad_norm_ptr + row, tl.full((), nan, tl.float32))


class LaunchConfig(NamedTuple):
    """How :func:`launch` runs the kernel for one vocabulary size.

    A block is ``k * lanes * vec`` elements: ``lanes`` lanes (one per thread
    on a GPU, ``32 * num_warps``) each loading ``k`` vectors of ``vec``
    contiguous elements.

    Attributes:
      num_warps: warps per program.
      k: vectors per lane per block (loads in flight per thread).
      lanes: lanes per program.
      vec: elements per vector (16 bytes on a GPU).
      prefetch: load the next block before folding the current one.
    """

    num_warps: int
    k: int
    lanes: int
    vec: int
    prefetch: bool = False

    @property
    def block(self) -> int:
        return self.k * self.lanes * self.vec


def choose_config(vocab: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch configuration for rows of ``vocab`` elements of ``dtype``.

    Depends only on the vocabulary and dtype, never on the number of rows, so a
    compiled program does not recompile when the batch changes.

    Args:
      vocab: row length.
      dtype: logits dtype.

    Returns:
      A :class:`LaunchConfig`.
    """
    if INTERPRETING:
        # The interpreter runs blocks one numpy call at a time: small blocks
        # keep it fast and make ordinary test rows span several blocks.
        return LaunchConfig(num_warps=1, k=2, lanes=4, vec=4)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    # Measured on an H100 (benchmarks/results/token_stats.json, "sweep"), with
    # prefetching: 16-bit logits 4 warps of 1 vector per lane (fewest registers,
    # so more resident rows per SM hide each short row's first-load latency),
    # fp32 4 warps of 2 vectors per lane.
    num_warps, k = 4, (1 if vec == 8 else 2)
    # Short rows: shrink the block towards the row so few lanes idle.
    target = triton.next_power_of_2(vocab)
    while k * 32 * num_warps * vec > target and k > 1:
        k //= 2
    while k * 32 * num_warps * vec > target and num_warps > 1:
        num_warps //= 2
    while k * 32 * num_warps * vec > target and vec > 1:
        vec //= 2
    return LaunchConfig(num_warps=num_warps, k=k, lanes=32 * num_warps, vec=vec, prefetch=True)


def launch(
    rows: torch.Tensor,
    targets: torch.Tensor | None,
    ignore_index: int,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    config: LaunchConfig | None = None,
):
    """Run the kernel on a ``(n, vocab)`` or ``(outer, inner, vocab)`` view whose last dim has stride 1.

    Args:
      rows: logits, 2-D or 3-D with ``stride(-1) == 1`` and any other strides;
        the ``n = outer * inner`` rows are taken in row-major order.
      targets: ``(n,)`` integer tensor (any stride) or None.
      ignore_index: target value meaning "no label".
      outputs: six float32 ``(n,)`` contiguous tensors written in place:
        entropy, confidence, margin, logsumexp, nll, grad_norm.
      config: override of :func:`choose_config` (tests use small blocks).

    Returns:
      The launched Triton kernel handle (register and spill counts for
      benchmarks), or None when nothing was launched.
    """
    if rows.dim() == 3 and rows.stride(0) == rows.shape[1] * rows.stride(1):
        rows = rows.flatten(0, 1)  # one row stride after all: a view
    if rows.dim() == 2:
        rows = rows.unsqueeze(0)
    outer, inner, vocab = rows.shape
    n = outer * inner
    if n == 0:
        return None
    if config is None:
        config = choose_config(vocab, rows.dtype)
    has_targets = targets is not None
    # The targets pointer is unused without targets; any tensor will do.
    tgt = targets if has_targets else outputs[4]
    entropy, confidence, margin, lse, nll, grad_norm = outputs
    return token_stats_kernel[(n,)](
        rows,
        tgt,
        entropy,
        confidence,
        margin,
        lse,
        nll,
        grad_norm,
        int(vocab),
        int(inner),
        int(rows.stride(0)),
        int(rows.stride(1)),
        int(tgt.stride(0)) if has_targets else 0,
        int(ignore_index),
        HAS_TARGETS=has_targets,
        TWO_LEVEL=outer > 1,
        K=config.k,
        LANES=config.lanes,
        VEC=config.vec,
        PREFETCH=config.prefetch,
        num_warps=config.num_warps,
    )
