"""Call templates: what kind of call an exchange is, independent of its data.

A call's template is its endpoint, its tools, the templates of its leading messages (the
instructions before any answer: system prompt, task message) and, for a call inside an agent
loop, the shape of its newest turn (the messages after the last answer: which tools' results,
or which kind of user message). The history in between is the conversation itself, so every
step of a tool loop that reacts to the same tool is one template however long it has grown.

A mined user message names the call only when it is a real template (seen twice, with slots
or long fixed text) and common in its place: at least `share` of the messages seen at that
position of that agent fit it. Free text (a customer's request) is written `{user}` instead,
so it cannot split one agent into a template per customer.

Each call template keeps its static prefix: the longest run of token ids all of its calls
from different sessions start with (the system prompt, tools and fixed text up to the first
slot): what a new call of this template will certainly share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import xxhash

from learn.canonical import (canonical_json, function_of, message_text, restore_sessions,
                             session_key, session_keys, tool_calls_of)
from learn.radix import common_length
from learn.templates import STRICT_ROLES, TemplateMiner

@dataclass(frozen=True)
class CallTemplate:
    """One learned call shape."""

    id: str
    path: str
    tools: tuple[str, ...]
    head: tuple[str, ...]
    """Leading messages: a message template id, or `{role}` where the text is data."""
    turn: tuple[str, ...] | None
    """None for a conversation's first call; else its newest messages (`tool:<name>` for a
    tool's result)."""
    calls: int
    sessions: int
    """Distinct sessions seen (counted up to 64)."""
    prefix_tokens: int
    """Length of the static prefix (0 until two sessions agree on one)."""
    text: str
    """The template as readable lines."""


def role_of(message: dict) -> str:
    """A message's role; a Responses API item that is none (a built-in tool's call): its type.
    Function calls and their outputs come as assistant and tool messages (`Exchange.messages`)."""
    role = message.get("role")
    if isinstance(role, str):
        return role
    return str(message.get("type") or "?")


def tool_names(tools: Sequence) -> tuple[str, ...]:
    names = set()
    for tool in tools:
        if isinstance(tool, dict):
            fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            names.add(str(fn.get("name") or tool.get("type") or "?"))
    return tuple(sorted(names))


def answer_kind(answer: dict | None) -> str:
    """What an answer asks for next: 'text', 'tools:<names>' (sorted, deduplicated) or 'none'."""
    if not isinstance(answer, dict):
        return "none"
    names = sorted({str(function_of(c).get("name")) for c in tool_calls_of(answer)})
    return "tools:" + "+".join(names) if names else "text"


class _Stats:
    __slots__ = ("id", "path", "tools", "head", "turn", "calls", "sessions", "prefix",
                 "prefix_session", "multi", "last")

    def __init__(self, tid: str, path: str, tools: tuple, head: tuple, turn: tuple | None) -> None:
        self.id, self.path, self.tools, self.head, self.turn = tid, path, tools, head, turn
        self.calls = 0
        self.sessions: set[int] = set()
        self.prefix: tuple[int, ...] | None = None
        self.prefix_session: str | None = None
        self.multi = False
        self.last = 0


def call_id(path: str, tools: tuple, head: tuple, turn: tuple | None) -> str:
    return "t" + xxhash.xxh3_64_hexdigest(canonical_json([path, list(tools), list(head),
                                                          None if turn is None else list(turn)]))


class CallRegistry:
    """Assigns call templates and keeps their statistics and static prefixes. Not thread-safe."""

    def __init__(self, miner: TemplateMiner, share: float = 0.5, max_templates: int = 5_000,
                 max_prefix: int = 32_768, prefix_budget: int = 4_000_000) -> None:
        self.miner = miner
        self.share = share
        self.max_templates = max_templates
        self.max_prefix = max_prefix
        self.prefix_budget = prefix_budget
        """Token ids all templates' prefixes may hold; past it, unconfirmed ones are dropped."""
        self._prefix_ids = 0
        self._stats: dict[str, _Stats] = {}
        self._alias: dict[str, str] = {}
        self._contexts: dict[tuple, Counter] = {}
        self._by_message: dict[str, set[str]] = {}
        self._renamed: list[tuple[str, str]] = []
        self.clock = 0

    def assign(self, path: str, messages: Sequence[dict], keys: Sequence[str], tools: Sequence,
               session: str, tokens: Sequence[int] | None) -> str:
        """The template id of one call; learns from it (message templates, counts, prefix)."""
        self.clock += 1
        roles = [role_of(m) for m in messages]
        answers = [i for i, r in enumerate(roles) if r == "assistant"]
        names = tool_names(tools)
        head_end = answers[0] if answers else len(messages)
        head: list[str] = []
        for i in range(head_end):
            head.append(self._element(path, names, head, "h", i, messages[i], roles[i], keys[i],
                                      session))
        turn = None
        if answers:
            calls = _tool_call_names(messages[answers[-1]])
            turn = []
            for i in range(answers[-1] + 1, len(messages)):
                if roles[i] == "tool":
                    turn.append("tool:" + _result_name(messages[i], calls))
                else:
                    turn.append(self._element(path, names, head, "t", i - answers[-1], messages[i],
                                              roles[i], keys[i], session))
            turn = _dedupe_tools(turn)
        tid = call_id(path, names, tuple(head), None if turn is None else tuple(turn))
        st = self._stats.get(tid)
        if st is None:
            st = _Stats(tid, path, names, tuple(head), None if turn is None else tuple(turn))
            self._stats[tid] = st
            for el in (*head, *(turn or ())):
                if el.startswith("m"):
                    self._by_message.setdefault(el, set()).add(tid)
            if len(self._stats) > self.max_templates:
                self._evict()
        st.calls += 1
        st.last = self.clock
        if len(st.sessions) < 64:
            st.sessions.add(session_key(session))
        if tokens is not None:
            self._learn_prefix(st, session, tokens)
        return tid

    def resolve(self, tid: str) -> str:
        seen = 0
        while tid in self._alias and seen < 64:
            tid, seen = self._alias[tid], seen + 1
        return tid

    def static_prefix(self, tid: str) -> tuple[int, ...]:
        """Ids every call of this template from two or more sessions started with (else ())."""
        st = self._stats.get(self.resolve(tid))
        return st.prefix if st is not None and st.multi and st.prefix else ()

    def get(self, tid: str) -> CallTemplate | None:
        st = self._stats.get(self.resolve(tid))
        return None if st is None else self._public(st)

    def templates(self, min_calls: int = 2) -> list[CallTemplate]:
        found = [s for s in self._stats.values() if s.calls >= min_calls]
        found.sort(key=lambda s: (-s.calls, s.id))
        return [self._public(s) for s in found]

    def __len__(self) -> int:
        return len(self._stats)

    @property
    def prefix_ids(self) -> int:
        """Token ids held by all templates' prefixes (bounded by `prefix_budget`)."""
        return self._prefix_ids

    def drain_renames(self) -> list[tuple[str, str]]:
        """(old, new) call template ids renamed since the last call (for the workflow graph)."""
        out, self._renamed = self._renamed, []
        return out

    def _follow(self) -> None:
        """Follow message templates the miner just generalised, before anyone counts them."""
        renames = self.miner.drain_aliases()
        if renames:
            self._renamed += self.rename_messages(renames)

    def rename_messages(self, renames: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Follow message templates that were generalised; returns call template renames."""
        out: list[tuple[str, str]] = []
        for old, new in renames:
            for ctx in self._contexts.values():
                if old in ctx:
                    ctx[new] += ctx.pop(old)
            for tid in self._by_message.pop(old, set()):
                st = self._stats.pop(tid, None)
                if st is None:
                    continue
                head = tuple(new if e == old else e for e in st.head)
                turn = None if st.turn is None else tuple(new if e == old else e for e in st.turn)
                nid = call_id(st.path, st.tools, head, turn)
                into = self._stats.get(nid)
                if into is None:
                    st.id, st.head, st.turn = nid, head, turn
                    self._stats[nid] = st
                else:
                    into.calls += st.calls
                    into.sessions |= st.sessions
                    into.last = max(into.last, st.last)
                    if st.prefix is not None:
                        self._merge_prefix(into, st)
                for el in (*head, *(turn or ())):
                    if el.startswith("m"):
                        self._by_message.setdefault(el, set()).add(nid)
                self._alias[tid] = nid
                out.append((tid, nid))
        return out

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self, min_calls: int = 1) -> dict:
        return {
            "templates": [
                {"id": s.id, "path": s.path, "tools": list(s.tools), "head": list(s.head),
                 "turn": None if s.turn is None else list(s.turn), "calls": s.calls,
                 "sessions": len(s.sessions), "session_keys": session_keys(s.sessions),
                 "prefix": list(s.prefix) if s.multi and s.prefix else None}
                for s in self._stats.values() if s.calls >= min_calls
            ],
            "aliases": dict(list(self._alias.items())[-10_000:]),
            "contexts": [[list(k), dict(v.most_common(16))] for k, v in
                         list(self._contexts.items())[-5_000:]],
        }

    def restore(self, data: dict, with_prefixes: bool = True) -> None:
        for t in data.get("templates", []):
            turn = None if t.get("turn") is None else tuple(t["turn"])
            st = _Stats(t["id"], t["path"], tuple(t["tools"]), tuple(t["head"]), turn)
            st.calls = int(t.get("calls", 0))
            st.sessions = restore_sessions(t.get("sessions", 0), t.get("session_keys"))
            if with_prefixes and t.get("prefix"):
                st.prefix, st.multi = tuple(t["prefix"]), True
                self._prefix_ids += len(st.prefix)
            self._stats[st.id] = st
            for el in (*st.head, *(st.turn or ())):
                if el.startswith("m"):
                    self._by_message.setdefault(el, set()).add(st.id)
        self._alias.update(data.get("aliases", {}))
        for key, counts in data.get("contexts", []):  # JSON turned the tuples into lists
            self._contexts[tuple(tuple(k) if isinstance(k, list) else k for k in key)] = Counter(counts)

    # -- helpers ---------------------------------------------------------------------------

    def _element(self, path, names, head, section, index, message, role, key, session) -> str:
        text = message_text(message)
        # Mined per agent and place: the system prompt is global, the rest under it.
        scope = "" if role in STRICT_ROLES and section == "h" else f"{head[0] if head else ''}/{section}"
        tid = self.miner.mine(role, text, key, session, scope)
        self._follow()
        if tid is None:
            return "{" + role + "}"
        if role in STRICT_ROLES:
            return tid
        ctx = (path, names, head[0] if head else "", section, index)
        counts = self._contexts.get(ctx)
        if counts is None:
            counts = self._contexts[ctx] = Counter()
            if len(self._contexts) > 4 * self.max_templates:
                for old in list(self._contexts)[: self.max_templates]:
                    del self._contexts[old]
        counts[tid] += 1
        if len(counts) > 64:  # keep the common shapes; a long tail of free text says nothing
            for rare, n in counts.most_common()[32:]:
                if rare:
                    del counts[rare]
                    counts[""] += n  # still counted, as "something else"
        if self.miner.usable(tid) and counts[tid] >= self.share * sum(counts.values()):
            return tid
        return "{" + role + "}"

    def _learn_prefix(self, st: _Stats, session: str, tokens: Sequence[int]) -> None:
        ids = tokens if isinstance(tokens, tuple) else tuple(tokens)
        if st.prefix is None:
            st.prefix, st.prefix_session = ids[: self.max_prefix], session
            self._prefix_ids += len(st.prefix)
            if self._prefix_ids > self.prefix_budget:
                self._drop_prefixes()
            return
        if session != st.prefix_session:
            st.multi = True
        n = common_length(st.prefix, ids, 0)
        if n < len(st.prefix):
            self._prefix_ids -= len(st.prefix) - n
            st.prefix = st.prefix[:n]

    def _drop_prefixes(self) -> None:
        """Forget prefixes, least recently used first: those no second session confirmed yet,
        then (if that is not enough) confirmed ones, which the next calls will relearn."""
        for st in sorted((s for s in self._stats.values() if s.prefix),
                         key=lambda s: (s.multi, s.last)):
            if self._prefix_ids <= 0.8 * self.prefix_budget:
                break
            self._prefix_ids -= len(st.prefix)
            st.prefix, st.prefix_session, st.multi = None, None, False

    def _merge_prefix(self, into: _Stats, other: _Stats) -> None:
        if into.prefix is None:
            into.prefix, into.multi = other.prefix, other.multi
            into.prefix_session = other.prefix_session
        elif other.prefix is not None:
            n = common_length(into.prefix, other.prefix, 0)
            self._prefix_ids -= len(other.prefix) + len(into.prefix) - n
            into.prefix = into.prefix[:n]
            into.multi = True

    def _evict(self) -> None:
        order = sorted(self._stats.values(), key=lambda s: (s.calls > 1, s.last))
        for st in order[: len(self._stats) - int(self.max_templates * 0.9)]:
            del self._stats[st.id]
            self._prefix_ids -= len(st.prefix or ())
        live = set(self._stats)
        for el in list(self._by_message):
            self._by_message[el] &= live
            if not self._by_message[el]:
                del self._by_message[el]
        if len(self._alias) > 4 * self.max_templates:
            self._alias = dict(list(self._alias.items())[-2 * self.max_templates :])

    def _public(self, st: _Stats) -> CallTemplate:
        prefix = len(st.prefix) if st.multi and st.prefix else 0
        return CallTemplate(st.id, st.path, st.tools, st.head, st.turn, st.calls,
                            len(st.sessions), prefix, self._text(st))

    def _text(self, st: _Stats, width: int = 160) -> str:
        lines = [f"{st.path}" + (f"  tools: {', '.join(st.tools)}" if st.tools else "")]
        for el in st.head:
            lines.append(self._line(el, width))
        if st.turn is not None:
            lines.append("… conversation so far …")
            lines += [self._line(el, width) for el in st.turn]
        return "\n".join(lines)

    def _line(self, element: str, width: int) -> str:
        if element.startswith("tool:"):
            return f"tool: {{{element[5:]} result}}"
        if element.startswith("{"):
            return f"{element[1:-1]}: {element}"
        tpl = self.miner.get(element)
        if tpl is None:
            return f"?: <{element}>"
        text = tpl.text.replace("\n", "\\n")
        return f"{tpl.role}: {text if len(text) <= width else text[: width - 1] + '…'}"


def _tool_call_names(answer: dict) -> dict[str, str]:
    out = {}
    for call in tool_calls_of(answer):
        out[str(call.get("id"))] = str(function_of(call).get("name"))
    return out


def _result_name(message: dict, calls: dict[str, str]) -> str:
    if isinstance(message.get("name"), str):
        return message["name"]
    if str(message.get("tool_call_id")) in calls:
        return calls[str(message.get("tool_call_id"))]
    ids = message.get("tool_call_ids")
    if isinstance(ids, list) and ids and str(ids[0]) in calls:
        return calls[str(ids[0])]
    return "?"


def _dedupe_tools(turn: list[str]) -> list[str]:
    """Parallel results of the same tool count once: how many came back is data."""
    out: list[str] = []
    for el in turn:
        if not (el.startswith("tool:") and el in out):
            out.append(el)
    return out
