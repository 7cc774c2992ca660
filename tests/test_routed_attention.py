"""Attention over the routed queries: the block mask, the CPU path, and its use in compacted layers.

FlexAttention has no backward on CPU, so its block masks are checked here by
its forward against the reference path; the reference is checked (values and
gradients, float64) against the model's whole attention; and the compacted
loss is checked to take the routed path in every layer and give the masking
version's gradients. ``benchmarks/check_routed_attention_gpu.py`` checks the
FlexAttention backward against float64 on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import cggr_fn
from cggr_fn._compaction import partition
from cggr_fn.models import cggr_loss, depth_routed_forward, lm_targets
from cggr_fn.models import _routed_attention as routed_attention

HEADS, DIM = 4, 8


def _case(batch: int, seq: int, kv_heads: int, share: float, fill: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq, DIM, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, DIM, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, DIM, generator=g, dtype=dtype)
    chosen = torch.rand(batch, seq, generator=g) < share
    return q, k, v, partition(chosen, int(chosen.sum()) + fill)


def _masks(batch: int, seq: int, dtype: torch.dtype) -> dict[str, tuple[bool, torch.Tensor | None]]:
    lengths = seq - torch.arange(batch) * (seq // 4)
    real = torch.arange(seq)[None, :] < lengths[:, None]
    causal_padded = (torch.ones(seq, seq, dtype=torch.bool).tril()[None] & real[:, None, :])[:, None]
    return {
        "causal": (True, None),
        "bidirectional": (False, None),
        "bool_padding": (False, causal_padded),
        "additive_padding": (False, torch.zeros((), dtype=dtype).masked_fill(~causal_padded, torch.finfo(dtype).min)),
        "shared_bool": (False, causal_padded[:1]),
    }


def _flat(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part):
    batch, heads, seq, dim = q.shape
    n = batch * seq
    return (q.transpose(1, 2).reshape(n, heads, dim)[part.routed], k.transpose(1, 2).reshape(n, k.shape[1], dim),
            v.transpose(1, 2).reshape(n, v.shape[1], dim))


@pytest.mark.parametrize("shape", [(3, 300, 2, 0.3, 20), (2, 130, 4, 0.5, 0), (4, 64, 1, 0.05, 3), (1, 257, 2, 1.0, 0)],
                         ids=["gqa_odd_seq_fill", "mha_two_blocks", "mqa_small", "every_query"])
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "bool_padding", "additive_padding", "shared_bool"])
def test_flex_block_mask_gives_the_reference_attention(shape: tuple, kind: str) -> None:
    batch, seq, kv_heads, share, fill = shape
    q, k, v, part = _case(batch, seq, kv_heads, share, fill, torch.float32)
    causal, mask = _masks(batch, seq, torch.float32)[kind]
    rows, keys, values = _flat(q, k, v, part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": the unfused forward is what is checked
        got = routed_attention.flex_routed(rows, keys, values, part.routed, seq=seq, causal=causal, mask=mask, scale=0.3)
    want = routed_attention.reference_routed(rows, keys, values, part.routed, seq=seq, causal=causal, mask=mask,
                                             scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_mask_skips_what_no_query_sees_and_marks_whole_blocks() -> None:
    seq, block = 512, 128
    routed = torch.cat([torch.arange(0, 256), torch.arange(seq + 384, seq + 512)])  # sequence 0, then sequence 1
    blocks = routed_attention.block_mask(routed, tokens=2 * seq, seq=seq, causal=True, mask=None)
    kv_num, kv_idx, full_num, full_idx = (t[0, 0] for t in (blocks.kv_num_blocks, blocks.kv_indices,
                                                            blocks.full_kv_num_blocks, blocks.full_kv_indices))
    # Query block 0 (positions 0-127) sees key block 0, on its diagonal: partial.
    assert (kv_num[0], full_num[0], kv_idx[0, 0]) == (1, 0, 0)
    # Query block 1 (positions 128-255): key block 0 whole, block 1 on the diagonal.
    assert (kv_num[1], full_num[1], kv_idx[1, 0], full_idx[1, 0]) == (1, 1, 1, 0)
    # Query block 2 (sequence 1, positions 384-511): its own sequence's blocks 4-6 whole, 7 partial.
    assert (kv_num[2], full_num[2], kv_idx[2, 0]) == (1, 3, 7)
    assert full_idx[2, :3].tolist() == [4, 5, 6]
    assert blocks.BLOCK_SIZE == (block, block)


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "bool_padding", "additive_padding"])
def test_reference_path_equals_the_whole_attention_in_float64(kind: str) -> None:
    batch, seq = 3, 40
    q, k, v, part = _case(batch, seq, 2, 0.3, 5, torch.float64, seed=1)
    causal, mask = _masks(batch, seq, torch.float64)[kind]
    for t in (q, k, v):
        t.requires_grad_()
    cotangent = torch.randn(part.routed.numel(), HEADS, DIM, dtype=torch.float64)
    got = routed_attention.attend_routed(q, k, v, part, causal=causal, mask=mask, scale=0.3)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3,
                                                             enable_gqa=True)
    want = whole.transpose(1, 2).reshape(batch * seq, HEADS, DIM)[part.routed]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad((got * cotangent).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * cotangent).sum(), (q, k, v))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_routed_queries_gives_an_empty_result() -> None:
    q, k, v, _ = _case(2, 16, 2, 0.0, 0, torch.float64)
    part = partition(torch.zeros(2, 16, dtype=torch.bool), 0)
    assert routed_attention.attend_routed(q, k, v, part, causal=True, mask=None, scale=1.0).shape == (0, HEADS, DIM)


_SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama_sdpa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, attn_implementation="sdpa")),
    "llama_eager": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, attn_implementation="eager")),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL, attn_implementation="sdpa")),
    "mistral_window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_SMALL, sliding_window=4, attn_implementation="sdpa")),
    "gpt2_eager": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=3, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="eager")),
}


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = routed_attention.attend_routed

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(routed_attention, "attend_routed", counted)
    return calls


def _assert_masked_gradients(model, params: dict[str, torch.Tensor], ids: torch.Tensor, loss: torch.Tensor,
                             routing) -> None:
    """The loss's gradients are those of the masking version (gates in place, the loss over the routed tokens)."""
    grads = torch.autograd.grad(loss, list(params.values()))
    logits = depth_routed_forward(model)(params, routing.depth, input_ids=ids).logits
    want = torch.autograd.grad(cggr_fn.selective_loss(logits, lm_targets(ids), routing.depth > 0), list(params.values()))
    for key, a, b in zip(params, grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=key)


def _batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(2))
    if not padded:
        return ids, None
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    return ids, attention_mask


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", MODELS)
def test_compacted_layers_route_attention_with_the_masked_gradients(name: str, padded: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().double().train()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    ids, attention_mask = _batch(padded)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    calls = _spy(monkeypatch)
    loss, routing = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=True)(params, ids, 3, **kwargs)
    assert len(calls) == 3  # every layer's attention took the routed path
    grads = torch.autograd.grad(loss, list(params.values()))  # autograd's own backward, as a training loop runs it
    logits = depth_routed_forward(model)(params, routing.depth, input_ids=ids, **kwargs).logits
    targets = lm_targets(ids, attention_mask=attention_mask)
    want = torch.autograd.grad(cggr_fn.selective_loss(logits, targets, routing.depth > 0), list(params.values()))
    # Hugging Face's eager attention takes its softmax in float32 whatever the
    # dtype; the routed queries' is taken in the inputs' dtype (float64 here).
    rtol, atol = (1e-5, 1e-7) if name.endswith("eager") else (1e-10, 1e-12)
    for key, a, b in zip(params, grads, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=key)
    assert model.config._attn_implementation in ("sdpa", "eager")  # the model itself is untouched


def test_attention_with_dropout_runs_whole_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_SMALL, attention_dropout=0.5, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).double().train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, _ = _batch(False)
    calls = _spy(monkeypatch)
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=True)
    torch.manual_seed(5)
    first = loss_fn(params, ids, 3)[0]
    torch.manual_seed(5)
    again = loss_fn(params, ids, 3)[0]
    assert calls == []
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    model.eval()  # no dropout: routed again
    loss_fn(params, ids, 3)
    assert len(calls) == 3


def test_the_views_attention_config_reads_through_and_refuses_writes() -> None:
    model = MODELS["llama_sdpa"]()
    forward = depth_routed_forward(model, route_attention=True)
    attention = forward.module.model.layers[0].self_attn
    assert attention is not model.model.layers[0].self_attn
    assert attention.config._attn_implementation == routed_attention.ROUTED_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    model.config.attention_dropout = 0.25
    assert attention.config.attention_dropout == 0.25
    with pytest.raises(AttributeError, match="set it on model.config"):
        attention.config.attention_dropout = 0.0


def test_route_attention_false_runs_attention_whole_with_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MODELS["llama_sdpa"]().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, attention_mask = _batch(True)
    calls = _spy(monkeypatch)

    def grads(route_attention: bool) -> dict[str, torch.Tensor]:
        loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=route_attention)
        return torch.func.grad(lambda p: loss_fn(p, ids, 3, attention_mask=attention_mask)[0])(params)

    whole = grads(False)
    assert calls == []
    # Off by default: the view's attention dispatches through the routed attention but runs whole.
    assert cggr_loss(model).forward.module.model.layers[0].self_attn._cggr_route_queries is False
    routed = grads(True)
    assert len(calls) == 3
    for key in whole:
        torch.testing.assert_close(routed[key], whole[key], rtol=1e-10, atol=1e-12, msg=key)
    with pytest.raises(TypeError, match="route_attention: expected a bool"):
        cggr_loss(model, route_attention="yes")


def test_compiled_unpadded_calls_attend_causally_without_the_models_mask_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the model builds an explicit causal mask; with no attention mask given the
    routed attention knows it is causal alone (so its kernel can skip masking whole blocks)."""
    torch.manual_seed(0)
    model = MODELS["llama_sdpa"]().double()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    ids, _ = _batch(False)
    seen: list[tuple[bool, bool]] = []
    original = routed_attention.attend_routed

    def spy(*args, causal, mask, **kwargs):
        seen.append((causal, mask is None))
        return original(*args, causal=causal, mask=mask, **kwargs)

    monkeypatch.setattr(routed_attention, "attend_routed", spy)
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=True)
    compiled = torch.compile(lambda p: loss_fn(p, ids, 3), fullgraph=True, backend="aot_eager")
    loss, routing = compiled(params)
    assert seen and set(seen) == {(True, True)}
    _assert_masked_gradients(model, params, ids, loss, routing)
    # With padding the model's mask is what is applied.
    seen.clear()
    ids, attention_mask = _batch(True)
    loss_fn(params, ids, 3, attention_mask=attention_mask)
    assert seen and set(seen) == {(False, False)}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_layers_recompute_the_routed_attention(use_reentrant: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = MODELS["llama_sdpa"]().double().train()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    ids, _ = _batch(False)
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=True)
    plain = torch.autograd.grad(loss_fn(params, ids, 3)[0], list(params.values()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = _spy(monkeypatch)
    loss_fn(params, ids, 3)[0].backward()  # reentrant checkpointing needs .backward(), not .grad()
    assert len(calls) == 6  # each layer's routed attention in forward, and again in its recomputation
    for (key, param), want in zip(params.items(), plain):
        torch.testing.assert_close(torch.zeros_like(want) if param.grad is None else param.grad, want,
                                   rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq, share, fill", [(300, 0.3, 20), (100, 0.02, 2), (129, 0.9, 0), (1000, 0.05, 0)])
def test_block_mask_lists_every_block_with_an_allowed_pair_and_only_whole_blocks_as_full(
        seq: int, share: float, fill: int, causal: bool) -> None:
    # (Uncompiled FlexAttention ignores the block lists, so they are checked against the dense mask here.)
    batch, block = 3, 128
    chosen = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seq)) < share
    part = partition(chosen, int(chosen.sum()) + fill)
    n, capacity = batch * seq, part.routed.numel()
    blocks = routed_attention.block_mask(part.routed, tokens=n, seq=seq, causal=causal, mask=None)
    queries = routed_attention._Queries(*(t[:, None] for t in routed_attention._queries(part.routed, seq)))
    allowed = routed_attention._allowed(queries, torch.arange(n, dtype=torch.int32)[None, :], seq, causal, None)
    q_blocks, kv_blocks = -(-capacity // block), -(-n // block)
    padded = torch.zeros(q_blocks * block, kv_blocks * block, dtype=torch.bool)
    padded[:capacity, :n] = allowed
    tiles = padded.reshape(q_blocks, block, kv_blocks, block)
    some = tiles.any(-1).any(1)
    # Padding rows and columns of the last blocks cannot be "allowed"; a full block needs its real part whole.
    real = torch.zeros_like(padded)
    real[:capacity, :n] = True
    every = (tiles | ~real.reshape(q_blocks, block, kv_blocks, block)).all(-1).all(1)

    def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool)
        for i in range(q_blocks):
            out[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
        return out

    partial = listed(blocks.kv_num_blocks, blocks.kv_indices)
    full = listed(blocks.full_kv_num_blocks, blocks.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal((partial | full) | ~some, torch.ones_like(some))  # nothing allowed is left out
    assert not (full & ~every).any()  # a block run without the mask is allowed whole
    assert some.any()


def test_packed_sequences_by_position_ids_keep_the_models_mask() -> None:
    torch.manual_seed(0)
    model = MODELS["llama_sdpa"]().double()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    ids = torch.randint(3, 40, (1, 12), generator=torch.Generator().manual_seed(4))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two sequences packed in one row
    depth = torch.zeros(1, 12, dtype=torch.long)
    depth[0, [2, 5, 8, 11]] = 3

    def run(route_attention: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        forward = depth_routed_forward(model, route_attention=route_attention)
        logits = forward(params, depth, input_ids=ids, position_ids=position_ids, capacity=4).logits
        return logits, torch.autograd.grad((logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum(),
                                           list(params.values()))

    (routed, routed_grads), (whole, whole_grads) = run(True), run(False)
    torch.testing.assert_close(routed, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(routed_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_windowless_is_conservative() -> None:
    def attention(config) -> torch.nn.Module:
        return type("Attention", (), {"config": config})()

    assert routed_attention._windowless(attention(transformers.LlamaConfig()), {})
    assert not routed_attention._windowless(attention(transformers.MistralConfig(sliding_window=4)), {})
    assert routed_attention._windowless(attention(transformers.Qwen2Config(use_sliding_window=False)), {})
    assert not routed_attention._windowless(attention(transformers.LlamaConfig()), {"sliding_window": 8})


def test_a_loss_with_routed_attention_copies() -> None:
    import copy

    model = MODELS["llama_sdpa"]().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids, _ = _batch(False)
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=True)
    clone = copy.deepcopy(loss_fn)
    torch.testing.assert_close(clone(params, ids, 3)[0], loss_fn(params, ids, 3)[0], rtol=0, atol=0)


@pytest.mark.parametrize("route_attention", [False, True])
def test_compiled_unpadded_calls_run_sdpa_without_the_mask_tensor(route_attention: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    model = MODELS["llama_sdpa"]().double()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    masks: list[bool] = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask is None)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    loss_fn = cggr_loss(model, ratio=0.25, router_layers=1, route_attention=route_attention)
    ids, _ = _batch(False)
    compiled = torch.compile(lambda p: loss_fn(p, ids, 3), fullgraph=True, backend="aot_eager")
    loss, routing = compiled(params)
    # The router (the model's own attention modules) gets the model's mask; the routed view's layers none.
    assert masks.count(True) == 3 and masks.count(False) == 1
    _assert_masked_gradients(model, params, ids, loss, routing)
    masks.clear()
    ids, attention_mask = _batch(True)
    loss_fn(params, ids, 3, attention_mask=attention_mask)
    assert masks and not any(masks)  # padded: the model's mask everywhere
