"""The end-to-end report: figures of repeated runs are medians, and the runs are shown."""

from __future__ import annotations

from argparse import Namespace

from bench.e2e import _median_row, report


def row(e2e: float, makespan: float, calls: int = 10) -> dict:
    return {"e2e_p50": e2e, "e2e_p90": e2e * 1.5, "makespan": makespan, "ttft_p50": 0.1,
            "ttft_p90": 0.2, "cached_share": 0.5, "calls": calls, "prompt_tokens": 1000,
            "working_set": 2001}


def test_repeated_runs_report_their_median_and_every_run():
    direct = _median_row([row(40.0, 50.0), row(44.0, 52.0), row(42.0, 70.0)])
    on = _median_row([row(20.0, 49.0), row(30.0, 51.0)])
    assert direct["e2e_p50"] == 42.0 and direct["makespan"] == 52.0
    assert on["e2e_p50"] == 25.0 and on["runs"]["e2e_p50"] == [20.0, 30.0]
    text = report({"loops": {"direct": direct, "preheat-on": on}},
                  Namespace(idle=3.0), "an engine")
    assert "| loops | direct | 42.00 | 63.00 | 52.00 |" in text
    assert "| loops | direct | 40.0 / 44.0 / 42.0 | 60.0 / 66.0 / 63.0 | 50.0 / 52.0 / 70.0 |  |" in text
    assert "| loops | preheat-on | 20.0 / 30.0 | 30.0 / 45.0 | 49.0 / 51.0 | 2.00x / 1.47x |" in text
    # Ratios without the modes left out (--modes direct preheat-on)
    assert "| loops | 1.68x | 1.04x | - | - | - |" in text


def test_a_single_run_is_reported_as_it_was():
    only = row(40.0, 50.0)
    assert _median_row([only]) is only
    assert "the runs themselves" not in report({"loops": {"direct": only}}, Namespace(idle=3.0), "x")
