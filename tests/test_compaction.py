"""Compacted execution (``route_grad(..., capacity=)``) has exactly the masking version's values and gradients.

Float64 on CPU, so "exactly" means to rounding. The masking version
(``route_grad`` without a capacity) is the reference: compaction changes
which rows run under autograd, never a value or a gradient, as long as the
mask fits in the capacity.
"""

from __future__ import annotations

import pytest
import torch

import cggr_fn
from cggr_fn._compaction import partition


def _mlp(weights: tuple[torch.Tensor, ...]):
    w1, b1, w2 = weights

    def mlp(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Token-wise, with a per-row second input and a non-floating output row.
        h = torch.nn.functional.silu(x @ w1 + b1) * scale.unsqueeze(-1)
        return h @ w2, (h > 0).sum(-1)

    return mlp


def _inputs(shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    weights = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True),
               torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True),
               torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True))
    cotangent = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    return x, scale, weights, cotangent


def _values_and_grads(capacity: int | None, mask: torch.Tensor, shape: tuple[int, ...]):
    x, scale, weights, cotangent = _inputs(shape)
    out, count = cggr_fn.route_grad(_mlp(weights), mask, capacity=capacity)(x, scale)
    grads = torch.autograd.grad((out * cotangent).sum(), (x, scale, *weights))
    return out.detach(), count, grads


@pytest.mark.parametrize("shape", [(11,), (3, 7), (2, 1, 5)])
@pytest.mark.parametrize("fill", ["under", "exact", "empty", "all"])
def test_compacted_equals_masked_in_float64(shape: tuple[int, ...], fill: str) -> None:
    n = int(torch.tensor(shape).prod())
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(n)) < 0.4
    if fill == "empty":
        mask = torch.zeros(shape, dtype=torch.bool)
    elif fill == "all":
        mask = torch.ones(shape, dtype=torch.bool)
    routed = int(mask.sum())
    # "under": padding rows fill the capacity and must stay gated.
    capacity = {"under": min(n, routed + 2), "exact": routed, "empty": 3, "all": n}[fill]
    expected = _values_and_grads(None, mask, shape)
    got = _values_and_grads(capacity, mask, shape)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-15)
    assert torch.equal(got[1], expected[1]) and got[1].dtype == expected[1].dtype
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-15)


def test_unrouted_rows_run_without_autograd() -> None:
    """The backward multiplies only the routed rows: the fn's autograd call sees ``capacity`` rows."""
    seen: list[tuple[int, bool]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))
        return x * 2

    x = torch.randn(10, 3, requires_grad=True)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 8]] = True
    out = cggr_fn.route_grad(fn, mask, capacity=4)(x)
    assert sorted(seen) == [(4, True), (6, False)]
    out.sum().backward()
    assert torch.equal(x.grad[:, 0], mask.double().float() * 2)


def test_partition_routes_true_rows_then_first_false_rows_in_row_order() -> None:
    g = torch.Generator().manual_seed(0)
    for n, capacity in [(1, 1), (9, 0), (9, 4), (9, 9), (64, 20), (64, 5)]:
        mask = torch.rand(n, generator=g) < 0.3
        part = partition(mask, capacity)
        trues, falses = torch.arange(n)[mask], torch.arange(n)[~mask]
        routed = torch.cat([trues, falses[: max(capacity - len(trues), 0)]]).sort().values[:capacity]
        rest = torch.tensor(sorted(set(range(n)) - set(routed.tolist())), dtype=torch.long)
        assert torch.equal(part.routed, routed)
        assert torch.equal(part.order, torch.cat([routed, rest]))
        assert torch.equal(part.keep, mask[part.routed])
        assert torch.equal(part.order[part.place], torch.arange(n))


def test_compacted_compiles_fullgraph_with_equal_grads() -> None:
    x, scale, weights, cotangent = _inputs((4, 6))
    mask = cggr_fn.select(torch.randn(4, 6, generator=torch.Generator().manual_seed(3)), ratio=0.25)
    k = cggr_fn.capacity(mask.numel(), ratio=0.25)

    def loss(params: tuple[torch.Tensor, ...], x: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = cggr_fn.route_grad(_mlp(params), mask, capacity=k)(x, scale)
        return (out * cotangent).sum()

    params = tuple(w.detach() for w in weights)
    eager = torch.func.grad(loss)(params, x.detach(), scale.detach(), mask)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")
    got = compiled(params, x.detach(), scale.detach(), mask)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-14)


def test_overfull_mask_raises_under_checking() -> None:
    mask = torch.tensor([True, True, True, False])
    x = torch.randn(4, 2)
    cggr_fn.route_grad(torch.sin, mask, capacity=2)  # unchecked: no sync, no error
    with cggr_fn.checking(), pytest.raises(ValueError, match="capacity: the mask routes 3 rows, more than the capacity of 2"):
        cggr_fn.route_grad(torch.sin, mask, capacity=2)(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"capacity": -1}, "capacity"),
        ({"capacity": 5}, "capacity: expected at most the 4 rows"),
        ({"capacity": 2.0}, "capacity"),
        ({"capacity": 2, "leak": 0.1}, "leak: compacted execution"),
    ],
)
def test_bad_capacity_raises(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        cggr_fn.route_grad(torch.sin, torch.ones(4, dtype=torch.bool), **kwargs)


def test_row_mixing_fn_raises() -> None:
    with pytest.raises(ValueError, match="fn: compacted execution needs a token-wise fn"):
        cggr_fn.route_grad(lambda t: t.sum(0), torch.ones(4, dtype=torch.bool), capacity=2)(torch.randn(4, 3))


@pytest.mark.parametrize("num_layers, num_buckets, warmup", [(4, 4, 10), (16, 4, 0), (30, 4, 100), (5, 3, 7), (2, 1, 0)])
def test_bucket_capacity_bounds_bucket_depth_at_and_after_its_step(num_layers: int, num_buckets: int, warmup: int) -> None:
    """Layer ``i`` is trained by tokens of depth >= L - i; their count never exceeds the capacity, and meets it at the step."""
    n = 37
    scores = torch.randn(3, n, generator=torch.Generator().manual_seed(num_layers)).reshape(-1)
    for capacity_step in sorted({0, warmup // 2, warmup}):
        caps = cggr_fn.bucket_capacity(scores.numel(), capacity_step, num_layers=num_layers, num_buckets=num_buckets,
                                       warmup_steps=warmup)
        assert len(caps) == num_layers and caps == sorted(caps) and all(isinstance(c, int) for c in caps)
        for step in (capacity_step, capacity_step + 1, warmup + 5):
            depth = cggr_fn.bucket_depth(scores, step, num_layers=num_layers, num_buckets=num_buckets, warmup_steps=warmup)
            counts = [int((depth >= num_layers - layer).sum()) for layer in range(num_layers)]
            assert all(c <= cap for c, cap in zip(counts, caps)), (step, counts, caps)
            if step == capacity_step:
                assert counts == caps


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((10, -1), {"num_layers": 4}, "step"),
        ((10, 1.5), {"num_layers": 4}, "step"),
        ((10, 0), {"num_layers": 0}, "num_layers"),
        ((10, 0), {"num_layers": 2, "num_buckets": 0}, "num_buckets"),
        ((-1, 0), {"num_layers": 2}, "num_tokens"),
    ],
)
def test_bucket_capacity_bad_input(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        cggr_fn.bucket_capacity(*args, **kwargs)


def test_rows_move_without_scatter_add() -> None:
    """Forward and backward move rows by copies and gathers, never by an accumulating scatter.

    (index_select's backward is an atomic scatter-add, which for 16-bit floats
    runs as a kernel the compiler cannot fuse: a tenth of a 1B-parameter step.)
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    x, scale, weights, cotangent = _inputs((4, 6))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    capacity = int(mask.sum())
    seen = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            accumulate = func is torch.ops.aten.index_put.default and len(args) > 3 and args[3]
            seen.add("accumulating index_put" if accumulate else func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        out, _ = cggr_fn.route_grad(_mlp(weights), mask, capacity=capacity)(x, scale)
        torch.autograd.grad((out * cotangent).sum(), (x, scale, *weights))
    assert "_local_scalar_dense" not in seen  # no host sync either
    assert "index_copy" in seen
    assert not seen & {"index_add", "index_add_", "scatter_add", "scatter_add_", "accumulating index_put"}
