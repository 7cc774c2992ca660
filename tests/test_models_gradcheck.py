"""float64 gradcheck through the differentiable model-level functions (tiny models, fast mode)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

import cggr_fn
from cggr_fn.models import depth_routed_forward, hardest_sequence_loss, lm_loss, selective_lm_loss, truncated_router

VOCAB, SEQ, LAYERS = 16, 5, 2

def tiny_gpt2() -> nn.Module:
    # GPT-2 rather than Llama: Llama's RMSNorm computes in float32 even for a
    # float64 model, which gradcheck's finite differences cannot tolerate.
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=LAYERS, n_head=2, n_positions=8,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().train()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * SEQ, [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, torch.where(mask.bool(), ids, -100), mask


def of_params(model: nn.Module, names: list[str], fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
              ) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """``fn`` as a function of a few of the model's parameters (gradcheck cost grows with their size)."""
    fixed = {name: p.detach() for name, p in model.named_parameters()}
    inputs = tuple(fixed[name].clone().requires_grad_() for name in names)
    return (lambda *values: fn({**fixed, **dict(zip(names, values))})), inputs


PARAMS = ["transformer.h.0.mlp.c_proj.bias", "transformer.h.0.ln_1.weight", "transformer.h.1.attn.c_attn.bias",
          "transformer.ln_f.weight"]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("depth_kind", "leak"), [("full", 0.0), ("mixed", 1.0)])
def test_gradcheck_depth_routed_forward(depth_kind: str, leak: float, checkpointing: bool) -> None:
    # Routed gradients are not derivatives of the output, by design; full depth,
    # or any depth with leak 1, must give exactly the derivative.
    model = tiny_gpt2()
    forward = depth_routed_forward(model, leak=leak)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, _, mask = batch()
    depth = torch.full_like(ids, LAYERS) if depth_kind == "full" else torch.randint(
        0, LAYERS + 1, ids.shape, generator=torch.Generator().manual_seed(2))
    fn, inputs = of_params(model, PARAMS, lambda p: forward(p, depth, input_ids=ids, attention_mask=mask).logits)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gradcheck_lm_loss() -> None:
    ids, labels, mask = batch()
    logits = torch.randn(3, SEQ, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: lm_loss(x, labels, attention_mask=mask), (logits,), fast_mode=True)


@pytest.mark.parametrize("normalize", ["selected", "valid"])
def test_gradcheck_selective_lm_loss(normalize: str) -> None:
    ids, labels, mask = batch()
    logits = torch.randn(3, SEQ, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    fn = lambda x: selective_lm_loss(x, labels, ratio=0.5, attention_mask=mask, normalize=normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


def test_gradcheck_hardest_sequence_loss() -> None:
    model = tiny_gpt2().eval()
    router = truncated_router(model, num_layers=1)
    ids, labels, mask = batch()
    fn, inputs = of_params(model, PARAMS, lambda p: hardest_sequence_loss(
        model, router, p, ids, labels, ratio=0.5, attention_mask=mask))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
