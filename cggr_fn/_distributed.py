"""Data-parallel CGGR: selection and loss normalisation across ranks, a module for DDP/FSDP2, checkpointable state.

Every collective here runs on detached tensors through
:mod:`torch.distributed._functional_collectives` (traceable by
``torch.compile``, usable inside ``torch.func.grad``): counts and thresholds
are constants of the step, no gradient flows through them. Without an
initialised process group, or with a world of one process, every function
reduces to its one-process counterpart and runs no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cggr_fn import _checks
from cggr_fn._curriculum import Ratio
from cggr_fn._ranking import capacity, difficulty_rank, selectable

# A torch.distributed.ProcessGroup, or None for the default group.
Group = Any


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size(group: Group = None) -> int:
    """Processes in ``group`` (None: the default group); 1 when torch.distributed is not initialised."""
    return torch.distributed.get_world_size(group) if _distributed() else 1


def rank_index(group: Group = None) -> int:
    """This process's rank in ``group`` (None: the default group); 0 when torch.distributed is not initialised."""
    return torch.distributed.get_rank(group) if _distributed() else 0


def _resolved(group: Group) -> Any:
    return torch.distributed.group.WORLD if group is None else group


def all_sum(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``, detached (a constant); ``x`` itself in one process."""
    x = x.detach()
    if world_size(group) == 1:
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x, "sum", _resolved(group)))


def _all_gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0 in rank order, detached."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_single(x.detach().contiguous(), 0, _resolved(group)))


def check_group(group: object) -> None:
    if group is None:
        return
    if not (torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None (the default group), "
                        f"got {type(group).__name__}")


def global_mean(total: torch.Tensor, count: torch.Tensor, *, group: Group = None) -> torch.Tensor:
    """One rank's share of a mean over every rank's tokens, scaled for gradient averaging.

    ``total * world_size / sum(count over ranks)``: with ``total`` the rank's
    (weighted) sum of per-token losses and ``count`` how many tokens (or how
    much weight) it divides by, the *mean over ranks* of the result is the
    global mean ``sum(totals) / sum(counts)``. DistributedDataParallel and
    FSDP2 average gradients over ranks, so the gradient they apply is exactly
    the gradient of the global mean, whatever each rank's count: a rank with
    more labelled tokens weighs more, as it would in one process over the
    concatenated batch. A loss divided by its own rank's count instead weighs
    every rank equally, and the effective learning rate of a token depends
    on how many tokens its rank happened to have.

    The count is summed across ranks with an all-reduce on a detached copy:
    no gradient flows through it. A global count of 0 divides by 1. Without
    an initialised process group (or with one process) this is
    ``total / count``, with the same rule for 0. The value on one rank is not
    a mean: for logging, average it over ranks (``all_reduce`` with
    ``AVG``).

    Args:
      total: floating tensor, the rank's sum (differentiable).
      count: tensor (integer or floating) broadcastable with ``total``, the rank's
        denominator; it must have the same shape on every rank.
      group: the process group to normalise over; None: the default group.

    Returns:
      A tensor of ``total``'s shape and dtype.

    Example:
      >>> import torch, cggr_fn.distributed
      >>> nll = torch.tensor([0.5, 1.5, 2.0, 0.0])
      >>> trained = torch.tensor([True, True, True, False])
      >>> cggr_fn.distributed.global_mean((nll * trained).sum(), trained.sum())  # one process: the mean
      tensor(1.3333)
    """
    _checks.check_scores(total, "total")
    if not isinstance(count, torch.Tensor) or count.dtype == torch.bool or count.is_complex():
        got = count.dtype if isinstance(count, torch.Tensor) else type(count).__name__
        raise TypeError(f"count: expected an integer or floating tensor, got {got}")
    check_group(group)
    return total * _inverse_share(count, group, total.dtype)


def _inverse_share(count: torch.Tensor, group: Group, dtype: torch.dtype) -> torch.Tensor:
    """``world_size / sum(count over ranks)`` as a constant of ``dtype`` (0 counts divide by 1)."""
    denominator = all_sum(count, group).to(dtype)
    denominator = torch.where(denominator == 0, 1.0, denominator)
    return world_size(group) / denominator


def rescale(loss: torch.Tensor, count: torch.Tensor, group: Group) -> torch.Tensor:
    """A loss already divided by ``count`` turned into :func:`global_mean`'s share (no-op in one process)."""
    if world_size(group) == 1:
        return loss
    return loss * (count.detach().to(loss.dtype) * _inverse_share(count, group, loss.dtype))


def rank_capacity(num_tokens: int, *, ratio: Ratio, capacity_factor: float, group: Group = None) -> int | torch.Tensor:
    """The fixed number of tokens one rank may train under :func:`global_select`."""
    if world_size(group) == 1:
        return capacity(num_tokens, ratio=ratio)
    share = ratio * capacity_factor
    share = share.clamp(max=1.0) if isinstance(share, torch.Tensor) else min(1.0, share)
    return capacity(num_tokens, ratio=share)


def global_select(
    scores: torch.Tensor, *, ratio: Ratio, capacity_factor: float = 2.0, group: Group = None
) -> torch.Tensor:
    """Select the hardest ``ratio`` of *all* ranks' tokens together, within a fixed per-rank capacity.

    The global selection of data-parallel CGGR: a rank whose batch is harder
    trains more of its tokens, one whose batch is easy fewer, as a single
    process over the concatenated batch would. Every rank's scores are
    all-gathered (a static ``world_size x n`` buffer, detached; the
    exchange is ``n`` values per rank, small next to the gradients'
    all-reduce), the ``K = capacity(world_size * n, ratio=ratio)`` hardest
    of them are chosen with :func:`cggr_fn.select`'s order (NaN first,
    ``-inf`` never, ties by position in the concatenated batch: rank 0's
    tokens first), and each rank keeps its share. So the global selection is
    exact: it equals ``select(concatenated scores, ratio=ratio)``, not an
    approximate threshold.

    Shapes stay static: each rank trains at most ``capacity(n,
    ratio=min(1, capacity_factor * ratio))`` tokens, a fixed capacity (the
    ``capacity`` of compacted execution), so ranks do equal work. A rank with
    more globally chosen tokens than its capacity keeps its hardest
    ``capacity`` of them and drops the rest (the step then trains fewer than
    ``K`` tokens); with ``capacity_factor >= 1 / ratio`` nothing is ever
    dropped. Without an initialised process group, or with one process,
    this is exactly ``select(scores, ratio=ratio)`` (capacity ``k``).

    Every rank must call it with scores of the same shape (the all-gather
    requires it) and the same ``ratio``; nothing synchronises with the host.

    Args:
      scores: floating tensor of difficulties, any shape, the same on every
        rank; ``-inf`` marks tokens that cannot be selected.
      ratio: the global keep ratio in ``(0, 1]``, a float or a 0-d floating tensor.
      capacity_factor: a rank's capacity as a multiple of its even share,
        a float >= 1.
      group: the process group to select over; None: the default group.

    Returns:
      A boolean tensor of ``scores.shape``.

    Example:
      >>> import torch, cggr_fn, cggr_fn.distributed
      >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, float("-inf"), 0.4]])
      >>> cggr_fn.distributed.global_select(scores, ratio=0.5).int()  # one process: select()
      tensor([[0, 1, 1, 1],
              [0, 0, 0, 1]], dtype=torch.int32)
    """
    _checks.check_scores(scores)
    _checks.check_ratio(ratio)
    _checks.check_real(capacity_factor, "capacity_factor", minimum=1.0)
    check_group(group)
    n = scores.numel()
    flat = scores.reshape(-1)
    local_rank = difficulty_rank(flat)
    world = world_size(group)
    if world == 1:
        return ((local_rank < capacity(n, ratio=ratio)) & selectable(flat)).reshape(scores.shape)
    everyone = _all_gather(flat, group)
    mine = difficulty_rank(everyone).narrow(0, rank_index(group) * n, n)
    # The chosen tokens of this rank are a prefix of its own order (the global
    # order restricted to a rank is its local order), so its capacity keeps the hardest.
    chosen = mine < capacity(world * n, ratio=ratio)
    fits = local_rank < rank_capacity(n, ratio=ratio, capacity_factor=capacity_factor, group=group)
    return (chosen & fits & selectable(flat)).reshape(scores.shape)


class LossModule(nn.Module):
    """``model`` with a pure loss as its forward, for DistributedDataParallel and FSDP2; see :func:`loss_module`.

    Attributes:
      model: the model whose parameters the loss reads (a submodule, so
        DDP and ``fully_shard`` see them as this module's).
      loss_fn: the loss ``loss_fn(params, *args, **kwargs)``.
    """

    def __init__(self, loss_fn: Callable[..., Any], model: nn.Module) -> None:
        super().__init__()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable loss_fn(params, ...), got {type(loss_fn).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        scope = getattr(loss_fn, "scope", "unknown")
        if scope is None and world_size() > 1:
            raise ValueError(
                f"loss_fn: built with scope=None (one process), but torch.distributed runs {world_size()} "
                "processes: its loss would be normalised per rank, which changes the effective learning rate; "
                "build it with scope='rank' or scope='global'"
            )
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``loss_fn(dict(model.named_parameters()), *args, **kwargs)``."""
        params = dict(self.model.named_parameters())
        _check_not_sharded(params)
        return self.loss_fn(params, *args, **kwargs)


def _check_not_sharded(params: Mapping[str, torch.Tensor]) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed tensors
        return
    sharded = [name for name, p in params.items() if isinstance(p, DTensor)]
    if sharded:
        raise ValueError(
            f"model: {len(sharded)} parameters (e.g. {sharded[0]!r}) are still sharded DTensors when the loss "
            "reads them: fully_shard was applied to submodules (e.g. each layer), whose all-gathers run only "
            "when those modules are called, but the loss reads every parameter at the top of its call; "
            "apply fully_shard to the loss_module(loss_fn, model) alone (one group)"
        )


def check_unsharded(model: nn.Module) -> None:
    """``model`` has no submodule that ``fully_shard`` was applied to (a pure loss must be built before)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without FSDP2
        return
    sharded = next((name for name, module in model.named_modules() if isinstance(module, FSDPModule)), None)
    if sharded is not None:
        raise ValueError(
            f"model: fully_shard was applied to {sharded or 'the model'!r} before the loss was built; build the "
            "loss from the unsharded model, then apply fully_shard to loss_module(loss_fn, model) alone (one group)"
        )


def loss_module(loss_fn: Callable[..., Any], model: nn.Module) -> LossModule:
    """A module whose ``forward(*args, **kwargs)`` is ``loss_fn(dict(model.named_parameters()), *args, **kwargs)``.

    PyTorch's data-parallel engines act on modules: DistributedDataParallel
    prepares its gradient all-reduce in its ``forward`` and FSDP2
    (``fully_shard``) all-gathers parameters in forward hooks. A pure loss
    such as :func:`cggr_fn.models.cggr_loss` takes the parameters as an
    argument; this module hands it the model's own parameters, so
    ``DistributedDataParallel(loss_module(loss_fn, model))`` or
    ``fully_shard(loss_module(loss_fn, model))`` trains with it unchanged:
    ``loss, routing = ddp_module(input_ids, step, attention_mask=...)``, then
    ``loss.backward()``. Every parameter takes part in every backward
    (compacted execution runs the selected rows of every layer under
    autograd, the head runs on the selected tokens), so DDP needs no
    ``find_unused_parameters``.

    For FSDP2 apply ``fully_shard`` to this module alone: the loss reads
    every parameter when it is called, before per-layer all-gathers of
    submodules would run, so sharding submodules separately raises
    ``ValueError`` at the first call. One group still shards the parameters,
    gradients and optimizer state between steps.

    A :class:`cggr_fn.models.CGGRLoss` built for one process
    (``scope=None``) is refused when torch.distributed runs more than one
    process: its loss would be normalised per rank.

    Args:
      loss_fn: a pure loss ``loss_fn(params, *args, **kwargs)`` over ``model``'s
        parameters (named as in ``model.named_parameters()``).
      model: the model.

    Returns:
      A :class:`LossModule`.

    Example:
      >>> import torch, cggr_fn.distributed
      >>> model = torch.nn.Linear(3, 1)
      >>> def loss_fn(params, x):
      ...     return torch.func.functional_call(model, params, (x,)).square().mean()
      >>> module = cggr_fn.distributed.loss_module(loss_fn, model)  # DistributedDataParallel(module) under torchrun
      >>> module(torch.ones(2, 3)).backward()
      >>> model.weight.grad.shape
      torch.Size([1, 3])
    """
    return LossModule(loss_fn, model)


def state_dict(state: Any) -> dict[str, Any]:
    """Explicit training state (a pytree of tensors) as nested dicts, for ``torch.distributed.checkpoint``.

    ``torch.distributed.checkpoint`` saves and loads nested dicts of tensors
    in place (every rank writes its part; replicated tensors once); a
    NamedTuple such as :class:`cggr_fn.EmaState` would be pickled whole
    instead and never loaded in place. This turns NamedTuples into dicts of
    their fields, lists and tuples into dicts keyed ``"0"``, ``"1"``, ...,
    and keeps tensors (the same objects: loading into the dict overwrites
    them) and Python scalars; ``None`` becomes an empty dict.
    :func:`load_state_dict` rebuilds the state.

    Args:
      state: a pytree of tensors (NamedTuple, dict with string keys, list,
        tuple, ``None``) and Python scalars, e.g. ``(step, ema_state)``.

    Returns:
      Nested dicts with the same leaves.

    Example:
      >>> import torch, cggr_fn, cggr_fn.distributed
      >>> state = (torch.tensor(3), cggr_fn.ema(0.5).init({"w": torch.zeros(2)}))
      >>> cggr_fn.distributed.state_dict(state)
      {'0': tensor(3), '1': {'average': {'w': tensor([0., 0.])}}}
    """
    if isinstance(state, torch.Tensor) or isinstance(state, (bool, int, float, str)):
        return state
    if state is None:
        return {}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return {field: state_dict(value) for field, value in zip(state._fields, state)}
    if isinstance(state, Mapping):
        for key in state:
            if not isinstance(key, str):
                raise TypeError(f"state: expected string keys in its dicts, got {type(key).__name__} {key!r}")
        return {key: state_dict(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return {str(i): state_dict(value) for i, value in enumerate(state)}
    raise TypeError(f"state: expected tensors, Python scalars, None, NamedTuples, dicts, lists or tuples, "
                    f"got {type(state).__name__}")


def load_state_dict(state: Any, saved: Any) -> Any:
    """``state``'s structure with the values of ``saved`` (from :func:`state_dict`, e.g. after ``dcp.load``).

    Args:
      state: a template of the state (the same structure as the one saved).
      saved: its :func:`state_dict` holding the loaded values.

    Returns:
      A state of ``state``'s structure: NamedTuples, lists and tuples rebuilt,
      tensors and scalars taken from ``saved``.

    Example:
      >>> import torch, cggr_fn.distributed
      >>> template = (torch.tensor(0), {"w": torch.zeros(2)})
      >>> cggr_fn.distributed.load_state_dict(template, {"0": torch.tensor(3), "1": {"w": torch.ones(2)}})
      (tensor(3), {'w': tensor([1., 1.])})
    """
    if isinstance(state, torch.Tensor) or isinstance(state, (bool, int, float, str)):
        return saved
    if state is None:
        return None
    if not isinstance(saved, Mapping):
        raise ValueError(f"saved: expected a dict where the state holds a {type(state).__name__}, "
                         f"got {type(saved).__name__}")
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        keys, values = list(state._fields), list(state)
    elif isinstance(state, Mapping):
        keys, values = list(state.keys()), list(state.values())
    elif isinstance(state, (list, tuple)):
        keys, values = [str(i) for i in range(len(state))], list(state)
    else:
        raise TypeError(f"state: expected tensors, Python scalars, None, NamedTuples, dicts, lists or tuples, "
                        f"got {type(state).__name__}")
    missing = [key for key, value in zip(keys, values) if key not in saved and value is not None]
    if missing:
        raise ValueError(f"saved: no entry for {missing} of the state")
    loaded = [load_state_dict(value, saved.get(key)) for key, value in zip(keys, values)]
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*loaded)
    if isinstance(state, Mapping):
        return dict(zip(keys, loaded))
    return type(state)(loaded)
