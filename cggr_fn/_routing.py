"""Gradient routing: transforms that keep a function's outputs and gate its backward pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import optree
import torch

from cggr_fn import _checks
from cggr_fn._compaction import check_capacity, compact_rows

F = TypeVar("F", bound=Callable[..., Any])


def _row_mask(mask: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """``mask`` shaped to broadcast over ``leaf``: its dims are the leading (row) dims."""
    if mask.device != leaf.device:
        raise ValueError(f"mask: expected device {leaf.device} (the output's), got {mask.device}")
    if mask.dim() > leaf.dim():
        raise ValueError(f"mask: has {mask.dim()} dims, more than an output of shape {tuple(leaf.shape)}")
    rows = leaf.shape[: mask.dim()]
    if any(m not in (1, r) for m, r in zip(mask.shape, rows)):
        raise ValueError(
            f"mask: expected a shape broadcastable to the output rows {tuple(rows)} "
            f"(the leading {mask.dim()} dims of an output of shape {tuple(leaf.shape)}), got {tuple(mask.shape)}"
        )
    return mask.reshape(mask.shape + (1,) * (leaf.dim() - mask.dim()))


def _route_leaf(leaf: Any, mask: torch.Tensor, leak: float) -> Any:
    if not isinstance(leaf, torch.Tensor) or not (leaf.is_floating_point() or leaf.is_complex()):
        return leaf
    if leaf.dim() == 0 and mask.dim() > 0:
        # A scalar output (an MoE auxiliary loss) has no rows to gate.
        return leaf
    rows = _row_mask(mask, leaf)
    constant = leaf.detach()
    if leak == 0.0:
        # where() rather than a multiply: gated rows get an exact 0 even where
        # the incoming gradient is inf or NaN.
        return torch.where(rows, leaf, constant)
    # Equal to ``leaf`` in value wherever it is finite, with ``leak`` times its
    # derivative; plain tensor ops, so every transform (jvp and compile too)
    # sees through it. inf - inf would be NaN: non-finite entries stay constants.
    leaky = torch.where(torch.isfinite(leaf), constant + leak * (leaf - constant), constant)
    return torch.where(rows, leaf, leaky)


def route_grad(fn: F, mask: torch.Tensor, *, leak: float = 0.0, capacity: int | None = None) -> F:
    """Gate the backward pass of ``fn`` by output rows; leave its outputs untouched.

    The returned function computes exactly ``fn``'s outputs. In backward (and in
    forward-mode tangents), rows where ``mask`` is false pass their gradient
    scaled by ``leak``; rows where it is true pass it unchanged. ``mask``
    covers the leading dims of every floating tensor in ``fn``'s (pytree)
    output, e.g. a ``(batch, seq)`` mask for ``(batch, seq, hidden)`` outputs.
    A 0-d floating output (e.g. the auxiliary loss of an MoE layer returning
    ``(out, aux_loss)``) has no rows and passes through ungated, as do
    non-floating leaves; any other output whose leading dims do not match
    ``mask`` is an error.

    The guarantee is at ``fn``'s outputs: with ``leak=0`` the cotangent that
    reaches ``fn``'s backward for a gated row is exactly zero, even where the
    incoming gradient is inf or NaN (with ``leak > 0`` it is ``leak`` times
    the incoming one, and non-finite output entries of gated rows pass none).
    What ``fn``'s own backward makes of a zero cotangent is ``fn``'s: a
    derivative that is itself inf or NaN at that input gives ``0 * inf = NaN``
    (e.g. ``torch.sqrt`` at 0), exactly as in plain autograd. When input
    gradients must be finite, keep ``fn``'s derivative finite at the inputs
    of gated rows (e.g. ``sqrt(x + eps)``).

    Composes with ``torch.func.grad``, ``vjp``, ``jvp``, ``vmap`` and
    ``functional_call``, and compiles with ``torch.compile(fullgraph=True)``.
    By itself it saves no compute: it decides which rows carry gradient.

    With ``capacity``, the backward cost scales with the routed rows
    (compacted execution): ``fn`` must then be token-wise (row ``i`` of every
    output depends only on row ``i`` of the tensor arguments whose leading
    dims are ``mask``'s shape; other arguments, such as weights, are passed
    whole). The true rows, and as many of the first false rows as fill the
    capacity, run with autograd, the others under ``torch.no_grad``, and the
    outputs are put back in order. Shapes are
    static (``capacity`` is an int), nothing synchronises, and the gradients
    are exactly those of the masking version as long as ``mask`` holds at
    most ``capacity`` true rows -- e.g. ``capacity(n, ratio=r)`` for a mask
    from :func:`select` with ratio ``r``. Extra true rows would get no
    gradient; :func:`checking` raises on them. Needs ``leak=0``.

    Args:
      fn: any function of tensors returning a pytree of tensors.
      mask: boolean tensor broadcastable to the leading dims of every output.
      leak: gradient scale of the rows where ``mask`` is false, in ``[0, 1]``.
      capacity: run compacted with this many rows under autograd (an int in
        ``[0, mask.numel()]``), or ``None`` to gate rows in place.

    Returns:
      A function with ``fn``'s signature and outputs.

    Example:
      >>> import torch, cggr_fn
      >>> x = torch.ones(3, 2, requires_grad=True)
      >>> routed = cggr_fn.route_grad(lambda t: t * 2.0, torch.tensor([True, False, True]))
      >>> routed(x).sum().backward()
      >>> x.grad
      tensor([[2., 2.],
              [0., 0.],
              [2., 2.]])
      >>> w = torch.ones(2, 2, requires_grad=True)
      >>> compact = cggr_fn.route_grad(lambda t: t @ w, torch.tensor([True, False, True]), capacity=2)
      >>> compact(x).sum().backward()  # only rows 0 and 2 ran under autograd
      >>> w.grad
      tensor([[2., 2.],
              [2., 2.]])
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    _checks.check_mask(mask)
    _checks.check_fraction(leak, "leak")
    leak = float(leak)
    if capacity is not None:
        if leak != 0.0:
            raise ValueError(f"leak: compacted execution (capacity={capacity}) runs the other rows without autograd, "
                             f"so it needs leak=0, got {leak}")
        check_capacity(capacity, mask)
        return functools.wraps(fn)(compact_rows(fn, mask, capacity))  # type: ignore[return-value]

    @functools.wraps(fn)
    def routed(*args: Any, **kwargs: Any) -> Any:
        return optree.tree_map(lambda leaf: _route_leaf(leaf, mask, leak), fn(*args, **kwargs), none_is_leaf=True)

    return routed  # type: ignore[return-value]


def depth_masks(depth: torch.Tensor, *, num_layers: int) -> list[torch.Tensor]:
    """Gradient gates of a layer stack for per-token depths.

    There are ``num_layers + 1`` gate points: point 0 is the stack's input and
    point ``p >= 1`` the output of layer ``p - 1`` (layers numbered from the
    bottom). ``masks[p]`` is true where a token's hidden state at point ``p``
    carries gradient. A token of depth ``d`` trains layers ``num_layers - d``
    and up, so its gradient must stop at the input of layer ``num_layers - d``
    and stay stopped below it: point ``p`` carries gradient iff
    ``d >= num_layers + 1 - p``. The one exception is full depth: a token with
    ``d == num_layers`` is never gated, so it also trains whatever produced the
    stack's input (the embedding) -- exactly standard training.

    Depths outside ``[0, num_layers]`` are not checked outside
    :func:`checking` (that would need a sync); they act as if clamped into it
    (above ``num_layers``: every layer, below 0: none). :func:`checking`
    raises on them.

    Args:
      depth: integer tensor of per-token depths in ``[0, num_layers]``.
      num_layers: number of layers in the stack, >= 1.

    Returns:
      A list of ``num_layers + 1`` boolean tensors of ``depth.shape``.

    Example:
      >>> import torch, cggr_fn
      >>> [m.tolist() for m in cggr_fn.depth_masks(torch.tensor([3, 1, 0]), num_layers=3)]
      [[True, False, False], [True, False, False], [True, False, False], [True, True, False]]
    """
    if not isinstance(depth, torch.Tensor) or depth.dtype.is_floating_point or depth.dtype == torch.bool:
        raise TypeError(f"depth: expected an integer tensor, got {getattr(depth, 'dtype', type(depth).__name__)}")
    _checks.check_int(num_layers, "num_layers", minimum=1)
    if _checks.value_checks_enabled() and depth.numel() > 0:
        if bool((depth < 0).any() | (depth > num_layers).any()):  # sync-ok: checking mode only
            raise ValueError(f"depth: expected values in [0, {num_layers}], got [{int(depth.min())}, {int(depth.max())}]")  # sync-ok
    return [depth >= min(num_layers, num_layers + 1 - point) for point in range(num_layers + 1)]


def route_depth(
    layers: Sequence[Callable[..., torch.Tensor]], depth: torch.Tensor, *, leak: float = 0.0
) -> Callable[..., torch.Tensor]:
    """Apply a layer stack so that token ``t`` trains only its top ``depth[t]`` layers.

    Returns ``stack(hidden, *args, **kwargs)``, which runs
    ``hidden = layer(hidden, *args, **kwargs)`` for each layer, bottom first,
    with the same outputs as the plain stack. Below a token's cut its hidden
    state is a constant: the stack's input and every layer's output are gated
    by :func:`route_grad` with :func:`depth_masks`, so no gradient reaches
    lower layers through that token, neither directly nor through other tokens
    that attend to it. A token of depth 0 trains no layer; a token of full
    depth is not gated at all.

    Args:
      layers: a sequence (list, tuple, ``nn.ModuleList``) of layer functions
        ``hidden -> hidden`` (extra args are passed to each); a single module
        is not a stack.
      depth: integer tensor of per-token depths in ``[0, len(layers)]``,
        shaped as ``hidden``'s token dims (e.g. ``(batch, seq)``); out-of-range
        depths as :func:`depth_masks` documents.
      leak: gradient scale where a gate is closed, in ``[0, 1]``.

    Returns:
      The routed stack.

    Example:
      >>> import torch, cggr_fn
      >>> w = torch.tensor(2.0, requires_grad=True)
      >>> layers = [lambda h: h * w, lambda h: h + 1.0]
      >>> out = cggr_fn.route_depth(layers, torch.tensor([2, 1]))(torch.ones(2))
      >>> out.sum().backward()
      >>> w.grad  # only token 0 reaches the bottom layer
      tensor(1.)
    """
    # A single module is callable but not a stack; nn.ModuleList and
    # nn.Sequential are iterable, so they pass.
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers: expected a sequence of callables, got {type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise TypeError("layers: expected a non-empty sequence of callables, got an empty one")
    for index, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(f"layers: expected a sequence of callables, got {type(layer).__name__} at index {index}")
    input_mask, *output_masks = depth_masks(depth, num_layers=len(layers))
    _checks.check_fraction(leak, "leak")
    routed_layers = [route_grad(layer, mask, leak=leak) for layer, mask in zip(layers, output_masks)]

    def stack(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = gate(hidden, input_mask, leak)
        for layer in routed_layers:
            hidden = layer(hidden, *args, **kwargs)
        return hidden

    return stack


def gate(hidden: torch.Tensor, mask: torch.Tensor, leak: float) -> torch.Tensor:
    """``hidden`` unchanged, with its gradient gated by rows (``route_grad`` of the identity).

    The one gate that :func:`route_depth` and the model adapters put at a
    stack's input and between layers; arguments are validated by the caller.
    """
    return _route_leaf(hidden, mask, float(leak))
