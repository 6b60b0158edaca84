"""The engine's recent load: how many admitted calls ran on it at once, on average, and the
share of the time any call ran, over the last BUSY_WINDOW seconds.

Admission tells the meter each time the calls it let in change (`changed`), and asks it
whether the engine is busy or has throughput to spare. The meter keeps no clock of its own:
every method is given the time.
"""

from __future__ import annotations

import bisect
from collections import deque

BUSY_WINDOW = 20.0
"""Seconds of the engine's history that its load and busy share are taken over."""


class LoadMeter:
    def __init__(self, now: float) -> None:
        self.entries: deque[tuple[float, float, float, int]] = deque([(now, 0.0, 0.0, 0)])
        """(when, call-seconds and busy seconds on the engine until then, calls in flight
        from then on): its average load and busy share over a window are each the
        difference of two totals (`mean`, `busy_share`)."""
        self.occupied_since: float | None = None
        """When the resident set last went from empty to not (None while it is empty): the
        load and busy share are taken over no more than the time since."""

    def __len__(self) -> int:
        """Entries kept: those in the window, and the last one before it."""
        return len(self.entries)

    def changed(self, now: float, running: int) -> None:
        """`running` admitted calls run on the engine from `now` on."""
        self.entries.append((now, *self.totals(now), running))

    def totals(self, at: float) -> tuple[float, float]:
        """Call-seconds and busy seconds (any call running) on the engine until `at` (no
        earlier than the window kept)."""
        load = self.entries
        while len(load) > 1 and load[1][0] <= at - BUSY_WINDOW:
            load.popleft()  # (the first kept is before the window: the totals at its start)
        if at >= load[-1][0]:  # now (on every call's start and end): the latest entry
            when, calls, busy, running = load[-1]
        else:
            i = bisect.bisect_right(load, at, key=lambda e: e[0]) - 1
            when, calls, busy, running = load[max(0, i)]
        dt = max(0.0, at - when)
        return calls + running * dt, busy + (dt if running else 0.0)

    def mean(self, now: float, least: float) -> float | None:
        """Admitted calls in flight, on average over the last BUSY_WINDOW seconds (or since
        the resident set was last empty, where that is shorter); None before `least`
        seconds of it."""
        if self.occupied_since is None:
            return None
        span = min(BUSY_WINDOW, now - self.occupied_since)
        if span < least:
            return None
        return (self.totals(now)[0] - self.totals(now - span)[0]) / span

    def busy_share(self, now: float) -> float:
        """Share of the last BUSY_WINDOW seconds with at least one admitted call running;
        of the time since the resident set was last empty, where that is shorter: work that
        arrives after a quiet spell (a process just started, a lull between bursts) is not
        let in over the cache for the quiet before it. (Counted over the quiet, a burst
        after learning took sessions in as "idle" 2 s into it, ten sessions in a cache for
        seven: agent loops at 2x pressure 38.7 s at the median against 22.9 s.)"""
        if self.occupied_since is None:
            return 0.0
        span = min(BUSY_WINDOW, now - self.occupied_since)
        if span <= 0:
            return 1.0
        return (self.totals(now)[1] - self.totals(now - span)[1]) / span
