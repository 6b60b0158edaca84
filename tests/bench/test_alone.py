"""bench/alone.py's report: each instance's time together, alone, and the ratio."""

from bench.alone import report
from bench.workloads import Instance


def test_report_gives_each_instance_together_over_alone():
    instances = [Instance("desk-0", "desk", [], 0.0), Instance("debate-0", "debate", [], 3.0)]
    together = {"instances": {"desk-0": 70.0, "debate-0": 30.0}, "makespan": 70.0}
    text = report(together, {"desk-0": 56.0, "debate-0": 10.0}, instances)
    assert "| desk-0 | 0 | 0 | 70.00 | 56.00 | 1.25x |" in text
    assert "| debate-0 | 3 | 0 | 30.00 | 10.00 | 3.00x |" in text
    assert "together 50.00 s, alone 33.00 s; makespan together 70.00 s" in text
