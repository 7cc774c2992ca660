"""The examples run, train, and route gradients the way they claim to (tiny shapes, a few seconds)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo  # noqa: E402
import functional_training  # noqa: E402
import poetry_data  # noqa: E402
import tiny_gpt  # noqa: E402

TINY_DEMO = ["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--dim", "32", "--layers", "2", "--heads", "2",
             "--val-windows", "8", "--quiet", "--device", "cpu"]


def test_poetry_sample_is_small_plain_text() -> None:
    raw = poetry_data.SAMPLE.read_bytes()
    assert 100_000 < len(raw) < 500_000
    assert raw.isascii()
    train, val = poetry_data.split(poetry_data.load_bytes(), val_fraction=0.1)
    assert len(train) + len(val) == len(raw) and len(val) > 10_000


def test_functional_training_main_runs() -> None:
    history = functional_training.main(steps=3, verbose=False)
    assert len(history) == 3
    assert all(math.isfinite(log.loss) and math.isfinite(log.full_loss) for log in history)
    # At step 0 the curriculum keeps every token at full depth.
    assert history[0].mean_depth == len(functional_training.TinyLM().blocks)


def _functional_setup(seq_len: int = 16) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = functional_training.TinyLM(dim=32, num_layers=4, num_heads=2, max_seq_len=seq_len)
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = poetry_data.load_bytes()
    tokens, targets = poetry_data.get_batch(data, torch.tensor([0, 5000, 90000]), seq_len)
    return model, params, tokens, targets


def _dense_grads(model: torch.nn.Module, params: dict[str, torch.Tensor], tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (tokens,))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return torch.func.grad(loss)(params)


def test_functional_cggr_grads_match_dense_at_step_0_and_differ_after_warmup() -> None:
    model, params, tokens, targets = _functional_setup()
    dense = _dense_grads(model, params, tokens, targets)
    at_start = functional_training.cggr_grads(model, params, tokens, targets, torch.tensor(0), warmup_steps=10, final_ratio=0.5)
    for name in dense:
        torch.testing.assert_close(at_start.grads[name], dense[name], rtol=1e-4, atol=1e-6)
    routed = functional_training.cggr_grads(model, params, tokens, targets, torch.tensor(10), warmup_steps=10, final_ratio=0.5)
    assert routed.mean_depth.item() < len(model.blocks)
    bottom = "blocks.0.qkv.weight"
    assert not torch.allclose(routed.grads[bottom], dense[bottom], rtol=1e-3, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in routed.grads.values())


def test_tiny_gpt_routed_forward_keeps_logits_and_gates_bottom_layers() -> None:
    config = tiny_gpt.GPTConfig(max_seq_len=16, dim=32, num_layers=3, num_heads=2)
    params = tiny_gpt.init_params(config, torch.Generator().manual_seed(0))
    tokens = poetry_data.load_bytes()[:32].reshape(2, 16)
    depth = torch.ones_like(tokens)  # every token trains only the top block
    torch.testing.assert_close(tiny_gpt.forward(params, tokens, depth=depth), tiny_gpt.forward(params, tokens))
    grads = torch.func.grad(lambda p: tiny_gpt.forward(p, tokens, depth=depth).logsumexp(-1).mean())(params)
    assert grads["blocks.0.mlp.up"].abs().max() == 0
    assert grads["blocks.1.mlp.up"].abs().max() == 0
    assert grads["blocks.2.mlp.up"].abs().max() > 0


def test_demo_cggr_step_equals_dense_at_step_0_then_departs() -> None:
    config = tiny_gpt.GPTConfig(max_seq_len=16, dim=32, num_layers=2, num_heads=2)
    params = tiny_gpt.init_params(config, torch.Generator().manual_seed(0))
    tokens, targets = poetry_data.get_batch(poetry_data.load_bytes(), torch.tensor([0, 777, 4242, 31337]), 16)
    opt = demo.adamw_init(params)

    def lr(step: torch.Tensor) -> torch.Tensor:
        return torch.tensor(1e-2)

    dense_step = demo.make_dense_step(lr)
    cggr_step = demo.make_bucketed_step(lr, demo.difficulty_scorer("combined"), num_layers=2, num_buckets=4,
                                        curriculum_steps=4, final_ratio=0.5)
    _, dense_opt, dense_m = dense_step(params, opt, torch.tensor(0), tokens, targets)
    _, cggr_opt, cggr_m = cggr_step(params, opt, torch.tensor(0), tokens, targets)
    torch.testing.assert_close(cggr_m.loss, dense_m.loss)
    assert cggr_m.grad_paths.item() == 1.0 and cggr_m.loss_tokens.item() == 1.0
    # Adam's first moment after one step is (1 - beta1) * grad: the gradients match.
    # (The parameters themselves are not compared: Adam's first update is about
    # sign(grad), which amplifies float noise in near-zero gradients.)
    for name in params:
        torch.testing.assert_close(cggr_opt.mu[name], dense_opt.mu[name], rtol=1e-4, atol=1e-7)
    # After the curriculum: fewer gradient paths, fewer loss tokens, a different update.
    late_params, _, late_m = cggr_step(params, opt, torch.tensor(4), tokens, targets)
    dense_late, _, _ = dense_step(params, opt, torch.tensor(4), tokens, targets)
    assert late_m.grad_paths.item() < 1.0
    assert late_m.loss_tokens.item() == pytest.approx(0.5)
    assert not torch.allclose(late_params["blocks.0.mlp.up"], dense_late["blocks.0.mlp.up"])


def test_demo_excess_step_trains_the_tokens_with_the_largest_excess_loss() -> None:
    config = tiny_gpt.GPTConfig(max_seq_len=16, dim=32, num_layers=2, num_heads=2)
    params = tiny_gpt.init_params(config, torch.Generator().manual_seed(0))
    reference = tiny_gpt.init_params(config, torch.Generator().manual_seed(1))
    tokens, targets = poetry_data.get_batch(poetry_data.load_bytes(), torch.tensor([0, 777, 4242, 31337]), 16)
    scorer = demo.excess_scorer(reference)
    with torch.no_grad():
        logits = tiny_gpt.forward(params, tokens)
    scores = scorer(logits, tokens, targets, torch.tensor(0))
    own = demo.cggr_fn.score(logits, targets, method="loss")
    theirs = demo.cggr_fn.score(tiny_gpt.forward(reference, tokens), targets, method="loss")
    torch.testing.assert_close(scores, own - theirs)
    step = demo.make_selective_step(lambda s: torch.tensor(1e-2), scorer, num_layers=2, ratio=0.25)
    _, opt, metrics = step(params, demo.adamw_init(params), torch.tensor(0), tokens, targets)
    assert metrics.loss_tokens.item() == pytest.approx(0.25) and metrics.grad_paths.item() == pytest.approx(0.25)
    # The gradient is that of the loss over the selected tokens alone, the others
    # constant in every layer (as compacted execution runs them).
    mask = demo.cggr_fn.select(own - theirs, ratio=0.25)
    depth = torch.where(mask, 2, 0)
    expected = torch.func.grad(lambda p: demo.cggr_fn.selective_loss(
        tiny_gpt.forward(p, tokens, depth=depth), targets, mask))(params)
    for name in params:
        torch.testing.assert_close(opt.mu[name], 0.1 * expected[name], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rule", ["excess", "hardest"])
def test_demo_main_tiny_run(rule: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "curves.png"
    runs = demo.main([*TINY_DEMO, "--rule", rule, "--seeds", "0,1", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert set(runs) == {"dense", "cggr", "random"}
    for mode, results in runs.items():
        assert [r.seed for r in results] == [0, 1]
        for result in results:
            assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss), mode
            assert result.losses[-1] < result.losses[0], f"{mode} did not reduce the loss"
            assert result.tokens_per_second > 0
    cggr, random, dense = runs["cggr"][0], runs["random"][0], runs["dense"][0]
    assert dense.grad_paths == 1.0
    assert cggr.grad_paths < 1.0 and cggr.loss_tokens < 1.0
    # The control spends exactly the same gradient budget as CGGR.
    assert random.grad_paths == pytest.approx(cggr.grad_paths)
    assert random.loss_tokens == pytest.approx(cggr.loss_tokens)
    # Same init and data: the first step's loss is identical across modes.
    assert cggr.losses[0] == pytest.approx(dense.losses[0], rel=1e-5)
    table = out[out.index("mode") :]
    assert all(mode in table for mode in ("dense", "cggr", "random")) and "± s.e." in table and "bwd FLOPs saved" in table
    assert "SLOWER" in out and "cggr vs random" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"loss curves: {plot}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "0"], "--ratio: expected a value in (0, 1]"),
        (["--ratio", "1.5"], "--ratio: expected a value in (0, 1]"),
        (["--seeds", "a,b"], "--seeds: expected comma-separated integers"),
        (["--steps", "0"], "--steps: expected an integer >= 1"),
        (["--dim", "30", "--heads", "4"], "--heads: must divide --dim (30)"),
        (["--rule", "easiest"], "--rule: invalid choice"),
        (["--rule", "hardest", "--score", "perplexity"], "--score: method: expected one of"),
        (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    ],
)
def test_demo_rejects_bad_options_clearly(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main([*argv, "--quiet"])
    assert message in capsys.readouterr().err


def test_demo_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = demo.build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    text = capsys.readouterr().out
    assert all(action.option_strings[-1] in text for action in parser._actions)


def test_demo_rejects_unknown_mode() -> None:
    with pytest.raises(SystemExit):
        demo.main(["--modes", "dense,nope", "--quiet"])
