"""Data-parallel training step: dense against compacted CGGR under DDP and FSDP2, and scaling over GPUs.

Launched by torchrun, once per GPU count; rows are added to ``--out``, and
every row of a count above one gets its scaling efficiency against the
one-GPU row of the same engine and mode in that file::

    torchrun --nproc_per_node 1 benchmarks/bench_distributed.py --out benchmarks/results/distributed.json
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --out benchmarks/results/distributed.json

A step is a whole training step on every rank: the loss through
:func:`cggr_fn.distributed.loss_module` (compiled with
``torch.compile(fullgraph=True)``), ``backward`` with the engine's gradient
communication (DDP's bucketed all-reduce; FSDP2's all-gather and
reduce-scatter, one group for the whole model, see
:func:`cggr_fn.distributed.loss_module`), and an AdamW step. Modes:
``dense`` (the model's own loss) and ``selective_R``
(:func:`cggr_fn.models.cggr_loss`, top-k at ratio R, a 2-layer router,
``scope="rank"``: equal work on every rank). Rows: ``engine``, ``gpus``,
``mode``, ``median_step_ms``, ``tokens_per_s`` (all ranks' tokens),
``scaling_efficiency`` (tokens/s over ``gpus`` times the one-GPU tokens/s).
The default model is the 1B Llama of ``bench_e2e.py`` (``MODELS["1b"]``)
with its batch per rank, in bf16; ``--model tiny --device cpu`` runs the
same code on gloo in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import cggr_fn.distributed  # noqa: E402
from _provenance import source_commit, source_digest  # noqa: E402
from bench_e2e import MODELS as E2E_MODELS  # noqa: E402
from cggr_fn.models import cggr_loss  # noqa: E402

MODELS = {
    **E2E_MODELS,
    "tiny": dict(config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64), batch=(2, 32)),
}
ROUTER_LAYERS = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--engines", nargs="+", choices=("ddp", "fsdp2"), default=["ddp", "fsdp2"])
    parser.add_argument("--modes", nargs="+", default=["dense", "selective_0.25"],
                        help="dense and/or selective_R with R in (0, 1]")
    parser.add_argument("--iters", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager steps")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON file the rows are added to")
    args = parser.parse_args(argv)
    for mode in args.modes:
        if mode != "dense" and not _is_selective(mode):
            parser.error(f"--modes: expected dense or selective_R with R in (0, 1], got {mode!r}")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters: expected at least 1; --warmup: at least 0")
    return args


def _is_selective(mode: str) -> bool:
    prefix, _, ratio = mode.partition("_")
    try:
        return prefix == "selective" and 0 < float(ratio) <= 1
    except ValueError:
        return False


def build(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor]:
    spec = MODELS[name]
    config = transformers.LlamaConfig(**spec["config"], attn_implementation="sdpa")
    torch.manual_seed(0)
    with device:
        model = transformers.LlamaForCausalLM(config)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    batch, seq = spec["batch"]
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    return model, ids


def loss_fn(model: torch.nn.Module, mode: str) -> Any:
    if mode == "dense":
        def dense(params: dict[str, torch.Tensor], input_ids: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "labels": input_ids, "use_cache": False}
            return torch.func.functional_call(model, params, (), kwargs).loss
        return dense
    ratio = float(mode.split("_")[1])
    return cggr_loss(model, selection="topk", ratio=ratio, router_layers=ROUTER_LAYERS, scope="rank")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def measure(engine: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model, ids = build(args.model, device)
    fn = loss_fn(model, mode)
    if args.compile:
        fn = torch.compile(fn, fullgraph=True)
    module = cggr_fn.distributed.loss_module(fn, model)
    if engine == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(module)
    else:
        module = torch.distributed.fsdp.fully_shard(module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    step = torch.tensor(10, device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = module(ids, step)
        (out[0] if isinstance(out, tuple) else out).backward()
        optimizer.step()

    for _ in range(args.warmup):
        train_step()
    times = []
    for _ in range(args.iters):
        _sync(device)
        start = time.perf_counter()
        train_step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    world = dist.get_world_size()
    row = {"model": args.model, "engine": engine, "gpus": world, "mode": mode, "device": device.type,
           "compiled": args.compile, "tokens_per_step": world * ids.numel(), "median_step_ms": round(median, 3),
           "times_ms": [round(t, 3) for t in times], "tokens_per_s": round(world * ids.numel() / median * 1e3, 1)}
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()
    del module, optimizer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def with_scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with its ``scaling_efficiency`` against the one-GPU row of its model, engine, mode and device."""
    key = ("model", "engine", "mode", "device", "compiled")
    single = {tuple(r[k] for k in key): r for r in rows if r.get("gpus") == 1 and "tokens_per_s" in r}
    out = []
    for row in rows:
        base = single.get(tuple(row.get(k) for k in key))
        efficiency = None if base is None or "tokens_per_s" not in row else round(
            row["tokens_per_s"] / (row["gpus"] * base["tokens_per_s"]), 3)
        out.append({**row, "scaling_efficiency": efficiency})
    return out


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"device": name, "commit": source_commit(), "source_digest": source_digest(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cggr_fn": cggr_fn.__version__, "backend": dist.get_backend(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    try:
        for engine in args.engines:
            for mode in args.modes:
                try:
                    rows.append(measure(engine, mode, args, device))
                except Exception as error:  # a failing combination is reported, not hidden
                    rows.append({"model": args.model, "engine": engine, "gpus": dist.get_world_size(), "mode": mode,
                                 "error": f"{type(error).__name__}: {error}"[:2000]})
                if dist.get_rank() == 0:
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "times_ms"}), flush=True)
        if dist.get_rank() == 0:
            previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": [], "rows": []}
            runs = previous["runs"] + [{"environment": environment(device), "gpus": dist.get_world_size()}]
            replaced = {(r["model"], r["engine"], r["gpus"], r["mode"]) for r in rows}
            kept = [r for r in previous["rows"] if (r.get("model"), r.get("engine"), r.get("gpus"), r.get("mode"))
                    not in replaced]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"runs": runs, "rows": with_scaling(kept + rows)}, indent=1))
        dist.barrier()  # tearing down while a peer still talks to this rank aborts gloo's threads: leave together
    finally:
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
