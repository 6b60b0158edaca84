"""Server-sent events: split a relayed byte stream into events and rebuild the answer.

Used off the hot path only: the proxy relays bytes as they arrive and never parses them
while a client waits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from learn.canonical import loads


@dataclass(frozen=True)
class StreamResult:
    answer: dict | None
    usage: dict | None
    response_id: str | None
    model: str | None
    first_token_at: float | None
    """Seconds since arrival of the first event that carried generated content."""
    error: str | None


def parse_sse(chunks: Iterable[tuple[float, bytes]]) -> list[dict]:
    """Events of an SSE byte stream, each {'t', 'event', 'data'}; 't' is when it completed.

    Follows the WHATWG rules that matter here: lines end in LF, CRLF or CR; `data:` lines of
    one event are joined with LF; a blank line ends an event; comments (`:`) are skipped.
    A final event without its blank line (a stream cut short) is still returned.
    """
    events: list[dict] = []
    pending: list[bytes] = []  # the line so far, as the pieces of chunks that did not end it
    after_cr = False  # the last chunk ended in CR: an LF opening the next one ends no line
    data: list[str] = []
    name: str | None = None
    t = 0.0
    for t, chunk in chunks:
        # Only the new chunk is scanned, and each line is joined once: a long line arriving
        # in small pieces costs its length, not its length times the number of pieces.
        if after_cr and chunk[:1] == b"\n":
            chunk, after_cr = chunk[1:], False  # the second half of a CRLF split in two
        if not chunk:
            continue
        after_cr = chunk.endswith(b"\r")
        lines = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        if len(lines) == 1:
            pending.append(chunk)
            continue
        if pending:
            pending.append(lines[0])
            lines[0] = b"".join(pending)
        tail = lines.pop()
        pending = [tail] if tail else []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if data or name is not None:
                    events.append({"t": t, "event": name, "data": "\n".join(data)})
                data, name = [], None
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            elif key == "event":
                name = value
    buf = b"".join(pending)
    if buf.strip():
        line = buf.decode("utf-8", errors="replace")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    if data or name is not None:
        events.append({"t": t, "event": name, "data": "\n".join(data)})
    return events


def reassemble_stream(path: str, events: list[dict]) -> StreamResult:
    """Rebuild the assistant message, usage and ids from a stream's events."""
    if path == "/v1/responses":
        return _reassemble_responses(events)
    return _reassemble_choices(path, events)


def _json_events(events: list[dict]) -> Iterable[tuple[float, Any]]:
    for ev in events:
        data = ev["data"]
        if not data or data == "[DONE]":
            continue
        try:
            yield ev["t"], loads(data)
        except ValueError:
            continue


def _text(value: object) -> str | None:
    """A field the store keeps as text (the model, the response's id), if the upstream sent
    it as text: anything else would cost the whole capture at the store."""
    return value if isinstance(value, str) else None


def _reassemble_choices(path: str, events: list[dict]) -> StreamResult:
    content: list[str] = []
    reasoning: list[str] = []
    tool_calls: dict[int, dict] = {}
    usage = response_id = model = error = None
    first_token_at = None
    role = "assistant"
    for t, obj in _json_events(events):
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("error"), (dict, str)):
            error = json.dumps(obj["error"])[:500]
        response_id = response_id or _text(obj.get("id"))
        model = model or _text(obj.get("model"))
        if isinstance(obj.get("usage"), dict):
            usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if path == "/v1/completions":
                piece = choice.get("text")
                if isinstance(piece, str):
                    content.append(piece)
                    first_token_at = t if first_token_at is None else first_token_at
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            role = delta.get("role") or role
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
                first_token_at = t if first_token_at is None else first_token_at
            for key in ("reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    reasoning.append(delta[key])
                    first_token_at = t if first_token_at is None else first_token_at
            for call in delta.get("tool_calls") or []:
                if not isinstance(call, dict):
                    continue
                first_token_at = t if first_token_at is None else first_token_at
                slot = tool_calls.setdefault(
                    call.get("index", len(tool_calls)),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                slot["id"] = call.get("id") or slot["id"]
                fn = call.get("function") or {}
                if isinstance(fn.get("name"), str):
                    slot["function"]["name"] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    slot["function"]["arguments"] += fn["arguments"]
    answer: dict | None = None
    if content or tool_calls or reasoning or response_id:
        answer = {"role": role, "content": "".join(content)}
        if reasoning:
            answer["reasoning_content"] = "".join(reasoning)
        if tool_calls:
            answer["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    return StreamResult(answer, usage, response_id, model, first_token_at, error)


def _reassemble_responses(events: list[dict]) -> StreamResult:
    from proxy.exchange import _responses_answer  # the same shape as a non-streamed reply

    text: list[str] = []
    usage = response_id = model = error = None
    answer = None
    first_token_at = None
    for t, obj in _json_events(events):
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type", "")
        if kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            text.append(obj["delta"])
            first_token_at = t if first_token_at is None else first_token_at
        elif kind == "response.function_call_arguments.delta":
            first_token_at = t if first_token_at is None else first_token_at
        elif kind in ("response.completed", "response.created", "response.failed"):
            resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
            response_id = _text(resp.get("id")) or response_id
            model = _text(resp.get("model")) or model
            if isinstance(resp.get("usage"), dict):
                usage = resp["usage"]
            if kind == "response.completed":
                answer = _responses_answer(resp.get("output"))
            if kind == "response.failed":
                error = json.dumps(resp.get("error"))[:500]
        elif kind == "error":
            error = json.dumps(obj)[:500]
    if answer is None and text:
        answer = {"role": "assistant", "content": "".join(text)}
    return StreamResult(answer, usage, response_id, model, first_token_at, error)
