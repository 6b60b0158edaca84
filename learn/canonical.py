"""Canonical JSON and content hashes: the identity of a message everywhere in preheat."""

from __future__ import annotations

import json
from typing import Any, Sequence

import orjson
import xxhash


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, UTF-8."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers past 64 bits, non-string keys: the slow, general path
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def dumps(obj: Any) -> str:
    """Compact JSON text (for storage columns)."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def loads(data: str | bytes) -> Any:
    """Parse JSON; raises ValueError with the position when it is not JSON.

    Also ValueError for what orjson refuses and the standard parser would let through into
    strings no store or hash can take: a lone surrogate escape (`"\\ud800"`), and nesting
    deeper than either parser goes.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        value = json.loads(data)  # the standard parser's error message, or its wider ints
        json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("JSON string holds a lone surrogate") from None
    return value


def content_hash(obj: Any) -> str:
    """xxh3-128 of the canonical JSON, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(canonical_json(obj))


def session_key(session: str) -> int:
    """A session id as the learner counts it: the same in every process (`hash` of a str is
    not), so that a learned snapshot read back knows the sessions it has seen."""
    return xxhash.xxh3_64_intdigest(session.encode("utf-8", "surrogatepass"))


SESSION_KEYS_KEPT = 4
"""A template's snapshot names its sessions while it has been seen in at most this many (a
count is kept beyond): enough to tell one session from two across a restart."""


def session_keys(sessions: set[int]) -> list[int] | None:
    """What a snapshot keeps of a template's sessions beside their count."""
    return sorted(sessions) if len(sessions) <= SESSION_KEYS_KEPT else None


def restore_sessions(count: int, keys: list[int] | None, cap: int = 64) -> set[int]:
    """A template's sessions read back: the ones named, and small stand-ins for the rest of
    the count (no xxh3 of a session id is one of them but by a 1 in 2^58 chance)."""
    named = {int(k) for k in keys or ()}
    return named | set(range(max(0, min(int(count), cap) - len(named))))


def prefix_chain(items: Sequence[Any]) -> tuple[list[str], list[int]] | None:
    """The hash of every leading run of `items` and each item's size in JSON characters.

    Each link hashes the previous one with the item's JSON bytes as sent (xxh3-64, 16 hex
    digits), so a prompt that extends another shares its links. This names prompt prefixes
    for admission (`engine.admission.prompt_chain`) and for static heads (`learn.heads`); a
    client re-sends its history byte for byte, so no normalisation is needed. None when an
    item is not JSON.
    """
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


def message_text(message: dict) -> str:
    """The text of a chat message's content, whether a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def message_key(message: dict) -> str:
    """A hash of what a message says, ignoring how a client happened to spell it.

    An assistant answer comes back from the server as {'role', 'content', 'refusal': None,
    'tool_calls': [...]} and is re-sent by the agent in its own shape (no refusal, content None
    instead of "", extra fields, its tool calls' arguments parsed and serialised again, as
    pydantic-ai does). Session linking compares messages by this key.
    """
    if "role" not in message:  # a Responses API item other than a message (a built-in tool's)
        item = {k: v for k, v in message.items() if k not in ("id", "status")}
        return xxhash.xxh3_64_hexdigest(canonical_json(item))
    calls = []
    for call in tool_calls_of(message):
        fn = function_of(call)
        calls.append([call.get("id"), fn.get("name"), arguments_of(fn.get("arguments"))])
    key = [
        message.get("role"),
        message_text(message),
        calls,
        message.get("tool_call_id"),
        message.get("name") if message.get("role") != "assistant" else None,
    ]
    others = _non_text_parts(message)
    if others:  # two messages with different images must not look alike
        key.append(others)
    return xxhash.xxh3_64_hexdigest(canonical_json(key))


def arguments_of(arguments: object) -> object:
    """A tool call's arguments as the JSON value they spell (however spaced or ordered)."""
    if isinstance(arguments, str):
        try:
            return loads(arguments)
        except ValueError:
            pass
    return arguments


def function_of(call: object) -> dict:
    """The `function` of a tool call, or {} when a client sent something else there."""
    fn = call.get("function") if isinstance(call, dict) else None
    return fn if isinstance(fn, dict) else {}


def tool_calls_of(message: dict) -> list[dict]:
    """A message's tool calls that are dicts (clients send odd things)."""
    calls = message.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _non_text_parts(message: dict) -> list:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [p for p in content if not (isinstance(p, dict) and isinstance(p.get("text"), str))]
