"""bench/engine_env.py's report: medians over the repeats, ratios to the first variant with
"better" the right way round for times and for rates."""

from bench.engine_env import METRICS, report


def _run(scale: float) -> dict[str, float]:
    return {m: (10.0 * scale if higher else 2.0 / scale) for m, higher in METRICS}


def test_report_ratios_are_better_above_one_for_times_and_rates():
    runs = {"default": [_run(1.0), _run(1.0), _run(0.5)],
            "faster": [_run(2.0), _run(2.0), _run(4.0)]}
    text = report(runs, 3)
    rows = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| ")}
    assert "--repeat 3" in text
    assert rows["default"].count("(1.00x)") == len(METRICS)
    # The median run of "faster" is twice as good on every figure: half the seconds, twice the rate.
    assert rows["faster"].count("(2.00x)") == len(METRICS)
    assert "| 1.00 (2.00x)" in rows["faster"] and "| 20.00 (2.00x)" in rows["faster"]
