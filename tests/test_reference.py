"""Reference-relative selection: ``excess``, ``trim`` and the ``ema`` parameter average."""

from __future__ import annotations

import pytest
import torch

import cggr_fn

INF = float("inf")


def test_excess_is_the_difference_where_both_are_selectable():
    scores = torch.tensor([3.0, 2.0, -INF, 1.0, INF, INF, float("nan")])
    reference = torch.tensor([1.0, 2.5, 0.0, -INF, 1.0, INF, 0.0])
    got = cggr_fn.excess(scores, reference)
    expected = torch.tensor([2.0, -0.5, -INF, -INF, INF, float("nan"), float("nan")])
    torch.testing.assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("dtypes, expected", [
    ((torch.bfloat16, torch.bfloat16), torch.float32),
    ((torch.bfloat16, torch.float64), torch.float64),
    ((torch.float32, torch.float16), torch.float32),
])
def test_excess_dtype_and_no_gradient(dtypes, expected):
    scores = torch.randn(4, 5, dtype=dtypes[0], requires_grad=True)
    got = cggr_fn.excess(scores, torch.randn(4, 5, dtype=dtypes[1]))
    assert got.dtype == expected and not got.requires_grad


def test_excess_selection_prefers_learnable_over_noisy_tokens():
    """Noise is hard for both models; the learnable token is hard only for the model."""
    nll = torch.tensor([6.0, 3.0, 0.5])  # noise, learnable, already learnt
    reference = torch.tensor([6.2, 0.4, 0.3])
    assert cggr_fn.select(nll, ratio=1 / 3).tolist() == [True, False, False]
    assert cggr_fn.select(cggr_fn.excess(nll, reference), ratio=1 / 3).tolist() == [False, True, False]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.99, 1.0])
def test_trim_drops_floor_fraction_of_the_selectable_hardest(fraction):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 40, generator=g)
    scores[scores < -1.0] = -INF
    got = cggr_fn.trim(scores, fraction)
    m = int((scores != -INF).sum())
    count = int(fraction * m)
    dropped = (got == -INF) & (scores != -INF)
    assert int(dropped.sum()) == count
    if 0 < count < m:
        # Every dropped score is at least every kept one.
        assert scores[dropped].min() >= got[got != -INF].max()
    assert torch.equal(got[~dropped], scores[~dropped])


def test_trim_ranks_like_select():
    """NaN is hardest, ties go to the earlier position, as in select."""
    scores = torch.tensor([1.0, 5.0, float("nan"), 5.0, 2.0, -INF])
    got = cggr_fn.trim(scores, 0.4)  # floor(0.4 * 5) = 2: the NaN and the first 5.0
    assert torch.equal(torch.isneginf(got), torch.tensor([False, True, True, False, False, True]))
    band = cggr_fn.select(got, ratio=2 / 6)
    assert band.tolist() == [False, False, False, True, True, False]


def test_trim_compiles_without_a_sync():
    from cggr_fn import testing

    testing.assert_compiles(lambda s: cggr_fn.trim(s, 0.3), torch.randn(5, 7))


def test_ema_averages_and_init_copies():
    params = {"w": torch.zeros(3), "nested": [torch.ones(2, dtype=torch.bfloat16)]}
    average = cggr_fn.ema(0.25)
    state = average.init(params)
    params["w"].add_(100.0)  # the state is a copy, not a view of the parameters
    assert torch.equal(state.average["w"], torch.zeros(3))
    for _ in range(3):
        state = average.update(state, {"w": torch.full((3,), 4.0), "nested": [torch.zeros(2)]})
    # 4 * (1 - 0.75 ** 3) and 0.75 ** 3; the average keeps its dtype.
    torch.testing.assert_close(state.average["w"], torch.full((3,), 4.0 * (1 - 0.75**3)))
    assert state.average["nested"][0].dtype == torch.bfloat16
    torch.testing.assert_close(state.average["nested"][0].float(), torch.full((2,), 0.75**3), atol=1e-2, rtol=0)


def test_ema_reference_scores_through_functional_call():
    """The averaged parameters evaluate the model: a reference without a second model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    average = cggr_fn.ema(0.5)
    state = average.init(params)
    moved = {k: v + 1.0 for k, v in params.items()}
    state = average.update(state, moved)
    x, targets = torch.randn(5, 4), torch.randint(0, 6, (5,))
    now = cggr_fn.score(torch.func.functional_call(model, moved, (x,)), targets, method="loss")
    past = cggr_fn.score(torch.func.functional_call(model, state.average, (x,)), targets, method="loss")
    halfway = {k: v + 0.5 for k, v in params.items()}
    torch.testing.assert_close(past, cggr_fn.score(torch.func.functional_call(model, halfway, (x,)), targets, method="loss"))
    assert cggr_fn.excess(now, past).shape == (5,)


def test_ema_update_compiles_fullgraph():
    average = cggr_fn.ema(0.1)
    state = average.init({"w": torch.randn(4, 4)})
    compiled = torch.compile(average.update, fullgraph=True, backend="aot_eager")
    new = {"w": torch.randn(4, 4)}
    torch.testing.assert_close(compiled(state, new).average["w"], average.update(state, new).average["w"])
