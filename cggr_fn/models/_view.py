"""Module views: new module objects over the *same* parameter and buffer tensors.

A view is a structural copy of (part of) a module tree. Every copied module is a
new Python object with its own children, but it shares its ``_parameters`` and
``_buffers`` dicts with the original, so it holds no tensor of its own and
follows the model when it is moved, cast or has a parameter reassigned. This is
how a router can drop the upper layers and run in eval mode, and how a routed
forward can gate every layer, without touching the user's model and without
copying a single weight.

Two kinds of copy:

* :func:`shallow_module_copy`: a snapshot with its own ``training`` flag and
  hooks (the router, which is always in eval mode);
* :func:`follower_copy`: a copy that reads the original's *current* mode,
  gradient-checkpointing settings and hooks at every access, so
  ``model.train()``, ``model.eval()``, ``model.gradient_checkpointing_enable()``
  or a hook registered after the view was built act on the view too.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

# Per-object containers a snapshot must not share with the original: children
# (a view may swap some) and hooks (a view may add some).
_HOOK_CONTAINERS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)

# The attributes that ``nn.Module.train``/``eval`` and Hugging Face's
# ``gradient_checkpointing_enable``/``disable`` set on each module: a follower
# reads them from its original, so they are never stale.
FOLLOWED = ("training", "gradient_checkpointing", "_gradient_checkpointing_func")

_FOLLOWER_CLASSES: dict[type, type] = {}


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and children."""
    clone = copy.copy(module)
    for name in ("_modules", *_HOOK_CONTAINERS):
        if name in module.__dict__:
            clone.__dict__[name] = copy.copy(module.__dict__[name])
    # The same dict objects, on purpose: the view sees reassigned or moved tensors.
    clone.__dict__["_parameters"] = module.__dict__["_parameters"]
    clone.__dict__["_buffers"] = module.__dict__["_buffers"]
    return clone


def source_of(module: nn.Module) -> nn.Module:
    """The original module a :func:`follower_copy` reads its settings from."""
    return module._cggr_source


def _followed(name: str) -> property:
    # An instance without a source is a plain module of the follower class,
    # e.g. the new list that slicing a followed ModuleList constructs.
    def get(self: nn.Module) -> Any:
        source = self._cggr_source
        if source is not None:
            return getattr(source, name)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    def set_(self: nn.Module, value: object) -> None:
        if self._cggr_source is not None:
            raise AttributeError(
                f"{name}: this view of a {type(self).__name__} follows the model's own setting; "
                "set it on the model (model.train(), model.eval(), model.gradient_checkpointing_enable())"
            )
        self.__dict__[name] = value

    return property(get, set_)


def follower_class(cls: type[nn.Module], extra: dict[str, Any] | None = None) -> type[nn.Module]:
    """A subclass of ``cls`` whose :data:`FOLLOWED` attributes read through to the original module.

    Cached per class (and per ``extra`` key set), so every view of one model
    type has one class and compiled code is not specialised per view. The
    class keeps ``cls``'s name: error messages and ``repr`` read as the model's.
    """
    key = (cls, tuple(sorted(extra or {})))
    if key not in _FOLLOWER_CLASSES:
        namespace: dict[str, Any] = {name: _followed(name) for name in FOLLOWED}
        namespace["_cggr_source"] = None
        namespace.update(extra or {})
        namespace["__module__"] = cls.__module__
        namespace["__qualname__"] = cls.__qualname__
        _FOLLOWER_CLASSES[key] = type(cls.__name__, (cls,), namespace)  # type: ignore[index]
    return _FOLLOWER_CLASSES[key]  # type: ignore[index]


def follower_copy(module: nn.Module, cls: type[nn.Module] | None = None) -> nn.Module:
    """A new module object that shares ``module``'s tensors, children and hooks and follows its settings.

    Only the children dict is its own (a view may swap children). ``cls`` is
    the follower class to use (default: :func:`follower_class` of the module's type).
    """
    clone = copy.copy(module)
    clone.__dict__["_modules"] = copy.copy(module.__dict__["_modules"])
    for name in FOLLOWED:
        clone.__dict__.pop(name, None)
    clone.__dict__["_cggr_source"] = module
    clone.__class__ = cls or follower_class(type(module))
    return clone


def tree_view(module: nn.Module) -> nn.Module:
    """Snapshot-copy every module of the tree (each shared module once), sharing all tensors."""
    memo: dict[int, nn.Module] = {}

    def visit(node: nn.Module) -> nn.Module:
        if id(node) not in memo:
            clone = memo[id(node)] = shallow_module_copy(node)
            clone._modules = {name: None if child is None else visit(child) for name, child in node._modules.items()}
        return memo[id(node)]

    return visit(module)


def path_view(module: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """Follower-copy only the modules from the root down to ``path``; share everything else.

    Returns the new root and the copy of the module at ``path``, whose
    children the caller may then swap without affecting ``module``.
    """
    root = node = follower_copy(module)
    for name in path.split(".") if path else ():
        child = follower_copy(node._modules[name])
        node._modules[name] = child
        node = child
    return root, node


def set_child(root: nn.Module, path: str, child: nn.Module) -> None:
    """Replace the module at ``path`` (inside a view) by ``child``."""
    parent_path, _, name = path.rpartition(".")
    root.get_submodule(parent_path)._modules[name] = child
