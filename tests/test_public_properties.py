"""Shared properties of every public function, from one table (the optax ``float64_test`` pattern).

``TABLE`` maps each public function of ``cggr_fn`` (and the tensor functions of
``cggr_fn.models`` and ``cggr_fn.distributed``) to a factory of example inputs; ``test_property`` runs every
entry under every property:

* ``dtype``: float64 in gives float64 out, float32 gives float32, and 16-bit
  gives float32 for statistics, scores and losses (the 16-bit dtype itself
  for transforms that only gate gradients); non-floating outputs keep their
  dtype whatever the input dtype.
* ``compile``: ``torch.compile(fullgraph=True)`` with no graph break and no
  data-dependent op, equal to eager (:func:`cggr_fn.testing.assert_compiles`).
* ``second_shape``: a second input size recompiles instead of failing.
* ``dynamic``: both sizes under ``dynamic=True`` (symbolic shapes), equal to eager.
* ``vmap``: ``torch.func.vmap`` over a leading batch dim equals eager.
* ``vjp``: ``torch.func.vjp`` equals ``torch.autograd.grad`` (differentiable entries).

A property that does not apply to an entry is listed in the entry's ``skip``
with the reason; such pairs are not collected at all (nothing is skipped at run
time). A new public function must join the table: ``test_table_covers_the_public_api``
fails otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

import cggr_fn
from cggr_fn import distributed, models, testing

PROPERTIES = ("dtype", "compile", "second_shape", "dynamic", "vmap", "vjp")
FLOATS = (torch.float64, torch.float32, torch.bfloat16)
VOCAB = 5
# The two input sizes of every entry: (batch, seq).
SIZES = ((2, 6), (3, 7))

Make = Callable[[torch.dtype, int], tuple[Callable[..., Any], tuple[Any, ...]]]


class Entry(NamedTuple):
    make: Make  # (floating dtype, size index) -> (fn, args)
    dtypes: tuple[torch.dtype, ...] = FLOATS  # floating input dtypes; () = it takes none
    upcast16: bool = True  # 16-bit floating inputs give float32 floating outputs
    skip: dict[str, str] = {}  # property -> why it does not apply


def _generator(size: int) -> torch.Generator:
    return torch.Generator().manual_seed(size)


def _scores(dtype: torch.dtype, size: int) -> torch.Tensor:
    """Scores with a tie and an ignored (-inf) position."""
    scores = torch.randn(SIZES[size], generator=_generator(size)).to(dtype)
    scores[0, 1] = scores[0, 0]
    scores[-1, -1] = float("-inf")
    return scores


def _logits(dtype: torch.dtype, size: int) -> torch.Tensor:
    return torch.randn(*SIZES[size], VOCAB, generator=_generator(size)).to(dtype)


def _targets(size: int) -> torch.Tensor:
    targets = torch.randint(0, VOCAB, SIZES[size], generator=_generator(size + 10))
    targets[0, -1] = -100
    return targets


def _depth(size: int, num_layers: int = 3) -> torch.Tensor:
    return torch.randint(0, num_layers + 1, SIZES[size], generator=_generator(size + 20))


def _layers(dtype: torch.dtype) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Token-mixing layers (a causal running mean, like attention) over a feature dim of 4."""
    weights = [torch.randn(4, 4, generator=_generator(30 + i)).to(dtype) for i in range(3)]

    def layer(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, h.shape[-2] + 1, dtype=h.dtype).unsqueeze(-1)
        return h + torch.tanh((h.cumsum(-2) / counts) @ w)

    return [lambda h, w=w: layer(h, w) for w in weights]


def _hidden(dtype: torch.dtype, size: int) -> torch.Tensor:
    return torch.randn(*SIZES[size], 4, generator=_generator(size + 40)).to(dtype)


def _head_weight(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(VOCAB, 4, generator=_generator(50)).to(dtype)


NOT_DIFFERENTIABLE = "outputs are detached or not floating by design"
NO_FLOAT_INPUT = "takes no floating input"


def _make_route_grad(dtype: torch.dtype, size: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    x = torch.randn(*SIZES[size], 4, generator=_generator(size)).to(dtype)
    mask = torch.randint(0, 2, SIZES[size], generator=_generator(size + 1)).bool()
    return (lambda x, mask: cggr_fn.route_grad(lambda t: (t.sin(), t.sum(-1)), mask, leak=0.25)(x)), (x, mask)


def _make_route_grad_compacted(dtype: torch.dtype, size: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    x = torch.randn(*SIZES[size], 4, generator=_generator(size)).to(dtype)
    weight = torch.randn(4, 3, generator=_generator(size + 2)).to(dtype)

    def fn(x: torch.Tensor, scores: torch.Tensor) -> Any:
        mask = cggr_fn.select(scores, ratio=0.5)
        routed = cggr_fn.route_grad(lambda t: (t.sin() @ weight, t.sum(-1)), mask,
                                    capacity=cggr_fn.capacity(mask.numel(), ratio=0.5))
        return routed(x)

    return fn, (x, _scores(dtype, size))


def _make_route_depth(dtype: torch.dtype, size: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    layers = _layers(dtype)
    hidden = torch.randn(*SIZES[size], 4, generator=_generator(size)).to(dtype)
    return (lambda h, depth: cggr_fn.route_depth(layers, depth)(h)), (hidden, _depth(size))


TABLE: dict[str, Entry] = {
    "token_stats": Entry(
        lambda d, n: (lambda x, t: cggr_fn.token_stats(x, t), (_logits(d, n), _targets(n))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "score": Entry(
        lambda d, n: (lambda x, t: cggr_fn.score(x, t, method="margin"), (_logits(d, n), _targets(n))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    # The method that reads the sixth statistic (grad_norm) and the targets.
    "score/grad_norm": Entry(
        lambda d, n: (lambda x, t: cggr_fn.score(x, t, method="grad_norm"), (_logits(d, n), _targets(n))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "ratio_schedule": Entry(
        lambda d, n: (lambda step: cggr_fn.ratio_schedule(step, warmup_steps=10, final_ratio=0.25), (torch.tensor(3 + 4 * n),)),
        dtypes=(),
        skip={"dtype": NO_FLOAT_INPUT, "vjp": NOT_DIFFERENTIABLE},
    ),
    # A Python-int step: a second value must recompile, not break the graph.
    "ratio_schedule/int_step": Entry(
        lambda d, n: (
            lambda s, step: cggr_fn.select(s, ratio=cggr_fn.ratio_schedule(step, warmup_steps=10, final_ratio=0.25)),
            (_scores(d, 0), 3 + 4 * n),
        ),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "dynamic_ratio": Entry(
        lambda d, n: (
            lambda ratio, confidence: cggr_fn.dynamic_ratio(ratio, confidence, sensitivity=0.7),
            (torch.tensor(0.5), torch.rand(SIZES[n], generator=_generator(n)).to(d)),
        ),
    ),
    "bucket": Entry(
        lambda d, n: (lambda s, step: cggr_fn.bucket(s, step, num_buckets=3, warmup_steps=10), (_scores(d, n), torch.tensor(7))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "bucket_sizes": Entry(
        lambda d, n: (
            lambda num_tokens, step: cggr_fn.bucket_sizes(num_tokens, step, num_buckets=3, warmup_steps=10),
            (12 + 9 * n, torch.tensor(7)),
        ),
        dtypes=(),
        skip={"dtype": NO_FLOAT_INPUT, "vjp": NOT_DIFFERENTIABLE},
    ),
    "bucket_depth": Entry(
        lambda d, n: (
            lambda s, step: cggr_fn.bucket_depth(s, step, num_layers=6, num_buckets=3, warmup_steps=10),
            (_scores(d, n), torch.tensor(7)),
        ),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "capacity": Entry(
        lambda d, n: (lambda num_tokens, ratio: cggr_fn.capacity(num_tokens, ratio=ratio), (12 + 9 * n, torch.tensor(0.3, dtype=d))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "select": Entry(
        lambda d, n: (lambda s: cggr_fn.select(s, ratio=0.3), (_scores(d, n),)),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "select/stratified_tensor_ratio": Entry(
        lambda d, n: (
            lambda s, ratio, seed: cggr_fn.select(s, ratio=ratio, strategy="stratified", num_strata=2, seed=seed),
            (_scores(d, n), torch.tensor(0.4), torch.tensor(5)),
        ),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "select/sequence_aware": Entry(
        lambda d, n: (lambda s: cggr_fn.select(s, ratio=0.5, strategy="sequence_aware", min_per_sequence=2), (_scores(d, n),)),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "route_grad": Entry(_make_route_grad, upcast16=False),
    # Compacted: half the rows under autograd, the rest without.
    "route_grad/compacted": Entry(_make_route_grad_compacted, upcast16=False),
    "depth_masks": Entry(
        lambda d, n: (lambda depth: cggr_fn.depth_masks(depth, num_layers=3), (_depth(n),)),
        dtypes=(),
        skip={"dtype": NO_FLOAT_INPUT, "vjp": NOT_DIFFERENTIABLE},
    ),
    "route_depth": Entry(_make_route_depth, upcast16=False),
    "selective_loss": Entry(
        lambda d, n: (
            lambda x, t, m: cggr_fn.selective_loss(x, t, m, normalize="valid"),
            (_logits(d, n), _targets(n), _scores(torch.float32, n) > 0),
        ),
    ),
    "priority_sample": Entry(
        lambda d, n: (lambda s, seed: cggr_fn.priority_sample(s.abs(), ratio=0.5, seed=seed), (_scores(d, n), torch.tensor(3))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "selective_loss/weighted": Entry(
        lambda d, n: (
            lambda x, t, m, w: cggr_fn.selective_loss(x, t, m, weights=w),
            (_logits(d, n), _targets(n), _scores(torch.float32, n) > 0, _scores(torch.float32, n).abs()),
        ),
    ),
    # The fused LM head: hidden states (feature dim 4) and a head weight instead of logits.
    "fused_linear_token_stats": Entry(
        lambda d, n: (
            lambda h, w, t: cggr_fn.fused_linear_token_stats(h, w, t, chunk_size=4),
            (_hidden(d, n), _head_weight(d), _targets(n)),
        ),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "fused_selective_loss": Entry(
        lambda d, n: (
            lambda h, w, t, m: cggr_fn.fused_selective_loss(h, w, t, m, normalize="valid", chunk_size=4),
            (_hidden(d, n), _head_weight(d), _targets(n), _scores(torch.float32, n) > 0),
        ),
    ),
    # Fixed-capacity positions (from a top-k) and per-token weights.
    "fused_selective_loss/positions_weighted": Entry(
        lambda d, n: (
            lambda h, w, t, s, wt: cggr_fn.fused_selective_loss(h, w, t, s.flatten().topk(5).indices, weights=wt, chunk_size=3),
            (_hidden(d, n), _head_weight(d), _targets(n), _scores(torch.float32, n), _scores(torch.float32, n).abs()),
        ),
    ),
    "fused_head_loss": Entry(
        lambda d, n: (
            lambda h, w, t: cggr_fn.fused_head_loss(h, w, t, ratio=0.5, method="grad_norm", chunk_size=4),
            (_hidden(d, n), _head_weight(d), _targets(n)),
        ),
    ),
    # Ratio 1 takes the one-pass path; priority sampling gives the loss weights.
    "fused_head_loss/one_pass_priority": Entry(
        lambda d, n: (
            lambda h, w, t: cggr_fn.fused_head_loss(h, w, t, ratio=1.0, method="loss", strategy="priority",
                                                    normalize="valid", chunk_size=4),
            (_hidden(d, n), _head_weight(d), _targets(n)),
        ),
    ),
    "excess": Entry(
        lambda d, n: (cggr_fn.excess, (_scores(d, n), _scores(d, n).flip(-1))),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "trim": Entry(
        lambda d, n: (lambda s: cggr_fn.trim(s, 0.25), (_scores(d, n),)),
        upcast16=False,
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    # Both halves of the transform: init, then one update.
    "ema": Entry(
        lambda d, n: (
            lambda w, b, new_w, new_b: cggr_fn.ema(0.25).update(
                cggr_fn.ema(0.25).init({"w": w, "b": b}), {"w": new_w, "b": new_b}).average,
            (_logits(d, n), _scores(d, n).clamp_min(-5), _logits(d, n).flip(-1), _scores(d, n).flip(-1).clamp_min(-5)),
        ),
        upcast16=False,
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    # cggr_fn.models: the functions of tensors.
    "models.lm_targets": Entry(
        lambda d, n: (lambda labels, am: models.lm_targets(labels, attention_mask=am), (_targets(n), _targets(n) != 0)),
        dtypes=(),
        skip={"dtype": NO_FLOAT_INPUT, "vjp": NOT_DIFFERENTIABLE},
    ),
    "models.token_scores": Entry(
        lambda d, n: (
            lambda x, labels, am: models.token_scores(x, labels, attention_mask=am),
            (_logits(d, n), _targets(n), _targets(n) != 0),
        ),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "models.sequence_scores": Entry(
        lambda d, n: (models.sequence_scores, (_scores(d, n),)),
    ),
    "models.hardest_sequences": Entry(
        lambda d, n: (lambda s: models.hardest_sequences(s, ratio=0.5), (_scores(d, n),)),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "models.take_sequences": Entry(
        lambda d, n: (
            lambda x, ids, index: models.take_sequences({"x": x, "ids": ids}, index, batch_shape=SIZES[n]),
            (_scores(d, n), _targets(n), torch.tensor([1, 0])),
        ),
        upcast16=False,
    ),
    # cggr_fn.distributed with no process group: the one-process functions they reduce to.
    "distributed.global_select": Entry(
        lambda d, n: (lambda s: distributed.global_select(s, ratio=0.3, capacity_factor=2.0), (_scores(d, n),)),
        skip={"vjp": NOT_DIFFERENTIABLE},
    ),
    "distributed.global_mean": Entry(
        lambda d, n: (
            lambda x, count: distributed.global_mean(x.sum(-1), count),
            (_logits(d, n), torch.arange(SIZES[n][1])),
        ),
        upcast16=False,
    ),
    "models.lm_loss": Entry(
        lambda d, n: (lambda x, labels, am: models.lm_loss(x, labels, attention_mask=am), (_logits(d, n), _targets(n), _targets(n) != 0)),
    ),
}

# Public names that are not functions of tensors, with the reason and where they are tested.
EXEMPT = {
    "Sample": "a NamedTuple type (priority_sample returns it)",
    "TokenStats": "a NamedTuple type (token_stats returns it)",
    "Ema": "a NamedTuple type (ema returns it)",
    "EmaState": "a NamedTuple type (Ema.init returns it)",
    "HeadLoss": "a NamedTuple type (fused_head_loss returns it)",
    "bucket_capacity": "Python ints in, Python ints out (static sizes; tests/test_compaction.py)",
    "checking": "a context manager for eager debugging; it raises under compile by design (tests/test_bad_input.py)",
    "distributed.LossModule": "a type (loss_module returns it)",
    "distributed.loss_module": "builds a module for DDP/FSDP2 (tests/test_distributed.py)",
    "distributed.state_dict": "restructures a pytree for torch.distributed.checkpoint; no tensor op (tests/test_distributed.py)",
    "distributed.load_state_dict": "restructures a pytree for torch.distributed.checkpoint; no tensor op (tests/test_distributed.py)",
    "models.DepthRoutedForward": "a type (depth_routed_forward returns it)",
    "models.CGGRLoss": "a type (cggr_loss returns it)",
    "models.Routing": "a NamedTuple type (a CGGRLoss call returns it)",
    "models.cggr_loss": "needs a transformers model (tests/test_models_step.py)",
    "models.ModelParts": "a type (detect_parts returns it)",
    "models.ScoredMask": "a type (routing_mask returns it)",
    "models.TruncatedRouter": "a type (truncated_router returns it)",
    "models.detect_parts": "inspects a model's modules; not a function of tensors",
    "models.depth_routed_forward": "needs a transformers model (tests/test_models_compile.py, tests/test_models_hf.py)",
    "models.truncated_router": "needs a transformers model (tests/test_models_compile.py, tests/test_models_hf.py)",
    "models.hardest_sequence_loss": "needs a transformers model (tests/test_models_compile.py)",
    "models.routing_mask": "needs a transformers model (tests/test_models_wrappers.py)",
    "models.selective_lm_loss": "needs a transformers model (tests/test_models_wrappers.py)",
}


def _cases() -> list[Any]:
    return [
        pytest.param(name, prop, id=f"{name}-{prop}")
        for name, entry in TABLE.items()
        for prop in PROPERTIES
        if prop not in entry.skip
    ]


def _floating_dtypes(tree: Any) -> list[torch.dtype]:
    return [x.dtype for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _other_dtypes(tree: Any) -> list[Any]:
    return [x.dtype if isinstance(x, torch.Tensor) else type(x) for x in torch.utils._pytree.tree_leaves(tree)
            if not (isinstance(x, torch.Tensor) and x.is_floating_point())]


def _check_dtypes(entry: Entry) -> None:
    others = None
    for dtype in entry.dtypes:
        fn, args = entry.make(dtype, 0)
        out = fn(*args)
        expected = torch.float32 if dtype.itemsize == 2 and entry.upcast16 else dtype
        got = _floating_dtypes(out)
        assert all(d == expected for d in got), f"{dtype} inputs: expected {expected} floating outputs, got {got}"
        if others is None:
            others = _other_dtypes(out)
        assert _other_dtypes(out) == others, f"{dtype} inputs: non-floating outputs changed to {_other_dtypes(out)}"


@pytest.mark.parametrize("name, prop", _cases())
def test_property(name: str, prop: str) -> None:
    entry = TABLE[name]
    if prop == "dtype":
        _check_dtypes(entry)
        return
    fn, args = entry.make(torch.float32, 0)
    if prop == "compile":
        testing.assert_compiles(fn, *args)
    elif prop in ("second_shape", "dynamic"):
        _, second = entry.make(torch.float32, 1)
        if prop == "second_shape":
            # One compilation per shape: the second one makes the sizes symbolic.
            testing.assert_max_recompiles(fn, 2, [args, second])
        else:
            # Symbolic shapes may re-trace when a guard on a size fails (e.g. the
            # rounding of ratio * n in capacity); surviving and equalling eager is the property.
            testing.assert_max_recompiles(fn, 4, [args, second], dynamic=True)
    else:
        testing.assert_variants(fn, *args, variants=(prop,))


def test_table_covers_the_public_api() -> None:
    public = (set(cggr_fn.__all__) | {f"models.{name}" for name in models.__all__}
              | {f"distributed.{name}" for name in distributed.__all__})
    covered = {name.split("/")[0] for name in TABLE} | set(EXEMPT)
    assert public - covered == set(), f"public functions missing from TABLE (add an entry): {sorted(public - covered)}"
    assert covered - public == set(), f"TABLE or EXEMPT names that are not public: {sorted(covered - public)}"
    assert set(TABLE) & set(EXEMPT) == set()
