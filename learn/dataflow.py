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
"""

from __future__ import annotations

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
        self.session, self.ended, self.chunks, self.copied = session, ended, chunks, copied
        self.size = sum(chunks.values())


class FlowIndex:
    """Recent answers, indexed by chunk. Not thread-safe; memory bounded by `window` answers."""

    def __init__(self, window: int = 20_000, min_chunk: int = 24, min_share: float = 0.5,
                 horizon: float = 6 * 3600.0, max_sharing: int = 8, cache: int = 50_000) -> None:
        self.window = window
        self.min_chunk = min_chunk
        self.min_share = min_share
        self.horizon = horizon
        self.max_sharing = max_sharing
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._index: dict[int, list[str]] = {}
        self._common: OrderedDict[int, None] = OrderedDict()
        self._message_chunks: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._cache = cache
        self._by_key: OrderedDict[str, str | None] = OrderedDict()
        """Message key of a distinctive answer -> its call (None: several answers alike)."""

    def __len__(self) -> int:
        return len(self._answers)

    def message_chunks(self, message: dict, key: str) -> dict[int, int]:
        """Chunks of one prompt message, cached by its content key."""
        hit = self._message_chunks.get(key)
        if hit is not None:
            self._message_chunks.move_to_end(key)
            return hit
        found = chunks(prompt_text(message), self.min_chunk)
        self._message_chunks[key] = found
        if len(self._message_chunks) > self._cache:
            self._message_chunks.popitem(last=False)
        return found

    def sources(self, prompt: Iterable[dict[int, int]], session: str, started: float,
                keys: Iterable[str] = ()) -> list[FlowSource]:
        """Earlier answers (of other sessions, finished before `started`) this prompt contains:
        found by their chunks in `prompt`, or whole among its messages' `keys`."""
        found: dict[str, list[tuple[int, int]]] = {}
        for part in prompt:
            for h, size in part.items():
                for call in self._index.get(h, ()):
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
        `key` where it is distinctive."""
        mine = chunks(answer_text(answer), self.min_chunk)
        copied: set[int] = set()
        for part in own_prompt:
            for h in part.keys() & mine.keys():
                del mine[h]
                copied.add(h)
        mine = {h: n for h, n in mine.items() if h not in self._common}
        whole = key is not None and isinstance(answer, dict) and (
            bool(tool_calls_of(answer)) or len(message_text(answer)) >= self.min_chunk)
        if not mine and not whole:
            return
        if whole:
            self._by_key[key] = call if key not in self._by_key else None
            self._by_key.move_to_end(key)
            while len(self._by_key) > self.window:
                self._by_key.popitem(last=False)
        self._answers[call] = _Answer(session, ended, mine, frozenset(copied))
        for h in mine:
            bucket = self._index.setdefault(h, [])
            bucket.append(call)
            if len(bucket) > self.max_sharing:  # boilerplate: says nothing about who said it
                del self._index[h]
                self._common[h] = None
                if len(self._common) > self.window:
                    self._common.popitem(last=False)
        while len(self._answers) > self.window:
            old, ans = self._answers.popitem(last=False)
            for h in ans.chunks:
                bucket = self._index.get(h)
                if bucket is not None and old in bucket:
                    bucket.remove(old)
                    if not bucket:
                        del self._index[h]

    def index_size(self) -> int:
        return len(self._index)
