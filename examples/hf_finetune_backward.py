"""Fine-tune a Hugging Face causal LM with CGGR in a plain ``loss.backward()`` loop.

No ``torch.func`` in sight: the model's parameters are passed as they are
(``dict(model.named_parameters())``), so every CGGR loss below is an ordinary
autograd graph and ``loss.backward()`` fills ``param.grad`` for a stock
optimizer. Three ways to spend the backward pass on the hard part of a batch:

* ``--method depth``: per-token gradient depth (the seed's ``CGGRWrapper``):
  router scores -> curriculum buckets -> :func:`cggr_fn.models.depth_routed_forward`.
* ``--method sequences``: train on the hardest sequences only (the seed's
  ``CGGRModel``): :func:`cggr_fn.models.hardest_sequence_loss`.
* ``--method tokens``: loss on the hardest tokens only (the seed's
  ``CGGRLoss``): :func:`cggr_fn.models.selective_lm_loss` of the logits.

The curriculum step is an explicit argument everywhere; nothing is stored in
the model. ``--checkpointing`` turns on the model's own gradient checkpointing
(``model.gradient_checkpointing_enable()``), which composes with every method
here, depth routing included, and gives the same gradients. Tiny random-init
model, byte-level poetry sample, CPU-friendly.

    python examples/hf_finetune_backward.py --method depth --steps 200
    python examples/hf_finetune_backward.py --method depth --checkpointing
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import poetry_data  # noqa: E402
from cggr_fn.models import (  # noqa: E402
    depth_routed_forward,
    hardest_sequence_loss,
    lm_loss,
    selective_lm_loss,
    token_scores,
    truncated_router,
)
from hf_finetune_functional import tiny_model  # noqa: E402

METHODS = ("depth", "sequences", "tokens")


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="depth")
    parser.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--router-layers", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--final-ratio", type=float, default=0.5, help="kept fraction after warmup")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true", help="recompute layer activations in backward")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tiny_model(args.model, args.layers, args.seq_len).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    router = truncated_router(model, num_layers=args.router_layers)
    forward = depth_routed_forward(model)
    if args.checkpointing:
        # Enabled on the model; the routed forward follows it (the router, in eval mode, never checkpoints).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    data, _ = poetry_data.split(poetry_data.load_bytes(), val_fraction=0.1)
    starts = poetry_data.batch_starts(len(data), steps=args.steps, batch_size=args.batch_size,
                                      seq_len=args.seq_len, seed=args.seed)
    losses = []
    for step in range(args.steps):
        input_ids = data[starts[step, :, None] + torch.arange(args.seq_len)]
        params = dict(model.named_parameters())  # the live parameters: autograd records into .grad
        if args.method == "depth":
            scores = token_scores(router(params, input_ids), input_ids)
            depth = cggr_fn.bucket_depth(scores, step, num_layers=forward.num_layers, warmup_steps=args.warmup_steps)
            loss = lm_loss(forward(params, depth, input_ids=input_ids).logits, input_ids)
        else:
            ratio = cggr_fn.ratio_schedule(step, warmup_steps=args.warmup_steps, final_ratio=args.final_ratio)
            if args.method == "sequences":
                loss = hardest_sequence_loss(model, router, params, input_ids, input_ids, ratio=ratio)
            else:
                loss = selective_lm_loss(model(input_ids=input_ids).logits, input_ids, ratio=ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not args.quiet and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  {args.method} loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
