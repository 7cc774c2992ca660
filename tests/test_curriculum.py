"""ratio_schedule and dynamic_ratio."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cggr_fn


@given(
    warmup=st.integers(0, 500),
    final=st.floats(0.01, 1.0),
    step=st.integers(0, 1000),
)
def test_ratio_schedule_is_linear_and_clamped(warmup, final, step):
    ratio = cggr_fn.ratio_schedule(step, warmup_steps=warmup, final_ratio=final)
    progress = 1.0 if warmup == 0 else min(step, warmup) / warmup
    assert ratio == pytest.approx(1.0 - (1.0 - final) * progress, abs=1e-12)
    assert final - 1e-12 <= ratio <= 1.0 + 1e-12
    tensor_ratio = cggr_fn.ratio_schedule(torch.tensor(step), warmup_steps=warmup, final_ratio=final)
    # The same float64 operations: exactly the Python value, so both select the same k.
    assert tensor_ratio.dtype == torch.float64 and tensor_ratio.dim() == 0
    assert float(tensor_ratio) == ratio


def test_ratio_schedule_is_monotone():
    ratios = [cggr_fn.ratio_schedule(s, warmup_steps=37, final_ratio=0.25) for s in range(50)]
    assert ratios[0] == 1.0 and ratios[-1] == 0.25
    assert all(a >= b for a, b in zip(ratios, ratios[1:]))


def test_dynamic_ratio_moves_both_ways_within_bounds():
    low = cggr_fn.dynamic_ratio(0.5, torch.full((10,), 0.95), sensitivity=0.5)
    high = cggr_fn.dynamic_ratio(0.5, torch.full((10,), 0.05), sensitivity=0.5)
    neutral = cggr_fn.dynamic_ratio(0.5, torch.full((10,), 0.5))
    assert float(low) == pytest.approx(0.275) and float(high) == pytest.approx(0.725)
    assert float(neutral) == pytest.approx(0.5)
    clamped = cggr_fn.dynamic_ratio(0.2, torch.ones(4), sensitivity=5.0, min_ratio=0.15)
    assert float(clamped) == pytest.approx(0.15)
    assert float(cggr_fn.dynamic_ratio(0.9, torch.zeros(4), sensitivity=5.0)) == 1.0


def test_dynamic_ratio_averages_only_valid_tokens_and_maps_nan_to_max():
    confidence = torch.tensor([0.9, 0.9, float("nan"), 0.0])
    valid = torch.tensor([True, True, False, False])
    assert float(cggr_fn.dynamic_ratio(0.5, confidence, valid=valid)) == pytest.approx(0.3)
    assert float(cggr_fn.dynamic_ratio(0.5, confidence, max_ratio=0.8)) == pytest.approx(0.8)


def test_dynamic_ratio_accepts_a_tensor_ratio_from_the_schedule():
    ratio = cggr_fn.ratio_schedule(torch.tensor(10), warmup_steps=20, final_ratio=0.5)
    assert float(cggr_fn.dynamic_ratio(ratio, torch.full((3,), 0.5))) == pytest.approx(0.75)
