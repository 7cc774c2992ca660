"""Benchmark token statistics against the read-once memory floor.

Run on a CUDA machine::

    python benchmarks/bench_token_stats.py --out benchmarks/results/token_stats.json

Measures the device copy bandwidth in the same run (a large device-to-device
copy, bytes read plus written over time), then times, for 16384 rows of logits
at each vocabulary size and dtype, the fused kernel (``ours``), the PyTorch
eager reference (``eager``) and ``torch.compile`` of the reference
(``compiled``), all computing entropy, confidence, margin, logsumexp, nll and
grad_norm from targets; ``ours_no_targets`` times the kernel without targets
(no nll, no grad_norm: no target-masked sum of squares in the loop), to show
what grad_norm's accumulator costs.
``floor_ms`` is the logits' bytes read once over the copy bandwidth, and
``x_floor`` is ``median_ms / floor_ms``. A read-only ``torch.amax`` over the
same logits is recorded as ``amax`` for scale. References that would not fit in
memory run over row chunks inside the timed function. ``--sweep`` also times
every launch configuration of :func:`sweep_configs`; ``--selection`` times
``torch.topk``/``sort`` over float32 scores (to judge whether selection needs
a kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import triton
import triton.testing

from cggr_fn._stats import token_stats_reference
from cggr_fn.kernels import fused_token_stats
from cggr_fn.kernels import token_stats as kernel

ROWS = 16384
VOCABS = (32000, 49152, 128256, 151936, 262144)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

def sweep_configs(dtype):
    """Launch configurations to time: warps x vectors per lane, +- prefetch."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    configs = [kernel.LaunchConfig(w, k, 32 * w, vec) for w, k in ((4, 2), (4, 4), (8, 2))]
    shapes = ((2, 2), (2, 4), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2))
    configs += [kernel.LaunchConfig(w, k, 32 * w, vec, prefetch=True) for w, k in shapes]
    return configs


def bench(fn, warmup=25, rep=100):
    """Median milliseconds of ``fn`` (CUDA events; L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth():
    """Device-to-device copy bandwidth, TB/s, counting bytes read plus written."""
    n = 1 << 31  # 4 GiB of bf16 each way: far beyond L2
    src = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = [bench(lambda: dst.copy_(src), warmup=50, rep=300) for _ in range(3)]
    del src, dst
    torch.cuda.empty_cache()
    med = statistics.median(ms)
    return 2 * n * 2 / (med * 1e-3) / 1e12, ms


def resources(handle):
    """Registers and spills of a launched kernel, where Triton reports them."""
    return {key: getattr(handle, key) for key in ("n_regs", "n_spills") if isinstance(getattr(handle, key, None), int)}


def chunked(fn, logits, targets, max_elems=1 << 30):
    """Run ``fn`` over row chunks (powers of two) so references fit in memory."""
    vocab = logits.shape[-1]
    step = 1 << max(0, (max_elems // vocab).bit_length() - 1)
    step = min(step, logits.shape[0])
    if step >= logits.shape[0]:
        return lambda: fn(logits, targets, -100)
    parts = [(logits[i : i + step], targets[i : i + step]) for i in range(0, logits.shape[0], step)]
    return lambda: [fn(x, t, -100) for x, t in parts]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/token_stats.json")
    parser.add_argument("--sweep", action="store_true", help="time every launch configuration of sweep_configs()")
    parser.add_argument("--sweep-dtypes", default="bf16,fp32")
    parser.add_argument("--no-reference", action="store_true", help="time only ours and amax")
    parser.add_argument("--selection", action="store_true", help="time torch.topk/sort over float32 scores")
    parser.add_argument("--asm-dir", default=None, help="write PTX/SASS of the vocab-128256 kernels here")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip remaining reference cases after this")
    args = parser.parse_args()
    t_start = time.perf_counter()
    bw, bw_runs = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    report = {
        "device": torch.cuda.get_device_name(),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_tbps": round(bw, 4),
        "copy_bandwidth_runs_ms": bw_runs,
        "floor_definition": "bytes of logits read once / copy bandwidth (read+write bytes per second)",
        "rows": ROWS,
        "notes": "eager and compiled run over row chunks of at most 2**30 elements when the whole "
        "batch would not fit in memory; all impls compute all six statistics with targets, "
        "except ours_no_targets",
        "cases": [],
        "sweep": [],
        "selection": [],
        "skipped": [],
    }
    print(f"{report['device']}  torch {report['torch']}  triton {report['triton']}  copy {bw:.3f} TB/s", flush=True)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    # One compiled graph per (vocab, dtype): allow them all rather than fall
    # back to eager after the default recompile limit.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 256
    compiled_ref = torch.compile(token_stats_reference, dynamic=False)
    sweep_dtypes = set(args.sweep_dtypes.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dname, dtype in DTYPES.items():
        for vocab in VOCABS:
            logits = torch.empty(ROWS, vocab, device="cuda", dtype=dtype)
            logits.normal_(generator=gen).mul_(4.0)
            targets = torch.randint(0, vocab, (ROWS,), device="cuda", generator=gen)
            targets[::10] = -100
            nbytes = logits.numel() * logits.element_size()
            floor_ms = nbytes / (bw * 1e12) * 1e3

            def row(impl, ms, **extra):
                rec = {"rows": ROWS, "vocab": vocab, "dtype": dname, "impl": impl, "median_ms": round(ms, 4),
                       "floor_ms": round(floor_ms, 4), "x_floor": round(ms / floor_ms, 3), **extra}
                report["cases"].append(rec)
                print(f"{dname} {vocab:>6} {impl:>9} {ms:9.3f} ms  floor {floor_ms:.3f}  x{ms / floor_ms:.3f}", flush=True)
                save()

            config = kernel.choose_config(vocab, dtype)
            outs = tuple(torch.empty(ROWS, device="cuda") for _ in range(6))
            handle = kernel.launch(logits, targets, -100, outs, config)
            if args.asm_dir and vocab == 128256:
                for kind in ("ptx", "sass"):
                    if kind in handle.asm:
                        with open(os.path.join(args.asm_dir, f"token_stats_{dname}_{vocab}.{kind}"), "w") as f:
                            f.write(handle.asm[kind])
            ms = bench(lambda: fused_token_stats(logits, targets, -100))
            row("ours", ms, config=config._asdict(), bandwidth_fraction=round(floor_ms / ms, 4), **resources(handle))
            row("ours_no_targets", bench(lambda: fused_token_stats(logits, None, -100)),
                note="no targets: no nll, no grad_norm accumulator")
            row("amax", bench(lambda: logits.amax(dim=-1)), note="read-only torch.amax, for scale")
            if args.sweep and dname in sweep_dtypes:
                outs = tuple(torch.empty(ROWS, device="cuda") for _ in range(6))
                for cfg in sweep_configs(dtype):
                    if cfg.block > triton.next_power_of_2(vocab):
                        continue
                    handle = kernel.launch(logits, targets, -100, outs, cfg)
                    ms = bench(lambda: kernel.launch(logits, targets, -100, outs, cfg))
                    report["sweep"].append({"vocab": vocab, "dtype": dname, **cfg._asdict(), "median_ms": round(ms, 4),
                                            "x_floor": round(ms / floor_ms, 3), **resources(handle)})
                    print(f"   sweep {tuple(cfg)} {ms:.3f} ms x{ms / floor_ms:.3f}", flush=True)
                save()
            if not args.no_reference:
                if time.perf_counter() - t_start > args.budget_s:
                    report["skipped"].append({"vocab": vocab, "dtype": dname, "impl": "eager+compiled", "why": "time budget"})
                    save()
                else:
                    eager = chunked(token_stats_reference, logits, targets)
                    row("eager", bench(eager, warmup=1, rep=50))
                    torch.cuda.empty_cache()
                    compiled = chunked(compiled_ref, logits, targets)
                    t0 = time.perf_counter()
                    compiled()
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    row("compiled", bench(compiled, warmup=1, rep=50), first_call_s=round(compile_s, 1))
            del logits, targets
            torch.cuda.empty_cache()

    if args.selection:
        for n in (16384, 65536, 262144, 1048576, 4194304):
            scores = torch.randn(n, device="cuda")
            k = (n + 3) // 4
            rec = {"n": n, "k": k}
            rec["topk_ms"] = round(bench(lambda: torch.topk(scores, k, sorted=False)), 4)
            rec["sort_ms"] = round(bench(lambda: torch.sort(scores)), 4)
            rec["kthvalue_ms"] = round(bench(lambda: torch.kthvalue(scores, n - k + 1)), 4)
            # What a threshold kernel would have to beat: one read of the scores.
            rec["read_floor_ms"] = round(n * 4 / (bw * 1e12) * 1e3, 5)
            report["selection"].append(rec)
            print("selection", rec, flush=True)
        save()
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    ours = [c for c in report["cases"] if c["impl"] == "ours"]
    print("\n| dtype | vocab | ours ms | floor ms | x_floor | eager ms | compiled ms |")
    for c in ours:
        others = {o["impl"]: o["median_ms"] for o in report["cases"] if o["vocab"] == c["vocab"] and o["dtype"] == c["dtype"]}
        print(f"| {c['dtype']} | {c['vocab']} | {c['median_ms']:.3f} | {c['floor_ms']:.3f} | {c['x_floor']:.3f} | "
              f"{others.get('eager', float('nan')):.2f} | {others.get('compiled', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
