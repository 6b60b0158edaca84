"""Sessions set aside mid-way, when sessions nothing was reserved for outgrow the cache.

Before anything is learned of how large an agent's sessions grow, nothing is reserved for
their growth, and they all go in. When the resident set at its present size then outgrows
the cache (SUSPEND_ABOVE), the youngest such sessions between calls are set aside
(`Admission`'s `suspend`): their next calls wait as sessions under way, and come back once
they fit (RESUME_BELOW). Left alone, every session's history would be evicted before it came
back (a cache is no use to a loop larger than itself); set aside, the older sessions run with
their histories resident and finish. A session with a call in flight is never set aside.

This keeps what that needs of each session remembered: when it was first let in, whether
anything was reserved for it then, and whether it is set aside now. `Admission._make_room`
sets sessions aside.
"""

from __future__ import annotations

from typing import Iterable

from engine.resident import MAX_SESSIONS
from engine.tickets import Group

SUSPEND_ABOVE = 0.95
"""Share of the KV cache the resident sessions may fill at their present size (not the size
they grow to) before the youngest of them between calls is set aside (`suspend`): below 1,
as the engine allocates whole blocks and the calls running need room to write."""
RESUME_BELOW = 0.8
"""A session set aside comes back when the resident set with it stays within this share of
the cache (lower than SUSPEND_ABOVE: one back at the brim would be set aside again at once)."""


class SetAside:
    """Not thread-safe (the proxy's event loop only)."""

    def __init__(self) -> None:
        self.born: dict[str, tuple[float, bool]] = {}
        """When each remembered session was first let in, and whether its agent's size was
        unknown then (nothing reserved for it): of those, the younger wait first."""
        self.suspended: dict[str, None] = {}
        """Sessions set aside mid-way (`suspend`): back only when they fit the cache as it is."""

    def first_in(self, session: str, now: float, unplanned: bool) -> None:
        """The session was let in for the first time (`unplanned`: nothing reserved for it)."""
        self.born[session] = (now, unplanned)
        while len(self.born) > MAX_SESSIONS:
            self.born.pop(next(iter(self.born)))

    def age(self, g: Group) -> float:
        return self.born.get(g.id, (0.0, False))[0]

    def unplanned(self, g: Group) -> bool:
        """Nothing was known of the size the session's agent grows to when it was let in,
        so nothing was reserved for its growth. Only these are set aside: where sizes are
        learned, admission's reservations keep the cache. (Setting aside any session as well,
        the youngest first, gained nothing: agent loops at 2x pressure 24.3 s at the median,
        at 4x 39.3 s with makespan 0.90x of direct, against 23.2-24.1 s and 37.2-41.3 s
        without; at 4x it set aside the sessions an idle engine had let in.)"""
        return self.born.get(g.id, (0.0, False))[1]

    def younger(self, g: Group, resident: Iterable[Group]) -> list[Group]:
        """The `resident` sessions between calls younger than `g` that nothing was reserved
        for, youngest first: those to set aside to make room for `g`'s next call."""
        born = self.age(g)
        return sorted((x for x in resident if x is not g and not x.in_flight
                       and self.age(x) > born and self.unplanned(x)),
                      key=self.age, reverse=True)

    def waits(self, g: Group, resident: Iterable[Group]) -> bool:
        """Nothing was reserved for `g` either, and an older session is resident: `g` waits
        (is set aside) rather than evict it."""
        born = self.age(g)
        return self.unplanned(g) and any(self.age(x) < born for x in resident if x is not g)

    def aside(self, session: str) -> None:
        self.suspended[session] = None
        while len(self.suspended) > MAX_SESSIONS:
            self.suspended.pop(next(iter(self.suspended)))

    def forget(self, session: str) -> None:
        """The session is no longer remembered."""
        self.born.pop(session, None)
        self.suspended.pop(session, None)
