"""End-to-end training step: compacted CGGR against the best dense step, same process, same compile settings.

Run on a CUDA machine, one model per call (each fits in one ten-minute call)::

    python benchmarks/bench_e2e.py --model 135m --out benchmarks/results/e2e_135m.json
    python benchmarks/bench_e2e.py --model 1b --out benchmarks/results/e2e_1b.json
    python benchmarks/bench_e2e.py --merge benchmarks/results/e2e_135m.json benchmarks/results/e2e_1b.json \
        --out benchmarks/results/e2e.json

A run a time limit cuts short leaves its finished rows in ``OUT.partial``;
``--merge`` takes such a file too and marks its run ``cut_short``.

``--warm-parallel K --modes ...`` compiles the modes in K processes side by
side first (:func:`warm_caches`), so that a run of every mode fits in one call.

A step is the loss and the gradients of every parameter
(``torch.autograd.grad``), no optimizer (the same for every mode). Every mode
is the same kind of function of ``(params, input_ids, step)``, compiled with
``torch.compile(fullgraph=True)`` under the same settings (``--cudagraphs``
adds ``mode="reduce-overhead"`` on every side). Modes:

* ``dense_eager``: the model's own loss (``labels=``), eager, for reference;
* ``dense``: the model's own loss, compiled; ``dense_ce``: ``F.cross_entropy``
  of the bf16 logits, compiled; ``dense_liger``: Liger-Kernel's fused linear
  cross-entropy on the final hidden states, compiled (if installed);
  ``dense_ce_causal``: ``dense_ce`` with the model's attention switched to
  SDPA's ``is_causal`` and no mask tensor (compiled, Hugging Face builds an
  explicit causal mask, which sends SDPA to a slower masked kernel; the
  inputs here have no padding, so any user can make this switch, and the
  routed forward of ``cggr_loss`` makes it on its own). The fastest of these
  is the baseline of ``speedup_vs_dense``;
* ``selective_0.25_routed_attention``: attention's backward over the routed
  queries only (``route_attention=True``);
* ``selective_R``: :func:`cggr_fn.models.cggr_loss` with ``selection="topk"``
  and ratio R (a 2-layer router); ``_fused``: the same with ``fused_head=True``
  (the head and loss by :func:`cggr_fn.fused_selective_loss`);
* ``priority_0.25``: unbiased priority sampling by the logits-gradient norm
  (the importance-weighted loss), the same capacities;
* ``random_0.25``: the same capacities with random tokens (no router);
* ``buckets_4``: four depth tiers (100/75/50/25% of the layers) after warmup;
* ``sequences_0.25``: :func:`cggr_fn.models.hardest_sequence_loss` with a
  4-layer router.

``flop_model_speedup`` is dense's FLOPs over the mode's by the FLOP model of
:func:`cggr_fn.models.cggr_loss` (matmul FLOPs; attention counted causal).
Every row carries a profiler summary of one step (kernel time by kind, the top kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import cggr_fn
from _provenance import source_commit, source_digest
from cggr_fn.models import cggr_loss, hardest_sequence_loss, lm_loss, truncated_router

MODELS = {
    # SmolLM-135M's architecture.
    "135m": dict(config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=2048), batch=(16, 512)),
    # A Llama-3.2-1B-shaped model.
    "1b": dict(config=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=4096), batch=(8, 2048)),
}
ROUTER_LAYERS = 2
SEQUENCE_ROUTER_LAYERS = 4
#: The attention implementation of ``dense_ce_causal``: SDPA, and no mask tensor at all (unpadded inputs only).
UNMASKED_CAUSAL = "sdpa_unmasked_causal"


def register_unmasked_causal() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(UNMASKED_CAUSAL, sdpa_attention_forward)
    AttentionMaskInterface.register(UNMASKED_CAUSAL, lambda *args, **kwargs: None)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str | None):
    """The model's attention implementation switched to ``name`` (``None``: unchanged) for the block."""
    previous = model.config._attn_implementation
    if name is not None:
        model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def flops_per_token(cfg: transformers.LlamaConfig, seq: int) -> dict[str, float]:
    """Forward matmul FLOPs per token: a layer's linears (2P), its attention (A, causal), the head (2H)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    p = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    a = 2 * 2 * (seq / 2) * h  # QK^T and PV, each 2 FLOPs per MAC, over seq/2 keys on average
    return {"P": p, "A": a, "H": h * cfg.vocab_size, "L": cfg.num_hidden_layers}


def flop_model(mode: str, f: dict[str, float]) -> float:
    """FLOPs per token of a step (forward + backward) under the FLOP model of cggr_loss's docstring."""
    P, A, H, L = f["P"], f["A"], f["H"], f["L"]
    dense = L * (6 * P + 3.5 * A) + 6 * H
    if mode.startswith("dense"):
        return dense
    if mode.startswith("sequences"):
        r = float(mode.split("_")[1])
        return SEQUENCE_ROUTER_LAYERS * (2 * P + A) + 2 * H + r * dense
    routed_attention = mode.endswith("routed_attention")

    def layer(r: float) -> float:
        # Linears: forward on every token, backward on the routed. Attention:
        # forward and backward on every query (A + 2.5A), or, routed, forward
        # on every query, then forward and backward on the routed again.
        return 2 * P + A + 4 * r * P + (3.5 * r * A if routed_attention else 2.5 * A)

    router = 0.0 if mode.startswith("random") else ROUTER_LAYERS * (2 * P + A) + 2 * H
    if mode.startswith("buckets"):
        shares = [(b + 1) / 4 for b in range(4)]  # layers in each quarter are trained by 25/50/75/100% of tokens
        trunk = sum(L / 4 * layer(r) for r in shares)
        return router + trunk + 6 * H
    r = float(mode.split("_")[1])
    return router + L * layer(r) + 6 * r * H


def build(name: str, num_layers: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    spec = MODELS[name]
    overrides = {} if num_layers is None else {"num_hidden_layers": num_layers}
    cfg = transformers.LlamaConfig(**{**spec["config"], **overrides}, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    batch, seq = spec["batch"]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return model, ids


def loss_fns(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, callable]:
    """Every mode as ``fn(params, input_ids, step) -> loss``."""
    call = torch.func.functional_call

    def dense(params, input_ids, step):
        return call(model, params, (), {"input_ids": input_ids, "labels": input_ids, "use_cache": False}).loss

    def dense_ce(params, input_ids, step):
        logits = call(model, params, (), {"input_ids": input_ids, "use_cache": False}).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    fns = {"dense_eager": dense, "dense": dense, "dense_ce": dense_ce, "dense_ce_causal": dense_ce}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def dense_liger(params, input_ids, step):
            base = {k[len("model."):]: v for k, v in params.items() if k.startswith("model.")}
            hidden = call(model.model, base, (), {"input_ids": input_ids, "use_cache": False})[0]
            head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
            return liger(head, hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1))

        fns["dense_liger"] = dense_liger
    except ImportError:
        pass

    def routed(**kwargs):
        fn = cggr_loss(model, router_layers=ROUTER_LAYERS, **kwargs)
        return lambda params, input_ids, step: fn(params, input_ids, step)[0]

    fns["selective_0.25"] = routed(selection="topk", ratio=0.25)
    fns["selective_0.25_fused"] = routed(selection="topk", ratio=0.25, fused_head=True)
    fns["selective_0.25_routed_attention"] = routed(selection="topk", ratio=0.25, route_attention=True)
    fns["selective_0.5"] = routed(selection="topk", ratio=0.5)
    fns["priority_0.25"] = routed(selection="priority", ratio=0.25, method="grad_norm")
    fns["random_0.25"] = routed(selection="random", ratio=0.25)
    fns["buckets_4"] = routed(selection="buckets", num_buckets=4, warmup_steps=0)
    fns["buckets_4_fused"] = routed(selection="buckets", num_buckets=4, warmup_steps=0, fused_head=True)
    router = truncated_router(model, num_layers=SEQUENCE_ROUTER_LAYERS)
    fns["sequences_0.25"] = lambda params, input_ids, step: hardest_sequence_loss(
        model, router, params, input_ids, input_ids, ratio=0.25)
    return fns


def time_step(step_fn, params, ids, step, iters: int) -> tuple[float, list[float], float]:
    """Median ms of ``step_fn`` over ``iters`` runs (CUDA events), after warmup; peak memory in GB."""
    for _ in range(3):
        step_fn(params, ids, step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step_fn(params, ids, step)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return statistics.median(times), times, peak


KERNEL_KINDS = (  # first match wins; the names are those of cuBLAS/CUTLASS, FlashAttention, ATen and Inductor
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|sm90_|nvjet|matmul|_mm_|addmm", re.I)),
    ("gather_scatter", re.compile(r"index|gather|scatter|cat_|take", re.I)),
    ("sort_scan", re.compile(r"sort|scan|cumsum|topk|radix", re.I)),
    ("inductor_fused", re.compile(r"^triton_", re.I)),
)


def profile(step_fn, params, ids, step, top: int = 15) -> dict:
    """Where one step's device time goes: the top CUDA kernels, and the time by kind of kernel.

    ``kernel_ms`` is the sum of all kernels' device time; a step much longer
    than it waits on the host (launches, Python), which CUDA graphs remove.
    """
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_fn(params, ids, step)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kinds: dict[str, float] = {}
    for event in events:
        kind = next((k for k, pattern in KERNEL_KINDS if pattern.search(event.key)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time_total / 1e3
    rows = [{"name": e.key[:120], "cuda_ms": round(e.device_time_total / 1e3, 3), "calls": e.count}
            for e in sorted(events, key=lambda e: -e.device_time_total)[:top]]
    return {"kernel_ms": round(sum(kinds.values()), 3), "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items())},
            "top_kernels": rows}


CHECK_LAYERS = 4


def check_capture(name: str) -> dict:
    """The compacted CGGR step runs as CUDA graphs and replays the gradients of the same step uncaptured.

    On the model's shape with :data:`CHECK_LAYERS` layers (capture is a
    property of the code path, not of the depth; the timed rows capture the
    full depth). ``fullgraph=True`` already refuses host syncs and
    data-dependent shapes; Inductor's cudagraph trees then capture forward and
    backward unless something prevents it, which they count as a skip. Each
    selection is replayed on two batches at two steps, in turn, and compared:

    * with the same function compiled without CUDA graphs on the same inputs
      (``max_rel_grad_diff_vs_compiled``: the capture itself, same kernels);
    * with eager (``max_rel_grad_diff_vs_eager``; ``routing_agreement``: the
      share of tokens routed to the same depth). A randomly initialised model
      gives nearly equal losses to every token, so bf16 rounding alone
      reorders them; the scores are made well separated by a fixed random
      ``reference`` (the excess-loss rule), so eager and compiled route the
      same tokens and their gradients compare.
    """
    from torch._dynamo.utils import counters

    def skips() -> int:
        value = counters["inductor"]["cudagraph_skips"]
        return sum(value.values()) if isinstance(value, dict) else value

    model, ids = build(name, num_layers=CHECK_LAYERS)
    generator = torch.Generator("cuda").manual_seed(2)
    batches = [(ids, torch.tensor(3, device="cuda"), 20 * torch.randn(ids.shape, device="cuda", generator=generator)),
               (torch.randint(0, model.config.vocab_size, ids.shape, device="cuda", generator=generator),
                torch.tensor(7, device="cuda"), 20 * torch.randn(ids.shape, device="cuda", generator=generator))]
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    plist = list(params.values())

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x.float() - y.float()).norm() / (y.float().norm() + 1e-30)) for x, y in zip(a, b))

    result = {"num_layers": CHECK_LAYERS}
    for selection in ("topk", "buckets"):
        fn = cggr_loss(model, selection=selection, ratio=0.25, router_layers=ROUTER_LAYERS, method="loss")

        def grads(loss_fn, x, s, reference):
            loss, routing = loss_fn(params, x, s, reference=reference)
            return [g.clone() for g in torch.autograd.grad(loss, plist)], routing.depth.clone()

        eager = [grads(fn, *batch) for batch in batches]
        plain = torch.compile(fn, fullgraph=True)
        compiled = [grads(plain, *batch) for batch in batches]
        graphed_fn = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
        before = skips()
        replays = [grads(graphed_fn, *batches[i % 2]) for i in range(6)]  # recorded, then replayed, alternating
        torch.cuda.synchronize()
        last = replays[-2:]  # batches 0 and 1, as ``compiled`` and ``eager``
        result[selection] = {
            "cudagraph_skips": skips() - before,
            "max_rel_grad_diff_vs_compiled": max(rel(g[0], c[0]) for g, c in zip(last, compiled)),
            "max_rel_grad_diff_vs_eager": max(rel(g[0], e[0]) for g, e in zip(last, eager)),
            "routing_agreement": min(float((g[1] == e[1]).float().mean()) for g, e in zip(last, eager)),
        }
        del plain, graphed_fn
    return result


def run(name: str, iters: int, cudagraphs: bool, modes: list[str] | None, partial: str | None = None,
        capture_check: bool = False) -> dict:
    torch._dynamo.config.cache_size_limit = 64
    model, ids = build(name)
    cfg = model.config
    f = flops_per_token(cfg, ids.shape[1])
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    plist = list(params.values())
    step = torch.tensor(10, device="cuda")
    result = {"model": name, "config": MODELS[name], "tokens_per_step": ids.numel(), "cudagraphs": cudagraphs,
              "rows": [], "checks": {}}
    fns = loss_fns(model, ids)
    register_unmasked_causal()
    for mode, loss_fn in fns.items():
        if modes and mode not in modes:
            continue
        if mode == "dense_eager":
            compiled = loss_fn
        else:
            compiled = torch.compile(loss_fn, fullgraph=mode != "dense_liger",
                                     mode="reduce-overhead" if cudagraphs else None)

        def step_fn(p, x, s, compiled=compiled):
            loss = compiled(p, x, s)
            return torch.autograd.grad(loss, plist)

        t0 = time.perf_counter()
        with attention_implementation(model, UNMASKED_CAUSAL if mode == "dense_ce_causal" else None):
            try:
                ms, times, peak = time_step(step_fn, params, ids, step, iters)
            except Exception as error:  # a failing mode is reported, not hidden
                result["rows"].append({"model": name, "mode": mode, "error": f"{type(error).__name__}: {error}"[:2000]})
                print(mode, "FAILED", error, flush=True)
                torch.cuda.empty_cache()
                continue
            row = {"model": name, "mode": mode, "tokens_per_step": ids.numel(), "median_step_ms": round(ms, 3),
                   "times_ms": [round(t, 3) for t in times],
                   # CUDA graphs hold the step's memory in their pool, allocated at capture: the timed steps show none.
                   "peak_mem_gb": None if cudagraphs and mode != "dense_eager" else round(peak, 3),
                   "flop_model_speedup": round(flop_model("dense", f) / flop_model(mode, f), 3),
                   "compile_and_warmup_s": round(time.perf_counter() - t0 - ms * iters / 1e3, 1)}
            row["profile"] = profile(step_fn, params, ids, step)
        result["rows"].append(row)
        print(mode, row["median_step_ms"], "ms", row["peak_mem_gb"], "GB", flush=True)
        if partial:  # what a time limit cuts short is still on disk
            with open(partial, "w") as handle:
                json.dump({"environment": environment(), "run": result}, handle, indent=1)
        del compiled
        torch.cuda.empty_cache()
    if capture_check:
        try:
            result["checks"]["cuda_graphs"] = check_capture(name)
        except Exception as error:  # reported, not hidden
            result["checks"]["cuda_graphs"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print("cuda graph check", result["checks"]["cuda_graphs"], flush=True)
    return with_speedups(result)


def with_speedups(result: dict) -> dict:
    """Each row's ``speedup_vs_dense`` against the run's fastest compiled dense row, and its share of the FLOP bound."""
    dense = [r["median_step_ms"] for r in result["rows"]
             if r["mode"] in ("dense", "dense_ce", "dense_ce_causal", "dense_liger") and "median_step_ms" in r]
    if dense:
        best = min(dense)
        result["dense_baseline_ms"] = best
        for row in result["rows"]:
            if "median_step_ms" in row:
                row["speedup_vs_dense"] = round(best / row["median_step_ms"], 3)
                row["flop_model_efficiency"] = round(row["speedup_vs_dense"] / row["flop_model_speedup"], 3)
    return result


def warm_caches(name: str, modes: list[str], parallel: int, cudagraphs: bool, capture_check: bool) -> dict:
    """Compile every mode in its own process, ``parallel`` at a time, filling Inductor's on-disk caches.

    Compilation is CPU-bound and mostly single-threaded Python, so processes
    compiling side by side finish sooner than one process compiling in turn;
    the timed run that follows (alone on the GPU) then loads the compiled
    graphs from the caches (FX graph and AOT autograd caches). Only
    compilation moves: the timed steps are the same.
    """
    jobs = [["--modes", mode] for mode in modes] + ([["--modes", "none", "--capture-check"]] if capture_check else [])
    started = time.perf_counter()
    launched: list[tuple[list[str], subprocess.Popen, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, job in enumerate(jobs):
            while sum(process.poll() is None for _, process, _ in launched) >= parallel:
                time.sleep(1)
            log = os.path.join(scratch, f"{index}.log")
            command = [sys.executable, __file__, "--model", name, "--iters", "1", *job,
                       "--out", os.path.join(scratch, f"{index}.json")] + (["--cudagraphs"] if cudagraphs else [])
            with open(log, "w") as handle:
                launched.append((job, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT), log))
        failures = []
        for job, process, log in launched:
            if process.wait():
                failures.append({"job": job, "log_tail": open(log).read()[-1500:]})
    return {"parallel": parallel, "jobs": len(jobs), "wall_s": round(time.perf_counter() - started, 1),
            "failures": failures}


def environment() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "commit": source_commit(), "source_digest": source_digest(),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cggr_fn": cggr_fn.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cudagraphs", action="store_true", help="compile every mode with mode='reduce-overhead'")
    parser.add_argument("--modes", nargs="*", help="only these modes")
    parser.add_argument("--capture-check", action="store_true",
                        help="after the modes, check that the compacted step runs as CUDA graphs and replays the "
                             "uncaptured step's gradients (check_capture; the model's shape at 4 layers)")
    parser.add_argument("--merge", nargs="*", help="merge result files into --out instead of running")
    parser.add_argument("--warm-parallel", type=int, default=0, metavar="K",
                        help="first compile the modes in K processes at a time to fill the compile caches "
                             "(warm_caches); compile_and_warmup_s then counts cache loads")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.load(open(path)) for path in args.merge]
        for path, part in zip(args.merge, parts):
            if path.endswith(".partial"):  # a run a time limit cut short: its finished rows, marked as such
                part["run"] = {**with_speedups(part["run"]), "cut_short": True}
        merged = {"environment": parts[0]["environment"], "runs": [p["run"] for p in parts],
                  "rows": [row for p in parts for row in p["run"]["rows"]]}
        json.dump(merged, open(args.out, "w"), indent=1)
        return
    if not args.model:
        parser.error("--model is required unless --merge is given")
    warm = None
    if args.warm_parallel:
        if not args.modes:
            parser.error("--warm-parallel needs the --modes it compiles")
        warm = warm_caches(args.model, args.modes, args.warm_parallel, args.cudagraphs, args.capture_check)
        print("warmed compile caches", warm, flush=True)
    run_result = run(args.model, args.iters, args.cudagraphs, args.modes, args.out + ".partial", args.capture_check)
    if warm is not None:
        run_result["compile_caches_warmed"] = warm
    result = {"environment": environment(), "run": run_result}
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps({r["mode"]: r.get("speedup_vs_dense") for r in result["run"]["rows"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
