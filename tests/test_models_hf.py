"""Hugging Face integration: detection, the truncated router and the depth-routed forward, per family.

Every model is a tiny random-init config built here; nothing is downloaded.
"""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import cggr_fn
from cggr_fn.models import ModelParts, depth_routed_forward, detect_parts, token_scores, truncated_router
from cggr_fn.models._common import default_kwargs

VOCAB, HIDDEN, LAYERS, SEQ = 64, 32, 3, 8
_SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32)
_LLAMA_LIKE = dict(**_SIZES, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=32,
                   bos_token_id=1, eos_token_id=2)

# family: (model class, config, expected layer-stack path)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**_LLAMA_LIKE), "model.layers"),
    "mistral": (transformers.MistralForCausalLM, lambda: transformers.MistralConfig(**_LLAMA_LIKE), "model.layers"),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(**_LLAMA_LIKE), "model.layers"),
    "gemma": (transformers.GemmaForCausalLM, lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=8), "model.layers"),
    "phi3": (transformers.Phi3ForCausalLM, lambda: transformers.Phi3Config(**_LLAMA_LIKE), "model.layers"),
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(**_GPT2_SIZES), "transformer.h"),
    "gptj": (transformers.GPTJForCausalLM, lambda: transformers.GPTJConfig(**_GPT2_SIZES, rotary_dim=4), "transformer.h"),
    "gpt_neox": (transformers.GPTNeoXForCausalLM, lambda: transformers.GPTNeoXConfig(**_SIZES, bos_token_id=1, eos_token_id=2),
                 "gpt_neox.layers"),
    "falcon": (transformers.FalconForCausalLM, lambda: transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2), "transformer.h"),
    "bert": (transformers.BertForMaskedLM, lambda: transformers.BertConfig(**_SIZES), "bert.encoder.layer"),
    "roberta": (transformers.RobertaForMaskedLM, lambda: transformers.RobertaConfig(**_SIZES, pad_token_id=1),
                "roberta.encoder.layer"),
    "mamba": (transformers.MambaForCausalLM, lambda: transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, state_size=4, expand=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0), "backbone.layers"),
}
CAUSAL = {name: name not in ("bert", "roberta") for name in FAMILIES}


def build(name: str, dtype: torch.dtype = torch.float32, **overrides: object) -> nn.Module:
    cls, make_config, _ = FAMILIES[name]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return cls(config).to(dtype).eval()


def hand_truncated(model: nn.Module, num_layers: int) -> nn.Module:
    """The reference: a genuinely ``num_layers``-layer model loaded with the model's first layers."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    # Per-layer lists (sliding-window patterns) are stored for Qwen2; Mamba derives them.
    if isinstance(config.__dict__.get("layer_types"), list):
        config.layer_types = config.layer_types[:num_layers]
    small = type(model)(config).to(next(model.parameters()).dtype)
    missing, unexpected = small.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    stack = detect_parts(model).layers
    assert all(key.startswith(stack + ".") and int(key[len(stack) + 1:].split(".")[0]) >= num_layers for key in unexpected)
    return small.eval()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def ids_for(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", FAMILIES)
def test_detect_finds_the_stack_of_every_family(name: str) -> None:
    model = build(name)
    parts = detect_parts(model)
    assert parts.layers == FAMILIES[name][2]
    assert len(model.get_submodule(parts.layers)) == LAYERS
    for path in parts:
        assert path is None or isinstance(model.get_submodule(path), nn.Module)
    assert parts.embedding is not None and parts.head is not None
    # The embedding is what the model itself reports as its input embedding.
    input_embedding = model.get_input_embeddings()
    assert any(m is input_embedding for m in model.get_submodule(parts.embedding).modules())


def test_detect_finds_the_pieces_of_a_bare_base_model() -> None:
    base = build("llama").model
    assert detect_parts(base) == ModelParts(
        layers="layers", embedding="embed_tokens", final_norm="norm", positions="rotary_emb", head=None
    )


@pytest.mark.parametrize(
    ("name", "final_norm", "positions"),
    [("llama", "model.norm", "model.rotary_emb"), ("gpt2", "transformer.ln_f", "transformer.wpe"),
     ("gpt_neox", "gpt_neox.final_layer_norm", "gpt_neox.rotary_emb"), ("bert", None, "bert.embeddings.position_embeddings"),
     ("mamba", "backbone.norm_f", None)],
)
def test_detect_reports_norm_and_positions(name: str, final_norm: str | None, positions: str | None) -> None:
    parts = detect_parts(build(name))
    assert (parts.final_norm, parts.positions) == (final_norm, positions)


class Toy(nn.Module):
    """An architecture no layout knows: blocks under an unusual name, a logits-returning forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(LAYERS)])
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        h = self.tok(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return SimpleNamespace(logits=self.out(h))


def test_unknown_architecture_raises_with_instructions() -> None:
    with pytest.raises(ValueError, match=r"model: cannot find the layer stack of a Toy.*parts=cggr_fn\.models\.ModelParts"):
        detect_parts(Toy())
    with pytest.raises(ValueError, match="cannot find the layer stack"):
        truncated_router(Toy(), num_layers=1)
    with pytest.raises(ValueError, match="cannot find the layer stack"):
        depth_routed_forward(Toy())


def test_explicit_parts_work_for_an_unknown_architecture() -> None:
    toy = Toy().double()
    parts = ModelParts(layers="blocks", embedding="tok", head="out")
    ids = ids_for()
    router = truncated_router(toy, num_layers=1, parts=parts)
    h = toy.tok(ids)
    expected = toy.out(h + toy.blocks[0](h))
    torch.testing.assert_close(router(params_of(toy), ids), expected)
    forward = depth_routed_forward(toy, parts=parts)
    depth = torch.full(ids.shape, LAYERS)
    grads = torch.func.grad(lambda p: forward(p, depth, ids).logits.square().sum())(params_of(toy))
    toy.out(toy.tok(ids)).sum()  # the model itself still runs normally
    dense = torch.func.grad(lambda p: torch.func.functional_call(toy, p, (ids,)).logits.square().sum())(params_of(toy))
    for name in dense:
        torch.testing.assert_close(grads[name], dense[name])


@pytest.mark.parametrize(
    ("parts", "error", "match"),
    [(ModelParts(layers="nope"), ValueError, "parts: layers='nope' is not a submodule path"),
     (ModelParts(layers="tok"), ValueError, "must name a non-empty nn.ModuleList"),
     (ModelParts(layers="blocks", head="missing"), ValueError, "head='missing'"),
     ({"layers": "blocks"}, TypeError, "parts: expected a cggr_fn.models.ModelParts")],
)
def test_bad_parts_are_rejected(parts: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        truncated_router(Toy(), num_layers=1, parts=parts)  # type: ignore[arg-type]


def test_bad_arguments_are_rejected() -> None:
    model = build("llama")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        truncated_router("llama", num_layers=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_layers: expected at most the 3 layers of 'model.layers', got 4"):
        truncated_router(model, num_layers=4)
    with pytest.raises(ValueError, match="num_layers: expected an int >= 1"):
        truncated_router(model, num_layers=0)
    with pytest.raises(TypeError, match="positional argument"):
        truncated_router(model, 1)  # type: ignore[misc]  # options are keyword-only
    with pytest.raises(TypeError, match="params: expected a mapping"):
        truncated_router(model, num_layers=1)(list(model.parameters()), ids_for())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leak: expected a value in"):
        depth_routed_forward(model, leak=2.0)
    forward = depth_routed_forward(model)
    with pytest.raises(TypeError, match="depth: expected an integer tensor"):
        forward(params_of(model), torch.ones(2, SEQ), input_ids=ids_for())
    with pytest.raises(ValueError, match="mask: expected a shape broadcastable"):
        forward(params_of(model), torch.ones(3, SEQ, dtype=torch.long), input_ids=ids_for())
    with pytest.raises(TypeError, match="the router needs a model with an output head"):
        truncated_router(model.model, num_layers=1)(params_of(model.model), ids_for())


# --------------------------------------------------------------------------- the router


@pytest.mark.parametrize("name", FAMILIES)
def test_router_equals_a_hand_truncated_model(name: str) -> None:
    model = build(name, torch.float64)
    ids = ids_for()
    for k in (1, LAYERS):
        router = truncated_router(model, num_layers=k)
        expected = hand_truncated(model, k)(input_ids=ids).logits
        torch.testing.assert_close(router(params_of(model), ids), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_router_honours_attention_mask_like_the_model(name: str) -> None:
    model = build(name, torch.float64)
    ids, mask = ids_for(), torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 5:] = 0
    expected = hand_truncated(model, 2)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(truncated_router(model, num_layers=2)(params_of(model), ids, attention_mask=mask), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox"])
def test_router_uses_the_params_it_is_given(name: str) -> None:
    model = build(name, torch.float64)
    router, ids = truncated_router(model, num_layers=2), ids_for()
    params = params_of(model)
    # Extra names (the skipped layer) are ignored; changed values are used.
    scaled = {key: value * 1.5 for key, value in params.items()}
    small = hand_truncated(model, 2)
    kept = {key: value for key, value in scaled.items() if key in dict(small.named_parameters())}
    expected = torch.func.functional_call(small, kept, (), {"input_ids": ids}).logits
    torch.testing.assert_close(router(scaled, ids), expected)


@pytest.mark.parametrize("name", ["llama", "gpt2", "mamba"])
def test_router_shares_the_models_tensors(name: str) -> None:
    model = build(name)
    before = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    model_tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    router = truncated_router(model, num_layers=1)
    view_params = list(router.module.named_parameters())
    assert view_params and all(id(p) in model_tensors for _, p in view_params)
    assert all(id(b) in model_tensors for b in router.module.buffers())
    for n, p in view_params:
        assert p is before[n][0] and p.data_ptr() == before[n][1]
    assert sum(p.numel() for _, p in view_params) < sum(p.numel() for p in model.parameters())
    # The model is untouched: same layer list, same flags, no hooks.
    assert len(model.get_submodule(detect_parts(model).layers)) == LAYERS
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_router_follows_the_model_when_it_is_cast() -> None:
    model = build("llama")
    router = truncated_router(model, num_layers=1)
    model.double()  # replaces buffers (rotary inv_freq) with new tensors
    logits = router(params_of(model), ids_for())
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, hand_truncated(model, 1)(input_ids=ids_for()).logits)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_router_runs_in_eval_mode_without_changing_the_model(name: str) -> None:
    dropout = {"gpt2": dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5),
               "bert": dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5),
               "llama": dict(attention_dropout=0.5)}[name]
    model = build(name, torch.float64, **dropout).train()
    router, ids = truncated_router(model, num_layers=2), ids_for()
    first = router(params_of(model), ids)
    torch.testing.assert_close(router(params_of(model), ids), first)
    torch.testing.assert_close(first, hand_truncated(model, 2)(input_ids=ids).logits)
    assert all(m.training for m in model.modules())
    assert not first.requires_grad


def test_router_logits_are_constants_under_grad() -> None:
    model = build("llama")
    router, ids = truncated_router(model, num_layers=1), ids_for()
    grads = torch.func.grad(lambda p: router(p, ids).sum())(params_of(model))
    assert all(bool((g == 0).all()) for g in grads.values())


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_padding_never_selected_and_never_changes_real_scores(name: str) -> None:
    model = build(name, torch.float64)
    router, causal = truncated_router(model, num_layers=2), CAUSAL[name]
    lengths = (SEQ, 5)
    ids = ids_for()
    mask = (torch.arange(SEQ) < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    scores = token_scores(router(params_of(model), ids, attention_mask=mask), labels, attention_mask=mask, causal=causal)
    # Different pad contents give the same scores.
    other_pads = torch.where(mask.bool(), ids, 7)
    scores_other = token_scores(router(params_of(model), other_pads, attention_mask=mask), labels,
                                attention_mask=mask, causal=causal)
    torch.testing.assert_close(scores, scores_other)
    # Each real token scores as in its unpadded sequence.
    for row, length in enumerate(lengths):
        alone = ids[row:row + 1, :length]
        expected = token_scores(router(params_of(model), alone), alone, causal=causal)
        torch.testing.assert_close(scores[row:row + 1, :length], expected)
        assert bool(torch.isneginf(scores[row, length:]).all())
    selected = cggr_fn.select(scores, ratio=1.0)
    assert not bool((selected & ~mask.bool()).any())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padding_with_position_ids(name: str) -> None:
    model = build(name, torch.float64)
    router = truncated_router(model, num_layers=2)
    ids = ids_for()
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    scores = token_scores(router(params_of(model), ids, attention_mask=mask, position_ids=position_ids), ids,
                          attention_mask=mask)
    alone = ids[1:, 3:]
    torch.testing.assert_close(scores[1:, 3:], token_scores(router(params_of(model), alone), alone))
    # The last pad position predicts the first real token (the model's loss counts
    # that prediction), so it is scored; the pads before it predict padding.
    assert bool(torch.isneginf(scores[1, :2]).all()) and bool(torch.isfinite(scores[1, 2]))


# --------------------------------------------------------------------------- depth-routed forward


def reference_routed_grads(model: nn.Module, depth: torch.Tensor, ids: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """Gradients with the gates written out by hand: plain hooks, torch.where, loss.backward()."""
    reference = copy.deepcopy(model)
    stack = reference.get_submodule(FAMILIES_BY_CLASS[type(model)])
    num_layers = len(stack)

    def carries(point: int) -> torch.Tensor:
        # Point p (0 = stack input, p >= 1 = output of layer p - 1) carries gradient iff
        # the token trains layer p (depth >= L - p) ... or layer p - 1 above it: depth >= L + 1 - p.
        # A full-depth token is never gated (it also trains the embedding).
        return (depth >= num_layers + 1 - point) | (depth == num_layers)

    def gate(h: torch.Tensor, point: int) -> torch.Tensor:
        return torch.where(carries(point)[..., None], h, h.detach())

    handles = [stack[0].register_forward_pre_hook(lambda m, a: (gate(a[0], 0), *a[1:]))]
    for i, layer in enumerate(stack):
        def hook(m: nn.Module, a: tuple, out: object, point: int = i + 1) -> object:
            return gate(out, point) if isinstance(out, torch.Tensor) else (gate(out[0], point), *out[1:])
        handles.append(layer.register_forward_hook(hook))
        # Inside the layer, the token-wise parts (the MLP, every other linear
        # map) carry gradient only for the tokens that train the layer, which
        # also cuts the key/value path of the others.
        for name, part in layer.named_modules():
            in_mlp = name.startswith("mlp.")
            if name == "mlp" or (isinstance(part, (nn.Linear, Conv1D)) and not in_mlp):
                handles.append(part.register_forward_hook(lambda m, a, out, point=i + 1: gate(out, point)))
    logits = reference(input_ids=ids, **default_kwargs(reference)).logits  # use_cache=False, as the view
    loss_of(logits, ids, causal).backward()
    for handle in handles:
        handle.remove()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in reference.named_parameters()}


def loss_of(logits: torch.Tensor, ids: torch.Tensor, causal: bool) -> torch.Tensor:
    # A loss that weighs every position differently, so every gate matters.
    weights = torch.linspace(0.5, 1.5, ids.shape[-1], dtype=logits.dtype)
    return (cggr_fn.models.lm_loss(logits, ids, causal=causal) + (logits.tanh().sum(-1) * weights).sum() * 1e-2)


FAMILIES_BY_CLASS = {cls: path for cls, _, path in FAMILIES.values()}


def layer_counts(depth: torch.Tensor, num_layers: int) -> list[int]:
    """How many tokens train each layer: those of depth >= num_layers - layer."""
    return [int((depth >= num_layers - layer).sum()) for layer in range(num_layers)]


@pytest.mark.parametrize("compaction", ["masked", "exact", "padded"])
@pytest.mark.parametrize("name", FAMILIES)
def test_routed_grads_equal_a_hand_masked_float64_reference(name: str, compaction: str) -> None:
    model = build(name, torch.float64)
    forward = depth_routed_forward(model)
    assert forward.num_layers == LAYERS
    ids = ids_for()
    depth = torch.randint(0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(3))
    depth[0, 0], depth[1, 1] = 0, LAYERS  # both extremes present
    counts = layer_counts(depth, LAYERS)
    capacity = {"masked": None, "exact": counts, "padded": [min(c + 3, ids.numel()) for c in counts]}[compaction]
    grads = torch.func.grad(
        lambda p: loss_of(forward(p, depth, input_ids=ids, capacity=capacity).logits, ids, CAUSAL[name])
    )(params_of(model))
    expected = reference_routed_grads(model, depth, ids, CAUSAL[name])
    assert grads.keys() == expected.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-9, atol=1e-12, msg=key)
    # Routing changed something: the bottom layer's gradient differs from dense training.
    dense = torch.func.grad(lambda p: loss_of(forward(p, torch.full_like(depth, LAYERS), input_ids=ids).logits,
                                              ids, CAUSAL[name]))(params_of(model))
    bottom = [k for k in grads if k.startswith(FAMILIES[name][2] + ".0.") and dense[k].abs().sum() > 0]
    assert bottom and any(not torch.allclose(grads[k], dense[k]) for k in bottom)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hidden_states_are_seen_in_place_by_outputs_and_hooks(name: str) -> None:
    """Streamed layers hold hidden states in partition order; nothing outside the call may see that order."""
    model = build(name, torch.float64)
    forward = depth_routed_forward(model)
    ids = ids_for()
    depth = torch.randint(0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(3))
    capacity = layer_counts(depth, LAYERS)
    params = params_of(model)
    plain = forward(params, depth, input_ids=ids, output_hidden_states=True)
    compacted = forward(params, depth, input_ids=ids, capacity=capacity, output_hidden_states=True)
    for got, expected in zip(compacted.hidden_states, plain.hidden_states, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)  # split matmuls round differently
    stack = model.get_submodule(FAMILIES[name][2])
    seen: list[torch.Tensor] = []
    handle = stack[1].register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)))
    try:
        grads = torch.func.grad(lambda p: loss_of(forward(p, depth, input_ids=ids, capacity=capacity).logits,
                                                  ids, True))(params)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], plain.hidden_states[2], rtol=1e-12, atol=1e-14)
    expected = reference_routed_grads(model, depth, ids, True)
    for key in grads:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-9, atol=1e-12, msg=key)


def test_full_depth_is_ordinary_training_and_outputs_are_unchanged() -> None:
    model = build("llama", torch.float64)
    forward, ids = depth_routed_forward(model), ids_for()
    depth = torch.randint(0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(forward(params_of(model), depth, input_ids=ids).logits, model(input_ids=ids).logits)
    routed = torch.func.grad(lambda p: loss_of(forward(p, torch.full_like(depth, LAYERS), input_ids=ids).logits, ids, True))
    plain = torch.func.grad(lambda p: loss_of(torch.func.functional_call(model, p, (), {"input_ids": ids}).logits, ids, True))
    for key, value in plain(params_of(model)).items():
        torch.testing.assert_close(routed(params_of(model))[key], value)


def test_depth_zero_trains_no_layer() -> None:
    model = build("gpt2", torch.float64)
    forward, ids = depth_routed_forward(model), ids_for()
    grads = torch.func.grad(lambda p: loss_of(forward(p, torch.zeros_like(ids), input_ids=ids).logits, ids, True))(
        params_of(model)
    )
    for key, value in grads.items():
        if key.startswith(("transformer.h.", "transformer.wpe")):
            assert bool((value == 0).all()), key
    assert grads["transformer.ln_f.weight"].abs().sum() > 0


def test_leak_scales_closed_gates() -> None:
    model = build("llama", torch.float64)
    ids = ids_for()
    depth = torch.zeros_like(ids)
    grads = {
        leak: torch.func.grad(
            lambda p: loss_of(depth_routed_forward(model, leak=leak)(p, depth, input_ids=ids).logits, ids, True)
        )(params_of(model))
        for leak in (0.0, 1.0)
    }
    dense = torch.func.grad(lambda p: loss_of(torch.func.functional_call(model, p, (), {"input_ids": ids}).logits, ids, True))(
        params_of(model)
    )
    key = "model.layers.0.mlp.down_proj.weight"
    assert bool((grads[0.0][key] == 0).all())
    torch.testing.assert_close(grads[1.0][key], dense[key])


def test_routed_forward_leaves_the_model_untouched_and_honours_its_mode() -> None:
    model = build("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    forward, ids = depth_routed_forward(model), ids_for()
    depth = torch.full_like(ids, LAYERS)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model_tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert all(id(t) in model_tensors for t in list(forward.module.parameters()) + list(forward.module.buffers()))
    # Eval model: deterministic and equal to the model. Train model: dropout is live.
    torch.testing.assert_close(forward(params_of(model), depth, input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    a = forward(params_of(model), depth, input_ids=ids).logits
    b = forward(params_of(model), depth, input_ids=ids).logits
    assert not torch.allclose(a, b)
    # Outside a call the hooks of the view are identities.
    model.eval()
    torch.testing.assert_close(forward.module(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("built_in", ["train", "eval"])
def test_routed_forward_follows_the_mode_set_after_building(built_in: str) -> None:
    # Falcon's decoder layer reads self.training itself (dropout_add(..., training=self.training)).
    model = build("falcon", torch.float64, hidden_dropout=0.5).train(built_in == "train")
    forward, ids = depth_routed_forward(model), ids_for()
    depth = torch.full_like(ids, LAYERS)
    model.eval()
    torch.testing.assert_close(forward(params_of(model), depth, input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    a = forward(params_of(model), depth, input_ids=ids).logits
    assert not torch.allclose(a, forward(params_of(model), depth, input_ids=ids).logits)
    assert all(layer.training for layer in forward.module.get_submodule(forward.parts.layers))
    with pytest.raises(AttributeError, match="training: this view of a FalconForCausalLM follows the model's own setting"):
        forward.module.eval()


def layer_runs(model: nn.Module) -> list[int]:
    """Counts of the runs of each layer, by a pre-hook on the model's own layers.

    A pre-hook: non-reentrant checkpointing stops its recomputation as soon as
    it has the tensors backward needs, before forward hooks would run.
    """
    counts = [0] * LAYERS
    for index, layer in enumerate(model.get_submodule(detect_parts(model).layers)):
        layer.register_forward_pre_hook(lambda m, a, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


def routed_backward(forward, model: nn.Module, params: dict[str, torch.Tensor], depth: torch.Tensor,  # noqa: ANN001
                    ids: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in params.values():
        p.grad = None
    loss_of(forward(params, depth, input_ids=ids).logits, ids, True).backward()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in params.items()}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_routed_gradients(name: str, reentrant: bool) -> None:
    model = build(name, torch.float64, **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
                                          if name == "gpt2" else {})).train()
    forward, ids = depth_routed_forward(model), ids_for()  # built before checkpointing is enabled
    depth = torch.randint(0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(3))
    depth[0, 0], depth[1, 1] = 0, LAYERS
    # Parameters other than the model's own tensors: the recomputation in backward must use these.
    params = {key: (value.detach() * 1.25).requires_grad_() for key, value in model.named_parameters()}
    expected = routed_backward(forward, model, params, depth, ids)
    counts = layer_runs(model)  # registered after building: the view follows the model's hooks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    before = {key: value.clone() for key, value in model.state_dict().items()}
    grads = routed_backward(forward, model, params, depth, ids)
    assert counts == [2] * LAYERS  # every layer ran again in backward: checkpointing is on
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-9, atol=1e-12, msg=key)
    bottom = [key for key in expected if ".0." in key and expected[key].abs().sum() > 0]
    assert bottom  # some gradient reaches the bottom layer, so the comparison covers it
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.gradient_checkpointing_disable()
    assert routed_backward(forward, model, params, depth, ids).keys() == expected.keys()
    assert counts == [3] * LAYERS  # disabled after building: no recomputation any more


def test_gradient_checkpointing_inside_torch_func_raises_clearly() -> None:
    model = build("llama", torch.float64).train()
    forward, ids = depth_routed_forward(model), ids_for()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="gradient checkpointing is enabled and this call runs inside a torch.func"):
        torch.func.grad(lambda p: forward(p, torch.full_like(ids, LAYERS), input_ids=ids).logits.sum())(params_of(model))
    # Outside a transform it runs; in eval mode nothing is checkpointed, and once
    # Hugging Face's requires_grad_ hook on the embedding (added by
    # gradient_checkpointing_enable, refused by torch.func) is removed, torch.func runs.
    forward(params_of(model), torch.full_like(ids, LAYERS), input_ids=ids)
    model.eval()
    model.disable_input_require_grads()
    torch.func.grad(lambda p: forward(p, torch.full_like(ids, LAYERS), input_ids=ids).logits.sum())(params_of(model))


def test_router_stays_in_eval_mode_with_checkpointing_enabled() -> None:
    model = build("llama", torch.float64, attention_dropout=0.5)
    router = truncated_router(model, num_layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.testing.assert_close(router(params_of(model), ids_for()), hand_truncated(model, 2)(input_ids=ids_for()).logits)


def test_concurrent_calls_of_one_routed_forward_keep_their_own_gates() -> None:
    """The gates of a call are its own: a call on another thread that starts
    (and ends) while this one is between layers does not change its gradients."""
    model = build("llama", torch.float64)
    forward, ids = depth_routed_forward(model), ids_for()
    shallow, full = torch.zeros_like(ids), torch.full_like(ids, LAYERS)

    def grads(depth: torch.Tensor) -> dict[str, torch.Tensor]:
        return torch.func.grad(lambda p: loss_of(forward(p, depth, input_ids=ids).logits, ids, True))(params_of(model))

    expected = grads(shallow)
    between_layers, other_done = threading.Event(), threading.Event()

    def pause_once(module: nn.Module, args: tuple) -> None:
        if threading.current_thread() is threading.main_thread() and not between_layers.is_set():
            between_layers.set()
            assert other_done.wait(30)

    handle = model.get_submodule("model.layers")[1].register_forward_pre_hook(pause_once)
    other = threading.Thread(target=lambda: (between_layers.wait(30), grads(full), other_done.set()))
    other.start()
    try:
        got = grads(shallow)
    finally:
        other_done.set()
        other.join(30)
        handle.remove()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
