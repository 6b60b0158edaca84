"""What admission learns of agents' sessions, and keeps across restarts.

Per agent (a session's kind: its prompt's first item), how large its finished sessions grew
(their own tokens) and how many calls they made; the tool time between a session's calls;
and characters per token. Admission reserves room for a session's growth by these, holds a
session between calls for its tool time, and releases a session that has made its last call.

What it learned (`snapshot()`: sizes and lengths of finished sessions by agent, tool gaps,
characters per token; `Admission.snapshot()` adds workflow run sizes) is saved by the proxy
with the learner's snapshot and `restore()`d at start: a restart does not begin from nothing.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from typing import Any, Iterable

from engine.runs import put_first
from engine.tickets import Group

CHARS_PER_TOKEN = 3.6
CHARS_PER_TOKEN_RANGE = (0.5, 20.0)
"""What a call's characters per token may say: prompts of any text there is, JSON-escaped. A
call past it (a prompt of one character repeated, by a client or a test) counts as at the
bound, so no one client's odd prompts move every client's estimates without bound."""
PROFILE_WINDOW = 200
PROFILE_MIN_SESSIONS = 3
SNAPSHOT_VERSION = 1
SNAPSHOT_GAPS = 500
"""Tool gaps a snapshot keeps (evenly spaced through the sorted ones: their distribution)."""
DONE_BEYOND = 0.1
"""A session is taken as done when fewer than this share of finished sessions made more calls."""
GAPS_TRUSTED = 20
"""Tool gaps seen before their p90 alone sets how long idle sessions are held."""

Finished = tuple[int, int, str]
"""A finished session's largest own-token count, calls, and kind."""


class Footprints:
    """Not thread-safe (the proxy's event loop only)."""

    def __init__(self) -> None:
        self.chars_per_token = CHARS_PER_TOKEN
        self.profiles: OrderedDict[str, list[int]] = OrderedDict()
        """[largest own-token count, calls] of each recent session, kept up to date."""
        self.finished: OrderedDict[str, Finished] = OrderedDict()
        """The same with the session's kind, taken when a session left the cache (again if
        it came back): what a new session of that kind is expected to grow to (admitting it
        leaves room for its later calls), how many calls it makes, and when it is done.
        Sessions under way are not counted: their sizes so far would make all look small."""
        self.leaving: OrderedDict[str, tuple[float, Finished]] = OrderedDict()
        """Sessions that left the cache, with when they count as finished (their profile
        then goes to `finished`) unless they come back first: a session whose tool call
        outlasts its hold is under way, not finished, and taking it for a finished one
        before any has finished makes its agent look one call long."""
        self.leaving_due = math.inf
        """No session in `leaving` is due before this (`expire` looks no further until then)."""
        self.by_kind: dict[str | None, tuple[list[int], int, int]] = {}
        """Per kind: what `learned` found, until the next session finishes."""
        self.changes = 0
        """Times `by_kind` was forgotten: a session's hold may change with it."""
        self.gaps: list[float] = []
        """Tool gaps seen (from a session's answer to its next call), sorted."""

    # -- what is expected of a session ------------------------------------------------------

    def learned(self, kind: str | None) -> tuple[list[int], int, int]:
        """The calls each finished session of the kind made, sorted (from the first one:
        other agents' sessions say little of this one's, as a debater's three calls and a
        support agent's six; all kinds' where none of the kind finished and at least
        PROFILE_MIN_SESSIONS did), and the upper quartiles of their footprints and calls.
        Remembered until the next session finishes: admission asks for them per resident
        group on every decision (`done` counts in the sorted calls by bisection: summing
        over 200 finished sessions per resident group took 17 ms a call at 1,200 resident)."""
        found = self.by_kind.get(kind)
        if found is None:
            finished = list(self.finished.values())
            same = [p for p in finished if p[2] == kind]
            if same:
                finished = same
            elif len(finished) < PROFILE_MIN_SESSIONS:
                finished = []
            calls_made = sorted(p[1] for p in finished)
            footprint = calls = 0
            if finished:
                at = int(0.75 * (len(finished) - 1))
                footprint = sorted(p[0] for p in finished)[at]
                calls = calls_made[at]
            found = self.by_kind[kind] = (calls_made, footprint, calls)
        return found

    def done(self, kind: str, calls: int) -> bool:
        """Nearly every finished session of the kind stopped within `calls` calls.
        (One that does come back is a session under way again: it goes before new ones.)"""
        calls_made = self.learned(kind)[0]
        if not calls_made:
            return False
        more = len(calls_made) - bisect.bisect_right(calls_made, calls)
        return more < DONE_BEYOND * len(calls_made)

    def gap_p90(self, hold: float) -> float:
        """The tool time to hold an idle session for: p90 of the gaps seen, x1.2. Until
        GAPS_TRUSTED gaps are seen, never below `hold`: the first gaps to end are the short
        ones (the long ones are still going on), so the first few say gaps are shorter
        than they are."""
        if len(self.gaps) < 5:
            return hold
        p90 = self.gaps[int(0.9 * (len(self.gaps) - 1))] * 1.2
        return p90 if len(self.gaps) >= GAPS_TRUSTED else max(p90, hold)

    def calls_made(self, session: str) -> int:
        """Calls the session has made (0 for one not seen lately)."""
        profile = self.profiles.get(session)
        return profile[1] if profile is not None else 0

    # -- what is learned, as sessions come and go --------------------------------------------

    def measured(self, session: str, own_tokens: int, calls: int) -> None:
        """The session's own tokens and calls now (its profile keeps the largest)."""
        profile = self.profiles.get(session)
        if profile is None:
            profile = self.profiles[session] = [0, 0]
            while len(self.profiles) > PROFILE_WINDOW:
                self.profiles.popitem(last=False)
        profile[0] = max(profile[0], own_tokens)
        profile[1] = max(profile[1], calls)

    def refused(self, session: str) -> None:
        """The engine kept nothing of the session's first call: it says nothing of how large
        its agent's sessions grow."""
        self.profiles.pop(session, None)

    def tool_gap(self, gap: float, max_hold: float) -> None:
        """A session's next call came `gap` seconds after its last answer (gaps of
        `max_hold` or more are not tool time)."""
        if 0 <= gap < max_hold:
            bisect.insort(self.gaps, gap)
            if len(self.gaps) > 2000:
                del self.gaps[::2]  # keep the distribution, halve the memory

    def left(self, session: str, kind: str, due: float) -> None:
        """A session between calls left the cache: it counts as finished at `due` unless it
        comes back first (`under_way`). Only a session with a profile leaves."""
        profile = self.profiles[session]
        self.leaving.pop(session, None)
        self.leaving[session] = (due, (profile[0], profile[1], kind))
        self.leaving_due = min(self.leaving_due, due)
        while len(self.leaving) > PROFILE_WINDOW:
            self.leaving.popitem(last=False)

    def under_way(self, session: str) -> None:
        """A session sent another call: it had not finished, whenever it is let in."""
        if self.leaving.pop(session, None) is None and session in self.finished:
            del self.finished[session]
            self.forget()

    def expire(self, now: float) -> None:
        """Sessions that stayed away until they were due count as finished."""
        if self.leaving_due > now:
            return
        for sid in [sid for sid, (due, _) in self.leaving.items() if due <= now]:
            self.finished.pop(sid, None)
            self.finished[sid] = self.leaving.pop(sid)[1]
            while len(self.finished) > PROFILE_WINDOW:
                self.finished.popitem(last=False)
            self.forget()
        self.leaving_due = min((due for due, _ in self.leaving.values()), default=math.inf)

    def forget(self) -> None:
        """The finished sessions changed: what `learned` found, and so sessions' holds."""
        self.by_kind.clear()
        self.changes += 1

    def calibrate(self, prompt_chars: int, prompt_tokens: int) -> None:
        """Learn characters per token from a finished call's usage (off the hot path)."""
        if prompt_chars > 0 and prompt_tokens > 0:
            low, high = CHARS_PER_TOKEN_RANGE
            ratio = min(high, max(low, prompt_chars / prompt_tokens))
            self.chars_per_token += 0.05 * (ratio - self.chars_per_token)

    # -- across restarts -----------------------------------------------------------------------

    def snapshot(self, resident: Iterable[Group]) -> dict:
        """What was learned, as plain JSON: the finished sessions' sizes and lengths by agent,
        the tool gaps and characters per token. The sessions under way (`leaving`, and the
        `resident` ones) count as finished here, as they are so far (a session that comes
        back after a restart is a new one, and those that run on past a snapshot are a few
        among many finished)."""
        finished = list(self.finished.values()) + [p for _, p in self.leaving.values()]
        for g in resident:
            profile = self.profiles.get(g.id)
            if profile is not None and g.id not in self.finished:
                finished.append((profile[0], profile[1], g.kind))
        gaps = self.gaps
        if len(gaps) > SNAPSHOT_GAPS:  # evenly spaced through the sorted gaps
            gaps = [gaps[i * (len(gaps) - 1) // (SNAPSHOT_GAPS - 1)] for i in range(SNAPSHOT_GAPS)]
        return {
            "version": SNAPSHOT_VERSION,
            "finished": [[own, calls, kind] for own, calls, kind in finished[-PROFILE_WINDOW:]],
            "gaps": [round(g, 3) for g in gaps],
            "chars_per_token": round(self.chars_per_token, 4),
        }

    def read(self, data: Any, max_hold: float) -> tuple[list[Finished], list[float], float]:
        """The finished sessions, tool gaps (under `max_hold`, sorted) and characters per token
        of a `snapshot()`, changing nothing. Raises TypeError, ValueError or AttributeError
        for one that cannot be read."""
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"not a version {SNAPSHOT_VERSION} snapshot")
        finished = [(int(own), int(calls), str(kind))
                    for own, calls, kind in data.get("finished", [])[-PROFILE_WINDOW:]]
        gaps = sorted(float(g) for g in data.get("gaps", []) if 0 <= float(g) < max_hold)
        cpt = float(data.get("chars_per_token", self.chars_per_token))
        if not CHARS_PER_TOKEN_RANGE[0] <= cpt <= CHARS_PER_TOKEN_RANGE[1]:
            raise ValueError(f"chars_per_token {cpt}")
        return finished, gaps, cpt

    def restore(self, finished: list[Finished], gaps: list[float], chars_per_token: float) -> None:
        """Start from what `read` found (an earlier process's): its sessions count as
        finished before any finished now, so sessions finished since replace them in turn."""
        put_first(self.finished, finished, PROFILE_WINDOW)
        self.forget()
        self.gaps = sorted(self.gaps + gaps)
        self.chars_per_token = chars_per_token
