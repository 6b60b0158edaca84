"""Session linking: which calls belong to one agent's conversation.

A client that sends an id is believed (headers first, then body fields, in the order of
`EXPLICIT_HEADERS` and `EXPLICIT_FIELDS`). Real agent frameworks send none, so the normal
case is inference: inside one agent loop each call's messages are the previous call's
messages, plus its answer, plus tool results. The linker remembers a hash chain of every
(messages + answer) it has seen and links a new call to the longest one its messages start
with. Time and memory are linear in the number of messages of the call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
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
    """The exchange this call continues, when inferred by prefix."""
    continued: int = 0
    """How many of this call's messages the parent's messages and answer account for."""


def prefix_chain(messages: Iterable[dict], start: str) -> list[str]:
    """Hashes of every prefix of `messages`: element k covers messages[:k+1].

    `start` is the hash the chain continues from: `seed_hash(tenant)` for a whole prompt,
    or the last element of another chain to extend it.
    """
    out: list[str] = []
    h = start
    for m in messages:
        h = xxhash.xxh3_64_hexdigest((h + message_key(m)).encode())
        out.append(h)
    return out


class SessionLinker:
    """Assigns each finished call to a session. Not thread-safe: one caller feeds it in order."""

    def __init__(self, window: int = 200_000) -> None:
        self.window = window
        self._by_prefix: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._by_response: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_prefix)

    def link(self, call: CallLike) -> SessionLink:
        messages = call.messages
        start = seed_hash(call.tenant or "")
        chain = prefix_chain(messages, start)
        result = self._explicit(call) or self._continuation(chain) or SessionLink(
            session_id="s-" + call.id, source="new"
        )
        if call.answer is not None:
            # What the next call of this conversation will start with: these messages + answer.
            full = prefix_chain([call.answer], chain[-1] if chain else start)
            self._remember(self._by_prefix, full[0], (result.session_id, call.id, len(messages) + 1))
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

    def _remember(self, table: OrderedDict, key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.window:
            table.popitem(last=False)


def seed_hash(seed: str) -> str:
    """The start of a prefix chain; sessions of different tenants never link."""
    return xxhash.xxh3_64_hexdigest(seed.encode())
