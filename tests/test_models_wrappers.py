"""The seed's wrappers as pure functions: targets, scores, hardest sequences, routing masks, selective LM loss."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import cggr_fn
from cggr_fn.models import (
    ScoredMask,
    hardest_sequence_loss,
    hardest_sequences,
    lm_loss,
    lm_targets,
    routing_mask,
    selective_lm_loss,
    sequence_scores,
    take_sequences,
    token_scores,
    truncated_router,
)

VOCAB, SEQ = 64, 8
INF = float("inf")


def tiny_llama(dtype: torch.dtype = torch.float64) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def batch(size: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (size, SEQ), generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([SEQ, 5, SEQ, 3, SEQ, 6, 4, SEQ][:size])
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    return ids, torch.where(mask.bool(), ids, -100), mask


# --------------------------------------------------------------------------- targets and scores


def test_lm_targets_shift_and_padding() -> None:
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert lm_targets(labels).tolist() == [[6, 7, 8, -100], [10, -100, -100, -100]]
    assert lm_targets(labels, causal=False).tolist() == labels.tolist()
    # Padding targets are excluded even when their labels are real tokens; a pad
    # position predicting a real token keeps its target, as in the model's own loss.
    assert lm_targets(torch.tensor([[5, 6, 7, 8]]), attention_mask=torch.tensor([[0, 1, 1, 0]])).tolist() == [
        [6, 7, -100, -100]
    ]
    assert lm_targets(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 0, 1]]), causal=False).tolist() == [
        [5, -100, 7]
    ]
    assert lm_targets(labels, attention_mask=mask, ignore_index=-1)[1].tolist() == [10, -1, -1, -1]


def test_lm_targets_errors() -> None:
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        lm_targets(torch.ones(2, 3))
    with pytest.raises(TypeError, match="labels: expected a torch.Tensor"):
        lm_targets([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 3\)"):
        lm_targets(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_token_scores_align_position_t_with_label_t_plus_1() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    scores = token_scores(logits, labels, method="loss")
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(scores[:, :-1], expected.reshape(2, 4))
    assert bool(torch.isneginf(scores[:, -1]).all())
    unshifted = token_scores(logits, labels, method="loss", causal=False)
    torch.testing.assert_close(unshifted, torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none"))
    # Without labels: every real position scored, padding -inf.
    no_labels = token_scores(logits, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), method="entropy")
    assert torch.isneginf(no_labels).tolist() == [[False, False, False, True, True], [False] * 5]
    with pytest.raises(ValueError, match='method: "loss" scores by the nll and needs targets'):
        token_scores(logits, method="loss")


def test_sequence_scores_and_hardest_sequences() -> None:
    nan = float("nan")
    scores = torch.tensor([[0.1, 0.3, -INF], [-INF, -INF, -INF], [0.9, 0.1, 0.2], [nan, 0.0, 0.0], [0.2, 0.2, -INF]])
    per_sequence = sequence_scores(scores)
    torch.testing.assert_close(per_sequence[[0, 2, 4]], torch.tensor([0.2, 0.4, 0.2]))
    assert torch.isneginf(per_sequence[1]) and torch.isnan(per_sequence[3])
    assert hardest_sequences(scores, ratio=0.4).tolist() == [2, 3]  # NaN counts as the hardest
    assert hardest_sequences(scores, ratio=0.6).tolist() == [0, 2, 3]  # tie 0 vs 4: the earlier wins
    assert hardest_sequences(scores, ratio=1.0).tolist() == [0, 1, 2, 3, 4]
    assert hardest_sequences(scores, ratio=1e-9).tolist() == [3]
    with pytest.raises(TypeError, match="ratio: expected a Python float"):
        hardest_sequences(scores, ratio=torch.tensor(0.5))
    with pytest.raises(ValueError, match="scores: expected a \\(batch, seq\\) tensor"):
        sequence_scores(torch.zeros(3))
    with pytest.raises(ValueError, match="ratio: expected a value in \\(0, 1\\]"):
        hardest_sequences(scores, ratio=0.0)
    with pytest.raises(TypeError, match="positional argument"):
        hardest_sequences(scores, 0.5)  # type: ignore[misc]


def test_take_sequences_gathers_exactly_the_per_token_tensors() -> None:
    ids = torch.arange(12).reshape(4, 3)
    batch = {"input_ids": ids, "position_ids": torch.arange(3)[None], "embeds": torch.ones(4, 3, 2), "flag": True}
    out = take_sequences(batch, torch.tensor([3, 1]), batch_shape=ids.shape)
    assert out["input_ids"].tolist() == [[9, 10, 11], [3, 4, 5]] and out["embeds"].shape == (2, 3, 2)
    assert out["position_ids"].tolist() == [[0, 1, 2]] and out["flag"] is True
    # A 1-d tensor whose length equals the batch size is not the batch axis.
    square = {"input_ids": torch.arange(9).reshape(3, 3), "cache_position": torch.arange(3)}
    out = take_sequences(square, torch.tensor([1]), batch_shape=(3, 3))
    assert out["input_ids"].tolist() == [[3, 4, 5]] and out["cache_position"].tolist() == [0, 1, 2]
    # Batch-leading but not (batch, seq): ambiguous, refused rather than guessed.
    with pytest.raises(ValueError, match=r"batch: 'attention_mask' of shape \(4, 1, 3, 3\) starts with the batch dim"):
        take_sequences({"input_ids": ids, "attention_mask": torch.ones(4, 1, 3, 3)}, torch.tensor([1]), batch_shape=(4, 3))
    with pytest.raises(TypeError, match="batch_shape: expected the \\(batch, seq\\) shape"):
        take_sequences({"input_ids": ids}, torch.tensor([1]), batch_shape=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="indices: expected a 1-d int64 tensor"):
        take_sequences({"input_ids": ids}, torch.tensor([1.0]), batch_shape=(4, 3))
    with pytest.raises(TypeError, match="batch: expected a mapping"):
        take_sequences([ids], torch.tensor([1]), batch_shape=(4, 3))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("side", ["right", "left"])
def test_lm_loss_equals_the_models_own_loss(side: str) -> None:
    model = tiny_llama()
    ids, labels, mask = batch()
    if side == "left":
        ids, labels, mask = ids.flip(-1), labels.flip(-1), mask.flip(-1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)
    expected = out.loss.double()
    torch.testing.assert_close(lm_loss(out.logits, labels, attention_mask=mask).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm_loss(out.logits, labels).double(), expected, rtol=1e-6, atol=1e-6)
    # Positions scored and selectable are exactly the positions the loss trains.
    scores = token_scores(out.logits, labels, attention_mask=mask, method="loss")
    trained = lm_targets(labels, attention_mask=mask) != -100
    assert torch.equal(~torch.isneginf(scores), trained)
    torch.testing.assert_close(selective_lm_loss(out.logits, labels, ratio=1.0, attention_mask=mask).double(), expected,
                               rtol=1e-6, atol=1e-6)


def test_selective_lm_loss_matches_a_hand_computation() -> None:
    logits = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6])
    loss = selective_lm_loss(logits, labels, ratio=0.25, attention_mask=mask, method="loss")
    # By hand: next-token nll of every real (position, target) pair, the ceil(0.25 * 18) = 5 largest, mean.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    expected = nll[valid].topk(5).values.mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert int((logits.grad.abs().sum(-1) > 0).sum()) == 5
    assert bool((logits.grad[1, 3:] == 0).all())  # no target or padding: never trained
    # ratio 1 = the dense loss; a tensor ratio works (dynamic ratio).
    torch.testing.assert_close(selective_lm_loss(logits, labels, ratio=1.0, attention_mask=mask),
                               lm_loss(logits, labels, attention_mask=mask))
    torch.testing.assert_close(selective_lm_loss(logits, labels, ratio=torch.tensor(0.25), attention_mask=mask, method="loss"),
                               expected)
    # Every option is keyword-only, the ratio included.
    with pytest.raises(TypeError, match="positional argument"):
        selective_lm_loss(logits, labels, 0.25)  # type: ignore[misc]


def test_selective_lm_loss_compiles_fullgraph() -> None:
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    fn = lambda x, r: selective_lm_loss(x, labels, ratio=r, strategy="stratified", seed=3)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, torch.tensor(0.5)),
                               fn(logits, torch.tensor(0.5)))


# --------------------------------------------------------------------------- router-based wrappers


def test_hardest_sequence_loss_trains_on_the_hardest_sequences() -> None:
    model = tiny_llama()
    router = truncated_router(model, num_layers=1)
    params = params_of(model)
    ids, labels, mask = batch()
    grads, loss = torch.func.grad_and_value(
        lambda p: hardest_sequence_loss(model, router, p, ids, labels, ratio=0.5, attention_mask=mask)
    )(params)
    # By hand: router scores -> mean per sequence over real targets -> top 2 -> model loss on them.
    logits = router(params, ids, attention_mask=mask)
    nll_scores = token_scores(logits, labels, attention_mask=mask)
    keep = sorted(sequence_scores(nll_scores).topk(2).indices.tolist())
    assert hardest_sequences(nll_scores, ratio=0.5).tolist() == keep
    expected = model(input_ids=ids[keep], attention_mask=mask[keep], labels=labels[keep]).loss
    torch.testing.assert_close(loss.float(), expected)  # float64 vs Hugging Face's float32
    dense_keep = torch.func.grad(
        lambda p: torch.func.functional_call(model, p, (), {"input_ids": ids[keep], "attention_mask": mask[keep],
                                                             "labels": labels[keep]}).loss
    )(params)
    for key in grads:
        torch.testing.assert_close(grads[key], dense_keep[key])
    with pytest.raises(TypeError, match="router: expected a TruncatedRouter"):
        hardest_sequence_loss(model, model, params, ids, labels, ratio=0.5)  # type: ignore[arg-type]


def test_routing_mask_has_static_shape_and_skips_padding() -> None:
    model = tiny_llama()
    router = truncated_router(model, num_layers=2)
    ids, labels, mask = batch()
    out = routing_mask(router, params_of(model), ids, ratio=0.5, attention_mask=mask)
    assert isinstance(out, ScoredMask) and out.mask.shape == ids.shape and out.mask.dtype == torch.bool
    assert int(out.mask.sum()) == cggr_fn.capacity(ids.numel(), ratio=0.5)
    assert not bool((out.mask & ~mask.bool()).any())
    torch.testing.assert_close(out.difficulty, token_scores(router(params_of(model), ids, attention_mask=mask),
                                                            attention_mask=mask))
    # With labels and a ratio above the number of scorable positions: only scorable ones.
    full = routing_mask(router, params_of(model), ids, ratio=1.0, labels=labels, attention_mask=mask)
    assert torch.equal(full.mask, ~torch.isneginf(full.difficulty))
    assert int(full.mask.sum()) == int((lm_targets(labels, attention_mask=mask) != -100).sum())
    # Further model arguments are plain keywords.
    position_ids = torch.arange(SEQ)[None]
    strat = routing_mask(router, params_of(model), ids, ratio=torch.tensor(0.25), strategy="stratified", seed=2,
                         position_ids=position_ids)
    assert int(strat.mask.sum()) == cggr_fn.capacity(ids.numel(), ratio=0.25)
    torch.testing.assert_close(strat.difficulty, token_scores(router(params_of(model), ids, position_ids=position_ids)))


def test_routing_mask_returns_the_statistics_to_log() -> None:
    model = tiny_llama()
    router = truncated_router(model, num_layers=2)
    ids, labels, mask = batch()
    out = routing_mask(router, params_of(model), ids, ratio=0.25, labels=labels, attention_mask=mask)
    selectable = ~torch.isneginf(out.difficulty)
    assert out.k.dtype == torch.int64 and out.k.dim() == 0 and int(out.k) == int(out.mask.sum())
    assert int(out.k) == cggr_fn.capacity(ids.numel(), ratio=0.25)
    torch.testing.assert_close(out.ratio, out.k.to(out.difficulty.dtype) / selectable.sum())
    torch.testing.assert_close(out.mean_difficulty, out.difficulty[selectable].mean())
    torch.testing.assert_close(out.threshold, out.difficulty[out.mask].min())
    # topk: everything scoring above the threshold is selected.
    assert bool(out.mask[out.difficulty > out.threshold].all())
    assert all(isinstance(value, torch.Tensor) for value in out)


def test_mask_statistics_edge_cases() -> None:
    from cggr_fn.models._wrappers import _mask_statistics

    nan = float("nan")
    scores = torch.tensor([[nan, 3.0, 1.0, -INF]])
    k, ratio, mean, threshold = _mask_statistics(scores, torch.tensor([[True, True, False, False]]))
    assert int(k) == 2 and float(ratio) == pytest.approx(2 / 3) and torch.isnan(mean) and float(threshold) == 3.0
    _, _, _, only_nan = _mask_statistics(scores, torch.tensor([[True, False, False, False]]))
    assert torch.isnan(only_nan)
    k, ratio, mean, threshold = _mask_statistics(torch.full((1, 3), -INF), torch.zeros(1, 3, dtype=torch.bool))
    assert int(k) == 0 and float(ratio) == 0.0 and torch.isnan(mean) and torch.isposinf(threshold)
