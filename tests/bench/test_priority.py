"""The priorities bench/priority.py sends: a call's critical path and each run's rank by size."""

from __future__ import annotations

import pytest

from bench.priority import STEP, critical_paths, priorities
from bench.workloads import Call, Instance


def call(key: str, tokens: int, after: tuple[str, ...] = (), gap: float = 0.0) -> Call:
    return Call(key, [{"role": "user", "content": key * 100}], tokens, after, gap)


def fan_out() -> Instance:
    """a, then b and c (c with a long tool gap before it), then d reading both."""
    return Instance("fan", "shape", [call("a", 100), call("b", 50, ("a",)),
                                     call("c", 40, ("a",), gap=5.0), call("d", 100, ("b", "c"))])


def test_a_call_s_critical_path_follows_its_longest_chain_of_dependents():
    paths = critical_paths(fan_out())
    assert paths["d"] == pytest.approx(100 * STEP)
    assert paths["c"] == pytest.approx(40 * STEP + paths["d"])
    assert paths["b"] == pytest.approx(50 * STEP + paths["d"])
    # Through c: its 5 s tool gap outweighs b's longer output.
    assert paths["a"] == pytest.approx(100 * STEP + 5.0 + paths["c"])


def test_the_smaller_run_goes_first_and_its_critical_calls_first_within_it():
    big = Instance("big", "loop", [call("x", 900), call("y", 900, ("x",), gap=30.0)])
    small = fan_out()
    chosen = priorities([big, small])
    assert chosen["default"] is None
    both = chosen["smallest first + critical path"]
    level = {(i.name, c.key): both(i, c) for i in (big, small) for c in i.calls}
    assert max(level[("fan", k)] for k in "abcd") < min(level[("big", k)] for k in "xy")
    assert level[("fan", "a")] < level[("fan", "c")] < level[("fan", "d")]
    critical = chosen["critical path"]
    assert critical(big, big.calls[0]) < critical(small, small.calls[0])
