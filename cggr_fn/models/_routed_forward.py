"""Depth-routed forward of a whole model: the core's depth gates applied at every layer of its stack."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from cggr_fn import _checks
from cggr_fn._compaction import Partition, call_compacted, check_capacity, from_partition_order, partition, \
    to_partition_order
from cggr_fn._routing import depth_masks, gate
from cggr_fn.models import _routed_attention
from cggr_fn.models._common import check_model, default_kwargs, inside_torch_func, select_tensors, tensor_names
from cggr_fn.models._detect import ModelParts, resolve_parts
from cggr_fn.models._view import follower_class, follower_copy, path_view, source_of


class _Gates(threading.local):
    """The gradient gates of the call in progress, read by the view's layers.

    Each call sets the gates and clears them on exit, so no state survives a
    call; the layers are ungated when no gates are set. Thread-local, so calls
    of one forward on several threads at once each see their own gates.
    """

    def __init__(self, leak: float) -> None:
        self.masks: list[torch.Tensor] | None = None
        # Per layer: the partition of its compacted execution, or None where it runs whole.
        self.partitions: list[Partition | None] | None = None
        # Per layer: whether its hidden states flow in partition order (see _gated_call).
        self.streamed: list[bool] | None = None
        # Whether the call passed nothing that shapes the attention mask (only
        # ids and flags): a causal model's mask is then causal alone (or a
        # window its config states), whatever tensor the model builds for it.
        self.mask_neutral = False
        self.leak = leak

    def __deepcopy__(self, memo: dict[int, Any]) -> _Gates:
        # A copy shares no call in progress (and a thread-local cannot be pickled).
        return type(self)(self.leak)


def _map_input(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The layer's call arguments with ``fn`` applied to its input hidden state."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise TypeError(
        f"model: layer {layer._cggr_point - 1} ({type(layer).__name__}) was called without a positional hidden "
        "state or a hidden_states= keyword; cannot route its input"
    )


def _map_output(layer: nn.Module, output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    # Decoder layers return the hidden state, or a tuple whose first element
    # it is (attention weights, caches follow); only the hidden state is routed.
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(
        f"model: layer {layer._cggr_point - 1} ({type(layer).__name__}) returned a {type(output).__name__}; "
        "expected the hidden state or a tuple starting with it"
    )


def _reordered(hidden: torch.Tensor, part: Partition, move: Callable[[torch.Tensor, Partition], torch.Tensor]
               ) -> torch.Tensor:
    """``hidden`` ``(batch, seq, ...)`` with its tokens moved by ``move`` (into or out of partition order)."""
    return move(hidden.reshape(part.place.numel(), *hidden.shape[2:]), part).reshape(hidden.shape)


def _streams_with(gates: _Gates, layer: int, part: Partition) -> bool:
    """Whether ``layer`` exists and takes its hidden states in the order of ``part``."""
    return (gates.streamed is not None and 0 <= layer < len(gates.streamed) and gates.streamed[layer]
            and gates.partitions[layer] is part)


def _gated_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The layer's own ``__call__`` between its gates.

    The gates sit outside the layer's call, hence outside Hugging Face's
    gradient-checkpointing region (``GradientCheckpointingLayer.__call__``
    checkpoints ``nn.Module.__call__``): the recomputation in backward reruns
    the layer alone, exactly as it ran in forward.

    A streamed layer (``gates.streamed``) runs with its tokens in the order
    of its partition, the routed rows first: its token-wise modules then
    split their rows by slicing, and only attention, which needs the tokens
    in place, moves them (its input projections' outputs back, its output
    projection's input forth). Consecutive streamed layers of one partition
    pass the hidden state on in that order; it is moved in before the first
    and back after the last.
    """
    call = super(type(self), self).__call__
    gates, point = self._cggr_gates, self._cggr_point
    masks, leak = gates.masks, gates.leak
    if masks is None:
        return call(*args, **kwargs)
    if point == 1:
        args, kwargs = _map_input(self, args, kwargs, lambda hidden: gate(hidden, masks[0], leak))
    layer = point - 1
    part = None if gates.partitions is None else gates.partitions[layer]
    if part is None or not _streams_with(gates, layer, part):
        return _map_output(self, call(*args, **kwargs), lambda hidden: gate(hidden, masks[point], leak))
    if not _streams_with(gates, layer - 1, part):
        args, kwargs = _map_input(self, args, kwargs, lambda hidden: _reordered(hidden, part, to_partition_order))
    mask = masks[point].reshape(-1).index_select(0, part.order).reshape(masks[point].shape)
    output = _map_output(self, call(*args, **kwargs), lambda hidden: gate(hidden, mask, leak))
    if not _streams_with(gates, layer + 1, part):
        output = _map_output(self, output, lambda hidden: _reordered(hidden, part, from_partition_order))
    return output


def _token_wise_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A token-wise module of a layer (an MLP, a linear map) routed by the layer's mask.

    Gated in place, or, when the call is compacted, run as two calls: the
    layer's routed rows under autograd and the rest without.
    """
    call = super(type(self), self).__call__
    gates, point = self._cggr_gates, self._cggr_point
    if gates.masks is None:
        return call(*args, **kwargs)
    mask = gates.masks[point]
    part = None if gates.partitions is None else gates.partitions[point - 1]
    if part is not None:
        # In a streamed layer the stream's rows are in partition order; attention's are in place.
        role = self._cggr_role if gates.streamed is not None and gates.streamed[point - 1] else None
        return call_compacted(call, part, tuple(mask.shape), args, kwargs,
                              ordered_in=role in ("stream", "attention_in"),
                              ordered_out=role in ("stream", "attention_out"))
    output = call(*args, **kwargs)
    if not isinstance(output, torch.Tensor) or tuple(output.shape[: mask.dim()]) != tuple(mask.shape):
        raise TypeError(
            f"model: {type(self).__name__} in layer {point - 1} is routed as a token-wise module, so its output "
            f"must be a tensor whose leading dims are the tokens {tuple(mask.shape)}; got "
            f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}"
        )
    return gate(output, mask, gates.leak)


def _rebinding_checkpoint(self: nn.Module) -> Callable[..., Any]:
    """The model's checkpoint function, made to recompute with the tensors of the call in progress.

    The recomputation runs in backward, after :func:`torch.func.functional_call`
    has put the model's own tensors back; without this it would silently
    recompute with those instead of the ``params`` of the call. Under
    ``torch.compile`` the checkpointed region is traced with its tensors as
    explicit inputs, so there is nothing to rebind.
    """
    checkpoint = source_of(self)._gradient_checkpointing_func

    def rebinding(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return checkpoint(function, *args, **kwargs)
        tensors = dict(self.named_parameters(remove_duplicate=False))
        tensors.update(self.named_buffers(remove_duplicate=False))
        # The layer's token-wise parts read the gates inside the checkpointed
        # region: the recomputation (in backward, after the call has cleared
        # them, perhaps on another thread) must see the call's gates again.
        gates = self._cggr_gates
        call_gates = (gates.masks, gates.partitions, gates.streamed, gates.mask_neutral)

        def rebound(*inner_args: Any, **inner_kwargs: Any) -> Any:
            outer_gates = (gates.masks, gates.partitions, gates.streamed, gates.mask_neutral)
            gates.masks, gates.partitions, gates.streamed, gates.mask_neutral = call_gates
            try:
                with _reparametrize_module(self, tensors):
                    return function(*inner_args, **inner_kwargs)
            finally:
                gates.masks, gates.partitions, gates.streamed, gates.mask_neutral = outer_gates

        return checkpoint(rebound, *args, **kwargs)

    return rebinding


# Call arguments that leave a causal model's attention mask causal alone
# (a mask, position ids of packed sequences, token types, caches do not).
_MASK_NEUTRAL = frozenset({"input_ids", "inputs_embeds", "labels", "use_cache", "return_dict", "output_attentions",
                           "output_hidden_states", "logits_to_keep"})
_GATED_LAYER = {"__call__": _gated_call, "_gradient_checkpointing_func": property(_rebinding_checkpoint)}
_TOKEN_WISE = {"__call__": _token_wise_call}
# A layer's token-wise parts: its MLP as a whole where it has one by this
# name, and every linear map elsewhere (attention projections; all of an
# encoder's dense layers). Attention itself mixes tokens and stays whole.
_MLP_NAMES = ("mlp",)
# The layers that can run streamed (in partition order): every token-wise
# module is the MLP or a projection of the one attention module, by these names.
_STREAMED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "GPT2Block")
_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "c_attn")
_ATTENTION_OUTPUTS = ("o_proj", "c_proj")


def _linear_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is the [hf] extra this package needs here
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _token_wise_paths(layer: nn.Module) -> list[str]:
    """Paths (relative to ``layer``) of the token-wise modules routed by the layer's mask."""
    linears = _linear_types()
    paths: list[str] = []
    covered: list[str] = []
    for name, module in layer.named_modules(remove_duplicate=False):
        if any(name == c or name.startswith(c + ".") for c in covered) or not name:
            continue
        if name in _MLP_NAMES or isinstance(module, linears):
            paths.append(name)
            covered.append(name)
    return paths


def _stream_roles(layer: nn.Module, paths: list[str]) -> dict[str, str] | None:
    """Each token-wise path's role in a streamed layer, or ``None`` if the layer cannot run streamed.

    ``"stream"`` modules take and give rows in partition order;
    ``"attention_in"`` take them in that order and give them back in place;
    ``"attention_out"`` the reverse.
    """
    if type(layer).__name__ not in _STREAMED_LAYERS:
        return None
    attentions = [name for name, module in layer.named_modules() if name and _routed_attention.routable(module)]
    if len(attentions) != 1:
        return None
    roles = {}
    for path in paths:
        parent, _, name = path.rpartition(".")
        if parent == attentions[0] and name in _ATTENTION_INPUTS:
            roles[path] = "attention_in"
        elif parent == attentions[0] and name in _ATTENTION_OUTPUTS:
            roles[path] = "attention_out"
        elif path in _MLP_NAMES:
            roles[path] = "stream"
        else:
            return None
    return roles if {"attention_in", "attention_out", "stream"} == set(roles.values()) else None


def _hooked(layer: nn.Module) -> bool:
    """Whether a hook could see the layer's hidden states (which a streamed layer holds out of place)."""
    from torch.nn.modules import module as module_globals

    if (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
            or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in layer.modules())


def _own_copy(layer: nn.Module, path: str, copied: set[int]) -> nn.Module:
    """The module at ``path`` in the layer's view, follower-copied (with its ancestors) so the view may change it."""
    node = layer
    for name in path.split("."):
        child = node._modules[name]
        if id(child) not in copied:
            child = follower_copy(child)
            node._modules[name] = child
            copied.add(id(child))
        node = child
    return node


def _route_token_wise(layer: nn.Module, gates: _Gates, point: int, copied: set[int]) -> bool:
    """Swap (inside the layer's view) each token-wise module for a routed follower copy; whether it can stream."""
    paths = _token_wise_paths(layer)
    roles = _stream_roles(layer, paths)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = _own_copy(layer, parent_path, copied) if parent_path else layer
        original = parent._modules[name]
        routed = follower_copy(original, follower_class(type(original), _TOKEN_WISE))
        routed.__dict__["_cggr_gates"] = gates
        routed.__dict__["_cggr_point"] = point
        routed.__dict__["_cggr_role"] = None if roles is None else roles[path]
        parent._modules[name] = routed
        copied.add(id(routed))
    return roles is not None


def _route_attention(layer: nn.Module, gates: _Gates, point: int, copied: set[int], route_queries: bool) -> None:
    """Point (inside the layer's view) each attention module at the routed attention."""
    paths = [name for name, module in layer.named_modules() if name and _routed_attention.routable(module)]
    if paths:
        _routed_attention.register()
    for path in paths:
        attention = _own_copy(layer, path, copied)
        attention.__dict__["config"] = _routed_attention.RoutedAttentionConfig(attention.config)
        attention.__dict__["_cggr_gates"] = gates
        attention.__dict__["_cggr_point"] = point
        attention.__dict__["_cggr_route_queries"] = route_queries


def _checkpointing(layer: nn.Module) -> bool:
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


class DepthRoutedForward:
    """A pure function ``forward(params, depth, *args, **kwargs) -> model output``; see :func:`depth_routed_forward`.

    Attributes:
      module: the view of the model that is called (it holds no tensor of its
        own and follows the model's mode and checkpointing settings; its layer
        objects gate the gradient, the model's do not).
      num_layers: the number of layers in the stack (the full depth).
      parts: the :class:`ModelParts` of the model.
      leak: gradient scale where a gate is closed.
    """

    def __init__(self, module: nn.Module, layers: list[nn.Module], parts: ModelParts, leak: float, gates: _Gates,
                 defaults: dict[str, Any]) -> None:
        self.module = module
        self.num_layers = len(layers)
        self.parts = parts
        self.leak = leak
        self._layers = layers
        self._gates = gates
        self._names = tensor_names(module)
        self._defaults = defaults

    def __call__(self, params: dict[str, torch.Tensor], depth: torch.Tensor, *args: Any,
                 capacity: int | Sequence[int] | None = None, **kwargs: Any) -> Any:
        """The model's output with depth-routed gradients; see :func:`depth_routed_forward`."""
        return self.call_module(self.module, params, depth, args, kwargs, capacity=capacity)

    def call_module(self, module: nn.Module, params: Mapping[str, torch.Tensor], depth: torch.Tensor,
                    args: tuple[Any, ...], kwargs: dict[str, Any], *, capacity: int | Sequence[int] | None,
                    levels: Sequence[int] | None = None) -> Any:
        """Call ``module`` (this view's root, or a module of it that contains the stack) under the gates of ``depth``.

        ``params`` are named relative to ``module``. ``levels``: every value
        ``depth`` can take, where the caller knows them (a selection's 0 and
        full depth, a bucketing's tiers): layers that these values give the
        same mask share one partition, and their hidden states stay in its
        order from one to the next.
        """
        masks = depth_masks(depth, num_layers=self.num_layers)
        partitions = self._partitions(masks, capacity, depth, levels)
        if any(_checkpointing(layer) for layer in self._layers) and inside_torch_func():
            # PyTorch's checkpoint cannot run inside torch.func transforms (its
            # saved-tensor hooks and its reentrant autograd.Function are refused).
            raise RuntimeError(
                "model: gradient checkpointing is enabled and this call runs inside a torch.func transform "
                "(grad, vjp, ...), which PyTorch's checkpoint does not support; compute the gradients with "
                "loss.backward() or torch.autograd.grad, or call model.gradient_checkpointing_disable()"
            )
        self._gates.masks, self._gates.partitions = masks, partitions
        self._gates.streamed = None if partitions is None else self._streamed(partitions, kwargs)
        self._gates.mask_neutral = len(args) <= 1 and all(
            name in _MASK_NEUTRAL or value is None for name, value in kwargs.items())
        try:
            names = self._names if module is self.module else tensor_names(module)
            return functional_call(module, select_tensors(params, names), args, {**self._defaults, **kwargs})
        finally:
            self._gates.masks = self._gates.partitions = self._gates.streamed = None
            self._gates.mask_neutral = False

    def _streamed(self, partitions: list[Partition | None], kwargs: dict[str, Any]) -> list[bool]:
        # Hidden states out of place must not be seen: not as outputs, not by hooks.
        if kwargs.get("output_hidden_states", getattr(getattr(self.module, "config", None), "output_hidden_states",
                                                      False)):
            return [False] * len(partitions)
        return [part is not None and layer._cggr_streamable and not _hooked(layer)
                for part, layer in zip(partitions, self._layers)]

    def _partitions(self, masks: list[torch.Tensor], capacity: int | Sequence[int] | None, depth: torch.Tensor,
                    levels: Sequence[int] | None) -> list[Partition | None] | None:
        if capacity is None:
            return None
        if self.leak != 0.0:
            raise ValueError(f"capacity: compacted execution runs untrained rows without autograd, so it needs a "
                             f"forward built with leak=0, not leak={self.leak}")
        capacities = [capacity] * self.num_layers if not isinstance(capacity, Sequence) else list(capacity)
        if len(capacities) != self.num_layers:
            raise ValueError(f"capacity: expected an int or one int per layer ({self.num_layers}), got {len(capacities)}")
        if levels is not None and _checks.value_checks_enabled() and depth.numel() > 0:
            if not bool(torch.isin(depth, torch.tensor(list(levels), device=depth.device)).all()):  # sync-ok: checking
                found = sorted(depth.unique().tolist())  # sync-ok: the error message, under checking() only
                raise ValueError(f"depth: expected only the levels {sorted(levels)}, got {found}")
        partitions: list[Partition | None] = []
        shared: dict[tuple[int, int], Partition] = {}
        for layer, cap in enumerate(capacities):
            # Layer i trains the tokens open at its output gate (point i + 1): depth >= L - i.
            mask = masks[layer + 1]
            check_capacity(cap, mask, f"capacity[{layer}]" if isinstance(capacity, Sequence) else "capacity")
            # A layer that every token may train runs whole: the same gradients, no gathers.
            if cap == mask.numel():
                partitions.append(None)
                continue
            # Given the levels, depth >= L - i holds exactly where depth >= the least level at or above L - i.
            reaching = [] if levels is None else [level for level in levels if level >= self.num_layers - layer]
            key = None if levels is None else (min(reaching) if reaching else -1, cap)
            if key not in shared:
                part = partition(mask, cap)
                if key is None:
                    partitions.append(part)
                    continue
                shared[key] = part
            partitions.append(shared[key])
        return partitions

    def __repr__(self) -> str:
        return f"DepthRoutedForward({type(self.module).__name__}, num_layers={self.num_layers}, leak={self.leak})"


def depth_routed_forward(model: nn.Module, *, parts: ModelParts | None = None, leak: float = 0.0,
                         route_attention: bool = False) -> DepthRoutedForward:
    """The model's forward with per-token gradient depth, as a stateless function of its parameters.

    Replaces the seed's ``CGGRWrapper`` (backward hooks on the model plus a
    ``step`` buffer). ``forward(params, depth, *args, **kwargs)`` returns
    exactly ``model(*args, **kwargs)`` computed with ``params`` (via
    :func:`torch.func.functional_call`), but in backward token ``t`` trains
    only the top ``depth[t]`` layers of the stack: the gates of
    :func:`cggr_fn.depth_masks` are applied with :func:`cggr_fn.route_grad` to
    the stack's input and to every layer's output hidden state, as
    :func:`cggr_fn.route_depth` does for a plain list of layers. Full depth
    everywhere is ordinary training. ``torch.func.grad`` of a loss of the
    output gives the routed gradients, and the whole step compiles with
    ``torch.compile(fullgraph=True)``: the gates are plain tensors, the depth
    is data, nothing synchronises.

    The model is not modified. The call runs on a view of it: new objects for
    the path from the root to the stack and for each layer, sharing every
    other module, every tensor and every hook with the model. The view reads
    the model's *current* settings at each call: ``model.train()`` /
    ``model.eval()`` (dropout, including layers that test ``self.training``)
    and ``model.gradient_checkpointing_enable()`` / ``_disable()`` act on it
    whenever they are called. ``use_cache`` defaults to ``False``. A call that
    passes nothing that shapes the attention mask (no ``attention_mask``,
    ``position_ids`` or the like) to a causal model with no sliding window
    runs its SDPA attention causally without the mask tensor Hugging Face
    builds under ``torch.compile`` (the same numbers; faster kernels). The gates
    of a call are thread-local, so one function object may be called from
    several threads at once.

    Gradient checkpointing (``model.gradient_checkpointing_enable()``, with
    ``use_reentrant`` ``False`` or ``True``) gives the same routed gradients
    as without it: the gates sit outside the checkpointed region, and the
    recomputation in backward uses the ``params`` of the call. It needs
    autograd's own backward (``loss.backward()``, ``torch.autograd.grad``):
    PyTorch's checkpoint does not run inside ``torch.func`` transforms, so a
    call inside one with checkpointing enabled raises. (Hugging Face's
    ``gradient_checkpointing_enable()`` also hooks ``requires_grad_()`` onto
    the input embedding, which ``torch.func`` refuses even in eval mode;
    ``model.disable_input_require_grads()`` removes it.)

    Args:
      model: a model whose forward runs the layer stack, e.g. ``LlamaForCausalLM``.
      parts: where the model's pieces are; detected (:func:`detect_parts`) if ``None``.
      leak: gradient scale where a gate is closed, in ``[0, 1]``.
      route_attention: in compacted layers (``capacity``), run attention's
        backward over the routed queries only (FlexAttention on the GPU;
        the same gradients). Off by default: on an H200 it is slower today
        than the whole attention it replaces (see the README).

    Returns:
      A :class:`DepthRoutedForward`; ``depth`` is an integer tensor in
      ``[0, num_layers]`` of the hidden state's token shape, ``(batch, seq)``
      for every supported family (e.g. from :func:`cggr_fn.bucket_depth`).

    Example:
      >>> import torch, transformers
      >>> from cggr_fn.models import depth_routed_forward, lm_loss
      >>> config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=8)
      >>> model = transformers.GPT2LMHeadModel(config)
      >>> forward = depth_routed_forward(model)
      >>> params = {k: v.detach() for k, v in model.named_parameters()}
      >>> ids = torch.randint(0, 32, (1, 4))
      >>> depth = torch.tensor([[2, 1, 1, 0]])  # token 0 trains both layers, token 3 none
      >>> loss = lambda p: lm_loss(forward(p, depth, input_ids=ids).logits, ids)
      >>> grads = torch.func.grad(loss)(params)
      >>> grads["transformer.wpe.weight"].abs().sum(-1)[:4] > 0  # only token 0 reaches the embeddings
      tensor([ True, False, False, False])
    """
    check_model(model)
    parts = resolve_parts(model, parts)
    _checks.check_fraction(leak, "leak")
    if not isinstance(route_attention, bool):
        raise TypeError(f"route_attention: expected a bool, got {type(route_attention).__name__}")
    view, stack = path_view(model, parts.layers)
    gates = _Gates(float(leak))
    layers = []
    for index, name in enumerate(list(stack._modules)):
        original = stack._modules[name]
        layer = follower_copy(original, follower_class(type(original), _GATED_LAYER))
        layer.__dict__["_cggr_gates"] = gates
        layer.__dict__["_cggr_point"] = index + 1
        copied = {id(layer)}
        layer.__dict__["_cggr_streamable"] = _route_token_wise(layer, gates, index + 1, copied)
        _route_attention(layer, gates, index + 1, copied, route_attention)
        stack._modules[name] = layer
        layers.append(layer)
    return DepthRoutedForward(view, layers, parts, float(leak), gates, default_kwargs(model))
