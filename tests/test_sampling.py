"""priority_sample: exactly k tokens, unbiased weights, the library's NaN / -inf conventions."""

import pytest
import torch

import cggr_fn
from cggr_fn._ranking import capacity

INF = float("inf")


def _problem(n, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=generator, dtype=dtype) * 3
    return values, values + 0.1 * torch.rand(n, generator=generator, dtype=dtype)


@pytest.mark.parametrize("n, ratio, uniform_mix", [(12, 0.25, 0.0), (20, 0.1, 0.0), (16, 0.5, 0.2)])
def test_weighted_sum_is_an_unbiased_estimate(n, ratio, uniform_mix):
    """Over many seeds the mean estimate is within 4 standard errors of the true sum
    (the draws are a deterministic hash, so this test cannot flake)."""
    values, importance = _problem(n, n)
    estimates = torch.stack([
        (cggr_fn.priority_sample(importance, ratio=ratio, seed=seed, uniform_mix=uniform_mix).weights * values).sum()
        for seed in range(3000)
    ])
    standard_error = estimates.std() / len(estimates) ** 0.5
    assert abs(float(estimates.mean() - values.sum())) < 4 * float(standard_error)
    # Importance sampling pays: proportional importance gives a smaller variance than uniform.
    uniform = torch.stack([
        (cggr_fn.priority_sample(torch.ones(n, dtype=torch.float64), ratio=ratio, seed=seed).weights * values).sum()
        for seed in range(3000)
    ])
    if uniform_mix == 0.0:
        assert float(estimates.var()) < float(uniform.var())


def test_exactly_k_and_weights_at_least_one():
    _, importance = _problem(50, 1, torch.float32)
    for seed in range(20):
        sample = cggr_fn.priority_sample(importance, ratio=0.3, seed=seed)
        assert int(sample.mask.sum()) == capacity(50, ratio=0.3)
        assert sample.weights.dtype == torch.float32
        assert bool((sample.weights[sample.mask] >= 1).all()) and bool((sample.weights[~sample.mask] == 0).all())


def test_the_loss_with_sample_weights_estimates_the_dense_mean():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 8, 11, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 11, (3, 8), generator=generator)
    targets[0, :3] = -100
    importance = cggr_fn.score(logits, targets, method="grad_norm")  # ignored positions: -inf
    losses = []
    for seed in range(2000):
        sample = cggr_fn.priority_sample(importance, ratio=0.25, seed=seed)
        assert not bool((sample.mask & (targets == -100)).any())
        losses.append(cggr_fn.selective_loss(logits, targets, sample.mask, weights=sample.weights, normalize="valid"))
    losses = torch.stack(losses)
    dense = cggr_fn.selective_loss(logits, targets, targets != -100)
    assert abs(float(losses.mean() - dense)) < 4 * float(losses.std() / len(losses) ** 0.5)


def test_everything_kept_weighs_one_and_zero_importance_fills_last():
    importance = torch.tensor([0.0, 2.0, 0.0, 1.0, -INF])
    full = cggr_fn.priority_sample(importance, ratio=1.0)
    assert full.mask.tolist() == [True, True, True, True, False]
    assert full.weights.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    half = cggr_fn.priority_sample(importance, ratio=0.4)  # k = 2: the two positive ones, with certainty
    assert half.mask.tolist() == [False, True, False, True, False]
    assert half.weights.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]


def test_nan_importance_is_sampled_and_shows_as_a_nan_weight():
    sample = cggr_fn.priority_sample(torch.tensor([1.0, float("nan"), 2.0]), ratio=0.34)
    assert bool(sample.mask[1]) and torch.isnan(sample.weights[1])


def test_same_seed_same_sample_and_tensor_ratio_and_seed_agree():
    _, importance = _problem(40, 3)
    a = cggr_fn.priority_sample(importance, ratio=0.25, seed=7)
    b = cggr_fn.priority_sample(importance, ratio=torch.tensor(0.25, dtype=torch.float64), seed=torch.tensor(7))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.mask, cggr_fn.priority_sample(importance, ratio=0.25, seed=8).mask)


def test_bad_input():
    with pytest.raises(TypeError, match="importance: expected a floating-point tensor"):
        cggr_fn.priority_sample(torch.tensor([1, 2]), ratio=0.5)
    with pytest.raises(ValueError, match=r"uniform_mix: expected a value in \[0, 1\]"):
        cggr_fn.priority_sample(torch.ones(4), ratio=0.5, uniform_mix=1.5)
    with pytest.raises(TypeError, match="seed: expected an int"):
        cggr_fn.priority_sample(torch.ones(4), ratio=0.5, seed=0.5)
    with pytest.raises(ValueError, match=r"ratio: expected a value in \(0, 1\]"):
        cggr_fn.priority_sample(torch.ones(4), ratio=0.0)
    with cggr_fn.checking(), pytest.raises(ValueError, match="importance: expected values >= 0"):
        cggr_fn.priority_sample(torch.tensor([1.0, -0.5]), ratio=0.5)


def test_position_hash_is_the_64_bit_formula_with_constants_that_fit_32_bit_indexing() -> None:
    """The hash equals its plain int64 definition for any offset and seed, though every constant it
    multiplies or adds to positions is taken into the signed 32-bit range (CUDA index arithmetic)."""
    from cggr_fn._selection import _position_hash

    def definition(n: int, seed: int, offset: int) -> torch.Tensor:
        h = (torch.arange(offset, offset + n, dtype=torch.int64) * 0x9E3779B1 + (seed & 0xFFFFFFFF) * 0x7FEB352D)
        h = h & 0xFFFFFFFF
        for multiplier, shift in ((0x2C1B3C6D, 16), (0x297A2D39, 15), (0x5BD1E995, 13)):
            h = ((h ^ (h >> shift)) * multiplier) & 0xFFFFFFFF
        return h ^ (h >> 16)

    for offset in (0, 3, 3 * 16384, 2**31 - 100, 2**40 + 7):
        for seed in (0, 7, 2**33 + 5):
            want = definition(500, seed, offset)
            assert torch.equal(_position_hash(500, seed, torch.device("cpu"), offset), want)
            assert torch.equal(_position_hash(500, torch.tensor(seed), torch.device("cpu"), offset), want)
