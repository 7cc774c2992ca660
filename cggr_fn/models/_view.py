"""Module views: new module objects over the *same* parameter and buffer tensors.

A view is a structural copy of (part of) a module tree. Every copied module is a
new Python object with its own ``training`` flag, children and hooks, but it
shares its ``_parameters`` and ``_buffers`` dicts with the original, so it holds
no tensor of its own and follows the model when it is moved, cast or has a
parameter reassigned. This is how a router can drop the upper layers and run in
eval mode, and how a routed forward can carry gradient gates, without touching
the user's model and without copying a single weight.
"""

from __future__ import annotations

import copy

from torch import nn

# Per-object containers a copy must not share with the original: children (a
# view may swap some) and hooks (a view may add some).
_OWN_CONTAINERS = (
    "_modules",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters, buffers and children."""
    clone = copy.copy(module)
    for name in _OWN_CONTAINERS:
        if name in module.__dict__:
            clone.__dict__[name] = copy.copy(module.__dict__[name])
    # The same dict objects, on purpose: the view sees reassigned or moved tensors.
    clone.__dict__["_parameters"] = module.__dict__["_parameters"]
    clone.__dict__["_buffers"] = module.__dict__["_buffers"]
    return clone


def tree_view(module: nn.Module) -> nn.Module:
    """Copy every module of the tree (each shared module once), sharing all tensors."""
    memo: dict[int, nn.Module] = {}

    def visit(node: nn.Module) -> nn.Module:
        if id(node) not in memo:
            clone = memo[id(node)] = shallow_module_copy(node)
            clone._modules = {name: None if child is None else visit(child) for name, child in node._modules.items()}
        return memo[id(node)]

    return visit(module)


def path_view(module: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """Copy only the modules from the root down to ``path``; share everything else.

    Returns the new root and the copy of the module at ``path``, which the
    caller may then change (swap its children, add hooks) without affecting
    ``module``.
    """
    root = node = shallow_module_copy(module)
    for name in path.split(".") if path else ():
        child = shallow_module_copy(node._modules[name])
        node._modules[name] = child
        node = child
    return root, node


def set_child(root: nn.Module, path: str, child: nn.Module) -> None:
    """Replace the module at ``path`` (inside a view) by ``child``."""
    parent_path, _, name = path.rpartition(".")
    root.get_submodule(parent_path)._modules[name] = child
