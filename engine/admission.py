"""Cache-aware admission: which requests the engine holds at once.

Measured on vLLM (notes/where-the-time-goes.md, bench/results/e2e.md): under KV-cache
pressure, agent sessions evict each other's history between calls and end-to-end time
doubles. Admission serves fewer sessions at once, each with its history resident, rather than
all of them with none:

- A request belongs to a session (group): the one whose latest prompt it extends, or a new
  one. Sessions are remembered after they leave the cache, so an agent back from a long tool
  call is still the same session.
- The resident working set is the union of the resident sessions' prompts, counted once per
  distinct message prefix (a system prompt shared by twenty sessions counts once), plus
  their outputs. Admission also reserves the growth each session still has before it: the
  size recent sessions of the same agent grew to (their own tokens, upper quartile; an
  agent is told by its prompt's first item) is learned online from finished sessions.
- Continuations of resident sessions go straight in. A new session goes in while the
  reserved set, with its expected size, stays within `fill` of the cache (`fill` is above 1
  by default: sessions do not all peak at once, and vLLM evicts the idlest blocks first).
- Otherwise it waits. Waiting sessions already under way go first, in arrival order; then
  new sessions of workflow runs under way (a run ends with its last agent: a debater let in
  without the others cannot start its next round); then the new session holding the least
  cache for the least work (the tokens it adds, a prefix other waiting sessions share
  charged by its share, times its run's expected size). When the first in that order does
  not fit, the first after it that does goes in (backfill). Every wait is bounded by
  `max_wait`; an engine that has been mostly idle lately, or that holds a single session
  between calls, takes waiting work even when it overflows the cache (the sessions that fit
  are all in tool calls: thrash beats idling).
  Short of idle, an engine whose resident sessions keep fewer than `spare_below` calls on
  it at once (on average over BUSY_WINDOW) takes waiting sessions up to SPARE_RAISE x `fill`
  ('spare'): with a cache that holds three agent loops, the engine ran 0.9-1.5 calls at a
  time against 8 direct (bench/results/e2e-spare-off.md), at under a third of its rate.
- A session stays resident while it has calls in flight and, after its last answer, for the
  tool time its next call is expected after (p90 of observed gaps, longer while the session
  is shorter than sessions usually are); then its share of the cache is released. A session
  that has made as many calls as nearly all finished sessions of its agent made is done: it
  is released with its last answer, and the next waiting session starts at once.
- Before anything is learned of how large an agent's sessions grow, nothing is reserved
  for their growth, and they all go in. When the resident set at its present size then
  outgrows the cache (`SUSPEND_ABOVE`), the youngest such sessions between calls are set
  aside (`suspend`): their next calls wait as sessions under way, and come back once they
  fit (`RESUME_BELOW`). Left alone, every session's history would be evicted before it
  came back (a cache is no use to a loop larger than itself); set aside, the older
  sessions run with their histories resident and finish. A session with a call in flight
  is never set aside.
- With no capacity known, or no pressure, every request goes straight in: an unpressured
  engine never waits on admission.
- Workflows sharing the engine are served smallest first (`ordering`; `engine.runs` tells
  a call's workflow run and its expected size on arrival): with `running` calls in flight, a
  call of a run expected to be SIZE_RATIO times the size of another run under way waits for
  it, at most `order_wait`; waiting calls go smaller size class first. Runs of about one
  size are never held, so sessions of one agent keep the order above.
- Under pressure, the engine is told what admission knows (`Ticket.priority`, sent as vLLM's
  `priority`): continuations of sessions under way run before new sessions' first calls, and
  when the running calls outgrow the cache, vLLM preempts a new session, not one mid-loop.

- What it learned (`snapshot()`: sizes and lengths of finished sessions by agent, tool gaps,
  characters per token, workflow run sizes) is saved by the proxy with the learner's
  snapshot and `restore()`d at start: a restart does not begin from nothing.

The controller is pure asyncio and knows nothing of HTTP: the proxy calls `enter()` before
forwarding and `leave()` when the answer is complete.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from engine.runs import FLOOR, PREFILL_WEIGHT, Runs, put_first
from learn.canonical import prefix_chain

log = logging.getLogger("preheat.admission")
CHARS_PER_TOKEN = 3.6
MAX_SESSIONS = 50_000
"""Sessions remembered after they leave the cache (their latest prompt's hash, a few bytes)."""
PROFILE_WINDOW = 200
SNAPSHOT_VERSION = 1
SNAPSHOT_GAPS = 500
"""Tool gaps a snapshot keeps (evenly spaced through the sorted ones: their distribution)."""
PROFILE_MIN_SESSIONS = 3
BUSY_WINDOW = 20.0
IDLE_BELOW = 0.6
"""An engine busy less than this share of the last BUSY_WINDOW seconds is under-used."""
IDLE_RECHECK = 1.0
"""Seconds between looks at the busy share while work waits and nothing runs."""
SPARE_BELOW = 2.0
"""Calls on the engine at once, on average over the last BUSY_WINDOW seconds, below which it
has throughput to spare (bench/results/decode-load.md: two calls at once decode at under a
third of the rate sixteen reach; the default of `Admission.spare_below`). The resident
sessions then spend most of their time in tool calls, and the cache, not the engine, bounds
the work: waiting sessions go in up to SPARE_RAISE times `fill`, as a few histories evicted
cost less than an engine left idle."""
SPARE_RAISE = 1.2
SPARE_SPAN = 5.0
"""Seconds of the resident set's history before its average load is trusted (the first
calls of a burst are all prefill, and say nothing of the tool time to come)."""
DONE_BEYOND = 0.1
"""A session is taken as done when fewer than this share of finished sessions made more calls."""
GAPS_TRUSTED = 20
"""Tool gaps seen before their p90 alone sets how long idle sessions are held."""
MID_SESSION_HOLD = 2.5
"""A session short of the usual number of calls is held this many times the tool gap."""
SUSPEND_ABOVE = 0.95
"""Share of the KV cache the resident sessions may fill at their present size (not the size
they grow to) before the youngest of them between calls is set aside (`suspend`): below 1,
as the engine allocates whole blocks and the calls running need room to write."""
RESUME_BELOW = 0.8
"""A session set aside comes back when the resident set with it stays within this share of
the cache (lower than SUSPEND_ABOVE: one back at the brim would be set aside again at once)."""
SIZE_RATIO = 2.0
"""With the engine loaded, a workflow run expected to be this many times the size of another
run under way waits for it (runs of about one size share the engine as they come)."""
PRIORITY = {"resident": -1, "returned": -1}
"""vLLM `priority` (lower runs first, and is preempted last) by how a call was admitted under
pressure: a session under way before one that starts. Without pressure every call keeps the
engine's default, 0. (Also sending work let in over the cache's size at +1 measured worse:
mixed workload median 39.9, 39.8 and 30.4 s in three runs, 29.5 and 28.9 s in two without.)"""


def _size_class(size: float | None) -> int:
    """0 for unknown and small sizes, then one more per factor of SIZE_RATIO."""
    if not size or size <= FLOOR:
        return 0
    return int(math.log(size / FLOOR, SIZE_RATIO)) + 1


def prompt_chain(body: dict[str, Any]) -> tuple[list[str], list[int]] | None:
    """Prefix hashes and sizes (JSON characters) of a chat or responses request's prompt.

    Tools come first (chat templates render them into the system turn). The previous prompt
    of a session is a prefix of its next one, as the client sends both the same way, so a
    cheap hash of each message's bytes is enough (`learn.canonical.prefix_chain`).
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
    return prefix_chain(items)


@dataclass
class Group:
    id: str
    kind: str = ""
    """The agent the session belongs to: the hash of its prompt's first item (tools, or the
    system prompt). Sessions of one agent grow alike; another agent's may not."""
    chain: tuple[str, ...] = ()
    """Prefix hashes of the group's latest prompt, one per message."""
    output_tokens: int = 0
    own_tokens: int = 0
    """Tokens of the group's prompt no other resident group shares, plus its output."""
    in_flight: int = 0
    calls: int = 0
    last_done: float = 0.0
    entered: int = 0
    """When it entered the resident set (a count): groups are released in that order."""


@dataclass(eq=False)
class Ticket:
    """One request's passage through admission."""

    chain: tuple[str, ...]
    sizes: tuple[int, ...]
    """Estimated tokens of each message, aligned with `chain`."""
    chars: tuple[int, ...]
    """JSON characters of each message (for calibrating the token estimate)."""
    group: str
    kind: str = ""
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    how: str = ""
    """'direct' (no pressure), 'resident' (continuation), 'fits' (a new session, at once),
    'returned' (a session under way, back after leaving the cache), 'waited' (first in the
    waiting order), 'backfill' (past one that did not fit), 'spare' (over `fill`, on an
    engine with few calls at once), 'idle', 'timeout' or 'shutdown' (`drain`)."""
    priority: int = 0
    """The engine priority to run at (`PRIORITY`): set when admitted under pressure, else 0."""
    run: str = ""
    """The workflow run the call belongs to (`engine.runs`), with ordering on."""
    prompt_hashes: list[int] | None = None
    """The prompt's chunk hashes, for the first call of a new session (placed again later)."""
    _pending: bool = False
    _held: bool = False
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
        fill: float = 1.25,
        max_wait: float = 60.0,
        hold: float = 3.0,
        max_hold: float = 30.0,
        ordering: bool = False,
        running: int = 4,
        order_wait: float = 30.0,
        suspend: bool = True,
        spare_below: float = SPARE_BELOW,
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.spare_below = spare_below
        """Calls on the engine at once, on average, below which waiting sessions go in up
        to SPARE_RAISE x `fill` (`SPARE_BELOW`; 0: never)."""
        self.suspend = suspend
        """When sessions of agents whose sizes are not yet learned outgrow the cache, the
        youngest between calls waits until there is room again, and the older ones keep
        their histories resident."""
        self.runs = Runs() if ordering else None
        """Workflow runs, for serving the smallest run first."""
        self.running = running
        """With ordering: calls in flight beyond which a run much larger than another run
        under way waits (`SIZE_RATIO`)."""
        self.order_wait = min(order_wait, max_wait)
        """The longest a call waits for smaller runs (a long conversation on an engine that
        is always busy is not put off for the whole `max_wait`)."""
        self.fill = fill
        self.max_wait = max_wait
        self.hold = hold
        self.max_hold = max_hold
        self.chars_per_token = CHARS_PER_TOKEN
        self._groups: dict[str, Group] = {}
        """Resident groups: their prompts are what the cache should hold."""
        self._sessions: OrderedDict[str, str] = OrderedDict()
        """Group -> hash of its latest prompt, for every session seen lately, resident or
        not: a session released during a long tool call is the same session when it
        returns, and, being under way, goes before sessions that have not started."""
        self._by_chain_end: dict[str, str] = {}
        self._shared: dict[str, None] = {}
        """Prefixes two sessions have sent (system prompts, tools): counted once, not per session."""
        self._profiles: OrderedDict[str, list[int]] = OrderedDict()
        """[largest own-token count, calls] of each recent session, kept up to date."""
        self._finished: OrderedDict[str, tuple[int, int, str]] = OrderedDict()
        """The same with the session's kind, taken when a session left the cache (again if
        it came back): what a new session of that kind is expected to grow to (admitting it
        leaves room for its later calls), how many calls it makes, and when it is done.
        Sessions under way are not counted: their sizes so far would make all look small."""
        self._leaving: OrderedDict[str, tuple[float, tuple[int, int, str]]] = OrderedDict()
        """Sessions that left the cache, with when they count as finished (their profile
        then goes to `_finished`) unless they come back first: a session whose tool call
        outlasts its hold is under way, not finished, and taking it for a finished one
        before any has finished makes its agent look one call long."""
        self._learned_by_kind: dict[str | None, tuple[list[int], int, int]] = {}
        """Per kind: what `_learned` found, until the next session finishes."""
        self._learned_changes = 0
        """Times `_learned_by_kind` was forgotten: a session's hold may change with it."""
        self._leaving_due = math.inf
        """No session in `_leaving` is due before this (`_expire` looks no further until then)."""
        self._idle: dict[str, None] = {}
        """Resident groups between calls, by their last answer, oldest first. `_expire` asks
        only the oldest whether their hold has ended, and stops at the first one whose time
        since its answer is short of the least hold a session that is not done can have
        (`_hold_ended`): asking every resident group each call took 2-3 ms at 1,400 resident."""
        self._idle_fresh: dict[str, None] = {}
        """Groups whose hold may be 0 (done) and that `_expire` has not asked since: those
        that answered since, or all of them once `_learned_changes` moved (`_idle_known`)."""
        self._idle_known = 0
        """`_learned_changes` when `_expire` last asked every group in `_idle` not fresh."""
        self._idle_in_order = True
        """`_idle` is in the order of last answers (a clock never goes back; a test's may)."""
        self._entered = itertools.count()
        self._refs: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._union = 0
        self._waiting: deque[Ticket] = deque()
        self._seq = itertools.count()
        self._in_flight = 0
        self._load: deque[tuple[float, float, float, int]] = deque(
            [(time.monotonic(), 0.0, 0.0, 0)])
        """(when, call-seconds and busy seconds on the engine until then, calls in flight
        from then on): its average load and busy share over a window are each the
        difference of two totals (`_load_mean`, `_busy_share`)."""
        self._occupied_since: float | None = None
        """When the resident set last went from empty to not (for `_busy_share`)."""
        self._gaps: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self.admitted: dict[str, int] = {}
        self.max_wait_seen = 0.0
        self.held_for_smaller = 0
        """Calls that waited for a smaller workflow run (ordering)."""
        self.suspended = 0
        """Sessions set aside mid-way because the resident set outgrew the cache."""
        self._born: dict[str, tuple[float, bool]] = {}
        """When each remembered session was first let in, and whether its agent's size was
        unknown then (nothing reserved for it): of those, the younger wait first."""
        self._suspended: dict[str, None] = {}
        """Sessions set aside mid-way (`suspend`): back only when they fit the cache as it is."""

    # -- the proxy's calls -------------------------------------------------------------

    def ticket(self, chain: Sequence[str], message_chars: Sequence[int],
               session: str | None = None,
               hashes: Callable[[], list[int]] | None = None) -> Ticket:
        """A ticket for a prompt given as message prefix hashes and message lengths;
        `hashes` gives the prompt's chunk hashes (`engine.runs.prompt_hashes`), asked for
        only when ordering needs them (the first call of a new session)."""
        chain = tuple(chain)
        chars = tuple(message_chars)
        sizes = tuple(max(1, int(c / self.chars_per_token)) for c in chars)
        group = session or self._group_of(chain) or f"g{next(self._seq)}"
        t = Ticket(chain=chain, sizes=sizes, chars=chars, group=group,
                   kind=chain[0] if chain else "")
        if self.runs is not None and self.capacity_tokens is not None:
            t.run, t.prompt_hashes = self.runs.place(group, t.kind, hashes or list)
        return t

    async def enter(self, t: Ticket) -> None:
        """Wait until the request may go to the engine."""
        self._expire()
        g = self._groups.get(t.group)
        if g is None:
            self._under_way(t.group)  # not finished, though it may wait (set aside, released)
        if t.run and not t._pending:
            t._pending = True
            self.runs.arrived(t.run)
        if self.capacity_tokens is None:
            self._admit(t, "direct")
        elif self.runs is not None and (self._waiting or self._in_flight >= self.running):
            await self._wait(t)  # the smallest run first
        elif g is not None and (g.in_flight or self._held(g)):
            if self._make_room(t, g):
                self._suspend(g, calling=True)  # the resident set outgrew the cache
                await self._wait(t)
            else:
                self._admit(t, "resident")
        elif not self._waiting and self._fits(t):
            self._admit(t, "returned" if t.group in self._sessions else "fits")
        elif not self._waiting and self._engine_idle():
            self._admit(t, "idle")
        elif not self._waiting and self._spare() and self._fits(t, fill=self._spare_fill()):
            self._admit(t, "spare")
        else:
            await self._wait(t)

    async def _wait(self, t: Ticket) -> None:
        t._future = asyncio.get_running_loop().create_future()
        t._seq = next(self._seq)
        self._waiting.append(t)
        if self.runs is not None:
            self._release_ready()
        else:
            self._schedule()
        try:
            await t._future
        except asyncio.CancelledError:
            if t in self._waiting:
                self._waiting.remove(t)
                self._run_left(t)
            elif t.admitted is not None:
                self.leave(t, 0)
            raise

    def drain(self) -> int:
        """Let every waiting call go at once, marked 'shutdown' (the proxy is stopping: it
        answers them 503, as none reached the engine a retry elsewhere loses nothing).
        Returns how many there were."""
        waiting = list(self._waiting)
        for t in waiting:
            self._take(t, "shutdown")
        return len(waiting)

    def leave(self, t: Ticket, output_tokens: int = 0, refused: bool = False) -> None:
        """The request's answer is complete (or it failed); release what it held. A
        session whose first call was `refused` (the engine answered an error, or never
        answered) holds nothing: the engine kept nothing of it to come back to."""
        self._run_left(t)
        g = self._groups.get(t.group)
        if g is None or t.admitted is None:
            return
        if g.in_flight:
            g.in_flight -= 1
            self._running(-1)
        profile = self._profiles.get(g.id)
        if refused and not g.in_flight and (profile is None or profile[1] <= 1):
            self._profiles.pop(g.id, None)  # nor does it say how large its agent's grow
            self._born.pop(g.id, None)
            self._release(g, between_calls=False)
            self._release_ready()
            return
        g.output_tokens = max(g.output_tokens, output_tokens)
        g.last_done = time.monotonic()
        if not g.in_flight:
            self._between_calls(g)
        self._measure(g)
        self._release_ready()

    def _run_left(self, t: Ticket) -> None:
        if t._pending:
            t._pending = False
            self.runs.left(t.run)

    def answered(self, t: Ticket, usage: dict | None, cached_tokens: int | None,
                 answer_hashes: Sequence[int] = ()) -> None:
        """What the observer read of a finished call: its usage, and its answer's chunk
        hashes (which later prompts that contain the answer are placed by)."""
        usage = usage if isinstance(usage, dict) else {}
        prompt, output = usage.get("prompt_tokens"), usage.get("completion_tokens")
        service = 0.0
        if isinstance(prompt, int) and isinstance(output, int):
            self.calibrate(sum(t.chars), prompt)
            self.record_output(t.group, output)
            service = output + PREFILL_WEIGHT * max(0, prompt - (cached_tokens or 0))
        if self.runs is not None and t.run:
            self.runs.answered(t.run, service, answer_hashes, t.prompt_hashes)

    def record_output(self, group: str, output_tokens: int) -> None:
        """The true output length of a group's last call, once usage is known."""
        g = self._groups.get(group)
        if g is not None:
            g.output_tokens = output_tokens
            self._measure(g)

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

    # -- what it learned, across restarts ----------------------------------------------------

    def snapshot(self) -> dict:
        """What admission has learned, as plain JSON, to start from after a restart: the
        finished sessions' sizes and lengths by agent, the tool gaps, characters per
        token, and the sizes of the workflow runs that ended. The sessions under way count
        as finished here, as they are so far (a session that comes back after a restart is
        a new one, and those that run on past a snapshot are a few among many finished)."""
        self._expire()
        finished = list(self._finished.values()) + [p for _, p in self._leaving.values()]
        for g in self._groups.values():
            profile = self._profiles.get(g.id)
            if profile is not None and g.id not in self._finished:
                finished.append((profile[0], profile[1], g.kind))
        gaps = self._gaps
        if len(gaps) > SNAPSHOT_GAPS:  # evenly spaced through the sorted gaps
            gaps = [gaps[i * (len(gaps) - 1) // (SNAPSHOT_GAPS - 1)] for i in range(SNAPSHOT_GAPS)]
        return {
            "version": SNAPSHOT_VERSION,
            "finished": [[own, calls, kind] for own, calls, kind in finished[-PROFILE_WINDOW:]],
            "gaps": [round(g, 3) for g in gaps],
            "chars_per_token": round(self.chars_per_token, 4),
            "runs": self.runs.snapshot() if self.runs is not None else [],
        }

    def restore(self, data: Any) -> int:
        """Start from a `snapshot()` (an earlier process's): its sessions count as finished
        before any finished now, so sessions finished since replace them in turn. Returns
        the sessions restored; a snapshot that cannot be read changes nothing (0)."""
        try:
            if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"not a version {SNAPSHOT_VERSION} snapshot")
            finished = [(int(own), int(calls), str(kind))
                        for own, calls, kind in data.get("finished", [])[-PROFILE_WINDOW:]]
            gaps = sorted(float(g) for g in data.get("gaps", []) if 0 <= float(g) < self.max_hold)
            cpt = float(data.get("chars_per_token", self.chars_per_token))
            if not 0.5 <= cpt <= 20:
                raise ValueError(f"chars_per_token {cpt}")
            runs = list(data.get("runs", []))
            if self.runs is not None:
                self.runs.restore(runs)
        except (TypeError, ValueError, AttributeError) as exc:
            log.warning("could not restore admission's snapshot (%s); learning afresh", exc)
            return 0
        put_first(self._finished, finished, PROFILE_WINDOW)
        self._forget_learned()
        self._gaps = sorted(self._gaps + gaps)
        self.chars_per_token = cpt
        return len(finished)

    # -- working set ---------------------------------------------------------------------

    def _group_of(self, chain: tuple[str, ...]) -> str | None:
        for h in reversed(chain):
            found = self._by_chain_end.get(h)
            if found is not None:
                return found
        return None

    def _remember(self, g: Group) -> None:
        """Keep the session findable by its latest prompt, in the cache or not."""
        old = self._sessions.pop(g.id, None)
        if old is not None and self._by_chain_end.get(old) == g.id:
            del self._by_chain_end[old]
        if g.chain:
            self._sessions[g.id] = g.chain[-1]
            self._by_chain_end[g.chain[-1]] = g.id
        while len(self._sessions) > MAX_SESSIONS:
            gid, end = self._sessions.popitem(last=False)
            self._born.pop(gid, None)
            self._suspended.pop(gid, None)
            if self._by_chain_end.get(end) == gid:
                del self._by_chain_end[end]

    def _increment(self, t: Ticket, sharing: Counter | None = None) -> float:
        """Tokens the ticket's prompt adds to the resident union; with `sharing` (waiting
        sessions per prefix), a prefix several waiting sessions share counts by its share."""
        if sharing is None:
            return sum(s for h, s in zip(t.chain, t.sizes) if h not in self._refs)
        return sum(s / (sharing[h] or 1) for h, s in zip(t.chain, t.sizes) if h not in self._refs)

    def _resident_tokens(self) -> int:
        return self._union + sum(g.output_tokens for g in self._groups.values())

    def expected_footprint(self, kind: str | None = None) -> int:
        """Own tokens a session grows to (upper quartile of recent finished sessions of the
        same kind, or of all where none of that kind finished; 0 unknown)."""
        return self._learned(kind)[1]

    def expected_calls(self, kind: str | None = None) -> int:
        """Calls a session makes (upper quartile, as `expected_footprint`)."""
        return self._learned(kind)[2]

    def _learned(self, kind: str | None) -> tuple[list[int], int, int]:
        """The calls each finished session of the kind made, sorted (from the first one:
        other agents' sessions say little of this one's, as a debater's three calls and a
        support agent's six; all kinds' where none of the kind finished and at least
        PROFILE_MIN_SESSIONS did), and the upper quartiles of their footprints and calls.
        Remembered until the next session finishes: admission asks for them per resident
        group on every decision (`_done` counts in the sorted calls by bisection: summing
        over 200 finished sessions per resident group took 17 ms a call at 1,200 resident)."""
        found = self._learned_by_kind.get(kind)
        if found is None:
            finished = list(self._finished.values())
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
            found = self._learned_by_kind[kind] = (calls_made, footprint, calls)
        return found

    def _forget_learned(self) -> None:
        """The finished sessions changed: what `_learned` found, and so sessions' holds."""
        self._learned_by_kind.clear()
        self._learned_changes += 1

    def _reserved_tokens(self) -> int:
        """The resident set now, plus the growth its sessions are expected to have."""
        growth = sum(max(0, self.expected_footprint(g.kind) - g.own_tokens)
                     for g in self._groups.values())
        return self._resident_tokens() + growth

    def _fits(self, t: Ticket, reserved: int | None = None, fill: float | None = None) -> bool:
        if not self._groups:
            return True  # an empty engine takes anything, however large
        budget = (fill or self.fill) * (self.capacity_tokens or 0)
        need = self._increment(t)
        if t.group not in self._sessions:  # a new session: room for all it will grow to
            need = max(need, self.expected_footprint(t.kind))
        if reserved is None:
            reserved = self._reserved_tokens()
        if t.group in self._suspended and (self._resident_tokens() + need
                                           > RESUME_BELOW * (self.capacity_tokens or 0)):
            return False  # set aside for want of room: back when there is room now
        return reserved + need <= budget

    def _measure(self, g: Group) -> None:
        g.own_tokens = g.output_tokens + sum(
            self._sizes[h] for h in g.chain if h not in self._shared)
        profile = self._profiles.get(g.id)
        if profile is None:
            profile = self._profiles[g.id] = [0, 0]
            while len(self._profiles) > PROFILE_WINDOW:
                self._profiles.popitem(last=False)
        profile[0] = max(profile[0], g.own_tokens)
        profile[1] = max(profile[1], g.calls)

    def _engine_idle(self) -> bool:
        """Nothing admitted runs, and lately the engine was mostly idle: the sessions that
        fit the cache spend their time in tool calls. Work that waits then goes in
        although it overflows the cache (an idle engine helps nobody; once the sessions
        keep the engine busy, this stops by itself). A single session between calls is
        the same case at once: whatever the busy share says, the engine has nothing to do
        until it comes back, and one session in its tool calls is all it would serve.
        (Waiting for the busy share to fall instead, the last of two 5,500-token
        reflections on the mixed workload sat 3-6.6 s with the engine idle at the run's
        end: its makespan 0.94-0.98x of direct.)"""
        if self._in_flight:
            return False
        return len(self._groups) <= 1 or self._busy_share() < IDLE_BELOW

    def load(self) -> float | None:
        """Admitted calls on the engine at once, on average over the last BUSY_WINDOW
        seconds (None until the resident set has SPARE_SPAN seconds of history)."""
        load = self._load_mean()
        return None if load is None else round(load, 2)

    def _spare(self) -> bool:
        """The engine has had few calls at once lately (`SPARE_BELOW`)."""
        load = self._load_mean()
        return load is not None and load < self.spare_below

    def _spare_fill(self) -> float:
        return self.fill * SPARE_RAISE

    def _load_mean(self) -> float | None:
        """Admitted calls in flight, on average over the last BUSY_WINDOW seconds (or since
        the resident set was last empty, where that is shorter); None before SPARE_SPAN
        seconds of it."""
        if self._occupied_since is None:
            return None
        now = time.monotonic()
        span = min(BUSY_WINDOW, now - self._occupied_since)
        if span < SPARE_SPAN:
            return None
        return (self._totals(now)[0] - self._totals(now - span)[0]) / span

    def _totals(self, at: float) -> tuple[float, float]:
        """Call-seconds and busy seconds (any call running) on the engine until `at` (no
        earlier than the window kept)."""
        load = self._load
        while len(load) > 1 and load[1][0] <= at - BUSY_WINDOW:
            load.popleft()  # (the first kept is before the window: the totals at its start)
        if at >= load[-1][0]:  # now (on every call's start and end): the latest entry
            when, calls, busy, running = load[-1]
        else:
            i = bisect.bisect_right(load, at, key=lambda e: e[0]) - 1
            when, calls, busy, running = load[max(0, i)]
        dt = max(0.0, at - when)
        return calls + running * dt, busy + (dt if running else 0.0)

    def _busy_share(self) -> float:
        """Share of the last BUSY_WINDOW seconds with at least one admitted call running;
        of the time since the resident set was last empty, where that is shorter: work that
        arrives after a quiet spell (a process just started, a lull between bursts) is not
        let in over the cache for the quiet before it. (Counted over the quiet, a burst
        after learning took sessions in as "idle" 2 s into it, ten sessions in a cache for
        seven: agent loops at 2x pressure 38.7 s at the median against 22.9 s.)"""
        now = time.monotonic()
        if self._occupied_since is None:
            return 0.0
        span = min(BUSY_WINDOW, now - self._occupied_since)
        if span <= 0:
            return 1.0
        return (self._totals(now)[1] - self._totals(now - span)[1]) / span

    def _running(self, delta: int) -> None:
        """Track the admitted calls running (for `_load_mean` and `_busy_share`)."""
        self._in_flight += delta
        now = time.monotonic()
        self._load.append((now, *self._totals(now), self._in_flight))

    def _held(self, g: Group, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - g.last_done < self._hold_for(g)

    def _hold_for(self, g: Group) -> float:
        """How long an idle group keeps its place: its agent's tool time, and longer while
        the session is shorter than sessions usually are (so it is surely coming back)."""
        if not g.calls or self._done(g):
            return 0.0
        hold = self._gap_p90()
        if g.calls < self.expected_calls(g.kind):
            hold *= MID_SESSION_HOLD
        return min(self.max_hold, hold)

    def _done(self, g: Group) -> bool:
        """Nearly every finished session of its kind stopped within the calls `g` has made.
        (One that does come back is a session under way again: it goes before new ones.)"""
        calls_made = self._learned(g.kind)[0]
        if not calls_made:
            return False
        more = len(calls_made) - bisect.bisect_right(calls_made, g.calls)
        return more < DONE_BEYOND * len(calls_made)

    def _gap_p90(self) -> float:
        """The tool time to hold an idle session for: p90 of the gaps seen, x1.2. Until
        GAPS_TRUSTED gaps are seen, never below `hold`: the first gaps to end are the short
        ones (the long ones are still going on), so the first few say gaps are shorter
        than they are."""
        if len(self._gaps) < 5:
            return self.hold
        p90 = self._gaps[int(0.9 * (len(self._gaps) - 1))] * 1.2
        return p90 if len(self._gaps) >= GAPS_TRUSTED else max(p90, self.hold)

    def _admit(self, t: Ticket, how: str) -> None:
        now = time.monotonic()
        t.admitted, t.how = now, how
        if self.pressured and not (self.runs is not None and not self._cache_bound()
                                   and self._larger_run(t)):
            t.priority = PRIORITY.get(how, 0)  # (a run larger than one under way: no boost)
        self.admitted[how] = self.admitted.get(how, 0) + 1
        self.max_wait_seen = max(self.max_wait_seen, t.waited)
        g = self._groups.get(t.group)
        if g is None:
            if not self._groups:
                self._occupied_since = now
            g = self._groups[t.group] = Group(t.group, t.kind, entered=next(self._entered))
            if t.group not in self._born:
                self._born[t.group] = (now, self.expected_footprint(t.kind) == 0)
                while len(self._born) > MAX_SESSIONS:
                    self._born.pop(next(iter(self._born)))
            self._suspended.pop(t.group, None)
            profile = self._profiles.get(t.group)
            g.calls = profile[1] if profile else 0  # a session returning to the cache
            self._under_way(t.group)  # (it may have been released while its call waited)
        if g.in_flight == 0 and g.calls:
            # The client's own tool or think time: from the last answer to this call's
            # arrival, not to its admission (waiting here is not a gap to hold for).
            gap = t.arrived - g.last_done
            if 0 <= gap < self.max_hold:
                bisect.insort(self._gaps, gap)
                if len(self._gaps) > 2000:
                    del self._gaps[::2]  # keep the distribution, halve the memory
        if t.run and self.runs is not None:
            self.runs.admitted(t.run)
        g.in_flight += 1
        self._idle.pop(g.id, None)
        self._idle_fresh.pop(g.id, None)
        self._running(+1)
        g.calls += 1
        self._set_chain(g, t.chain, t.sizes)
        self._remember(g)
        self._measure(g)
        if log.isEnabledFor(logging.DEBUG):
            load = self._load_mean()
            log.debug("admitted %s call %d (%s) after %.2f s; %d groups, %d of %d tokens "
                      "(%d reserved), %d in flight (%s on average), %d waiting",
                      t.group, g.calls, how, t.waited, len(self._groups),
                      self._resident_tokens(), self.capacity_tokens or 0,
                      self._reserved_tokens(), self._in_flight,
                      "-" if load is None else f"{load:.2f}", len(self._waiting))
        if t._future is not None and not t._future.done():
            t._future.set_result(None)

    def _set_chain(self, g: Group, chain: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        for h in g.chain:
            self._unref(h)
        g.chain = chain
        for h, s in zip(chain, sizes):
            if h in self._refs:
                self._refs[h] += 1
                self._shared[h] = None  # two sessions' prompts: not a session's own tokens
                if len(self._shared) > MAX_SESSIONS:
                    self._shared.pop(next(iter(self._shared)))
            else:
                self._refs[h] = 1
                self._sizes[h] = s
                self._union += s

    def _unref(self, h: str) -> None:
        n = self._refs.get(h, 0) - 1
        if n > 0:
            self._refs[h] = n
            return
        self._refs.pop(h, None)
        self._union -= self._sizes.pop(h, 0)

    def _release(self, g: Group, between_calls: bool = True) -> None:
        """Take a group out of the resident set. One between calls may have finished: it
        counts as finished if it stays away as long again as its hold (at once if done)."""
        profile = self._profiles.get(g.id)
        if between_calls and profile is not None:
            self._leaving.pop(g.id, None)
            due = g.last_done + 2 * self._hold_for(g)
            self._leaving[g.id] = (due, (profile[0], profile[1], g.kind))
            self._leaving_due = min(self._leaving_due, due)
            while len(self._leaving) > PROFILE_WINDOW:
                self._leaving.popitem(last=False)
        self._set_chain(g, (), ())
        del self._groups[g.id]
        self._idle.pop(g.id, None)
        self._idle_fresh.pop(g.id, None)
        if not self._groups:
            self._occupied_since = None

    def _expire(self) -> None:
        if self.runs is not None:
            self.runs.expire()
        for g in self._hold_ended(time.monotonic()):
            log.debug("released %s after %d calls (held %.1f s)", g.id, g.calls,
                      self._hold_for(g))
            self._release(g)
        now = time.monotonic()
        if self._leaving_due > now:
            return
        for gid in [gid for gid, (due, _) in self._leaving.items() if due <= now]:
            self._finished.pop(gid, None)
            self._finished[gid] = self._leaving.pop(gid)[1]
            while len(self._finished) > PROFILE_WINDOW:
                self._finished.popitem(last=False)
            self._forget_learned()
        self._leaving_due = min((due for due, _ in self._leaving.values()), default=math.inf)

    def _between_calls(self, g: Group) -> None:
        """The group answered its last call in flight: it is held from now (`_idle`)."""
        self._idle.pop(g.id, None)
        if self._idle and self._groups[next(reversed(self._idle))].last_done > g.last_done:
            self._idle_in_order = False
        self._idle[g.id] = None
        self._idle_fresh[g.id] = None

    def _hold_ended(self, now: float) -> list[Group]:
        """The groups between calls whose hold has ended, in the resident set's order (the
        order in which every resident group used to be asked, and released).

        A group's hold is 0 when it is done, else one of two values the same for all (the
        tool gap, or MID_SESSION_HOLD times it, at most `max_hold`). So a group not done is
        held at least the lesser of the two (`least`), and past the first group in `_idle`
        (oldest answer first) that answered within `least` of `now`, only the groups that
        may be done are asked: the fresh ones (`_idle_fresh`)."""
        if self._learned_changes != self._idle_known or not self._idle_in_order:
            self._idle_fresh.update(self._idle)  # any may be done now: ask all
            self._idle_known = self._learned_changes
        if not self._idle:
            self._idle_in_order = True
            return []
        gap = self._gap_p90()
        least = min(min(self.max_hold, gap), min(self.max_hold, gap * MID_SESSION_HOLD))
        ended, asked = [], self._idle_fresh
        for gid in self._idle:
            g = self._groups[gid]
            if now - g.last_done < least:
                break
            if gid not in asked and not self._held(g, now):
                ended.append(g)
        fresh: dict[str, None] = {}
        for gid in asked:
            g = self._groups[gid]
            if not self._held(g, now):
                ended.append(g)
            elif not self._hold_for(g):
                fresh[gid] = None  # held with a hold of 0: answered after `now` (a test's clock)
        self._idle_fresh = fresh
        ended.sort(key=lambda g: g.entered)
        return ended

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
            candidates = list(heads.values())
            if self.runs is not None and not self._cache_bound():
                # With the engine loaded, runs much larger than another under way wait; of
                # the rest, the runs expected to be smallest go first.
                if self._in_flight >= self.running:
                    smallest = self._smallest_runs()
                    held = [t for t in candidates if now - t.arrived < self.order_wait
                            and self._larger_run(t, smallest)]
                    for t in held:
                        if not t._held:
                            t._held = True
                            self.held_for_smaller += 1
                    candidates = [t for t in candidates if t not in held]
                    if not candidates:
                        break
                candidates.sort(key=self._order_key)
            resident = [t for t in candidates if t.group in self._groups]
            if resident:
                g = self._groups[resident[0].group]
                if self._make_room(resident[0], g):
                    self._suspend(g, calling=True)  # then waits as a session under way
                else:
                    self._take(resident[0], "resident")
                continue
            # Sessions under way finish before new ones start (their history is partly
            # computed, and an agent half done is worth more than one not begun); then new
            # sessions, as `_new_session_key` says. When the first does not fit, the first
            # after it that does goes in (backfill): a small session need not wait, with the
            # engine half idle, while a large one waits for room.
            returning = [t for t in candidates if t.group in self._sessions]
            new = [t for t in candidates if t.group not in self._sessions]
            if new:
                sharing = Counter(h for t in new for h in t.chain if h not in self._refs)
                new.sort(key=lambda t: self._new_session_key(t, sharing))
            ranked = returning + new
            reserved = self._reserved_tokens()
            fit = next((t for t in ranked if self._fits(t, reserved)), None)
            if fit is not None:
                how = ("returned" if fit.group in self._sessions else
                       "waited" if fit is ranked[0] else "backfill")
                self._take(fit, how)
            elif self._spare() and (fit := next(
                    (t for t in ranked if self._fits(t, reserved, self._spare_fill())), None)):
                self._take(fit, "spare")
            elif self._engine_idle():
                self._take(ranked[0], "idle")
            else:
                break
        self._schedule()

    def _new_session_key(self, t: Ticket, sharing: Counter) -> tuple[int, float, int]:
        """Which new session goes first. A run is done when its last agent is: a debater
        let in while the other two wait holds its share of the cache and cannot start its
        second round, and a map's last branch keeps the reduce waiting. So the agents of
        runs under way go before runs not begun. Then the least cache held for the least
        work: the tokens the session adds to the cache times its run's expected size (a
        short run with a long document and a long run with a small prompt both hold the
        cache a while; where sizes are unknown, the tokens alone). A prefix that waiting
        sessions share (`sharing`: waiting sessions per prefix not resident) is computed
        once for all of them, so each is charged its share: three agents waiting with one
        4,600-token system prompt are not each the most costly newcomer."""
        increment = self._increment(t, sharing)
        if self.runs is None:
            return (0, increment, t._seq)
        run = self.runs.get(t.run) if t.run else None
        begun = run is not None and run.admitted > 0
        size = self.runs.expected_size(run) if run is not None else None
        return (0 if begun else 1, increment * (size or 1.0), t._seq)

    def _order_key(self, t: Ticket) -> tuple[int, int]:
        """Smaller runs first, by size class (a factor of SIZE_RATIO apart); within a class,
        as they came."""
        run = self.runs.get(t.run) if t.run else None
        size = self.runs.expected_size(run) if run is not None else None
        return (_size_class(size), t._seq)

    def _cache_bound(self) -> bool:
        """The sessions admitted, at the size they grow to, fill the cache's share: then the
        cache decides who goes, and ordering holds nothing back (holding a session that has
        its history resident keeps its share of the cache idle)."""
        return self._reserved_tokens() > self.fill * (self.capacity_tokens or 0)

    def _smallest_runs(self) -> list[tuple[float, str]]:
        """The two smallest expected sizes among runs under way (a call pending, or within
        their tool time), with their runs."""
        now, gap = time.monotonic(), self._gap_p90()
        sizes = []
        for run in self.runs.active():
            if run.pending or now - run.last < gap:
                size = self.runs.expected_size(run)
                if size is not None:
                    sizes.append((size, run.id))
        return heapq.nsmallest(2, sizes)

    def _larger_run(self, t: Ticket, smallest: list[tuple[float, str]] | None = None) -> bool:
        """Another run under way is expected to be at most 1/SIZE_RATIO of the size of this
        call's run."""
        run = self.runs.get(t.run) if t.run else None
        mine = self.runs.expected_size(run) if run is not None else None
        if mine is None:
            return False
        for size, rid in self._smallest_runs() if smallest is None else smallest:
            if rid != run.id:
                return size * SIZE_RATIO <= mine
        return False

    def _make_room(self, t: Ticket, g: Group) -> bool:
        """Room in the cache for a resident session's next call, setting aside younger
        sessions between calls where it would take the resident set past the cache. True
        when that is not enough while an older session is resident: then this one waits
        (`suspend`) instead. Left as it is, every session's history would be evicted before
        it came back (a cache is no use to a loop larger than itself); set aside, the older
        sessions run with theirs resident and finish. Only sessions nothing was reserved
        for are set aside (`_unplanned`), and never one with a call in flight."""
        if not self.suspend or g.in_flight or not self.capacity_tokens:
            return False
        limit = SUSPEND_ABOVE * self.capacity_tokens
        if self._resident_tokens() + self._increment(t) <= limit:
            return False
        born = self._age(g)
        younger = sorted((x for x in self._groups.values() if x is not g and not x.in_flight
                          and self._age(x) > born and self._unplanned(x)),
                         key=self._age, reverse=True)
        for x in younger:
            self._suspend(x)
            if self._resident_tokens() + self._increment(t) <= limit:
                return False
        return self._unplanned(g) and any(self._age(x) < born
                                          for x in self._groups.values() if x is not g)

    def _age(self, g: Group) -> float:
        return self._born.get(g.id, (0.0, False))[0]

    def _unplanned(self, g: Group) -> bool:
        """Nothing was known of the size the session's agent grows to when it was let in,
        so nothing was reserved for its growth. Only these are set aside: where sizes are
        learned, admission's reservations keep the cache. (Setting aside any session as well,
        the youngest first, gained nothing: agent loops at 2x pressure 24.3 s at the median,
        at 4x 39.3 s with makespan 0.90x of direct, against 23.2-24.1 s and 37.2-41.3 s
        without; at 4x it set aside the sessions an idle engine had let in.)"""
        return self._born.get(g.id, (0.0, False))[1]

    def _under_way(self, group: str) -> None:
        """A session sent another call: it had not finished, whenever it is let in."""
        if self._leaving.pop(group, None) is None and group in self._finished:
            del self._finished[group]
            self._forget_learned()

    def _suspend(self, g: Group, calling: bool = False) -> None:
        """Set a resident session aside: its next call (`calling`: the one arriving now)
        waits as a returning session, until it fits the cache as it is then. One set aside
        between calls may have made its last: it is released as after its hold."""
        log.debug("suspended %s after %d calls: %d of %d tokens resident", g.id, g.calls,
                  self._resident_tokens(), self.capacity_tokens or 0)
        self._release(g, between_calls=not calling)
        self._suspended[g.id] = None
        while len(self._suspended) > MAX_SESSIONS:
            self._suspended.pop(next(iter(self._suspended)))
        self.suspended += 1

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
        deadlines = []
        for t in self._waiting:  # the next bound each call reaches (a passed one is no news)
            due = t.arrived + self.order_wait
            deadlines.append(due if self.runs is not None and due > now
                             else t.arrived + self.max_wait)
        deadlines += [g.last_done + self._hold_for(g) for g in self._groups.values()
                      if not g.in_flight]
        if self.runs is not None:  # a run's tool time ends: larger runs may go
            gap = self._gap_p90()
            deadlines += [r.last + gap for r in self.runs.active()
                          if not r.pending and r.last + gap > now]
        if self._in_flight < max(1, self.spare_below):  # its recent load falls meanwhile
            deadlines.append(now + IDLE_RECHECK)
        delay = max(0.0, min(deadlines) - now) + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay, self._release_ready)
