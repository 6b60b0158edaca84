"""Static heads: the leading messages that every session of an agent starts with.

A workflow's static prefix (its system prompt, its tools, a fixed preamble) is what a new
session will certainly send first. Learned token prefixes (`learn/radix.py`) use the
learner's own ids, not the engine's; to warm a prefix the engine must render and tokenize it
itself, so this keeps the prefix as messages: for each agent (calls that open with the same
first message and tools), the longest run of leading messages that calls from different
sessions sent alike. The engine's chat template renders those messages as a prefix of every
such call's prompt. Agents are told apart by their opening message rather than by learned
call template: templates are renamed as they are mined, and a head is wanted from the
second session on.

    heads = StaticHeads()
    heads.observe(session, messages, tools, at)   # for every finished call
    heads.top(8)            # the heads shared by the most sessions, seen recently

A head needs `min_sessions` sessions that agree on it (one session's history is not static),
and it is forgotten `ttl` seconds after its last use. A candidate starts as the whole prompt
of its agent's first call but its newest message, so the candidates are bounded in size as
well as in number: at most `max_agents` of them, holding at most `max_chars` JSON characters
together (`MAX_HEAD_CHARS`); past either, the least recently seen agent goes first. It is kept in the learned snapshot
(`snapshot`/`restore`), so a restarted proxy can warm its engine before traffic arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from learn.canonical import prefix_chain

MAX_HEAD_CHARS = 32_000_000
"""JSON characters all candidate heads may hold together (their messages and tools)."""


@dataclass(frozen=True)
class Head:
    key: str
    """Hash of the messages and tools (`engine.admission.prompt_chain` of them, last link)."""
    messages: tuple[dict, ...]
    tools: tuple[Any, ...]
    sessions: int
    calls: int
    last: float
    """When a call last started with it (seconds since the epoch)."""


class _Candidate:
    __slots__ = ("messages", "tools", "sessions", "calls", "last", "chars")

    def __init__(self, messages: list[dict], tools: list, at: float) -> None:
        self.messages = messages
        self.tools = tools
        self.sessions = 1
        self.calls = 1
        self.last = at
        self.chars = _json_chars(messages, tools)


class StaticHeads:
    def __init__(self, min_sessions: int = 2, max_agents: int = 512,
                 ttl: float = 6 * 3600.0, max_sessions: int = 1 << 16,
                 max_chars: int = MAX_HEAD_CHARS) -> None:
        self.min_sessions = min_sessions
        self.max_agents = max_agents
        self.max_chars = max_chars
        self.chars = 0
        """JSON characters the candidates hold now (at most `max_chars`, but for the newest)."""
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.version = 0
        """Bumped whenever `top()` may have changed."""
        self._by_agent: OrderedDict[str, _Candidate] = OrderedDict()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def observe(self, session: str | None, messages: Sequence[Any],
                tools: Sequence[Any] | None, at: float) -> None:
        """A call in `session` sent `messages` (its newest one is never static)."""
        if not session or not isinstance(messages, Sequence) or len(messages) < 2:
            return
        lead = list(messages[:-1])
        if not all(isinstance(m, dict) for m in lead):
            return
        tools = list(tools or [])
        agent = head_key(lead[:1], tools)  # its opening message and tools
        cand = self._by_agent.get(agent)
        if cand is None:
            self._add(agent, _Candidate(lead, tools, at))
            self._seen[(agent, session)] = None
            return
        self._by_agent.move_to_end(agent)
        cand.calls += 1
        cand.last = at
        if (agent, session) in self._seen:
            return  # the same session again: its own history says nothing about others
        self._seen[(agent, session)] = None
        while len(self._seen) > self.max_sessions:
            self._seen.popitem(last=False)
        cand.sessions += 1
        n = _common(cand.messages, lead)
        if n < len(cand.messages):
            del cand.messages[n:]
            self.chars -= cand.chars
            cand.chars = _json_chars(cand.messages, cand.tools)
            self.chars += cand.chars
        if cand.sessions == self.min_sessions or n == 0 or cand.sessions % 8 == 0:
            self.version += 1

    def top(self, k: int = 8, now: float | None = None) -> list[Head]:
        """Distinct heads used by `min_sessions` sessions or more, the most shared first."""
        best: dict[str, Head] = {}
        for cand in self._by_agent.values():
            if (cand.sessions < self.min_sessions or not cand.messages
                    or (now is not None and now - cand.last > self.ttl)):
                continue
            key = head_key(cand.messages, cand.tools)
            seen = best.get(key)
            if seen is None:
                best[key] = Head(key, tuple(cand.messages), tuple(cand.tools), cand.sessions,
                                 cand.calls, cand.last)
            else:  # agents whose heads coincide
                best[key] = Head(key, seen.messages, seen.tools, seen.sessions + cand.sessions,
                                 seen.calls + cand.calls, max(seen.last, cand.last))
        ranked = sorted(best.values(), key=lambda h: (-h.sessions, -h.calls, h.key))
        return ranked[:k]

    def snapshot(self, k: int = 64) -> list[dict]:
        return [{"agent": t, "messages": c.messages, "tools": c.tools,
                 "sessions": c.sessions, "calls": c.calls, "last": c.last}
                for t, c in list(self._by_agent.items())[-k:]
                if c.sessions >= self.min_sessions and c.messages]

    def restore(self, data: Sequence[dict]) -> None:
        for item in data:
            try:
                cand = _Candidate(list(item["messages"]), list(item["tools"]), item["last"])
                cand.sessions, cand.calls = int(item["sessions"]), int(item["calls"])
            except (KeyError, TypeError, ValueError):
                continue
            self._add(str(item["agent"]), cand)
        self.version += 1

    def _add(self, agent: str, cand: _Candidate) -> None:
        """A new candidate, the most recent; the least recent go past either bound."""
        old = self._by_agent.pop(agent, None)
        if old is not None:
            self.chars -= old.chars
        self._by_agent[agent] = cand
        self.chars += cand.chars
        while len(self._by_agent) > 1 and (len(self._by_agent) > self.max_agents
                                           or self.chars > self.max_chars):
            _, gone = self._by_agent.popitem(last=False)
            self.chars -= gone.chars


def head_key(messages: Sequence[Any], tools: Sequence[Any]) -> str:
    """The prompt-chain hash of a request made of these leading messages (tools first), as
    `engine.admission.prompt_chain` computes it, so a real request names the same prefix."""
    chain = prefix_chain(([list(tools)] if tools else []) + list(messages))
    return chain[0][-1] if chain and chain[0] else ""


def _json_chars(messages: Sequence[Any], tools: Sequence[Any]) -> int:
    """Characters of the messages and tools as JSON (what a candidate holds, near enough)."""
    chain = prefix_chain(([list(tools)] if tools else []) + list(messages))
    return sum(chain[1]) if chain else 0


def _common(a: Sequence[dict], b: Sequence[dict]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
