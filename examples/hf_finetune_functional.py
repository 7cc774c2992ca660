"""Fine-tune a Hugging Face causal LM with CGGR in a functional loop.

``functional_call`` + ``torch.func.grad`` + a stock ``torch.optim.AdamW``:

1. a truncated router (the model's first layer + final norm + head, sharing
   its weights) scores every token of the batch;
2. the curriculum (the step, passed explicitly) sorts the tokens into depth
   buckets: hard tokens train every layer, easy ones only the top layers;
3. ``torch.func.grad`` of the loss of the *whole* model, run with those
   per-token depths by :func:`cggr_fn.models.depth_routed_forward`, gives the
   routed gradients, which the optimizer applies.

The model is never modified and holds no routing state. For gradient
checkpointing use ``loss.backward()`` instead (``hf_finetune_backward.py
--checkpointing``): PyTorch's checkpoint does not run inside ``torch.func``
transforms. It is a tiny
random-init Llama (or GPT-2) trained on bytes of the embedded poetry sample,
so the script runs offline on a CPU; swap in ``AutoModelForCausalLM`` and a
tokenizer for a real fine-tune.

    python examples/hf_finetune_functional.py --steps 200
    python examples/hf_finetune_functional.py --model gpt2 --compile
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import poetry_data  # noqa: E402
from cggr_fn.models import depth_routed_forward, lm_loss, token_scores, truncated_router  # noqa: E402

Params = dict[str, torch.Tensor]


class StepLog(NamedTuple):
    step: int
    loss: float
    mean_depth: float


def tiny_model(name: str, num_layers: int, seq_len: int) -> nn.Module:
    """A small random-init causal LM over bytes (vocabulary 256)."""
    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=seq_len, bos_token_id=None, eos_token_id=None)
        return transformers.LlamaForCausalLM(config)
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=num_layers, n_head=4, n_positions=seq_len,
                                         bos_token_id=None, eos_token_id=None)
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(f"model: expected 'llama' or 'gpt2', got {name!r}")


def make_step(model: nn.Module, *, router_layers: int, num_buckets: int, warmup_steps: int) -> Callable[..., tuple[Params, torch.Tensor, torch.Tensor]]:
    """The CGGR step: ``(params, input_ids, step) -> (grads, loss, mean depth)``, a pure function."""
    router = truncated_router(model, num_layers=router_layers)
    forward = depth_routed_forward(model)

    def step_fn(params: Params, input_ids: torch.Tensor, step: torch.Tensor) -> tuple[Params, torch.Tensor, torch.Tensor]:
        # Labels are the inputs: the model (and lm_loss) shift them for next-token prediction.
        scores = token_scores(router(params, input_ids), input_ids)
        depth = cggr_fn.bucket_depth(scores, step, num_layers=forward.num_layers, num_buckets=num_buckets, warmup_steps=warmup_steps)

        def loss_fn(p: Params) -> torch.Tensor:
            return lm_loss(forward(p, depth, input_ids=input_ids).logits, input_ids)

        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        return grads, loss, depth.float().mean()

    return step_fn


def main(argv: Sequence[str] | None = None) -> list[StepLog]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--router-layers", type=int, default=1)
    parser.add_argument("--num-buckets", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the step")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tiny_model(args.model, args.layers, args.seq_len).train()
    # Detached tensors sharing the model's storage: the optimizer updates them in
    # place, so the model (and the router, which shares its weights) follow.
    params = {name: p.detach() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr)
    step_fn = make_step(model, router_layers=args.router_layers, num_buckets=args.num_buckets,
                        warmup_steps=args.warmup_steps)
    if args.compile:
        step_fn = torch.compile(step_fn, fullgraph=True)

    data, _ = poetry_data.split(poetry_data.load_bytes(), val_fraction=0.1)
    starts = poetry_data.batch_starts(len(data), steps=args.steps, batch_size=args.batch_size,
                                      seq_len=args.seq_len, seed=args.seed)
    history = []
    for step in range(args.steps):
        input_ids = data[starts[step, :, None] + torch.arange(args.seq_len)]
        grads, loss, mean_depth = step_fn(params, input_ids, torch.tensor(step))
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()
        history.append(StepLog(step, loss.item(), mean_depth.item()))
        if not args.quiet and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {history[-1].loss:.4f}  mean depth {history[-1].mean_depth:.2f}/{args.layers}")
    return history


if __name__ == "__main__":
    main()
