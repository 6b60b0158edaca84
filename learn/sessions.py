"""Session linking: which calls belong to one agent's conversation.

A client that sends an id is believed (headers first, then body fields, in the order of
`EXPLICIT_HEADERS` and `EXPLICIT_FIELDS`). Real agent frameworks send none, so the normal
case is inference: inside one agent loop each call's messages are the previous call's
messages, plus its answer, plus tool results. The linker remembers a hash chain of every
(messages + answer) it has seen and links a new call to the longest one its messages start
with. Time and memory are linear in the number of messages of the call.

Some agents rewrite their history: SWE-agent replaces old tool output with "Old environment
output: (N lines omitted)", so the prompt stops being an exact continuation. For those the
linker also remembers, per conversation opening (the first two messages), the message keys of
each session's latest conversation. A call whose exact link is missing or stale (answers in
its prompt come after the linked conversation) is linked to the longest remembered
conversation it extends position by position: same opening, every earlier answer at its
place, most other messages equal. Such links say `rewritten=True`.

Those conversations are the linker's one store that grows with the length of a session, so
they are kept packed (8 bytes a message) and under a budget in bytes, `history_budget`, across
all openings: the least recently continued sessions are forgotten first. A forgotten session
still links by exact prefix; only a rewrite of its history goes unrecognised.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterable, Protocol

import xxhash

from learn.canonical import message_key

EXPLICIT_HEADERS = (
    "x-session-id",
    "x-claude-code-session-id",
    "thread-id",
    "session_id",
    "helicone-session-id",
    "x-litellm-session-id",
)
EXPLICIT_FIELDS = ("prompt_cache_key", "user", "previous_response_id")
MAX_ID_LEN = 200
ENTRY_BYTES = 768
"""What one remembered conversation costs besides its keys (entries, ids; ~700 measured)."""


class CallLike(Protocol):
    id: str
    tenant: str | None
    request_json: object
    answer: dict | None
    response_id: str | None

    def header(self, name: str) -> str | None: ...

    @property
    def messages(self) -> list[dict]: ...


@dataclass(frozen=True)
class SessionLink:
    session_id: str
    source: str
    """'header:<name>', 'body:<field>', 'prefix' (continues `parent`), or 'new'."""
    parent: str | None = None
    """The exchange this call continues, found by prefix (whatever gave the session id)."""
    continued: int = 0
    """How many of this call's messages the parent's messages and answer account for."""
    rewritten: bool = False
    """The agent rewrote part of that history (e.g. elided old tool output) before resending."""


def prefix_chain(messages: Iterable[dict], start: str) -> list[str]:
    """Hashes of every prefix of `messages`: element k covers messages[:k+1].

    `start` is the hash the chain continues from: `seed_hash(tenant)` for a whole prompt,
    or the last element of another chain to extend it.
    """
    return prefix_chain_keys((message_key(m) for m in messages), start)


class SessionLinker:
    """Assigns each finished call to a session. Not thread-safe: one caller feeds it in order."""

    def __init__(self, window: int = 200_000, heads: int = 20_000, per_head: int = 16,
                 history_budget: int = 16 << 20) -> None:
        self.window = window
        self.heads = heads
        self.per_head = per_head
        self.history_budget = history_budget
        """Bytes the conversations remembered for rewritten histories may hold together."""
        self.history_bytes = 0
        """Bytes they hold now: 8 per message key plus `ENTRY_BYTES` per conversation."""
        self._by_prefix: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._by_response: OrderedDict[str, str] = OrderedDict()
        # opening hash -> session -> (call id, packed message keys of messages + answer); a
        # plain dict keeps its (few) sessions in order for less than an OrderedDict
        self._by_head: OrderedDict[str, dict[str, tuple[str, bytes]]] = OrderedDict()
        # (opening hash, session) -> bytes charged, least recently continued first
        self._continued: OrderedDict[tuple[str, str], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_prefix)

    def link(self, call: CallLike) -> SessionLink:
        return self.link_keys(call, [message_key(m) for m in call.messages])

    def link_keys(self, call: CallLike, keys: list[str],
                  answer_key: str | None = None) -> SessionLink:
        """`link` for a caller that already has the message keys of `call.messages` (and,
        as `answer_key`, of `call.answer`): each message is hashed once however many read it."""
        messages = call.messages
        start = seed_hash(call.tenant or "")
        chain = prefix_chain_keys(keys, start)
        explicit = self._explicit(call)
        found = self._continuation(chain)
        packed = None
        if _stale(found, messages) and len(chain) >= 2 and chain[1] in self._by_head:
            packed = _packed(keys)
            found = self._rewritten(chain, packed, messages) or found
        if explicit is not None:
            result = explicit
            if found is not None:
                result = replace(explicit, parent=found.parent, continued=found.continued,
                                 rewritten=found.rewritten)
        else:
            result = found or SessionLink(session_id="s-" + call.id, source="new")
        if call.answer is not None:
            # What the next call of this conversation will start with: these messages + answer.
            if answer_key is None:
                answer_key = message_key(call.answer)
            full = prefix_chain_keys([answer_key], chain[-1] if chain else start)
            self._remember(self._by_prefix, full[0], (result.session_id, call.id, len(messages) + 1))
            if len(chain) >= 2:
                conv = (packed if packed is not None else _packed(keys)) + _packed([answer_key])
                self._remember_head(chain[1], result.session_id, call.id, conv)
        if call.response_id:
            self._remember(self._by_response, call.response_id, result.session_id)
        return result

    def _explicit(self, call: CallLike) -> SessionLink | None:
        for name in EXPLICIT_HEADERS:
            value = call.header(name)
            if value:
                return SessionLink(value[:MAX_ID_LEN], f"header:{name}")
        body = call.request_json if isinstance(call.request_json, dict) else {}
        for name in EXPLICIT_FIELDS:
            value = body.get(name)
            if not isinstance(value, str) or not value:
                continue
            if name == "previous_response_id":
                known = self._by_response.get(value)
                return SessionLink(known or ("r-" + value)[:MAX_ID_LEN], f"body:{name}")
            return SessionLink(value[:MAX_ID_LEN], f"body:{name}")
        return None

    def _continuation(self, chain: list[str]) -> SessionLink | None:
        for k in range(len(chain) - 1, -1, -1):
            hit = self._by_prefix.get(chain[k])
            if hit is not None:
                self._by_prefix.move_to_end(chain[k])
                session_id, parent, _ = hit
                return SessionLink(session_id, "prefix", parent=parent, continued=k + 1)
        return None

    def _rewritten(self, chain: list[str], packed: bytes, messages: list[dict]) -> SessionLink | None:
        """The longest remembered conversation this call extends despite rewritten messages."""
        sessions = self._by_head.get(chain[1])
        if not sessions:
            return None
        keys = _unpacked(packed)
        answers = {i for i, m in enumerate(messages) if m.get("role") == "assistant"}
        best: tuple[int, int, str, str] | None = None
        for session_id, (call_id, packed_conv) in sessions.items():
            conv = _unpacked(packed_conv)
            n = len(conv)
            if n >= len(keys) or keys[n - 1] != conv[n - 1]:
                continue  # must extend it, with its answer re-sent in place
            if any(keys[i] != conv[i] for i in answers if i < n):
                continue  # earlier answers are never rewritten by the agents we know
            same = sum(1 for a, b in zip(conv, keys) if a == b)
            if same * 2 < n:
                continue
            if best is None or (n, same) > best[:2]:
                best = (n, same, session_id, call_id)
        if best is None:
            return None
        n, _, session_id, call_id = best
        return SessionLink(session_id, "prefix", parent=call_id, continued=n, rewritten=True)

    def _remember(self, table: OrderedDict, key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.window:
            table.popitem(last=False)

    def _remember_head(self, head: str, session_id: str, call_id: str, conv: bytes) -> None:
        """Remember `conv` as the session's latest conversation under its opening `head`.

        Forgets, oldest first: openings past `heads`, a head's sessions past `per_head`, then
        any session while all of them hold more than `history_budget` bytes (this one too,
        when it alone is larger).
        """
        sessions = self._by_head.get(head)
        if sessions is None:
            while self._by_head and len(self._by_head) >= self.heads:
                self._forget_head(next(iter(self._by_head)))
            sessions = self._by_head[head] = {}
        else:
            self._by_head.move_to_end(head)
            if session_id in sessions:  # its previous conversation: replaced, at the end
                del sessions[session_id]
                self.history_bytes -= self._continued.pop((head, session_id))
        sessions[session_id] = (call_id, conv)
        cost = len(conv) + ENTRY_BYTES
        self._continued[(head, session_id)] = cost
        self.history_bytes += cost
        while len(sessions) > self.per_head:
            self._forget(head, next(iter(sessions)))
        while self.history_bytes > self.history_budget:
            self._forget(*next(iter(self._continued)))

    def _forget(self, head: str, session_id: str) -> None:
        sessions = self._by_head[head]
        del sessions[session_id]
        self.history_bytes -= self._continued.pop((head, session_id))
        if not sessions:
            del self._by_head[head]

    def _forget_head(self, head: str) -> None:
        for session_id in self._by_head.pop(head):
            self.history_bytes -= self._continued.pop((head, session_id))

    def check(self) -> None:
        """Raise AssertionError when the remembered conversations and their accounting disagree."""
        held = {(h, s): len(conv) + ENTRY_BYTES
                for h, sessions in self._by_head.items() for s, (_, conv) in sessions.items()}
        assert held == dict(self._continued), "conversations and their recency differ"
        assert self.history_bytes == sum(held.values()), "history_bytes is off"
        assert self.history_bytes <= self.history_budget, "over the history budget"
        assert len(self._by_head) <= self.heads and all(
            0 < len(s) <= self.per_head for s in self._by_head.values()), "over a count bound"


def _stale(found: SessionLink | None, messages: list[dict]) -> bool:
    """No exact link, or one to an older step: answers follow the linked conversation."""
    start = 0 if found is None else found.continued
    return any(m.get("role") == "assistant" for m in messages[start:])


def _packed(keys: list[str]) -> bytes:
    """Message keys as 8 bytes each, a ninth of their size as strings.

    A `message_key` is 16 hex digits and packs to the 8 bytes it spells; any other key is
    hashed to 8 bytes, so equal keys always pack alike.
    """
    if keys and min(map(len, keys)) == max(map(len, keys)) == 16:
        try:
            out = bytes.fromhex("".join(keys))
            if len(out) == 8 * len(keys):
                return out
        except ValueError:
            pass
    return b"".join(_packed_key(k) for k in keys)


def _packed_key(key: str) -> bytes:
    if len(key) == 16:
        try:
            out = bytes.fromhex(key)
            if len(out) == 8:
                return out
        except ValueError:
            pass
    return xxhash.xxh3_64_digest(key.encode())


def _unpacked(packed: bytes) -> memoryview:
    """Packed keys read as one integer each (no copy), to compare them position by position."""
    return memoryview(packed).cast("Q")


def prefix_chain_keys(keys: Iterable[str], start: str) -> list[str]:
    """`prefix_chain` over message keys already computed."""
    out: list[str] = []
    h = start
    for k in keys:
        h = xxhash.xxh3_64_hexdigest((h + k).encode())
        out.append(h)
    return out


def seed_hash(seed: str) -> str:
    """The start of a prefix chain; sessions of different tenants never link."""
    return xxhash.xxh3_64_hexdigest(seed.encode())
