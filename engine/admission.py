"""Cache-aware admission: which requests the engine holds at once.

Measured on vLLM (notes/where-the-time-goes.md): under KV-cache pressure, agent sessions
evict each other's history between calls and end-to-end time doubles; grouping requests by
prefix gave 2.7x. Admission keeps the *working set* of the sessions being served inside the
cache:

- A request belongs to a group: the session it continues (its messages start with a prompt
  the group sent before), or a new group. Continuations of resident groups go straight in:
  their history is what the cache should keep.
- The resident working set is the union of the resident groups' prompts, counted once per
  distinct message prefix (a system prompt shared by twenty sessions counts once), plus their
  outputs. A new group is admitted while that union, with the new prompt's increment, fits
  in `fill` of the cache.
- Otherwise it waits. Among waiting requests the one adding the fewest new tokens (the most
  shared prefix) goes first; every wait is bounded by `max_wait`, after which the request
  goes in regardless. A group stays resident while it has requests in flight and, after its
  last answer, for `hold` seconds (the tool time its next call is expected after; learned
  from observed gaps); then its share of the cache is released.
- With no capacity known, or no pressure, every request goes straight in: an unpressured
  engine never waits on admission.

The controller is pure asyncio and knows nothing of HTTP: the proxy calls `enter()` before
forwarding and `leave()` when the answer is complete.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson
import xxhash

CHARS_PER_TOKEN = 3.6  # a first guess; `calibrate()` learns the real ratio from usage


def prompt_chain(body: dict[str, Any]) -> tuple[list[str], list[int]] | None:
    """Prefix hashes and sizes (JSON characters) of a chat or responses request's prompt.

    Tools come first (chat templates render them into the system turn). The previous prompt
    of a session is a prefix of its next one, as the client sends both the same way, so a
    cheap hash of each message's bytes is enough; no normalisation is needed here.
    """
    items: list[Any] = []
    if body.get("tools"):
        items.append(body["tools"])
    if isinstance(body.get("instructions"), str):
        items.append(body["instructions"])
    prompt = body.get("messages", body.get("input"))
    if isinstance(prompt, str):
        items.append(prompt)
    elif isinstance(prompt, list):
        items.extend(prompt)
    else:
        return None
    chain, sizes = [], []
    h = b""
    for item in items:
        try:
            raw = orjson.dumps(item)
        except TypeError:
            return None
        h = xxhash.xxh3_64_digest(h + raw)
        chain.append(h.hex())
        sizes.append(len(raw))
    return chain, sizes


@dataclass
class Group:
    id: str
    chain: tuple[str, ...] = ()
    """Prefix hashes of the group's latest prompt, one per message."""
    output_tokens: int = 0
    in_flight: int = 0
    calls: int = 0
    last_done: float = 0.0


@dataclass(eq=False)
class Ticket:
    """One request's passage through admission."""

    chain: tuple[str, ...]
    sizes: tuple[int, ...]
    """Estimated tokens of each message, aligned with `chain`."""
    chars: tuple[int, ...]
    """JSON characters of each message (for calibrating the token estimate)."""
    group: str
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    how: str = ""
    """'direct' (no pressure), 'resident' (continuation), 'fits', 'waited', or 'timeout'."""
    _future: asyncio.Future | None = None
    _seq: int = 0

    @property
    def waited(self) -> float:
        return (self.admitted or time.monotonic()) - self.arrived


@dataclass(frozen=True)
class AdmissionStats:
    capacity_tokens: int | None
    resident_groups: int
    resident_tokens: int
    waiting: int
    admitted: dict
    max_wait_seen: float


class Admission:
    def __init__(
        self,
        capacity_tokens: int | None,
        fill: float = 0.9,
        max_wait: float = 10.0,
        hold: float = 3.0,
        max_hold: float = 30.0,
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.fill = fill
        self.max_wait = max_wait
        self.hold = hold
        self.max_hold = max_hold
        self.chars_per_token = CHARS_PER_TOKEN
        self._groups: dict[str, Group] = {}
        self._by_chain_end: dict[str, str] = {}
        self._refs: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._union = 0
        self._waiting: deque[Ticket] = deque()
        self._seq = itertools.count()
        self._gaps: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self.admitted: dict[str, int] = {}
        self.max_wait_seen = 0.0

    # -- the proxy's calls -------------------------------------------------------------

    def ticket(self, chain: Sequence[str], message_chars: Sequence[int],
               session: str | None = None) -> Ticket:
        """A ticket for a prompt given as message prefix hashes and message lengths."""
        chain = tuple(chain)
        chars = tuple(message_chars)
        sizes = tuple(max(1, int(c / self.chars_per_token)) for c in chars)
        group = session or self._group_of(chain) or f"g{next(self._seq)}"
        return Ticket(chain=chain, sizes=sizes, chars=chars, group=group)

    async def enter(self, t: Ticket) -> None:
        """Wait until the request may go to the engine."""
        self._expire()
        g = self._groups.get(t.group)
        if self.capacity_tokens is None:
            self._admit(t, "direct")
        elif g is not None and (g.in_flight or self._held(g)):
            self._admit(t, "resident")
        elif not self._waiting and self._fits(t):
            self._admit(t, "fits")
        else:
            t._future = asyncio.get_running_loop().create_future()
            t._seq = next(self._seq)
            self._waiting.append(t)
            self._schedule()
            try:
                await t._future
            except asyncio.CancelledError:
                if t in self._waiting:
                    self._waiting.remove(t)
                elif t.admitted is not None:
                    self.leave(t, 0)
                raise

    def leave(self, t: Ticket, output_tokens: int = 0) -> None:
        """The request's answer is complete (or it failed); release what it held."""
        g = self._groups.get(t.group)
        if g is None or t.admitted is None:
            return
        g.in_flight = max(0, g.in_flight - 1)
        g.output_tokens = max(g.output_tokens, output_tokens)
        g.last_done = time.monotonic()
        self._release_ready()

    def record_output(self, group: str, output_tokens: int) -> None:
        """The true output length of a group's last call, once usage is known."""
        g = self._groups.get(group)
        if g is not None:
            g.output_tokens = output_tokens

    def calibrate(self, prompt_chars: int, prompt_tokens: int) -> None:
        """Learn characters per token from a finished call's usage (off the hot path)."""
        if prompt_chars > 0 and prompt_tokens > 0:
            ratio = prompt_chars / prompt_tokens
            self.chars_per_token += 0.05 * (ratio - self.chars_per_token)

    @property
    def pressured(self) -> bool:
        """Requests are waiting, or the resident working set has filled its share."""
        if self.capacity_tokens is None:
            return False
        return bool(self._waiting) or self._resident_tokens() > self.fill * self.capacity_tokens

    def stats(self) -> AdmissionStats:
        self._expire()
        return AdmissionStats(
            self.capacity_tokens, len(self._groups), self._resident_tokens(), len(self._waiting),
            dict(self.admitted), self.max_wait_seen,
        )

    # -- working set ---------------------------------------------------------------------

    def _group_of(self, chain: tuple[str, ...]) -> str | None:
        for h in reversed(chain):
            found = self._by_chain_end.get(h)
            if found is not None:
                return found
        return None

    def _increment(self, t: Ticket) -> int:
        """Tokens the ticket's prompt adds to the resident union."""
        return sum(s for h, s in zip(t.chain, t.sizes) if h not in self._refs)

    def _resident_tokens(self) -> int:
        return self._union + sum(g.output_tokens for g in self._groups.values())

    def _fits(self, t: Ticket) -> bool:
        if not self._groups:
            return True  # an empty engine takes anything, however large
        budget = self.fill * (self.capacity_tokens or 0)
        return self._resident_tokens() + self._increment(t) <= budget

    def _held(self, g: Group) -> bool:
        return time.monotonic() - g.last_done < self._hold_for(g)

    def _hold_for(self, g: Group) -> float:
        return min(self.max_hold, self._gap_p90()) if g.calls else 0.0

    def _gap_p90(self) -> float:
        if len(self._gaps) < 5:
            return self.hold
        return self._gaps[int(0.9 * (len(self._gaps) - 1))] * 1.2

    def _admit(self, t: Ticket, how: str) -> None:
        now = time.monotonic()
        t.admitted, t.how = now, how
        self.admitted[how] = self.admitted.get(how, 0) + 1
        self.max_wait_seen = max(self.max_wait_seen, t.waited)
        g = self._groups.get(t.group)
        if g is None:
            g = self._groups[t.group] = Group(t.group)
        elif g.in_flight == 0 and g.calls:
            gap = now - g.last_done
            if gap < self.max_hold:
                bisect.insort(self._gaps, gap)
                if len(self._gaps) > 2000:
                    del self._gaps[::2]  # keep the distribution, halve the memory
        g.in_flight += 1
        g.calls += 1
        self._set_chain(g, t.chain, t.sizes)
        if t._future is not None and not t._future.done():
            t._future.set_result(None)

    def _set_chain(self, g: Group, chain: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        for h in g.chain:
            self._unref(h)
        if g.chain and self._by_chain_end.get(g.chain[-1]) == g.id:
            del self._by_chain_end[g.chain[-1]]
        g.chain = chain
        for h, s in zip(chain, sizes):
            if h in self._refs:
                self._refs[h] += 1
            else:
                self._refs[h] = 1
                self._sizes[h] = s
                self._union += s
        if chain:
            self._by_chain_end[chain[-1]] = g.id

    def _unref(self, h: str) -> None:
        n = self._refs.get(h, 0) - 1
        if n > 0:
            self._refs[h] = n
            return
        self._refs.pop(h, None)
        self._union -= self._sizes.pop(h, 0)

    def _expire(self) -> None:
        for g in [g for g in self._groups.values() if not g.in_flight and not self._held(g)]:
            self._set_chain(g, (), ())
            del self._groups[g.id]

    # -- the waiting queue ---------------------------------------------------------------

    def _release_ready(self) -> None:
        self._expire()
        now = time.monotonic()
        while self._waiting:
            overdue = [t for t in self._waiting if now - t.arrived >= self.max_wait]
            if overdue:
                self._take(overdue[0], "timeout")
                continue
            heads: dict[str, Ticket] = {}
            for t in self._waiting:  # calls of one group keep their order
                heads.setdefault(t.group, t)
            resident = [t for t in heads.values() if t.group in self._groups]
            if resident:
                self._take(resident[0], "resident")
                continue
            best = min(heads.values(), key=lambda t: (self._increment(t), t._seq))
            if not self._fits(best):
                break
            self._take(best, "waited")
        self._schedule()

    def _take(self, t: Ticket, how: str) -> None:
        self._waiting.remove(t)
        self._admit(t, how)

    def _schedule(self) -> None:
        """Wake up when the next wait bound or hold expires, whichever is first."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._waiting:
            return
        now = time.monotonic()
        deadlines = [t.arrived + self.max_wait for t in self._waiting]
        deadlines += [g.last_done + self._hold_for(g) for g in self._groups.values()
                      if not g.in_flight]
        delay = max(0.0, min(deadlines) - now) + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay, self._release_ready)
