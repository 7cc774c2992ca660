"""torch.autograd.gradcheck through every differentiable public function, in float64.

DIFFERENTIABLE lists them; a function added to the public API that carries
gradient belongs here. Routing transforms change gradients on purpose (gated
rows get none), so they are checked where their gradient is the true
derivative: the rows and layers that a token trains.
"""

import pytest
import torch

import cggr_fn

DOUBLE = torch.float64
# Every differentiable function of cggr_fn's core API (the others return
# statistics, masks, integer buckets or ratios, which are constants).
DIFFERENTIABLE = ("fused_head_loss", "fused_selective_loss", "route_depth", "route_grad", "selective_loss")


def test_the_list_is_complete():
    assert set(DIFFERENTIABLE) <= set(cggr_fn.__all__)
    checked = {name.removeprefix("test_gradcheck_") for name in globals() if name.startswith("test_gradcheck_")}
    assert checked == set(DIFFERENTIABLE)


def _logits(*shape):
    return torch.randn(*shape, dtype=DOUBLE, generator=torch.Generator().manual_seed(0), requires_grad=True)


@pytest.mark.parametrize("normalize", ["selected", "valid"])
def test_gradcheck_selective_loss(normalize):
    logits = _logits(2, 3, 5)
    targets = torch.tensor([[0, 4, -100], [2, -100, 1]])  # ignored rows
    mask = torch.tensor([[True, False, True], [False, True, True]])  # unselected rows
    assert torch.autograd.gradcheck(
        lambda x: cggr_fn.selective_loss(x, targets, mask, normalize=normalize), (logits,)
    )
    weights = torch.rand(2, 3, dtype=DOUBLE, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: cggr_fn.selective_loss(x, targets, mask, weights=w, normalize=normalize), (logits, weights)
    )


def _head(*, tokens=(2, 4), vocab=7, hidden_size=3):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(*tokens, hidden_size, dtype=DOUBLE, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=DOUBLE, generator=generator, requires_grad=True)
    bias = torch.randn(vocab, dtype=DOUBLE, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, tokens, generator=generator)
    targets[0, 1] = -100
    return hidden, weight, bias, targets


def _forward_per_backward(fn):
    """``fn`` recomputed for every backward: the fused head's eager backward runs once per forward.

    gradcheck differentiates one output several times (its reentrancy check);
    each backward here runs a fresh forward and the fused head's own eager
    backward on it, so that path is what gets checked.
    """

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            ctx.save_for_backward(*inputs)
            return fn(*inputs).detach()

        @staticmethod
        def backward(ctx, grad):
            inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
            with torch.enable_grad():
                out = fn(*inputs)
            wanted = [x for x in inputs if x.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
            return tuple(next(grads) if x.requires_grad else None for x in inputs)

    return Recompute.apply


@pytest.mark.parametrize("normalize", ["selected", "valid"])
def test_gradcheck_fused_selective_loss(normalize):
    """Gradients computed in the forward, chunk by chunk (chunks of 3 rows of 5 selected)."""
    hidden, weight, bias, targets = _head()
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    weights = torch.rand(2, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(
        _forward_per_backward(lambda h, w, b, wt: cggr_fn.fused_selective_loss(
            h, w, targets, mask, weights=wt, bias=b, capacity=6, normalize=normalize, chunk_size=3
        )),
        (hidden, weight, bias, weights),
    )
    positions = torch.tensor([6, 0, 3, 6])
    assert torch.autograd.gradcheck(
        _forward_per_backward(
            lambda h, w: cggr_fn.fused_selective_loss(h, w, targets, positions, normalize=normalize, chunk_size=2)),
        (hidden, weight),
    )


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_gradcheck_fused_head_loss(ratio):
    """Selection is piecewise constant in the inputs; the loss is differentiable where it does not change."""
    hidden, weight, bias, targets = _head()
    assert torch.autograd.gradcheck(
        _forward_per_backward(lambda h, w, b: cggr_fn.fused_head_loss(
            h, w, targets, bias=b, ratio=ratio, method="grad_norm", chunk_size=3).loss),
        (hidden, weight, bias),
    )


@pytest.mark.parametrize("leak", [0.0, 0.25])
def test_gradcheck_route_grad(leak):
    """Rows where the mask is true carry the exact derivative, whatever the leak."""
    x = _logits(4, 3)
    weight = torch.randn(3, 3, dtype=DOUBLE, requires_grad=True)
    mask = torch.tensor([True, False, True, False])

    def fn(t, w):
        return torch.tanh(t @ w) + t.sum(0)  # mixes rows

    assert torch.autograd.gradcheck(lambda t, w: cggr_fn.route_grad(fn, mask, leak=leak)(t, w)[mask], (x, weight))


def test_gradcheck_route_depth():
    """A token of depth d carries the exact derivative through its top d layers."""
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(3, 3, dtype=DOUBLE, generator=generator, requires_grad=True) for _ in range(3)]
    hidden = _logits(2, 4, 3)
    depth = torch.tensor([[3, 1, 2, 0], [2, 3, 1, 3]])

    def run(h, *ws):
        layers = [lambda t, w=w: torch.tanh(t @ w) + t for w in ws]
        return cggr_fn.route_depth(layers, depth)(h)

    full = depth == 3  # never gated: the derivative in the input and every layer
    assert torch.autograd.gradcheck(lambda h, *ws: run(h, *ws)[full], (hidden, *weights))
    for d in (1, 2):
        top = weights[3 - d :]
        frozen = [w.detach() for w in weights[: 3 - d]]
        assert torch.autograd.gradcheck(lambda *ws: run(hidden.detach(), *frozen, *ws)[depth == d], tuple(top))
