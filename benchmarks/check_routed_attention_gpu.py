"""GPU check of attention over the routed queries, at real sizes, against float64.

Run on a CUDA machine (not collected by pytest)::

    python benchmarks/check_routed_attention_gpu.py --out report.json

For causal attention (the 1B benchmark's heads: 32 query heads, 8 key/value
heads, dim 64) and for boolean and additive padding masks, the FlexAttention
path of ``attend_routed`` (bf16 and float32, compiled as a training step
compiles it, and called eagerly) must match the float64 reference
(``reference_routed``) in its output and its gradients with respect to
queries, keys and values. The routed sets are
a top-k mask, and one that leaves the capacity to be filled with padding rows.
Also times the routed forward + backward against the whole attention's
(cuDNN/flash SDPA), and checks that the position hash of the random control
compiles for CUDA and equals the CPU's. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from _provenance import source_commit, source_digest
from cggr_fn._compaction import partition
from cggr_fn._selection import _position_hash
from cggr_fn.models._routed_attention import attend_routed, reference_routed

TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 2e-4}  # max error over max |reference|
results: dict = {"checks": [], "timings": []}


def inputs(batch, seq, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, device="cuda", generator=g)
    k = torch.randn(batch, kv_heads, seq, dim, device="cuda", generator=g)
    v = torch.randn(batch, kv_heads, seq, dim, device="cuda", generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def routed_grads(fn, q, k, v, cotangent):
    out = fn(q, k, v)
    return [out.detach()] + list(torch.autograd.grad((out.float() * cotangent).sum(), (q, k, v)))


def check_case(name, batch, seq, capacity, mask_kind, dtype, compiled_step=True):
    heads, kv_heads, dim = 32, 8, 64
    q, k, v = inputs(batch, seq, heads, kv_heads, dim, dtype)
    n = batch * seq
    g = torch.Generator("cuda").manual_seed(1)
    chosen = torch.zeros(n, dtype=torch.bool, device="cuda")
    count = capacity if mask_kind != "padding_rows" else capacity // 2
    chosen[torch.randperm(n, device="cuda", generator=g)[:count]] = True
    part = partition(chosen.reshape(batch, seq), capacity)
    mask = None
    if mask_kind in ("padding_mask", "additive_mask"):  # right padding: sequence b keeps its first seq - 64 b tokens
        real = torch.arange(seq, device="cuda")[None, :] < (seq - 64 * torch.arange(batch, device="cuda"))[:, None]
        mask = (torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()[None] & real[:, None, :])[:, None]
        if mask_kind == "additive_mask":  # as Hugging Face's eager attention gets it
            mask = torch.zeros((), dtype=dtype, device="cuda").masked_fill(~mask, torch.finfo(dtype).min)
    scale = dim**-0.5
    causal = mask is None
    cotangent = torch.randn(capacity, heads, dim, device="cuda", generator=g)
    def routed(q, k, v):
        return attend_routed(q, k, v, part, causal=causal, mask=mask, scale=scale)

    # Compiled as in a training step (the routed attention inside torch.compile),
    # or called eagerly (FlexAttention through its own compiled kernel).
    fn = torch.compile(routed, fullgraph=True) if compiled_step else routed
    got = routed_grads(fn, q, k, v, cotangent)

    def exact(q, k, v):
        q, k, v = (t.double() for t in (q, k, v))
        rows = q.transpose(1, 2).reshape(n, heads, dim)[part.routed]
        return reference_routed(rows, k.transpose(1, 2).reshape(n, kv_heads, dim),
                                v.transpose(1, 2).reshape(n, kv_heads, dim), part.routed, seq=seq, causal=causal,
                                mask=mask, scale=scale)

    want = routed_grads(exact, q, k, v, cotangent.double())
    errors = {}
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        errors[label] = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))
    ok = all(e <= TOLERANCE[dtype] for e in errors.values()) and all(bool(t.isfinite().all()) for t in got)
    results["checks"].append({"name": name, "dtype": str(dtype), "batch": batch, "seq": seq, "capacity": capacity,
                              "relative_errors": errors, "tolerance": TOLERANCE[dtype], "passed": ok})
    print("ok  " if ok else "FAIL", name, dtype, errors, flush=True)
    return ok


def time_case(batch, seq, capacity):
    heads, kv_heads, dim = 32, 8, 64
    q, k, v = inputs(batch, seq, heads, kv_heads, dim, torch.bfloat16)
    n = batch * seq
    chosen = torch.zeros(n, dtype=torch.bool, device="cuda")
    chosen[torch.randperm(n, device="cuda")[:capacity]] = True
    part = partition(chosen.reshape(batch, seq), capacity)
    grad_routed = torch.randn(capacity, heads, dim, device="cuda", dtype=torch.bfloat16)
    grad_whole = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    routed = torch.compile(lambda q, k, v: attend_routed(q, k, v, part, causal=True, mask=None, scale=dim**-0.5),
                           fullgraph=True)
    whole = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), fullgraph=True)

    def step(fn, grad):
        return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run

    row = {"batch": batch, "seq": seq, "capacity": capacity,
           "whole_fwd_bwd_ms": do_bench(step(whole, grad_whole)), "whole_fwd_ms": do_bench(forward(whole)),
           "routed_fwd_bwd_ms": do_bench(step(routed, grad_routed))}
    # The routed layer's attention: the whole forward without autograd, then the routed queries.
    row["routed_layer_ms"] = row["whole_fwd_ms"] + row["routed_fwd_bwd_ms"]
    row["speedup"] = row["whole_fwd_bwd_ms"] / row["routed_layer_ms"]
    results["timings"].append(row)
    print("time", row, flush=True)
    return True


def check_hash() -> bool:
    ok = True
    for offset in (0, 2**31 - 100, 3 * 16384):
        for seed in (7, torch.tensor(123456789, device="cuda")):
            fn = torch.compile(lambda s, offset=offset: _position_hash(16384, s, torch.device("cuda"), offset),
                               fullgraph=True)
            got = fn(seed).cpu()
            want = _position_hash(16384, seed.cpu() if isinstance(seed, torch.Tensor) else seed, torch.device("cpu"),
                                  offset)
            same = torch.equal(got, want)
            ok &= same
            results["checks"].append({"name": "position_hash", "offset": offset, "tensor_seed": isinstance(seed, torch.Tensor),
                                      "passed": same})
    print("ok  " if ok else "FAIL", "position hash compiled on CUDA equals CPU", flush=True)
    return ok


def guarded(name, fn, *args) -> bool:
    try:
        return bool(fn(*args))
    except Exception as error:  # a check script reports every failure, then exits 1
        results["checks"].append({"name": name, "error": f"{type(error).__name__}: {error}"[:2000], "passed": False})
        print("FAIL", name, type(error).__name__, str(error)[:500], flush=True)
        return False
    finally:  # what a time limit cuts short is still on disk
        with open(results["out"], "w") as handle:
            json.dump(results, handle, indent=1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    import triton

    results.update({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "commit": source_commit(), "source_digest": source_digest(), "out": args.out})
    ok = True
    for capacity in (4096, 8192):
        guarded(f"timing_{capacity}", time_case, 8, 2048, capacity)
    ok &= guarded("position_hash", check_hash)
    for dtype in (torch.bfloat16, torch.float32):
        ok &= guarded("causal_topk", check_case, "causal_topk", 4, 2048, 2048, "topk", dtype)
        ok &= guarded("causal_padding_rows", check_case, "causal_padding_rows", 4, 2048, 2048, "padding_rows", dtype)
        ok &= guarded("padding_mask", check_case, "padding_mask", 3, 1000, 750, "padding_mask", dtype)
        ok &= guarded("additive_mask", check_case, "additive_mask", 3, 1000, 750, "additive_mask", dtype)
        ok &= guarded("causal_topk_eager", check_case, "causal_topk_eager", 4, 2048, 2048, "topk", dtype, False)
    results["passed"] = bool(ok)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
