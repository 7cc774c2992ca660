"""GPU check of the fused LM head at real sizes, against float64 (not collected by pytest).

Run on a CUDA machine::

    python benchmarks/check_fused_head_gpu.py --out check_fused_head.json

At 16384 tokens, hidden 2048, vocab 128256, bf16 (and a float32 case at 2048
tokens), with the Triton kernels compiled:

* ``fused_linear_token_stats`` against float64 statistics of the float64
  product of the same (bf16) inputs, on a row subset, next to the error of
  ``token_stats`` on eagerly materialised bf16 logits;
* ``fused_head_loss`` (top-k at ratios 1.0 and 0.25, priority sampling with
  weights) and ``fused_selective_loss`` (positions): loss, hidden and weight
  gradients against a float64 computation of the same loss over the same
  selection, next to the error of eager bf16 ``selective_loss`` + autograd;
  unselected rows' gradient exactly zero;
* no host sync (``torch.cuda.set_sync_debug_mode("error")``), a
  ``torch.compile(fullgraph=True)`` (Inductor) forward + backward equal to
  eager, and a CUDA-graph capture of forward + backward replayed on new data.

Writes every number to ``--out``; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cggr_fn  # noqa: E402
from cggr_fn._stats import token_stats_reference  # noqa: E402

failures: list[str] = []
report: dict = {"checks": {}, "failures": failures}


def check(name: str, fn) -> None:
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # noqa: BLE001 -- a check script reports every failure, then exits 1
        failures.append(f"{name}: {type(error).__name__}: {error}")
        report["checks"][name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        print(f"FAIL {name}: {error}", flush=True)
    else:
        report["checks"][name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2), **(result or {})}
        print(f"ok   {name} {json.dumps(result or {})}", flush=True)


def make(tokens, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=gen).to(dtype)
    # Logits with a standard deviation of about 3: peaked and flat rows both occur.
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * (3.0 / hidden_size**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    targets[:: 17] = -100
    return hidden, weight, targets


def truth_loss(hidden, weight, targets, mask, weights, normalize, chunk=2048):
    """The selective loss and its hidden/weight gradients in float64, over the selected rows."""
    h64, w64 = hidden.double(), weight.double()
    labelled = targets != -100
    trained = mask & labelled
    coef = torch.ones(targets.shape, dtype=torch.float64, device="cuda")
    if weights is not None:
        coef = torch.where(trained, weights.double(), 1.0)
    coef = coef / (trained if normalize == "selected" else labelled).sum().clamp_min(1)
    rows = trained.nonzero().squeeze(1)
    loss = torch.zeros((), dtype=torch.float64, device="cuda")
    d_hidden = torch.zeros_like(h64)
    d_weight = torch.zeros_like(w64)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        logits = h64[idx] @ w64.T
        lse = torch.logsumexp(logits, -1)
        t = targets[idx]
        loss += (coef[idx] * (lse - logits.gather(1, t[:, None]).squeeze(1))).sum()
        g = torch.exp(logits - lse[:, None])
        g[torch.arange(idx.numel(), device="cuda"), t] -= 1.0
        g *= coef[idx][:, None]
        d_hidden[idx] = g @ w64
        d_weight += g.T @ h64[idx]
        del logits, g
    return loss, d_hidden, d_weight


def errors(got, want):
    """Relative errors: |loss|, and for gradients max-abs over max-abs and normwise."""
    loss, dh, dw = got
    loss64, dh64, dw64 = want
    out = {"loss_rel": abs(float(loss) - float(loss64)) / max(abs(float(loss64)), 1e-30)}
    for name, g, w in (("d_hidden", dh, dh64), ("d_weight", dw, dw64)):
        diff = g.double() - w
        out[f"{name}_maxabs_rel"] = float(diff.abs().max() / w.abs().max().clamp_min(1e-300))
        out[f"{name}_norm_rel"] = float(diff.norm() / w.norm().clamp_min(1e-300))
    return out


def eager_loss(hidden, weight, targets, mask, weights, normalize):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = cggr_fn.selective_loss(h @ w.T, targets, mask, weights=weights, normalize=normalize)
    dh, dw = torch.autograd.grad(loss, (h, w))
    return loss.detach(), dh, dw


def fused(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w)
    loss = out.loss if isinstance(out, cggr_fn.HeadLoss) else out
    dh, dw = torch.autograd.grad(loss, (h, w))
    return out, (loss.detach(), dh, dw)


def compare(fn, hidden, weight, targets, normalize, *, tolerance_floor, weighted=False):
    """Ours and eager bf16 against float64 on the same selection; ours within max(3 x eager, floor)."""
    out, ours = fused(fn, hidden, weight)
    if isinstance(out, cggr_fn.HeadLoss):
        mask, weights = out.mask, (out.weights if weighted else None)
    else:
        mask, weights = fn.mask, None
    want = truth_loss(hidden, weight, targets, mask, weights, normalize)
    mine = errors(ours, want)
    result = {"ours": mine, "selected": int(mask.sum())}
    if hidden.dtype != torch.float32:
        eager = errors(eager_loss(hidden, weight, targets, mask, weights, normalize), want)
        result["eager_bf16"] = eager
        for key, value in mine.items():
            bound = max(3 * eager[key], tolerance_floor)
            if not value <= bound:
                raise AssertionError(f"{key}: ours {value:.3e} > max(3 x eager {eager[key]:.3e}, {tolerance_floor})")
    else:
        for key, value in mine.items():
            if not value <= tolerance_floor:
                raise AssertionError(f"{key}: ours {value:.3e} > {tolerance_floor}")
    unselected = ~(mask & (targets != -100))
    if not torch.equal(ours[1][unselected], torch.zeros_like(ours[1][unselected])):
        raise AssertionError("unselected rows have a nonzero hidden gradient")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="check_fused_head.json")
    args = parser.parse_args()
    report.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    import triton

    report["triton"] = triton.__version__
    tokens, hidden_size, vocab = 16384, 2048, 128256
    hidden, weight, targets = make(tokens, hidden_size, vocab, torch.bfloat16)

    def stats_check():
        rows = torch.arange(0, tokens, 16, device="cuda")  # 1024 rows spread over every chunk
        ours = cggr_fn.fused_linear_token_stats(hidden, weight, targets)
        truth = token_stats_reference(hidden[rows].double() @ weight.double().T, targets[rows], -100)
        eager = cggr_fn.token_stats(hidden[rows] @ weight.T, targets[rows])
        result = {}
        for name, o, t, e in zip(cggr_fn.TokenStats._fields, ours, truth, eager):
            o, e = o[rows].double(), e.double()
            finite = torch.isfinite(t)
            ours_err, eager_err = float((o - t)[finite].abs().max()), float((e - t)[finite].abs().max())
            result[name] = {"ours_maxabs": ours_err, "eager_bf16_maxabs": eager_err}
            if not ours_err <= 2 * eager_err + 1e-5:
                raise AssertionError(f"{name}: ours {ours_err:.3e} vs eager bf16 {eager_err:.3e}")
            if not torch.equal(torch.isnan(o), torch.isnan(t)):
                raise AssertionError(f"{name}: NaN positions differ")
        return result

    check("stats bf16 16384x2048x128256", stats_check)

    for ratio in (1.0, 0.25):
        check(f"fused_head_loss topk ratio={ratio} bf16", lambda r=ratio: compare(
            lambda h, w: cggr_fn.fused_head_loss(h, w, targets, ratio=r, method="grad_norm"),
            hidden, weight, targets, "selected", tolerance_floor=4e-3))
    check("fused_head_loss priority ratio=0.25 valid bf16", lambda: compare(
        lambda h, w: cggr_fn.fused_head_loss(h, w, targets, ratio=0.25, method="grad_norm",
                                                          strategy="priority", normalize="valid", seed=5),
        hidden, weight, targets, "valid", tolerance_floor=4e-3, weighted=True))

    def positions_check():
        positions = torch.randperm(tokens, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))[:3000]
        mask = torch.zeros(tokens, dtype=torch.bool, device="cuda")
        mask[positions] = True

        def fn(h, w):
            return cggr_fn.fused_selective_loss(h, w, targets, positions)

        fn.mask = mask
        return compare(fn, hidden, weight, targets, "selected", tolerance_floor=4e-3)

    check("fused_selective_loss positions bf16", positions_check)

    h32, w32, t32 = make(2048, hidden_size, vocab, torch.float32, seed=2)
    check("fused_head_loss topk ratio=0.5 fp32", lambda: compare(
        lambda h, w: cggr_fn.fused_head_loss(h, w, t32, ratio=0.5, method="grad_norm"),
        h32, w32, t32, "selected", tolerance_floor=1e-5))
    del h32, w32, t32

    def step(h, w, t):
        out = cggr_fn.fused_head_loss(h, w, t, ratio=0.25, method="grad_norm")
        dh, dw = torch.autograd.grad(out.loss, (h, w))
        return out.loss, dh, dw, out.mask

    def no_sync():
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(h, w, targets)
            for ratio, strategy in ((1.0, "topk"), (0.25, "priority"), (0.1, "stratified")):
                out = cggr_fn.fused_head_loss(h, w, targets, ratio=ratio, strategy=strategy, method="grad_norm")
                out.loss.backward()
            mask = out.mask
            cggr_fn.fused_selective_loss(h, w, targets, mask, capacity=cggr_fn.capacity(tokens, ratio=0.1)).backward()
            cggr_fn.fused_selective_loss(h, w, targets, torch.arange(100, device="cuda")).backward()
            cggr_fn.fused_linear_token_stats(h, w, targets)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    check("no host sync (fused_head_loss, fused_selective_loss, fused_linear_token_stats)", no_sync)

    def forward(h, w, t):
        out = cggr_fn.fused_head_loss(h, w, t, ratio=0.25, method="grad_norm")
        return out.loss, out.mask

    def compiled():
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        want = step(h, w, targets)
        loss, mask = torch.compile(forward, fullgraph=True)(h, w, targets)
        got = (loss, *torch.autograd.grad(loss, (h, w)), mask)
        if not torch.equal(got[3], want[3]):
            raise AssertionError("compiled selection differs from eager")
        result = {}
        for name, g, e in zip(("loss", "d_hidden", "d_weight"), got[:3], want[:3]):
            rel = float((g.double() - e.double()).norm() / e.double().norm())
            result[f"{name}_norm_rel_vs_eager"] = rel
            if not rel <= 1e-3:
                raise AssertionError(f"{name}: compiled differs from eager by {rel:.2e}")
        return result

    check("torch.compile(fullgraph=True) forward + backward", compiled)

    def cuda_graph():
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        static_t = targets.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(h, w, static_t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step(h, w, static_t)
        new_h, new_w, new_t = make(tokens, hidden_size, vocab, torch.bfloat16, seed=9)
        with torch.no_grad():
            h.copy_(new_h)
            w.copy_(new_w)
        static_t.copy_(new_t)
        graph.replay()
        torch.cuda.synchronize()
        want = step(new_h.requires_grad_(), new_w.requires_grad_(), new_t)
        if not torch.equal(outputs[3], want[3]):
            raise AssertionError("replayed selection differs from eager")
        result = {}
        for name, g, e in zip(("loss", "d_hidden", "d_weight"), outputs[:3], want[:3]):
            rel = float((g.double() - e.double()).norm() / e.double().norm())
            result[f"{name}_norm_rel_vs_eager"] = rel
            if not rel <= 1e-5:
                raise AssertionError(f"{name}: replay differs from eager by {rel:.2e}")
        return result

    check("CUDA graph capture + replay on new data", cuda_graph)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(report['checks']) - len(failures)} passed, {len(failures)} failed; wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
