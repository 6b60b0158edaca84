"""A proxied call's hot path: every route but /healthz, /metrics and /admin comes here.

The call is: build the `Exchange`, run the `request` hooks, wait for admission (the chat
and responses APIs), forward through the one upstream seam, relay the response bytes as
they arrive, run the `done` hooks. Parsing, capture and learning happen in the observer
process (proxy/observer_process.py). Admission's hold is told to the client as a
`Server-Timing` entry (`server_timing`; `queued_seconds` reads it back).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import AsyncIterator

from aiohttp import web

from engine.admission import Admission, prompt_chain
from engine.runs import prompt_hashes
from learn.sessions import EXPLICIT_HEADERS
from proxy.appkeys import ADMISSION, ENGINE, INFLIGHT, PIPELINE, PLANNER, SETTINGS, UPSTREAM
from proxy.cache import HEADER
from proxy.config import Settings
from proxy.errors import BodyTooLarge, EngineUnavailable, PreheatError, ShuttingDown
from proxy.exchange import Exchange
from proxy.stages import Reply
from proxy.upstream import forward_headers, relay_headers

log = logging.getLogger("preheat.proxy")

ADMITTED_PATHS = ("/v1/chat/completions", "/v1/responses")

# Bodies up to this size are read whole (and forwarded with their Content-Length);
# larger ones stream through as they arrive.
INLINE_BODY = 1024 * 1024
SESSION_KEY = os.urandom(16)
"""Keys the tenant part of an explicit session id in admission (held in memory only)."""


def _ticket(admission: Admission, ex: Exchange):
    request = ex.request_object()
    if request is None:
        return None
    prompt = prompt_chain(request)
    if prompt is None:
        return None
    session = next((v for v in map(ex.header, EXPLICIT_HEADERS) if v), None)
    if session is not None:  # one tenant's id never lets another's calls in; and an 8 KB id
        # costs admission's 50,000 remembered sessions no more than a short one
        mac = hashlib.blake2b(key=SESSION_KEY, digest_size=16)
        for part in (ex.api_key or "", session):
            data = part.encode("utf-8", "surrogateescape")
            mac.update(len(data).to_bytes(4, "little") + data)
        session = "x-" + mac.hexdigest()
    return admission.ticket(prompt[0], prompt[1], session=session,
                            hashes=lambda: prompt_hashes(request))


async def proxy_call(request: web.Request) -> web.StreamResponse:
    app = request.app
    t0 = time.perf_counter()
    settings = app[SETTINGS]
    ex = Exchange(
        method=request.method,
        path=request.path,
        query=request.query_string,
        request_headers=list(request.headers.items()),
    )
    pipeline = app[PIPELINE]
    try:
        return await _forward(request, ex, t0, settings)
    except asyncio.CancelledError:
        ex.error, ex.error_type = "the client disconnected", "client_disconnected"
        raise
    except PreheatError as exc:
        ex.status, ex.error, ex.error_type = exc.status, str(exc), exc.code
        return _error_response(exc)
    except ConnectionError as exc:
        ex.error, ex.error_type = f"the client connection failed: {exc}", "client_disconnected"
        raise
    finally:
        ex.t_done = time.perf_counter() - t0
        pipeline.done(ex)


async def _forward(
    request: web.Request, ex: Exchange, t0: float, settings: Settings
) -> web.StreamResponse:
    app = request.app
    engine = app.get(ENGINE)
    limit = settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
    keep = settings.capture and ex.captured
    body: bytes | AsyncIterator[bytes] | None
    if not request.body_exists:
        body = None
    elif length is not None and length <= INLINE_BODY:
        body = ex.request_body = await request.read()
    else:
        body = _stream_body(request, ex, limit, settings.capture_max_bytes if keep else 0)

    reply = app[PIPELINE].request(ex)
    if reply is not None:  # (the prompt cache answers while the engine restarts)
        return await _send_reply(request, ex, reply, t0)
    _engine_up(engine)

    admission = app.get(ADMISSION)
    if admission is not None and ex.path in ADMITTED_PATHS and isinstance(body, bytes):
        ex.ticket = _ticket(admission, ex)
        if ex.ticket is not None:
            planner = app.get(PLANNER)
            if planner is not None:
                planner.arrived(ex.ticket.chain)
            await admission.enter(ex.ticket)
            if settings.admission_priority and ex.ticket.priority:
                body = with_priority(body, ex.ticket.priority)
            if ex.ticket.evict_first is not None:
                body = with_eviction_hint(body, ex.ticket.evict_first)
    inflight = app[INFLIGHT]
    inflight[0] += 1
    try:
        if ex.ticket is not None and ex.ticket.how == "shutdown":
            raise ShuttingDown("preheat is shutting down; this call did not reach the engine: "
                               "retry it")
        _engine_up(engine)  # it may have died while the call waited in admission
        return await _relay(request, ex, t0, settings, body, keep)
    finally:
        inflight[0] -= 1
        if ex.ticket is not None:
            admission.leave(ex.ticket, refused=not 200 <= (ex.status or 0) < 300)


def _engine_up(engine) -> None:
    """Go on only while preheat's own engine (if it runs one) is up: 503 while it restarts."""
    if engine is not None and not engine.ready:
        raise EngineUnavailable(f"the inference engine is {engine.state}; retry in a few seconds")


QUEUE_TIMING = "preheat-queue"


def server_timing(ticket) -> str:
    """How long admission held the call, and why it let it go (`Ticket.how`), as a
    `Server-Timing` entry: a client (or its browser's network panel) sees a slow call's
    queueing apart from the engine's time."""
    return f'{QUEUE_TIMING};dur={1000 * ticket.waited:.1f};desc="{ticket.how}"'


def queued_seconds(header: str) -> float:
    """The seconds a `Server-Timing` header says admission held a call (0 without it)."""
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        if name == QUEUE_TIMING:
            for param in params.split(";"):
                key, _, value = param.partition("=")
                if key.strip() == "dur":
                    return float(value) / 1000
    return 0.0


def with_priority(body: bytes, priority: int) -> bytes:
    """The body with vLLM's `priority` put first in its object, where a `priority` the client
    set itself, later in the object, overrides it (JSON's last duplicate key wins)."""
    return _first_member(body, b'"priority":%d' % priority)


def with_eviction_hint(body: bytes, keep_tokens: int) -> bytes:
    """The body with preheat's eviction hint for its own engine (engine/vllm_plugin.py) put
    first in its object, as vLLM's `vllm_xargs`: a client's own `vllm_xargs`, later in the
    object, replaces it (JSON's last duplicate key wins), and then the hint is lost, not the
    client's arguments."""
    return _first_member(body, b'"vllm_xargs":{"preheat_evict_first":%d}' % max(0, keep_tokens))


def _first_member(body: bytes, member: bytes) -> bytes:
    """A JSON object's bytes with `member` put first, without parsing it again."""
    start = body.lstrip()
    if not start.startswith(b"{"):
        return body
    rest = start[1:].lstrip()
    return b"{" + member + (b"" if rest.startswith(b"}") else b",") + rest


async def _relay(
    request: web.Request, ex: Exchange, t0: float, settings: Settings,
    body: bytes | AsyncIterator[bytes] | None, keep: bool,
) -> web.StreamResponse:
    headers = forward_headers(request.headers)
    if isinstance(body, bytes):  # read whole; it may have been given an engine priority
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
    ex.t_upstream_sent = time.perf_counter() - t0
    upstream = request.app[UPSTREAM]
    try:
        resp = await upstream.send(request.method, request.path_qs, headers, body)
    except PreheatError as exc:
        cause = exc.__cause__
        while cause is not None:  # our own 413 raised inside the body stream
            if isinstance(cause, BodyTooLarge):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise
    async with resp:
        t_headers = time.perf_counter()
        ex.t_upstream_headers = t_headers - t0
        ex.status = resp.status
        ex.response_headers = list(resp.headers.items())
        out = web.StreamResponse(status=resp.status, reason=resp.reason)
        for k, v in relay_headers(resp.headers):
            out.headers.add(k, v)
        if resp.content_length is not None:
            out.content_length = resp.content_length
        if ex.cache is not None:
            out.headers[HEADER] = ex.cache
        if ex.ticket is not None and ex.ticket.admitted is not None:
            out.headers.add("Server-Timing", server_timing(ex.ticket))
        await out.prepare(request)
        held = ex.ticket.waited if ex.ticket is not None and ex.ticket.admitted else 0.0
        ex.added_latency = ex.t_upstream_sent - held + (time.perf_counter() - t_headers)
        cap = settings.capture_max_bytes if keep or ex.cache == "MISS" else 0
        kept = 0
        chunks = ex.response_chunks
        writing = False
        try:
            async for chunk in resp.content.iter_any():
                if ex.t_first_byte is None:
                    ex.t_first_byte = time.perf_counter() - t0
                if not ex.response_truncated and kept + len(chunk) <= cap:
                    chunks.append((time.perf_counter() - t0, chunk))
                    kept += len(chunk)
                elif cap:  # only the head is kept: neither stored whole nor cached
                    ex.response_truncated = True
                writing = True
                await out.write(chunk)
                writing = False
        except asyncio.TimeoutError:
            ex.error, ex.error_type = "the upstream stopped sending mid-response", "upstream_timeout"
            log.warning("upstream timed out mid-response on %s %s", ex.method, ex.path)
            request.transport and request.transport.close()  # type: ignore[func-returns-value]
            return out
        except Exception as exc:  # the upstream hung up mid-body: cut the client off too
            if isinstance(exc, ConnectionError) and (writing or request.transport is None):
                raise  # the client hung up (its transport may still be closing): not upstream's
            ex.error, ex.error_type = f"the upstream closed mid-response: {exc!r}", "upstream_closed"
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out


async def _stream_body(
    request: web.Request, ex: Exchange, limit: int, cap: int
) -> AsyncIterator[bytes]:
    """Yield the request body as it arrives, keeping its head for capture, enforcing `limit`."""
    seen = 0
    head: list[bytes] = []
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
        if cap and seen <= cap:
            head.append(chunk)
        elif cap:
            ex.request_truncated = True
        yield chunk
    if cap:
        ex.request_body = b"".join(head)


async def _send_reply(
    request: web.Request, ex: Exchange, reply: Reply, t0: float
) -> web.StreamResponse:
    ex.status = reply.status
    ex.response_headers = list(reply.headers)
    out = web.StreamResponse(status=reply.status)
    for k, v in reply.headers:
        out.headers.add(k, v)
    await out.prepare(request)
    ex.added_latency = time.perf_counter() - t0
    for chunk in reply.chunks:
        if ex.t_first_byte is None:
            ex.t_first_byte = time.perf_counter() - t0
        ex.response_chunks.append((time.perf_counter() - t0, chunk))
        await out.write(chunk)
    await out.write_eof()
    return out


def _error_response(exc: PreheatError) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json")
