"""The Hugging Face fine-tuning examples run (a few steps, tiny shapes) and agree with each other."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import hf_finetune_backward  # noqa: E402
import hf_finetune_functional  # noqa: E402

TINY = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--layers", "2", "--warmup-steps", "2", "--quiet"]


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_functional_example_runs_and_routes(model: str) -> None:
    history = hf_finetune_functional.main([*TINY, "--model", model])
    assert len(history) == 4 and all(math.isfinite(log.loss) for log in history)
    assert history[0].mean_depth == 2.0  # the curriculum starts at full depth
    assert history[-1].mean_depth < 2.0  # ... and routes once warmed up


@pytest.mark.parametrize("method", hf_finetune_backward.METHODS)
def test_backward_example_runs(method: str) -> None:
    losses = hf_finetune_backward.main([*TINY, "--method", method])
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_backward_and_functional_depth_routing_agree() -> None:
    # Same model, data and curriculum: the .backward() loop and the torch.func loop are one computation.
    functional = [log.loss for log in hf_finetune_functional.main(TINY)]
    backward = hf_finetune_backward.main([*TINY, "--method", "depth"])
    assert functional == pytest.approx(backward, rel=1e-4)


def test_backward_example_with_checkpointing_matches_without() -> None:
    plain = hf_finetune_backward.main([*TINY, "--method", "depth"])
    checkpointed = hf_finetune_backward.main([*TINY, "--method", "depth", "--checkpointing"])
    assert checkpointed == pytest.approx(plain, rel=1e-5)
