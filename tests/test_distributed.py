"""Data-parallel CGGR on 2 gloo processes: DDP and FSDP2 gradients equal one process over the concatenated batch.

The two worker processes are spawned once per module (``_results``): each
runs every scenario and saves what it saw; the tests compare it with the
single-process references computed here, in float64. A scenario that raises
is reported by the test that reads it.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cggr_fn
import cggr_fn.distributed as cd

transformers = pytest.importorskip("transformers")

from cggr_fn.models import cggr_loss, token_scores, truncated_router  # noqa: E402

WORLD = 2
VOCAB, BATCH, SEQ = 32, 2, 8
TOL = dict(rtol=1e-10, atol=1e-12)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2)
    return transformers.LlamaForCausalLM(config).double()


def _batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 1 is mostly padding: 1 labelled token, fewer than the 4 a rank selects; rank 0 has 14."""
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 * step + rank))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if rank == 1:
        mask[0, 1:] = 0
        mask[1, 2:] = 0
    return ids, mask


def _concatenated(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [_batch(rank, step) for rank in range(WORLD)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _topk(model: torch.nn.Module, scope: str | None, **kwargs: Any) -> Any:
    return cggr_loss(model, selection="topk", ratio=0.25, router_layers=1, method="loss", scope=scope, **kwargs)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        grad = p.grad
        out[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return out


class State(NamedTuple):
    """The explicit CGGR state of the checkpoint scenario: the curriculum step and an EMA reference."""

    step: torch.Tensor
    ema: cggr_fn.EmaState


EMA = cggr_fn.ema(0.5)


def _resume_setup(seed: int) -> tuple[torch.nn.Module, Any, Any, Any]:
    from torch.nn.parallel import DistributedDataParallel

    model = _model(seed)
    loss_fn = cggr_loss(model, selection="buckets", warmup_steps=4, capacity_step=0, router_layers=1,
                        method="loss", scope="rank")
    module = DistributedDataParallel(cd.loss_module(loss_fn, model))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    return model, module, optimizer, truncated_router(model, num_layers=2)


def _resume_step(model: Any, module: Any, optimizer: Any, router: Any, state: State, rank: int,
                 update: bool = True) -> tuple[State, dict[str, torch.Tensor]]:
    """One training step: reference scores under the EMA, the routed loss at the state's step, AdamW, EMA."""
    ids, mask = _batch(rank, int(state.step))
    reference = token_scores(router(state.ema.average, ids, attention_mask=mask), ids, attention_mask=mask,
                             method="loss")
    optimizer.zero_grad()
    loss, _ = module(ids, state.step, attention_mask=mask, reference=reference)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    if not update:
        return state, grads
    optimizer.step()
    params = {name: p.detach() for name, p in model.named_parameters()}
    return State(state.step + 1, EMA.update(state.ema, params)), grads


def _scenarios(rank: int, workdir: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import torch.distributed.checkpoint as dcp

    results: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except Exception:  # reported by the test that reads the scenario
            results[name] = {"error": traceback.format_exc()}

    ids, mask = _batch(rank)

    def ddp(scope: str, **kwargs: Any) -> Any:
        def scenario() -> dict[str, Any]:
            model = _model()
            module = DistributedDataParallel(cd.loss_module(_topk(model, scope, **kwargs), model))
            assert not module.find_unused_parameters
            optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
            out: dict[str, Any] = {}
            for step in range(2):  # a second step: DDP raises there if a parameter got no gradient
                optimizer.zero_grad()
                loss, routing = module(ids, step, attention_mask=mask)
                loss.backward()
                if step == 0:
                    out = {"grads": _grads(model), "loss": loss.detach(), "selected": int((routing.depth > 0).sum())}
                optimizer.step()
            out["none"] = [name for name, p in model.named_parameters() if p.grad is None]
            return out
        return scenario

    run("ddp_rank", ddp("rank"))
    run("ddp_global", ddp("global", capacity_factor=4.0))

    def fsdp2() -> dict[str, Any]:
        model = _model()
        module = fully_shard(cd.loss_module(_topk(model, "global", capacity_factor=4.0), model))
        loss, _ = module(ids, 0, attention_mask=mask)
        loss.backward()
        return {"grads": _grads(model)}

    run("fsdp2_global", fsdp2)

    def fsdp2_per_layer() -> dict[str, Any]:
        model = _model()
        loss_fn = _topk(model, "rank")
        for layer in model.model.layers:
            fully_shard(layer)
        messages = []
        try:
            _topk(model, "rank")  # a loss built from a sharded model
        except ValueError as error:
            messages.append(str(error))
        module = fully_shard(cd.loss_module(loss_fn, model))
        try:
            module(ids, 0, attention_mask=mask)
        except ValueError as error:
            messages.append(str(error))
        return {"messages": messages}

    run("fsdp2_per_layer", fsdp2_per_layer)

    def selection() -> dict[str, Any]:
        # Rank 0 holds the 8 hardest of the 16 tokens: global selection favours it.
        scores = torch.arange(8, dtype=torch.float64) + (8.0 if rank == 0 else 0.0)
        scores[3] = float("-inf")
        return {
            "exact": cd.global_select(scores, ratio=0.25, capacity_factor=4.0),
            "capped": cd.global_select(scores, ratio=0.5, capacity_factor=1.0),
            "mean": cd.global_mean(torch.tensor(float(rank + 1)), torch.tensor(rank + 1)),
            "compiled": torch.compile(lambda s: cd.global_select(s, ratio=0.25, capacity_factor=4.0),
                                      fullgraph=True)(scores),
        }

    run("selection", selection)

    def random_tokens() -> dict[str, Any]:
        model = _model()
        loss_fn = cggr_loss(model, selection="random", ratio=0.25, router_layers=1, scope="rank")
        params = {name: p.detach() for name, p in model.named_parameters()}
        return {"depth": loss_fn(params, _batch(0)[0], 3)[1].depth}  # the same tokens on every rank

    run("random", random_tokens)

    def resume() -> dict[str, Any]:
        checkpoint = str(workdir / "checkpoint")
        model, module, optimizer, router = _resume_setup(seed=0)
        params = {name: p.detach() for name, p in model.named_parameters()}
        state = State(torch.tensor(0), EMA.init(params))
        for _ in range(2):
            state, _ = _resume_step(model, module, optimizer, router, state, rank)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd, "cggr": cd.state_dict(state)}, checkpoint_id=checkpoint)
        _, uninterrupted = _resume_step(model, module, optimizer, router, state, rank)

        model, module, optimizer, router = _resume_setup(seed=1)  # other weights until loaded
        params = {name: p.detach() for name, p in model.named_parameters()}
        template = State(torch.tensor(0), EMA.init(params))
        model_sd, optim_sd = get_state_dict(module, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd, "cggr": cd.state_dict(template)}
        dcp.load(loaded, checkpoint_id=checkpoint)
        set_state_dict(module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        resumed_state = cd.load_state_dict(template, loaded["cggr"])
        # The curriculum step matters: the same weights at step 0 give other gradients.
        _, restarted = _resume_step(model, module, optimizer, router, resumed_state._replace(step=torch.tensor(0)),
                                    rank, update=False)
        _, resumed = _resume_step(model, module, optimizer, router, resumed_state, rank)
        return {"uninterrupted": uninterrupted, "resumed": resumed, "restarted": restarted,
                "step": int(resumed_state.step)}

    run("resume", resume)
    return results


def _worker(rank: int, workdir: str) -> None:
    path = Path(workdir)
    dist.init_process_group("gloo", init_method=f"file://{path / 'rendezvous'}", rank=rank, world_size=WORLD)
    try:
        results = _scenarios(rank, path)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    torch.save(results, path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("distributed")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(workdir),), nprocs=WORLD, join=True)
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _scenario(results: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    for rank, result in enumerate(results):
        assert "error" not in result[name], f"rank {rank}, scenario {name}:\n{result[name].get('error')}"
    return [result[name] for result in results]


def _assert_grads_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def _reference_global() -> dict[str, torch.Tensor]:
    """One process over the concatenated batch: the 25% hardest of all 32 tokens."""
    model = _model()
    loss_fn = _topk(model, None)
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids, mask = _concatenated()
    return torch.func.grad(lambda p: loss_fn(p, ids, 0, attention_mask=mask)[0])(params)


def _reference_rank() -> dict[str, torch.Tensor]:
    """One process over the concatenated batch, each half selecting its own 25%: the mean over all selected."""
    model = _model()
    loss_fn = _topk(model, None)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = 0.0, 0
        for rank in range(WORLD):
            ids, mask = _batch(rank)
            mean, routing = loss_fn(p, ids, 0, attention_mask=mask)
            selected = routing.weights.sum().detach()
            total, count = total + mean * selected, count + selected
        return total / count

    return torch.func.grad(loss)(params)


def test_ddp_per_rank_selection_equals_one_process(results: list[dict[str, Any]]) -> None:
    ranks = _scenario(results, "ddp_rank")
    expected = _reference_rank()
    for result in ranks:
        _assert_grads_equal(result["grads"], expected)
    # Rank 1's padding leaves it fewer selectable tokens than its capacity: the counts differ.
    assert [r["selected"] for r in ranks] == [4, 1]
    # A per-rank mean would weigh rank 1's one token like rank 0's four: not the same gradient.
    model = _model()
    loss_fn = _topk(model, None)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def per_rank_mean(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(loss_fn(p, ids, 0, attention_mask=mask)[0] for ids, mask in map(_batch, range(WORLD))) / WORLD

    per_rank_mean = torch.func.grad(per_rank_mean)(params)
    name = "lm_head.weight"
    assert not torch.allclose(per_rank_mean[name], expected[name], **TOL)


def test_ddp_global_selection_equals_one_process(results: list[dict[str, Any]]) -> None:
    ranks = _scenario(results, "ddp_global")
    expected = _reference_global()
    for result in ranks:
        _assert_grads_equal(result["grads"], expected)
    # 8 of the 32 tokens, split by difficulty, not 4 and 4.
    assert sum(r["selected"] for r in ranks) == cggr_fn.capacity(WORLD * BATCH * SEQ, ratio=0.25)
    # The mean of the ranks' loss values is the global mean loss.
    model = _model()
    ids, mask = _concatenated()
    params = {name: p.detach() for name, p in model.named_parameters()}
    global_loss = _topk(model, None)(params, ids, 0, attention_mask=mask)[0]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, global_loss, **TOL)


def test_ddp_every_parameter_gets_a_gradient(results: list[dict[str, Any]]) -> None:
    for name in ("ddp_rank", "ddp_global"):
        for result in _scenario(results, name):
            assert result["none"] == []
            assert all(g.abs().sum() > 0 for g in result["grads"].values())


def test_fsdp2_global_selection_equals_one_process(results: list[dict[str, Any]]) -> None:
    expected = _reference_global()
    for result in _scenario(results, "fsdp2_global"):
        _assert_grads_equal(result["grads"], expected)


def test_fsdp2_sharded_layers_are_refused_clearly(results: list[dict[str, Any]]) -> None:
    for result in _scenario(results, "fsdp2_per_layer"):
        assert len(result["messages"]) == 2
        assert all("fully_shard" in message and "loss_module" in message for message in result["messages"])


def test_global_select_is_exact_and_capped(results: list[dict[str, Any]]) -> None:
    ranks = _scenario(results, "selection")
    concatenated = torch.cat([torch.arange(8, dtype=torch.float64) + 8.0, torch.arange(8, dtype=torch.float64)])
    concatenated[3] = concatenated[11] = float("-inf")
    exact = cggr_fn.select(concatenated, ratio=0.25)
    assert torch.equal(torch.cat([r["exact"] for r in ranks]), exact)
    assert torch.equal(torch.cat([r["compiled"] for r in ranks]), exact)
    # ratio 0.5 picks 8 of 16, all 7 selectable of rank 0 and the hardest of rank 1; capacity_factor 1
    # caps each rank at its share (4): rank 0 keeps its 4 hardest, rank 1 its 1 chosen token.
    assert [int(r["capped"].sum()) for r in ranks] == [4, 1]
    assert ranks[0]["capped"].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert ranks[1]["capped"].nonzero().flatten().tolist() == [7]
    # global_mean: (1 + 2) summed over ranks... each rank's share: total * 2 / (1 + 2); their mean is 3 / 3.
    torch.testing.assert_close(torch.stack([r["mean"] for r in ranks]), torch.tensor([2 / 3, 4 / 3]))


def test_random_tokens_are_drawn_independently_on_each_rank(results: list[dict[str, Any]]) -> None:
    """Each rank hashes its tokens' global positions: rank 0 draws as one process does, rank 1 elsewhere."""
    ranks = _scenario(results, "random")
    model = _model()
    params = {name: p.detach() for name, p in model.named_parameters()}
    alone = cggr_loss(model, selection="random", ratio=0.25, router_layers=1)(params, _batch(0)[0], 3)[1].depth
    assert torch.equal(ranks[0]["depth"], alone)
    assert not torch.equal(ranks[1]["depth"], alone)
    assert int((ranks[1]["depth"] > 0).sum()) == int((alone > 0).sum())


def test_checkpoint_resume_gives_identical_next_step_gradients(results: list[dict[str, Any]]) -> None:
    for result in _scenario(results, "resume"):
        assert result["step"] == 2
        _assert_grads_equal(result["resumed"], result["uninterrupted"])
        name = "model.layers.0.mlp.up_proj.weight"
        assert not torch.allclose(result["restarted"][name], result["uninterrupted"][name], **TOL)


# One process: every function reduces to its local counterpart, and bad input raises naming the argument.


def test_one_process_reduces_to_local_functions() -> None:
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    scores[0, 2] = float("-inf")
    for ratio in (0.1, 0.5, torch.tensor(0.3, dtype=torch.float64)):
        assert torch.equal(cd.global_select(scores, ratio=ratio), cggr_fn.select(scores, ratio=ratio))
    total, count = torch.tensor(3.0), torch.tensor(0)
    assert cd.global_mean(total, count) == 3.0  # a count of 0 divides by 1
    model = _model()
    params = {name: p.detach() for name, p in model.named_parameters()}
    ids, mask = _batch(1)
    local = torch.func.grad(lambda p: _topk(model, None)(p, ids, 0, attention_mask=mask)[0])(params)
    for scope in ("rank", "global"):
        grads = torch.func.grad(lambda p, s=scope: _topk(model, s)(p, ids, 0, attention_mask=mask)[0])(params)
        for name in local:
            assert torch.equal(grads[name], local[name]), (scope, name)


def test_state_dict_round_trip() -> None:
    state = (State(torch.tensor(5), EMA.init({"a": torch.ones(2)})), [torch.zeros(1), 3], None)
    saved = cd.state_dict(state)
    assert saved == {"0": {"step": state[0].step, "ema": {"average": {"a": state[0].ema.average["a"]}}},
                     "1": {"0": state[1][0], "1": 3}, "2": {}}
    template = (State(torch.tensor(0), EMA.init({"a": torch.zeros(2)})), [torch.ones(1), 0], None)
    restored = cd.load_state_dict(template, saved)
    assert isinstance(restored, tuple) and isinstance(restored[0], State) and isinstance(restored[0].ema, cggr_fn.EmaState)
    assert restored[0].step == 5 and torch.equal(restored[0].ema.average["a"], torch.ones(2))
    assert isinstance(restored[1], list) and restored[1][1] == 3 and restored[2] is None


def test_bad_input() -> None:
    scores = torch.randn(8)
    with pytest.raises(TypeError, match="scores"):
        cd.global_select(scores.long(), ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        cd.global_select(scores, ratio=0.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        cd.global_select(scores, ratio=0.5, capacity_factor=0.5)
    with pytest.raises(TypeError, match="group"):
        cd.global_select(scores, ratio=0.5, group="world")
    with pytest.raises(TypeError, match="total"):
        cd.global_mean(torch.tensor(3), torch.tensor(1))
    with pytest.raises(TypeError, match="count"):
        cd.global_mean(torch.tensor(3.0), 1)
    with pytest.raises(TypeError, match="loss_fn"):
        cd.loss_module("loss", torch.nn.Linear(1, 1))
    with pytest.raises(TypeError, match="model"):
        cd.loss_module(lambda p: 0, "model")
    with pytest.raises(TypeError, match="state"):
        cd.state_dict({1: torch.ones(1)})
    with pytest.raises(ValueError, match="saved"):
        cd.load_state_dict({"a": torch.ones(1)}, {"b": torch.ones(1)})
    model = _model()
    with pytest.raises(ValueError, match="scope"):
        cggr_loss(model, scope="world")
    with pytest.raises(ValueError, match="scope"):
        cggr_loss(model, selection="buckets", scope="global")
    with pytest.raises(ValueError, match="capacity_factor"):
        cggr_loss(model, scope="global", capacity_factor=0.9)
    with pytest.raises(TypeError, match="group"):
        cggr_loss(model, scope="rank", group="world")


def test_example_trains_saves_and_resumes_under_the_other_engine(tmp_path: Path) -> None:
    """examples/distributed.py under torchrun: DDP saves at step 2, FSDP2 resumes and continues identically."""
    import json
    import subprocess
    import sys

    example = Path(__file__).resolve().parent.parent / "examples" / "distributed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--dim", "32", "--quiet",
            "--device", "cpu", "--checkpoint", str(tmp_path / "checkpoint")]

    def launch(*args: str) -> dict[str, Any]:
        out = tmp_path / f"log{len(list(tmp_path.glob('log*')))}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
                   str(example), *tiny, *args, "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(out.read_text())

    first = launch("--engine", "ddp", "--save-at", "2")
    resumed = launch("--engine", "fsdp2", "--resume")
    assert [s["step"] for s in first["steps"]] == [0, 1, 2] and [s["step"] for s in resumed["steps"]] == [2]
    assert first["world"] == resumed["world"] == WORLD
    assert resumed["steps"][0]["trained_tokens"] == cggr_fn.capacity(2 * 32, ratio=0.25) * WORLD
    assert resumed["steps"][0]["loss"] == pytest.approx(first["steps"][2]["loss"], rel=1e-5)
    assert resumed["steps"][0]["loss"] != pytest.approx(first["steps"][0]["loss"], rel=1e-3)


def test_bench_distributed_arguments_and_scaling() -> None:
    """The benchmark's options and its scaling efficiency (the runs themselves need torchrun; README)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_distributed

    args = bench_distributed.parse_args(["--out", "x.json"])
    assert args.model == "1b" and args.engines == ["ddp", "fsdp2"] and args.modes == ["dense", "selective_0.25"]
    assert args.compile and bench_distributed.MODELS["1b"]["batch"] == (8, 2048)
    for bad in (["--modes", "selective_0"], ["--modes", "sparse"], ["--iters", "0"]):
        with pytest.raises(SystemExit):
            bench_distributed.parse_args(["--out", "x.json", *bad])
    row = dict(model="1b", engine="ddp", mode="dense", device="cuda", compiled=True)
    rows = bench_distributed.with_scaling([{**row, "gpus": 1, "tokens_per_s": 100.0},
                                           {**row, "gpus": 2, "tokens_per_s": 180.0},
                                           {**row, "engine": "fsdp2", "gpus": 2, "tokens_per_s": 150.0}])
    assert [r["scaling_efficiency"] for r in rows] == [1.0, 0.9, None]
