"""Attention whose backward runs over the routed queries only.

In a compacted layer the projections and the MLP already run their backward
on the routed rows; attention would still run its backward over every query.
Here a layer's attention is computed twice: over all queries without autograd
(the model's own kernel, so every output row is exactly what it computes), and
over the routed queries alone with autograd, against all keys. The routed rows
replace their rows of the first result. Gradients equal the masking
version's: only routed query rows receive output gradient in a compacted
layer (its output projection runs the rest without autograd), and keys and
values receive theirs from the routed queries, as they would.

The routed queries are the partition's routed rows in row order, i.e. sorted
by (sequence, position): each block of them spans a run of consecutive
sequences and attends to a contiguous range of the flattened keys, which a
FlexAttention block mask states (blocks that every query of a one-sequence
block sees whole run unmasked). FlexAttention has no backward on CPU: there the routed queries
run through PyTorch's ``scaled_dot_product_attention`` with an explicit
(queries x keys) mask, the same numbers (tested to agree with FlexAttention's
forward on CPU, and both with float64 on the GPU). Its backward does not run
inside ``torch.func`` transforms either: on the GPU under ``torch.func`` the
layer's attention runs whole (the same gradients, without the savings).

The layer's attention is reached through Hugging Face's attention interface:
the view's attention modules get a config that reads through to the model's
and dispatches to :func:`routed_attention`, which calls the model's own
implementation for everything it does not route (and, for calls whose mask
is causal alone, calls SDPA without the mask tensor).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from cggr_fn._compaction import Partition, to_partition_order
from cggr_fn.models._common import inside_torch_func

ROUTED_ATTENTION = "cggr_routed"
# The model implementations whose masks this module reproduces exactly.
_ROUTABLE = ("sdpa", "eager")
# Keyword arguments that change the attention's math beyond the mask (logit
# soft-capping, attention sinks, additive position bias): with any of them
# the layer's attention runs whole.
_UNROUTABLE_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask")
_BLOCK = 128


class RoutedAttentionConfig:
    """An attention module's config: every field read through to the model's, but dispatching to the routed attention."""

    _attn_implementation = ROUTED_ATTENTION

    def __init__(self, source: Any) -> None:
        self.__dict__["_cggr_config"] = source

    def __getattr__(self, name: str) -> Any:
        try:
            source = self.__dict__["_cggr_config"]
        except KeyError:  # a copy under construction has no source yet
            raise AttributeError(name) from None
        return getattr(source, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{name}: this view's attention config follows the model's; set it on model.config")


def routable(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module this view can route (it dispatches through the attention interface)."""
    config = getattr(module, "config", None)
    return (
        config is not None
        and hasattr(config, "_attn_implementation")
        and hasattr(module, "scaling")
        and not getattr(module, "reorder_and_upcast_attn", False)  # GPT-2's eager-only path skips the interface
        and callable(getattr(sys.modules[type(module).__module__], "eager_attention_forward", None))
    )


def register() -> None:
    """Make :data:`ROUTED_ATTENTION` a name Hugging Face's attention interface dispatches (idempotent)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ROUTED_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ROUTED_ATTENTION, routed_attention)


def _model_attention(module: nn.Module) -> tuple[str, Callable[..., Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.config._cggr_config._attn_implementation
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return name, ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def routed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The model's attention; with ``route_attention``, autograd over the routed queries of the layer only.

    A call that passes nothing that shapes the mask, to a causal model with no
    window, has a causal mask alone, whatever tensor the model built for it
    (under ``torch.compile`` Hugging Face builds one): SDPA then runs causally
    without it, and the routed queries' kernel skips the mask on the blocks
    every query sees whole. The same numbers, faster kernels.
    """
    name, model_attention = _model_attention(module)
    gates = module._cggr_gates
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    causal_alone = gates.mask_neutral and is_causal and _windowless(module, kwargs)
    model_mask = None if causal_alone and name == "sdpa" else attention_mask
    part = None if gates.partitions is None else gates.partitions[module._cggr_point - 1]
    if part is None or not module._cggr_route_queries or not _routes(name, query, key, attention_mask, part, kwargs):
        return model_attention(module, query, key, value, model_mask, **kwargs)
    with torch.no_grad():
        output, weights = model_attention(module, query, key, value, model_mask, **kwargs)
    causal = causal_alone or (attention_mask is None and name == "sdpa" and is_causal)
    routed = attend_routed(query, key, value, part, causal=causal, mask=None if causal_alone else attention_mask,
                           scale=kwargs.get("scaling", module.scaling))
    # output is (batch, seq, heads, dim); the routed rows take their places, with their gradient.
    rows = output.reshape(-1, *output.shape[2:]).index_copy(0, part.routed, routed.to(output.dtype))
    return rows.reshape(output.shape), weights


def _windowless(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether no sliding window or attention chunk can apply to this module's mask (conservatively)."""
    config = module.config
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return False
    if getattr(config, "attention_chunk_size", None) is not None:
        return False
    if getattr(config, "sliding_window", None) is None:
        return True
    # A window in the config applies unless every layer is stated to attend fully.
    layer_types = getattr(config, "layer_types", None)
    return bool(layer_types) and all(kind == "full_attention" for kind in layer_types)


def _routes(name: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, part: Partition,
            kwargs: dict[str, Any]) -> bool:
    """Whether this call's attention is one :func:`attend_routed` reproduces (else it runs whole: same numbers)."""
    batch, _, seq, _ = query.shape
    return (
        name in _ROUTABLE
        and not kwargs.get("dropout", 0.0)
        and all(kwargs.get(arg) is None for arg in _UNROUTABLE_KWARGS)
        and key.shape[2] == seq
        and batch * seq == part.place.numel()
        and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1
                              and mask.shape[-2:] == (seq, seq)))
        # FlexAttention's backward does not run under torch.func (the CPU path does).
        and not (query.is_cuda and inside_torch_func())
    )


def attend_routed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, part: Partition, *, causal: bool,
                  mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of the routed queries over all keys of their own sequences.

    Args:
      query: ``(batch, heads, seq, dim)``.
      key, value: ``(batch, kv_heads, seq, dim)``; ``heads`` a multiple of ``kv_heads``.
      part: the :class:`Partition` of the ``batch * seq`` tokens; its routed rows are the queries.
      causal: keys at or before the query only (the mask must then be ``None``).
      mask: ``None`` or ``(batch or 1, 1, seq, seq)``: boolean (true = attend) or additive.
      scale: the logits' scale.

    Returns:
      ``(capacity, heads, dim)``: row ``j`` is the output of query ``part.routed[j]``.
    """
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    n = batch * seq
    capacity = part.routed.numel()
    q = to_partition_order(query.transpose(1, 2).reshape(n, heads, dim), part)[:capacity]
    if capacity == 0:
        return q
    k = key.transpose(1, 2).reshape(n, kv_heads, dim)
    v = value.transpose(1, 2).reshape(n, kv_heads, dim)
    if query.is_cuda:
        return _flex_routed(q, k, v, part.routed, seq=seq, causal=causal, mask=mask, scale=scale)
    return reference_routed(q, k, v, part.routed, seq=seq, causal=causal, mask=mask, scale=scale)


class _Queries(NamedTuple):
    """Int32 coordinates of routed queries: flat row, flat row of their sequence's first token, sequence, position.

    Computed once per call, so the mask evaluated for every (query, key)
    pair inside the attention kernel needs no integer division.
    """

    row: torch.Tensor
    start: torch.Tensor
    sequence: torch.Tensor
    position: torch.Tensor

    def at(self, index: torch.Tensor) -> _Queries:
        return _Queries(*(t[index] for t in self))


def _queries(routed: torch.Tensor, seq: int) -> _Queries:
    row = routed.to(torch.int32)
    sequence = row // seq
    position = row - sequence * seq
    return _Queries(row, row - position, sequence, position)


def _allowed(q: _Queries, keys: torch.Tensor, seq: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """Whether queries ``q`` may attend to flat keys ``keys`` (broadcasting): their own sequence, the mask."""
    allowed = (keys >= q.start) & ((keys <= q.row) if causal else (keys < q.start + seq))
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & _mask_at(mask, q, keys, seq)
    return allowed


def _mask_at(mask: torch.Tensor, q: _Queries, keys: torch.Tensor, seq: int) -> torch.Tensor:
    # Out-of-sequence pairs are excluded by _allowed; clamp keeps their lookups in range.
    sequence = q.sequence if mask.shape[0] > 1 else torch.zeros_like(q.sequence)
    return mask[sequence, 0, q.position, (keys - q.start).clamp(0, seq - 1)]


def reference_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor, *, seq: int,
                     causal: bool, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`attend_routed` by ``scaled_dot_product_attention`` with a dense (queries x keys) mask.

    ``q`` is ``(capacity, heads, dim)`` (the routed queries in order), ``k``,
    ``v`` ``(tokens, kv_heads, dim)``; memory grows with capacity x tokens.
    """
    queries = _Queries(*(t[:, None] for t in _queries(routed, seq)))
    keys = torch.arange(k.shape[0], device=q.device, dtype=torch.int32)[None, :]
    allowed = _allowed(queries, keys, seq, causal, mask)
    if mask is not None and mask.dtype != torch.bool:
        bias = torch.where(allowed, _mask_at(mask, queries, keys, seq).to(q.dtype), float("-inf"))
    else:
        bias = allowed
    out = nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=bias, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def block_mask(routed: torch.Tensor, *, tokens: int, seq: int, causal: bool, mask: torch.Tensor | None) -> Any:
    """The FlexAttention ``BlockMask`` of the routed queries (sorted) over the flattened keys.

    Block ``i`` of queries spans sequences ``s0..s1`` and may see keys from
    ``s0 * seq`` up to its last query (causal) or the end of ``s1``. Where
    the block lies in one sequence and there is no mask, the key blocks that
    every one of its queries sees whole run without ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    capacity = routed.numel()
    q_blocks, kv_blocks = -(-capacity // _BLOCK), -(-tokens // _BLOCK)
    starts = torch.arange(q_blocks, device=routed.device) * _BLOCK
    first = routed[starts]
    last = routed[(starts + _BLOCK - 1).clamp(max=capacity - 1)]
    seq_first, seq_last = first // seq, last // seq
    low = seq_first * seq // _BLOCK
    high = (last if causal else seq_last * seq + seq - 1) // _BLOCK
    if mask is None:
        seen = first if causal else seq_first * seq + seq - 1  # the last key every query of the block sees
        full_low = -((-seq_first * seq) // _BLOCK)
        full_count = torch.where(seq_first == seq_last, ((seen + 1) // _BLOCK - full_low).clamp_min(0), 0)
        full_low = torch.where(full_count > 0, full_low, low)
    else:
        full_count, full_low = torch.zeros_like(low), low
    j = torch.arange(kv_blocks, device=routed.device)
    below = (full_low - low)[:, None]
    partial = torch.where(j < below, low[:, None] + j, low[:, None] + j + full_count[:, None]).clamp(max=kv_blocks - 1)
    full = (full_low[:, None] + j).clamp(max=kv_blocks - 1)

    queries = _queries(routed, seq)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return _allowed(queries.at(q_idx), kv_idx, seq, causal, mask)

    def as_index(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(as_index(high - low + 1 - full_count), as_index(partial), as_index(full_count),
                                    as_index(full), BLOCK_SIZE=_BLOCK, mask_mod=mask_mod, seq_lengths=(capacity, tokens))


def flex_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routed: torch.Tensor, *, seq: int, causal: bool,
                mask: torch.Tensor | None, scale: float, flex: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`attend_routed` by FlexAttention (same arguments as :func:`reference_routed`)."""
    from torch.nn.attention.flex_attention import flex_attention

    blocks = block_mask(routed, tokens=k.shape[0], seq=seq, causal=causal, mask=mask)
    score_mod = None
    if mask is not None and mask.dtype != torch.bool:
        queries = _queries(routed, seq)

        def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
            return score + _mask_at(mask, queries.at(q_idx), kv_idx, seq).to(score.dtype)

    out = (flex or flex_attention)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   score_mod=score_mod, block_mask=blocks, scale=scale,
                                   enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_routed(*args: Any, **kwargs: Any) -> torch.Tensor:
    # Uncompiled, FlexAttention materialises every score; called eagerly it
    # needs its own compiled kernel (inside a compiled step it is lowered with
    # it). Static shapes: each new (capacity, tokens, mask) shape compiles anew.
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_routed(*args, **kwargs)
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return flex_routed(*args, flex=_compiled_flex, **kwargs)
