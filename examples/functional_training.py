"""A functional CGGR training loop: ``functional_call`` + ``torch.func.grad`` + a ``torch.optim`` step.

The model is an ordinary ``nn.Module``. The loss is a pure function of a
parameter dict, built with ``torch.func.functional_call``, so ``torch.func.grad``
differentiates it; the resulting gradients are handed to a stock
``torch.optim.AdamW``. The CGGR decisions -- scores, depth buckets, the
selected tokens -- are plain tensors computed from the step (passed
explicitly, as a tensor) and passed *into* the model's forward; the module
holds no routing state.

    python examples/functional_training.py --steps 200
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import poetry_data  # noqa: E402


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, seq, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level decoder whose forward takes the per-token gradient depth as an argument."""

    def __init__(self, dim: int = 64, num_layers: int = 4, num_heads: int = 4, max_seq_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(max_seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: torch.Tensor, depth: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        # The blocks are ordinary submodules: under functional_call they already
        # run on the swapped-in parameters, so route_depth can take them as is.
        stack = nn.Sequential(*self.blocks) if depth is None else cggr_fn.route_depth(self.blocks, depth)
        return self.head(self.norm(stack(x)))


class StepOutput(NamedTuple):
    """Everything one step computes, as tensors: no host reads inside the step."""

    grads: dict[str, torch.Tensor]
    loss: torch.Tensor  # the selective loss that was differentiated
    full_loss: torch.Tensor  # mean cross-entropy over all tokens (for logging)
    mean_depth: torch.Tensor


def cggr_grads(
    model: nn.Module, params: dict[str, torch.Tensor], tokens: torch.Tensor, targets: torch.Tensor,
    step: torch.Tensor, *, warmup_steps: int, final_ratio: float,
) -> StepOutput:  # fmt: skip
    """Gradients of the CGGR loss at ``params``: a pure function of its arguments."""
    num_layers = len(model.blocks)
    with torch.no_grad():
        logits = functional_call(model, params, (tokens,))
    scores = cggr_fn.score(logits, targets)
    depth = cggr_fn.bucket_depth(scores, step, num_layers=num_layers, warmup_steps=warmup_steps)
    mask = cggr_fn.select(scores, ratio=cggr_fn.ratio_schedule(step, warmup_steps=warmup_steps, final_ratio=final_ratio))

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        routed_logits = functional_call(model, p, (tokens,), {"depth": depth})
        return cggr_fn.selective_loss(routed_logits, targets, mask)

    grads, loss = grad_and_value(loss_fn)(params)
    full_loss = cggr_fn.token_stats(logits, targets).nll.mean()
    return StepOutput(grads, loss, full_loss, depth.float().mean())


class StepLog(NamedTuple):
    """What the loop keeps of a step (not the gradients, which would pile up)."""

    loss: float
    full_loss: float
    mean_depth: float


def main(steps: int = 200, *, batch_size: int = 8, seq_len: int = 64, seed: int = 0, verbose: bool = True) -> list[StepLog]:
    """Train a ``TinyLM`` for ``steps`` CGGR steps and return the per-step log."""
    torch.manual_seed(seed)
    model = TinyLM(max_seq_len=seq_len)
    # The optimizer updates these Parameters in place; the dict holds the same
    # objects, so the next functional_call sees the new values without copying.
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.01)
    data, _ = poetry_data.split(poetry_data.load_bytes(), val_fraction=0.1)
    starts = poetry_data.batch_starts(len(data), steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed)
    history: list[StepLog] = []
    for i in range(steps):
        tokens, targets = poetry_data.get_batch(data, starts[i], seq_len)
        out = cggr_grads(model, params, tokens, targets, torch.tensor(i), warmup_steps=max(1, steps // 2), final_ratio=0.5)
        for name, p in params.items():
            p.grad = out.grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Host reads happen here, in the loop, never inside cggr_grads.
        history.append(StepLog(out.loss.item(), out.full_loss.item(), out.mean_depth.item()))
        if verbose and (i % 20 == 0 or i == steps - 1):
            log = history[-1]
            print(
                f"step {i:4d}  loss(all tokens) {log.full_loss:.3f}  "
                f"loss(selected) {log.loss:.3f}  mean depth {log.mean_depth:.2f}/{len(model.blocks)}"
            )
    return history


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    main(args.steps, seed=args.seed)


if __name__ == "__main__":
    cli()
