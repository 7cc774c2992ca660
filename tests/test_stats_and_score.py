"""token_stats and score against plain float64 references written here."""

import math

import pytest
import torch

import cggr_fn

INF, NAN = float("inf"), float("nan")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_stats(logits, targets=None, ignore_index=-100):
    """Textbook float64 definitions, one row at a time, for finite rows."""
    rows = logits.double().reshape(-1, logits.shape[-1])
    flat_targets = None if targets is None else targets.reshape(-1)
    out = {k: [] for k in ("entropy", "confidence", "margin", "logsumexp", "nll", "grad_norm")}
    for i, row in enumerate(rows):
        log_p = torch.log_softmax(row, dim=0)
        p = log_p.exp()
        finite = p > 0
        out["entropy"].append(-(p[finite] * log_p[finite]).sum())
        top = p.sort(descending=True).values
        out["confidence"].append(top[0])
        out["margin"].append(top[0] - top[1])
        out["logsumexp"].append(torch.logsumexp(row, 0))
        if flat_targets is None:
            out["nll"].append(torch.tensor(NAN, dtype=torch.float64))
            out["grad_norm"].append(torch.tensor(NAN, dtype=torch.float64))
        elif flat_targets[i] == ignore_index:
            out["nll"].append(torch.tensor(0.0, dtype=torch.float64))
            out["grad_norm"].append(torch.tensor(0.0, dtype=torch.float64))
        else:
            out["nll"].append(-log_p[flat_targets[i]])
            out["grad_norm"].append((p - torch.eye(len(p), dtype=torch.float64)[flat_targets[i]]).norm())
    return {k: torch.stack(v).reshape(logits.shape[:-1]) for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 2), (3, 5, 17), (1, 1000)])
def test_token_stats_matches_float64_reference(dtype, shape):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    targets.view(-1)[0] = -100
    stats = cggr_fn.token_stats(logits, targets)
    expected = reference_stats(logits, targets)  # from the same rounded inputs
    for name, value in stats._asdict().items():
        assert value.dtype == compute_dtype(dtype) and value.shape == shape[:-1], name
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(value.double(), expected[name], atol=TOLERANCE[dtype], rtol=rtol, msg=name)


def test_float64_logits_keep_float64_precision():
    """The issue's repro: in float32 these logits all round to 1e8 and the nll to log(3)."""
    logits = torch.tensor([[1e8, 1e8 + 1, 1e8 - 1]], dtype=torch.float64)
    stats = cggr_fn.token_stats(logits, torch.tensor([0]))
    shifted = logits - 1e8
    assert all(value.dtype == torch.float64 for value in stats)
    torch.testing.assert_close(stats.nll, -torch.log_softmax(shifted, -1)[:, 0], rtol=1e-7, atol=0)
    torch.testing.assert_close(stats.confidence, torch.softmax(shifted, -1).amax(-1), rtol=1e-7, atol=0)
    for method in ("entropy", "confidence", "margin", "loss", "grad_norm", "combined"):
        scores = cggr_fn.score(logits, torch.tensor([0]), method=method)
        assert scores.dtype == torch.float64, method
    torch.testing.assert_close(cggr_fn.score(logits, torch.tensor([0]), method="loss"), stats.nll)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_logits_give_float32(dtype):
    stats = cggr_fn.token_stats(torch.randn(2, 5).to(dtype), torch.tensor([0, 1]))
    assert all(value.dtype == torch.float32 for value in stats)
    assert cggr_fn.score(torch.randn(2, 5).to(dtype)).dtype == torch.float32


def test_each_path_is_deterministic_run_to_run():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    first, second = cggr_fn.token_stats(logits, torch.arange(6)), cggr_fn.token_stats(logits, torch.arange(6))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(cggr_fn.score(logits), cggr_fn.score(logits))


def test_token_stats_without_targets_gives_nan_nll():
    stats = cggr_fn.token_stats(torch.randn(4, 6))
    assert torch.isnan(stats.nll).all()


def test_margin_is_exactly_zero_on_ties():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0], [-1.0, -1.0, -5.0, -1.0], [2.5, 2.5, 2.5, 2.5]])
    assert (cggr_fn.token_stats(logits).margin == 0).all()


def test_special_rows_follow_documented_rules():
    logits = torch.tensor(
        [
            [1.0, NAN, 0.0],  # NaN anywhere: undefined
            [INF, 1.0, 0.0],  # +inf: undefined
            [-INF, -INF, -INF],  # nothing has probability: undefined
            [-INF, 2.0, 2.0],  # -inf is a probability-zero class
            [-INF, 5.0, -INF],  # one certain class
        ]
    )
    targets = torch.tensor([0, 0, -100, 0, 1])
    stats = cggr_fn.token_stats(logits, targets)
    for name in ("entropy", "confidence", "margin", "logsumexp"):
        value = getattr(stats, name)
        assert torch.isnan(value[:3]).all(), name
        assert torch.isfinite(value[3:]).all(), name
    assert torch.isnan(stats.nll[:2]).all() and stats.nll[2] == 0  # ignored stays 0
    torch.testing.assert_close(stats.entropy[3:], torch.tensor([math.log(2), 0.0]))
    torch.testing.assert_close(stats.confidence[3:], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(stats.margin[3:], torch.tensor([0.0, 1.0]))
    assert stats.nll[3] == INF  # target has probability 0
    assert stats.nll[4] == 0


def test_out_of_range_targets_give_nan_without_checking_and_raise_with_it():
    logits = torch.randn(3, 4)
    targets = torch.tensor([1, 4, -2])
    nll = cggr_fn.token_stats(logits, targets).nll
    assert torch.isfinite(nll[0]) and torch.isnan(nll[1:]).all()
    with cggr_fn.checking(), pytest.raises(ValueError, match=r"targets: expected values in \[0, 4\)"):
        cggr_fn.token_stats(logits, targets)


def test_checking_mode_rejects_nan_logits():
    logits = torch.tensor([[0.0, NAN]])
    with cggr_fn.checking(), pytest.raises(ValueError, match="logits: contains NaN"):
        cggr_fn.token_stats(logits)
    cggr_fn.token_stats(logits)  # outside checking mode NaN flows through


def test_token_stats_has_no_gradient():
    logits = torch.randn(2, 5, requires_grad=True)
    stats = cggr_fn.token_stats(logits)
    assert not any(t.requires_grad for t in stats)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("entropy", lambda r: r["entropy"]),
        ("confidence", lambda r: 1 - r["confidence"]),
        ("margin", lambda r: 1 - r["margin"]),
        ("loss", lambda r: r["nll"]),
        ("grad_norm", lambda r: r["grad_norm"]),
        ("combined", lambda r: r["entropy"] - r["confidence"]),
    ],
)
def test_score_methods(method, expected):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 11, generator=generator)
    targets = torch.randint(0, 11, (4, 9), generator=generator)
    targets[0, :3] = -100
    scores = cggr_fn.score(logits, targets, method=method)
    reference = expected(reference_stats(logits, targets))
    labelled = targets != -100
    assert scores.dtype == torch.float32 and not scores.requires_grad
    assert cggr_fn.score(logits.double(), targets, method=method).dtype == torch.float64
    torch.testing.assert_close(scores[labelled].double(), reference[labelled], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(scores[~labelled]).all()


def grad_norm_truth(logits, targets):
    """||softmax - onehot(target)|| in float64, for finite rows and in-range targets."""
    p = torch.softmax(logits.double(), dim=-1)
    return (p - torch.nn.functional.one_hot(targets, logits.shape[-1]).double()).norm(dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_norm_of_confident_tokens_against_float64(dtype):
    """p_t = 1 - 1e-7 and thereabouts: sum p**2 - 2 p_t + 1 would cancel to
    rounding (an error near 3e-4); the reference leaves the target's square out
    of the sum and is as accurate as its nll, within 5e-7 * (1 + |logsumexp|)."""
    generator = torch.Generator().manual_seed(4)
    vocab, rows = 50, []
    for one_minus_p in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9):
        x = torch.randn(8, vocab, generator=generator)
        x[:, 1:] += math.log(one_minus_p) - torch.logsumexp(x[:, 1:], -1, keepdim=True)
        x[:, 0] = 0.0
        rows.append(x + 20 * torch.randn(8, 1, generator=generator))
    logits = torch.cat(rows).to(dtype)
    targets = torch.zeros(len(logits), dtype=torch.long)
    got = cggr_fn.token_stats(logits, targets).grad_norm.double()
    want = grad_norm_truth(logits, targets)
    lse = torch.logsumexp(logits.double(), -1).abs()
    assert ((got - want).abs() <= 5e-7 * (1 + lse)).all(), (got - want).abs().max()
    naive = (torch.softmax(logits.float(), -1).square().sum(-1) - 2 * torch.exp(-got.float()) + 1).clamp(min=0).sqrt()
    assert (naive.double() - want).abs().max() > 1e-5  # what the rows would do to the naive formula


def test_grad_norm_semantics_on_special_rows_and_targets():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform: sqrt(3/4 ** 2 + 3 / 16) = sqrt(3) / 2
            [-INF, 2.0, 2.0, -INF],  # -inf entries are probability-zero classes
            [-INF, 5.0, -INF, -INF],  # target is a -inf class of a one-class row: sqrt(2)
            [3.0, 1.0, 0.0, 2.0],  # ignored: 0
            [3.0, 1.0, 0.0, 2.0],  # out of range: NaN
            [3.0, 1.0, 0.0, 2.0],  # out of range: NaN
            [1.0, NAN, 0.0, 0.0],  # NaN row: NaN
            [INF, 1.0, 0.0, 0.0],  # +inf row: NaN
            [1.0, NAN, 0.0, 0.0],  # NaN row, ignored: 0 like the nll
            [-INF, 7.0, -INF, -INF],  # the target is certain: exactly 0
        ]
    )
    targets = torch.tensor([2, 1, 0, -100, 4, -1, 0, 0, -100, 1])
    for dtype in (torch.float32, torch.float64):
        stats = cggr_fn.token_stats(logits.to(dtype), targets)
        g = stats.grad_norm
        assert g.dtype == dtype
        torch.testing.assert_close(g[:3], torch.tensor([3**0.5 / 2, 0.5**0.5, 2**0.5], dtype=dtype))
        assert g[3] == 0 and g[8] == 0 and g[9] == 0
        assert torch.isnan(g[4:8]).all()
        assert torch.equal(torch.isnan(g), torch.isnan(stats.nll))
    assert torch.isnan(cggr_fn.token_stats(logits).grad_norm).all()  # no targets


def test_grad_norm_keeps_float64():
    """In float32 these logits all round to 1e8 and grad_norm to its uniform value."""
    logits = torch.tensor([[1e8, 1e8 + 1, 1e8 - 1]], dtype=torch.float64)
    got = cggr_fn.token_stats(logits, torch.tensor([1])).grad_norm
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, grad_norm_truth(logits - 1e8, torch.tensor([1])), rtol=1e-7, atol=0)


def test_score_accepts_a_callable_on_token_stats():
    logits = torch.randn(6, 7)
    scores = cggr_fn.score(logits, method=lambda s: s.logsumexp * 2)
    torch.testing.assert_close(scores, torch.logsumexp(logits, -1) * 2)


def test_score_without_targets_never_marks_unselectable():
    assert torch.isfinite(cggr_fn.score(torch.randn(5, 3))).all()


def test_nan_logits_give_nan_score():
    logits = torch.randn(3, 4)
    logits[1, 2] = NAN
    scores = cggr_fn.score(logits)
    assert torch.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_selection_given_the_same_scores_is_identical_on_every_device():
    """Ranking is integer work on a stable sort, so the same scores select and
    bucket the same tokens on any device (on a CPU-only run both sides are the
    CPU; benchmarks/check_token_stats_gpu.py checks CUDA against CPU)."""
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # many ties
    scores[0, :6] = torch.tensor([NAN, INF, -INF, 0.0, -0.0, NAN])
    scores[1, ::7] = -INF
    on_device = scores.to(DEVICE)
    for options in ({"strategy": "topk"}, {"strategy": "stratified", "seed": 5}, {"strategy": "sequence_aware"}):
        want = cggr_fn.select(scores, ratio=0.3, **options)
        assert torch.equal(cggr_fn.select(on_device, ratio=0.3, **options).cpu(), want), options
    for step in (0, 7, 10):
        want = cggr_fn.bucket(scores, step, num_buckets=3, warmup_steps=10)
        assert torch.equal(cggr_fn.bucket(on_device, step, num_buckets=3, warmup_steps=10).cpu(), want)
