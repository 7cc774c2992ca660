"""Testing kit for routing code: execution variants, gradient references, compile checks, strategies.

For people who unit-test routing as plain functions (chex-style, for torch):

* :class:`Variant`, :func:`variants`, :func:`assert_variants`: run one check
  eagerly, under ``torch.compile(fullgraph=True)`` (static and
  ``dynamic=True``), under ``torch.func.vmap`` and under ``torch.func.vjp``,
  and compare with eager.
* :func:`assert_routed_gradients`, :func:`assert_depth_routed_gradients`:
  the gradients of :func:`cggr_fn.route_grad` and :func:`cggr_fn.route_depth`
  against hand-written float64 references.
* :func:`assert_compiles`, :func:`assert_max_recompiles`,
  :func:`assert_static_shapes`: no graph break, no data-dependent op, bounded
  recompilation, data-independent output shapes.
* :func:`score_tensors`, :func:`ratios`, :func:`steps`, :func:`depths`:
  Hypothesis strategies for property tests.

Neither ``pytest`` nor ``hypothesis`` is needed to import this module: they are
imported when :func:`variants` or a strategy is called (``pip install
cggr-fn[test]`` installs both). Failures raise ``AssertionError`` naming the
variant, output or input at fault; misuse (a non-callable, a mask that does not
cover the outputs, inputs that cannot be batched) raises ``TypeError`` or
``ValueError`` saying what was expected.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch._dynamo.testing
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import cggr_fn
from cggr_fn import _checks

__all__ = [
    "VARIANTS",
    "Variant",
    "assert_compiles",
    "assert_depth_routed_gradients",
    "assert_max_recompiles",
    "assert_routed_gradients",
    "assert_static_shapes",
    "assert_variants",
    "depths",
    "ratios",
    "score_tensors",
    "steps",
    "variants",
]

#: Every execution variant, in the order :func:`assert_variants` runs them.
VARIANTS = ("eager", "compile", "dynamic", "vmap", "vjp")

#: Batch size of the ``"vmap"`` variant: every tensor argument is replicated this many times.
_VMAP_BATCH = 2


# ------------------------------------------------------------------ comparing


def _assert_same(got: Any, expected: Any, what: str, *, atol: float | None = None, rtol: float | None = None) -> None:
    """``got`` equals ``expected`` leaf by leaf (NaN equals NaN; dtypes must match)."""
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    expected_leaves, expected_spec = pytree.tree_flatten_with_path(expected)
    if got_spec != expected_spec:
        raise AssertionError(f"{what}: output structure differs from eager:\n  got      {got_spec}\n  expected {expected_spec}")
    for (path, g), (_, e) in zip(got_leaves, expected_leaves):
        where = f"{what}: output{pytree.keystr(path)}"
        if isinstance(e, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                raise AssertionError(f"{where}: expected a tensor, got {type(g).__name__}")
            if g.dtype != e.dtype or g.shape != e.shape:
                raise AssertionError(
                    f"{where}: expected {e.dtype} of shape {tuple(e.shape)}, got {g.dtype} of shape {tuple(g.shape)}"
                )
            _assert_close(g, e, f"{where}: values differ", atol=atol, rtol=rtol)
        elif g != e:
            raise AssertionError(f"{where}: expected {e!r}, got {g!r}")


def _assert_close(got: torch.Tensor, expected: torch.Tensor, message: str, *, atol: float | None, rtol: float | None) -> None:
    """``torch.testing.assert_close`` (NaN equals NaN), its report under ``message``."""
    try:
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    except AssertionError as error:
        raise AssertionError(f"{message}\n{error}") from None


def _check_callable(fn: object, name: str = "fn") -> None:
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")


def _is_float(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


# ------------------------------------------------------------------- variants


class Variant:
    """One way of executing a function: eager, compiled, vmapped or differentiated.

    ``Variant(name)(fn)`` returns a function with ``fn``'s signature and
    outputs, executed as named:

    * ``"eager"``: ``fn`` itself.
    * ``"compile"``: ``torch.compile(fn, fullgraph=True, backend=backend)``;
      graph breaks and data-dependent ops fail (see :func:`assert_compiles`).
    * ``"dynamic"``: the same with ``dynamic=True`` (symbolic shapes).
    * ``"vmap"``: ``torch.func.vmap(fn)`` over a leading batch dim of size 2
      made by replicating every positional tensor argument; the first batch
      element is returned after checking the second equals it. Keyword
      arguments and non-tensor arguments are not batched; random ops are an
      error (``randomness="error"``).
    * ``"vjp"``: the floating outputs computed by ``torch.func.vjp`` over the
      floating positional tensor arguments; the pull-back of a fixed random
      cotangent is checked against ``torch.autograd.grad`` of the plain call.

    A failure raises ``AssertionError`` naming the variant.

    Args:
      name: one of :data:`VARIANTS`.
      backend: ``torch.compile`` backend of ``"compile"`` and ``"dynamic"``;
        ``"aot_eager"`` (the default) traces forward and backward graphs
        without generating code, so CPU CI stays fast; use ``"inductor"`` to
        test code generation too.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn.testing import Variant
      >>> double = lambda t: t * 2.0
      >>> Variant("vmap")(double)(torch.ones(3))
      tensor([2., 2., 2.])
      >>> Variant("vjp")(lambda t: t.sum(-1))(torch.ones(2, 3))
      tensor([3., 3.])
    """

    def __init__(self, name: str, *, backend: str = "aot_eager") -> None:
        if name not in VARIANTS:
            raise ValueError(f"name: expected one of {VARIANTS}, got {name!r}")
        self.name = name
        self.backend = backend

    def __repr__(self) -> str:
        return self.name

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        _check_callable(fn)
        if self.name == "eager":
            return fn
        if self.name in ("compile", "dynamic"):
            return _compiled(fn, self.backend, dynamic=self.name == "dynamic", what=f"variant {self.name!r}")[0]
        if self.name == "vmap":
            return lambda *args, **kwargs: _vmapped_call(fn, args, kwargs)
        return lambda *args, **kwargs: _vjp_call(fn, args, kwargs)


def _compiled(
    fn: Callable[..., Any], backend: str, *, dynamic: bool | None, what: str
) -> tuple[Callable[..., Any], torch._dynamo.testing.CompileCounterWithBackend, types.CodeType]:
    """``fn`` compiled with ``fullgraph=True``, every call checked for graph breaks and data-dependent ops; its compile counter; the code object dynamo caches the graphs on."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    entry = _entry_point(fn)
    compiled = torch.compile(entry, fullgraph=True, backend=counter, dynamic=dynamic)

    def run(*args: Any, **kwargs: Any) -> Any:
        seen = len(counter.graphs)
        try:
            out = compiled(*args, **kwargs)
        # Broad on purpose, and re-raised: dynamo and the backends raise many
        # unrelated types, and any of them is this check failing on fn.
        except Exception as error:
            raise AssertionError(
                f"{what}: torch.compile(fullgraph=True) failed (a graph break, or an op the compiler cannot trace): "
                f"{type(error).__name__}: {error}"
            ) from error
        for graph in counter.graphs[seen:]:
            _check_no_data_dependence(graph, what)
        return out

    return run, counter, entry.__code__


@contextlib.contextmanager
def _compiling(
    fn: Callable[..., Any], backend: str, *, dynamic: bool | None, what: str
) -> Iterator[tuple[Callable[..., Any], torch._dynamo.testing.CompileCounterWithBackend]]:
    """:func:`_compiled` for the length of one check; its graphs are dropped at the end.

    Compiled graphs sit in reference cycles. Left to the garbage collector,
    they may be freed after a doctest has cleared the namespace that dynamo
    installed globals in, and dynamo's clean-up then fails with a KeyError
    at interpreter exit.
    """
    run, counter, code = _compiled(fn, backend, dynamic=dynamic, what=what)
    try:
        yield run, counter
    finally:
        torch._dynamo.eval_frame.remove_from_cache(code)


_entry_points = itertools.count()


def _entry_point(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object (and name) of its own: a copy of a Python function, else a function calling ``fn``.

    Dynamo keeps compiled graphs on the code object it is given, at most
    ``torch._dynamo.config.recompile_limit`` of them, and every check here
    compiles for a backend of its own; compiling ``fn`` itself would leave one
    entry per check on ``fn``'s code, so the ninth check of the same ``fn``
    would fail on the limit, and the entries (with the globals dynamo installs
    in ``fn``'s namespace) would outlive the check. A private code object,
    named uniquely so that dynamo's automatic-dynamic memory (keyed by name and
    line) is not shared either, makes every check start fresh, and
    :func:`_compiling` drops its graphs when the check ends. A Python function is copied rather than
    wrapped so that it runs in its own globals as the top frame (dynamo
    resolves an inlined function's globals through its module name, which a
    doctest namespace does not match).
    """
    name = f"{getattr(fn, '__name__', type(fn).__name__)}_checked_{next(_entry_points)}"
    target = fn.__func__ if isinstance(fn, types.MethodType) else fn
    if isinstance(target, types.FunctionType):
        copy = types.FunctionType(
            _renamed(target.__code__, name),
            target.__globals__,
            name,
            target.__defaults__,
            target.__closure__,
        )
        copy.__kwdefaults__ = target.__kwdefaults__
        return types.MethodType(copy, fn.__self__) if isinstance(fn, types.MethodType) else copy

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__code__ = _renamed(call.__code__, name)
    return call


def _renamed(code: types.CodeType, name: str) -> types.CodeType:
    # co_qualname exists from Python 3.11; the package supports 3.10.
    return code.replace(co_name=name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {}))


def _check_no_data_dependence(graph: torch.fx.GraphModule, what: str) -> None:
    """Fail on the first node whose value or shape the compiler could only learn from device data."""
    for module in graph.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            example = node.meta.get("example_value")
            if example is not None and free_unbacked_symbols(example):
                source = (node.stack_trace or "").strip().splitlines()[-2:]
                raise AssertionError(
                    f"{what}: data-dependent op {node.target!r} (its value or output shape depends on tensor "
                    f"data: a host sync such as .item()/.tolist(), or a data-dependent shape such as nonzero "
                    f"or boolean indexing) at:\n" + "\n".join(source)
                )


def _vmapped_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in args)
    if 0 not in in_dims:
        raise ValueError("variant 'vmap': expected at least one positional tensor argument to batch, got none")
    batched = tuple(
        a.unsqueeze(0).expand(_VMAP_BATCH, *a.shape).contiguous() if isinstance(a, torch.Tensor) else a for a in args
    )
    try:
        out = torch.func.vmap(lambda *a: fn(*a, **kwargs), in_dims=in_dims, randomness="error")(*batched)
    # Broad on purpose, and re-raised: whatever fn raises under vmap (an op
    # with no batching rule, a host sync, randomness) is this variant failing.
    except Exception as error:
        raise AssertionError(
            f"variant 'vmap': fn failed under torch.func.vmap over a leading batch dim "
            f"(every positional tensor argument replicated {_VMAP_BATCH} times): {type(error).__name__}: {error}"
        ) from error
    first = pytree.tree_map(lambda x: x[0] if isinstance(x, torch.Tensor) else x, out)
    for i in range(1, _VMAP_BATCH):
        element = pytree.tree_map(lambda x, i=i: x[i] if isinstance(x, torch.Tensor) else x, out)
        _assert_same(element, first, f"variant 'vmap': batch element {i} differs from element 0 (equal inputs)")
    return first


# Gradients are the point of these checks: a caller's no_grad block must not make them vacuous.
@torch.enable_grad()
def _vjp_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    positions = [i for i, a in enumerate(args) if _is_float(a)]
    if not positions:
        raise ValueError("variant 'vjp': expected at least one floating positional tensor argument to differentiate, got none")

    def with_floats(*floats: torch.Tensor) -> tuple[list[Any], pytree.TreeSpec]:
        full = list(args)
        for i, x in zip(positions, floats):
            full[i] = x
        return pytree.tree_flatten(fn(*full, **kwargs))

    def floating_outputs(*floats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(leaf for leaf in with_floats(*floats)[0] if _is_float(leaf))

    primals = tuple(args[i] for i in positions)
    leaves, spec = with_floats(*(p.detach() for p in primals))
    if not any(_is_float(leaf) for leaf in leaves):
        raise ValueError("variant 'vjp': expected fn to return at least one floating tensor to differentiate, got none")
    try:
        outputs, pull_back = torch.func.vjp(floating_outputs, *primals)
        cotangents = tuple(_fixed_random_like(o) for o in outputs)
        grads = pull_back(cotangents)
    # Broad on purpose, and re-raised: whatever fn raises under torch.func
    # (an op it cannot differentiate, a .numpy() call) is this variant failing.
    except Exception as error:
        raise AssertionError(f"variant 'vjp': fn failed under torch.func.vjp: {type(error).__name__}: {error}") from error

    leaves_in = tuple(p.detach().requires_grad_() for p in primals)
    reference_out = floating_outputs(*leaves_in)
    expected = _autograd_grads(reference_out, leaves_in, cotangents)
    _assert_same(grads, expected, "variant 'vjp': gradients differ from torch.autograd.grad of the plain call")
    results = iter(outputs)
    return pytree.tree_unflatten([next(results) if _is_float(leaf) else leaf for leaf in leaves], spec)


def _fixed_random_like(x: torch.Tensor) -> torch.Tensor:
    """A reproducible random tensor like ``x``: cotangents that are not all ones catch more."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype=x.dtype, device=x.device)


def _autograd_grads(
    outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` with zeros for inputs that no output depends on."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), [c for _, c in pairs], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def variants(*names: str, backend: str = "aot_eager") -> Callable[[Callable[..., Any]], Any]:
    """Run a pytest test once per execution variant: a ``variant`` argument to wrap the code under test.

    A decorator (``pytest.mark.parametrize`` over :class:`Variant` objects,
    ids = the variant names). The test calls ``variant(fn)(*args)`` where it
    would call ``fn(*args)``; its own assertions then check every variant.
    ``pytest`` is imported only when this is called.

    Args:
      *names: variants from :data:`VARIANTS`; all of them when none is given.
      backend: ``torch.compile`` backend of the compiled variants.

    Returns:
      A pytest mark that parametrises the test's ``variant`` argument.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn import testing
      >>> @testing.variants("eager", "compile", "vmap")
      ... def test_select_keeps_k(variant):
      ...     mask = variant(lambda s: cggr_fn.select(s, ratio=0.5))(torch.arange(6.0))
      ...     assert mask.sum() == 3
      >>> [mark.args[0] for mark in test_select_keeps_k.pytestmark]
      ['variant']
      >>> test_select_keeps_k(testing.Variant("vmap"))  # what pytest does, once per variant
    """
    names = names or VARIANTS
    built = [Variant(name, backend=backend) for name in names]
    try:
        import pytest
    except ImportError as error:
        raise ImportError("cggr_fn.testing.variants needs pytest: pip install cggr-fn[test]") from error
    return pytest.mark.parametrize("variant", built, ids=list(names))


def assert_variants(
    fn: Callable[..., Any],
    *args: Any,
    variants: Iterable[str] = VARIANTS,
    backend: str = "aot_eager",
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Assert that ``fn(*args)`` gives the eager result under every execution variant.

    Each :class:`Variant` runs ``fn`` on ``args`` and its outputs are compared
    with eager (structure, dtypes, shapes, values; NaN equals NaN; tolerances
    of ``torch.testing.assert_close`` unless given). ``"vjp"`` also compares
    its gradients with ``torch.autograd.grad``; leave it out for functions
    without floating inputs and outputs.

    Args:
      fn: the function under test.
      *args: its positional arguments.
      variants: names from :data:`VARIANTS`.
      backend: ``torch.compile`` backend of the compiled variants.
      atol: absolute tolerance, or ``None`` for the dtype's default.
      rtol: relative tolerance, or ``None`` for the dtype's default.

    Returns:
      None; raises ``AssertionError`` naming the first variant that differs.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn.testing import assert_variants
      >>> assert_variants(cggr_fn.score, torch.randn(2, 4, 5), variants=("compile", "vmap"))
      >>> assert_variants(lambda t: t.sum().item(), torch.ones(2), variants=("compile",))
      Traceback (most recent call last):
      ...
      AssertionError: variant 'compile': data-dependent op 'item' ...
    """
    _check_callable(fn)
    names = list(variants)
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"variants: expected names from {VARIANTS}, got {name!r}")
    expected = fn(*args)
    for name in names:
        if name in ("compile", "dynamic"):
            with _compiling(fn, backend, dynamic=name == "dynamic", what=f"variant {name!r}") as (compiled, _):
                got = compiled(*args)
        else:
            got = Variant(name, backend=backend)(fn)(*args)
        _assert_same(got, expected, f"variant {name!r}", atol=atol, rtol=rtol)


# ------------------------------------------------------------- compilation


def assert_compiles(
    fn: Callable[..., Any],
    *args: Any,
    backend: str = "aot_eager",
    dynamic: bool | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Assert that ``fn`` compiles as one graph with no data-dependent op, and equals eager.

    Two kinds of failure are detected. A graph break (Python control flow on
    a tensor value, ``bool(tensor)``, an untraceable call) raises inside
    ``torch.compile(fullgraph=True)``. Data-dependent ops do not: recent
    torch versions trace ``.item()`` and ``nonzero`` into the graph as
    *unbacked* symbols (values the compiler can only learn by reading device
    memory; the setting ``torch._dynamo.config.capture_scalar_outputs`` no
    longer turns them into graph breaks). So every captured graph is also
    inspected, and any node whose value or shape holds an unbacked symbol
    fails, with its source line: such an op is a host sync, or a shape that
    changes with the data, and blocks CUDA graphs.

    Args:
      fn: the function under test.
      *args: its positional arguments.
      backend: ``torch.compile`` backend (``"aot_eager"`` traces backward
        graphs too and is fast on CPU; ``"inductor"`` also generates code).
      dynamic: passed to ``torch.compile`` (``True``: symbolic shapes).
      atol: absolute tolerance, or ``None`` for the dtype's default.
      rtol: relative tolerance, or ``None`` for the dtype's default.

    Returns:
      None; raises ``AssertionError`` on a graph break, a data-dependent op,
      or a compiled result that differs from eager.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn.testing import assert_compiles
      >>> assert_compiles(lambda s, step: cggr_fn.bucket(s, step, warmup_steps=10), torch.randn(8), torch.tensor(3))
      >>> assert_compiles(lambda s: s[s > 0].sum(), torch.randn(8))
      Traceback (most recent call last):
      ...
      AssertionError: assert_compiles: data-dependent op ...
    """
    _check_callable(fn)
    expected = fn(*args)
    with _compiling(fn, backend, dynamic=dynamic, what="assert_compiles") as (compiled, _):
        got = compiled(*args)
    _assert_same(got, expected, "assert_compiles: compiled result differs from eager", atol=atol, rtol=rtol)


def assert_max_recompiles(
    fn: Callable[..., Any],
    n: int,
    inputs_seq: Iterable[tuple[Any, ...]],
    *,
    backend: str = "aot_eager",
    dynamic: bool | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Assert that compiling ``fn`` and calling it on every input tuple takes at most ``n`` compilations.

    ``fn`` is compiled once with ``fullgraph=True`` and a counting backend
    (``torch._dynamo.testing.CompileCounterWithBackend``), then called on
    each tuple of ``inputs_seq`` in turn; the first compilation counts, so
    ``n=1`` means "never recompiles". Every call is also checked as in
    :func:`assert_compiles` (no graph break, no data-dependent op, equal to
    eager). Typical sequences: successive steps as 0-d tensors (expect 1),
    new data of the same shape (expect 1), a second shape (expect 2 without
    ``dynamic``: the second compilation makes the size symbolic).

    Args:
      fn: the function under test.
      n: the most compilations allowed, >= 1.
      inputs_seq: tuples of positional arguments, one per call.
      backend: the ``torch.compile`` backend counted.
      dynamic: passed to ``torch.compile``.
      atol: absolute tolerance, or ``None`` for the dtype's default.
      rtol: relative tolerance, or ``None`` for the dtype's default.

    Returns:
      None; raises ``AssertionError`` listing the calls that compiled.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn.testing import assert_max_recompiles
      >>> schedule = lambda step: cggr_fn.ratio_schedule(step, warmup_steps=10, final_ratio=0.5)
      >>> assert_max_recompiles(schedule, 1, [(torch.tensor(s),) for s in range(5)])
      >>> assert_max_recompiles(lambda x: x * 2, 1, [(torch.ones(2),), (torch.ones(3),)])
      Traceback (most recent call last):
      ...
      AssertionError: assert_max_recompiles: 2 compilations over 2 calls, expected at most 1 (calls that compiled: [0, 1])
    """
    _check_callable(fn)
    _checks.check_int(n, "n", minimum=1)
    calls = list(inputs_seq)
    if not calls or not all(isinstance(args, tuple) for args in calls):
        raise TypeError("inputs_seq: expected a non-empty sequence of argument tuples, e.g. [(x0,), (x1,)]")
    compiling_calls = []
    with _compiling(fn, backend, dynamic=dynamic, what="assert_max_recompiles") as (compiled, counter):
        for index, args in enumerate(calls):
            before = counter.frame_count
            got = compiled(*args)
            if counter.frame_count > before:
                compiling_calls.append(index)
            _assert_same(got, fn(*args), f"assert_max_recompiles: call {index} differs from eager", atol=atol, rtol=rtol)
    if counter.frame_count > n:
        raise AssertionError(
            f"assert_max_recompiles: {counter.frame_count} compilations over {len(calls)} calls, "
            f"expected at most {n} (calls that compiled: {compiling_calls})"
        )


def assert_static_shapes(fn: Callable[..., Any], make_inputs: Callable[[torch.Generator], tuple[Any, ...]], *, trials: int = 3) -> None:
    """Assert that the shapes (and dtypes) of ``fn``'s outputs do not depend on the input values.

    ``make_inputs(generator)`` is called ``trials`` times with differently
    seeded generators; it must return argument tuples of the same shapes
    with different values. ``fn``'s outputs must then have the same
    structure, shapes and dtypes each time: a fixed-capacity mask passes, a
    ``nonzero`` or boolean-indexing result fails.

    Args:
      fn: the function under test.
      make_inputs: ``generator -> tuple of arguments``; draw values from the generator.
      trials: number of input draws, >= 2.

    Returns:
      None; raises ``AssertionError`` naming the output whose shape changed.

    Example:
      >>> import torch, cggr_fn
      >>> from cggr_fn.testing import assert_static_shapes
      >>> make = lambda g: (torch.randn(4, 8, generator=g),)
      >>> assert_static_shapes(lambda s: cggr_fn.select(s, ratio=0.25), make)
      >>> assert_static_shapes(lambda s: s[s > 0], make)
      Traceback (most recent call last):
      ...
      AssertionError: assert_static_shapes: output shapes depend on the data (trial 1 vs trial 0): ...
    """
    _check_callable(fn)
    _check_callable(make_inputs, "make_inputs")
    _checks.check_int(trials, "trials", minimum=2)

    def shapes_of_trial(trial: int) -> tuple[Any, Any]:
        inputs = make_inputs(torch.Generator().manual_seed(trial))
        if not isinstance(inputs, tuple):
            raise TypeError(f"make_inputs: expected it to return a tuple of arguments, got {type(inputs).__name__}")
        return _shapes(inputs), _shapes(fn(*inputs))

    first_inputs, first_outputs = shapes_of_trial(0)
    for trial in range(1, trials):
        inputs, outputs = shapes_of_trial(trial)
        if inputs != first_inputs:
            raise ValueError(
                f"make_inputs: expected the same input shapes on every call (only values may change), "
                f"got {inputs} after {first_inputs}"
            )
        if outputs != first_outputs:
            raise AssertionError(
                f"assert_static_shapes: output shapes depend on the data (trial {trial} vs trial 0): "
                f"{outputs} vs {first_outputs}"
            )


def _shapes(tree: Any) -> Any:
    return pytree.tree_map(lambda x: (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__, tree)


# ------------------------------------------------------------------ routing


def _row_gate(mask: torch.Tensor, leaf: torch.Tensor, where: str) -> torch.Tensor:
    """The mask as a 0/1 float64 row gate over ``leaf``; the coverage check names the output."""
    rows = leaf.shape[: mask.dim()]
    if mask.dim() > leaf.dim() or any(m not in (1, r) for m, r in zip(mask.shape, rows)):
        raise ValueError(
            f"mask: expected a shape broadcastable to the leading dims of every floating output of fn; "
            f"{where} has shape {tuple(leaf.shape)}, mask has shape {tuple(mask.shape)}"
        )
    return mask.reshape(mask.shape + (1,) * (leaf.dim() - mask.dim()))


def _gated(y: torch.Tensor, open_: torch.Tensor, leak: float) -> torch.Tensor:
    """The reference gate: ``y`` in value; its gradient where ``open_``, ``leak`` times it elsewhere."""
    if leak == 0.0:
        return torch.where(open_, y, y.detach())
    # inf - inf is NaN: route_grad documents that non-finite entries of gated rows pass no gradient.
    leaky = torch.where(torch.isfinite(y), y.detach() + leak * (y - y.detach()), y.detach())
    return torch.where(open_, y, leaky)


def _depth_reference(layers: Sequence[Callable[[torch.Tensor], torch.Tensor]], depth: torch.Tensor, hidden: torch.Tensor, leak: float) -> torch.Tensor:
    """The depth-routing definition, gate by gate, independent of :func:`cggr_fn.depth_masks`."""
    num_layers = len(layers)
    rows = depth.reshape(depth.shape + (1,) * (hidden.dim() - depth.dim()))
    h = hidden
    for i, layer in enumerate(layers):
        h = layer(_gated(h, (rows == num_layers) | (rows > num_layers - i), leak))
    return _gated(h, rows > 0, leak)


def _same_values(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal values after ``nan_to_num``, so a NaN or an infinity left in place compares equal."""
    return torch.equal(torch.nan_to_num(got.detach()), torch.nan_to_num(expected.detach()))


@torch.enable_grad()
def assert_routed_gradients(
    fn: Callable[..., Any], mask: torch.Tensor, *inputs: Any, leak: float = 0.0, atol: float = 1e-12, rtol: float = 1e-10
) -> tuple[torch.Tensor, ...]:
    """Assert that ``route_grad(fn, mask, leak=leak)`` has the hand-written reference gradients, in float64.

    The floating ``inputs`` are cast to float64 and the gradients of both
    sides, for a fixed random cotangent on every floating output, are
    compared. The reference gates every floating output ``y`` row by row:
    ``torch.where(mask, y, y.detach())``, or with a leak
    ``y.detach() + leak * (y - y.detach())`` on unmasked rows (finite entries;
    non-finite ones pass nothing), and leaves a 0-d output (e.g. an
    auxiliary loss) ungated. Outputs must equal ``fn``'s exactly.

    Args:
      fn: a function of the inputs returning a pytree of tensors; it must
        compute in its inputs' dtype (pass parameters as inputs, or make
        them float64).
      mask: boolean tensor broadcastable to the leading dims of every
        floating output.
      *inputs: positional arguments of ``fn``; the floating ones are differentiated.
      leak: gradient scale of unmasked rows, in ``[0, 1]``.
      atol: absolute tolerance of the gradient comparison.
      rtol: relative tolerance of the gradient comparison.

    Returns:
      The routed gradients with respect to the floating inputs, in order.

    Example:
      >>> import torch
      >>> from cggr_fn.testing import assert_routed_gradients
      >>> w = torch.randn(4, 4, dtype=torch.float64)
      >>> mask = torch.tensor([True, False, True])
      >>> grads = assert_routed_gradients(lambda x: torch.tanh(x @ w), mask, torch.randn(3, 4), leak=0.25)
      >>> assert_routed_gradients(lambda x: x * 2, torch.tensor([True, False]), torch.ones(3, 2))
      Traceback (most recent call last):
      ...
      ValueError: mask: expected a shape broadcastable to the leading dims of every floating output of fn; output has shape (3, 2), mask has shape (2,)
    """
    routed_fn = cggr_fn.route_grad(fn, mask, leak=leak)  # validates fn, mask and leak
    args = [x.detach().double().requires_grad_() if _is_float(x) else x for x in inputs]
    leaves = [x for x in args if _is_float(x)]
    if not leaves:
        raise ValueError("inputs: expected at least one floating tensor to differentiate, got none")
    plain = pytree.tree_flatten_with_path(fn(*args))[0]
    outputs = [(f"output{pytree.keystr(path)}", y) for path, y in plain if _is_float(y)]
    if not outputs:
        raise ValueError("fn: expected at least one floating tensor output to route, got none")
    # A 0-d output (an MoE auxiliary loss) has no rows: route_grad passes it through ungated.
    reference = [y if y.dim() == 0 < mask.dim() else _gated(y, _row_gate(mask, y, where), float(leak)) for where, y in outputs]
    routed = [y for y in pytree.tree_leaves(routed_fn(*args)) if _is_float(y)]
    for (where, y), r in zip(outputs, routed):
        if not _same_values(r, y):
            raise AssertionError(f"assert_routed_gradients: route_grad changed the value of {where}")
    cotangents = [_fixed_random_like(y) for y in reference]
    expected = _autograd_grads(reference, leaves, cotangents)
    got = _autograd_grads(routed, leaves, cotangents)
    for index, (g, e) in enumerate(zip(got, expected)):
        _assert_close(g, e, f"assert_routed_gradients: gradient of floating input {index} differs from the "
                      f"torch.where(mask, y, y.detach()) reference (leak={leak})", atol=atol, rtol=rtol)
    return got


@torch.enable_grad()
def assert_depth_routed_gradients(
    layers: Iterable[Callable[[torch.Tensor], torch.Tensor]],
    depth: torch.Tensor,
    hidden: torch.Tensor,
    *,
    params: Sequence[torch.Tensor] = (),
    leak: float = 0.0,
    atol: float = 1e-12,
    rtol: float = 1e-10,
) -> tuple[torch.Tensor, ...]:
    """Assert that ``route_depth(layers, depth, leak=leak)`` has the hand-written reference gradients.

    The reference is the definition written out with no cggr_fn code: with
    ``L = len(layers)``, the state of token ``t`` entering layer ``i``
    (numbered from the bottom) carries gradient iff ``depth[t] == L`` or
    ``depth[t] > L - i``, and the stack's output carries gradient iff
    ``depth[t] > 0``; elsewhere it is gated as in
    :func:`assert_routed_gradients`. Gradients with respect to ``hidden``
    (cast to float64) and ``params`` are compared for a fixed random
    cotangent.

    Args:
      layers: layer functions ``hidden -> hidden`` (a list, an ``nn.ModuleList``...).
      depth: integer tensor of per-token depths in ``[0, len(layers)]``,
        shaped as ``hidden``'s leading (token) dims.
      hidden: the stack's input, e.g. ``(batch, seq, features)``.
      params: float64 tensors the layers use (e.g. their weights), to compare
        their gradients too.
      leak: gradient scale where a gate is closed, in ``[0, 1]``.
      atol: absolute tolerance of the gradient comparison.
      rtol: relative tolerance of the gradient comparison.

    Returns:
      The routed gradients with respect to ``hidden`` and each of ``params``.

    Example:
      >>> import torch
      >>> from cggr_fn.testing import assert_depth_routed_gradients
      >>> weights = [torch.randn(3, 3, dtype=torch.float64) for _ in range(2)]
      >>> layers = [lambda h, w=w: h + torch.tanh(h.cumsum(1) @ w) for w in weights]
      >>> grads = assert_depth_routed_gradients(layers, torch.tensor([[2, 1, 0, 2]]), torch.randn(1, 4, 3), params=weights)
      >>> [g.shape for g in grads]
      [torch.Size([1, 4, 3]), torch.Size([3, 3]), torch.Size([3, 3])]
    """
    # Listed once, so that a one-shot iterable feeds both the stack and the reference.
    layers = list(layers) if isinstance(layers, Iterable) else layers
    stack = cggr_fn.route_depth(layers, depth, leak=leak)  # validates layers, depth and leak
    if not _is_float(hidden):
        raise TypeError(f"hidden: expected a floating tensor, got {getattr(hidden, 'dtype', type(hidden).__name__)}")
    if depth.dim() > hidden.dim() or tuple(depth.shape) != tuple(hidden.shape[: depth.dim()]):
        raise ValueError(
            f"depth: expected the leading (token) dims of hidden, {tuple(hidden.shape)}, got shape {tuple(depth.shape)}"
        )
    for index, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.float64:
            raise TypeError(
                f"params[{index}]: expected a float64 tensor (gradients are compared in float64), "
                f"got {getattr(p, 'dtype', type(p).__name__)}"
            )
    h0 = hidden.detach().double().requires_grad_()
    # The layers close over params, so they are differentiated in place; their
    # requires_grad flags are restored afterwards.
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            if p.is_leaf:
                p.requires_grad_()
        reference = _depth_reference(layers, depth, h0, float(leak))
        routed = stack(h0)
        if not _same_values(routed, reference):
            raise AssertionError("assert_depth_routed_gradients: route_depth changed the stack's output")
        cotangent = [_fixed_random_like(reference)]
        expected = _autograd_grads([reference], [h0, *params], cotangent)
        got = _autograd_grads([routed], [h0, *params], cotangent)
    finally:
        for p, flag in zip(params, flags):
            if p.is_leaf:
                p.requires_grad_(flag)
    names = ["hidden", *(f"params[{i}]" for i in range(len(params)))]
    for name, g, e in zip(names, got, expected):
        _assert_close(g, e, f"assert_depth_routed_gradients: gradient of {name} differs from the per-layer gate "
                      f"reference (leak={leak})", atol=atol, rtol=rtol)
    return got


# -------------------------------------------------------------- strategies


def _hypothesis() -> Any:
    try:
        from hypothesis import strategies
    except ImportError as error:
        raise ImportError("cggr_fn.testing strategies need hypothesis: pip install cggr-fn[test]") from error
    return strategies


def _tensor_strategy(
    st: Any, element: Any, *, shape: tuple[int, ...] | None, max_dims: int, max_side: int, dtype: torch.dtype, via: torch.dtype
) -> Any:
    """Tensors of ``shape`` (or of a drawn shape) whose entries are drawn from ``element``, built in ``via`` and cast to ``dtype``."""
    shapes = st.just(tuple(shape)) if shape is not None else st.lists(
        st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)

    @st.composite
    def draw(draw_: Any) -> torch.Tensor:
        size = draw_(shapes)
        values = draw_(st.lists(element, min_size=math.prod(size), max_size=math.prod(size)))
        return torch.tensor(values, dtype=via).to(dtype).reshape(size)

    return draw()


def score_tensors(
    *,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    nan: bool = True,
    inf: bool = True,
    max_dims: int = 2,
    max_side: int = 8,
) -> Any:
    """Hypothesis strategy of score tensors with the values that break rankings.

    Values mix a few repeated numbers (ties), arbitrary finite floats, and
    optionally NaN (ranked hardest), ``+inf`` and ``-inf`` (ignored
    positions). Needs ``hypothesis`` (a test extra, imported on call).

    Args:
      shape: a fixed shape, or ``None`` to draw 1 to ``max_dims`` dims.
      dtype: floating dtype of the tensors.
      nan: include NaN.
      inf: include ``+inf`` and ``-inf``.
      max_dims: most dims of a drawn shape.
      max_side: largest size of a drawn dim.

    Returns:
      A strategy of tensors.

    Example:
      >>> import torch, cggr_fn
      >>> from hypothesis import given, settings
      >>> from cggr_fn.testing import ratios, score_tensors
      >>> @settings(max_examples=25, deadline=None)
      ... @given(score_tensors(), ratios())
      ... def test_select_count(scores, ratio):
      ...     mask = cggr_fn.select(scores, ratio=ratio)
      ...     assert mask.any() == (~scores.isneginf()).any()  # k >= 1 when anything (NaN too) is selectable
      ...     assert not mask[scores.isneginf()].any()  # ignored positions never
      >>> test_select_count()
    """
    st = _hypothesis()
    special = [0.0, 0.5, 1.0] + ([float("nan")] if nan else []) + ([float("inf"), float("-inf")] if inf else [])
    value = st.one_of(st.sampled_from(special), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32))
    return _tensor_strategy(st, value, shape=shape, max_dims=max_dims, max_side=max_side, dtype=dtype, via=torch.float64)


def ratios(*, tensors: bool = False) -> Any:
    """Hypothesis strategy of keep ratios in ``(0, 1]``, edge values included.

    Draws ``1.0``, tiny ratios, decimal ratios whose product with a count
    rounds (``0.3``, ``0.7``) and arbitrary floats. Needs ``hypothesis``.

    Args:
      tensors: also draw 0-d float32 and float64 tensor ratios.

    Returns:
      A strategy of Python floats (and 0-d tensors with ``tensors=True``).

    Example:
      >>> from hypothesis import find
      >>> from cggr_fn.testing import ratios
      >>> 0 < find(ratios(), lambda r: r < 0.5) < 0.5
      True
    """
    st = _hypothesis()
    floats = st.one_of(
        st.sampled_from([1.0, 0.5, 0.3, 0.7, 0.25, 1e-9]),
        st.floats(0.0, 1.0, exclude_min=True, allow_nan=False),
    )
    if not tensors:
        return floats
    as_tensor = st.tuples(floats, st.sampled_from([torch.float32, torch.float64])).map(
        lambda pair: torch.tensor(pair[0], dtype=pair[1])
    )
    # float32 rounding may turn a tiny ratio into 0, which is not a keep ratio.
    return st.one_of(floats, as_tensor.filter(lambda r: bool(r > 0)))


def steps(*, max_step: int = 10_000, tensors: bool = False) -> Any:
    """Hypothesis strategy of curriculum steps: ``0``, ``max_step`` and anything between.

    Needs ``hypothesis``.

    Args:
      max_step: largest step drawn (choose it past your ``warmup_steps``).
      tensors: also draw 0-d int64 tensor steps (the compile-friendly form).

    Returns:
      A strategy of Python ints (and 0-d tensors with ``tensors=True``).

    Example:
      >>> import cggr_fn
      >>> from hypothesis import given, settings
      >>> from cggr_fn.testing import steps
      >>> @settings(max_examples=20, deadline=None)
      ... @given(steps(max_step=50, tensors=True))
      ... def test_schedule_in_range(step):
      ...     ratio = cggr_fn.ratio_schedule(step, warmup_steps=40, final_ratio=0.25)
      ...     assert 0.25 <= float(ratio) <= 1.0
      >>> test_schedule_in_range()
    """
    st = _hypothesis()
    ints = st.one_of(st.sampled_from([0, max_step]), st.integers(0, max_step))
    if not tensors:
        return ints
    return st.one_of(ints, ints.map(lambda s: torch.tensor(s, dtype=torch.int64)))


def depths(*, num_layers: int, shape: tuple[int, ...] | None = None, max_dims: int = 2, max_side: int = 8) -> Any:
    """Hypothesis strategy of int64 depth tensors with values in ``[0, num_layers]``.

    Needs ``hypothesis``.

    Args:
      num_layers: layers in the stack, >= 1.
      shape: a fixed shape (e.g. a hidden state's token dims), or ``None`` to draw one.
      max_dims: most dims of a drawn shape.
      max_side: largest size of a drawn dim.

    Returns:
      A strategy of int64 tensors.

    Example:
      >>> import torch, cggr_fn
      >>> from hypothesis import given, settings
      >>> from cggr_fn.testing import depths
      >>> @settings(max_examples=20, deadline=None)
      ... @given(depths(num_layers=3))
      ... def test_full_depth_never_gated(depth):
      ...     masks = cggr_fn.depth_masks(depth, num_layers=3)
      ...     assert all(bool(m[depth == 3].all()) for m in masks)
      >>> test_full_depth_never_gated()
    """
    _checks.check_int(num_layers, "num_layers", minimum=1)
    st = _hypothesis()
    return _tensor_strategy(
        st, st.integers(0, num_layers), shape=shape, max_dims=max_dims, max_side=max_side, dtype=torch.int64, via=torch.int64
    )
