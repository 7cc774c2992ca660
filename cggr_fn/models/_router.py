"""The truncated router: logits of the first K layers + final norm + head, sharing the model's weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from cggr_fn import _checks
from cggr_fn.models._common import check_model, default_kwargs, select_tensors, tensor_names
from cggr_fn.models._detect import ModelParts, layer_stack, resolve_parts
from cggr_fn.models._view import set_child, tree_view


class TruncatedRouter:
    """A pure function ``router(params, input_ids, **model_kwargs) -> logits``; see :func:`truncated_router`.

    Attributes:
      module: the truncated eval-mode view of the model that the router calls
        (it holds no tensor of its own; every parameter and buffer is the model's).
      num_layers: how many layers of the stack the router runs.
      parts: the :class:`ModelParts` of the model.
    """

    def __init__(self, module: nn.Module, num_layers: int, parts: ModelParts, defaults: dict[str, Any]) -> None:
        self.module = module
        self.num_layers = num_layers
        self.parts = parts
        self._names = tensor_names(module)
        self._defaults = defaults

    def __call__(
        self, params: dict[str, torch.Tensor], input_ids: torch.Tensor | None = None, **model_kwargs: Any
    ) -> torch.Tensor:
        """Logits of the truncated model; see :func:`truncated_router`."""
        kwargs = {**self._defaults, **model_kwargs}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        with torch.no_grad():
            out = functional_call(self.module, select_tensors(params, self._names), (), kwargs)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"model: the router needs a model with an output head that returns .logits "
                f"(e.g. ...ForCausalLM, ...ForMaskedLM), got a {type(out).__name__} from {type(self.module).__name__}"
            )
        return logits

    def __repr__(self) -> str:
        return f"TruncatedRouter({type(self.module).__name__}, num_layers={self.num_layers}, layers={self.parts.layers!r})"


def truncated_router(model: nn.Module, *, num_layers: int, parts: ModelParts | None = None) -> TruncatedRouter:
    """A cheap scorer: the model with only its first ``num_layers`` layers, in eval mode.

    Replaces the seed's ``create_truncated_router``. The router runs the
    model's own ``forward`` (embedding, position embeddings, attention-mask
    construction, the first ``num_layers`` layers, the final norm and the head)
    through :func:`torch.func.functional_call` on a *view* of the model: new
    module objects whose layer list holds only the first ``num_layers`` layers
    and whose ``training`` flags are off, but whose parameters and buffers are
    the model's own tensors (the same objects, no copy; the model itself is
    never modified, and no model is initialised). So:

    * its weights are whatever ``params`` you pass (names as in
      ``model.named_parameters()``; extra names such as the skipped layers'
      are ignored, missing ones fall back to the model's tensors);
    * it runs without dropout and without gradient (its logits are detached,
      for scoring), whatever mode the model is in, on purpose: scores must
      not depend on dropout draws. So it never uses gradient checkpointing
      either (checkpointing only acts in training mode). Its module objects
      are a snapshot taken when it is built: hooks registered on the model
      later do not run in it;
    * ``model_kwargs`` go to the model's forward unchanged: ``attention_mask``
      and ``position_ids`` (pass ``position_ids`` for left padding, as
      ``generate`` does) are honoured exactly as by the full model;
      ``use_cache`` defaults to ``False``.

    It composes with ``torch.func.grad`` (as a constant) and compiles with
    ``torch.compile(fullgraph=True)``. The model's forward must iterate over
    its layer list (all supported families do).

    Args:
      model: a model with an output head, e.g. ``LlamaForCausalLM``.
      num_layers: layers the router runs, in ``[1, len(stack)]``.
      parts: where the model's pieces are; detected (:func:`detect_parts`) if ``None``.

    Returns:
      A :class:`TruncatedRouter`, called as ``router(params, input_ids, **model_kwargs)``
      and returning logits of shape ``(batch, seq, vocab)``.

    Example:
      >>> import torch, transformers
      >>> from cggr_fn.models import truncated_router
      >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
      ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)
      >>> model = transformers.LlamaForCausalLM(config)
      >>> router = truncated_router(model, num_layers=1)
      >>> params = dict(model.named_parameters())
      >>> router(params, torch.randint(0, 32, (2, 5))).shape
      torch.Size([2, 5, 32])
    """
    check_model(model)
    parts = resolve_parts(model, parts)
    stack = layer_stack(model, parts)
    _checks.check_int(num_layers, "num_layers", minimum=1)
    if num_layers > len(stack):
        raise ValueError(f"num_layers: expected at most the {len(stack)} layers of {parts.layers!r}, got {num_layers}")
    view = tree_view(model)
    # Slicing a ModuleList gives a new list over the same (view) layer objects.
    set_child(view, parts.layers, view.get_submodule(parts.layers)[:num_layers])
    view.train(False)
    return TruncatedRouter(view, num_layers, parts, default_kwargs(model))
