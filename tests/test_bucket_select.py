"""Property tests for capacity, bucket and select against plain-Python references."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cggr_fn

INF, NAN = float("inf"), float("nan")

# Scores drawn from a small pool make ties common; NaN and -inf appear too.
score_values = st.sampled_from([0.0, 0.5, 1.0, 2.0, -3.0, 7.25, NAN, -INF]) | st.floats(-10, 10)
score_lists = st.lists(score_values, min_size=1, max_size=64)
ratios = st.floats(0.001, 1.0)


def reference_order(scores):
    """Positions hardest first: NaN as +inf, ties by position (on the float32 values)."""
    key = [INF if math.isnan(s) else s for s in torch.tensor(scores, dtype=torch.float32).tolist()]
    return sorted(range(len(scores)), key=lambda i: (-key[i], i))


@given(ratio=ratios, n=st.integers(0, 10**8))
def test_capacity_is_the_ceiling_up_to_float_rounding(ratio, n):
    k = cggr_fn.capacity(n, ratio=ratio)
    exact = Fraction(ratio) * n  # the float's exact value
    assert (n == 0 and k == 0) or 1 <= k <= n
    if n:
        # k is ceil(ratio * n), or one less when ratio * n exceeds an integer
        # by float64 rounding noise only.
        assert k == max(1, math.ceil(exact)) or (k == math.ceil(exact) - 1 and exact - k < Fraction(1, 10**6))


@pytest.mark.parametrize("decimal", ["0.7", "0.25", "0.3", "0.001", "0.999", "0.123457"])
@pytest.mark.parametrize("n", [10, 1_000_001, 1_048_576, 2_000_002, 16_777_216])
def test_capacity_is_the_exact_ceiling_of_the_decimal_ratio(decimal, n):
    expected = math.ceil(Fraction(decimal) * n)
    assert cggr_fn.capacity(n, ratio=float(decimal)) == expected
    # A tensor ratio gives the same k on-device: float64 at any n, float32 where
    # its 24-bit mantissa can tell k from its neighbours.
    if n <= 2_000_002:
        scores = torch.zeros(n)
        assert int(cggr_fn.select(scores, ratio=torch.tensor(float(decimal), dtype=torch.float64)).sum()) == expected
        if n == 10:
            assert int(cggr_fn.select(scores, ratio=torch.tensor(float(decimal))).sum()) == expected


def test_capacity_ignores_float_rounding():
    assert cggr_fn.capacity(10, ratio=0.3) == 3  # 0.3 * 10 == 3.0000000000000004
    assert cggr_fn.capacity(10, ratio=0.7) == 7
    assert cggr_fn.capacity(10, ratio=0.31) == 4


# ---------------------------------------------------------------- bucket


@settings(max_examples=200)
@given(scores=score_lists, num_buckets=st.integers(1, 6), warmup=st.integers(0, 40), step=st.integers(0, 60))
def test_bucket_matches_reference_and_curriculum(scores, num_buckets, warmup, step):
    n = len(scores)
    buckets = cggr_fn.bucket(torch.tensor(scores), step, num_buckets=num_buckets, warmup_steps=warmup)
    assert buckets.shape == (n,) and buckets.dtype == torch.int64
    assert ((buckets >= 0) & (buckets < num_buckets)).all()
    progress = 1.0 if warmup == 0 else min(step, warmup) / warmup
    # Sizes: the final partition is equal, and the number of tokens in bucket b
    # or shallower grows linearly with progress (rounded down).
    final = [n // num_buckets + (b < n % num_buckets) for b in range(num_buckets)]
    for b in range(1, num_buckets):
        beyond = int((buckets >= b).sum())
        assert beyond == math.floor(sum(final[b:]) * progress + 1e-9)
    # Harder tokens never sit in a shallower bucket than easier ones.
    assigned = [int(buckets[i]) for i in reference_order(scores)]
    assert assigned == sorted(assigned)
    # The tensor step gives the same buckets.
    same = cggr_fn.bucket(torch.tensor(scores), torch.tensor(step), num_buckets=num_buckets, warmup_steps=warmup)
    assert torch.equal(buckets, same)


@given(scores=score_lists, warmup=st.integers(1, 30))
def test_bucket_is_monotone_in_step_and_starts_at_zero(scores, warmup):
    x = torch.tensor(scores)
    history = [cggr_fn.bucket(x, s, num_buckets=4, warmup_steps=warmup) for s in range(warmup + 2)]
    assert (history[0] == 0).all()
    for before, after in zip(history, history[1:]):
        assert (after >= before).all()


@given(scores=score_lists, other=score_lists, step=st.integers(0, 20))
def test_bucket_sizes_do_not_depend_on_the_data(scores, other, step):
    other = (other * (len(scores) // len(other) + 1))[: len(scores)]
    sizes = [torch.bincount(cggr_fn.bucket(torch.tensor(x), step, num_buckets=3, warmup_steps=10), minlength=3) for x in (scores, other)]
    assert torch.equal(sizes[0], sizes[1])
    assert sizes[0].tolist() == cggr_fn.bucket_sizes(len(scores), step, num_buckets=3, warmup_steps=10)


def test_bucket_ties_break_by_position():
    buckets = cggr_fn.bucket(torch.zeros(2, 4), 100, num_buckets=4, warmup_steps=10)
    assert buckets.tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_bucket_sizes_tensor_step_agrees():
    for step in range(12):
        as_int = cggr_fn.bucket_sizes(37, step, num_buckets=4, warmup_steps=10)
        as_tensor = cggr_fn.bucket_sizes(37, torch.tensor(step), num_buckets=4, warmup_steps=10)
        assert as_tensor.tolist() == as_int and sum(as_int) == 37


@pytest.mark.parametrize("num_layers, num_buckets, expected", [(8, 4, [8, 6, 4, 2]), (6, 4, [6, 5, 3, 2]), (3, 4, [3, 3, 2, 1]), (5, 1, [5])])
def test_bucket_depth(num_layers, num_buckets, expected):
    scores = -torch.arange(num_buckets, dtype=torch.float32)  # after warmup: score b is in bucket b
    depth = cggr_fn.bucket_depth(scores, 10, num_layers=num_layers, num_buckets=num_buckets, warmup_steps=10)
    assert depth.tolist() == expected
    assert depth.tolist() == [math.ceil(num_layers * (num_buckets - b) / num_buckets) for b in range(num_buckets)]


# ---------------------------------------------------------------- select


def reference_topk(scores, k):
    allowed = [i for i in reference_order(scores) if scores[i] != -INF]
    return set(allowed[:k])


@settings(max_examples=200)
@given(scores=score_lists, ratio=ratios)
def test_topk_selects_exactly_k_hardest(scores, ratio):
    n = len(scores)
    k = cggr_fn.capacity(n, ratio=ratio)
    mask = cggr_fn.select(torch.tensor(scores), ratio=ratio)
    assert mask.shape == (n,) and mask.dtype == torch.bool
    assert set(torch.where(mask)[0].tolist()) == reference_topk(scores, k)
    assert torch.equal(mask, cggr_fn.select(torch.tensor(scores), ratio=torch.tensor(ratio)))


@settings(max_examples=200)
@given(scores=score_lists, ratio=ratios, strata=st.integers(1, 5), seed=st.integers(0, 2**40))
def test_stratified_totals_k_and_spreads_over_strata(scores, ratio, strata, seed):
    x = torch.tensor(scores)
    n, allowed = len(scores), [i for i in reference_order(scores) if scores[i] != -INF]
    k = cggr_fn.capacity(n, ratio=ratio)
    mask = cggr_fn.select(x, ratio=ratio, strategy="stratified", num_strata=strata, seed=seed)
    chosen = set(torch.where(mask)[0].tolist())
    assert len(chosen) == min(k, len(allowed)) and chosen <= set(allowed)
    # Every stratum that is large enough gets at least its equal share.
    for s in range(strata):
        members = [i for r, i in enumerate(allowed) if r * strata // len(allowed) == s]
        share = k // strata + (s < k % strata)
        if len(members) >= share:
            assert len(chosen & set(members)) >= share
    assert torch.equal(mask, cggr_fn.select(x, ratio=ratio, strategy="stratified", num_strata=strata, seed=torch.tensor(seed)))


def test_stratified_draws_depend_on_seed_not_only_difficulty():
    x = torch.linspace(0, 1, 400)
    masks = [cggr_fn.select(x, ratio=0.25, strategy="stratified", seed=s) for s in range(3)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[0], cggr_fn.select(x, ratio=0.25))  # not plain top-k
    assert torch.equal(masks[0], cggr_fn.select(x, ratio=0.25, strategy="stratified", seed=0))  # pure


@settings(max_examples=200)
@given(
    data=st.data(),
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    minimum=st.integers(0, 3),
)
def test_sequence_aware_keeps_a_minimum_per_sequence(data, rows, cols, minimum):
    scores = data.draw(st.lists(score_values, min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(scores).reshape(rows, cols)
    ratio = data.draw(st.floats(max(1e-3, min(minimum, cols) / cols), 1.0))
    k = cggr_fn.capacity(rows * cols, ratio=ratio)
    mask = cggr_fn.select(x, ratio=ratio, strategy="sequence_aware", min_per_sequence=minimum)
    allowed = x != -INF
    assert int(mask.sum()) == min(k, int(allowed.sum()))
    assert not (mask & ~allowed).any()
    for r in range(rows):
        row_hardest = reference_order(scores[r * cols : (r + 1) * cols])
        wanted = [c for c in row_hardest if scores[r * cols + c] != -INF][:minimum]
        assert all(mask[r, c] for c in wanted)


def test_sequence_aware_rejects_an_impossible_minimum():
    with pytest.raises(ValueError, match="min_per_sequence: 4 sequences x 2 exceed the k=4"):
        cggr_fn.select(torch.randn(4, 8), ratio=0.125, strategy="sequence_aware", min_per_sequence=2)


def test_nan_scores_are_selected_first_and_ignored_never():
    x = torch.tensor([0.3, NAN, 0.9, -INF, NAN, 0.1])
    # Stratified draws at random inside a stratum: with one token per stratum
    # the two hardest strata are the two NaNs.
    for strategy in ("topk", "stratified", "sequence_aware"):
        mask = cggr_fn.select(x, ratio=0.33, strategy=strategy, num_strata=5)
        assert mask.tolist() == [False, True, False, False, True, False], strategy
        assert not cggr_fn.select(x, ratio=1.0, strategy=strategy)[3]


def test_fewer_selectable_than_k_selects_all_selectable():
    x = torch.tensor([-INF, 1.0, -INF, -INF])
    assert cggr_fn.select(x, ratio=1.0).tolist() == [False, True, False, False]


@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware"])
def test_select_handles_empty_inputs(strategy):
    assert cggr_fn.select(torch.zeros(2, 0), ratio=0.5, strategy=strategy).shape == (2, 0)


def test_select_keeps_shape_for_higher_rank_inputs():
    x = torch.randn(2, 3, 5)
    mask = cggr_fn.select(x, ratio=0.5)
    assert mask.shape == x.shape and int(mask.sum()) == 15
