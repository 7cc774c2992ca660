"""Depth-routed forward of a whole model: the core's depth gates applied at every layer of its stack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from cggr_fn import _checks
from cggr_fn._routing import depth_masks, gate
from cggr_fn.models._common import check_model, default_kwargs, select_tensors, tensor_names
from cggr_fn.models._detect import ModelParts, resolve_parts
from cggr_fn.models._view import path_view, shallow_module_copy


class _Gates:
    """The gradient gates of the call in progress, read by the view's layer hooks.

    Hooks cannot be registered inside ``torch.compile`` (dynamo refuses the
    handle bookkeeping), so they are registered once, on the view, and read the
    call's gates from here. Each call sets the gates and clears them on exit, so
    no state survives a call; the hooks are identities when no gates are set.
    """

    def __init__(self, leak: float) -> None:
        self.masks: list[torch.Tensor] | None = None
        self.leak = leak


def _input_hook(gates: _Gates) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if gates.masks is None:
            return None
        if args:
            return (gate(args[0], gates.masks[0], gates.leak), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": gate(kwargs["hidden_states"], gates.masks[0], gates.leak)}
        raise TypeError(
            f"model: the first layer ({type(module).__name__}) was called without a positional hidden state "
            "or a hidden_states= keyword; cannot gate the stack's input"
        )

    return hook


def _output_hook(gates: _Gates, point: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if gates.masks is None:
            return None
        mask = gates.masks[point]
        # Decoder layers return the hidden state, or a tuple whose first element
        # it is (attention weights, caches follow); only the hidden state is gated.
        if isinstance(output, torch.Tensor):
            return gate(output, mask, gates.leak)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (gate(output[0], mask, gates.leak), *output[1:])
        raise TypeError(
            f"model: layer {point - 1} ({type(module).__name__}) returned a {type(output).__name__}; "
            "expected the hidden state or a tuple starting with it"
        )

    return hook


class DepthRoutedForward:
    """A pure function ``forward(params, depth, *args, **kwargs) -> model output``; see :func:`depth_routed_forward`.

    Attributes:
      module: the view of the model that is called (it holds no tensor of its
        own; its layer objects carry the gating hooks, the model's do not).
      num_layers: the number of layers in the stack (the full depth).
      parts: the :class:`ModelParts` of the model.
      leak: gradient scale where a gate is closed.
    """

    def __init__(self, module: nn.Module, num_layers: int, parts: ModelParts, leak: float, gates: _Gates,
                 defaults: dict[str, Any]) -> None:
        self.module = module
        self.num_layers = num_layers
        self.parts = parts
        self.leak = leak
        self._gates = gates
        self._names = tensor_names(module)
        self._defaults = defaults

    def __call__(self, params: dict[str, torch.Tensor], depth: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The model's output with depth-routed gradients; see :func:`depth_routed_forward`."""
        masks = depth_masks(depth, self.num_layers)
        self._gates.masks = masks
        try:
            return functional_call(self.module, select_tensors(params, self._names), args, {**self._defaults, **kwargs})
        finally:
            self._gates.masks = None

    def __repr__(self) -> str:
        return f"DepthRoutedForward({type(self.module).__name__}, num_layers={self.num_layers}, leak={self.leak})"


def depth_routed_forward(model: nn.Module, *, parts: ModelParts | None = None, leak: float = 0.0) -> DepthRoutedForward:
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
    the path from the root to the stack and for each layer (these carry the
    gating hooks), sharing every other module and every tensor with the model,
    so ``model.train()`` / ``model.eval()`` still switch dropout. ``use_cache``
    defaults to ``False``. One function object must not be called from two
    threads at once (the hooks read the gates of the call in progress), and
    the layers must not use gradient checkpointing (its recomputation runs
    after the call, without the gates; building the function raises).

    Args:
      model: a model whose forward runs the layer stack, e.g. ``LlamaForCausalLM``.
      parts: where the model's pieces are; detected (:func:`detect_parts`) if ``None``.
      leak: gradient scale where a gate is closed, in ``[0, 1]``.

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
    if any(getattr(layer, "gradient_checkpointing", False) for layer in model.get_submodule(parts.layers)):
        # The recomputation in backward runs outside the call, without the gates,
        # so it would not reproduce the routed forward.
        raise ValueError(
            "model: gradient checkpointing of the layers is not supported by depth_routed_forward; "
            "call model.gradient_checkpointing_disable() before building it"
        )
    view, stack = path_view(model, parts.layers)
    gates = _Gates(float(leak))
    for index, name in enumerate(list(stack._modules)):
        layer = shallow_module_copy(stack._modules[name])
        stack._modules[name] = layer
        if index == 0:
            layer.register_forward_pre_hook(_input_hook(gates), with_kwargs=True)
        layer.register_forward_hook(_output_hook(gates, index + 1))
    return DepthRoutedForward(view, len(stack), parts, float(leak), gates, default_kwargs(model))
