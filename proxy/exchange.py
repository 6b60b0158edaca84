"""The one object that carries a call through preheat.

An `Exchange` is created when a request arrives, filled in by the hot path (raw bytes and
timings only), then `analyze()`d off the hot path: the request body parsed, the response
(or its SSE stream) reassembled into one assistant message with tool calls and usage. The
proxy stages, the capture store, `learn/`, the admin page and replay all read this object.

This module is pure: no aiohttp, no SQLAlchemy, so `learn/` and the CLI can use it freely.
"""

from __future__ import annotations

import gzip
import itertools
import os
import re
import time
import zlib
from urllib.parse import parse_qsl, urlencode
from dataclasses import dataclass, field
from typing import Any

from learn.canonical import loads
from proxy.sse import parse_sse, reassemble_stream

# Bumped whenever the stored form of an exchange changes; storage keeps converters from
# older versions so old captures still load.
EXCHANGE_VERSION = 1

# Routes whose traffic is captured and learned from. Everything else is only relayed.
CAPTURED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

RAW_FIELDS = (
    "method", "path", "query", "request_headers", "request_body", "request_truncated", "id",
    "started_at", "t_upstream_sent", "t_upstream_headers", "t_first_byte", "t_done", "status",
    "response_headers", "response_chunks", "response_truncated", "error", "error_type", "cache",
    "added_latency",
)
"""What the hot path fills in: all the observer process needs to derive the rest."""


_PROCESS = os.urandom(4).hex()
_COUNTER = itertools.count()


def new_id() -> str:
    """A sortable, unique exchange id: milliseconds since the epoch, process, counter.

    24 hex digits; cheaper than uuid4 (no system call) on the hot path.
    """
    return f"{int(time.time() * 1000):011x}{_PROCESS[:7]}{next(_COUNTER) % 0xFFFFFF:06x}"


@dataclass(eq=False)
class Exchange:
    """One proxied call. Hot-path fields are raw; `analyze()` derives the rest."""

    method: str
    path: str
    query: str = ""
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    request_body: bytes = b""
    request_truncated: bool = False
    """True when the body was larger than the capture limit and only its head was kept."""

    id: str = field(default_factory=new_id)
    started_at: float = field(default_factory=time.time)
    """Wall-clock time the request arrived (seconds since the epoch)."""

    # Timings: seconds since arrival, from a monotonic clock. None when it never happened.
    t_upstream_sent: float | None = None
    t_upstream_headers: float | None = None
    t_first_byte: float | None = None
    t_first_token: float | None = None
    t_done: float | None = None

    status: int | None = None
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_chunks: list[tuple[float, bytes]] = field(default_factory=list)
    """Response body exactly as relayed, as (seconds since arrival, bytes) pieces."""
    response_truncated: bool = False
    error: str | None = None
    error_type: str | None = None

    # Decisions made by stages.
    session_id: str | None = None
    session_source: str | None = None
    parent_id: str | None = None
    """The exchange this call continues, when its session was inferred by prefix."""
    tenant: str | None = None
    cache: str | None = None
    """'HIT' or 'MISS' from the prompt cache; None when the cache did not look."""
    cache_key: str | None = None
    ticket: Any = None
    """The admission ticket (engine/admission.py) when admission looked at the call."""
    added_latency: float | None = None
    """Seconds the proxy itself added before the upstream saw the request and after it answered."""

    # Derived off the hot path by analyze().
    analyzed: bool = False
    request_json: Any = None
    request_error: str | None = None
    """Why the request body could not be understood (it was still forwarded verbatim)."""
    response_json: Any = None
    stream: bool = False
    events: list[dict] = field(default_factory=list)
    """For streams: each SSE event as {'t': seconds, 'event': name or None, 'data': text}."""
    answer: dict | None = None
    """The assistant message the upstream produced (reassembled for streams)."""
    usage: dict | None = None
    model: str | None = None
    response_id: str | None = None
    response_error: str | None = None

    # Derived by the observer (proxy/observe.py), for its session linker and every sink after it.
    message_keys: list[str] | None = None
    """`learn.canonical.message_key` of each of `messages`, hashed once; None until linked."""
    answer_key: str | None = None
    """`message_key` of `answer`, likewise; None also when there is no answer."""

    # -- the raw form --------------------------------------------------------------------

    def raw(self) -> tuple:
        """The `RAW_FIELDS` values, in order: plain data, cheap to pickle on the hot path."""
        return tuple([getattr(self, name) for name in RAW_FIELDS])

    @classmethod
    def from_raw(cls, raw: tuple) -> "Exchange":
        """The exchange `raw()` was taken from, not yet analysed."""
        if len(raw) != len(RAW_FIELDS):
            raise ValueError(f"a raw exchange has {len(RAW_FIELDS)} fields, not {len(raw)}")
        return cls(**dict(zip(RAW_FIELDS, raw)))

    # -- convenience views -------------------------------------------------------------

    def request_object(self) -> dict | None:
        """The request body as a JSON object, parsed once; None when it is not one.

        For stages that must look inside a request before it is forwarded (prompt cache,
        admission): a small body parses in microseconds with orjson.
        """
        if self.request_json is not None or self.analyzed:
            return self.request_json if isinstance(self.request_json, dict) else None
        if not self.request_body or self.request_truncated:
            return None
        try:
            parsed = loads(self.request_body)
        except ValueError:
            return None
        if isinstance(parsed, dict):
            self.request_json = parsed
            return parsed
        return None

    @property
    def api_key(self) -> str | None:
        """The caller's API key (kept in memory only; tenants are keyed hashes of it)."""
        secret = self.header("authorization") or self.header("api-key") or self.header("x-api-key")
        if not secret:
            return None
        return secret[7:].strip() if secret.lower().startswith("bearer ") else secret

    @property
    def captured(self) -> bool:
        return self.path in CAPTURED_PATHS

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.request_headers:
            if k.lower() == lname:
                return v
        return None

    def response_header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.response_headers:
            if k.lower() == lname:
                return v
        return None

    @property
    def response_body(self) -> bytes:
        return b"".join(c for _, c in self.response_chunks)

    @property
    def messages(self) -> list[dict]:
        """The prompt as chat messages (chat: `messages`; responses: `input` items)."""
        body = self.request_json
        if not isinstance(body, dict):
            return []
        if self.path == "/v1/chat/completions":
            msgs = body.get("messages")
            return [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
        if self.path == "/v1/responses":
            return _responses_messages(body)
        if self.path == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return [{"role": "prompt", "content": prompt}]
        return []

    @property
    def tools(self) -> list:
        """The request's tools, in chat completions form (a Responses API function tool is
        flat: vLLM renders it as this, so a warm of the prompt renders the same tokens)."""
        body = self.request_json
        tools = body.get("tools") if isinstance(body, dict) else None
        if not isinstance(tools, list):
            return []
        if self.path != "/v1/responses":
            return tools
        return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                if isinstance(t, dict) and t.get("type") == "function" and "function" not in t
                else t for t in tools]

    @property
    def cached_tokens(self) -> int | None:
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        value = details.get("cached_tokens") if isinstance(details, dict) else None
        # (A count no 64-bit column holds is no count: the store would refuse the capture.)
        return value if isinstance(value, int) and 0 <= value < 2**63 else None

    # -- analysis (off the hot path) ---------------------------------------------------

    def analyze(self) -> "Exchange":
        """Parse the request and reassemble the response. Idempotent; never raises."""
        if self.analyzed:
            return self
        self.analyzed = True
        self.request_headers = [(k, _header_text(v)) for k, v in self.request_headers]
        self.query = redacted_query(_header_text(self.query))
        self.response_headers = [(k, _header_text(v)) for k, v in self.response_headers]
        self._analyze_request()
        try:
            self._analyze_response()
        except Exception as exc:  # a response we cannot read is recorded, not fatal
            self.response_error = f"unreadable response: {exc!r}"[:500]
        return self

    def _analyze_request(self) -> None:
        parsed, self.request_json = self.request_json, None  # perhaps parsed on the hot path
        if self.request_truncated:
            self.request_error = "body larger than the capture limit; only its head was kept"
            return
        if not self.request_body:
            self.request_error = "empty body" if self.method not in ("GET", "HEAD") else None
            return
        ctype = (self.header("content-type") or "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            self.request_error = f"content type {ctype!r} is not JSON"
            return
        try:
            text = self.request_body.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.request_error = f"body is not valid UTF-8 (byte {exc.start})"
            return
        try:
            self.request_json = parsed if parsed is not None else loads(text)
        except ValueError as exc:
            self.request_error = f"body is not valid JSON: {exc}"
            return
        if isinstance(self.request_json, dict):
            self.stream = bool(self.request_json.get("stream"))
            model = self.request_json.get("model")
            self.model = model if isinstance(model, str) else None

    def _analyze_response(self) -> None:
        if self.response_truncated or not self.response_chunks:
            return
        body = _decode_content(self.response_body, self.response_header("content-encoding"))
        ctype = (self.response_header("content-type") or "").lower()
        if "text/event-stream" in ctype:
            self.stream = True
            self.events = parse_sse(self.response_chunks)
            result = reassemble_stream(self.path, self.events)
            self.answer, self.usage = result.answer, result.usage
            self.response_id = result.response_id
            self.model = result.model or self.model
            if result.first_token_at is not None and self.t_first_token is None:
                self.t_first_token = result.first_token_at
            if result.error:
                self.response_error = result.error
            return
        if "json" not in ctype:
            return
        self.response_json = loads(body)
        if not isinstance(self.response_json, dict):
            return
        resp = self.response_json
        self.usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else None
        self.response_id = resp.get("id") if isinstance(resp.get("id"), str) else None
        self.model = resp.get("model") if isinstance(resp.get("model"), str) else self.model
        self.answer = _answer_of(self.path, resp)
        if self.t_first_token is None and self.t_done is not None and self.status == 200:
            self.t_first_token = self.t_done


SECRET_PARAM = re.compile(r"key|token|secret|password|passwd|auth|signature|^sig$", re.I)


def redacted_query(query: str) -> str:
    """The query string with the values of parameters that may hold a credential (`key=`,
    `api-key=`, `access_token=`, ...) replaced, so that no key passed in a URL is stored."""
    if not query or not SECRET_PARAM.search(query):
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(k, "REDACTED" if SECRET_PARAM.search(k) else v) for k, v in pairs])


def _header_text(value: str) -> str:
    """A header value as text any store can hold: aiohttp reads bytes that are not UTF-8 as
    lone surrogates (`surrogateescape`); those bytes are taken as Latin-1, HTTP's old charset."""
    try:
        value.encode()
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        return value.encode("utf-8", "replace").decode()


def _decode_content(body: bytes, encoding: str | None) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc == "gzip":
        return gzip.decompress(body)
    if enc == "deflate":
        return zlib.decompress(body)
    if enc in ("identity", ""):
        return body
    raise ValueError(f"content encoding {enc!r} is not supported for capture")


def _answer_of(path: str, resp: dict) -> dict | None:
    """The assistant message of a non-streamed response, in chat-message form."""
    if path == "/v1/chat/completions":
        choices = resp.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            msg = choices[0].get("message")
            return msg if isinstance(msg, dict) else None
    elif path == "/v1/completions":
        choices = resp.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return {"role": "assistant", "content": choices[0].get("text") or ""}
    elif path == "/v1/responses":
        return _responses_answer(resp.get("output"))
    return None


def _responses_messages(body: dict) -> list[dict]:
    """A Responses API prompt as chat messages, as vLLM renders it: the instructions are the
    system message; each run of output items the client sends back (assistant message,
    reasoning, function calls) is one assistant message, in the form its answer was recorded
    in; a function call's output is a tool message. So a session's next call starts with its
    previous call's messages and answer, as in a chat completions loop."""
    out: list[dict] = []
    if isinstance(body.get("instructions"), str):
        out.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        out.append({"role": "user", "content": inp})
    if not isinstance(inp, list):
        return out
    answered: list[dict] = []
    for item in inp:
        if not isinstance(item, dict):
            continue
        if item.get("role") == "assistant" or item.get("type") in _ANSWER_ITEMS:
            answered.append(item)
            continue
        if answered:
            out.append(_responses_answer(answered))
            answered = []
        if item.get("type") == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": item.get("output")})
        else:
            out.append(item)
    if answered:
        out.append(_responses_answer(answered))
    return out


_ANSWER_ITEMS = ("function_call", "reasoning")
"""Responses API items that are part of an answer (besides the assistant's messages)."""


def _responses_answer(output: Any) -> dict | None:
    """The answer of a Responses API output (or of its items sent back in a later prompt)."""
    if not isinstance(output, list):
        return None
    text: list[str] = []
    calls: list[dict] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        if item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, str):
                text.append(content)
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text.append(part["text"])
        elif item.get("type") == "function_call":
            calls.append(
                {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                }
            )
    answer: dict = {"role": "assistant", "content": "".join(text)}
    if calls:
        answer["tool_calls"] = calls
    return answer
