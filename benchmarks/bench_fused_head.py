"""Benchmark the fused LM head (statistics + selection + selective loss) against fused and unfused cross-entropy.

Run on a CUDA machine (Liger-Kernel is optional; without it its rows are
recorded as absent; ``benchmarks/run_fused_head_gpu.sh`` unpacks its
pure-Python wheel from ``.whl/`` onto ``PYTHONPATH``)::

    python benchmarks/bench_fused_head.py --out benchmarks/results/fused_head.json

Each row times forward + backward (gradients of hidden and weight) of one
implementation at 16384 tokens, bf16, with ``triton.testing.do_bench``
(median ms), and measures ``peak_extra_gb``: the peak memory allocated during
one call above what was allocated before it (inputs only; gradients are
cleared first, so the hidden and weight gradients count as extra).

Implementations:

* ``ours``: :func:`cggr_fn.fused_head_loss` at ``ratio`` (statistics of every
  row, ``select`` top-k by ``grad_norm``, the loss over the selected rows).
* ``ours_loss_only``: :func:`cggr_fn.fused_selective_loss` on a given mask of
  the same size (pass 2 alone, for the cost split).
* ``eager``: ``F.cross_entropy((hidden @ weight.T).float(), targets)``.
* ``compiled``: the same under ``torch.compile``.
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``.

``floor_ms`` is the GEMM floor at the bf16 matmul rate measured in the same
run: ours does the statistics GEMM over every token, then the forward and two
backward GEMMs over the selected tokens (at ratio 1 it does both in one pass:
3 GEMMs over every token, like the dense implementations); ``ours_loss_only``
only the latter three. The issue's floor (forward over every token, backward
over the selected) is ``floor_issue_ms``. A sweep (``--no-sweep`` skips it)
also times ours over chunk sizes at hidden 2048, vocab 128256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cggr_fn  # noqa: E402
from cggr_fn import _head  # noqa: E402
from _provenance import source_commit, source_digest  # noqa: E402

TOKENS = 16384
HIDDENS = (2048, 4096)
VOCABS = (49152, 128256)
RATIOS = (1.0, 0.5, 0.25, 0.1)
DTYPE = torch.bfloat16


def bench(fn, grad_to_none):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def peak_extra_gb(fn, tensors):
    for t in tensors:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in tensors:
        t.grad = None
    return peak / 2**30


def matmul_tflops(hidden, weight):
    ms = triton.testing.do_bench(lambda: hidden @ weight.T, warmup=25, rep=200, return_mode="median")
    return 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0] / (ms * 1e-3) / 1e12


def load_liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as error:  # noqa: BLE001 -- any import failure means "absent", recorded with its reason
        return None, f"{type(error).__name__}: {error}"
    import liger_kernel

    return LigerFusedLinearCrossEntropyLoss(), getattr(liger_kernel, "__version__", "unknown")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/fused_head.json")
    parser.add_argument("--no-sweep", action="store_true", help="skip the chunk-size sweep")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--budget-s", type=float, default=220.0, help="stop starting new configurations after this")
    args = parser.parse_args()
    t_start = time.perf_counter()
    liger, liger_info = load_liger()
    try:
        from importlib import metadata

        liger_version = metadata.version("liger-kernel") if liger is not None else None
    except Exception:  # noqa: BLE001 -- version lookup only
        liger_version = None
    report = {
        "device": torch.cuda.get_device_name(),
        "commit": source_commit(),
        "source_digest": source_digest(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger_kernel": liger_version if liger is not None else f"absent ({liger_info})",
        "tokens": TOKENS,
        "dtype": "bf16",
        "timing": "triton.testing.do_bench median ms of forward + backward (hidden and weight gradients)",
        "peak_extra_gb": "max_memory_allocated during one call minus memory_allocated before it (inputs only)",
        "floor_ms": "the GEMMs the implementation needs at the matmul rate measured in the same run: ours = statistics "
        "GEMM over every token + 3 over the selected (3 over every token at ratio 1), ours_loss_only = 3 over the "
        "selected, dense = 3 over every token",
        "floor_issue_ms": "issue 10's floor: forward GEMM over every token + 2 backward GEMMs over the selected",
        "rows": [],
        "sweep": [],
        "targets": [],
        "skipped": [],
        "errors": [],
    }

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    print(f"{report['device']} torch {report['torch']} triton {report['triton']} liger {report['liger_kernel']}", flush=True)
    compiled_ce = torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t))
    for hidden_size in HIDDENS:
        for vocab in VOCABS:
            if time.perf_counter() - t_start > args.budget_s:
                report["skipped"].append({"hidden": hidden_size, "vocab": vocab, "why": "time budget"})
                continue
            gen = torch.Generator(device="cuda").manual_seed(0)
            hidden = torch.randn(TOKENS, hidden_size, device="cuda", generator=gen).to(DTYPE).requires_grad_()
            weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * (2.0 / hidden_size**0.5)).to(DTYPE)
            weight.requires_grad_()
            targets = torch.randint(0, vocab, (TOKENS,), device="cuda", generator=gen)
            leaves = [hidden, weight]
            tflops = matmul_tflops(hidden.detach(), weight.detach())
            gemm_ms = 2 * TOKENS * hidden_size * vocab / (tflops * 1e12) * 1e3

            def record(impl, ratio, fn, floor_gemms, selected=TOKENS):
                """Time ``fn``; ``floor_gemms``: its GEMM floor in units of one full (tokens x hidden x vocab) GEMM."""
                try:
                    fn()  # compile / autotune outside the timing
                    for t in leaves:
                        t.grad = None
                    ms = bench(fn, leaves)
                    peak = peak_extra_gb(fn, leaves)
                except Exception as error:  # noqa: BLE001 -- recorded, and the other rows still run
                    for t in leaves:
                        t.grad = None
                    torch.cuda.empty_cache()
                    entry = {"hidden": hidden_size, "vocab": vocab, "ratio": ratio, "impl": impl,
                             "error": f"{type(error).__name__}: {error}"[:500]}
                    report["errors"].append(entry)
                    print("ERROR", json.dumps(entry), flush=True)
                    save()
                    return None
                floor = gemm_ms * floor_gemms
                row = {
                    "tokens": TOKENS, "hidden": hidden_size, "vocab": vocab, "ratio": ratio, "impl": impl,
                    "median_ms": round(ms, 3), "peak_extra_gb": round(peak, 3), "floor_ms": round(floor, 3),
                    "x_floor": round(ms / floor, 3), "matmul_tflops": round(tflops, 1),
                    "floor_issue_ms": round(gemm_ms * (1 + 2 * selected / TOKENS), 3),
                }
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
                return row

            def ours(ratio, chunk=None):
                def fn():
                    out = cggr_fn.fused_head_loss(hidden, weight, targets, ratio=ratio, method="grad_norm", chunk_size=chunk)
                    out.loss.backward()

                return fn

            by_impl = {}
            for ratio in RATIOS:
                k = cggr_fn.capacity(TOKENS, ratio=ratio)
                # Statistics GEMM over every token, then forward + 2 backward GEMMs over
                # the selected; at ratio 1 one pass of 3 GEMMs over every token.
                by_impl[("ours", ratio)] = record("ours", ratio, ours(ratio), 3.0 if ratio == 1.0 else 1 + 3 * k / TOKENS, k)
                mask = torch.zeros(TOKENS, dtype=torch.bool, device="cuda")
                mask[torch.randperm(TOKENS, device="cuda")[:k]] = True

                def loss_only(mask=mask, k=k):
                    cggr_fn.fused_selective_loss(hidden, weight, targets, mask, capacity=k).backward()

                record("ours_loss_only", ratio, loss_only, 3 * k / TOKENS, k)

            def eager():
                F.cross_entropy((hidden @ weight.T).float(), targets).backward()

            record("eager", 1.0, eager, 3.0)
            if not args.no_compile:

                def compiled():
                    compiled_ce(hidden, weight, targets).backward()

                record("compiled", 1.0, compiled, 3.0)
            if liger is not None:

                def liger_fn():
                    liger(weight, hidden, targets).backward()

                by_impl["liger"] = record("liger", 1.0, liger_fn, 3.0)
                for ratio, limit in ((1.0, 1.05), (0.25, 0.65)):
                    mine = by_impl[("ours", ratio)]
                    if mine is None or by_impl["liger"] is None:
                        continue
                    report["targets"].append({
                        "hidden": hidden_size, "vocab": vocab, "ratio": ratio,
                        "time_vs_liger": round(mine["median_ms"] / by_impl["liger"]["median_ms"], 3), "time_target": limit,
                        "peak_vs_liger": round(mine["peak_extra_gb"] / max(by_impl["liger"]["peak_extra_gb"], 1e-9), 3),
                    })
                save()
            if not args.no_sweep and hidden_size == 2048 and vocab == 128256:
                for chunk in (512, 1024, 2048, 4096):
                    for ratio in (1.0, 0.25):
                        fn = ours(ratio, chunk)
                        fn()
                        ms = bench(fn, leaves)
                        entry = {"hidden": hidden_size, "vocab": vocab, "ratio": ratio, "chunk_size": chunk,
                                 "median_ms": round(ms, 3), "peak_extra_gb": round(peak_extra_gb(fn, leaves), 3)}
                        report["sweep"].append(entry)
                        print("sweep", json.dumps(entry), flush=True)
                report["default_chunk_size"] = _head.chunk_rows(TOKENS, hidden_size, vocab)
                save()
            del hidden, weight, targets, leaves
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print(f"wrote {args.out} in {report['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
