"""The quality suite (benchmarks/quality.py) runs end to end on a tiny configuration, and its summary is right."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality  # noqa: E402

TINY = ["--corpus", "sample", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--dim", "32", "--layers", "2",
        "--heads", "2", "--eval-every", "2", "--val-windows", "4", "--reference-layers", "1"]


def test_every_mode_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    report = quality.main([*TINY, "--seeds", "0,1", "--ratios", "0.25,0.5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert not out.with_name(out.name + ".partial").exists()  # written run by run, removed once the report is
    assert saved["summary"] == report["summary"] and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    rows = saved["rows"]
    # dense and buckets_4 once per seed; every other mode once per (seed, ratio).
    expected = 2 * (2 + 2 * (len(quality.MODES) - 2))
    assert len(rows) == expected
    for row in rows:
        assert math.isfinite(row["final_val_loss"]) and row["wall_clock_s"] > 0, row["mode"]
        assert [point[0] for point in row["curve"]] == [2, 4]
        if row["mode"] in quality.NEEDS_REFERENCE:
            assert row["reference_s"] > 0 and math.isfinite(row["reference_val_loss"])
        else:
            assert row["reference_s"] == 0 and row["reference_val_loss"] is None
    summary = {(r["mode"], r["ratio"]): r for r in saved["summary"]}
    assert summary[("excess", 0.25)]["seeds"] == 2 and "vs_random_token_in_stderr" in summary[("excess", 0.25)]
    assert summary[("dense", 1.0)]["time_to_dense_final_s"] is not None
    assert "reference_val_loss_mean" in summary[("excess", 0.25)] and "reference_val_loss_mean" not in summary[("dense", 1.0)]
    # The plot can be redrawn from the JSON alone.
    out.with_suffix(".png").unlink()
    assert quality.main(["--replot", "--out", str(out)])["rows"] == rows
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_equal_wall_clock_reruns_fit_dense_time(tmp_path: Path) -> None:
    report = quality.main([*TINY, "--modes", "dense,random_token,excess", "--steps", "6", "--eval-every", "3",
                           "--equal-wall-clock", "--out", str(tmp_path / "q.json")])
    rows = {(r["budget"], r["mode"]): r for r in report["rows"]}
    dense = rows[("steps", "dense")]
    for mode in ("random_token", "excess"):
        first = rows[("steps", mode)]
        # As many steps as dense's wall-clock holds at the mode's own step time (its reference included);
        # none when the reference alone takes longer.
        expected = int((dense["wall_clock_s"] - first["reference_s"]) / (first["step_ms_median"] / 1e3))
        if expected < 1:
            assert ("wall_clock", mode) not in rows
            continue
        rerun = rows[("wall_clock", mode)]
        assert rerun["steps"] == expected and rerun["curve"][-1][0] == expected
    assert ("wall_clock", "random_token") in rows and {r["budget"] for r in report["summary"]} == {"steps", "wall_clock"}


def test_the_first_mode_and_the_control_start_from_the_same_model(tmp_path: Path) -> None:
    """Same init and data: after the same number of steps at the same ratio, random tokens and
    topk differ, but two runs of one mode are identical (the suite is reproducible)."""
    args = [*TINY, "--modes", "random_token,topk_loss", "--out", str(tmp_path / "a.json")]
    first = quality.main(args)["rows"]
    second = quality.main([*args[:-1], str(tmp_path / "b.json")])["rows"]
    assert [r["final_val_loss"] for r in first] == [r["final_val_loss"] for r in second]
    assert first[0]["final_val_loss"] != first[1]["final_val_loss"]


def test_finished_runs_are_on_disk_before_the_suite_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "q.json"
    seen: list[int] = []
    original = quality.train_mode

    def train_then_look(*args, **kwargs):  # noqa: ANN002, ANN003
        partial = out.with_name(out.name + ".partial")
        seen.append(len(json.loads(partial.read_text())["rows"]) if partial.exists() else 0)
        return original(*args, **kwargs)

    monkeypatch.setattr(quality, "train_mode", train_then_look)
    report = quality.main([*TINY, "--modes", "dense,random_token,topk_loss", "--out", str(out)])
    assert seen == [0, 1, 2]
    # A suite cut short is reported from its partial file.
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps({"environment": report["environment"], "config": report["config"],
                                   "rows": report["rows"][:2]}))
    out.unlink()
    rebuilt = quality.main(["--replot", "--out", str(out)])
    assert rebuilt["rows"] == report["rows"][:2] and {r["mode"] for r in rebuilt["summary"]} == {"dense", "random_token"}
    assert json.loads(out.read_text())["summary"] == rebuilt["summary"]


def test_a_resumed_suite_trains_only_the_missing_runs_and_matches_one_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modes = ["--modes", "dense,random_token,excess"]
    whole = quality.main([*TINY, *modes, "--out", str(tmp_path / "whole.json")])["rows"]
    out = tmp_path / "resumed.json"
    first = quality.main([*TINY, "--modes", "dense", "--out", str(out)])["rows"]
    trained: list[str] = []
    original = quality.train_mode

    def counted(mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        trained.append(mode)
        return original(mode, *args, **kwargs)

    monkeypatch.setattr(quality, "train_mode", counted)
    resumed = quality.main([*TINY, *modes, "--resume", "--out", str(out)])["rows"]
    assert trained == ["random_token", "excess"]
    assert resumed[0] == first[0]  # kept as saved, its wall-clock included
    assert [r["final_val_loss"] for r in resumed] == [r["final_val_loss"] for r in whole]
    with pytest.raises(SystemExit, match="configured differently: reference_steps, steps"):
        quality.main([*TINY, *modes, "--steps", "6", "--resume", "--out", str(out)])
    with pytest.raises(SystemExit, match="--resume: neither"):
        quality.main([*TINY, "--resume", "--out", str(tmp_path / "never.json")])


def test_a_token_file_trains_exactly_like_the_corpus_it_was_written_from(tmp_path: Path) -> None:
    tokens = tmp_path / "sample_tokens.pt"
    assert quality.main([*TINY, "--write-tokens", str(tokens), "--out", str(tmp_path / "unused.json")]) == {
        "tokens": str(tokens)}
    assert not (tmp_path / "unused.json").exists()
    args = [*TINY, "--modes", "dense,random_token"]
    direct = quality.main([*args, "--out", str(tmp_path / "a.json")])["rows"]
    cached = quality.main([*args, "--tokens", str(tokens), "--out", str(tmp_path / "b.json")])["rows"]
    assert [r["final_val_loss"] for r in cached] == [r["final_val_loss"] for r in direct]
    described = json.loads((tmp_path / "b.json").read_text())["config"]["corpus_description"]["pretrain"]
    assert "embedded sample" in described and "held out" in described and "sample_tokens.pt" in described
    with pytest.raises(SystemExit, match="--replot: neither"):
        quality.main(["--replot", "--out", str(tmp_path / "never.json")])
    with pytest.raises(SystemExit, match="holds pretrain tokens, not finetune's"):
        quality.load_tokens(tokens, "finetune", None)
    with pytest.raises(SystemExit, match="vocabulary of 256, the model has 49152"):
        quality.load_tokens(tokens, "pretrain", 49152)


def _run(mode: str, ratio: float, seed: int, val: float, curve: list[tuple[int, float, float]]) -> quality.Run:
    return quality.Run("pretrain", "steps", mode, ratio, seed, val, curve[-1][1], curve[-1][0], 1.0, 0.0, curve)


def test_compiled_runs_of_a_suite_do_not_pile_up_against_the_recompile_limit(tmp_path: Path) -> None:
    # Every CGGR mode runs the same code (a cggr_loss call) configured differently: without a reset per run, a
    # second mode is a recompile, and at a limit of 1 fullgraph=True refuses it (at the default 8, a full suite's
    # ninth mode).
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1):  # the config's own patch: it restores aliases too
        report = quality.main([*TINY, "--steps", "2", "--modes", "random_token,topk_loss", "--compile",
                               "--out", str(tmp_path / "q.json")])
    assert [r["mode"] for r in report["rows"]] == ["random_token", "topk_loss"]


def test_the_clock_charges_the_first_step_at_the_seconds_time() -> None:
    assert quality.charged_seconds([9.0, 1.0, 2.0]) == 4.0  # compilation in the first step is not charged
    assert quality.charged_seconds([3.0]) == 3.0 and quality.charged_seconds([]) == 0


def test_summary_statistics() -> None:
    runs = [
        _run("dense", 1.0, 0, 2.0, [(1, 1.0, 3.0), (2, 2.0, 2.0)]),
        _run("dense", 1.0, 1, 2.2, [(1, 1.0, 3.0), (2, 2.0, 2.2)]),
        _run("random_token", 0.25, 0, 2.6, [(1, 0.5, 3.0), (2, 1.0, 2.6)]),
        _run("random_token", 0.25, 1, 2.8, [(1, 0.5, 3.0), (2, 1.0, 2.8)]),
        _run("excess", 0.25, 0, 2.0, [(1, 0.5, 2.5), (2, 1.0, 2.0)]),
        _run("excess", 0.25, 1, 2.2, [(1, 0.5, 2.5), (2, 1.0, 2.2)]),
    ]
    rows = {r["mode"]: r for r in quality.summarise(runs)}
    assert rows["dense"]["final_val_loss_mean"] == pytest.approx(2.1)
    assert rows["dense"]["final_val_loss_stderr"] == pytest.approx(0.1)
    assert rows["excess"]["vs_random_token"] == pytest.approx(-0.6)
    assert rows["excess"]["vs_random_token_in_stderr"] == pytest.approx(-0.6 / math.sqrt(0.02), rel=1e-3)
    # Time to dense's final loss (2.1) on the mean curves: excess reaches it at 1.0 s, dense at its
    # end (2.0 s), random tokens never.
    assert rows["excess"]["time_to_dense_final_s"] == 1.0
    assert rows["dense"]["time_to_dense_final_s"] == 2.0
    assert rows["random_token"]["time_to_dense_final_s"] is None


def test_the_margin_over_random_tokens_pairs_the_seeds() -> None:
    # A suite cut short: random tokens have seeds 0 and 1, excess only seed 0.
    runs = [_run("random_token", 0.25, 0, 2.6, [(1, 0.5, 2.6)]), _run("random_token", 0.25, 1, 2.0, [(1, 0.5, 2.0)]),
            _run("excess", 0.25, 0, 2.5, [(1, 0.5, 2.5)])]
    row = {r["mode"]: r for r in quality.summarise(runs)}["excess"]
    assert row["vs_random_token"] == pytest.approx(-0.1)  # against seed 0's 2.6, not the mean 2.3
    assert row["vs_random_token_seeds"] == 1 and row["vs_random_token_in_stderr"] is None


@pytest.mark.parametrize("argv, message", [
    (["--modes", "dense,nope"], "--modes: expected names from"),
    (["--ratios", "0"], "--ratios: expected values in (0, 1]"),
    (["--settings", "rl"], "--settings: expected pretrain and/or finetune"),
    (["--settings", "pretrain,finetune", "--tokens", "t.pt"], "a token file holds one setting's tokens"),
    (["--tokens", "t.pt", "--write-tokens", "u.pt"], "give one of them"),
    (["--reference-steps", "0"], "--reference-steps: expected a positive count (0 only for finetune)"),
    (["--settings", "finetune", "--reference-steps", "-1"], "--reference-steps: expected a positive count"),
])
def test_bad_options_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quality.main([*argv, "--out", "/tmp/unused.json"])
    assert message in capsys.readouterr().err


class _ByteTokenizer:
    """Stands in for a GGUF model's tokenizer: bytes, so a tiny random model can play the pretrained one."""

    def __len__(self) -> int:
        return 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}


def test_finetune_reference_is_the_pretrained_model_tuned_on_other_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def tiny_pretrained(path: str):  # noqa: ANN202
        torch.manual_seed(123)
        return quality.small_llama(256, quality.parse_args([*TINY, "--out", "unused"]), 2), _ByteTokenizer()

    monkeypatch.setattr(quality, "load_gguf", tiny_pretrained)
    args = [*TINY, "--settings", "finetune", "--gguf", "model.gguf", "--modes", "dense,excess"]
    tuned = quality.main([*args, "--out", str(tmp_path / "tuned.json")])["rows"]
    as_is = quality.main([*args, "--reference-steps", "0", "--out", str(tmp_path / "as_is.json")])["rows"]
    assert [r["mode"] for r in tuned] == ["dense", "excess"]
    assert tuned[1]["reference_s"] > 0 and as_is[1]["reference_s"] == 0  # only training is charged
    # Tuning the reference leaves the pretrained model alone (dense is the same), and changes what excess picks.
    assert tuned[0]["final_val_loss"] == as_is[0]["final_val_loss"]
    assert tuned[1]["final_val_loss"] != as_is[1]["final_val_loss"]
    assert tuned[1]["reference_val_loss"] < as_is[1]["reference_val_loss"]  # tuned on the text it is scored on
