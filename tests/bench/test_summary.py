"""Several end-to-end reports in one table: each run's ratio against its own turn's direct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.summary import collect, render

ROOT = Path(__file__).resolve().parents[2]


def mode(e2e: float, makespan: float, runs: tuple[list[float], list[float]] | None = None) -> dict:
    out = {"e2e_p50": e2e, "makespan": makespan}
    if runs:
        out["runs"] = {"e2e_p50": runs[0], "makespan": runs[1]}
    return out


def write(path: Path, results: dict) -> Path:
    path.with_suffix(".json").write_text(json.dumps(results))
    path.write_text("# a report\n")
    return path


def test_runs_of_several_reports_are_paired_with_their_own_direct(tmp_path):
    one = write(tmp_path / "one.md", {"loops": {
        "direct": mode(30.0, 40.0), "preheat-on": mode(20.0, 50.0),
        "unpressured": mode(15.0, 20.0)}})
    # A repeated report: each run against the direct run of its own turn, not the medians
    two = write(tmp_path / "two.md", {"loops": {
        "direct": mode(25.0, 40.0, ([20.0, 30.0], [40.0, 40.0])),
        "preheat-on": mode(15.0, 40.0, ([10.0, 20.0], [40.0, 40.0]))},
        "one agent": {"direct": mode(10.0, 30.0), "oracle": mode(9.0, 29.0)}})
    table = collect([one, two])
    assert table["loops"]["direct / on"] == [1.5, 2.0, 1.5]
    assert table["loops"]["makespan"] == [0.8, 1.0, 1.0]
    assert table["loops"]["direct / unpressured"] == [2.0]
    assert table["loops"]["direct / off"] == []
    assert table["one agent"]["direct / on"] == []
    text = render(table, [one, two])
    assert "| loops | 3 | 1.50x (1.50-2.00x) | 1.00x (0.80-1.00x) |  | 2.00x |  |" in text
    assert "| one agent | 0 |  |  |  |  | 1.11x |" in text


def test_a_report_without_its_json_is_refused_before_anything_is_read(tmp_path):
    report = tmp_path / "lone.md"
    report.write_text("# a report\n")
    run = subprocess.run([sys.executable, str(ROOT / "bench/summary.py"), str(report)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "no .json beside" in run.stderr
