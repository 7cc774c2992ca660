"""Helpers shared by the model adapters."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return model


def tensor_names(module: nn.Module) -> frozenset[str]:
    """Every parameter and buffer name of ``module``, tied duplicates included."""
    params = (name for name, _ in module.named_parameters(remove_duplicate=False))
    buffers = (name for name, _ in module.named_buffers(remove_duplicate=False))
    return frozenset(params) | frozenset(buffers)


def select_tensors(params: object, names: frozenset[str]) -> dict[str, torch.Tensor]:
    """The entries of ``params`` that ``names`` holds (functional_call rejects unknown names)."""
    if not isinstance(params, Mapping):
        raise TypeError(
            "params: expected a mapping of parameter names to tensors, e.g. dict(model.named_parameters()), "
            f"got {type(params).__name__}"
        )
    return {name: value for name, value in params.items() if name in names}


def default_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments added to every call unless the caller passes them.

    ``use_cache=False``: a scoring or training forward never reuses keys and
    values, and building a cache costs memory and time inside the step.
    """
    accepts = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in accepts else {}


def inside_torch_func() -> bool:
    """Whether the call runs inside a ``torch.func`` transform (grad, vjp, vmap, ...), outside compilation."""
    # torch.func has no public query; this is the stack its transforms push.
    # Dynamo cannot evaluate it while tracing, so compiled code answers False.
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
