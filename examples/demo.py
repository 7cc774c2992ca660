"""Train a tiny byte-level GPT on poetry: dense vs CGGR vs the random control, side by side.

    python examples/demo.py                         # about 2-3 minutes on 2 CPU cores (a GPU picks a larger run)
    python examples/demo.py --seeds 0,1,2           # mean and standard error over seeds
    python examples/demo.py --rule hardest          # the seed's recipe instead
    python examples/demo.py --help                  # every option

Every mode starts from the same initial parameters and sees the same batches
in the same order for the same number of steps:

* ``dense``: every token trains every layer.
* ``cggr`` with the default rule, ``excess``: a small *reference* model
  (``--reference-layers`` blocks, trained first on other batches for
  ``--reference-steps`` steps; its time is counted in ``cggr``'s) scores every
  token by its loss; each step, a no-grad forward gives the model's own loss,
  and the ``--ratio`` share of tokens with the largest *excess loss*
  (``cggr_fn.excess``: model loss minus reference loss, the rule of Rho-1 and
  RHO-LOSS) is ``cggr_fn.select``-ed; only they train (``selective_loss``).
  Tokens both models find hard (noise) are skipped; tokens the reference
  shows to be learnable, and the model has not learnt yet, are kept.
* ``cggr`` with ``--rule hardest``: the seed's recipe -- ``--score`` difficulty,
  ``cggr_fn.bucket_depth`` depth buckets under a curriculum, the loss on the
  hardest ``--ratio`` of the tokens.
* ``random``: the control. The same step as ``cggr`` with difficulty-blind
  scores, so it trains exactly as many (token, layer) gradient paths and loss
  tokens. A rule helps only if ``cggr`` beats ``random``.

The table reports the held-out validation loss (mean and standard error over
``--seeds``), the train loss, wall-clock, throughput and the share of backward
FLOPs the routing leaves out (by the FLOP model: what compacted execution
saves; this demo masks gradients, which is exact but saves nothing on its
own). A PNG plot of the loss curves is written to ``--plot``.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Run as a script, python puts examples/ on sys.path; imported (e.g. by tests), it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cggr_fn  # noqa: E402
import poetry_data  # noqa: E402
import tiny_gpt  # noqa: E402
from tiny_gpt import Params  # noqa: E402

MODES = ("dense", "cggr", "random")
RULES = ("excess", "hardest")


class AdamState(NamedTuple):
    """First and second moment estimates of AdamW, one tensor per parameter."""

    mu: Params
    nu: Params


class StepMetrics(NamedTuple):
    """What one training step reports, as 0-d tensors (read on the host only when logging)."""

    loss: torch.Tensor  # mean cross-entropy over *all* tokens, at the parameters before the update
    grad_paths: torch.Tensor  # fraction of (token, layer) hidden states that carried gradient
    loss_tokens: torch.Tensor  # fraction of tokens in the training loss


class RunResult(NamedTuple):
    """One mode's outcome, as plain Python numbers."""

    mode: str
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_second: float
    grad_paths: float
    loss_tokens: float
    losses: list[float]
    seed: int = 0

    @property
    def val_perplexity(self) -> float:
        return math.exp(self.val_loss)


def learning_rate(step: torch.Tensor, *, peak: float, warmup: int, total: int) -> torch.Tensor:
    """Linear warmup to ``peak``, then cosine decay to ``peak / 10``; a pure function of the step."""
    step = step.float()
    warm = peak * (step + 1) / warmup
    progress = ((step - warmup) / max(1, total - warmup)).clamp(0.0, 1.0)
    decayed = peak * (0.1 + 0.9 * 0.5 * (1.0 + torch.cos(math.pi * progress)))
    return torch.where(step < warmup, warm, decayed)


def adamw_init(params: Params) -> AdamState:
    return AdamState({k: torch.zeros_like(v) for k, v in params.items()}, {k: torch.zeros_like(v) for k, v in params.items()})


def adamw_update(
    params: Params, grads: Params, state: AdamState, step: torch.Tensor, lr: torch.Tensor,
    *, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
) -> tuple[Params, AdamState]:  # fmt: skip
    """One AdamW step returning new parameters and state; decay only on matrices, as usual for GPTs."""
    b1, b2 = betas
    t = step.float() + 1.0
    mu = {k: b1 * state.mu[k] + (1 - b1) * g for k, g in grads.items()}
    nu = {k: b2 * state.nu[k] + (1 - b2) * g * g for k, g in grads.items()}
    new = {}
    for k, p in params.items():
        update = (mu[k] / (1 - b1**t)) / ((nu[k] / (1 - b2**t)).sqrt() + eps)
        decay = weight_decay * p if p.dim() >= 2 else 0.0
        new[k] = p - lr * (update + decay)
    return new, AdamState(mu, nu)


def dense_loss(params: Params, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = tiny_gpt.forward(params, tokens)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def routed_loss(params: Params, tokens: torch.Tensor, targets: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = tiny_gpt.forward(params, tokens, depth=depth)
    return cggr_fn.selective_loss(logits, targets, mask)


StepFn = Callable[[Params, AdamState, torch.Tensor, torch.Tensor, torch.Tensor], tuple[Params, AdamState, StepMetrics]]
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, tokens, targets, step)


def make_dense_step(lr_fn: Callable[[torch.Tensor], torch.Tensor]) -> StepFn:
    """Standard training: every token trains every layer."""
    loss_and_grad = torch.func.grad_and_value(dense_loss)

    def step_fn(params: Params, opt: AdamState, step: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[Params, AdamState, StepMetrics]:
        grads, loss = loss_and_grad(params, tokens, targets)
        params, opt = adamw_update(params, grads, opt, step, lr_fn(step))
        one = torch.ones((), device=loss.device)
        return params, opt, StepMetrics(loss.detach(), one, one)

    return step_fn


def make_selective_step(lr_fn: Callable[[torch.Tensor], torch.Tensor], scorer: Scorer, *, num_layers: int, ratio: float) -> StepFn:
    """Token selection: score, keep the top ``ratio`` of the tokens, train every layer on those only."""
    loss_and_grad = torch.func.grad(routed_loss)

    def step_fn(params: Params, opt: AdamState, step: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[Params, AdamState, StepMetrics]:
        with torch.no_grad():
            logits = tiny_gpt.forward(params, tokens)
        mask = cggr_fn.select(scorer(logits, tokens, targets, step), ratio=ratio)
        depth = torch.where(mask, num_layers, 0)
        grads = loss_and_grad(params, tokens, targets, depth, mask)
        params, opt = adamw_update(params, grads, opt, step, lr_fn(step))
        # The scoring pass already holds the pre-update logits: its mean nll is the
        # same all-token loss the dense step reports, so the two columns compare.
        loss = cggr_fn.token_stats(logits, targets).nll.mean()
        share = mask.float().mean()
        return params, opt, StepMetrics(loss, share, share)

    return step_fn


def make_bucketed_step(
    lr_fn: Callable[[torch.Tensor], torch.Tensor], scorer: Scorer,
    *, num_layers: int, num_buckets: int, curriculum_steps: int, final_ratio: float,
) -> StepFn:  # fmt: skip
    """The seed's recipe: score, bucket by the explicit step, route by depth, train the hardest tokens."""
    loss_and_grad = torch.func.grad(routed_loss)

    def step_fn(params: Params, opt: AdamState, step: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[Params, AdamState, StepMetrics]:
        with torch.no_grad():
            logits = tiny_gpt.forward(params, tokens)
        scores = scorer(logits, tokens, targets, step)
        depth = cggr_fn.bucket_depth(scores, step, num_layers=num_layers, num_buckets=num_buckets, warmup_steps=curriculum_steps)
        ratio = cggr_fn.ratio_schedule(step, warmup_steps=curriculum_steps, final_ratio=final_ratio)
        mask = cggr_fn.select(scores, ratio=ratio)
        grads = loss_and_grad(params, tokens, targets, depth, mask)
        params, opt = adamw_update(params, grads, opt, step, lr_fn(step))
        loss = cggr_fn.token_stats(logits, targets).nll.mean()
        return params, opt, StepMetrics(loss, depth.float().mean() / num_layers, mask.float().mean())

    return step_fn


def excess_scorer(reference: Params) -> Scorer:
    """The model's loss minus a reference model's loss on the same tokens (``cggr_fn.excess``)."""

    def scorer(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference_nll = cggr_fn.score(tiny_gpt.forward(reference, tokens), targets, method="loss")
        return cggr_fn.excess(cggr_fn.score(logits, targets, method="loss"), reference_nll)

    return scorer


def difficulty_scorer(method: str) -> Scorer:
    def scorer(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return cggr_fn.score(logits, targets, method=method)

    return scorer


def random_scorer(seed: int) -> Scorer:
    """Difficulty-blind baseline: uniform scores from a hash of (seed, step, position), no generator state."""

    def scorer(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        mask32 = 0xFFFFFFFF
        positions = torch.arange(targets.numel(), device=targets.device).reshape(targets.shape)
        h = (positions * 0x9E3779B1 + (step.to(targets.device) + seed * 7919) * 0x85EBCA6B) & mask32
        for multiplier in (0x2C1B3C6D, 0x297A2D39):
            h = ((h ^ (h >> 16)) * multiplier) & mask32
        return (h ^ (h >> 16)).float() / 2**32

    return scorer


@torch.no_grad()
def evaluate(params: Params, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Mean next-byte cross-entropy over fixed windows."""
    total = torch.zeros((), device=tokens.device)
    for i in range(0, len(tokens), batch_size):
        logits = tiny_gpt.forward(params, tokens[i : i + batch_size])
        total += F.cross_entropy(logits.flatten(0, 1), targets[i : i + batch_size].flatten(), reduction="sum")
    return total.item() / targets.numel()


def train(mode: str, step_fn: StepFn, params: Params, data: torch.Tensor, starts: torch.Tensor, seq_len: int, *, quiet: bool) -> tuple[Params, RunResult]:
    """Run ``step_fn`` over the pre-drawn batches; all host reads happen here, outside the step."""
    opt = adamw_init(params)
    metrics: list[StepMetrics] = []
    bar = tqdm(range(len(starts)), desc=f"{mode:>9}", unit="step", disable=quiet, leave=True, dynamic_ncols=True)
    begin = time.perf_counter()
    for i in bar:
        tokens, targets = poetry_data.get_batch(data, starts[i], seq_len)
        step = torch.tensor(i, device=data.device)
        params, opt, m = step_fn(params, opt, step, tokens, targets)
        metrics.append(m)
        if i % 10 == 0 or i == len(starts) - 1:
            bar.set_postfix(loss=f"{m.loss.item():.3f}", paths=f"{m.grad_paths.item():.0%}")
    losses = torch.stack([m.loss for m in metrics]).tolist()  # one sync for the whole run
    seconds = time.perf_counter() - begin
    tail = max(1, len(losses) // 10)
    result = RunResult(
        mode=mode,
        train_loss=sum(losses[-tail:]) / tail,
        val_loss=float("nan"),
        seconds=seconds,
        tokens_per_second=starts.numel() * seq_len / seconds,
        grad_paths=torch.stack([m.grad_paths for m in metrics]).mean().item(),
        loss_tokens=torch.stack([m.loss_tokens for m in metrics]).mean().item(),
        losses=losses,
    )
    return params, result


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def format_table(runs: dict[str, list[RunResult]]) -> str:
    header = (f"{'mode':<7} {'val loss':>9} {'± s.e.':>7} {'val ppl':>8} {'train loss':>10} {'time s':>7} "
              f"{'tok/s':>8} {'bwd FLOPs saved':>15}")
    rows = []
    for mode, results in runs.items():
        val, err = mean_and_stderr([r.val_loss for r in results])
        train_loss = mean_and_stderr([r.train_loss for r in results])[0]
        seconds = mean_and_stderr([r.seconds for r in results])[0]
        rate = mean_and_stderr([r.tokens_per_second for r in results])[0]
        saved = 1.0 - mean_and_stderr([r.grad_paths for r in results])[0]
        err_text = "" if math.isnan(err) else f"{err:.3f}"
        rows.append(f"{mode:<7} {val:>9.3f} {err_text:>7} {math.exp(val):>8.2f} {train_loss:>10.3f} {seconds:>7.1f} "
                    f"{rate:>8.0f} {saved:>15.0%}")
    return "\n".join([header, "-" * len(header), *rows])


def footer(runs: dict[str, list[RunResult]], args: argparse.Namespace, reference_seconds: float) -> str:
    """What the table means, including the comparisons that do not flatter CGGR."""
    if args.rule == "excess":
        recipe = (f"cggr: the {args.ratio:.0%} of tokens with the largest excess loss (model nll - reference nll) train; "
                  f"the reference ({args.reference_layers} blocks, {args.reference_steps} steps on other batches) took "
                  f"{reference_seconds:.1f} s, counted in cggr's time.")
    else:
        recipe = (f"cggr: '{args.score}' scores -> {args.num_buckets} depth buckets, loss on the hardest "
                  f"{args.ratio:.0%} of tokens, both reached linearly over {args.curriculum_steps} steps.")
    lines = [
        "",
        recipe,
        "random: the same step with difficulty-blind scores -- the same gradient budget: the control.",
        f"val loss: held-out text, mean over seeds {args.seeds} (± standard error). train loss: all tokens, last 10% of steps.",
        "bwd FLOPs saved: share of (token, layer) gradient paths left out: what compacted execution saves in the",
        "backward matmuls (this demo masks gradients, which is exact but computes them all).",
    ]
    val = {mode: mean_and_stderr([r.val_loss for r in results]) for mode, results in runs.items()}
    if "dense" in val and "cggr" in val:
        lines.append(f"cggr vs dense: val loss {val['cggr'][0] - val['dense'][0]:+.3f} at equal steps.")
    if "random" in val and "cggr" in val:
        gap = val["cggr"][0] - val["random"][0]
        errors = [e for e in (val["cggr"][1], val["random"][1]) if not math.isnan(e)]
        spread = f" (standard errors {val['cggr'][1]:.3f} and {val['random'][1]:.3f})" if len(errors) == 2 else " (one seed: run --seeds 0,1,2 for error bars)"
        verdict = "better" if gap < 0 else "worse"
        lines.append(f"cggr vs random at the same gradient budget: val loss {gap:+.3f}, {verdict} than difficulty-blind selection{spread}.")
    lines.append(
        "Wall-clock: here CGGR is SLOWER than dense: it runs an extra no-grad scoring forward (and the reference's),\n"
        "and gradient masking still computes full-size matmuls. cggr_fn.models.cggr_loss runs the compacted step."
    )
    return "\n".join(lines)


def write_plot(runs: dict[str, list[RunResult]], path: Path, title: str) -> None:
    """Train loss (smoothed, mean over seeds) against the step, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for mode, results in runs.items():
        curves = torch.tensor([r.losses for r in results]).mean(0)
        window = max(1, len(curves) // 25)
        smooth = curves.unfold(0, window, 1).mean(-1) if len(curves) >= window else curves
        val = mean_and_stderr([r.val_loss for r in results])[0]
        axis.plot(range(window - 1, window - 1 + len(smooth)), smooth.tolist(), label=f"{mode} (val {val:.3f})")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss, all tokens (nats/byte)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Dense vs CGGR vs a random-token control, training a tiny byte-level GPT on poetry.",
        epilog="Sizes left unset take the CPU defaults (about 2-3 minutes on 2 cores) or, on a GPU, larger ones.",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    parser.add_argument("--steps", type=_positive_int, help="optimizer steps per mode (default 400 on CPU, 1500 on a GPU)")
    parser.add_argument("--batch-size", type=_positive_int, help="sequences per step (default 8 on CPU, 32 on a GPU)")
    parser.add_argument("--seq-len", type=_positive_int, default=128, help="bytes per sequence")
    parser.add_argument("--dim", type=_positive_int, help="model width (default 128 on CPU, 256 on a GPU)")
    parser.add_argument("--layers", type=_positive_int, help="transformer blocks (default 4 on CPU, 6 on a GPU)")
    parser.add_argument("--heads", type=_positive_int, default=4, help="attention heads (must divide --dim)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to a tenth)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each seeds the initial parameters and the data order")
    parser.add_argument("--modes", default="dense,cggr,random", help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--rule", default="excess", choices=RULES,
                        help="cggr's selection rule: excess (model loss minus a reference model's, the default) or "
                             "hardest (the seed's recipe: difficulty buckets, loss on the hardest tokens)")
    parser.add_argument("--ratio", type=_ratio, default=0.25, help="share of tokens that train (hardest: after the curriculum)")
    parser.add_argument("--reference-layers", type=_positive_int, default=2, help="excess: blocks of the reference model (its width is --dim)")
    parser.add_argument("--reference-steps", type=_positive_int, help="excess: the reference's training steps, on other batches (default: --steps)")
    parser.add_argument("--score", default="combined", help="hardest: cggr_fn.score method (combined, entropy, confidence, margin, loss, grad_norm)")
    parser.add_argument("--num-buckets", type=_positive_int, default=4, help="hardest: depth buckets (4: 100/75/50/25%% of the layers)")
    parser.add_argument("--curriculum-steps", type=int, help="hardest: steps of linear curriculum (default: 40%% of --steps)")
    parser.add_argument("--val-windows", type=_positive_int, default=128, help="held-out windows to evaluate (at most)")
    parser.add_argument("--plot", default="cggr_demo.png", help="where to write the PNG of the loss curves ('' for none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes: expected names from {MODES}, got {args.modes}")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds: expected at least one seed")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device: expected auto, cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no CUDA device")
    gpu = args.device.startswith("cuda")
    for name, cpu_default, gpu_default in (("steps", 400, 1500), ("batch_size", 8, 32), ("dim", 128, 256), ("layers", 4, 6)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    if args.dim % args.heads:
        parser.error(f"--heads: must divide --dim ({args.dim}), got {args.heads}")
    if args.curriculum_steps is None:
        args.curriculum_steps = max(1, (2 * args.steps) // 5)
    if args.reference_steps is None:
        args.reference_steps = args.steps
    if args.rule == "hardest":
        try:
            cggr_fn.score(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), method=args.score)
        except ValueError as error:
            parser.error(f"--score: {error}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[RunResult]]:
    """Run the comparison over every seed, print the table, write the plot, and return each mode's results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    config = tiny_gpt.GPTConfig(max_seq_len=args.seq_len, dim=args.dim, num_layers=args.layers, num_heads=args.heads)
    train_data, val_data = (t.to(device) for t in poetry_data.split(poetry_data.load_bytes(), val_fraction=0.1))
    val_tokens, val_targets = poetry_data.eval_windows(val_data, args.seq_len, args.val_windows)

    def lr_fn_for(total: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda step: learning_rate(step, peak=args.lr, warmup=max(1, total // 20), total=total)

    n_params = sum(v.numel() for v in tiny_gpt.init_params(config, torch.Generator().manual_seed(0)).values())
    print(
        f"tiny GPT: {config.num_layers} layers, dim {config.dim}, {n_params / 1e6:.2f}M params | "
        f"{len(train_data) / 1e3:.0f} KB train, {val_tokens.numel() / 1e3:.0f}K val bytes | "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens on {device}, seeds {args.seeds}"
    )
    runs: dict[str, list[RunResult]] = {mode: [] for mode in args.modes}
    reference_seconds = 0.0
    # CPU kernels (the embedding's scatter-add backward) otherwise accumulate in a
    # thread-dependent order; discrete top-k choices amplify those last-bit
    # differences into run-to-run noise. (On CUDA this mode needs extra cuBLAS
    # settings, so it is left to the user there.) Restored afterwards: main() may run inside tests.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(was_deterministic or device.type == "cpu")
    try:
        for seed in args.seeds:
            starts = poetry_data.batch_starts(len(train_data), steps=args.steps, batch_size=args.batch_size,
                                              seq_len=args.seq_len, seed=seed).to(device)
            init = {k: v.to(device) for k, v in tiny_gpt.init_params(config, torch.Generator().manual_seed(seed)).items()}
            lr_fn = lr_fn_for(args.steps)
            if args.rule == "excess" and "cggr" in args.modes:
                reference_config = tiny_gpt.GPTConfig(max_seq_len=args.seq_len, dim=args.dim,
                                                      num_layers=args.reference_layers, num_heads=args.heads)
                reference_init = {k: v.to(device) for k, v in tiny_gpt.init_params(
                    reference_config, torch.Generator().manual_seed(seed + 10_000)).items()}
                # Other batches than the runs': the reference must not have seen the model's data order.
                reference_starts = poetry_data.batch_starts(len(train_data), steps=args.reference_steps,
                                                            batch_size=args.batch_size, seq_len=args.seq_len,
                                                            seed=seed + 10_000).to(device)
                reference, reference_run = train("reference", make_dense_step(lr_fn_for(args.reference_steps)),
                                                 reference_init, train_data, reference_starts, args.seq_len, quiet=args.quiet)
                reference_seconds = reference_run.seconds
                scorer = excess_scorer(reference)
                make_step = functools.partial(make_selective_step, num_layers=config.num_layers, ratio=args.ratio)
            else:
                scorer = difficulty_scorer(args.score)
                make_step = functools.partial(make_bucketed_step, num_layers=config.num_layers, num_buckets=args.num_buckets,
                                              curriculum_steps=args.curriculum_steps, final_ratio=args.ratio)
            steps: dict[str, Callable[[], StepFn]] = {
                "dense": lambda: make_dense_step(lr_fn),
                "cggr": lambda: make_step(lr_fn, scorer),
                "random": lambda: make_step(lr_fn, random_scorer(seed)),
            }
            for mode in args.modes:
                params, result = train(mode, steps[mode](), dict(init), train_data, starts, args.seq_len, quiet=args.quiet)
                seconds = result.seconds + (reference_seconds if mode == "cggr" and args.rule == "excess" else 0.0)
                runs[mode].append(result._replace(val_loss=evaluate(params, val_tokens, val_targets, args.batch_size),
                                                  seconds=seconds, seed=seed))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    print()
    print(format_table(runs))
    print(footer(runs, args, reference_seconds))
    if args.plot:
        path = Path(args.plot).resolve()
        write_plot(runs, path, f"tiny GPT ({config.num_layers} x {config.dim}), rule {args.rule}, ratio {args.ratio}, "
                               f"seeds {args.seeds}")
        print(f"\nloss curves: {path}")
    return runs


if __name__ == "__main__":
    main()
