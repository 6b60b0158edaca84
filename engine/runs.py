"""Workflow runs as a call arrives, and how much work each has left.

One engine serves several workflows at once, and they differ in size: a trading desk makes
~88 calls, a reflection three. Served together, every call shares each decode step with all
the others, so the three-call workflow takes as long as the big one's busiest minute
(bench/results/alone.md: the short workflows' median 10.3 s alone, 28.7 s together).
Admission serves the runs with the least work left first (`Admission`'s ordering), and
this module says which run a call belongs to, how large that run is expected to be, and
how much work it has left, before the call is forwarded:

- A call continuing a session is in that session's run.
- A new session's prompt that contains an earlier answer (a summariser reading its experts,
  a debater the others, a hand-off) is in that answer's run. Answers are known by the
  content-defined chunks of their text (`learn.dataflow.chunks`, hashed with xxhash so the
  observer process, which reads the answers, and the proxy agree) and by the ids of the tool
  calls they make (a hand-off that says nothing, `transfer_to_...`, is sent on with its call
  id); the observer reports them with each call's usage (`answer_hashes`). A prompt that
  arrived before its source's answer was reported is placed again when its own answer is,
  and the two runs become one.
- A new session with neither starts a run, or joins the run of another root started within
  `together` seconds before it (agents a framework launches at once, or one after another),
  while that run is under `BURST` seconds old.

A run's size is its service: output tokens plus `PREFILL_WEIGHT` per uncached prompt token
(a decode token costs a step; a prefill token a share of one). Runs idle for `idle` seconds
have ended, and their sizes are kept per kind (the smallest of the agent kinds that started
the run: the same for every run of one workflow, whichever agent happened to arrive first).
The work a run has left is the median of the finished sizes of its kind (of all kinds,
where none of its kind has ended) above what it has already used, less what it used: sizes
are heavy-tailed, and a run that has used much is likely a big one. A run past every size
of its kind has left what it has used past the largest (it is near its end); one past
every size of all kinds, as much again as it has used. Until a few runs have finished
nothing is said, and nothing is ordered.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Iterable

import xxhash

from learn.canonical import tool_calls_of
from learn.dataflow import answer_text, chunks, prompt_text

PREFILL_WEIGHT = 0.1
"""Service of one uncached prompt token, in decode tokens (CPU engine: prefill runs ~10x
the tokens per second of one sequence's decoding)."""
FLOOR = 64.0
"""The least size a run is taken to have (a run with nothing served yet is not size 0)."""
MIN_KIND = 1
"""Finished runs of a kind from which its sizes are taken (one workflow's runs are of about
one size, and all kinds together of very different sizes: a desk of 88 calls, a
reflection of three)."""
MIN_FINISHED = 3
"""Finished runs (of any kind) before sizes are guessed at all: until then nothing is ordered."""
WINDOW = 200
"""Finished runs remembered for sizes."""
BURST = 5.0
"""Seconds from a run's start during which roots launched one after another join it."""
MAX_GROUPS = 50_000
MAX_CHUNKS = 50_000
"""Answer chunks remembered (hand-offs read answers of the last minutes; ~6 MB)."""
HASHES_PER_ANSWER = 64
HASHES_PER_PROMPT = 4096
log = logging.getLogger("preheat.runs")


def stable_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


def text_hashes(texts: Iterable[str], limit: int = HASHES_PER_PROMPT) -> list[int]:
    """Chunk hashes of texts, the same in every process (xxhash, not `hash`)."""
    out: list[int] = []
    for text in texts:
        for piece in chunks(text, key=stable_hash):
            out.append(piece)
            if len(out) >= limit:
                return out
    return out


def call_hash(call_id: object) -> int:
    """A tool call's id, hashed apart from any text's chunks."""
    return stable_hash("\x00call " + str(call_id))


def answer_hashes(answer: dict | None) -> list[int]:
    """What a later prompt carrying this answer on will contain: its text's chunks and the
    ids of its tool calls."""
    calls = tool_calls_of(answer) if isinstance(answer, dict) else []
    return (text_hashes([answer_text(answer)], HASHES_PER_ANSWER)
            + [call_hash(c.get("id")) for c in calls if c.get("id")])


def prompt_hashes(body: dict) -> list[int]:
    """Chunk hashes of a chat or responses request's prompt (every message's text), and the
    ids of the tool calls in it (chat: an assistant message's calls; responses: function
    call items)."""
    prompt = body.get("messages", body.get("input"))
    if isinstance(prompt, str):
        return text_hashes([prompt])
    if not isinstance(prompt, list):
        return []
    texts, ids = [], []
    for m in prompt:
        if isinstance(m, dict):
            texts.append(prompt_text(m))
            if m.get("type") == "function_call" and m.get("call_id"):
                ids.append(call_hash(m["call_id"]))
            ids += [call_hash(c.get("id")) for c in tool_calls_of(m) if c.get("id")]
        elif isinstance(m, str):
            texts.append(m)
    return text_hashes(texts) + ids[-HASHES_PER_ANSWER:]  # the newest: a hand-off is last


class Run:
    __slots__ = ("id", "started", "kind", "service", "pending", "last", "calls", "admitted")

    def __init__(self, rid: str, started: float) -> None:
        self.id = rid
        self.started = started
        self.kind = ""
        """The smallest kind of the agents that started the run (the same for every run of
        one workflow, whichever agent happened to arrive first)."""
        self.service = 0.0
        self.pending = 0
        """Calls arrived and not answered yet (waiting for admission or in flight)."""
        self.last = started
        self.calls = 0
        self.admitted = 0
        """Calls admission let go to the engine: a run with some is under way, and its
        other agents should not wait behind runs not yet begun."""

    def started_by(self, kind: str) -> None:
        self.kind = min(self.kind, kind) if self.kind else kind


def put_first(window: OrderedDict, restored: list, limit: int) -> None:
    """Put what a snapshot restored before what `window` learned since (older, so it is
    the first to go), keyed `restored-N`; the newest `limit` entries are kept."""
    live = list(window.items())
    window.clear()
    for i, item in enumerate(restored):
        window[f"restored-{i}"] = item
    window.update(live)
    while len(window) > limit:
        window.popitem(last=False)


class Runs:
    """Not thread-safe (the proxy's event loop only)."""

    def __init__(self, together: float = 0.5, idle: float = 10.0) -> None:
        self.together = together
        self.idle = idle
        self._runs: dict[str, Run] = {}
        """Runs under way (not ended)."""
        self._merged: dict[str, str] = {}
        self._of_group: OrderedDict[str, str] = OrderedDict()
        self._readers: OrderedDict[str, None] = OrderedDict()
        """Sessions that joined their run by reading its answers (`hand_off`)."""
        self._chunks: OrderedDict[int, str | None] = OrderedDict()
        """Answer chunk -> the run that wrote it (None: more than one did)."""
        self._roots: deque[tuple[float, str]] = deque(maxlen=64)
        self._finished: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._sizes: dict[str, list[float]] | None = None
        self._next = 0

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, rid: str) -> Run | None:
        return self._runs.get(self.find(rid))

    def find(self, rid: str) -> str:
        while rid in self._merged:
            rid = self._merged[rid]
        return rid

    def active(self) -> Iterable[Run]:
        return self._runs.values()

    # -- placing calls ---------------------------------------------------------------------

    def place(self, group: str, kind: str, hashes: Callable[[], list[int]],
              now: float | None = None) -> tuple[str, list[int] | None]:
        """The run of a call of `group`; for a new session also the prompt's chunk hashes
        (kept to place it again once its own answer is in)."""
        now = time.monotonic() if now is None else now
        rid = self._of_group.get(group)
        if rid is not None:
            rid = self.find(rid)
            if rid in self._runs:
                self._of_group.move_to_end(group)
                return rid, None
        found = hashes()
        rid, how = self._source(found), "reads"
        if rid is None:
            rid, how = self._costart(now), "costarts"
            if rid is None:
                rid, how = self._new(now), "starts"
            self._runs[rid].started_by(kind)
            self._roots.append((now, rid))
        log.debug("session %s %s run %s (%d chunks)", group, how, rid, len(found))
        self._of_group[group] = rid
        while len(self._of_group) > MAX_GROUPS:
            self._of_group.popitem(last=False)
        if how == "reads":
            self._readers[group] = None
            while len(self._readers) > MAX_GROUPS:
                self._readers.popitem(last=False)
        return rid, found

    def hand_off(self, group: str) -> bool:
        """The session joined its run by reading an answer of that run: a critic reading its
        actor, a worker its supervisor's brief, a chain's next step the last one's answer."""
        return group in self._readers

    def run_of(self, group: str) -> str | None:
        """The run a session's calls were placed in (None: no call of it was)."""
        rid = self._of_group.get(group)
        return None if rid is None else self.find(rid)

    def _source(self, hashes: list[int]) -> str | None:
        votes: Counter = Counter()
        for h in hashes:
            rid = self._chunks.get(h)
            if rid:
                votes[self.find(rid)] += 1
        for rid, _ in votes.most_common():
            if rid in self._runs:
                return rid
        return None

    def _costart(self, now: float) -> str | None:
        """The run of a root started within `together` s before, while that run is under
        `BURST` s old: agents launched one after another make one burst, but steady traffic
        (a new session every 0.5 s) must not chain every session into one run that never
        ends."""
        for t, rid in reversed(self._roots):
            if now - t > self.together:
                break
            run = self._runs.get(self.find(rid))
            if run is not None and now - run.started <= BURST:
                return run.id
        return None

    def _new(self, now: float) -> str:
        self._next += 1
        rid = f"r{self._next}"
        self._runs[rid] = Run(rid, now)
        return rid

    # -- what the engine did ---------------------------------------------------------------

    def arrived(self, rid: str) -> None:
        run = self.get(rid)
        if run is not None:
            run.pending += 1
            run.calls += 1

    def admitted(self, rid: str) -> None:
        run = self.get(rid)
        if run is not None:
            run.admitted += 1

    def left(self, rid: str, now: float | None = None) -> None:
        run = self.get(rid)
        if run is not None:
            run.pending = max(0, run.pending - 1)
            run.last = time.monotonic() if now is None else now

    def answered(self, rid: str, service: float, answer: Iterable[int],
                 prompt: list[int] | None = None) -> str:
        """A call's usage and its answer's chunk hashes are known; returns its run (again
        placed by its prompt, for a new session, now that earlier answers are in)."""
        rid = self.find(rid)
        if prompt:
            source = self._source(prompt)
            if source is not None and source != rid and rid in self._runs:
                log.debug("run %s joins %s: it read its answers", rid, source)
                rid = self._union(source, rid)
        run = self._runs.get(rid)
        if run is not None:
            run.service += max(0.0, service)
        for h in answer:  # a chunk two runs wrote says nothing about either
            seen = self._chunks.get(h, rid)
            self._chunks[h] = rid if seen is not None and self.find(seen) == rid else None
            self._chunks.move_to_end(h)
        while len(self._chunks) > MAX_CHUNKS:
            self._chunks.popitem(last=False)
        return rid

    def _union(self, keep: str, other: str) -> str:
        a, b = self._runs[keep], self._runs.pop(other)
        self._merged[other] = keep
        a.service += b.service
        a.pending += b.pending
        a.calls += b.calls
        a.admitted += b.admitted
        a.last = max(a.last, b.last)
        if b.started - a.started <= self.together and b.kind:  # a root, not a late misplacement
            a.started_by(b.kind)
        a.started = min(a.started, b.started)
        return keep

    def expire(self, now: float | None = None) -> None:
        """End the runs idle for `idle` seconds; their sizes are learned."""
        now = time.monotonic() if now is None else now
        for run in [r for r in self._runs.values() if not r.pending and now - r.last > self.idle]:
            del self._runs[run.id]
            log.debug("run %s (%s) ended: %d calls, size %.0f", run.id, run.kind[:8],
                      run.calls, run.service)
            if run.service > 0:
                self._finished[run.id] = (run.kind, run.service)
                while len(self._finished) > WINDOW:
                    self._finished.popitem(last=False)
                self._sizes = None
        if len(self._merged) > 4 * MAX_GROUPS:
            live = set(self._of_group.values()) | set(filter(None, self._chunks.values()))
            self._merged = {k: self.find(k) for k in live if k in self._merged}

    def snapshot(self) -> list[list]:
        """The sizes of the runs that ended, as [kind, size] (plain JSON, for a restart)."""
        return [[kind, round(size, 1)] for kind, size in self._finished.values()]

    def restore(self, finished: list) -> None:
        """Take the run sizes of a snapshot as runs that ended before any run now."""
        restored = [(str(kind), float(size)) for kind, size in finished[-WINDOW:]
                    if float(size) > 0]
        put_first(self._finished, restored, WINDOW)
        self._sizes = None

    # -- sizes -----------------------------------------------------------------------------

    def _finished_sizes(self, kind: str) -> tuple[list[float], bool]:
        """The sorted sizes a run of `kind` is judged by, and whether they are its own
        kind's (else those of all kinds; none until MIN_FINISHED runs have ended)."""
        if self._sizes is None:
            self._sizes = {}
            for k, size in self._finished.values():
                self._sizes.setdefault(k, []).append(size)
                self._sizes.setdefault("", []).append(size)
            for sizes in self._sizes.values():
                sizes.sort()
        same = self._sizes.get(kind, [])
        if kind and len(same) >= MIN_KIND:
            return same, True
        pooled = self._sizes.get("", [])
        return (pooled if len(pooled) >= MIN_FINISHED else []), False

    def expected_left(self, run: Run) -> float | None:
        """The work the run has left (at least FLOOR): the median of the finished sizes of
        its kind (of all kinds, where none of its kind has ended) above what it has used,
        less what it has used. Past every size of its kind, it has left what it has used
        past the largest (one workflow's runs are of about one size: it is near its end);
        past every size of all kinds, as much again as it has used (an unknown workflow
        that large is likely a very large one). None until enough runs have ended to say."""
        sizes, own = self._finished_sizes(run.kind)
        if not sizes:
            return None
        used = run.service
        above = sizes[bisect.bisect_right(sizes, used):]
        if above:
            return max(FLOOR, above[len(above) // 2] - used)
        return max(FLOOR, used - sizes[-1] if own else used)

    def expected_size(self, run: Run) -> float | None:
        """What the run has used and the work it is expected to have left (`expected_left`)."""
        left = self.expected_left(run)
        return None if left is None else run.service + left

