"""selective_loss against a plain float64 reference, both normalisations."""

import math

import pytest
import torch

import cggr_fn


def reference_loss(logits, targets, mask, normalize, ignore_index=-100, weights=None):
    total, selected, labelled = 0.0, 0, 0
    weights = torch.ones(targets.shape) if weights is None else weights
    rows = logits.double().reshape(-1, logits.shape[-1])
    for row, target, chosen, weight in zip(rows, targets.reshape(-1), mask.reshape(-1), weights.double().reshape(-1)):
        if target == ignore_index:
            continue
        labelled += 1
        if chosen:
            selected += 1
            total += float(weight * (torch.logsumexp(row, 0) - row[target]))
    denominator = selected if normalize == "selected" else labelled
    return total / max(denominator, 1)


@pytest.mark.parametrize("normalize", ["selected", "valid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_selective_loss_matches_reference(normalize, dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=generator).to(dtype)
    targets = torch.randint(0, 10, (3, 6), generator=generator)
    targets[1, :2] = -100
    mask = torch.rand(3, 6, generator=generator) > 0.4
    loss = cggr_fn.selective_loss(logits, targets, mask, normalize=normalize)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(loss) == pytest.approx(reference_loss(logits, targets, mask, normalize), rel=rel)


@pytest.mark.parametrize("normalize", ["selected", "valid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_selective_loss_matches_reference(normalize, dtype):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 10, generator=generator).to(dtype)
    targets = torch.randint(0, 10, (3, 6), generator=generator)
    targets[2, 3:] = -100
    mask = torch.rand(3, 6, generator=generator) > 0.5
    weights = torch.rand(3, 6, generator=generator, dtype=dtype) * 3
    loss = cggr_fn.selective_loss(logits, targets, mask, weights=weights, normalize=normalize)
    assert loss.dtype == dtype
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    assert float(loss) == pytest.approx(reference_loss(logits, targets, mask, normalize, weights=weights), rel=rel)
    unit = cggr_fn.selective_loss(logits, targets, mask, weights=torch.ones(3, 6, dtype=dtype), normalize=normalize)
    assert torch.equal(unit, cggr_fn.selective_loss(logits, targets, mask, normalize=normalize))


def test_weights_of_untrained_tokens_are_never_read():
    logits = torch.randn(4, 5, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 3])
    mask = torch.tensor([True, False, True, True])  # row 1 unselected, row 2 ignored
    bad = torch.tensor([2.0, float("nan"), float("inf"), 0.5], requires_grad=True)
    good = torch.tensor([2.0, 7.0, 7.0, 0.5], requires_grad=True)
    loss_bad, loss_good = (cggr_fn.selective_loss(logits, targets, mask, weights=w) for w in (bad, good))
    assert torch.equal(loss_bad, loss_good) and torch.isfinite(loss_bad)
    (g_logits_bad, g_w_bad), (g_logits_good, g_w_good) = (
        torch.autograd.grad(loss, (logits, w)) for loss, w in ((loss_bad, bad), (loss_good, good))
    )
    assert torch.equal(g_logits_bad, g_logits_good) and torch.equal(g_w_bad, g_w_good)
    assert g_w_bad[1] == 0 and g_w_bad[2] == 0
    # A NaN weight of a trained token is visible.
    assert torch.isnan(cggr_fn.selective_loss(logits, targets, mask, weights=torch.tensor([float("nan"), 1.0, 1.0, 1.0])))


def test_inverse_inclusion_weights_make_the_valid_mean_unbiased():
    """Over every k-subset (each token included with probability k/n), the mean of the
    weighted loss with weights n/k and "valid" normalisation is exactly the dense mean."""
    import itertools

    n, k = 6, 2
    logits = torch.randn(n, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(5))
    weights = torch.full((n,), n / k, dtype=torch.float64)
    losses = []
    for subset in itertools.combinations(range(n), k):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(subset)] = True
        losses.append(cggr_fn.selective_loss(logits, targets, mask, weights=weights, normalize="valid"))
    dense = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(torch.stack(losses).mean(), dense, rtol=1e-12, atol=1e-12)


def test_normalisation_by_valid_keeps_per_token_gradient_independent_of_the_ratio():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 7, generator=generator, requires_grad=True)
    targets = torch.randint(0, 7, (20,), generator=generator)
    scores = torch.rand(20, generator=generator)
    dense = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, targets), logits)[0]
    for ratio in (0.25, 0.5, 1.0):
        mask = cggr_fn.select(scores, ratio=ratio)
        by_valid = torch.autograd.grad(cggr_fn.selective_loss(logits, targets, mask, normalize="valid"), logits)[0]
        by_selected = torch.autograd.grad(cggr_fn.selective_loss(logits, targets, mask), logits)[0]
        torch.testing.assert_close(by_valid[mask], dense[mask])
        torch.testing.assert_close(by_selected[mask], dense[mask] * 20 / int(mask.sum()))
        assert (by_valid[~mask] == 0).all() and (by_selected[~mask] == 0).all()


def test_selective_loss_with_all_tokens_equals_cross_entropy():
    logits = torch.randn(4, 5, 9)
    targets = torch.randint(0, 9, (4, 5))
    targets[0, 0] = -100
    loss = cggr_fn.selective_loss(logits, targets, torch.ones(4, 5, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1)))


def test_empty_selection_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = cggr_fn.selective_loss(logits, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    assert (torch.autograd.grad(loss, logits)[0] == 0).all()


def test_nan_logits_surface_in_the_loss_even_when_not_selected():
    logits = torch.randn(3, 4)
    logits[2, 1] = float("nan")
    loss = cggr_fn.selective_loss(logits, torch.tensor([0, 1, 2]), torch.tensor([True, False, False]))
    assert math.isnan(float(loss))


def test_an_impossible_unselected_target_does_not_poison_the_loss():
    """A -inf logit is a probability-zero class: its nll is +inf, which is not NaN."""
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [1.0, 2.0, 3.0]])
    loss = cggr_fn.selective_loss(logits, torch.tensor([1, 2]), torch.tensor([False, True]))
    assert float(loss) == pytest.approx(float(torch.logsumexp(logits[1], 0) - 3.0))


def test_nan_in_an_ignored_row_makes_the_loss_nan():
    """Its gradient is NaN (logsumexp's backward multiplies a zero upstream
    gradient by NaN), so a finite loss would hide it."""
    logits = torch.tensor([[float("nan"), 0.0], [1.0, 2.0]], requires_grad=True)
    loss = cggr_fn.selective_loss(logits, torch.tensor([-100, 1]), torch.tensor([False, True]))
    assert torch.isnan(loss)


def test_an_unselected_inf_row_makes_the_loss_nan():
    """The issue's repro: the loss was 0.3133 with a NaN gradient."""
    x = torch.tensor([[float("inf"), 0.0], [1.0, 0.0]], requires_grad=True)
    loss = cggr_fn.selective_loss(x, torch.tensor([1, 0]), torch.tensor([False, True]))
    assert torch.isnan(loss)


INF, NAN = float("inf"), float("nan")
# Rows with and without a distribution, each tried selected, unselected and ignored.
SPECIAL_ROWS = [
    [INF, 0.0, 1.0],
    [NAN, 0.0, 1.0],
    [-INF, -INF, -INF],
    [INF, -INF, 0.0],
    [-INF, 2.0, 2.0],  # valid: -inf is a probability-zero class
    [1e30, -1e30, 0.0],  # valid and finite, far apart
]


@pytest.mark.parametrize("normalize", ["selected", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("row", SPECIAL_ROWS, ids=str)
@pytest.mark.parametrize("role", ["selected", "unselected", "ignored"])
@pytest.mark.parametrize("target", [0, 1])
def test_loss_is_never_finite_beside_a_nan_gradient(normalize, dtype, row, role, target):
    logits = torch.tensor([row, [0.5, -1.0, 2.0]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([-100 if role == "ignored" else target, 2])
    mask = torch.tensor([role == "selected", True])
    loss = cggr_fn.selective_loss(logits, targets, mask, normalize=normalize)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isnan(loss) or not torch.isnan(grad).any(), (float(loss), grad)


@pytest.mark.parametrize("row", SPECIAL_ROWS, ids=str)
@pytest.mark.parametrize("target", [0, 1, 3])
def test_the_loss_nll_is_the_token_stats_nll(row, target):
    """One definition: a single selected row's loss is exactly its TokenStats nll."""
    logits = torch.tensor([row])
    targets = torch.tensor([target])
    nll = cggr_fn.token_stats(logits, targets).nll
    loss = cggr_fn.selective_loss(logits, targets, torch.tensor([True]))
    torch.testing.assert_close(loss, nll[0], equal_nan=True, rtol=0, atol=0)


def test_float64_stays_float64():
    """The issue's repro: float32 rounding made this loss 0.0."""
    logits = torch.tensor([[1e8, 1e8 + 1, 1e8 - 1]], dtype=torch.float64, requires_grad=True)
    loss = cggr_fn.selective_loss(logits, torch.tensor([0]), torch.tensor([True]))
    want = torch.nn.functional.cross_entropy(logits.detach() - 1e8, torch.tensor([0]))
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(want.item(), rel=1e-7)  # 1e8 has an ulp of 1.5e-8
    assert loss.item() == pytest.approx(1.4076, abs=1e-4)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, torch.softmax(logits.detach() - 1e8, -1) - torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrower_dtypes_compute_in_float32(dtype):
    logits = torch.randn(3, 5).to(dtype)
    loss = cggr_fn.selective_loss(logits, torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool))
    assert loss.dtype == torch.float32


def test_out_of_range_target_gives_nan_loss():
    loss = cggr_fn.selective_loss(torch.randn(2, 4), torch.tensor([0, 9]), torch.tensor([True, False]))
    assert math.isnan(float(loss))
