"""The fused LM head against the unfused functions on materialised logits.

``fused_linear_token_stats`` against ``token_stats(hidden @ W.T + b)``,
``fused_selective_loss`` against ``selective_loss(hidden @ W.T + b, ...)``
(values and gradients with respect to hidden, weight, bias and weights), and
``fused_head_loss`` against the composition it fuses. On a CPU-only machine the
kernel path runs under ``TRITON_INTERPRET=1`` (set by the root ``conftest.py``),
so shapes stay tiny; real sizes are checked on a GPU by
``benchmarks/check_fused_head_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cggr_fn
from cggr_fn import _head, testing
from cggr_fn._stats import token_stats_reference
from cggr_fn.kernels import head as grad_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
INF = float("inf")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# Loss and gradient tolerances against the unfused path on the same inputs.
# float64 and float32 differ only in summation order; in bfloat16 both paths
# round the logits gradient to bf16 before the GEMMs, and the fused weight
# gradient is also rounded once per chunk.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# (tokens as (batch, seq), vocab, hidden_size, chunk_size): vocab not a
# multiple of the chunk, a chunk larger than the token count, one-row chunks.
SHAPES = [((2, 5), 13, 6, 3), ((1, 4), 11, 5, 16), ((3, 3), 7, 4, 1), ((2, 6), 17, 8, None)]


def make(dtype, batch, vocab, hidden_size, *, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*batch, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.25).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, batch, generator=gen)
    targets.view(-1)[1] = -100
    mask = torch.rand(batch, generator=gen) > 0.4
    mask.view(-1)[0] = True
    weights = torch.rand(batch, generator=gen, dtype=torch.float64).to(dtype if dtype != torch.bfloat16 else torch.float32)
    return hidden, weight, b, targets, mask, weights


def grads(loss, inputs):
    inputs = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, inputs)


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def assert_close_all(got, want, dtype, what):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max().item() if w.numel() else 0.0
        tol = TOLERANCES[dtype]
        # Gradients of 16-bit inputs: relative to the largest entry (bf16 rounds each to 3 digits).
        atol = tol["atol"] * max(1.0, scale) if dtype == torch.bfloat16 else tol["atol"]
        torch.testing.assert_close(g.float() if dtype == torch.bfloat16 else g, w.float() if dtype == torch.bfloat16 else w,
                                   atol=atol, rtol=tol["rtol"], equal_nan=True, msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ------------------------------------------------------------------ stats


def nan_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a), torch.nan_to_num(b)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stats_are_token_stats_of_each_chunk_bit_for_bit(dtype, shape):
    batch, vocab, hidden_size, chunk = shape
    hidden, weight, bias, targets, _, _ = make(dtype, batch, vocab, hidden_size)
    got = cggr_fn.fused_linear_token_stats(hidden, weight, targets, bias=bias, chunk_size=chunk)
    rows, flat_t = hidden.reshape(-1, hidden_size), targets.reshape(-1)
    step = chunk or _head.chunk_rows(rows.shape[0], hidden_size, vocab)
    parts = [token_stats_reference(F.linear(rows[i : i + step], weight, bias), flat_t[i : i + step], -100)
             for i in range(0, rows.shape[0], step)]
    for name, g, *pieces in zip(cggr_fn.TokenStats._fields, got, *parts):
        assert nan_equal(g.reshape(-1), torch.cat(pieces)), name
    # And, within rounding, the statistics of one full-size GEMM.
    full = cggr_fn.token_stats(F.linear(hidden, weight, bias), targets)
    for g, w in zip(got, full):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_stats_without_targets_and_empty():
    hidden, weight, bias, _, _, _ = make(torch.float32, (2, 3), 9, 4)
    got = cggr_fn.fused_linear_token_stats(hidden, weight, chunk_size=2)
    want = cggr_fn.token_stats(hidden @ weight.T)
    assert torch.isnan(got.nll).all() and torch.isnan(got.grad_norm).all()
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    empty = cggr_fn.fused_linear_token_stats(torch.randn(0, 3, 4), weight, torch.zeros(0, 3, dtype=torch.long))
    assert all(s.shape == (0, 3) and s.dtype == torch.float32 for s in empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_kernel_path_agrees_with_reference(dtype):
    hidden, weight, bias, targets, _, _ = make(dtype, (2, 5), 19, 6)
    args = (hidden.reshape(-1, 6).to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), targets.reshape(-1).to(DEVICE), -100, 3)
    got = _head.linear_token_stats(*args, True)
    want = _head.linear_token_stats(*args, False)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, equal_nan=True)


def test_chunk_rows_bounds_the_logits(monkeypatch):
    for rows in (1, 7, 300, 16384, 100_000):
        for hidden_size in (1, 64, 2048, 8192):
            for vocab in (2, 1000, 49152, 128256):
                chunk = _head.chunk_rows(rows, hidden_size, vocab)
                assert chunk & (chunk - 1) == 0
                # The smallest power of two that holds rows / ceil(vocab / hidden) rows, or the floor.
                target = max(-(-rows // -(-vocab // hidden_size)), min(rows, _head.MIN_CHUNK_ROWS))
                assert target <= chunk < 2 * target
    # Logits chunks no larger than Liger-Kernel's at the benchmark's shapes.
    assert [_head.chunk_rows(16384, h, v) for h in (2048, 4096) for v in (49152, 128256)] == [1024, 512, 2048, 512]
    # No more than chunk_size x vocab logits are ever made.
    shapes = []
    real = F.linear

    def spy(x, w, b=None):
        shapes.append((x.shape[0], w.shape[0]))
        return real(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    hidden, weight, bias, targets, mask, _ = make(torch.float64, (3, 5), 11, 4)
    cggr_fn.fused_head_loss(hidden, weight, targets, ratio=0.5, bias=bias, chunk_size=4)
    assert shapes and max(rows for rows, _ in shapes) == 4


# ------------------------------------------------------------------- loss


@pytest.mark.parametrize("normalize", ["selected", "valid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_loss_and_gradients_match_selective_loss(shape, dtype, normalize):
    batch, vocab, hidden_size, chunk = shape
    hidden, weight, bias, targets, mask, weights = make(dtype, batch, vocab, hidden_size)
    inputs = leaves(hidden, weight, bias, weights)
    loss = cggr_fn.fused_selective_loss(inputs[0], inputs[1], targets, mask, weights=inputs[3], bias=inputs[2],
                                        capacity=int(mask.sum()), normalize=normalize, chunk_size=chunk)
    ref_inputs = leaves(hidden, weight, bias, weights)
    want = cggr_fn.selective_loss(F.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2]), targets, mask,
                                  weights=ref_inputs[3], normalize=normalize)
    assert loss.dtype == want.dtype
    assert_close_all([loss], [want], dtype, "loss")
    assert_close_all(grads(loss, inputs), grads(want, ref_inputs), dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_path_matches_reference_path(dtype):
    """The op's nine outputs, Triton kernels (interpreted on CPU) against the PyTorch reference."""
    hidden, weight, bias, targets, _, _ = make(dtype, (2, 5), 19, 6, seed=3)
    rows, t = hidden.reshape(-1, 6).to(DEVICE), targets.reshape(-1).to(DEVICE)
    coef = torch.rand(10, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    coef[4] = 0.0
    args = (rows, weight.to(DEVICE), bias.to(DEVICE), t, coef, -100, 4)
    got = _head.linear_cross_entropy_grad(*args, True, True)
    want = _head.linear_cross_entropy_grad(*args, False, True)
    assert_close_all(got, want, dtype if dtype == torch.bfloat16 else torch.float32, "op")
    assert torch.equal(got[6][4], torch.zeros(6, dtype=dtype, device=DEVICE))  # coef 0: no gradient


def test_mask_and_positions_agree_and_duplicates_count_twice():
    hidden, weight, bias, targets, mask, _ = make(torch.float64, (2, 5), 13, 6)
    flat = mask.reshape(-1)
    positions = torch.nonzero(flat).squeeze(1)
    by_mask = cggr_fn.fused_selective_loss(hidden, weight, targets, mask, bias=bias)
    by_capacity = cggr_fn.fused_selective_loss(hidden, weight, targets, mask, bias=bias, capacity=int(flat.sum()) + 2)
    by_positions = cggr_fn.fused_selective_loss(hidden, weight, targets, positions.flip(0), bias=bias)
    torch.testing.assert_close(by_mask, by_positions)
    torch.testing.assert_close(by_capacity, by_positions)
    # Position p listed twice weighs 2 (the "valid" denominator does not count slots).
    p = int(positions[0])
    twice = torch.cat([positions, positions[:1]])
    weights = torch.ones(2, 5, dtype=torch.float64)
    weights.view(-1)[p] = 2.0
    got = cggr_fn.fused_selective_loss(hidden, weight, targets, twice, bias=bias, normalize="valid")
    want = cggr_fn.selective_loss(F.linear(hidden, weight, bias), targets, mask, weights=weights, normalize="valid")
    torch.testing.assert_close(got, want)


def test_unselected_rows_get_exactly_zero_gradient():
    hidden, weight, bias, targets, mask, _ = make(torch.float32, (3, 4), 11, 5)
    hidden.requires_grad_()
    loss = cggr_fn.fused_selective_loss(hidden, weight, targets, mask, bias=bias, capacity=int(mask.sum()))
    (grad,) = torch.autograd.grad(loss, hidden)
    trained = mask & (targets != -100)
    assert torch.equal(grad[~trained], torch.zeros_like(grad[~trained]))
    assert (grad[trained].abs().sum(-1) > 0).all()


def test_frozen_head_skips_the_weight_gradient(monkeypatch):
    """A weight that does not require grad gets no weight-gradient GEMMs; the other gradients are unchanged."""
    hidden, weight, bias, targets, mask, _ = make(torch.float64, (2, 5), 13, 6)
    calls = []
    real = _head.linear_cross_entropy_grad

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(_head, "linear_cross_entropy_grad", spy)
    h = hidden.clone().requires_grad_()
    (frozen,) = torch.autograd.grad(cggr_fn.fused_selective_loss(h, weight, targets, mask), h)
    w = weight.clone().requires_grad_()
    trained, _ = torch.autograd.grad(cggr_fn.fused_selective_loss(h, w, targets, mask), (h, w))
    assert calls == [False, True]
    assert torch.equal(frozen, trained)
    assert torch.equal(torch.func.grad(lambda x: cggr_fn.fused_head_loss(x, weight, targets, ratio=1.0).loss)(hidden), torch.func.grad(
        lambda x: cggr_fn.fused_head_loss(x, w, targets, ratio=1.0).loss)(hidden))
    assert calls[2:] == [False, True]


def test_nothing_selected():
    hidden, weight, bias, targets, _, _ = make(torch.float32, (2, 3), 7, 4)
    inputs = leaves(hidden, weight, bias)
    for selection, capacity in ((torch.zeros(0, dtype=torch.long), None), (torch.zeros(2, 3, dtype=torch.bool), 0),
                                (torch.zeros(2, 3, dtype=torch.bool), 2)):
        loss = cggr_fn.fused_selective_loss(inputs[0], inputs[1], targets, selection, bias=inputs[2], capacity=capacity)
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(loss, inputs))
    only_ignored = torch.tensor([1])  # targets.view(-1)[1] is ignore_index
    assert cggr_fn.fused_selective_loss(hidden, weight, targets, only_ignored).item() == 0.0


def test_broken_selection_gives_nan_and_checking_raises():
    hidden, weight, _, targets, mask, _ = make(torch.float32, (2, 5), 13, 6)
    count = int(mask.sum())
    assert torch.isnan(cggr_fn.fused_selective_loss(hidden, weight, targets, mask, capacity=count - 1))
    assert torch.isnan(cggr_fn.fused_selective_loss(hidden, weight, targets, torch.tensor([0, 10])))
    assert torch.isnan(cggr_fn.fused_selective_loss(hidden, weight, targets, torch.tensor([-1])))
    with cggr_fn.checking():
        with pytest.raises(ValueError, match=rf"selection: the mask selects {count} tokens, more than capacity={count - 1}"):
            cggr_fn.fused_selective_loss(hidden, weight, targets, mask, capacity=count - 1)
        with pytest.raises(ValueError, match=r"selection: expected positions in \[0, 10\), got values in \[0, 10\]"):
            cggr_fn.fused_selective_loss(hidden, weight, targets, torch.tensor([0, 10]))
        with pytest.raises(ValueError, match=r"targets: expected values in \[0, 13\)"):
            cggr_fn.fused_selective_loss(hidden, weight, targets + 13, mask)
        bad = hidden.clone()
        bad[0, 0, 0] = NAN
        with pytest.raises(ValueError, match=r"hidden: contains NaN or infinite values"):
            cggr_fn.fused_linear_token_stats(bad, weight)


def test_nan_rules_follow_selective_loss():
    hidden, weight, _, targets, mask, _ = make(torch.float64, (2, 5), 13, 6)
    flat_mask = mask.reshape(-1)
    selected, unselected = int(flat_mask.nonzero()[0]), int((~flat_mask).nonzero()[0])
    # An out-of-range label anywhere: NaN, selected or not.
    bad_targets = targets.clone()
    bad_targets.view(-1)[unselected] = 13
    assert torch.isnan(cggr_fn.fused_selective_loss(hidden, weight, bad_targets, mask))
    assert torch.isnan(cggr_fn.selective_loss(hidden @ weight.T, bad_targets, mask))
    # A selected row without a distribution: NaN.
    broken = hidden.clone()
    broken.view(-1, 6)[selected, 0] = NAN
    assert torch.isnan(cggr_fn.fused_selective_loss(broken, weight, targets, mask))
    # An unselected broken row is never computed by fused_selective_loss, but
    # fused_head_loss sees every row in its statistics pass, as selective_loss does.
    broken = hidden.clone()
    broken.view(-1, 6)[unselected, 0] = NAN
    assert torch.isfinite(cggr_fn.fused_selective_loss(broken, weight, targets, mask, capacity=int(mask.sum())))
    assert torch.isnan(cggr_fn.selective_loss(broken @ weight.T, targets, mask))
    assert torch.isnan(cggr_fn.fused_head_loss(broken, weight, targets, ratio=0.5).loss)
    assert torch.isnan(cggr_fn.fused_head_loss(broken, weight, targets, ratio=1.0).loss)
    # A target that is a -inf class: +inf loss, finite gradient (bias -inf on that class).
    bias = torch.zeros(13, dtype=torch.float64)
    t = int(targets.view(-1)[selected])
    bias[t] = -INF
    h = hidden.clone().requires_grad_()
    loss = cggr_fn.fused_selective_loss(h, weight, targets, mask, bias=bias)
    assert loss.item() == INF
    (g,) = torch.autograd.grad(loss, h)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------- transforms


def _loss_fn(targets, mask, chunk):
    capacity = int(mask.sum())

    def fn(hidden, weight, bias, weights):
        return cggr_fn.fused_selective_loss(hidden, weight, targets, mask, weights=weights, bias=bias,
                                            capacity=capacity, chunk_size=chunk)

    return fn


def test_func_grad_compile_and_vmap():
    hidden, weight, bias, targets, mask, weights = make(torch.float32, (2, 5), 13, 6)
    fn = _loss_fn(targets, mask, 3)
    inputs = leaves(hidden, weight, bias, weights)
    want = grads(fn(*inputs), inputs)
    got = torch.func.grad(fn, argnums=(0, 1, 2, 3))(hidden, weight, bias, weights)
    assert_close_all(got, want, torch.float32, "func.grad")
    compiled = torch.compile(torch.func.grad(fn, argnums=(0, 1, 2, 3)), fullgraph=True, backend="aot_eager")
    assert_close_all(compiled(hidden, weight, bias, weights), want, torch.float32, "compile(func.grad)")
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    assert_close_all(grads(loss, inputs), want, torch.float32, "compile + backward")
    # vmap over a batch of heads: each element equals its own call.
    stacked = [torch.stack([x, 2 * x]) for x in (hidden, weight, bias, weights)]
    batched = torch.func.vmap(torch.func.grad(fn))(*stacked)
    for i in range(2):
        one = torch.func.grad(fn)(*(s[i] for s in stacked))
        torch.testing.assert_close(batched[i], one)


def test_stats_are_constants():
    hidden, weight, _, targets, _, _ = make(torch.float32, (2, 3), 7, 4)

    def fn(h, w):
        stats = cggr_fn.fused_linear_token_stats(h, w, targets, chunk_size=2)
        return (stats.entropy * h.sum(-1)).sum()

    got = torch.func.grad(fn)(hidden, weight)
    torch.testing.assert_close(got, cggr_fn.fused_linear_token_stats(hidden, weight, targets).entropy.unsqueeze(-1).expand(2, 3, 4))


def test_opcheck():
    hidden, weight, bias, targets, _, _ = make(torch.float32, (2, 3), 11, 4)
    rows, t = hidden.reshape(-1, 4).to(DEVICE), targets.reshape(-1).to(DEVICE)
    coef = torch.rand(6).to(DEVICE)
    op = _head.linear_cross_entropy_grad
    torch.library.opcheck(op, (rows, weight.to(DEVICE), bias.to(DEVICE), t, coef, -100, 4, True, True))
    torch.library.opcheck(op, (rows.bfloat16(), weight.bfloat16().to(DEVICE), None, t.int(), coef, -100, 2, True, False))
    torch.library.opcheck(op, (rows.double(), weight.double().to(DEVICE), bias.double().to(DEVICE), t, coef.double(), -100, 5, False, True))


# ----------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [4, 8, 32])
def test_softmax_grad_kernel_matches_reference(dtype, block):
    gen = torch.Generator().manual_seed(block)
    vocab = 21
    logits = (3 * torch.randn(7, vocab, generator=gen)).to(dtype)
    logits[5, 3] = -INF
    lse = torch.logsumexp(logits.float(), -1)
    lse[6] = NAN  # a row without a distribution
    targets = torch.tensor([0, 20, -100, 21, -1, 3, 4])  # ignored and out-of-range: no onehot
    coef = torch.rand(7, generator=gen)
    coef[1] = 0.0  # zero coefficient: exact zeros
    want = grad_kernel.softmax_grad_reference(logits, lse, targets, coef)
    wide = torch.stack([targets, targets], 1)
    got = logits.clone().to(DEVICE)
    grad_kernel.launch(got, lse.to(DEVICE), wide[:, 1].to(DEVICE), coef.to(DEVICE), block=block)
    got = got.cpu()
    assert torch.equal(got[1], torch.zeros(vocab, dtype=dtype))
    assert torch.isnan(got[6]).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    # The reference is coef * (softmax - onehot) written out.
    p = torch.softmax(logits.double(), -1)
    onehot = F.one_hot(targets.clamp(0, vocab - 1), vocab).double() * ((targets >= 0) & (targets < vocab)).unsqueeze(-1)
    expected = coef.double().unsqueeze(-1) * (p - onehot)
    torch.testing.assert_close(want[:6].double(), expected[:6], atol=tol, rtol=tol)


# --------------------------------------------------------------- pipeline


@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware", "priority"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_head_loss_is_the_composition(strategy, ratio):
    hidden, weight, bias, targets, _, _ = make(torch.float64, (3, 6), 13, 5, seed=4)
    method = "grad_norm"
    normalize = "valid" if strategy == "priority" else "selected"
    options = dict(ratio=ratio, strategy=strategy, seed=3)
    inputs = leaves(hidden, weight, bias)
    out = cggr_fn.fused_head_loss(inputs[0], inputs[1], targets, bias=inputs[2], method=method, normalize=normalize,
                                  chunk_size=4, **options)
    ref_inputs = leaves(hidden, weight, bias)
    logits = F.linear(*ref_inputs)
    stats = cggr_fn.token_stats(logits, targets)
    scores = cggr_fn.score(logits, targets, method=method)
    if strategy == "priority":
        mask, weights = cggr_fn.priority_sample(scores, ratio=ratio, seed=3)
    else:
        mask = cggr_fn.select(scores, ratio=ratio, strategy=strategy, seed=3)
        weights = mask.double()
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.weights, weights)
    for g, w in zip(out.stats, stats):
        torch.testing.assert_close(g, w, equal_nan=True)
    want = cggr_fn.selective_loss(logits, targets, mask, weights=weights if strategy == "priority" else None,
                                  normalize=normalize)
    torch.testing.assert_close(out.loss, want)
    assert_close_all(grads(out.loss, inputs), grads(want, ref_inputs), torch.float64, "grad")
    assert int(out.mask.sum()) == min(cggr_fn.capacity(18, ratio=ratio), int((targets != -100).sum()))


def test_head_loss_one_pass_equals_two_passes():
    """At ratio 1 a named method takes the one-pass path; a callable method the two-pass one."""
    hidden, weight, bias, targets, _, _ = make(torch.float32, (2, 7), 13, 5)
    inputs = leaves(hidden, weight, bias)
    one = cggr_fn.fused_head_loss(inputs[0], inputs[1], targets, bias=inputs[2], ratio=1.0, chunk_size=3)
    ref_inputs = leaves(hidden, weight, bias)
    two = cggr_fn.fused_head_loss(ref_inputs[0], ref_inputs[1], targets, bias=ref_inputs[2], ratio=1.0, chunk_size=3,
                                  method=lambda s: s.entropy - s.confidence)
    assert torch.equal(one.mask, two.mask) and torch.equal(one.mask, targets != -100)
    for g, w in zip(one.stats, two.stats):
        assert nan_equal(g, w)
    torch.testing.assert_close(one.loss, two.loss)
    assert_close_all(grads(one.loss, inputs), grads(two.loss, ref_inputs), torch.float32, "grad")


def test_head_loss_kernel_path_agrees(monkeypatch):
    """The whole pipeline with the Triton kernels (interpreted on CPU) against the reference."""
    hidden, weight, bias, targets, _, _ = make(torch.float32, (2, 5), 13, 6)
    want = cggr_fn.fused_head_loss(hidden, weight, targets, bias=bias, ratio=0.5, chunk_size=4)
    monkeypatch.setattr(_head, "_use_kernel", lambda hidden: True)
    got = cggr_fn.fused_head_loss(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), bias=bias.to(DEVICE),
                                  ratio=0.5, chunk_size=4)
    assert torch.equal(got.mask.cpu(), want.mask)
    torch.testing.assert_close(got.loss.cpu(), want.loss, atol=1e-5, rtol=1e-5)


def test_head_loss_compiles_without_host_sync():
    hidden, weight, bias, targets, _, _ = make(torch.float32, (2, 6), 13, 5)
    for ratio, strategy in ((0.5, "topk"), (1.0, "priority"), (0.25, "priority")):
        testing.assert_compiles(
            lambda h, w, b: cggr_fn.fused_head_loss(h, w, targets, bias=b, ratio=ratio, strategy=strategy, chunk_size=4),
            hidden, weight, bias,
        )


def test_a_second_backward_through_the_same_graph_raises():
    """The backward scales its precomputed gradients in place (no second copy of the weight gradient)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=g)
    loss = cggr_fn.fused_selective_loss(hidden, weight, targets, torch.ones(6, dtype=torch.bool))
    (3.0 * loss).backward(retain_graph=True)
    expected = torch.autograd.grad(3.0 * torch.nn.functional.cross_entropy(hidden @ weight.t(), targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(weight.grad, expected[1])
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()



def test_backward_allocates_no_second_weight_sized_tensor():
    """Forward + backward allocate one weight-sized tensor: the gradient itself, which ``.grad`` takes over.

    (Autograd hands a Function zeros for the gradients of its unused outputs
    unless told not to; one of those outputs is the weight-sized gradient.)
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(16, 4, generator=g, requires_grad=True)
    weight = torch.randn(37, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 37, (16,), generator=g)
    allocated = []

    class WeightSized(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.shape == weight.shape:
                    allocated.append(tensor.untyped_storage().data_ptr())
            return out

    with WeightSized():
        cggr_fn.fused_selective_loss(hidden, weight, targets, torch.ones(16, dtype=torch.bool), chunk_size=4).backward()
    assert set(allocated) == {weight.grad.data_ptr()}
