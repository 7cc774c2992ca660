"""route_grad, depth_masks and route_depth against hand-masked float64 gradients (the references of cggr_fn.testing)."""

import collections

import pytest
import torch

import cggr_fn
from cggr_fn import testing


@pytest.fixture(autouse=True)
def float64_by_default():
    """Gradients here are compared in float64 (restored after each test)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def mlp(w1, w2):
    return lambda x: torch.tanh(x @ w1) @ w2


@pytest.mark.parametrize("leak", [0.0, 0.25, 1.0])
def test_route_grad_gates_rows_exactly(leak):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=generator)
    w1, w2 = (torch.randn(4, 4, generator=generator) for _ in range(2))
    mask = torch.rand(3, 5, generator=generator) > 0.5
    grad_x, _, _ = testing.assert_routed_gradients(lambda x, w1, w2: mlp(w1, w2)(x), mask, x, w1, w2, leak=leak)
    if leak == 0.0:
        assert (grad_x[~mask] == 0).all()


def test_route_grad_masked_rows_are_exactly_zero_even_for_nan_gradients():
    x = torch.ones(3, 2, requires_grad=True)
    routed = cggr_fn.route_grad(lambda t: t * 1.0, torch.tensor([True, False, True]))
    (grad,) = torch.autograd.grad(routed(x), x, torch.tensor([[1.0, 1.0], [float("nan"), float("inf")], [2.0, 2.0]]))
    assert grad[1].tolist() == [0.0, 0.0] and grad[0].tolist() == [1.0, 1.0]


def test_route_grad_handles_pytree_outputs_and_broadcast_masks():
    Out = collections.namedtuple("Out", "hidden extra")
    x = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([[True], [False]])  # broadcasts over the sequence dim

    def fn(t):
        return {"a": Out(t * 2, [t.sum(-1), torch.arange(3)]), "b": None}

    out = cggr_fn.route_grad(fn, mask)(x)
    assert out["b"] is None and torch.equal(out["a"].extra[1], torch.arange(3))
    loss = out["a"].hidden.sum() + out["a"].extra[0].sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert (grad[0] == 3).all() and (grad[1] == 0).all()


def test_route_grad_outputs_are_identical_including_non_finite_values():
    x = torch.tensor([[float("inf"), float("nan"), -1.0]])
    out = cggr_fn.route_grad(lambda t: t * 1.0, torch.tensor([False]), leak=0.5)(x)
    assert torch.equal(out.isnan(), x.isnan()) and out[0, 0] == float("inf") and out[0, 2] == -1


def test_route_grad_forward_mode_scales_tangents():
    x, tangent = torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.tensor([True, False, True, False])
    routed = cggr_fn.route_grad(lambda t: t.sin(), mask, leak=0.5)
    _, got = torch.func.jvp(routed, (x,), (tangent,))
    expected = x.cos() * tangent * torch.where(mask, 1.0, 0.5).unsqueeze(-1)
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------- depth routing


def test_depth_masks_follow_the_documented_rule():
    depth = torch.tensor([[0, 1, 2], [3, 4, 4]])
    masks = cggr_fn.depth_masks(depth, num_layers=4)
    assert len(masks) == 5
    for point, mask in enumerate(masks):
        for d, m in zip(depth.flatten().tolist(), mask.flatten().tolist()):
            carries = d == 4 or d >= 4 + 1 - point
            assert m == carries, (point, d)


def causal_mixing_layer(w):
    """A token-mixing layer, like attention: token t sees the mean of tokens <= t."""

    def layer(h):
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        context = h.cumsum(dim=1) / counts
        return h + torch.tanh(context @ w)

    return layer


@pytest.mark.parametrize("seed, leak", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.3)])
def test_route_depth_matches_hand_masked_reference(seed, leak):
    generator = torch.Generator().manual_seed(seed)
    num_layers = 4
    weights = [torch.randn(6, 6, generator=generator) for _ in range(num_layers)]
    embedding = torch.randn(2, 7, 6, generator=generator)
    depth = torch.randint(0, num_layers + 1, (2, 7), generator=generator)
    layers = [causal_mixing_layer(w) for w in weights]
    testing.assert_depth_routed_gradients(layers, depth, embedding, params=weights, leak=leak)


def test_route_depth_full_depth_is_plain_training():
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(5, 5, generator=generator, requires_grad=True) for _ in range(3)]
    h = torch.randn(2, 4, 5, generator=generator, requires_grad=True)
    layers = [causal_mixing_layer(w) for w in weights]
    routed = cggr_fn.route_depth(layers, torch.full((2, 4), 3))(h).sum()
    plain = h
    for layer in layers:
        plain = layer(plain)
    got = torch.autograd.grad(routed, [h, *weights])
    expected = torch.autograd.grad(plain.sum(), [h, *weights])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_shallow_tokens_do_not_train_lower_layers_through_attention():
    """Only the last token trains the bottom layer; it attends to every earlier
    (shallow) token, but that path must not reach the bottom layer's weights
    through their hidden states: the gradient equals one where the earlier
    tokens' inputs are constants."""
    generator = torch.Generator().manual_seed(4)
    w_bottom, w_top = (torch.randn(3, 3, generator=generator, requires_grad=True) for _ in range(2))
    h = torch.randn(1, 5, 3, generator=generator)
    depth = torch.tensor([[1, 1, 1, 1, 2]])
    layers = [causal_mixing_layer(w_bottom), causal_mixing_layer(w_top)]
    out = cggr_fn.route_depth(layers, depth)(h)
    (got,) = torch.autograd.grad(out[0, -1].sum() + out[0, :-1].sum(), w_bottom)
    frozen = torch.cat([h[:, :-1].detach(), h[:, -1:]], dim=1)
    bottom = layers[0](frozen)
    bottom = torch.cat([bottom[:, :-1].detach(), bottom[:, -1:]], dim=1)
    (expected,) = torch.autograd.grad(layers[1](bottom).sum(), w_bottom)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert got.abs().sum() > 0


def test_route_depth_passes_extra_arguments_to_every_layer():
    seen = []

    def layer(h, scale, *, shift):
        seen.append((scale, shift))
        return h * scale + shift

    out = cggr_fn.route_depth([layer, layer], torch.tensor([2, 0]))(torch.ones(2, 1), 3.0, shift=1.0)
    assert out.tolist() == [[13.0], [13.0]] and seen == [(3.0, 1.0)] * 2
