"""Regression tests for the core defects of issue 7 (compile, curriculum, selection, routing, checking)."""

import threading

import pytest
import torch

import cggr_fn

INF, NAN = float("inf"), float("nan")


def compiled(fn, dynamic=None):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager", dynamic=dynamic)


# ------------------------------------------------ defect 1: a second shape, dynamic shapes

SHAPE_CASES = {
    "bucket": lambda s: cggr_fn.bucket(s, torch.tensor(3), num_buckets=3, warmup_steps=10),
    "bucket_depth": lambda s: cggr_fn.bucket_depth(s, torch.tensor(3), num_layers=5, warmup_steps=10),
    "bucket_sizes": lambda s: cggr_fn.bucket_sizes(s.numel(), torch.tensor(3), warmup_steps=10),
    "capacity": lambda s: cggr_fn.capacity(s.numel(), ratio=torch.tensor(0.3)),
    "select_stratified": lambda s: cggr_fn.select(s, ratio=0.3, strategy="stratified", seed=torch.tensor(2)),
    "select_sequence_aware": lambda s: cggr_fn.select(s, ratio=0.5, strategy="sequence_aware"),
    "depth_masks": lambda s: torch.stack(cggr_fn.depth_masks((s.abs() * 2).long(), num_layers=2)),
    "dynamic_ratio": lambda s: cggr_fn.dynamic_ratio(torch.tensor(0.5), s.sigmoid(), valid=s > 0),
    "route_depth": lambda s: cggr_fn.route_depth([torch.tanh, torch.sin], (s.abs() * 2).long())(s[..., None] * 2.0),
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["recompile", "dynamic"])
@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_survives_a_second_token_count_under_fullgraph_compile(name, dynamic):
    fn = SHAPE_CASES[name]
    f = compiled(fn, dynamic)
    for shape in ((2, 8), (2, 12), (3, 5)):
        scores = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert torch.equal(f(scores), fn(scores))


# ------------------------------------------------ defect 2: Python scalars that dynamo makes symbolic

def test_a_python_int_step_is_traced_without_a_graph_break():
    def fn(scores, step):
        return cggr_fn.select(scores, ratio=cggr_fn.ratio_schedule(step, warmup_steps=100, final_ratio=0.25))

    f = compiled(fn)
    scores = torch.randn(2, 8)
    for step in (0, 7, 9, 150):  # the second value makes the step a SymInt
        assert torch.equal(f(scores, step), fn(scores, step))
    with pytest.raises(Exception, match="step: expected an int >= 0"):
        f(scores, -1)


def test_bucket_with_a_python_int_step_under_dynamic_compile():
    def fn(scores, step):
        return cggr_fn.bucket_depth(scores, step, num_layers=4, num_buckets=3, warmup_steps=10)

    f = compiled(fn, dynamic=True)
    for step, n in ((0, 8), (4, 12), (20, 7)):
        scores = torch.randn(n)
        assert torch.equal(f(scores, step), fn(scores, step))


def test_dynamic_ratio_of_a_python_ratio_under_compile():
    def fn(ratio, confidence):
        return cggr_fn.dynamic_ratio(ratio, confidence, sensitivity=0.25)

    f = compiled(fn)
    confidence = torch.rand(8)
    for ratio in (0.5, 0.25, 0.3):  # the second value makes the ratio a SymFloat
        assert torch.equal(f(ratio, confidence), fn(ratio, confidence))
    # A bad value still fails with the argument named (dynamo wraps the ValueError), it is not skipped.
    with pytest.raises(Exception, match=r"ratio: expected a value in \(0, 1\]"):
        f(1.5, confidence)


# ------------------------------------------------ defect 3: narrow integer steps

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_steps_do_not_overflow(dtype):
    step = 200 if dtype == torch.uint8 else 5000
    expected = cggr_fn.bucket_sizes(1_000_000, step, warmup_steps=10_000)
    got = cggr_fn.bucket_sizes(1_000_000, torch.tensor(step, dtype=dtype), warmup_steps=10_000)
    assert got.dtype == torch.int64 and got.tolist() == expected
    assert sum(expected) == 1_000_000 and min(expected) >= 0
    assert cggr_fn.bucket_sizes(1_000_000, torch.tensor(5000, dtype=torch.int32), warmup_steps=10_000).tolist() == [
        625000, 125000, 125000, 125000]


# ------------------------------------------------ defect 8: int and tensor steps select the same k

def test_int_and_tensor_steps_select_the_same_k_at_the_reported_point():
    ratio_int = cggr_fn.ratio_schedule(23, warmup_steps=100, final_ratio=0.7)
    ratio_tensor = cggr_fn.ratio_schedule(torch.tensor(23), warmup_steps=100, final_ratio=0.7)
    assert ratio_tensor.dtype == torch.float64
    assert cggr_fn.capacity(32768, ratio=ratio_int) == 30508
    assert int(cggr_fn.capacity(32768, ratio=ratio_tensor)) == 30508
    scores = torch.randn(32768, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cggr_fn.select(scores, ratio=ratio_int), cggr_fn.select(scores, ratio=ratio_tensor))


def test_dynamic_ratio_keeps_a_float64_ratio_float64():
    ratio = cggr_fn.ratio_schedule(torch.tensor(23), warmup_steps=100, final_ratio=0.7)
    confidence = torch.full((16,), 0.5)
    adjusted = cggr_fn.dynamic_ratio(ratio, confidence)
    assert adjusted.dtype == torch.float64 and float(adjusted) == float(ratio)
    assert cggr_fn.dynamic_ratio(0.5, confidence).dtype == torch.float32


@pytest.mark.parametrize("num_tokens", [7, 1000, 32768, 1_000_003])
def test_int_and_tensor_steps_select_the_same_k_over_a_sweep(num_tokens):
    for warmup in (1, 7, 100, 997):
        for final in (0.05, 0.3, 0.7, 0.99):
            for step in range(0, warmup + 2, max(1, warmup // 40)):
                as_int = cggr_fn.ratio_schedule(step, warmup_steps=warmup, final_ratio=final)
                as_tensor = cggr_fn.ratio_schedule(torch.tensor(step, dtype=torch.int32), warmup_steps=warmup, final_ratio=final)
                assert int(cggr_fn.capacity(num_tokens, ratio=as_tensor)) == cggr_fn.capacity(num_tokens, ratio=as_int)


# ------------------------------------------------ defect 9: bad tensor ratios, depths

@pytest.mark.parametrize("ratio, expected", [(NAN, 10), (2.0, 10), (INF, 10), (0.0, 1), (-1.0, 1), (-INF, 1)])
def test_a_tensor_ratio_outside_the_unit_interval_follows_the_documented_rule(ratio, expected):
    scores = torch.randn(10)
    for strategy in ("topk", "stratified", "sequence_aware"):
        assert int(cggr_fn.select(scores, ratio=torch.tensor(ratio), strategy=strategy).sum()) == expected
    assert int(cggr_fn.capacity(10, ratio=torch.tensor(ratio, dtype=torch.float64))) == expected


@pytest.mark.parametrize("ratio", [NAN, 2.0, 0.0, -1.0])
def test_checking_raises_on_a_tensor_ratio_outside_the_unit_interval(ratio):
    with cggr_fn.checking(), pytest.raises(ValueError, match=r"ratio: expected a value in \(0, 1\], got"):
        cggr_fn.select(torch.randn(10), ratio=torch.tensor(ratio))


def test_out_of_range_depths_act_as_clamped():
    depth = torch.tensor([-3, 0, 2, 3, 7])
    masks = cggr_fn.depth_masks(depth, num_layers=3)
    clamped = cggr_fn.depth_masks(depth.clamp(0, 3), num_layers=3)
    assert all(torch.equal(m, c) for m, c in zip(masks, clamped))


def test_bucket_depth_always_gives_depths_in_range():
    for step in (0, 3, 10):
        depth = cggr_fn.bucket_depth(torch.randn(5, 7), step, num_layers=6, num_buckets=3, warmup_steps=10)
        assert depth.dtype == torch.int64 and int(depth.min()) >= 1 and int(depth.max()) <= 6


def test_a_float_tensor_seed_is_rejected_not_truncated():
    scores = torch.randn(4, 8)
    with pytest.raises(TypeError, match="seed"):
        cggr_fn.select(scores, ratio=0.5, strategy="stratified", seed=torch.tensor(1.7))
    with pytest.raises(TypeError, match="seed: expected an int, got float"):
        cggr_fn.select(scores, ratio=0.5, strategy="stratified", seed=1.5)


# ------------------------------------------------ defect 10: NaN ranks before +inf, exactly

def test_nan_ranks_before_inf():
    assert cggr_fn.select(torch.tensor([INF, NAN]), ratio=0.5).tolist() == [False, True]
    assert cggr_fn.select(torch.tensor([INF, NAN], dtype=torch.float64), ratio=0.5).tolist() == [False, True]
    assert cggr_fn.select(torch.tensor([INF, NAN], dtype=torch.bfloat16), ratio=0.5).tolist() == [False, True]
    assert cggr_fn.bucket(torch.tensor([INF, NAN]), 10, num_buckets=2, warmup_steps=10).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_is_exact_across_the_float_range_with_ties_by_position(dtype):
    big, tiny = torch.finfo(dtype).max, torch.finfo(dtype).smallest_normal / 4  # tiny: a subnormal
    scores = torch.tensor([1.0, -INF, big, 0.0, INF, -0.0, NAN, -big, -NAN, tiny, 1.0], dtype=dtype)
    hardest_first = [6, 8, 4, 2, 0, 10, 9, 3, 5, 7, 1]  # NaN of either sign, +inf, descending, -0.0 == 0.0
    order = [int(i) for i in torch.argsort(cggr_fn.bucket(scores, 10, num_buckets=11, warmup_steps=10), stable=True)]
    assert order == hardest_first


# ------------------------------------------------ defect 12: the route_grad guarantee, exactly

def test_route_grad_zeroes_the_cotangent_at_fn_outputs_and_fn_backward_does_the_rest():
    x = torch.tensor([[0.0, 4.0], [0.0, 1.0], [9.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([True, False, True])
    cotangent = torch.tensor([[1.0, NAN], [INF, NAN], [2.0, 3.0]], dtype=torch.float64)
    _, routed_vjp = torch.func.vjp(cggr_fn.route_grad(torch.sqrt, mask), x)
    _, plain_vjp = torch.func.vjp(torch.sqrt, x)
    gated = torch.where(mask[:, None], cotangent, 0.0)  # exactly zero in the gated row, inf and NaN included
    (got,), (want,) = routed_vjp(cotangent), plain_vjp(gated)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # sqrt's own backward at 0 is 0 * inf = NaN: that part is fn's, as documented.
    assert torch.isnan(got[1, 0]) and got[1, 1] == 0.0


# ------------------------------------------------ ergonomics

def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        cggr_fn.select(torch.randn(4), 0.5)
    with pytest.raises(TypeError):
        cggr_fn.depth_masks(torch.tensor([1]), 2)
    with pytest.raises(TypeError):
        cggr_fn.capacity(10, 0.5)


def test_capacity_takes_python_and_tensor_ratios_by_one_rule():
    for ratio in (1e-9, 0.1, 0.25, 0.3, 0.31, 0.7, 0.999, 1.0):
        for n in (0, 1, 10, 12345):
            k = cggr_fn.capacity(n, ratio=ratio)
            as_tensor = cggr_fn.capacity(n, ratio=torch.tensor(ratio, dtype=torch.float64))
            assert isinstance(k, int) and as_tensor.dtype == torch.int64 and as_tensor.dim() == 0
            assert int(as_tensor) == k


def test_bucket_depth_is_bucket_then_depth():
    scores = torch.randn(3, 11)
    for step in (0, 4, 9):
        buckets = cggr_fn.bucket(scores, step, num_buckets=3, warmup_steps=8)
        depth = cggr_fn.bucket_depth(scores, step, num_layers=7, num_buckets=3, warmup_steps=8)
        assert torch.equal(depth, (7 * (3 - buckets) + 2) // 3)


def test_route_grad_passes_a_scalar_auxiliary_output_through():
    x = torch.ones(3, 2, requires_grad=True)
    mask = torch.tensor([True, False, True])
    out, aux = cggr_fn.route_grad(lambda t: (t * 2.0, (t * t).sum()), mask)(x)
    (out.sum() + aux).backward()
    assert x.grad.tolist() == [[4.0, 4.0], [2.0, 2.0], [4.0, 4.0]]  # aux: 2x everywhere, ungated
    with pytest.raises(ValueError, match=r"mask: has 2 dims, more than an output of shape \(3,\)"):
        cggr_fn.route_grad(lambda t: (t, t.sum(-1)), torch.ones(3, 2, dtype=torch.bool))(x)
    with pytest.raises(ValueError, match=r"mask: expected a shape broadcastable to the output rows \(2,\)"):
        cggr_fn.route_grad(lambda t: (t, t[:2]), mask)(x)


def test_checking_is_local_to_each_thread():
    inside, release = threading.Event(), threading.Event()
    errors = []

    def checked():
        with cggr_fn.checking():
            inside.set()
            release.wait(10)
            try:
                cggr_fn.bucket(torch.randn(4), torch.tensor(-1))
            except ValueError:
                return
            errors.append("checking() was off inside its own block")

    thread = threading.Thread(target=checked)
    thread.start()
    try:
        assert inside.wait(10)
        cggr_fn.bucket(torch.randn(4), torch.tensor(-1))  # this thread is not in checking mode: no error
    finally:
        release.set()
        thread.join(10)
    assert not errors
    with cggr_fn.checking():
        seen = []
        worker = threading.Thread(target=lambda: seen.append(cggr_fn.bucket(torch.randn(4), torch.tensor(-1))))
        worker.start()
        worker.join(10)
        assert len(seen) == 1  # a new thread starts outside checking mode
