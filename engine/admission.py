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
  charged by its share, times the work its run has left). When the first in that order does
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
  for their growth, and they all go in. When they then outgrow the cache, the youngest
  between calls are set aside until they fit (`suspend`, `engine.set_aside`): the older
  sessions run with their histories resident and finish.
- With no capacity known, or no pressure, every request goes straight in: an unpressured
  engine never waits on admission.
- Workflows sharing the engine are served least work left first (`ordering`,
  `engine.ordering`): with `running` calls in flight, a run with much more work left than
  the size of another run under way waits for it, at most `order_wait`. Runs of about one
  size are never held, so sessions of one agent keep the order above.
- Under pressure, the engine is told what admission knows (`Ticket.priority`, sent as vLLM's
  `priority`): continuations of sessions under way run before new sessions' first calls, and
  when the running calls outgrow the cache, vLLM preempts a new session, not one mid-loop.
  Where the engine honours eviction hints (preheat's plugin, `engine.vllm_plugin`), a
  session's call expected to be its last asks for its blocks to be evicted first
  (`evict_done`), and so does a guest's.

- What it learned of agents' sessions (`engine.footprints`) and of workflow run sizes is
  saved by the proxy (`snapshot()`) and `restore()`d at start.

The controller is pure asyncio and knows nothing of HTTP: the proxy calls `enter()` before
forwarding and `leave()` when the answer is complete. It keeps its books in `engine.resident`
(the resident set), `engine.footprints` (what it learns), `engine.set_aside` and
`engine.load` (the engine's recent load); `engine.tickets` has its data types.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from typing import Any, Callable, Container, Sequence

from engine.footprints import Footprints
from engine.load import LoadMeter
from engine.ordering import larger_than, order_key, run_and_left, smallest_runs, tool_time_ends
from engine.resident import ResidentSet
from engine.runs import PREFILL_WEIGHT, Runs
from engine.set_aside import RESUME_BELOW, SUSPEND_ABOVE, SetAside
from engine.tickets import AdmissionStats, Group, Ticket, prompt_chain

__all__ = ["Admission", "AdmissionStats", "Group", "Ticket", "prompt_chain"]

log = logging.getLogger("preheat.admission")
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
OVERSIZE = 1.25
"""A prompt estimated at this many times the KV cache goes to the engine at once: no cache
that small holds it, so waiting for room is in vain, and vLLM refuses a prompt over its
context (at most the cache) at once. Above 1, as the estimate runs high (characters per token
not yet calibrated)."""
GUEST_BUSY_BELOW = 0.9
"""Guests go in only while the engine's busy share over the last BUSY_WINDOW seconds is below
this (the default of `Admission.guest_busy_below`): a guest's history is evicted first, so
each of its calls prefills most of its prompt again, and on an engine that is never idle that
compute is taken from the resident sessions. On the AVX2 machine, its engine five times
slower than the usual EPYC's, the agent loops at 2x pressure gave 2.57x with this against
1.76x with guests whenever they fit and 2.43x with none (makespan 1.68x, 1.49x, 1.60x), and
with the tool gaps five times as long 1.75x against 1.47x and 1.22x (makespan 1.30x, 1.20x,
0.95x: without guests the engine sat idle while work waited); the mixed workload 1.32x
either way, makespan 1.18x against 1.09x. Guests that prefill little go in regardless
(`GUEST_CHEAP`): the tau-bench agents under pressure, whose guests share a 4,608-token head
with the residents, gave 1.17x with this rule alone against 1.50x (bench/NOTEBOOK.md,
"Guests on an engine with idle time only"). A second turn of each gave the loops 2.30x
against 1.89x, the mixed workload 2.45x against 1.67x, the tau-bench agents 1.32x against
1.35x ("The guest rule, second turns")."""
GUEST_CHEAP = 0.5
"""A guest whose prompt is mostly held by the resident sessions (all but at most this share:
the tau-bench agents' 4,608-token head) prefills little of it, and goes in however busy the
engine (`GUEST_BUSY_BELOW`)."""
SPARE_RAISE = 1.2
SPARE_SPAN = 5.0
"""Seconds of the resident set's history before its average load is trusted (the first
calls of a burst are all prefill, and say nothing of the tool time to come)."""
MID_SESSION_HOLD = 2.5
"""A session short of the usual number of calls is held this many times the tool gap."""
PRIORITY = {"resident": -1, "returned": -1}
"""vLLM `priority` (lower runs first, and is preempted last) by how a call was admitted under
pressure: a session under way before one that starts. Without pressure every call keeps the
engine's default, 0. (Also sending work let in over the cache's size at +1 measured worse:
mixed workload median 39.9, 39.8 and 30.4 s in three runs, 29.5 and 28.9 s in two without.)"""


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
        guests: bool = False,
        evict_done: bool = False,
        handoff: bool = True,
        guest_busy_below: float = GUEST_BUSY_BELOW,
        bound_guests: bool = False,
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.handoff = handoff
        """A new session its idle run waits for goes in at once (`_awaited`)."""
        self.evict_done = evict_done
        """Under pressure, a session's call expected to be its last asks the engine to evict
        its blocks first once answered (`Ticket.evict_first`; all but the head other sessions
        have sent): left as any call's, a finished session's history is the newest in the
        cache, and the engine evicts the histories of sessions still under way before it."""
        self.last_calls = 0
        """Calls sent to be evicted first as their session's last (`evict_done`)."""
        self.guests = guests
        """A session that would wait for a place runs now as a guest instead, while its
        prompt fits the cache beside the resident sessions' histories and the guests' calls
        in flight: the engine evicts a guest's blocks before any resident session's
        (`Ticket.evict_first`), so the guests thrash among themselves, and the engine is not
        left half idle while they wait for a wave."""
        self.guest_busy_below = guest_busy_below
        """Guests go in only while the engine's busy share is below this (`GUEST_BUSY_BELOW`;
        1 or more: whenever they fit)."""
        self.bound_guests = bound_guests
        """With guests on, a call let go at `max_wait` whose session is not resident goes in
        as a guest (`_let_go`)."""
        self._guest_calls: dict[int, int] = {}
        """The guests' calls in flight (by ticket id) and their estimated prompt tokens."""
        self._guest_sessions: dict[str, None] = {}
        """Sessions under way that have run only as guests: one goes in as a new session
        does, with room for all it will grow to (its history was evicted first, so it
        holds nothing yet), though it waits, when it waits, as a session under way."""
        self.spare_below = spare_below
        """Calls on the engine at once, on average, below which waiting sessions go in up
        to SPARE_RAISE x `fill` (`SPARE_BELOW`; 0: never)."""
        self.suspend = suspend
        """When sessions of agents whose sizes are not yet learned outgrow the cache, the
        youngest between calls waits until there is room again, and the older ones keep
        their histories resident."""
        self.runs = Runs() if ordering else None
        """Workflow runs, for serving the run with the least work left first."""
        self.running = running
        """With ordering: calls in flight beyond which a run much larger than another run
        under way waits (`engine.ordering.SIZE_RATIO`)."""
        self.order_wait = min(order_wait, max_wait)
        """The longest a call waits for smaller runs (a long conversation on an engine that
        is always busy is not put off for the whole `max_wait`)."""
        self.fill = fill
        self.max_wait = max_wait
        self.hold = hold
        self.max_hold = max_hold
        self._footprints = Footprints()
        """What admission learned of agents' sessions (their sizes, calls and tool gaps)."""
        self._resident = ResidentSet()
        """The resident groups, the tokens they hold, and which are between calls."""
        self._groups = self._resident.groups
        """Resident groups: their prompts are what the cache should hold (`_resident`'s)."""
        self._sessions = self._resident.sessions
        """Every session seen lately, resident or not (`_resident`'s): those are under way."""
        self._waiting: deque[Ticket] = deque()
        self._seq = itertools.count()
        self._in_flight = 0
        self._load = LoadMeter(time.monotonic())
        """The calls in flight over the last BUSY_WINDOW seconds (`_load_mean`, `_busy_share`)."""
        self._timer: asyncio.TimerHandle | None = None
        self.admitted: dict[str, int] = {}
        self.max_wait_seen = 0.0
        self.held_for_smaller = 0
        """Calls that waited for a smaller workflow run (ordering)."""
        self.suspended = 0
        """Sessions set aside mid-way because the resident set outgrew the cache."""
        self._aside = SetAside()
        """When each session was first let in, and which are set aside (`suspend`)."""

    # -- the proxy's calls -------------------------------------------------------------

    def ticket(self, chain: Sequence[str], message_chars: Sequence[int],
               session: str | None = None,
               hashes: Callable[[], list[int]] | None = None) -> Ticket:
        """A ticket for a prompt given as message prefix hashes and message lengths;
        `hashes` gives the prompt's chunk hashes (`engine.runs.prompt_hashes`), asked for
        only when ordering needs them (the first call of a new session)."""
        chain = tuple(chain)
        chars = tuple(message_chars)
        cpt = self._footprints.chars_per_token
        sizes = tuple(max(1, int(c / cpt)) for c in chars)
        group = session or self._resident.group_of(chain) or f"g{next(self._seq)}"
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
            self._footprints.under_way(t.group)  # not finished, though it may wait (set aside)
        if t.run and not t._pending:
            t._pending = True
            self.runs.arrived(t.run)
        if self.capacity_tokens is None:
            self._admit(t, "direct")
        elif (sum(t.sizes) > OVERSIZE * self.capacity_tokens
              and not any(w.group == t.group for w in self._waiting)):
            self._admit(t, "oversize")  # no room will ever hold it: the engine refuses it now
        elif self.runs is not None and (self._waiting or self._in_flight >= self.running):
            await self._wait(t)  # the least work left first
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
        elif not self._waiting and self._fits_guest(t, g):
            self._admit_guest(t)
        else:
            await self._wait(t)

    async def _wait(self, t: Ticket) -> None:
        t._future = asyncio.get_running_loop().create_future()
        t._seq = next(self._seq)
        self._waiting.append(t)
        self._release_ready()  # it may go at once behind one that waits (backfill, a guest)
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
        if self._guest_calls.pop(id(t), None) is not None:
            self._running(-1)
            self._release_ready()
            return
        g = self._groups.get(t.group)
        if g is None or t.admitted is None:
            return
        if g.in_flight:
            g.in_flight -= 1
            self._running(-1)
        if refused and not g.in_flight and self._footprints.calls_made(g.id) <= 1:
            self._footprints.refused(g.id)
            self._aside.born.pop(g.id, None)
            self._release(g, between_calls=False)
            self._release_ready()
            return
        g.output_tokens = max(g.output_tokens, output_tokens)
        g.last_done = time.monotonic()
        if not g.in_flight:
            self._resident.between_calls(g)
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
        self._footprints.calibrate(prompt_chars, prompt_tokens)

    @property
    def chars_per_token(self) -> float:
        """The estimate of a prompt's tokens from its JSON characters (`calibrate`)."""
        return self._footprints.chars_per_token

    @chars_per_token.setter
    def chars_per_token(self, value: float) -> None:
        self._footprints.chars_per_token = value

    @property
    def guest_calls(self) -> int:
        """Guests' calls on the engine now."""
        return len(self._guest_calls)

    @property
    def pressured(self) -> bool:
        """Requests are waiting, guests run, or the resident working set has filled its share."""
        if self.capacity_tokens is None:
            return False
        return (bool(self._waiting) or bool(self._guest_calls)
                or self._resident.tokens() > self.fill * self.capacity_tokens)

    def stats(self) -> AdmissionStats:
        self._expire()
        return AdmissionStats(
            self.capacity_tokens, len(self._groups), self._resident.tokens(), len(self._waiting),
            dict(self.admitted), self.max_wait_seen,
        )

    # -- what it learned, across restarts ----------------------------------------------------

    def snapshot(self) -> dict:
        """What admission has learned, as plain JSON, to start from after a restart: what
        it learned of agents' sessions (`Footprints.snapshot`), and the sizes of the
        workflow runs that ended."""
        self._expire()
        data = self._footprints.snapshot(self._groups.values())
        data["runs"] = self.runs.snapshot() if self.runs is not None else []
        return data

    def restore(self, data: Any) -> int:
        """Start from a `snapshot()` (an earlier process's): its sessions count as finished
        before any finished now, so sessions finished since replace them in turn. Returns
        the sessions restored; a snapshot that cannot be read changes nothing (0)."""
        try:
            learned = self._footprints.read(data, self.max_hold)
            runs = list(data.get("runs", []))
            if self.runs is not None:
                self.runs.restore(runs)
        except (TypeError, ValueError, AttributeError) as exc:
            log.warning("could not restore admission's snapshot (%s); learning afresh", exc)
            return 0
        self._footprints.restore(*learned)
        return len(learned[0])

    # -- working set ---------------------------------------------------------------------

    def expected_footprint(self, kind: str | None = None) -> int:
        """Own tokens a session grows to (upper quartile of recent finished sessions of the
        same kind, or of all where none of that kind finished; 0 unknown)."""
        return self._footprints.learned(kind)[1]

    def expected_calls(self, kind: str | None = None) -> int:
        """Calls a session makes (upper quartile, as `expected_footprint`)."""
        return self._footprints.learned(kind)[2]

    def _reserved_tokens(self) -> int:
        """The resident set now, plus the growth its sessions are expected to have."""
        growth = sum(max(0, self.expected_footprint(g.kind) - g.own_tokens)
                     for g in self._groups.values())
        return self._resident.tokens() + growth

    def _fits(self, t: Ticket, reserved: int | None = None, fill: float | None = None) -> bool:
        if not self._groups:
            return True  # an empty engine takes anything, however large
        budget = (fill or self.fill) * (self.capacity_tokens or 0)
        need = self._resident.increment(t)
        if t.group not in self._sessions or t.group in self._guest_sessions:
            need = max(need, self.expected_footprint(t.kind))  # room for all it will grow to
        if reserved is None:
            reserved = self._reserved_tokens()
        if t.group in self._aside.suspended and (self._resident.tokens() + need
                                                 > RESUME_BELOW * (self.capacity_tokens or 0)):
            return False  # set aside for want of room: back when there is room now
        return reserved + need <= budget

    def _measure(self, g: Group) -> None:
        g.own_tokens = self._resident.own_tokens(g)
        self._footprints.measured(g.id, g.own_tokens, g.calls)

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

    def busy_share(self) -> float:
        """Share of the last BUSY_WINDOW seconds with an admitted call on the engine."""
        return round(self._busy_share(), 2)

    def _spare(self) -> bool:
        """The engine has had few calls at once lately (`SPARE_BELOW`)."""
        load = self._load_mean()
        return load is not None and load < self.spare_below

    def _spare_fill(self) -> float:
        return self.fill * SPARE_RAISE

    def _fits_guest(self, t: Ticket, g: Group | None = None) -> bool:
        """Guests on, the engine idle some of the time lately (`guest_busy_below`), the
        session is not resident, and its prompt fits the cache now beside the resident
        histories and the guests' calls in flight (no growth is reserved: a guest's blocks go
        first)."""
        if not self.guests or not self.capacity_tokens or g is not None:
            return False
        if t.group in self._aside.suspended:
            return False  # set aside to keep the older sessions' histories: it waits
        added = self._resident.increment(t)
        if (self.guest_busy_below < 1 and self._busy_share() >= self.guest_busy_below
                and added > GUEST_CHEAP * sum(t.sizes)):
            return False  # a busy engine: its prefill would be taken from the residents
        used = self._resident.tokens() + sum(self._guest_calls.values())
        return used + added <= self.capacity_tokens

    def _awaited(self, t: Ticket) -> bool:
        """A new session that its run waits on: it joined a run by reading that run's
        answers, and every session of the run resident here is between calls (an actor
        waiting for its critic, a supervisor for its worker, a chain for its next step).
        Those sessions keep their place in the cache while they wait, so a hand-off that
        waited for room would wait for the very sessions waiting for it (on the mixed
        workload with distinct answers, the reflections' critics waited 2.4 and 4.1 s
        beside their idle actors, at the end of the run). It goes in at once, as a guest
        where guests are on, its blocks evicted first."""
        if (not self.handoff or self.runs is None or not t.run or t.group in self._sessions
                or not self.runs.hand_off(t.group)):
            return False
        rid = self.runs.find(t.run)
        mates = [g for g in self._groups.values() if self.runs.run_of(g.id) == rid]
        return bool(mates) and not any(g.in_flight for g in mates)

    def _admit_guest(self, t: Ticket, how: str = "guest") -> None:
        """Let a call go as a guest: counted as load, not as a resident session."""
        self._count_in(t, how)
        t.evict_first = keep = self._head(t, self._resident.refs)  # what residents hold
        added = int(self._resident.increment(t))
        self._guest_calls[id(t)] = added
        # Remembered, not resident: its next call is the same session, under way (first in
        # line when it waits), with its calls counted (`_guest_sessions`).
        self._remember(Group(t.group, t.kind, chain=t.chain))
        self._guest_sessions[t.group] = None
        self._footprints.measured(t.group, added, self._footprints.calls_made(t.group) + 1)
        self._running(+1)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("admitted %s as a guest after %.2f s (keeping %d tokens); %d guest "
                      "calls, %d of %d tokens resident", t.group, t.waited, keep,
                      len(self._guest_calls), self._resident.tokens(), self.capacity_tokens)
        self._wake(t)

    @staticmethod
    def _head(t: Ticket, kept: Container[str]) -> int:
        """Tokens of the call's leading messages whose prefixes are in `kept`."""
        head = 0
        for h, size in zip(t.chain, t.sizes):
            if h not in kept:
                break
            head += size
        return head

    def _load_mean(self) -> float | None:
        """Admitted calls in flight, on average (`LoadMeter.mean`; None before SPARE_SPAN)."""
        return self._load.mean(time.monotonic(), SPARE_SPAN)

    def _busy_share(self) -> float:
        return self._load.busy_share(time.monotonic())

    def _running(self, delta: int) -> None:
        """Track the admitted calls running (for `_load_mean` and `_busy_share`)."""
        self._in_flight += delta
        self._load.changed(time.monotonic(), self._in_flight)

    def _held(self, g: Group, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - g.last_done < self._hold_for(g)

    def _hold_for(self, g: Group) -> float:
        """How long an idle group keeps its place: its agent's tool time, and longer while
        the session is shorter than sessions usually are (so it is surely coming back)."""
        if not g.calls or self._footprints.done(g.kind, g.calls):
            return 0.0
        hold = self._gap_p90()
        if g.calls < self.expected_calls(g.kind):
            hold *= MID_SESSION_HOLD
        return min(self.max_hold, hold)

    def _gap_p90(self) -> float:
        """The tool time to hold an idle session for (`Footprints.gap_p90`)."""
        return self._footprints.gap_p90(self.hold)

    def _count_in(self, t: Ticket, how: str) -> float:
        """Mark the call let go now, `how`, and count it (and its run as under way, whether
        it goes in resident or as a guest); returns the time."""
        now = time.monotonic()
        t.admitted, t.how = now, how
        self.admitted[how] = self.admitted.get(how, 0) + 1
        if t.run and self.runs is not None:
            self.runs.admitted(t.run)
        self.max_wait_seen = max(self.max_wait_seen, t.waited)
        return now

    def _remember(self, g: Group) -> None:
        """Keep the session findable by its latest prompt; forget what the resident set
        forgot (the oldest sessions, past its bound)."""
        for gid in self._resident.remember(g):
            self._aside.forget(gid)
            self._guest_sessions.pop(gid, None)

    @staticmethod
    def _wake(t: Ticket) -> None:
        """Let a waiting call's `enter` return."""
        if t._future is not None and not t._future.done():
            t._future.set_result(None)

    def _admit(self, t: Ticket, how: str) -> None:
        now = self._count_in(t, how)
        if self.pressured and not (self.runs is not None and not self._cache_bound()
                                   and self._larger_run(t)):
            t.priority = PRIORITY.get(how, 0)  # (a run larger than one under way: no boost)
        g = self._groups.get(t.group)
        if g is None:
            self._guest_sessions.pop(t.group, None)
            if not self._groups:
                self._load.occupied_since = now
            g = self._resident.add(t.group, t.kind)
            if t.group not in self._aside.born:
                self._aside.first_in(t.group, now, self.expected_footprint(t.kind) == 0)
            self._aside.suspended.pop(t.group, None)
            g.calls = self._footprints.calls_made(t.group)  # a session returning to the cache
            self._footprints.under_way(t.group)  # (it may have been released while it waited)
        if g.in_flight == 0 and g.calls:
            # The client's own tool or think time: from the last answer to this call's
            # arrival, not to its admission (waiting here is not a gap to hold for).
            self._footprints.tool_gap(t.arrived - g.last_done, self.max_hold)
        g.in_flight += 1
        self._resident.called(g)
        self._running(+1)
        g.calls += 1
        self._resident.set_chain(g, t.chain, t.sizes)
        self._remember(g)
        self._measure(g)
        if self.evict_done and self.pressured and self._footprints.done(g.kind, g.calls):
            t.evict_first = self._head(t, self._resident.shared)  # a head others send too
            self.last_calls += 1
        if log.isEnabledFor(logging.DEBUG):
            load = self._load_mean()
            log.debug("admitted %s call %d (%s) after %.2f s; %d groups, %d of %d tokens "
                      "(%d reserved), %d in flight (%s on average), %d waiting",
                      t.group, g.calls, how, t.waited, len(self._groups),
                      self._resident.tokens(), self.capacity_tokens or 0,
                      self._reserved_tokens(), self._in_flight,
                      "-" if load is None else f"{load:.2f}", len(self._waiting))
        self._wake(t)

    def _release(self, g: Group, between_calls: bool = True) -> None:
        """Take a group out of the resident set. One between calls may have finished: it
        counts as finished if it stays away as long again as its hold (at once if done)."""
        if between_calls and g.id in self._footprints.profiles:
            self._footprints.left(g.id, g.kind, g.last_done + 2 * self._hold_for(g))
        self._resident.remove(g)
        if not self._groups:
            self._load.occupied_since = None

    def _expire(self) -> None:
        if self.runs is not None:
            self.runs.expire()
        for g in self._hold_ended(time.monotonic()):
            log.debug("released %s after %d calls (held %.1f s)", g.id, g.calls,
                      self._hold_for(g))
            self._release(g)
        self._footprints.expire(time.monotonic())

    def _hold_ended(self, now: float) -> list[Group]:
        """The groups between calls whose hold has ended, in the resident set's order
        (`ResidentSet.hold_ended`). A group's hold is 0 when it is done, else one of two
        values the same for all (the tool gap, or MID_SESSION_HOLD times it, at most
        `max_hold`): a group not done is held at least the lesser of the two."""
        return self._resident.hold_ended(now, self._footprints.changes, self._least_hold,
                                         self._hold_for)

    def _least_hold(self) -> float:
        gap = self._gap_p90()
        return min(min(self.max_hold, gap), min(self.max_hold, gap * MID_SESSION_HOLD))

    # -- the waiting queue ---------------------------------------------------------------

    def _release_ready(self) -> None:
        self._expire()
        now = time.monotonic()
        while self._waiting:
            overdue = [t for t in self._waiting if now - t.arrived >= self.max_wait]
            if overdue:
                self._let_go(overdue[0])
                continue
            heads: dict[str, Ticket] = {}
            for t in self._waiting:  # calls of one group keep their order
                heads.setdefault(t.group, t)
            candidates = list(heads.values())
            if self.runs is not None and not self._cache_bound():
                # With the engine loaded, runs with much more work left than the size of
                # another run under way wait; of the rest, the least work left goes first.
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
                candidates.sort(key=lambda t: order_key(self.runs, t))
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
                refs = self._resident.refs
                sharing = Counter(h for t in new for h in t.chain if h not in refs)
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
            elif awaited := next((t for t in ranked if self._awaited(t)), None):
                self._waiting.remove(awaited)
                if self.guests:
                    self._admit_guest(awaited, "handoff")
                else:
                    self._admit(awaited, "handoff")
            elif guest := next((t for t in ranked if self._fits_guest(t)), None):
                self._waiting.remove(guest)
                self._admit_guest(guest)
            else:
                break
        self._schedule()

    def _new_session_key(self, t: Ticket, sharing: Counter) -> tuple[int, float, int]:
        """Which new session goes first. A run is done when its last agent is: a debater
        let in while the other two wait holds its share of the cache and cannot start its
        second round, and a map's last branch keeps the reduce waiting. So the agents of
        runs under way go before runs not begun. Then the least cache held for the least
        work: the tokens the session adds to the cache times the work its run has left (a
        short run with a long document and a long run with a small prompt both hold the
        cache a while; where sizes are unknown, the tokens alone). A prefix that waiting
        sessions share (`sharing`: waiting sessions per prefix not resident) is computed
        once for all of them, so each is charged its share: three agents waiting with one
        4,600-token system prompt are not each the most costly newcomer."""
        increment = self._resident.increment(t, sharing)
        if self.runs is None:
            return (0, increment, t._seq)
        run, size = run_and_left(self.runs, t)
        begun = run is not None and run.admitted > 0
        return (0 if begun else 1, increment * (size or 1.0), t._seq)

    def _cache_bound(self) -> bool:
        """The sessions admitted, at the size they grow to, fill the cache's share: then the
        cache decides who goes, and ordering holds nothing back (holding a session that has
        its history resident keeps its share of the cache idle)."""
        return self._reserved_tokens() > self.fill * (self.capacity_tokens or 0)

    def _smallest_runs(self) -> list[tuple[float, str]]:
        return smallest_runs(self.runs, time.monotonic(), self._gap_p90())

    def _larger_run(self, t: Ticket, smallest: list[tuple[float, str]] | None = None) -> bool:
        """Another run under way is expected to be at most 1/SIZE_RATIO of the work this
        call's run has left (`engine.ordering`)."""
        run, mine = run_and_left(self.runs, t)
        if mine is None:
            return False
        return larger_than(run, mine, self._smallest_runs() if smallest is None else smallest)

    def _make_room(self, t: Ticket, g: Group) -> bool:
        """Room in the cache for a resident session's next call, setting aside younger
        sessions between calls where it would take the resident set past the cache. True
        when that is not enough while an older session is resident: then this one waits
        (`suspend`) instead. Left as it is, every session's history would be evicted before
        it came back (a cache is no use to a loop larger than itself); set aside, the older
        sessions run with theirs resident and finish. Only sessions nothing was reserved
        for are set aside (`SetAside.unplanned`), and never one with a call in flight."""
        if not self.suspend or g.in_flight or not self.capacity_tokens:
            return False
        limit = SUSPEND_ABOVE * self.capacity_tokens
        if self._resident.tokens() + self._resident.increment(t) <= limit:
            return False
        for x in self._aside.younger(g, self._groups.values()):
            self._suspend(x)
            if self._resident.tokens() + self._resident.increment(t) <= limit:
                return False
        return self._aside.waits(g, self._groups.values())

    def _suspend(self, g: Group, calling: bool = False) -> None:
        """Set a resident session aside: its next call (`calling`: the one arriving now)
        waits as a returning session, until it fits the cache as it is then. One set aside
        between calls may have made its last: it is released as after its hold."""
        log.debug("suspended %s after %d calls: %d of %d tokens resident", g.id, g.calls,
                  self._resident.tokens(), self.capacity_tokens or 0)
        self._release(g, between_calls=not calling)
        self._aside.aside(g.id)
        self.suspended += 1

    def _let_go(self, t: Ticket) -> None:
        """A call at the wait bound goes in whatever the cache holds. Let in as a resident
        session, it stays one, and with the cache full its history evicts those of the
        sessions that fit, call after call (at 4x pressure on the AVX2 machine, the
        sessions let go at the bound joined the three resident ones and all thrashed). As a
        guest (`bound_guests`), its blocks go first once it is answered, and its session's
        next call waits first in line, as a session under way, until it fits: so only where
        it can take the place a resident session of its agent leaves (`_takes_a_place`).
        Another waits at every call for room that may come only as the cache empties (on
        the mixed workload the switch without that rule lost, 1.72x and 2.08x of direct
        against 2.02x and 2.75x: the dear sessions let go at the bound, reflections and a
        debate, end the run, and as guests they waited again at each call; on the loops at
        4x it gave 2.22x and 2.36x against 2.09x and 1.39x,
        bench/results/e2e-avx2-bound-guest.md): it goes in as a resident. Off by default."""
        if (self.bound_guests and self.guests and t.group not in self._groups
                and self._takes_a_place(t)):
            self._waiting.remove(t)
            self._admit_guest(t, "timeout-guest")
        else:
            self._take(t, "timeout")

    def _takes_a_place(self, t: Ticket) -> bool:
        """A resident session is of the same agent (`kind`), and the session, at all it is
        expected to grow to, is no larger than the place such a one holds or is expected
        to grow to: it can take the place one leaves, as the agents of one fleet do. (That it
        fits once one has gone, growth reserved, is too strict: on the loops at 4x the
        three resident loops reserve past the cache's share, and no call went as a guest.)"""
        places = [max(g.own_tokens, self.expected_footprint(g.kind))
                  for g in self._groups.values() if g.kind == t.kind]
        need = max(self._resident.increment(t), self.expected_footprint(t.kind))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s (kind %s) at the bound needs %d tokens; %d of %d resident sessions "
                      "are of its kind, the largest place %d", t.group, t.kind[:8], need,
                      len(places), len(self._groups), max(places, default=0))
        return bool(places) and need <= max(places)

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
            deadlines += tool_time_ends(self.runs, now, self._gap_p90())
        if self._in_flight < max(1, self.spare_below):  # its recent load falls meanwhile
            deadlines.append(now + IDLE_RECHECK)
        delay = max(0.0, min(deadlines) - now) + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay, self._release_ready)
