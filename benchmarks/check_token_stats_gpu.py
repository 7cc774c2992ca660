"""GPU correctness check of the fused token-statistics kernel at real sizes.

Run on a CUDA machine (not collected by pytest)::

    python benchmarks/check_token_stats_gpu.py --out report.json

Compares the kernel with a float64 evaluation of the reference formula (max
absolute error of entropy, logsumexp, nll, confidence, margin, grad_norm; the
grad_norm of confident tokens, 1 - p_t down to 1e-7, included; the margin must
be exactly 0 exactly where the two largest logits tie) and with the float32
PyTorch reference, for every input dtype, at real vocabulary sizes, on odd
vocabularies, strided rows, ties, ignored and out-of-range targets, non-finite
rows and a logits tensor of more than 2**31 elements; then runs the op under
``torch.compile(fullgraph=True)`` (Inductor), ``vmap``, ``func.grad``, CUDA
graph capture and ``opcheck``. ``--tiny`` runs small shapes (on CPU under
``TRITON_INTERPRET=1`` when there is no GPU) to smoke-test the script itself.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cggr_fn._stats import token_stats_reference  # noqa: E402
from cggr_fn.kernels import fused_token_stats, token_stats_op  # noqa: E402
from cggr_fn.kernels import token_stats as kernel  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("entropy", "confidence", "margin", "logsumexp", "nll", "grad_norm")
# Max abs error vs float64 allowed for fp32 arithmetic on rows of up to 262144
# entries (entropy and lse are O(10); sums of 2**18 terms in fp32).
# grad_norm's error is the nll's (|d grad_norm / d nll| <= 1).
TOL = {"entropy": 1e-4, "confidence": 2e-5, "margin": 2e-5, "logsumexp": 1e-4, "nll": 1e-4, "grad_norm": 1e-4}
# What TokenStats promises about kernel vs float32 reference: |diff| <= 4e-6,
# plus 5e-7 * |logsumexp| for logsumexp, nll and grad_norm.
DOCUMENTED_ATOL, DOCUMENTED_RTOL_LSE = 4e-6, 5e-7

results: dict = {"cases": [], "failures": []}


def ref64(logits, targets, ignore_index, chunk_elems=1 << 28):
    """The reference formula in float64, over row chunks to bound memory.

    Also returns whether the two largest logits tie (exactly, in the input
    dtype), for the exact-zero margin check. grad_norm is
    ``sqrt((1 - p_t)**2 + sum_{j != t} p_j**2)`` in float64, the target left
    out of the sum so that confident tokens keep float64's digits.
    """
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    t = None if targets is None else targets.reshape(-1)
    step = max(1, chunk_elems // vocab)
    outs = [[] for _ in range(7)]
    for i in range(0, rows.shape[0], step):
        x = rows[i : i + step].double()
        top2 = x.topk(2, dim=-1).values
        row_max = x.amax(dim=-1)
        shifted = x - row_max[:, None]
        e = shifted.exp()
        total = e.sum(-1)
        weighted = torch.where(torch.isneginf(shifted), 0.0, e * shifted).sum(-1)
        entropy = total.log() - weighted / total
        lse = row_max + total.log()
        margin = (1.0 - (top2[:, 1] - row_max).exp()) / total
        if t is None:
            nll = torch.full_like(entropy, math.nan)
            grad_norm = torch.full_like(entropy, math.nan)
        else:
            tt = t[i : i + step]
            in_range = (tt >= 0) & (tt < vocab)
            safe = torch.where(in_range, tt, 0).long()[:, None]
            xt = x.gather(-1, safe)[:, 0]
            nll = torch.where(in_range, lse - xt, math.nan)
            labelled = tt != ignore_index
            others = e.scatter(-1, safe, 0.0).square().sum(-1) / total.square()
            grad_norm = torch.where(labelled, (torch.expm1(-nll).square() + others).sqrt(), 0.0)
            nll = torch.where(labelled, nll, 0.0)
        for k, v in enumerate((entropy, 1.0 / total, margin, lse, nll, grad_norm, top2[:, 0] == top2[:, 1])):
            outs[k].append(v)
    shape = logits.shape[:-1]
    return tuple(torch.cat(o).reshape(shape) for o in outs)


def compare(name, logits, targets, ignore_index=-100, got=None, row_index=None):
    """Check one case against float64 and the fp32 reference; record errors."""
    t0 = time.perf_counter()
    if got is None:
        got = fused_token_stats(logits, targets, ignore_index)
    if row_index is not None:
        # Huge tensors: check selected rows only (the kernel still ran on all).
        got = tuple(g.reshape(-1)[row_index] for g in got)
        logits = logits.reshape(-1, logits.shape[-1])[row_index]
        targets = None if targets is None else targets.reshape(-1)[row_index]
    want = ref64(logits, targets, ignore_index)
    want32 = token_stats_reference(logits, targets, ignore_index)
    case = {"name": name, "shape": list(logits.shape), "dtype": str(logits.dtype), "max_abs_err_vs_f64": {},
            "max_abs_diff_vs_fp32_reference": {}}
    ok = True
    for k, stat in enumerate(NAMES):
        g, w, w32 = got[k].double(), want[k], want32[k].double()
        if not torch.equal(torch.isnan(g), torch.isnan(w)):
            ok = False
            case.setdefault("nan_mismatch", []).append(stat)
        if not torch.equal(torch.isnan(g), torch.isnan(w32)):
            ok = False
            case.setdefault("nan_mismatch_fp32_reference", []).append(stat)
        finite = torch.isfinite(w) & torch.isfinite(g)
        if not torch.equal(g[~finite & ~torch.isnan(w)], w[~finite & ~torch.isnan(w)]):
            ok = False
            case.setdefault("inf_mismatch", []).append(stat)
        err = (g - w)[finite].abs().max().item() if finite.any() else 0.0
        err32 = (g - w32)[finite].abs().max().item() if finite.any() else 0.0
        case["max_abs_err_vs_f64"][stat] = err
        case["max_abs_diff_vs_fp32_reference"][stat] = err32
        if err > TOL[stat]:
            ok = False
        # The kernel-vs-reference agreement that cggr_fn.TokenStats documents.
        bound = DOCUMENTED_ATOL + (DOCUMENTED_RTOL_LSE * want32[3].double().abs().nan_to_num(0.0) if stat in ("logsumexp", "nll", "grad_norm") else 0.0)
        if finite.any() and not bool(((g - w32).abs() <= bound)[finite].all()):
            ok = False
            case.setdefault("outside_documented_tolerance", []).append(stat)
    ties = want[6]
    valid = ~torch.isnan(want[2])
    margin_zero = got[2] == 0
    case["ties"] = int((ties & valid).sum())
    if not torch.equal(margin_zero[valid], ties[valid]):
        ok = False
        case["tie_mismatch"] = int((margin_zero[valid] != ties[valid]).sum())
    case["ok"] = ok
    case["seconds"] = round(time.perf_counter() - t0, 3)
    results["cases"].append(case)
    if not ok:
        results["failures"].append(name)
    print(("ok  " if ok else "FAIL"), name, {k: f"{v:.2e}" for k, v in case["max_abs_err_vs_f64"].items()},
          "ties", case["ties"], flush=True)
    return ok


def check(name, cond, detail=""):
    results["cases"].append({"name": name, "ok": bool(cond), "detail": detail})
    if not cond:
        results["failures"].append(name)
    print(("ok  " if cond else "FAIL"), name, detail, flush=True)


def make(rows, vocab, dtype, scale=4.0, gen=None):
    x = torch.randn(rows, vocab, device=DEV, dtype=torch.float32, generator=gen) * scale
    return x.to(dtype)


def confident(rows, vocab, dtype, gen=None):
    """Rows whose target (the argmax) holds all but 1 - p_t in {1e-2, ..., 1e-7} of the mass."""
    x = make(rows, vocab, torch.float32, gen=gen)
    t = torch.randint(0, vocab, (rows,), device=DEV, generator=gen)
    x.scatter_(-1, t[:, None], -math.inf)
    one_minus_p = 10.0 ** -torch.arange(2, 8, device=DEV).repeat(rows // 6 + 1)[:rows]
    x += (one_minus_p.log() - torch.logsumexp(x, -1))[:, None]
    x.scatter_(-1, t[:, None], 0.0)
    return x.to(dtype), t


def targets_for(rows, vocab, gen=None):
    t = torch.randint(0, vocab, (rows,), device=DEV, generator=gen)
    t[::7] = -100
    t[3::11] = vocab  # out of range: NaN
    t[5::13] = -5
    return t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON report path (default: $OUT/check_token_stats.json)")
    parser.add_argument("--tiny", action="store_true", help="small shapes, to smoke-test the script")
    parser.add_argument("--skip-huge", action="store_true", help="skip the > 2**31-element case")
    args = parser.parse_args()
    out = args.out or (os.path.join(os.environ["OUT"], "check_token_stats.json") if "OUT" in os.environ else None)
    tiny = args.tiny
    gen = torch.Generator(device=DEV).manual_seed(0)
    results["device"] = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    results["torch"] = torch.__version__
    import triton

    results["triton"] = triton.__version__
    start = time.perf_counter()

    # 1. Real sizes, every dtype, against float64.
    sizes = [(64, 32000), (16, 50257), (8, 128256), (4, 151936), (4, 262144)] if not tiny else [(8, 300), (4, 1001)]
    if not tiny:
        sizes = [(4096, 32000), (2048, 50257), (1024, 128256), (1024, 151936), (512, 262144)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, vocab in sizes:
            x = make(rows, vocab, dtype, gen=gen)
            compare(f"random {dtype} {rows}x{vocab}", x, targets_for(rows, vocab, gen))
        rows, vocab = sizes[0]
        # A peaked distribution (large logit scale) and a large common offset.
        compare(f"peaked {dtype}", make(rows, vocab, dtype, scale=20.0, gen=gen), targets_for(rows, vocab, gen))
        compare(f"offset {dtype}", (make(rows, vocab, torch.float32, scale=2.0, gen=gen) + 100.0).to(dtype), None)
        compare(f"vocab 2 {dtype}", make(4 * rows, 2, dtype, gen=gen), targets_for(4 * rows, 2, gen))
        compare(f"vocab 3 {dtype}", make(4 * rows, 3, dtype, gen=gen), targets_for(4 * rows, 3, gen))
        # grad_norm of confident tokens: no cancellation against p_t ~ 1.
        for vocab in (32000, 128256) if not tiny else (300,):
            compare(f"confident targets {dtype} vocab {vocab}", *confident(min(rows, 1024), vocab, dtype, gen=gen))

    # 1b. Large-magnitude peaked rows stay inside the documented ranges: the
    # maximum's own exponent must be exactly 0 (no FMA residual).
    for dtype, big in ((torch.float16, 60000.0), (torch.bfloat16, 3.0e38), (torch.float32, 1.0e30), (torch.float32, 1000.0)):
        rows, vocab = (64, 32000) if not tiny else (4, 300)
        x = torch.full((rows, vocab), -big, device=DEV)
        x[torch.arange(rows), torch.arange(rows) * 7 % vocab] = big
        x[1::2] = x[1::2] * 1e-3
        stats = fused_token_stats(x.to(dtype), None, -100)
        check(f"large magnitude {dtype} {big:g}: confidence <= 1", bool((stats[1] <= 1).all()), str(stats[1].max().item()))
        check(f"large magnitude {dtype} {big:g}: entropy >= 0", bool((stats[0] >= 0).all()), str(stats[0].min().item()))

    # 2. Every launch configuration the benchmark sweeps computes the same function.
    import bench_token_stats as bench

    for dtype in (torch.bfloat16, torch.float32):
        for vocab in ((50257, 32000) if not tiny else (301,)):
            x = make(64 if not tiny else 4, vocab, dtype, gen=gen)
            t = targets_for(x.shape[0], vocab, gen)
            configs = bench.sweep_configs(dtype) if not tiny else [kernel.LaunchConfig(1, 2, 4, 4), kernel.LaunchConfig(1, 2, 4, 8, True)]
            for config in configs:
                outs = tuple(torch.full((x.shape[0],), -7.0, device=DEV) for _ in range(6))
                kernel.launch(x, t, -100, outs, config)
                compare(f"config {tuple(config)} {dtype} vocab {vocab}", x, t, got=outs)

    # 3. Ties: both maxima in one block, in different blocks, many ties (bf16).
    for dtype in (torch.bfloat16, torch.float32):
        rows, vocab = (256, 128256) if not tiny else (8, 200)
        step = kernel.choose_config(vocab, dtype).block  # same slot, next block
        x = make(rows, vocab, torch.float32, scale=1.0, gen=gen)
        x[0::4, 10] = x[0::4, 20] = 9.0  # one block
        x[1::4, 10] = x[1::4, vocab - 3] = 9.0  # first and last block
        x[2::4, 10] = x[2::4, 10 + step] = 9.0  # same lane, different block
        x[3::4, 5] = 9.0
        x[3::4, 5 + step] = 8.5
        compare(f"ties {dtype}", x.to(dtype), targets_for(rows, vocab, gen))
    x = make(1024 if not tiny else 8, 32000 if not tiny else 100, torch.float32, scale=0.05, gen=gen).bfloat16()
    compare("bf16 small scale (massive ties)", x, None)

    # 4. Strided rows read in place.
    big = make(2048 if not tiny else 8, 52000 if not tiny else 400, torch.bfloat16, gen=gen)
    view = big[:, 7 : 7 + (50257 if not tiny else 301)]
    compare("strided rows (odd vocab, odd offset)", view, targets_for(view.shape[0], view.shape[1], gen))
    base = make(4 * 512 if not tiny else 8, 32768 if not tiny else 256, torch.bfloat16, gen=gen).view(4, -1, 32768 if not tiny else 256)
    view3 = base[..., : (32000 if not tiny else 200)]
    compare("(B, T, V) slice", view3, None)
    shifted = base[:, :-1]  # a causal LM's shifted logits: (batch, seq) strides that do not collapse
    compare("(B, T-1, V) shifted view, in place", shifted, targets_for(shifted.shape[0] * shifted.shape[1], shifted.shape[2], gen).view(shifted.shape[:2]))
    compare("transposed (copies)", big[:64, :4096].t() if not tiny else big[:, :16].t(), None)

    # 5. Non-finite rows.
    rows, vocab = (64, 128256) if not tiny else (12, 300)
    x = make(rows, vocab, torch.float32, gen=gen)
    x[0, vocab - 1] = math.nan
    x[1, 5] = math.inf
    x[2] = -math.inf
    x[3, : vocab - 1] = -math.inf
    x[4, ::2] = -math.inf
    x[5, : vocab // 2] = -math.inf
    x[6, 0] = math.inf
    x[6, 1] = math.nan
    x[7] = math.nan
    x[8, 100:] = -math.inf
    x[8, :100] -= 300.0
    t = targets_for(rows, vocab, gen)
    t[4] = 1  # a -inf class: nll = inf
    t[1] = -100
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        compare(f"non-finite rows {dtype}", x.to(dtype), t)

    # 6. More than 2**31 elements: int64 offsets. Check the rows around the
    # 2**31 boundary and the last rows against float64.
    if not tiny and not args.skip_huge:
        for dtype, vocab in ((torch.bfloat16, 131072), (torch.float32, 262144)):
            rows = (1 << 31) // vocab + 64
            x = torch.empty(rows, vocab, device=DEV, dtype=dtype)
            x.normal_(generator=gen).mul_(4.0)
            t = torch.randint(0, vocab, (rows,), device=DEV, generator=gen)
            t[-1] = vocab - 1
            t[-2] = -100
            got = fused_token_stats(x, t, -100)
            edge = (1 << 31) // vocab
            idx = torch.cat([torch.arange(0, 32), torch.arange(edge - 32, rows)]).to(DEV)
            compare(f"> 2**31 elements {dtype} {rows}x{vocab} ({rows * vocab} elements)", x, t, got=got, row_index=idx)
            del x, got
            torch.cuda.empty_cache()

    # 7. Transforms and graph capture on the device.
    rows, vocab = (512, 32000) if not tiny else (4, 40)
    x = make(rows, vocab, torch.bfloat16, gen=gen)
    t = targets_for(rows, vocab, gen)
    eager = fused_token_stats(x, t, -100)

    def score(logits, targets):
        return fused_token_stats(logits, targets, -100)

    if not tiny:
        compiled = torch.compile(score, fullgraph=True)
        diffs = [torch.nan_to_num(a - b).abs().max().item() for a, b in zip(compiled(x, t), eager)]
        check("torch.compile(fullgraph=True) inductor", max(diffs) == 0.0, str(diffs))
    batched = torch.func.vmap(score)(x.view(4, -1, vocab), t.view(4, -1))
    diffs = [torch.nan_to_num(a.reshape(-1) - b).abs().max().item() for a, b in zip(batched, eager)]
    check("vmap", max(diffs) == 0.0, str(diffs))
    w = torch.randn(vocab, device=DEV)

    def loss(w):
        z = x.float() * w
        return (fused_token_stats(z, None, -100)[0] * z.sum(-1)).sum()

    def loss_ref(w):
        z = x.float() * w
        return (token_stats_reference(z, None, -100)[0] * z.sum(-1)).sum()

    g, g_ref = torch.func.grad(loss)(w), torch.func.grad(loss_ref)(w)
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    check("func.grad (stats constant)", rel < 1e-4, f"rel err {rel:.2e}")
    if DEV == "cuda":
        static_x, static_t = x.clone(), t.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fused_token_stats(static_x, static_t, -100)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused_token_stats(static_x, static_t, -100)
        fresh = make(rows, vocab, torch.bfloat16, gen=gen)
        static_x.copy_(fresh)
        graph.replay()
        want = fused_token_stats(fresh, static_t, -100)
        diffs = [torch.nan_to_num(a - b).abs().max().item() for a, b in zip(captured, want)]
        check("CUDA graph capture + replay on new data", max(diffs) == 0.0, str(diffs))
    small = make(4, 1000, torch.bfloat16, gen=gen)
    torch.library.opcheck(token_stats_op, (small, targets_for(4, 1000, gen).clamp(min=0) % 1000, -100))
    check("opcheck", True)

    # 8. The public function routes CUDA tensors here and matches the CPU path.
    import cggr_fn

    if DEV == "cuda":
        x = make(256, 50257, torch.bfloat16, gen=gen)
        t = targets_for(256, 50257, gen)
        gpu = cggr_fn.token_stats(x, t)
        cpu = cggr_fn.token_stats(x.cpu(), t.cpu())
        diffs = [torch.nan_to_num(a.cpu() - b).abs().max().item() for a, b in zip(gpu, cpu)]
        check("cggr_fn.token_stats CUDA (kernel) vs CPU (reference)", max(diffs) < 2e-4, str(diffs))

        # 9. Each path is deterministic run to run.
        again = cggr_fn.token_stats(x, t)
        check("kernel deterministic run to run", all(torch.equal(a, b) for a, b in zip(gpu[:4], again[:4])))

        # 10. The same scores select and bucket the same tokens on CUDA and CPU
        # (ties, signed zeros, NaN, -inf; large enough for CUDA's radix sort).
        scores = cggr_fn.score(x, t)
        scores = torch.cat([scores, (torch.randn(200000, device=DEV, generator=gen) * 4).round()])  # many ties
        scores[:8] = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, math.nan, 0.0, -0.0], device=DEV)
        for shape in ((-1,), (8, -1)):
            s2 = scores[: scores.numel() // 8 * 8].reshape(shape)
            for options in ({"strategy": "topk"}, {"strategy": "stratified", "seed": 3}, {"strategy": "sequence_aware"}):
                same = torch.equal(cggr_fn.select(s2, ratio=0.3, **options).cpu(), cggr_fn.select(s2.cpu(), ratio=0.3, **options))
                check(f"select {options['strategy']} {tuple(s2.shape)}: CUDA == CPU on the same scores", same)
            for step in (0, 500, 1000):
                same = torch.equal(cggr_fn.bucket(s2, step).cpu(), cggr_fn.bucket(s2.cpu(), step))
                check(f"bucket step {step} {tuple(s2.shape)}: CUDA == CPU on the same scores", same)

        # 11. float64 logits on CUDA take the float64 reference: float64 results
        # equal to the CPU's up to float64 rounding, never float32's.
        x64 = (make(64, 1000, torch.float32, gen=gen).double() + 1e8)
        t64 = targets_for(64, 1000, gen)
        gpu64, cpu64 = cggr_fn.token_stats(x64, t64), cggr_fn.token_stats(x64.cpu(), t64.cpu())
        diffs = [torch.nan_to_num(a.cpu() - b).abs().max().item() for a, b in zip(gpu64, cpu64)]
        check("float64 on CUDA: float64 results equal to the CPU reference",
              all(a.dtype == torch.float64 for a in gpu64) and max(diffs) < 1e-6, str(diffs))
        score64 = cggr_fn.score(x64, t64, method="loss")
        check("float64 score on CUDA is float64", score64.dtype == torch.float64)
        mask64 = torch.rand(64, device=DEV, generator=gen) > 0.5
        loss_gpu = cggr_fn.selective_loss(x64, t64.clamp(0, 999), mask64)
        loss_cpu = cggr_fn.selective_loss(x64.cpu(), t64.clamp(0, 999).cpu(), mask64.cpu())
        check("float64 selective_loss on CUDA equals CPU", loss_gpu.dtype == torch.float64
              and abs(loss_gpu.item() - loss_cpu.item()) < 1e-9, f"{loss_gpu.item()} vs {loss_cpu.item()}")

    results["seconds"] = round(time.perf_counter() - start, 1)
    results["ok"] = not results["failures"]
    # Worst error per dtype over the random/real-size cases, for the report.
    worst: dict = {}
    for case in results["cases"]:
        if "max_abs_err_vs_f64" in case:
            d = worst.setdefault(case["dtype"], {})
            for k, v in case["max_abs_err_vs_f64"].items():
                d[k] = max(d.get(k, 0.0), v)
    results["worst_abs_err_vs_f64_by_dtype"] = worst
    print(json.dumps({"ok": results["ok"], "failures": results["failures"], "worst": worst}, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
