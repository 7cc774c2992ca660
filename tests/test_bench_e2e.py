"""benchmarks/bench_e2e.py's bookkeeping, on the CPU: speedups against the fastest dense row, merging cut-short runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_e2e.py"


def _run(model: str, rows: list[tuple[str, float, float]]) -> dict:
    return {"environment": {"device": "test"}, "run": {"model": model, "rows": [
        {"model": model, "mode": mode, "median_step_ms": ms, "flop_model_speedup": bound} for mode, ms, bound in rows]}}


def test_merge_derives_speedups_of_a_cut_short_run_and_marks_it(tmp_path: Path) -> None:
    finished = tmp_path / "e2e_1b.json"
    cut_short = tmp_path / "e2e_135m.json.partial"
    finished.write_text(json.dumps(_run("1b", [])))
    cut_short.write_text(json.dumps(_run("135m", [("dense_eager", 50.0, 1.0), ("dense_ce_causal", 20.0, 1.0),
                                                  ("dense_ce", 25.0, 1.0), ("selective_0.25", 16.0, 2.0)])))
    out = tmp_path / "e2e.json"
    subprocess.run([sys.executable, str(BENCH), "--merge", str(cut_short), str(finished), "--out", str(out)],
                   check=True, capture_output=True)
    merged = json.loads(out.read_text())
    assert [run.get("cut_short", False) for run in merged["runs"]] == [True, False]
    assert merged["runs"][0]["dense_baseline_ms"] == 20.0  # the fastest compiled dense row, not eager
    by_mode = {row["mode"]: row for row in merged["rows"]}
    assert by_mode["selective_0.25"]["speedup_vs_dense"] == 1.25
    assert by_mode["selective_0.25"]["flop_model_efficiency"] == 0.625
    assert by_mode["dense_eager"]["speedup_vs_dense"] == 0.4
