"""Least work left first: the order in which admission lets in the calls of workflow runs
of different sizes (`Admission`'s `ordering`; `engine.runs` tells a call's workflow run, its
expected size and the work it is expected to have left on arrival).

With `running` calls in flight, a call of a run whose work left is SIZE_RATIO times the
expected size of another run under way waits for it, at most `order_wait`; waiting calls go
least work left first, by size class. Runs of about one size are never held, so sessions of
one agent keep the order admission gives them.

A run is held by what it has left, so a run near its end is not held for runs just begun.
Judged by its size (and that taken from the runs of all kinds, until two of its own had
ended: `engine.runs.MIN_KIND`), a debate's judge, its run's last call, looked like a
trading desk's, waited 12.8 s for workflows begun after it, and the debate ended at
0.62-0.74x of its time sent direct (generated workflows with distinct answers,
bench/results/e2e-ordering-left.md). The runs it waits for are weighed by their size, not
by what they have left: weighed by what they had left, runs about to end held every other
run through their last tool time, which cost more than it gave (1.03x and 0.94x of direct
on the median, one run of two repeats).

These are plain functions of the runs: `Admission` says when they apply.
"""

from __future__ import annotations

import heapq
import math

from engine.runs import FLOOR, Run, Runs
from engine.tickets import Ticket

SIZE_RATIO = 2.0
"""With the engine loaded, a workflow run with this many times the work left of another run
under way's expected size waits for it (runs of about one size share the engine as they
come)."""


def size_class(size: float | None) -> int:
    """0 for unknown and small sizes, then one more per factor of SIZE_RATIO."""
    if not size or size <= FLOOR:
        return 0
    return int(math.log(size / FLOOR, SIZE_RATIO)) + 1


def run_and_left(runs: Runs, t: Ticket) -> tuple[Run | None, float | None]:
    """The call's run (None for a call in none) and the work it is expected to have left
    (None unknown)."""
    run = runs.get(t.run) if t.run else None
    return run, (runs.expected_left(run) if run is not None else None)


def order_key(runs: Runs, t: Ticket) -> tuple[int, int]:
    """Runs with less work left first, by size class (a factor of SIZE_RATIO apart); within
    a class, as they came."""
    return (size_class(run_and_left(runs, t)[1]), t._seq)


def smallest_runs(runs: Runs, now: float, gap: float) -> list[tuple[float, str]]:
    """The two smallest expected sizes among runs under way (a call pending, or within
    their tool time, `gap`), with their runs."""
    sizes = []
    for run in runs.active():
        if run.pending or now - run.last < gap:
            size = runs.expected_size(run)
            if size is not None:
                sizes.append((size, run.id))
    return heapq.nsmallest(2, sizes)


def larger_than(run: Run, size: float, smallest: list[tuple[float, str]]) -> bool:
    """Another run under way (of the `smallest`) is expected to be at most 1/SIZE_RATIO of
    `size`, the work `run` has left (`smallest_runs`: expected sizes)."""
    for other, rid in smallest:
        if rid != run.id:
            return other * SIZE_RATIO <= size
    return False


def tool_time_ends(runs: Runs, now: float, gap: float) -> list[float]:
    """When runs between calls pass their tool time (`gap`) and larger runs may go."""
    return [r.last + gap for r in runs.active() if not r.pending and r.last + gap > now]
