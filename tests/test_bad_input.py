"""Every bad input raises a clear error that names the argument and what was expected."""

import pytest
import torch

import cggr_fn

LOGITS = torch.randn(2, 3, 5)
TARGETS = torch.randint(0, 5, (2, 3))
SCORES = torch.randn(2, 3)
MASK = torch.ones(2, 3, dtype=torch.bool)
HIDDEN = torch.randn(2, 3, 5)
HEAD = torch.randn(7, 5)


def identity(x):
    return x


CASES = [
    # logits
    (lambda: cggr_fn.token_stats(torch.tensor(1.0)), ValueError, r"logits: expected at least 1 dimension"),
    (lambda: cggr_fn.token_stats(torch.randn(4, 1)), ValueError, r"logits: expected a vocabulary of at least 2 \(last dim\), got 1"),
    (lambda: cggr_fn.token_stats(torch.ones(4, 3, dtype=torch.long)), TypeError, r"logits: expected a floating-point tensor, got dtype torch.int64"),
    (lambda: cggr_fn.score([[1.0, 2.0]]), TypeError, r"logits: expected a torch.Tensor, got list"),
    # targets
    (lambda: cggr_fn.token_stats(LOGITS, TARGETS[0]), ValueError, r"targets: expected shape \(2, 3\) \(logits.shape\[:-1\]\), got \(3,\)"),
    (lambda: cggr_fn.token_stats(LOGITS, TARGETS.float()), TypeError, r"targets: expected an integer tensor of class indices \(int64 or int32\), got dtype torch.float32"),
    (lambda: cggr_fn.token_stats(LOGITS, TARGETS.to(torch.uint8)), TypeError, r"targets: expected .* \(int64 or int32\), got dtype torch.uint8"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS.bool(), MASK), TypeError, r"targets: expected an integer tensor"),
    (lambda: cggr_fn.score(LOGITS, TARGETS, ignore_index=-1.5), TypeError, r"ignore_index: expected an int"),
    # score options
    (lambda: cggr_fn.score(LOGITS, method="perplexity"), ValueError, r"method: expected one of \['combined', 'confidence', 'entropy', 'grad_norm', 'loss', 'margin'\]"),
    (lambda: cggr_fn.score(LOGITS, method="loss"), ValueError, r'method: "loss" scores by the nll and needs targets'),
    (lambda: cggr_fn.score(LOGITS, method="grad_norm"), ValueError, r'method: "grad_norm" scores by \|\|softmax - onehot\(target\)\|\| and needs targets'),
    (lambda: cggr_fn.score(LOGITS, method=3), TypeError, r"method: expected a str or a callable"),
    (lambda: cggr_fn.score(LOGITS, method=lambda s: s.entropy[0]), ValueError, r"method: the callable must return a tensor of shape \(2, 3\)"),
    (lambda: cggr_fn.score(LOGITS, method=lambda s: s.entropy > 1), TypeError, r"method: the callable must return a floating-point tensor, got dtype torch.bool"),
    # ratio
    (lambda: cggr_fn.select(SCORES, ratio=0.0), ValueError, r"ratio: expected a value in \(0, 1\], got 0.0"),
    (lambda: cggr_fn.select(SCORES, ratio=1.5), ValueError, r"ratio: expected a value in \(0, 1\], got 1.5"),
    (lambda: cggr_fn.select(SCORES, ratio=float("nan")), ValueError, r"ratio: expected a value in \(0, 1\]"),
    (lambda: cggr_fn.select(SCORES, ratio="half"), TypeError, r"ratio: expected a float"),
    (lambda: cggr_fn.select(SCORES, ratio=torch.tensor([0.5])), TypeError, r"ratio: expected a float or a 0-d floating tensor"),
    (lambda: cggr_fn.capacity(10, ratio=-0.1), ValueError, r"ratio: expected a value in \(0, 1\]"),
    (lambda: cggr_fn.ratio_schedule(3, warmup_steps=10, final_ratio=0.0), ValueError, r"final_ratio: expected a value in \(0, 1\]"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, min_ratio=0.8, max_ratio=0.5), ValueError, r"min_ratio: expected min_ratio <= max_ratio"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, sensitivity=-1.0), ValueError, r"sensitivity: expected a finite float >= 0, got -1.0"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, sensitivity=float("nan")), ValueError, r"sensitivity: expected a finite float >= 0, got nan"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, sensitivity=float("inf")), ValueError, r"sensitivity: expected a finite float >= 0, got inf"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, sensitivity="high"), TypeError, r"sensitivity: expected a float, got str"),
    (lambda: cggr_fn.dynamic_ratio(0.5, SCORES, valid=MASK[0]), ValueError, r"valid: expected shape \(2, 3\)"),
    # select options
    (lambda: cggr_fn.select(SCORES, ratio=0.5, strategy="random"), ValueError, r"strategy: expected one of \('topk', 'stratified', 'sequence_aware'\)"),
    (lambda: cggr_fn.select(SCORES, ratio=0.5, strategy="stratified", num_strata=0), ValueError, r"num_strata: expected an int >= 1, got 0"),
    (lambda: cggr_fn.select(SCORES, ratio=0.5, strategy="sequence_aware", min_per_sequence=-1), ValueError, r"min_per_sequence: expected an int >= 0"),
    (lambda: cggr_fn.select(TARGETS, ratio=0.5), TypeError, r"scores: expected a floating-point tensor"),
    (lambda: cggr_fn.select(SCORES, ratio=0.5, strategy="stratified", seed=1.5), TypeError, r"seed: expected an int, got float"),
    (lambda: cggr_fn.select(SCORES, ratio=0.5, strategy="stratified", seed=torch.tensor(1.5)), TypeError, r"seed: expected a Python int or a 0-d integer tensor, got torch.float32"),
    (lambda: cggr_fn.select(SCORES, ratio=0.5, seed=torch.tensor([1, 2])), TypeError, r"seed: expected a Python int or a 0-d integer tensor"),
    # buckets and curriculum
    (lambda: cggr_fn.bucket(SCORES, 0, num_buckets=0), ValueError, r"num_buckets: expected an int >= 1, got 0"),
    (lambda: cggr_fn.bucket(SCORES, 0, num_buckets=2.5), TypeError, r"num_buckets: expected an int, got float"),
    (lambda: cggr_fn.bucket(SCORES, 0, warmup_steps=-1), ValueError, r"warmup_steps: expected an int >= 0, got -1"),
    (lambda: cggr_fn.bucket(SCORES, -3), ValueError, r"step: expected an int >= 0, got -3"),
    (lambda: cggr_fn.bucket(SCORES, 1.0), TypeError, r"step: expected an int, got float"),
    (lambda: cggr_fn.bucket(SCORES, torch.tensor(1.0)), TypeError, r"step: expected a Python int or a 0-d integer tensor"),
    (lambda: cggr_fn.bucket(SCORES, torch.tensor([1, 2])), TypeError, r"step: expected a Python int or a 0-d integer tensor"),
    (lambda: cggr_fn.ratio_schedule(True, warmup_steps=3, final_ratio=0.5), TypeError, r"step: expected an int, got bool"),
    (lambda: cggr_fn.bucket_depth(TARGETS, 0, num_layers=4), TypeError, r"scores: expected a floating-point tensor"),
    (lambda: cggr_fn.bucket_depth(SCORES, 0, num_layers=0), ValueError, r"num_layers: expected an int >= 1, got 0"),
    (lambda: cggr_fn.bucket_depth(SCORES, 0, num_layers=4, num_buckets=0), ValueError, r"num_buckets: expected an int >= 1, got 0"),
    # routing
    (lambda: cggr_fn.route_grad(identity, MASK, leak=1.5), ValueError, r"leak: expected a value in \[0, 1\], got 1.5"),
    (lambda: cggr_fn.route_grad(identity, MASK, leak=-0.1), ValueError, r"leak: expected a value in \[0, 1\]"),
    (lambda: cggr_fn.route_grad(identity, MASK.float()), TypeError, r"mask: expected dtype torch.bool, got torch.float32"),
    (lambda: cggr_fn.route_grad("f", MASK), TypeError, r"fn: expected a callable, got str"),
    (lambda: cggr_fn.route_grad(identity, torch.ones(3, dtype=torch.bool))(torch.randn(2, 4)), ValueError, r"mask: expected a shape broadcastable to the output rows \(2,\)"),
    (lambda: cggr_fn.route_grad(identity, MASK)(torch.randn(2)), ValueError, r"mask: has 2 dims, more than an output of shape \(2,\)"),
    (lambda: cggr_fn.route_grad(identity, MASK)(torch.randn(1, 3)), ValueError, r"mask: expected a shape broadcastable to the output rows \(1, 3\)"),
    (lambda: cggr_fn.route_grad(identity, MASK.to("meta"))(torch.randn(2, 3)), ValueError, r"mask: expected device cpu \(the output's\), got meta"),
    (lambda: cggr_fn.route_depth([], TARGETS), TypeError, r"layers: expected a non-empty sequence of callables"),
    (lambda: cggr_fn.route_depth(torch.nn.Linear(3, 3), TARGETS), TypeError, r"layers: expected a sequence of callables, got Linear$"),
    (lambda: cggr_fn.route_depth([identity, 3], TARGETS), TypeError, r"layers: expected a sequence of callables, got int at index 1"),
    (lambda: cggr_fn.route_depth([identity], SCORES), TypeError, r"depth: expected an integer tensor"),
    (lambda: cggr_fn.route_depth([identity], TARGETS, leak=2.0), ValueError, r"leak: expected a value in \[0, 1\]"),
    # loss
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK[0]), ValueError, r"mask: expected shape \(2, 3\)"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK.long()), TypeError, r"mask: expected dtype torch.bool"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK.to("meta")), ValueError, r"mask: expected device cpu \(the logits' device\), got meta"),
    (lambda: cggr_fn.token_stats(LOGITS, TARGETS.to("meta")), ValueError, r"targets: expected device cpu \(the logits' device\), got meta"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK, normalize="batch"), ValueError, r"normalize: expected one of \('selected', 'valid'\)"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK, weights=[1.0]), TypeError, r"weights: expected a floating-point tensor, got list"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK, weights=TARGETS), TypeError, r"weights: expected a floating-point tensor, got torch.int64"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK, weights=torch.ones(3)), ValueError, r"weights: expected shape \(2, 3\)"),
    (lambda: cggr_fn.selective_loss(LOGITS, TARGETS, MASK, weights=torch.ones(2, 3, device="meta")), ValueError, r"weights: expected device cpu"),
    # fused LM head
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD[:, :3]), ValueError, r"weight: expected shape \(vocab, 5\) \(hidden_size = hidden.shape\[-1\]\), got \(7, 3\)"),
    (lambda: cggr_fn.fused_linear_token_stats(LOGITS.long(), HEAD), TypeError, r"hidden: expected a floating-point tensor, got dtype torch.int64"),
    (lambda: cggr_fn.fused_linear_token_stats(torch.tensor(1.0), HEAD), ValueError, r"hidden: expected at least 1 dimension"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD[:1]), ValueError, r"weight: expected a vocabulary of at least 2 \(weight.shape\[0\]\), got 1"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD.double()), TypeError, r"weight: expected dtype torch.float32 \(hidden's dtype\), got torch.float64"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD.to("meta")), ValueError, r"weight: expected device cpu \(hidden's device\), got meta"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD, bias=torch.zeros(6)), ValueError, r"bias: expected shape \(7,\) \(weight.shape\[0\]\), got \(6,\)"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD, bias=torch.zeros(7).half()), TypeError, r"bias: expected dtype torch.float32"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD, TARGETS[0]), ValueError, r"targets: expected shape \(2, 3\) \(hidden.shape\[:-1\]\), got \(3,\)"),
    (lambda: cggr_fn.fused_linear_token_stats(HIDDEN, HEAD, chunk_size=0), ValueError, r"chunk_size: expected an int >= 1, got 0"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK[0]), ValueError, r"selection: a mask must have shape \(2, 3\) \(hidden.shape\[:-1\]\), got \(3,\)"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK.float()), TypeError, r"selection: expected a boolean mask or int64/int32 positions, got dtype torch.float32"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, TARGETS), ValueError, r"selection: positions must be a 1-D tensor, got shape \(2, 3\)"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, [0, 1]), TypeError, r"selection: expected a boolean mask or integer positions \(a torch.Tensor\), got list"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK, capacity=7), ValueError, r"capacity: expected an int <= 6 \(the number of tokens\), got 7"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK, capacity=-1), ValueError, r"capacity: expected an int >= 0, got -1"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, torch.tensor([0]), capacity=1), ValueError, r"capacity: applies to a mask selection"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK.to("meta")), ValueError, r"selection: expected device cpu \(hidden's device\), got meta"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK, weights=torch.ones(3)), ValueError, r"weights: expected shape \(2, 3\) \(hidden.shape\[:-1\]\)"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN, HEAD, TARGETS, MASK, normalize="batch"), ValueError, r"normalize: expected one of \('selected', 'valid'\)"),
    (lambda: cggr_fn.fused_selective_loss(HIDDEN[:0], HEAD, TARGETS[:0], torch.tensor([0])), ValueError, r"selection: 1 positions into 0 tokens"),
    (lambda: cggr_fn.fused_head_loss(HIDDEN, HEAD, TARGETS, ratio=torch.tensor(0.5)), TypeError, r"ratio: expected a Python float \(pass 2 runs on a static number of rows"),
    (lambda: cggr_fn.fused_head_loss(HIDDEN, HEAD, TARGETS, ratio=0.0), ValueError, r"ratio: expected a value in \(0, 1\], got 0.0"),
    (lambda: cggr_fn.fused_head_loss(HIDDEN, HEAD, TARGETS, ratio=0.5, strategy="random"), ValueError, r"strategy: expected one of \('topk', 'stratified', 'sequence_aware', 'priority'\)"),
    (lambda: cggr_fn.fused_head_loss(HIDDEN, HEAD, TARGETS, ratio=0.5, method="perplexity"), ValueError, r"method: expected one of"),
    (lambda: cggr_fn.fused_head_loss(HIDDEN, HEAD, TARGETS, ratio=0.5, uniform_mix=2.0, strategy="priority"), ValueError, r"uniform_mix: expected a value in \[0, 1\]"),
    # references
    (lambda: cggr_fn.excess(SCORES, SCORES[0]), ValueError, r"reference: expected the shape of scores \(2, 3\), got \(3,\)"),
    (lambda: cggr_fn.excess(SCORES, TARGETS), TypeError, r"reference: expected a floating-point tensor, got dtype torch.int64"),
    (lambda: cggr_fn.excess(SCORES.tolist(), SCORES), TypeError, r"scores: expected a torch.Tensor, got list"),
    (lambda: cggr_fn.excess(SCORES, SCORES.to("meta")), ValueError, r"reference: expected the device of scores \(cpu\), got meta"),
    (lambda: cggr_fn.trim(SCORES, 1.5), ValueError, r"fraction: expected a value in \[0, 1\], got 1.5"),
    (lambda: cggr_fn.trim(TARGETS, 0.1), TypeError, r"scores: expected a floating-point tensor"),
    (lambda: cggr_fn.ema(0.0), ValueError, r"step_size: expected a value in \(0, 1\], got 0.0"),
    (lambda: cggr_fn.ema(0.1).update({"w": SCORES}, {"w": SCORES}), TypeError, r"state: expected an EmaState \(from init\), got dict"),
    (lambda: cggr_fn.ema(0.1).update(cggr_fn.EmaState({"w": SCORES}), {"v": SCORES}), ValueError, r"params: expected the structure of the average"),
    (lambda: cggr_fn.ema(0.1).update(cggr_fn.EmaState({"w": SCORES}), {"w": SCORES[0]}), ValueError, r"params: expected a tensor of shape \(2, 3\), got \(3,\)"),
]


@pytest.mark.parametrize("call, error, message", CASES, ids=[c[2][:48] for c in CASES])
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_checking_mode_catches_value_errors_that_need_a_sync():
    with cggr_fn.checking():
        with pytest.raises(ValueError, match=r"step: expected a step >= 0, got -2"):
            cggr_fn.bucket(SCORES, torch.tensor(-2))
        with pytest.raises(ValueError, match=r"ratio: expected a value in \(0, 1\], got 1.5"):
            cggr_fn.select(SCORES, ratio=torch.tensor(1.5))
        with pytest.raises(ValueError, match=r"depth: expected values in \[0, 2\], got \[-1, 1\]"):
            cggr_fn.depth_masks(torch.tensor([-1, 1]), num_layers=2)
        with pytest.raises(ValueError, match=r"targets: expected values in \[0, 5\) or ignore_index=-100"):
            cggr_fn.selective_loss(LOGITS, TARGETS + 3, MASK)
        with pytest.raises(ValueError, match=r"reference: contains NaN"):
            cggr_fn.excess(SCORES, torch.full_like(SCORES, float("nan")))
    cggr_fn.bucket(SCORES, torch.tensor(-2))  # off by default: no sync, clamps to step 0


def test_checking_mode_refuses_to_run_under_compile():
    @torch.compile(backend="eager", fullgraph=True)
    def compiled(scores):
        return cggr_fn.select(scores, ratio=torch.tensor(0.5))

    with cggr_fn.checking(), pytest.raises(Exception, match="cannot run under torch.compile"):
        compiled(SCORES)
