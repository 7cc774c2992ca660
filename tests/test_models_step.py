"""``cggr_loss``: the compacted CGGR loss equals its masking reference, compiles fullgraph, and rejects bad input.

The reference for every selection is built from the library's uncompacted
pieces and the routing the call reports: the depth-routed forward without
capacities (gradients gated in place) and the masked loss on full logits.
Float64 on CPU, so the gradients must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import cggr_fn
from cggr_fn.models import Routing, cggr_loss, depth_routed_forward, lm_loss, lm_targets, token_scores, truncated_router

VOCAB, HIDDEN, LAYERS, BATCH, SEQ = 48, 16, 3, 2, 9
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name]().to(dtype).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, 6:] = 0
    labels = torch.where(attention_mask.bool(), ids, -100)
    return ids, attention_mask, labels


def reference_loss(model: nn.Module, selection: str, params: dict[str, torch.Tensor], ids: torch.Tensor,
                   attention_mask: torch.Tensor, labels: torch.Tensor, routing: Routing) -> torch.Tensor:
    logits = depth_routed_forward(model)(params, routing.depth, input_ids=ids, attention_mask=attention_mask).logits
    if selection == "buckets":
        return lm_loss(logits, labels, attention_mask=attention_mask)
    targets = lm_targets(labels, attention_mask=attention_mask)
    if selection == "priority":
        return cggr_fn.selective_loss(logits, targets, routing.depth > 0, weights=routing.weights, normalize="valid")
    return cggr_fn.selective_loss(logits, targets, routing.depth > 0)


@pytest.mark.parametrize("fused_head", [False, True], ids=["linear_head", "fused_head"])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("selection", ["topk", "priority", "random", "buckets"])
def test_loss_and_grads_equal_the_masked_reference_in_float64(name: str, selection: str, fused_head: bool) -> None:
    model = build(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    method = "grad_norm" if selection == "priority" else "combined"
    loss_fn = cggr_loss(model, selection=selection, ratio=0.25, router_layers=1, warmup_steps=4, method=method,
                        fused_head=fused_head)
    grads, (loss, routing) = torch.func.grad_and_value(loss_fn, has_aux=True)(
        params, ids, 7, labels=labels, attention_mask=attention_mask)
    assert isinstance(routing, Routing)
    expected_grads, expected_loss = torch.func.grad_and_value(
        lambda p: reference_loss(model, selection, p, ids, attention_mask, labels, routing))(params)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-10, atol=1e-12, msg=key)
    # Something trained and something did not: the comparison is not vacuous.
    assert any(g.abs().sum() > 0 for g in grads.values())
    if selection != "buckets":
        trained = routing.depth > 0
        assert int(trained.sum()) == cggr_fn.capacity(ids.numel(), ratio=0.25)
        assert set(routing.depth.unique().tolist()) <= {0, LAYERS}
        assert torch.equal(routing.weights > 0, trained)
    else:
        assert {1, 2, LAYERS} <= set(routing.depth.unique().tolist())  # tiers of 25/50/100% depth


def test_priority_weights_make_an_unbiased_estimate() -> None:
    """Averaged over seeds (steps), the weighted sample's loss approaches the dense mean loss."""
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, selection="priority", ratio=0.5, router_layers=LAYERS, method="loss")
    dense = lm_loss(model(input_ids=ids, attention_mask=attention_mask).logits, labels, attention_mask=attention_mask)
    with torch.no_grad():
        losses = torch.stack([loss_fn(params, ids, step, labels=labels, attention_mask=attention_mask)[0]
                              for step in range(300)])
    stderr = losses.std() / 300**0.5
    assert abs(losses.mean() - dense) < 4 * stderr + 1e-9, (losses.mean(), dense, stderr)


def test_reference_and_trim_shape_the_scores() -> None:
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    plain = cggr_loss(model, router_layers=1, method="loss")
    scores = plain(params, ids, 0, labels=labels, attention_mask=attention_mask)[1].scores
    reference = torch.rand(BATCH, SEQ, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, routing = plain(params, ids, 0, labels=labels, attention_mask=attention_mask, reference=reference)
    torch.testing.assert_close(routing.scores, cggr_fn.excess(scores, reference))
    assert torch.equal(routing.depth > 0, cggr_fn.select(cggr_fn.excess(scores, reference), ratio=0.25))
    trimmed = cggr_loss(model, router_layers=1, method="loss", trim=0.2)
    _, routing = trimmed(params, ids, 0, labels=labels, attention_mask=attention_mask, reference=reference)
    torch.testing.assert_close(routing.scores, cggr_fn.trim(cggr_fn.excess(scores, reference), 0.2))


@pytest.mark.parametrize("selection", ["topk", "buckets"])
def test_scores_are_the_truncated_routers(selection: str) -> None:
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    _, routing = cggr_loss(model, selection=selection, router_layers=2, method="entropy")(
        params, ids, 0, labels=labels, attention_mask=attention_mask)
    router_logits = truncated_router(model, num_layers=2)(params, ids, attention_mask=attention_mask)
    expected = token_scores(router_logits, labels, attention_mask=attention_mask, method="entropy")
    torch.testing.assert_close(routing.scores, expected)
    if selection == "topk":
        assert torch.equal(routing.depth > 0, cggr_fn.select(expected, ratio=0.25))


def test_random_selection_is_a_pure_function_of_the_step() -> None:
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, selection="random", ratio=0.5)
    depths = [loss_fn(params, ids, step, labels=labels, attention_mask=attention_mask)[1].depth for step in (3, 3, 4)]
    assert torch.equal(depths[0], depths[1]) and not torch.equal(depths[0], depths[2])
    # Padding and the last position of each sequence (no next token) never train.
    targets = lm_targets(labels, attention_mask=attention_mask)
    assert not (depths[2] > 0)[targets == -100].any()
    tensor_step = loss_fn(params, ids, torch.tensor(4), labels=labels, attention_mask=attention_mask)[1].depth
    assert torch.equal(tensor_step, depths[2])


@pytest.mark.parametrize("selection, fused_head", [("topk", False), ("topk", True), ("priority", False),
                                                   ("random", False), ("buckets", False), ("buckets", True)])
def test_the_training_step_compiles_fullgraph_once(selection: str, fused_head: bool) -> None:
    torch._dynamo.reset()
    model = build("llama", torch.float32)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, selection=selection, ratio=0.25, router_layers=1, warmup_steps=2, fused_head=fused_head)
    step_fn = torch.func.grad_and_value(loss_fn, has_aux=True)
    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    for step in (2, 3):
        # The step is data: a new one reuses the graph.
        with torch._dynamo.config.patch(error_on_recompile=step > 2):
            got, (loss, _) = compiled(params, ids, torch.tensor(step), labels=labels, attention_mask=attention_mask)
        expected, (expected_loss, _) = step_fn(params, ids, torch.tensor(step), labels=labels, attention_mask=attention_mask)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


class _RowMoves(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the forward's row permutations (``index_copy``, the only way rows move)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func is torch.ops.aten.index_copy.default
        return func(*args, **(kwargs or {}))


# Rows moved per layer when the stack runs streamed: the outputs of the input projections (q, k, v for the
# Llama family; GPT-2's fused c_attn) back in place, the output projection's input into partition order.
_MOVES_PER_LAYER = {"llama": 4, "qwen2": 4, "gpt2": 2}


@pytest.mark.parametrize("name", FAMILIES)
def test_one_shared_partition_moves_rows_only_around_attention(name: str) -> None:
    """A selection gives every layer one mask: the stream enters partition order once and leaves once (+ the head)."""
    model = build(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1)
    with _RowMoves() as moves:
        loss_fn(params, ids, 0, labels=labels, attention_mask=attention_mask)
    assert moves.count == LAYERS * _MOVES_PER_LAYER[name] + 3


def test_bucket_tiers_share_partitions_within_a_tier() -> None:
    """Buckets: one partition per distinct tier mask; the stream is reordered only where the tier changes."""
    layers = 8
    config = transformers.LlamaConfig(**{**_LLAMA_LIKE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, selection="buckets", num_buckets=4, router_layers=1, warmup_steps=0)
    seen = []
    original = loss_fn.forward._partitions
    loss_fn.forward._partitions = lambda *args: seen.append(original(*args)) or seen[-1]
    with _RowMoves() as moves:
        grads, (_, routing) = torch.func.grad_and_value(loss_fn, has_aux=True)(
            params, ids, 0, labels=labels, attention_mask=attention_mask)
    (partitions,) = seen
    # Depths 8/6/4/2: layers 0-1 (only depth 8), 2-3, 4-5 each share one partition; layers 6-7 run whole.
    assert partitions[0] is partitions[1] and partitions[2] is partitions[3] and partitions[4] is partitions[5]
    assert len({id(p) for p in partitions[:6]}) == 3 and partitions[6] is partitions[7] is None
    assert moves.count == 6 * 4 + 3 * 2
    expected = torch.func.grad(lambda p: lm_loss(depth_routed_forward(model)(
        p, routing.depth, input_ids=ids, attention_mask=attention_mask).logits, labels,
        attention_mask=attention_mask))(params)
    for key in grads:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)


def test_levels_that_depth_breaks_raise_under_checking() -> None:
    model = build("llama")
    forward = depth_routed_forward(model)
    ids, _, _ = batch()
    depth = torch.full(ids.shape, LAYERS)
    depth[0, 0] = 1
    base = forward.module.get_submodule("model")
    params = {k[len("model."):]: v.detach() for k, v in model.named_parameters() if k.startswith("model.")}
    with cggr_fn.checking(), pytest.raises(ValueError, match=r"depth: expected only the levels \[0, 3\]"):
        forward.call_module(base, params, depth, (), {"input_ids": ids}, capacity=ids.numel() - 1, levels=(0, LAYERS))


def test_backward_through_autograd_matches_func_grad() -> None:
    model = build("gpt2")
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, ratio=0.5, router_layers=1)
    params = dict(model.named_parameters())
    loss, _ = loss_fn(params, ids, 0, labels=labels, attention_mask=attention_mask)
    loss.backward()
    detached = {k: v.detach() for k, v in params.items()}
    expected = torch.func.grad(lambda p: loss_fn(p, ids, 0, labels=labels, attention_mask=attention_mask)[0])(detached)
    for key, value in params.items():
        torch.testing.assert_close(value.grad, expected[key], msg=key)


def test_buckets_before_the_capacity_step_raise_under_checking() -> None:
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    loss_fn = cggr_loss(model, selection="buckets", warmup_steps=10)
    loss_fn(params, ids, 10, labels=labels, attention_mask=attention_mask)
    with cggr_fn.checking(), pytest.raises(ValueError, match="more than the capacity"):
        loss_fn(params, ids, 0, labels=labels, attention_mask=attention_mask)
    # An early capacity step fits every later step.
    early = cggr_loss(model, selection="buckets", warmup_steps=10, capacity_step=0)
    with cggr_fn.checking():
        for step in (0, 5, 10):
            early(params, ids, step, labels=labels, attention_mask=attention_mask)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"selection": "hardest"}, ValueError, "selection: expected one of"),
        ({"ratio": 0.0}, ValueError, "ratio"),
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"router_layers": 0}, ValueError, "router_layers"),
        ({"router_layers": LAYERS + 1}, ValueError, "router_layers: expected at most the model's 3 layers"),
        ({"num_buckets": 0}, ValueError, "num_buckets"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"capacity_step": -2}, ValueError, "capacity_step"),
        ({"trim": 1.5}, ValueError, r"trim: expected a value in \[0, 1\]"),
        ({"fused_head": "yes"}, TypeError, "fused_head: expected a bool"),
        ({"selection": "random", "trim": 0.1}, ValueError, "trim: random selection has no scores to trim"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cggr_loss(build("llama"), **kwargs)


def test_bad_calls_raise() -> None:
    model = build("llama")
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = cggr_loss(model, router_layers=1)
    with pytest.raises(ValueError, match=r"input_ids: expected a \(batch, seq\) tensor"):
        loss_fn(params, torch.arange(5), 0)
    with pytest.raises(KeyError, match="params: no entry for the head's weight"):
        loss_fn({k: v for k, v in params.items() if k != "lm_head.weight"}, batch()[0], 0)
    with pytest.raises(ValueError, match="reference: expected the shape of scores"):
        loss_fn(params, batch()[0], 0, reference=torch.zeros(3))
    with pytest.raises(ValueError, match="reference: random selection has no scores"):
        cggr_loss(model, selection="random")(params, batch()[0], 0, reference=torch.zeros(BATCH, SEQ))


def test_models_with_transformed_logits_are_refused() -> None:
    config = transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=4, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        cggr_loss(transformers.Gemma2ForCausalLM(config))


@pytest.mark.parametrize("favoured", [0, 1])
def test_hardest_sequence_loss_ranks_by_mean_excess_with_a_reference(favoured: int) -> None:
    from cggr_fn.models import hardest_sequence_loss

    model = build("gpt2")
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask, labels = batch()
    router = truncated_router(model, num_layers=1)
    # The reference finds every sequence but the favoured one far easier than the model does... or far harder.
    reference = torch.full((BATCH, SEQ), 50.0, dtype=torch.float64)
    reference[favoured] = -50.0
    loss = hardest_sequence_loss(model, router, params, ids, labels, ratio=0.5, attention_mask=attention_mask,
                                 reference=reference)
    one = slice(favoured, favoured + 1)
    expected = lm_loss(model(input_ids=ids[one], attention_mask=attention_mask[one]).logits, labels[one],
                       attention_mask=attention_mask[one])
    torch.testing.assert_close(loss, expected)
