"""Data-parallel CGGR under torchrun: DDP or FSDP2, per-rank or global selection, checkpoint and resume.

Every rank trains a small byte-level Llama on its own batches of the embedded
poetry sample with :func:`cggr_fn.models.cggr_loss` (the compacted loss; the
25% of the tokens with the largest excess loss over an EMA of the model's own
past weights). The module handed to ``DistributedDataParallel`` or
``fully_shard`` is :func:`cggr_fn.distributed.loss_module`; the loss is each
rank's share of the global mean, so the averaged gradients are those of one
process over all ranks' batches. The CGGR state -- the curriculum step and the
EMA -- is an explicit NamedTuple, saved with the model and optimizer by
``torch.distributed.checkpoint`` and resumed exactly.

    torchrun --nproc_per_node 2 examples/distributed.py --steps 20
    torchrun --nproc_per_node 2 examples/distributed.py --engine fsdp2 --scope global --steps 20
    torchrun --nproc_per_node 2 examples/distributed.py --steps 10 --checkpoint ckpt --save-at 5
    torchrun --nproc_per_node 2 examples/distributed.py --steps 10 --checkpoint ckpt --resume

On the CPU the ranks talk over gloo, on GPUs (``--device cuda``) over NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import cggr_fn.distributed  # noqa: E402
import poetry_data  # noqa: E402
from cggr_fn.models import cggr_loss, token_scores, truncated_router  # noqa: E402


class State(NamedTuple):
    """The CGGR training state, explicit: the curriculum step and the EMA the reference scores come from."""

    step: torch.Tensor
    ema: cggr_fn.EmaState


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--scope", choices=("rank", "global"), default="rank",
                        help="select from each rank's tokens, or the hardest of all ranks' tokens together")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--ema", type=float, default=0.05, help="EMA step size of the reference weights")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory")
    parser.add_argument("--save-at", type=int, default=None, help="save the checkpoint after this step")
    parser.add_argument("--resume", action="store_true", help="start from --checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="write the per-step losses (rank 0) as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "dim", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    if not 0 < args.ratio <= 1 or not 0 < args.ema <= 1:
        parser.error("--ratio and --ema: expected values in (0, 1]")
    if (args.save_at is not None or args.resume) and args.checkpoint is None:
        parser.error("--save-at and --resume need --checkpoint")
    return args


def batch(data: torch.Tensor, step: int, rank: int, args: argparse.Namespace) -> torch.Tensor:
    """This rank's sequences at ``step``: a function of (step, rank) only, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(step * 1000 + rank)
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=generator)
    return poetry_data.get_batch(data, starts, args.seq_len)[0]


def full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a plain tensor: FSDP2 keeps parameters sharded between steps."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        log = train(args, device, rank, world)
        dist.barrier()  # tearing down while a peer still talks to this rank aborts gloo's threads: leave together
        return log
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, rank: int, world: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.dim, intermediate_size=2 * args.dim,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.seq_len)
    model = transformers.LlamaForCausalLM(config).to(device)
    loss_fn = cggr_loss(model, selection="topk", ratio=args.ratio, router_layers=1, method="loss", scope=args.scope)
    reference_router = truncated_router(model, num_layers=args.layers)  # the whole model, under the EMA's weights
    module = cggr_fn.distributed.loss_module(loss_fn, model)
    if args.engine == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(module)  # no find_unused_parameters needed
    else:
        module = torch.distributed.fsdp.fully_shard(module)  # one group: see cggr_fn.distributed.loss_module
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr)
    average = cggr_fn.ema(args.ema)
    state = State(torch.tensor(0, device=device), average.init({n: full(p) for n, p in model.named_parameters()}))

    def checkpoint(template: State) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "cggr": cggr_fn.distributed.state_dict(template)}

    if args.resume:
        loaded = checkpoint(state)
        dcp.load(loaded, checkpoint_id=str(args.checkpoint))
        set_state_dict(module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        state = cggr_fn.distributed.load_state_dict(state, loaded["cggr"])

    data = poetry_data.load_bytes()
    log: list[dict[str, Any]] = []
    while int(state.step) < args.steps:
        step = int(state.step)
        ids = batch(data, step, rank, args).to(device)
        reference = token_scores(reference_router(state.ema.average, ids), ids, method="loss")
        optimizer.zero_grad()
        loss, routing = module(ids, state.step, reference=reference)
        loss.backward()
        optimizer.step()
        state = State(state.step + 1, average.update(state.ema, {n: full(p) for n, p in model.named_parameters()}))
        # A rank's loss is its share of the global mean: the mean over ranks is the global mean.
        stats = torch.stack([loss.detach().float(), (routing.depth > 0).sum().float()])
        dist.all_reduce(stats)
        log.append({"step": step, "loss": stats[0].item() / world, "trained_tokens": int(stats[1].item())})
        if rank == 0 and not args.quiet:
            print(f"step {step:4d}  loss {log[-1]['loss']:.4f}  trained {log[-1]['trained_tokens']} of "
                  f"{world * ids.numel()} tokens", flush=True)
        if args.save_at is not None and step + 1 == args.save_at:
            dcp.save(checkpoint(state), checkpoint_id=str(args.checkpoint))
    if rank == 0 and args.out is not None:
        args.out.write_text(json.dumps({"engine": args.engine, "scope": args.scope, "world": world, "steps": log}))
    return log


if __name__ == "__main__":
    main()
