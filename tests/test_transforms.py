"""The transform matrix: every public function under torch.func and torch.compile(fullgraph=True)."""

import pytest
import torch
import torch._dynamo.testing

import cggr_fn
from cggr_fn import testing

VOCAB, HIDDEN, BATCH, SEQ = 11, 8, 3, 6


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens, depth=None):
        hidden = self.embed(tokens)
        layers = [lambda h, block=block: h + torch.tanh(block(h)) for block in self.blocks]
        if depth is not None:
            hidden = cggr_fn.route_depth(layers, depth)(hidden)
        else:
            for layer in layers:
                hidden = layer(hidden)
        return self.head(hidden)


def cggr_loss(model, params, tokens, targets, step, strategy="topk"):
    """One CGGR objective: score on a no-grad pass, bucket + select, routed forward."""
    with torch.no_grad():
        scores = cggr_fn.score(torch.func.functional_call(model, params, (tokens,)), targets)
    depth = cggr_fn.bucket_depth(scores, step, num_layers=3, num_buckets=3, warmup_steps=4)
    ratio = cggr_fn.ratio_schedule(step, warmup_steps=4, final_ratio=0.5)
    mask = cggr_fn.select(scores, ratio=ratio, strategy=strategy, seed=step)
    logits = torch.func.functional_call(model, params, (tokens,), {"depth": depth})
    return cggr_fn.selective_loss(logits, targets, mask, normalize="valid")


@pytest.fixture
def problem():
    torch.manual_seed(0)
    model = TinyLM()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets[0, -1] = -100
    return model, params, tokens, targets


def reference_grads(model, params, tokens, targets, step, strategy="topk"):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = cggr_loss(model, leaves, tokens, targets, step, strategy)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))


@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware"])
def test_func_grad_and_vjp_agree_with_autograd(problem, strategy):
    model, params, tokens, targets = problem
    step = torch.tensor(3)
    expected = reference_grads(model, params, tokens, targets, step, strategy)
    grads = torch.func.grad(lambda p: cggr_loss(model, p, tokens, targets, step, strategy))(params)
    _, vjp_fn = torch.func.vjp(lambda p: cggr_loss(model, p, tokens, targets, step, strategy), params)
    (vjp_grads,) = vjp_fn(torch.tensor(1.0))
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value)
        torch.testing.assert_close(vjp_grads[name], value)


def test_routing_changes_the_gradient(problem):
    model, params, tokens, targets = problem
    early = reference_grads(model, params, tokens, targets, torch.tensor(0))
    late = reference_grads(model, params, tokens, targets, torch.tensor(4))
    assert not torch.allclose(early["blocks.0.weight"], late["blocks.0.weight"])


def test_vmap_of_grad_gives_per_sample_gradients(problem):
    model, params, tokens, targets = problem
    step = torch.tensor(4)

    def per_sample(p, tok, tgt):
        return cggr_loss(model, p, tok.unsqueeze(0), tgt.unsqueeze(0), step)

    batched = torch.func.vmap(torch.func.grad(per_sample), in_dims=(None, 0, 0))(params, tokens, targets)
    for i in range(BATCH):
        one = reference_grads(model, params, tokens[i : i + 1], targets[i : i + 1], step)
        for name, value in one.items():
            torch.testing.assert_close(batched[name][i], value)


def test_vmap_over_score_bucket_select():
    logits = torch.randn(4, 5, VOCAB)
    scores = torch.func.vmap(cggr_fn.score)(logits)
    torch.testing.assert_close(scores, cggr_fn.score(logits))
    buckets = torch.func.vmap(lambda s: cggr_fn.bucket(s, 7, num_buckets=2, warmup_steps=4))(scores)
    assert torch.equal(buckets[1], cggr_fn.bucket(scores[1], 7, num_buckets=2, warmup_steps=4))
    for strategy in ("topk", "stratified", "sequence_aware"):
        masks = torch.func.vmap(lambda s: cggr_fn.select(s, ratio=0.4, strategy=strategy))(scores)
        assert torch.equal(masks[2], cggr_fn.select(scores[2], ratio=0.4, strategy=strategy))


@pytest.fixture
def compile_counter():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    yield counter
    torch._dynamo.reset()


@pytest.mark.parametrize("strategy", ["topk", "stratified", "sequence_aware"])
def test_compiled_grad_of_the_step_has_no_graph_break_and_no_recompile_per_step(problem, strategy):
    model, params, tokens, targets = problem
    grad_fn = torch.func.grad(lambda p, step: cggr_loss(model, p, tokens, targets, step, strategy))
    testing.assert_max_recompiles(grad_fn, 1, [(params, torch.tensor(step)) for step in range(6)])


def test_compiled_functions_with_inductor(problem):
    """The public pieces, compiled with the default backend, agree with eager."""
    model, params, tokens, targets = problem
    logits = torch.func.functional_call(model, params, (tokens,))

    def pipeline(logits, step, ratio):
        scores = cggr_fn.score(logits, targets, method="margin")
        return (
            cggr_fn.bucket(scores, step, warmup_steps=10),
            cggr_fn.select(scores, ratio=cggr_fn.dynamic_ratio(ratio, cggr_fn.token_stats(logits).confidence)),
            cggr_fn.selective_loss(logits, targets, cggr_fn.select(scores, ratio=0.5)),
        )

    compiled = torch.compile(pipeline, fullgraph=True)
    for step in (2, 9):
        args = (logits, torch.tensor(step), torch.tensor(0.5))
        for got, expected in zip(compiled(*args), pipeline(*args)):
            torch.testing.assert_close(got, expected)


def test_compiled_route_grad_with_backward(compile_counter):
    x = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([True, False, True, False])

    def f(x, mask):
        return cggr_fn.route_grad(lambda t: (t.sin(), {"b": t * 2}), mask, leak=0.5)(x)

    compiled = torch.compile(f, backend=compile_counter, fullgraph=True)
    out = compiled(x, mask)
    (got,) = torch.autograd.grad(out[0].sum() + out[1]["b"].sum(), x)
    expected = (x.cos() + 2) * torch.where(mask, 1.0, 0.5).unsqueeze(-1)
    torch.testing.assert_close(got, expected.detach())
