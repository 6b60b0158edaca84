"""Data flow: which earlier answers a new prompt contains.

Multi-agent workflows pass answers on by pasting them into the next agent's prompt (a
summariser reads the experts, a debater reads the others, a crew agent reads a hand-off).
Finding that by substring search against every recent answer would cost answers x prompt.
Instead text is cut into content-defined chunks (lines, and sentences of long lines: cut at
newlines, escaped newlines and ". "; at least `min_chunk` characters), each answer's chunks go
into a hash index, and a prompt's chunks are looked up there: one dict lookup per sentence of
new text. Cutting uses `str.split` only (a regex would cost 8x as much on a long prompt).

An answer counts as a source when at least `min_share` of its indexed text is found in the
prompt. Chunks an answer copied from its own prompt (a quoted sentence of a shared document)
are not indexed: they are not the answer's own information and would link every later call
that sees the same document. They are remembered, though: when a prompt contains answer B
and B kept sentences of an earlier answer A (a revision keeps most of the draft), those
sentences came through B, and do not make A a source as well. Chunks that many answers share
(boilerplate) are dropped.

A hand-off may carry no text at all: an agent framework hands a conversation to another agent
by sending the first agent's answer (a `transfer_to_...` tool call) on in the next agent's
prompt, as the same message. So an answer is also found whole, by its message key, where it is
distinctive: it calls tools (their call ids are unique) or says at least `min_chunk` characters,
and no other recent answer is the same message.

Memory. The index lives as long as the proxy, so what it keeps is bounded in chunk entries,
not only in answers or messages:

- An answer indexes at most `answer_chunks` (256) of its chunks: a sample, those with the
  smallest hashes, so a prompt quoting any half of a long answer shows about half the sample
  (a head and a tail would miss a quote of the middle). Its `size` is the sample's, so shares
  stay comparable. Only answers of over 256 lines or sentences (20-40 KB) are sampled.
- Of the chunks it copied from its own prompt, only those indexed for an earlier answer are
  kept (no other can take credit away from anyone): at most 4 x `answer_chunks` (a summary
  relays several answers' samples).
- Indexed answers hold at most `budget` (1,000,000) chunk entries together and are at most
  `window` answers: the oldest go first, with their index entries. The index has one entry
  per indexed chunk; its bucket is the call, or a tuple of calls where a few answers share the
  chunk (never a list per chunk: millions of small containers make every full garbage
  collection slow).
- The chunks of prompt messages are cached (a conversation's messages come back in each of
  its calls) for at most `cache` messages holding `cache_chunks` (1,000,000) entries together;
  the least recently used go first. A message over the whole budget is not cached.

An indexed chunk costs ~130 bytes (its hash, its index entry), a cached one ~70: at most about
200 MB with the defaults. `sizes()` reports what is held, `check()` verifies it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

from learn.canonical import arguments_of, function_of, message_text, tool_calls_of

_TRIM = " \t\r>*-#\"'`|:,.!?;"


@dataclass(frozen=True)
class FlowSource:
    call: str
    """The exchange whose answer the prompt contains."""
    share: float
    """Share of that answer's (indexed) text found in the prompt."""


def chunks(text: str, min_chunk: int = 24, limit: int = 1_000_000,
           key: Callable[[str], int] = hash) -> dict[int, int]:
    """Content-defined chunks of a text: hash -> length. Short pieces are ignored. (`hash`
    differs between processes; pass a stable `key` to compare chunks across them.)"""
    out: dict[int, int] = {}
    for line in text[:limit].replace("\\n", "\n").split("\n"):
        if len(line) < min_chunk:
            continue
        for piece in line.split(". ") if len(line) > 2 * min_chunk else (line,):
            piece = piece.strip(_TRIM)
            if len(piece) >= min_chunk:
                out[key(piece)] = len(piece)
    return out


def prompt_text(message: dict) -> str:
    """A prompt message's text (a Responses API function_call_output: its output)."""
    text = message_text(message)
    if not text and "output" in message:
        text = str(message.get("output"))
    return text


def answer_text(answer: dict | None) -> str:
    """An answer's text plus the arguments of its tool calls (hand-offs travel in both)."""
    if not isinstance(answer, dict):
        return ""
    text = message_text(answer)
    args = [argument_text(function_of(c).get("arguments")) for c in tool_calls_of(answer)]
    return "\n".join([text, *args]) if args else text


def argument_text(arguments: object) -> str:
    """The text a tool call's arguments carry: each string value on a line of its own. An
    agent called as a tool (a manager's `ask_booking(input=...)`) gets its task as the text of
    its prompt, not as the JSON it was asked in."""
    values: list[str] = []
    stack = [arguments_of(arguments)]  # unparseable: the string itself
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            values.append(value)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return "\n".join(values)


class _Answer:
    __slots__ = ("session", "ended", "chunks", "size", "copied")

    def __init__(self, session: str, ended: float, chunks: dict[int, int], copied: frozenset) -> None:
        self.session, self.ended, self.copied = session, ended, copied
        self.chunks = tuple(chunks)
        """The indexed chunks' hashes (their lengths are only needed for `size`)."""
        self.size = sum(chunks.values())

    @property
    def held(self) -> int:
        return len(self.chunks) + len(self.copied)


class FlowIndex:
    """Recent answers, indexed by chunk. Not thread-safe; memory bounded as the module says."""

    def __init__(self, window: int = 20_000, min_chunk: int = 24, min_share: float = 0.5,
                 horizon: float = 6 * 3600.0, max_sharing: int = 8, cache: int = 50_000,
                 cache_chunks: int = 1_000_000, budget: int = 1_000_000,
                 answer_chunks: int = 256) -> None:
        self.window = window
        self.min_chunk = min_chunk
        self.min_share = min_share
        self.horizon = horizon
        self.max_sharing = max_sharing
        self.budget = budget
        """Chunk entries the indexed answers may hold together (their chunks and copies)."""
        self.answer_chunks = answer_chunks
        """Chunks indexed per answer (a sample of longer ones)."""
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._held = 0
        self._index: dict[int, str | tuple[str, ...]] = {}
        self._common: OrderedDict[int, None] = OrderedDict()
        self._message_chunks: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._cache = cache
        self._cache_chunks = cache_chunks
        self._cached = 0
        self._by_key: OrderedDict[str, str | None] = OrderedDict()
        """Message key of a distinctive answer -> its call (None: several answers alike)."""

    def __len__(self) -> int:
        return len(self._answers)

    def message_chunks(self, message: dict, key: str) -> dict[int, int]:
        """Chunks of one prompt message, cached by its content key. Do not change the dict."""
        hit = self._message_chunks.get(key)
        if hit is not None:
            self._message_chunks.move_to_end(key)
            return hit
        found = chunks(prompt_text(message), self.min_chunk)
        if len(found) > self._cache_chunks:
            return found
        self._message_chunks[key] = found
        self._cached += len(found)
        while len(self._message_chunks) > self._cache or self._cached > self._cache_chunks:
            _, old = self._message_chunks.popitem(last=False)
            self._cached -= len(old)
        return found

    def sources(self, prompt: Iterable[dict[int, int]], session: str, started: float,
                keys: Iterable[str] = ()) -> list[FlowSource]:
        """Earlier answers (of other sessions, finished before `started`) this prompt contains:
        found by their chunks in `prompt`, or whole among its messages' `keys`."""
        found: dict[str, list[tuple[int, int]]] = {}
        index = self._index
        for part in prompt:
            for h, size in part.items():
                bucket = index.get(h)
                if bucket is None:
                    continue
                for call in (bucket,) if isinstance(bucket, str) else bucket:
                    found.setdefault(call, []).append((h, size))
        live = {}
        for call, hits in found.items():
            ans = self._answers.get(call)
            if ans is None or not self._earlier(ans, session, started):
                continue
            if sum(n for _, n in hits) >= self.min_share * ans.size:
                live[call] = (ans, hits)
        relayed = set().union(*(ans.copied for ans, _ in live.values())) if live else set()
        out = {}
        for call, (ans, hits) in live.items():
            own = sum(n for h, n in hits if h not in relayed or h in ans.copied)
            share = min(1.0, own / ans.size)
            if share >= self.min_share:
                out[call] = FlowSource(call, round(share, 3))
        for key in keys:
            call = self._by_key.get(key)
            ans = self._answers.get(call) if call else None
            if ans is not None and self._earlier(ans, session, started):
                out[call] = FlowSource(call, 1.0)
        return sorted(out.values(), key=lambda s: (-s.share, s.call))

    def _earlier(self, ans: _Answer, session: str, started: float) -> bool:
        return (ans.session != session and ans.ended <= started + 1e-3
                and started - ans.ended <= self.horizon)

    def remember(self, call: str, session: str, ended: float, answer: dict | None,
                 own_prompt: Iterable[dict[int, int]], key: str | None = None) -> None:
        """Index an answer, less whatever it copied from its own prompt; and by its message
        `key` where it is distinctive. The oldest answers go when over `window` or `budget`."""
        mine = chunks(answer_text(answer), self.min_chunk)
        copied: set[int] = set()
        for part in own_prompt:
            for h in part.keys() & mine.keys():
                del mine[h]
                if h in self._index:  # only a copy of an indexed chunk can be relayed
                    copied.add(h)
        mine = {h: n for h, n in mine.items() if h not in self._common}
        if len(mine) > self.answer_chunks:
            mine = {h: mine[h] for h in heapq.nsmallest(self.answer_chunks, mine)}
        if len(copied) > 4 * self.answer_chunks:  # a summary relays several answers' samples
            copied = set(heapq.nsmallest(4 * self.answer_chunks, copied))
        whole = key is not None and isinstance(answer, dict) and (
            bool(tool_calls_of(answer)) or len(message_text(answer)) >= self.min_chunk)
        if not mine and not whole:
            return
        if whole:
            self._by_key[key] = call if key not in self._by_key else None
            self._by_key.move_to_end(key)
            while len(self._by_key) > self.window:
                self._by_key.popitem(last=False)
        if call in self._answers:  # the same call again: its old chunks must not linger
            self._forget(call)
        ans = self._answers[call] = _Answer(session, ended, mine, frozenset(copied))
        self._held += ans.held
        for h in ans.chunks:
            bucket = self._index.get(h, ())
            calls = (bucket,) if isinstance(bucket, str) else bucket
            if len(calls) < self.max_sharing:
                self._index[h] = (*calls, call) if calls else call
                continue
            # boilerplate: says nothing about who said it
            self._index.pop(h, None)
            self._common[h] = None
            if len(self._common) > self.window:
                self._common.popitem(last=False)
        while len(self._answers) > 1 and (len(self._answers) > self.window
                                          or self._held > self.budget):
            self._forget(next(iter(self._answers)))

    def _forget(self, call: str) -> None:
        ans = self._answers.pop(call)
        self._held -= ans.held
        for h in ans.chunks:
            bucket = self._index.get(h)
            if bucket == call:
                del self._index[h]
            elif isinstance(bucket, tuple) and call in bucket:
                rest = tuple(c for c in bucket if c != call)
                self._index[h] = rest[0] if len(rest) == 1 else rest

    def index_size(self) -> int:
        return len(self._index)

    def sizes(self) -> dict[str, int]:
        """What is held: answers, their chunk entries, index entries, cached messages and chunks."""
        return {"answers": len(self._answers), "answer_chunks": self._held,
                "index": len(self._index), "cached_messages": len(self._message_chunks),
                "cached_chunks": self._cached}

    def check(self) -> None:
        """Integrity: the counters add up, the budgets hold, each index bucket names answers
        that hold its chunk. Raises AssertionError (for tests and soak runs)."""
        assert self._held == sum(a.held for a in self._answers.values())
        assert self._cached == sum(len(c) for c in self._message_chunks.values())
        assert len(self._answers) <= max(self.window, 1)
        assert self._held <= self.budget or len(self._answers) == 1
        assert self._cached <= self._cache_chunks and len(self._message_chunks) <= self._cache
        for h, bucket in self._index.items():
            calls = (bucket,) if isinstance(bucket, str) else bucket
            assert calls and (len(calls) > 1 or isinstance(bucket, str)), (h, bucket)
            assert all(h in getattr(self._answers.get(c), "chunks", ()) for c in calls), (h, bucket)
        assert all(len(a.chunks) <= self.answer_chunks for a in self._answers.values())
