"""The fused token-statistics kernel against the PyTorch reference.

On a CPU-only machine the kernel runs under ``TRITON_INTERPRET=1`` (set by the
root ``conftest.py`` before the library is imported), so shapes stay tiny; on a
GPU machine the same tests run on CUDA.
Real sizes, the > 2**31-element case and CUDA graphs are checked on a GPU by
``benchmarks/check_token_stats_gpu.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from cggr_fn._stats import token_stats_reference
from cggr_fn.kernels import fused_token_stats, token_stats_op
from cggr_fn.kernels import token_stats as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("entropy", "confidence", "margin", "logsumexp", "nll", "grad_norm")
INF = float("inf")
NAN = float("nan")

# The interpreter evaluates kernels with numpy, which warns on the NaN and
# division-by-zero arithmetic that non-finite rows exercise on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def assert_same_stats(got, want, *, atol=2e-5, rtol=2e-5):
    """Both paths compute in fp32 from the same upcast inputs, so they agree to
    fp32 rounding whatever the input dtype; NaNs must sit in the same places."""
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32, name
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def run_launch(logits, targets, ignore_index, config):
    outputs = tuple(torch.full((logits.shape[0],), -7.0, device=logits.device) for _ in range(6))
    kernel.launch(logits, targets, ignore_index, outputs, config)
    return outputs


def make_targets(n, vocab, generator=None):
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return targets.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [2, 3, 17, 130, 1001])
def test_matches_reference(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (4 * torch.randn(5, vocab, generator=gen)).to(dtype).to(DEVICE)
    targets = make_targets(5, vocab, gen)
    assert_same_stats(fused_token_stats(logits, targets, -100), token_stats_reference(logits, targets, -100))


# (num_warps, k, lanes, vec): blocks of 4, 8 and 16 elements, so test rows span
# many blocks and lanes; each with and without prefetching.
SMALL_CONFIGS = [
    kernel.LaunchConfig(1, 1, 2, 2),
    kernel.LaunchConfig(1, 2, 2, 2, prefetch=True),
    kernel.LaunchConfig(1, 2, 2, 4),
    kernel.LaunchConfig(1, 1, 4, 4, prefetch=True),
]


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
@pytest.mark.parametrize("vocab", [3, 37])
def test_configs_and_multi_block_rows(config, vocab):
    gen = torch.Generator().manual_seed(config.block + vocab)
    logits = (3 * torch.randn(4, vocab, generator=gen)).to(DEVICE)
    logits[1] += 50.0  # a large common offset: shifted sums must stay stable
    logits[2, -1] = 30.0  # the maximum arrives in the last (partial) block
    targets = make_targets(4, vocab, gen)
    got = run_launch(logits, targets, -100, config)
    assert_same_stats(got, token_stats_reference(logits, targets, -100))


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_give_exact_zero_margin(prefetch, dtype):
    config = kernel.LaunchConfig(1, 2, 2, 2, prefetch)
    vocab, block = 40, config.block
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(1)).clamp(-3, 3)
    logits[0, 2] = logits[0, 5] = 9.0  # both maxima in one block, different lanes
    logits[0, 1] = -INF  # a -inf in the same block
    logits[1, 2] = logits[1, 33] = 9.0  # maxima in different blocks
    logits[2, 3] = logits[2, 3 + block] = logits[2, 3 + 2 * block] = 9.0  # three, same slot
    logits[3, 7] = 9.0  # unique maximum, second in the same slot of another block
    logits[3, 7 + block] = 8.5
    logits[4, :] = 1.0  # all equal
    logits = logits.to(dtype).to(DEVICE)
    got = run_launch(logits, None, -100, config)
    margin = got[2].cpu()
    assert torch.equal(margin[[0, 1, 2, 4]], torch.zeros(4))
    assert margin[3] > 0
    assert_same_stats(got, token_stats_reference(logits, None, -100))


def test_bf16_ties_match_reference_exactly_on_margin():
    # bf16 logits tie often; the margin must be exactly 0 wherever the
    # reference's is (the seed kernel's top-2 missed ties inside one block).
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 300, generator=gen).to(torch.bfloat16).to(DEVICE)
    got = fused_token_stats(logits, None, -100)
    want = token_stats_reference(logits, None, -100)
    assert torch.equal(got[2] == 0, want[2] == 0)
    assert_same_stats(got, want)


@pytest.fixture
def launched_rows(monkeypatch):
    """The logits views that reach the kernel launcher, in order."""
    seen = []
    real_launch = kernel.launch

    def spy(rows, *args, **kwargs):
        seen.append(rows)
        return real_launch(rows, *args, **kwargs)

    monkeypatch.setattr(kernel, "launch", spy)
    return seen


def test_non_contiguous_rows_are_read_in_place(launched_rows):
    big = torch.randn(6, 50, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    view = big[1:, 3:40]  # row stride 50, last-dim stride 1
    targets = make_targets(5, 37)
    got = fused_token_stats(view, targets, -100)
    assert launched_rows[0].data_ptr() == view.data_ptr() and launched_rows[0].stride()[-2:] == (50, 1)
    assert_same_stats(got, token_stats_reference(view, targets, -100))


def test_batched_slice_and_transposed_inputs():
    base = torch.randn(2, 3, 29, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    sliced = base[..., :21]  # (2, 3, 21) rows with one row stride
    assert_same_stats(fused_token_stats(sliced, None, -100), token_stats_reference(sliced, None, -100))
    transposed = base.transpose(-1, -2)  # vocab stride != 1: copied
    assert_same_stats(fused_token_stats(transposed, None, -100), token_stats_reference(transposed, None, -100))
    deep = torch.randn(2, 3, 4, 17, generator=torch.Generator().manual_seed(6)).to(DEVICE)[:, :, 1:]
    assert_same_stats(fused_token_stats(deep, None, -100), token_stats_reference(deep, None, -100))


@pytest.mark.parametrize("index", [(slice(None), slice(None, -1)), (slice(None), slice(None, None, 2)), (slice(1, None), slice(2, None))], ids=str)
def test_batch_seq_views_are_read_in_place(launched_rows, index):
    """(batch, seq, vocab) views whose (batch, seq) strides do not collapse, like
    the shifted logits[:, :-1] of a causal LM, reach the kernel without a copy."""
    base = torch.randn(3, 7, 29, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    view = base[index]
    targets = torch.randint(0, 29, base.shape[:-1], generator=torch.Generator().manual_seed(1)).to(DEVICE)[index]
    got = fused_token_stats(view, targets, -100)
    assert launched_rows[0].data_ptr() == view.data_ptr() and launched_rows[0].stride() == view.stride()
    assert_same_stats(got, token_stats_reference(view, targets, -100))


def test_leading_shapes():
    gen = torch.Generator().manual_seed(6)
    one = torch.randn(9, generator=gen).to(DEVICE)
    got = fused_token_stats(one, torch.tensor(4, device=DEVICE), -100)
    assert all(t.shape == () for t in got)
    assert_same_stats(got, token_stats_reference(one, torch.tensor(4, device=DEVICE), -100))
    empty = torch.randn(0, 3, 9).to(DEVICE)
    got = fused_token_stats(empty, None, -100)
    assert all(t.shape == (0, 3) for t in got)


@pytest.mark.parametrize("ignore_index", [-100, 0, 7, 1000])
def test_targets_ignore_and_out_of_range(ignore_index):
    vocab = 7
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    targets = torch.tensor([0, 6, -100, 7, -1, 1000, 3, 0], device=DEVICE)
    got = fused_token_stats(logits, targets, ignore_index)
    want = token_stats_reference(logits, targets, ignore_index)
    assert_same_stats(got, want)
    nll, grad_norm = got[4].cpu(), got[5].cpu()
    for i, t in enumerate(targets.tolist()):
        if t == ignore_index:
            assert nll[i] == 0.0 and grad_norm[i] == 0.0
        elif not 0 <= t < vocab:
            assert torch.isnan(nll[i]) and torch.isnan(grad_norm[i])
        else:
            assert 0 < grad_norm[i] < 2**0.5
    # int32 targets and a strided targets view give the same answer.
    assert_same_stats(fused_token_stats(logits, targets.int(), ignore_index), want)
    wide = torch.stack([targets, targets], dim=1)
    assert_same_stats(fused_token_stats(logits, wide[:, 1], ignore_index), want)


def test_without_targets_nll_and_grad_norm_are_nan():
    logits = torch.randn(3, 5).to(DEVICE)
    got = fused_token_stats(logits, None, -100)
    assert torch.isnan(got[4]).all() and torch.isnan(got[5]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", SMALL_CONFIGS[:2], ids=str)
def test_non_finite_rows(dtype, config):
    vocab = 12
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(8))
    logits[0, 10] = NAN  # NaN in the last block
    logits[1, 1] = INF
    logits[2, :] = -INF  # no distribution
    logits[3, :] = -INF
    logits[3, 9] = 2.0  # one finite class: entropy 0, confidence 1, margin 1
    logits[4, ::2] = -INF  # -inf entries are probability-zero classes
    logits[5, :8] = -INF  # whole leading blocks of -inf, lanes that stay empty for a while
    logits[6, 0] = INF
    logits[6, 1] = NAN
    logits[7, :] = NAN
    logits[8, 4:] = -INF
    logits[8, 0] = -200.0  # very negative maximum after -inf: no overflow in rescaling
    logits = logits.to(dtype).to(DEVICE)
    targets = torch.tensor([0, 1, 2, 9, 0, 9, -100, 3, 0], device=DEVICE)
    got = run_launch(logits.reshape(-1, vocab), targets, -100, config)
    want = token_stats_reference(logits, targets, -100)
    assert_same_stats(got, want)
    for stat in got[:4]:
        assert torch.isnan(stat[[0, 1, 2, 6, 7]].cpu()).all()
    assert torch.isnan(got[5][[0, 1, 2, 7]].cpu()).all()
    assert got[4][6].item() == 0.0 and got[5][6].item() == 0.0  # ignored, even on a NaN row
    assert got[0][3].item() == 0.0 and got[1][3].item() == 1.0 and got[2][3].item() == 1.0
    assert got[5][3].item() == 0.0  # the one finite class is the target: p = onehot
    assert got[4][4].item() == INF  # target is a -inf class
    p = torch.softmax(logits[4].float().cpu(), dim=0)
    torch.testing.assert_close(got[5][4].cpu(), (1 + p.square().sum()).sqrt())  # ||p - e_t|| with p_t = 0


@pytest.mark.parametrize(
    "dtype, big", [(torch.float16, 60000.0), (torch.bfloat16, 1e30), (torch.bfloat16, 3e38), (torch.float32, 3e38)], ids=str
)
def test_large_magnitude_rows_stay_in_range(dtype, big):
    logits = torch.full((3, 50), -big)
    logits[torch.arange(3), torch.tensor([5, 0, 49])] = big
    logits = logits.to(dtype).to(DEVICE)
    got = fused_token_stats(logits, None, -100)
    assert (got[1] == 1).all() and (got[0] == 0).all() and (got[2] == 1).all()
    assert_same_stats(got, token_stats_reference(logits, None, -100))


def grad_norm_truth(logits, targets):
    """||softmax - onehot(target)|| in float64 from the (rounded) logits, written out."""
    p = torch.softmax(logits.double(), dim=-1)
    onehot = torch.nn.functional.one_hot(targets.long(), logits.shape[-1]).double()
    return (p - onehot).norm(dim=-1)


def peaked_rows(n, vocab, one_minus_p, gen):
    """Rows whose target (column 3, or the last column) holds all but ``one_minus_p`` of the mass."""
    x = torch.randn(n, vocab, generator=gen)
    targets = torch.full((n,), 3)
    targets[1::2] = vocab - 1  # the target in the last, partial block
    others = torch.ones(n, vocab, dtype=torch.bool)
    others[torch.arange(n), targets] = False
    x[others] += math.log(one_minus_p) - torch.logsumexp(x.masked_fill(~others, -INF), -1).repeat_interleave(vocab - 1)
    x[~others] = 0.0
    return x + 10 * torch.randn(n, 1, generator=gen), targets  # and an offset per row


# Inputs are the rounded 16-bit values themselves, so every dtype meets the same
# float32 arithmetic: the error is the nll's, a few ulps of the logsumexp.
GRAD_NORM_ATOL = {torch.float32: 5e-7, torch.bfloat16: 5e-7, torch.float16: 5e-7}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=str)
def test_grad_norm_matches_float64_truth(dtype, config):
    """Against float64 on the same inputs, confident tokens included: a sum of
    squares from which the target's ~1 is subtracted keeps only rounding
    (1e-7 where the answer is 1e-14, a grad_norm off by 3e-4); the kernel
    leaves the target out of the sum instead."""
    vocab = 37
    gen = torch.Generator().manual_seed(config.block)
    rows = [peaked_rows(4, vocab, eps, gen) for eps in (1e-2, 1e-4, 1e-5, 1e-7)]
    random = 4 * torch.randn(8, vocab, generator=gen)
    rows.append((random, torch.randint(0, vocab, (8,), generator=gen)))
    rows.append((random, random.argmax(-1)))
    rows.append((torch.zeros(2, vocab), torch.tensor([0, vocab - 1])))  # uniform
    # A confident target in every column: in the first, a middle, the last full
    # and the partial block (the kernel masks the target's block apart).
    every = torch.randn(vocab, vocab, generator=gen) - 18.0
    every.fill_diagonal_(0.0)
    rows.append((every, torch.arange(vocab)))
    logits = torch.cat([r for r, _ in rows]).to(dtype)
    targets = torch.cat([t for _, t in rows])
    got = run_launch(logits.to(DEVICE), targets.to(DEVICE), -100, config)[5].cpu().double()
    want = grad_norm_truth(logits, targets)
    lse = torch.logsumexp(logits.double(), -1).abs()
    excess = (got - want).abs() / (1 + lse)
    assert (excess <= GRAD_NORM_ATOL[dtype]).all(), f"worst error {excess.max().item():.2e} * (1 + |logsumexp|)"


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 11, generator=gen).to(DEVICE)
    targets = torch.randint(0, 11, (2, 3), generator=gen).to(DEVICE)
    torch.library.opcheck(token_stats_op, (logits, targets, -100))
    torch.library.opcheck(token_stats_op, (logits.bfloat16(), targets.int(), 0))
    # Without targets nll and grad_norm are NaN, which opcheck's output comparison cannot match.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(token_stats_op, (logits.half(), None, -100), test_utils=checks)


def test_compile_fullgraph():
    def score(logits, targets):
        entropy, confidence, margin, lse, nll, grad_norm = fused_token_stats(logits, targets, -100)
        return entropy + margin, nll.sum(), grad_norm

    # aot_eager traces the op through fake tensors and AOTAutograd like
    # Inductor does, without a minute of CPU code generation; the GPU check
    # script compiles with Inductor.
    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")
    logits = torch.randn(4, 19).to(DEVICE)
    targets = make_targets(4, 19)
    got, want = compiled(logits, targets), score(logits, targets)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_vmap():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(3, 4, 13, generator=gen).to(DEVICE)
    targets = torch.randint(0, 13, (3, 4), generator=gen).to(DEVICE)
    want = fused_token_stats(logits, targets, -100)
    assert_same_stats(torch.func.vmap(lambda x, t: fused_token_stats(x, t, -100))(logits, targets), want)
    # Batch dim in the middle, targets unbatched, logits unbatched.
    moved = logits.movedim(0, 1).contiguous()
    got = torch.func.vmap(lambda x: fused_token_stats(x, targets[0], -100), in_dims=1)(moved)
    assert_same_stats(got, fused_token_stats(logits, targets[0].expand(3, 4), -100))
    got = torch.func.vmap(lambda t: fused_token_stats(logits[0], t, -100))(targets)
    assert_same_stats(got, fused_token_stats(logits[0].expand(3, 4, 13), targets, -100))


def test_stats_are_constants_under_func_transforms():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    weight = torch.randn(9).to(DEVICE)

    def loss(w, stats_fn):
        z = logits * w
        entropy = stats_fn(z)[0]
        return (entropy * z.sum(-1)).sum()

    grad = torch.func.grad(loss)(weight, lambda z: fused_token_stats(z, None, -100))
    want = torch.func.grad(loss)(weight, lambda z: token_stats_reference(z, None, -100))
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)

    _, vjp_fn = torch.func.vjp(lambda w: fused_token_stats(logits * w, None, -100)[0], weight)
    assert torch.equal(vjp_fn(torch.ones(4, device=DEVICE))[0], torch.zeros(9, device=DEVICE))

    primal, tangent = torch.func.jvp(
        lambda w: fused_token_stats(logits * w, None, -100)[0], (weight,), (torch.ones_like(weight),)
    )
    assert_same_stats((primal,), (token_stats_reference(logits * weight, None, -100)[0],))
    assert torch.equal(tangent, torch.zeros_like(tangent))

    requires_grad = logits.clone().requires_grad_()
    assert not any(t.requires_grad for t in fused_token_stats(requires_grad, None, -100))


def test_config_depends_only_on_vocab_and_dtype():
    for vocab in [2, 1000, 32000, 262144]:
        for dtype in DTYPES:
            config = kernel.choose_config(vocab, dtype)
            assert config.block & (config.block - 1) == 0
            assert config == kernel.choose_config(vocab, dtype)


def test_float64_is_refused_not_rounded():
    with pytest.raises(TypeError, match=r"logits: the fused kernel computes in float32 .* got torch.float64"):
        fused_token_stats(torch.randn(2, 5, dtype=torch.float64).to(DEVICE), None, -100)


def within_documented_tolerance(got, want):
    """The agreement that TokenStats documents between the kernel and the reference."""
    lse = want[3].abs()
    bounds = (4e-6, 4e-6, 4e-6, 4e-6 + 5e-7 * lse, 4e-6 + 5e-7 * lse, 4e-6 + 5e-7 * lse)
    for name, g, w, bound in zip(NAMES, got, want, bounds):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name
        finite = torch.isfinite(w)
        assert torch.equal(g[~finite & ~torch.isnan(w)], w[~finite & ~torch.isnan(w)]), name
        diff = (g.double() - w.double()).abs()
        excess = (diff - torch.as_tensor(bound, dtype=torch.float64))[finite]
        assert (excess <= 0).all(), f"{name}: worst difference {diff[finite].max().item():.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernel_and_reference_agree_within_the_documented_tolerance(dtype):
    gen = torch.Generator().manual_seed(12)
    row = 3 * torch.randn(300, generator=gen)
    permuted = torch.stack([row[torch.randperm(300, generator=gen)] for _ in range(8)])  # the case
    peaked = 20 * torch.randn(4, 300, generator=gen)
    offset = 2 * torch.randn(4, 300, generator=gen) + 100.0
    logits = torch.cat([permuted, peaked, offset]).to(dtype).to(DEVICE)
    targets = torch.randint(0, 300, (16,), generator=gen).to(DEVICE)
    got, want = fused_token_stats(logits, targets, -100), token_stats_reference(logits, targets, -100)
    within_documented_tolerance(got, want)


def test_each_path_is_deterministic_and_near_ties_are_the_only_selection_differences():
    """Permuted rows hold the same values, but each path sums them in another
    order: scores differ in the last bits (on the reference too), so selection
    across paths may differ, but only among scores within the tolerance."""
    gen = torch.Generator().manual_seed(13)
    row = 3 * torch.randn(300, generator=gen)
    logits = torch.stack([row[torch.randperm(300, generator=gen)] for _ in range(16)]).to(DEVICE)
    kernel_stats = fused_token_stats(logits, None, -100)
    assert all(torch.equal(a, b) for a, b in zip(kernel_stats[:4], fused_token_stats(logits, None, -100)[:4]))
    reference_stats = token_stats_reference(logits, None, -100)
    kernel_scores = kernel_stats[0] - kernel_stats[1]
    reference_scores = reference_stats[0] - reference_stats[1]
    tolerance = 8e-6  # entropy and confidence each within 4e-6
    assert ((kernel_scores - reference_scores).abs() <= tolerance).all()
    import cggr_fn

    differ = cggr_fn.select(kernel_scores, ratio=0.5) != cggr_fn.select(reference_scores, ratio=0.5)
    kth = reference_scores.sort(descending=True).values[7]
    assert ((reference_scores[differ] - kth).abs() <= 2 * tolerance).all()
