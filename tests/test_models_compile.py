"""A whole routed CGGR training step of a Hugging Face model compiles with fullgraph=True.

The step: truncated-router scores -> curriculum buckets -> per-token depth ->
depth-routed forward of the whole model -> loss -> torch.func.grad. Any graph
break raises under ``fullgraph=True``. The ``aot_eager`` backend traces the
same dynamo graph and the AOT-autograd joint graph as Inductor does but skips
C++ code generation, which takes over a minute per model on a CPU runner.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import cggr_fn
from cggr_fn.models import depth_routed_forward, hardest_sequence_loss, lm_loss, token_scores, truncated_router

VOCAB, SEQ, LAYERS = 64, 8, 3


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=32,
                                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_routed_training_step_compiles_fullgraph(name: str) -> None:
    torch._dynamo.reset()
    model = build(name).train()
    router = truncated_router(model, num_layers=1)
    forward = depth_routed_forward(model)
    params = {key: value.detach() for key, value in model.named_parameters()}

    def step_fn(params: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                step: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        scores = token_scores(router(params, ids, attention_mask=mask), labels, attention_mask=mask)
        depth = cggr_fn.bucket_depth(scores, step, num_layers=forward.num_layers, num_buckets=4, warmup_steps=4)

        def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return lm_loss(forward(p, depth, input_ids=ids, attention_mask=mask).logits, labels, attention_mask=mask)

        return torch.func.grad_and_value(loss)(params)

    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    for step in (0, 4):
        # A new step is data: the second call must reuse the graph.
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            grads, loss = compiled(params, ids, mask, labels, torch.tensor(step))
        expected_grads, expected_loss = step_fn(params, ids, mask, labels, torch.tensor(step))
        torch.testing.assert_close(loss, expected_loss)
        for key in expected_grads:
            torch.testing.assert_close(grads[key], expected_grads[key], msg=key)
    # After warmup the easiest tokens train fewer layers than the dense step.
    dense_grads, _ = torch.func.grad_and_value(
        lambda p: lm_loss(torch.func.functional_call(model, p, (), {"input_ids": ids, "attention_mask": mask}).logits,
                          labels, attention_mask=mask)
    )(params)
    bottom = next(key for key in dense_grads if ".0." in key and key.endswith("weight") and dense_grads[key].dim() == 2)
    assert not torch.allclose(grads[bottom], dense_grads[bottom])


def test_hardest_sequence_step_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    model = build("llama").train()
    router = truncated_router(model, num_layers=1)
    params = {key: value.detach() for key, value in model.named_parameters()}
    ids = torch.randint(3, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, SEQ, dtype=torch.long)

    def step_fn(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return torch.func.grad_and_value(
            lambda p: hardest_sequence_loss(model, router, p, ids, ids, ratio=0.5, attention_mask=mask)
        )(params)

    grads, loss = torch.compile(step_fn, fullgraph=True, backend="aot_eager")(params)
    expected_grads, expected_loss = step_fn(params)
    torch.testing.assert_close(loss, expected_loss)
    for key in expected_grads:
        torch.testing.assert_close(grads[key], expected_grads[key], msg=key)


def test_checkpointed_routed_forward_compiles_fullgraph() -> None:
    # Checkpointing runs under autograd's own backward: compile the loss, call .backward().
    torch._dynamo.reset()
    model = build("llama").double().train()
    forward = depth_routed_forward(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Not the model's own values: the recomputation must use the call's tensors.
    params = {key: (value.detach() * 1.25).requires_grad_() for key, value in model.named_parameters()}
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))

    def loss_fn(params: dict[str, torch.Tensor], depth: torch.Tensor) -> torch.Tensor:
        return lm_loss(forward(params, depth, input_ids=ids).logits, ids)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for seed in (2, 3):
        depth = torch.randint(0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(seed))
        with torch._dynamo.config.patch(error_on_recompile=seed > 2):
            grads = torch.autograd.grad(compiled(params, depth), list(params.values()), allow_unused=True)
        expected = torch.autograd.grad(loss_fn(params, depth), list(params.values()), allow_unused=True)
        for key, got, want in zip(params, grads, expected):
            torch.testing.assert_close(got, want, msg=key)
