"""GPU check that the CGGR hot path never synchronises and captures in a CUDA graph.

Run on a CUDA machine (not collected by pytest)::

    python benchmarks/check_pipeline_gpu.py --out report.json

Every public function of the step (score, ratio_schedule, dynamic_ratio,
bucket, bucket_depth, select with each strategy, priority_sample, route_depth
forward and backward, selective_loss forward and backward, weighted too) runs under
``torch.cuda.set_sync_debug_mode("error")`` with Python and tensor steps,
ratios and seeds. Then a whole scoring + bucketing + selection + loss step is
captured in a CUDA graph and replayed at a new step on new data, and must equal
eager. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import cggr_fn

failures: list[str] = []
passed: list[str] = []


def check(name: str, fn) -> None:
    try:
        fn()
    except Exception as error:  # a check script reports every failure, then exits 1
        failures.append(f"{name}: {type(error).__name__}: {error}")
        print(f"FAIL {name}: {error}")
    else:
        passed.append(name)
        print(f"ok   {name}")


def cggr_step(logits, targets, step, blocks, hidden):
    scores = cggr_fn.score(logits, targets)
    ratio = cggr_fn.ratio_schedule(step, warmup_steps=100, final_ratio=0.25)
    ratio = cggr_fn.dynamic_ratio(ratio, cggr_fn.token_stats(logits).confidence)
    buckets = cggr_fn.bucket(scores, step, num_buckets=4, warmup_steps=100)
    depth = cggr_fn.bucket_depth(scores, step, num_layers=len(blocks), warmup_steps=100)
    mask = cggr_fn.select(scores, ratio=ratio, strategy="stratified", seed=step)
    out = cggr_fn.route_depth(blocks, depth)(hidden)
    loss = cggr_fn.selective_loss(out @ hidden.new_ones(hidden.shape[-1], logits.shape[-1]), targets, mask)
    sample = cggr_fn.priority_sample(cggr_fn.score(logits, targets, method="grad_norm"), ratio=ratio, seed=step)
    unbiased = cggr_fn.selective_loss(logits, targets, sample.mask, weights=sample.weights, normalize="valid")
    return loss, buckets, mask, sample.weights, unbiased


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    batch, seq, vocab, hidden_dim = 8, 512, 32000, 64
    logits = torch.randn(batch, seq, vocab, device=dev, generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (batch, seq), device=dev, generator=gen)
    targets[:, :16] = -100
    weights = [torch.randn(hidden_dim, hidden_dim, device=dev, generator=gen, requires_grad=True) for _ in range(4)]
    blocks = [lambda h, w=w: h + torch.tanh(h @ w) * 0.1 for w in weights]
    hidden = torch.randn(batch, seq, hidden_dim, device=dev, generator=gen, requires_grad=True)
    scores = cggr_fn.score(logits, targets)
    confidence = cggr_fn.token_stats(logits).confidence
    torch.cuda.synchronize()

    steps = {"int step": 37, "cuda step": torch.tensor(37, device=dev), "cpu step": torch.tensor(37)}
    torch.cuda.set_sync_debug_mode("error")
    try:
        check("score / token_stats", lambda: cggr_fn.score(logits, targets, method="margin"))
        for name, step in steps.items():
            check(f"ratio_schedule + dynamic_ratio ({name})", lambda s=step: cggr_fn.dynamic_ratio(
                cggr_fn.ratio_schedule(s, warmup_steps=100, final_ratio=0.25), confidence))
            check(f"bucket + bucket_depth ({name})", lambda s=step: cggr_fn.bucket_depth(
                scores, s, num_layers=4, warmup_steps=100))
            check(f"bucket_sizes ({name})", lambda s=step: cggr_fn.bucket_sizes(scores.numel(), s, warmup_steps=100))
            for strategy in ("topk", "stratified", "sequence_aware"):
                check(f"select {strategy}, float ratio ({name} seed)", lambda s=step, st=strategy: cggr_fn.select(
                    scores, ratio=0.3, strategy=st, seed=s))
                check(f"select {strategy}, tensor ratio ({name} seed)", lambda s=step, st=strategy: cggr_fn.select(
                    scores, ratio=cggr_fn.dynamic_ratio(0.3, confidence), strategy=st, seed=s))
            check(f"priority_sample, float ratio ({name} seed)", lambda s=step: cggr_fn.priority_sample(
                scores.clamp_min(0), ratio=0.3, seed=s))
            check(f"priority_sample, tensor ratio ({name} seed)", lambda s=step: cggr_fn.priority_sample(
                scores.clamp_min(0), ratio=cggr_fn.dynamic_ratio(0.3, confidence), seed=s, uniform_mix=0.1))
            check(f"route_depth + selective_loss forward and backward ({name})",
                  lambda s=step: cggr_step(logits, targets, s, blocks, hidden)[0].backward())
        check("dynamic_ratio with a Python ratio", lambda: cggr_fn.dynamic_ratio(0.5, confidence))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def graph_capture() -> None:
        static_logits, static_step = logits.clone(), torch.tensor(5, device=dev)
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    cggr_step(static_logits, targets, static_step, blocks, hidden.detach())
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = cggr_step(static_logits, targets, static_step, blocks, hidden.detach())
            fresh = torch.randn(logits.shape, device=dev, generator=gen).to(logits.dtype)
            static_logits.copy_(fresh)
            static_step.fill_(80)
            graph.replay()
            want = cggr_step(fresh, targets, torch.tensor(80, device=dev), blocks, hidden.detach())
        for got, expected in zip(captured, want):
            torch.testing.assert_close(got, expected)

    check("CUDA graph capture + replay at a new step on new data", graph_capture)

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "passed": passed, "failures": failures,
              "ok": not failures}
    print(json.dumps({"ok": report["ok"], "failures": failures}, indent=1))
    out = args.out or (os.path.join(os.environ["OUT"], "check_pipeline_gpu.json") if "OUT" in os.environ else None)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
