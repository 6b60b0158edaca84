"""The resident set: the sessions (groups) admission holds in the engine's cache, the tokens
they hold, and which of them are between calls; and the sessions it remembers after they
leave.

The tokens are the union of the resident groups' prompts, counted once per distinct message
prefix (a system prompt shared by twenty sessions counts once), plus their outputs. How long
a group between calls keeps its place is admission's to say (`Admission._hold_for`); this
says whose hold has ended without asking every group (`hold_ended`). A session is known by
its latest prompt, in the cache or not (`group_of`), so an agent back from a long tool call
is still the same session.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from typing import Callable

from engine.tickets import Group, Ticket

MAX_SESSIONS = 50_000
"""Sessions remembered after they leave the cache (their latest prompt's hash, a few bytes),
and prefixes remembered as shared."""


class ResidentSet:
    """Not thread-safe (the proxy's event loop only)."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        """Resident groups: their prompts are what the cache should hold. (Never rebound, as
        `sessions`: `Admission` holds the same dicts.)"""
        self.refs: dict[str, int] = {}
        """How many resident groups' prompts have each prefix."""
        self.sizes: dict[str, int] = {}
        """Estimated tokens of each resident prefix's message."""
        self.union = 0
        """Tokens of the resident prefixes, each once."""
        self.shared: dict[str, None] = {}
        """Prefixes two sessions have sent (system prompts, tools): counted once, not per
        session."""
        self.idle: dict[str, None] = {}
        """Resident groups between calls, by their last answer, oldest first. `hold_ended`
        asks only the oldest whether their hold has ended, and stops at the first one whose
        time since its answer is short of the least hold a session that is not done can have:
        asking every resident group each call took 2-3 ms at 1,400 resident."""
        self.idle_fresh: dict[str, None] = {}
        """Groups whose hold may be 0 (done) and that `hold_ended` has not asked since: those
        that answered since, or all of them once what was learned changed (`idle_known`)."""
        self.idle_known = 0
        """`changes` when `hold_ended` last asked every group in `idle` not fresh."""
        self.idle_in_order = True
        """`idle` is in the order of last answers (a clock never goes back; a test's may)."""
        self._entered = itertools.count()
        self.sessions: OrderedDict[str, str] = OrderedDict()
        """Group -> hash of its latest prompt, for every session seen lately, resident or
        not: a session released during a long tool call is the same session when it
        returns, and, being under way, goes before sessions that have not started."""
        self.by_chain_end: dict[str, str] = {}

    # -- sessions, resident or not ----------------------------------------------------------

    def group_of(self, chain: tuple[str, ...]) -> str | None:
        """The session whose latest prompt the prompt `chain` extends (None: a new one)."""
        for h in reversed(chain):
            found = self.by_chain_end.get(h)
            if found is not None:
                return found
        return None

    def remember(self, g: Group) -> list[str]:
        """Keep the session findable by its latest prompt, in the cache or not. Returns the
        sessions forgotten (the oldest, past MAX_SESSIONS)."""
        forgotten = []
        old = self.sessions.pop(g.id, None)
        if old is not None and self.by_chain_end.get(old) == g.id:
            del self.by_chain_end[old]
        if g.chain:
            self.sessions[g.id] = g.chain[-1]
            self.by_chain_end[g.chain[-1]] = g.id
        while len(self.sessions) > MAX_SESSIONS:
            gid, end = self.sessions.popitem(last=False)
            forgotten.append(gid)
            if self.by_chain_end.get(end) == gid:
                del self.by_chain_end[end]
        return forgotten

    # -- the tokens held -----------------------------------------------------------------

    def tokens(self) -> int:
        """The resident working set: the union of the prompts, plus the outputs."""
        return self.union + sum(g.output_tokens for g in self.groups.values())

    def increment(self, t: Ticket, sharing: Counter | None = None) -> float:
        """Tokens the ticket's prompt adds to the resident union; with `sharing` (waiting
        sessions per prefix), a prefix several waiting sessions share counts by its share."""
        if sharing is None:
            return sum(s for h, s in zip(t.chain, t.sizes) if h not in self.refs)
        return sum(s / (sharing[h] or 1) for h, s in zip(t.chain, t.sizes) if h not in self.refs)

    def own_tokens(self, g: Group) -> int:
        """Tokens of the group's prompt no other session has sent, plus its output."""
        return g.output_tokens + sum(self.sizes[h] for h in g.chain if h not in self.shared)

    # -- groups coming and going ---------------------------------------------------------

    def add(self, group: str, kind: str) -> Group:
        """A group enters the resident set (with no prompt yet: `set_chain`)."""
        g = self.groups[group] = Group(group, kind, entered=next(self._entered))
        return g

    def set_chain(self, g: Group, chain: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        """The group's prompt is now `chain` (message prefix hashes, with their tokens)."""
        for h in g.chain:
            self._unref(h)
        g.chain = chain
        for h, s in zip(chain, sizes):
            if h in self.refs:
                self.refs[h] += 1
                self.shared[h] = None  # two sessions' prompts: not a session's own tokens
                if len(self.shared) > MAX_SESSIONS:
                    self.shared.pop(next(iter(self.shared)))
            else:
                self.refs[h] = 1
                self.sizes[h] = s
                self.union += s

    def _unref(self, h: str) -> None:
        n = self.refs.get(h, 0) - 1
        if n > 0:
            self.refs[h] = n
            return
        self.refs.pop(h, None)
        self.union -= self.sizes.pop(h, 0)

    def remove(self, g: Group) -> None:
        """Take a group out of the resident set, with what its prompt held."""
        self.set_chain(g, (), ())
        del self.groups[g.id]
        self.idle.pop(g.id, None)
        self.idle_fresh.pop(g.id, None)

    # -- between calls -------------------------------------------------------------------

    def called(self, g: Group) -> None:
        """A call of the group went in: it is not between calls."""
        self.idle.pop(g.id, None)
        self.idle_fresh.pop(g.id, None)

    def between_calls(self, g: Group) -> None:
        """The group answered its last call in flight: it is held from now (`idle`)."""
        self.idle.pop(g.id, None)
        if self.idle and self.groups[next(reversed(self.idle))].last_done > g.last_done:
            self.idle_in_order = False
        self.idle[g.id] = None
        self.idle_fresh[g.id] = None

    def hold_ended(self, now: float, changes: int, least: Callable[[], float],
                   hold_for: Callable[[Group], float]) -> list[Group]:
        """The groups between calls whose hold (`hold_for`) has ended, in the resident set's
        order (the order in which every resident group used to be asked, and released).

        A group's hold is 0 when it is done, else at least `least()`, and may change only
        when `changes` moves (what was learned changed). So past the first group in `idle`
        (oldest answer first) that answered within `least()` of `now`, only the groups that
        may be done are asked: the fresh ones (`idle_fresh`)."""
        if changes != self.idle_known or not self.idle_in_order:
            self.idle_fresh.update(self.idle)  # any may be done now: ask all
            self.idle_known = changes
        if not self.idle:
            self.idle_in_order = True
            return []
        shortest = least()
        ended, asked = [], self.idle_fresh
        for gid in self.idle:
            g = self.groups[gid]
            if now - g.last_done < shortest:
                break
            if gid not in asked and not now - g.last_done < hold_for(g):
                ended.append(g)
        fresh: dict[str, None] = {}
        for gid in asked:
            g = self.groups[gid]
            if not now - g.last_done < hold_for(g):
                ended.append(g)
            elif not hold_for(g):
                fresh[gid] = None  # held with a hold of 0: answered after `now` (a test's clock)
        self.idle_fresh = fresh
        ended.sort(key=lambda g: g.entered)
        return ended
