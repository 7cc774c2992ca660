"""cggr_fn.testing catches what it promises to catch, names the culprit, and rejects misuse."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

import cggr_fn
from cggr_fn import testing


def test_importing_the_kit_needs_neither_pytest_nor_hypothesis():
    code = (
        "import sys; sys.modules['pytest'] = None; sys.modules['hypothesis'] = None\n"
        "import cggr_fn.testing as t\n"
        "try:\n    t.ratios()\nexcept ImportError as e:\n    print(e)\n"
        "try:\n    t.variants('eager')\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "strategies need hypothesis: pip install cggr-fn[test]" in out
    assert "variants needs pytest: pip install cggr-fn[test]" in out


# ------------------------------------------------------------------ variants


@testing.variants()
def test_variants_parametrise_a_test_over_every_variant(variant, request):
    assert request.node.callspec.id == variant.name
    x = torch.randn(4, 3)
    mask = torch.tensor([True, False, True, False])
    out = variant(lambda t: cggr_fn.route_grad(torch.tanh, mask, leak=0.5)(t))(x)
    torch.testing.assert_close(out, torch.tanh(x))


def test_each_variant_catches_its_own_failure():
    x = torch.randn(3, 4)
    with pytest.raises(AssertionError, match="variant 'compile': data-dependent op 'item'"):
        testing.assert_variants(lambda t: t * t.sum().item(), x, variants=("compile",))
    with pytest.raises(AssertionError, match="variant 'dynamic': torch.compile.*failed"):
        testing.assert_variants(lambda t: t if t.sum() > 0 else -t, x, variants=("dynamic",))
    with pytest.raises(AssertionError, match="variant 'vmap': fn failed under torch.func.vmap"):
        testing.assert_variants(lambda t: t * float(t.sum()), x, variants=("vmap",))


def test_vjp_variant_compares_func_vjp_with_autograd():
    x = torch.randn(3)
    # torch.func.vjp and torch.autograd agree on plain ops (integer outputs pass through)...
    testing.assert_variants(lambda t: (t.sin(), t.argmax()), x, variants=("vjp",))

    def inconsistent(t):  # differentiates differently under torch.func than under autograd
        return t * 3 if torch._C._functorch.is_gradtrackingtensor(t) else t * 2

    with pytest.raises(AssertionError, match="variant 'vjp': gradients differ from torch.autograd.grad"):
        testing.assert_variants(inconsistent, x, variants=("vjp",))
    with pytest.raises(AssertionError, match="variant 'vjp': fn failed under torch.func.vjp"):
        testing.assert_variants(lambda t: t * torch.from_numpy(t.detach().numpy()), x, variants=("vjp",))


def test_assert_variants_names_the_variant_whose_result_differs():
    calls = []

    def impure(t):  # a different result on every call: eager vs the next variant differs
        calls.append(None)
        return t + len(calls)

    with pytest.raises(AssertionError, match=r"variant 'eager': output: values differ"):
        testing.assert_variants(impure, torch.zeros(2), variants=("eager",))


def test_variant_misuse_is_explained():
    with pytest.raises(ValueError, match=r"name: expected one of \('eager'"):
        testing.Variant("jit")
    with pytest.raises(TypeError, match="fn: expected a callable, got int"):
        testing.Variant("vmap")(3)
    with pytest.raises(ValueError, match="variant 'vmap': expected at least one positional tensor argument"):
        testing.Variant("vmap")(lambda n: torch.ones(n))(3)
    with pytest.raises(ValueError, match="variant 'vjp': expected at least one floating positional tensor"):
        testing.Variant("vjp")(lambda t: t.float())(torch.arange(3))
    with pytest.raises(ValueError, match="variants: expected names from"):
        testing.assert_variants(torch.sin, torch.ones(1), variants=("grad",))


# --------------------------------------------------------------- compilation


def test_assert_compiles_detects_host_syncs_data_dependent_shapes_and_graph_breaks():
    x = torch.randn(6)
    testing.assert_compiles(lambda t: torch.where(t > 0, t, 0.0).sum(), x)
    for fn, culprit in [
        (lambda t: t * t.max().item(), "'item'"),
        (lambda t: t[t.nonzero()[:, 0]], "'nonzero'"),
        (lambda t: t[t > 0], ""),
        (lambda t: torch.ones(int(t.argmax())), ""),
    ]:
        with pytest.raises(AssertionError, match=f"assert_compiles: data-dependent op {culprit}"):
            testing.assert_compiles(fn, x)
    with pytest.raises(AssertionError, match="graph break"):
        testing.assert_compiles(lambda t: t.tolist(), x)


def test_assert_compiles_compares_with_eager():
    state = {"calls": 0}

    def drifting(t):  # the compiled call sees a different Python constant than eager did
        state["calls"] += 1
        return t * state["calls"]

    with pytest.raises(AssertionError, match="compiled result differs from eager"):
        testing.assert_compiles(drifting, torch.ones(2))


def test_assert_max_recompiles_counts_compilations():
    testing.assert_max_recompiles(lambda t, s: t * s, 1, [(torch.ones(3), torch.tensor(s)) for s in range(4)])
    # A Python number is a constant the graph specialises on: each new value recompiles, until dynamo makes it symbolic.
    with pytest.raises(AssertionError, match=r"2 compilations over 3 calls, expected at most 1 \(calls that compiled: \[0, 1\]\)"):
        testing.assert_max_recompiles(lambda t, s: t * s, 1, [(torch.ones(3), s) for s in (1, 2, 3)])
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        testing.assert_max_recompiles(torch.sin, 0, [(torch.ones(1),)])
    with pytest.raises(TypeError, match="n: expected an int, got float"):
        testing.assert_max_recompiles(torch.sin, 1.0, [(torch.ones(1),)])
    with pytest.raises(TypeError, match="inputs_seq: expected a non-empty sequence of argument tuples"):
        testing.assert_max_recompiles(torch.sin, 1, [torch.ones(1)])


def test_assert_static_shapes():
    make = lambda g: (torch.randn(5, generator=g),)  # noqa: E731
    testing.assert_static_shapes(lambda s: (cggr_fn.select(s, ratio=0.4), s.topk(2)), make)
    with pytest.raises(AssertionError, match=r"output shapes depend on the data"):
        testing.assert_static_shapes(lambda s: s.nonzero(), lambda g: (torch.randint(0, 2, (8,), generator=g),), trials=5)
    with pytest.raises(ValueError, match="make_inputs: expected the same input shapes on every call"):
        testing.assert_static_shapes(torch.sin, lambda g: (torch.randn(int(torch.randint(1, 9, (), generator=g))),), trials=5)
    with pytest.raises(TypeError, match="make_inputs: expected it to return a tuple"):
        testing.assert_static_shapes(torch.sin, lambda g: torch.randn(3, generator=g))
    with pytest.raises(TypeError, match="make_inputs: expected a callable"):
        testing.assert_static_shapes(torch.sin, torch.randn(3))
    with pytest.raises(ValueError, match="trials: expected an int >= 2, got 1"):
        testing.assert_static_shapes(torch.sin, make, trials=1)


# ------------------------------------------------------------------- routing


REAL_ROUTE_GRAD = cggr_fn.route_grad


def leaky_route_grad(fn, mask, *, leak=0.0):
    """A wrong route_grad: gated rows keep a tenth of their gradient."""
    return REAL_ROUTE_GRAD(fn, mask, leak=max(leak, 0.1))


def test_assert_routed_gradients_catches_a_wrong_route_grad(monkeypatch):
    w = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, True]])
    x = torch.randn(2, 2, 4)
    grads = testing.assert_routed_gradients(lambda t: {"y": torch.tanh(t @ w), "n": t.argmax(-1)}, mask, x, leak=0.5)
    assert grads[0].dtype == torch.float64
    with torch.no_grad():  # the check differentiates anyway: it cannot pass vacuously
        testing.assert_routed_gradients(lambda t: torch.tanh(t @ w), mask, x)
    monkeypatch.setattr(cggr_fn, "route_grad", leaky_route_grad)
    with pytest.raises(AssertionError, match="gradient of floating input 0 differs from the torch.where"):
        testing.assert_routed_gradients(lambda t: torch.tanh(t @ w), mask, x)
    with torch.no_grad(), pytest.raises(AssertionError, match="gradient of floating input 0 differs"):
        testing.assert_routed_gradients(lambda t: torch.tanh(t @ w), mask, x)


def test_assert_routed_gradients_misuse_is_explained():
    x = torch.ones(3, 2)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        testing.assert_routed_gradients(None, torch.tensor([True]), x)
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool, got torch.int64"):
        testing.assert_routed_gradients(torch.sin, torch.tensor([1, 0, 1]), x)
    with pytest.raises(ValueError, match=r"output\[1\] has shape \(2,\), mask has shape \(3,\)"):
        testing.assert_routed_gradients(lambda t: (t, t.sum(0)), torch.tensor([True, False, True]), x)
    with pytest.raises(ValueError, match="inputs: expected at least one floating tensor"):
        testing.assert_routed_gradients(lambda t: t.float(), torch.tensor([True]), torch.ones(1, dtype=torch.long))


def test_assert_depth_routed_gradients_catches_an_off_by_one_stack(monkeypatch):
    weights = [torch.randn(3, 3, dtype=torch.float64) for _ in range(3)]
    layers = [lambda h, w=w: h + torch.tanh(h.cumsum(1) @ w) for w in weights]
    depth = torch.tensor([[0, 1, 2, 3, 1]])
    hidden = torch.randn(1, 5, 3)
    testing.assert_depth_routed_gradients(layers, depth, hidden, params=weights, leak=0.25)
    assert not any(w.requires_grad for w in weights)  # flags restored
    real_route_depth = cggr_fn.route_depth
    monkeypatch.setattr(cggr_fn, "route_depth", lambda layers, depth, leak=0.0: real_route_depth(layers, depth + 1 - (depth == 3).long(), leak=leak))
    with pytest.raises(AssertionError, match="gradient of (hidden|params\\[0\\]) differs from the per-layer gate reference"):
        testing.assert_depth_routed_gradients(layers, depth, hidden, params=weights)


def test_assert_depth_routed_gradients_misuse_is_explained():
    layer = torch.nn.Linear(3, 3).double()
    testing.assert_depth_routed_gradients(torch.nn.ModuleList([layer]), torch.tensor([1, 0]), torch.ones(2, 3), params=[layer.weight])
    testing.assert_depth_routed_gradients(iter([layer]), torch.tensor([1, 0]), torch.ones(2, 3))  # a one-shot iterable
    with pytest.raises(TypeError, match="layers: expected a sequence of callables, got Linear"):
        testing.assert_depth_routed_gradients(layer, torch.tensor([1]), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"depth: expected the leading \(token\) dims of hidden, \(2, 3\), got shape \(3,\)"):
        testing.assert_depth_routed_gradients([layer], torch.tensor([1, 0, 1]), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"params\[0\]: expected a float64 tensor"):
        testing.assert_depth_routed_gradients([layer], torch.tensor([1, 0]), torch.ones(2, 3), params=[torch.ones(1)])
    with pytest.raises(ValueError, match="leak: expected"):
        testing.assert_depth_routed_gradients([layer], torch.tensor([1, 0]), torch.ones(2, 3), leak=2)
    with pytest.raises(ValueError, match="leak: expected"):
        testing.assert_routed_gradients(layer, torch.tensor([True, False]), torch.ones(2, 3), leak=-1)


# ---------------------------------------------------------------- strategies


def test_strategy_misuse_is_explained():
    with pytest.raises(TypeError, match="positional argument"):
        testing.depths(4)  # type: ignore[misc]
    with pytest.raises(ValueError, match="num_layers: expected an int >= 1, got 0"):
        testing.depths(num_layers=0)


@settings(max_examples=60, deadline=None)
@given(testing.score_tensors(), testing.ratios(tensors=True), testing.steps(max_step=30, tensors=True), testing.depths(num_layers=4))
def test_strategies_draw_valid_arguments(scores, ratio, step, depth):
    assert scores.dtype == torch.float32 and 1 <= scores.dim() <= 2
    assert 0 < float(ratio) <= 1 and 0 <= int(step) <= 30
    assert depth.dtype == torch.int64 and 0 <= int(depth.min()) and int(depth.max()) <= 4
    cggr_fn.select(scores, ratio=ratio)
    cggr_fn.bucket(scores, step, warmup_steps=20)
    cggr_fn.depth_masks(depth, num_layers=4)


def test_score_strategy_draws_the_values_that_break_rankings():
    seen = {"nan": False, "posinf": False, "neginf": False, "tie": False}

    @settings(max_examples=200, deadline=None)
    @given(testing.score_tensors(shape=(6,)))
    def look(scores):
        seen["nan"] |= bool(scores.isnan().any())
        seen["posinf"] |= bool(scores.isposinf().any())
        seen["neginf"] |= bool(scores.isneginf().any())
        finite = scores[scores.isfinite()]
        seen["tie"] |= finite.unique().numel() < finite.numel()

    look()
    assert all(seen.values()), seen


# ------------------------------------------------------- compiling, repeatedly


def test_checks_of_one_function_start_fresh_and_leave_nothing_compiled():
    """Each check compiles for its own counter: repeated past dynamo's limit
    of graphs per code object, checks of one function still pass, and no
    graph stays cached on the function."""
    fn = lambda t: t * 2.0  # noqa: E731
    for _ in range(torch._dynamo.config.recompile_limit + 1):
        testing.assert_compiles(fn, torch.ones(3))
        testing.assert_variants(fn, torch.ones(3), variants=("compile", "dynamic"))
        testing.assert_max_recompiles(fn, 1, [(torch.ones(3),)])
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__) == []


DOCTEST_OF_THE_CHECKS = """
>>> import torch, cggr_fn
>>> from cggr_fn import testing
>>> testing.assert_compiles(lambda s, step: cggr_fn.bucket(s, step, warmup_steps=10), torch.randn(8), torch.tensor(3))
>>> testing.assert_max_recompiles(lambda x: cggr_fn.select(x, ratio=0.5), 2, [(torch.ones(4),), (torch.ones(6),)])
>>> testing.assert_variants(lambda x: cggr_fn.score(x), torch.randn(2, 3), variants=("compile", "dynamic"))
"""


def test_a_doctest_of_the_checks_exits_cleanly():
    """A doctest clears its namespace when it ends, before the process exits;
    graphs that a check left cached made dynamo's clean-up print
    "Exception ignored ... KeyError: '__builtins_dict___N'" at exit."""
    code = (
        "import doctest, sys\n"
        f"test = doctest.DocTestParser().get_doctest({DOCTEST_OF_THE_CHECKS!r}, {{}}, 'checks', None, 0)\n"
        "runner = doctest.DocTestRunner()\n"
        "runner.run(test)\n"
        "sys.exit(runner.failures)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    assert "Exception ignored" not in done.stderr, done.stderr


def test_routed_gradients_follow_route_grad_on_scalar_outputs_and_infinite_entries():
    weight = torch.randn(3, 3, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    # An MoE-style (out, aux_loss): the 0-d aux loss passes through ungated.
    testing.assert_routed_gradients(lambda x: (torch.tanh(x @ weight), (x ** 2).mean()), mask, torch.randn(4, 3))
    # An infinite entry of a gated row passes no gradient with a leak (inf - inf would be NaN).
    inf_row = torch.tensor([[1.0, 2.0, 3.0], [float("inf"), 1.0, 2.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    grads = testing.assert_routed_gradients(lambda x: x * 3.0, mask, inf_row, leak=0.5)
    assert torch.isfinite(grads[0]).all()
