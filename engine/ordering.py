"""Smallest workflow run first: the order in which admission lets in the calls of workflow
runs of different sizes (`Admission`'s `ordering`; `engine.runs` tells a call's workflow run
and its expected size on arrival).

Workflows sharing the engine are served smallest first: with `running` calls in flight, a
call of a run expected to be SIZE_RATIO times the size of another run under way waits for
it, at most `order_wait`; waiting calls go smaller size class first. Runs of about one size
are never held, so sessions of one agent keep the order admission gives them.

These are plain functions of the runs: `Admission` says when they apply.
"""

from __future__ import annotations

import heapq
import math

from engine.runs import FLOOR, Run, Runs
from engine.tickets import Ticket

SIZE_RATIO = 2.0
"""With the engine loaded, a workflow run expected to be this many times the size of another
run under way waits for it (runs of about one size share the engine as they come)."""


def size_class(size: float | None) -> int:
    """0 for unknown and small sizes, then one more per factor of SIZE_RATIO."""
    if not size or size <= FLOOR:
        return 0
    return int(math.log(size / FLOOR, SIZE_RATIO)) + 1


def run_of(runs: Runs, t: Ticket) -> tuple[Run | None, float | None]:
    """The call's run (None for a call in none) and the run's expected size (None unknown)."""
    run = runs.get(t.run) if t.run else None
    return run, (runs.expected_size(run) if run is not None else None)


def order_key(runs: Runs, t: Ticket) -> tuple[int, int]:
    """Smaller runs first, by size class (a factor of SIZE_RATIO apart); within a class,
    as they came."""
    return (size_class(run_of(runs, t)[1]), t._seq)


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
    `size`, the expected size of `run`."""
    for other, rid in smallest:
        if rid != run.id:
            return other * SIZE_RATIO <= size
    return False


def tool_time_ends(runs: Runs, now: float, gap: float) -> list[float]:
    """When runs between calls pass their tool time (`gap`) and larger runs may go."""
    return [r.last + gap for r in runs.active() if not r.pending and r.last + gap > now]
