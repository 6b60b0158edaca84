"""The aiohttp server: pass-through of every route, SSE relay, the stage pipeline.

A call's hot path is: build the `Exchange`, run the `request` hooks, forward through the one
upstream seam, relay the response bytes as they arrive, run the `done` hooks. Parsing,
capture and learning happen in the observer process (proxy/observer_process.py).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import sys
import time
from typing import AsyncIterator

from aiohttp import web

from engine.admission import Admission, Ticket, prompt_chain
from engine.process import cpu_seconds, try_bind
from engine.runs import prompt_hashes
from engine.supervisor import cache_info
from learn.sessions import EXPLICIT_HEADERS
from proxy.cache import HEADER, PromptCache
from proxy.config import Settings
from proxy.errors import BodyTooLarge, EngineUnavailable, PreheatError, ShuttingDown
from proxy.exchange import Exchange
from proxy.learning import ADMISSION_KEY
from proxy.metrics import Metrics
from proxy.observer_process import ObserverProcess
from proxy.stages import Pipeline, Reply, default_stages
from proxy.upstream import Upstream, forward_headers, redacted, relay_headers
from storage.learned import load_learned
from storage.store import Store

log = logging.getLogger("preheat.proxy")

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", Upstream)
PIPELINE = web.AppKey("pipeline", Pipeline)
METRICS = web.AppKey("metrics", Metrics)
OBSERVER = web.AppKey("observer", ObserverProcess)
CACHE = web.AppKey("prompt_cache", PromptCache)
ADMISSION = web.AppKey("admission", Admission)
PLANNER = web.AppKey("planner", object)
INFLIGHT = web.AppKey("inflight", list)
DROP_REASONS = ("queue_full", "queue_bytes", "store_error", "observer_down", "observer_died",
                "unreadable", "closed")
"""Why captures are lost: each counted from 0 on /metrics, so an alert sees the series."""
SHUTDOWN_GRACE = 30.0
"""Seconds calls in flight at SIGTERM or Ctrl-C are given to finish."""
"""One-element list: real requests at the upstream now (warms are not counted)."""
ADMITTED_PATHS = ("/v1/chat/completions", "/v1/responses")
ENGINE = web.AppKey("engine", object)
"""The embedded engine supervisor, when preheat runs one (engine/supervisor.py)."""
MIRROR = web.AppKey("kv_mirror", object)
"""The mirror of the embedded engine's KV cache (engine/mirror.py)."""

KEEP_ADMISSION_EVERY = 60.0
"""Seconds between the snapshots of admission sent to be saved (and one at shutdown)."""

# Bodies up to this size are read whole (and forwarded with their Content-Length);
# larger ones stream through as they arrive.
INLINE_BODY = 1024 * 1024
SESSION_KEY = os.urandom(16)
"""Keys the tenant part of an explicit session id in admission (held in memory only)."""
SERVER_KWARGS = {"handler_cancellation": True, "auto_decompress": False}
"""Runner options the proxy needs: a client that hangs up cancels its upstream request,
and request bodies are forwarded as sent, compressed or not."""


def build_app(settings: Settings) -> web.Application:
    """The proxy application; it captures to `settings.db` through an observer process."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics = Metrics()
    app[INFLIGHT] = [0]
    app.cleanup_ctx.append(_observer_ctx)
    if settings.upstream is None:
        from proxy.embedded import engine_ctx  # the engine is an optional extra

        app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_mirror_ctx)
    app.cleanup_ctx.append(_admission_ctx)
    app.cleanup_ctx.append(_prewarm_ctx)
    app.on_shutdown.append(_drain_admission)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    from proxy.admin import setup_admin  # the admin page (proxy/admin/)

    setup_admin(app)
    app.router.add_route("*", "/{tail:.*}", proxy_call)
    metrics.counter(
        "preheat_captures_dropped_total", "Captures lost (queue full, store failure).",
        lambda: {**dict.fromkeys(DROP_REASONS, 0),
                 **(app[OBSERVER].dropped if OBSERVER in app else {})},
    )
    metrics.counter(
        "preheat_prompt_cache_total", "Prompt-cache lookups by result.",
        lambda: {"hit": app[CACHE].hits, "miss": app[CACHE].misses} if CACHE in app else {},
        label="result",
    )
    metrics.gauge(
        "preheat_capture_queue_depth", "Exchanges waiting to be written.",
        lambda: app[OBSERVER].depth if OBSERVER in app else 0,
    )
    metrics.gauge(
        "preheat_captures_written_total", "Exchanges written to the store.",
        lambda: app[OBSERVER].written if OBSERVER in app else 0,
    )
    metrics.counter(
        "preheat_cpu_seconds_total",
        "CPU preheat has used: the proxy, and its observer (capture and learning).",
        lambda: _cpu_seconds(app[OBSERVER].pid if OBSERVER in app else None), label="process",
    )
    return app


def _cpu_seconds(observer_pid: int | None) -> dict[str, float]:
    """What preheat takes from the cores it may share with an engine (read at /metrics)."""
    out = {"proxy": time.process_time()}
    observer = cpu_seconds(observer_pid) if observer_pid is not None else None
    if observer is not None:  # None off Linux, or while the observer restarts
        out["observer"] = observer
    return out


async def _observer_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    observer = None
    if settings.capture:
        observer = ObserverProcess(settings)
        await observer.start()
        app[OBSERVER] = observer
    cache = None
    if settings.prompt_cache:
        cache = PromptCache(settings.prompt_cache_bytes, settings.prompt_cache_ttl)
        app[CACHE] = cache
    app[PIPELINE] = Pipeline(default_stages(app[METRICS], observer, cache))
    try:
        yield
    finally:
        if observer is not None:
            await observer.close()
            log.info("captures written: %d this run%s", observer.written,
                     f" ({observer.dropped.total()} dropped)" if observer.dropped.total() else "")


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if ENGINE in app:
        engine = app[ENGINE]
        base = lambda: engine.base_url  # noqa: E731 (follows the engine across restarts)
    else:
        base = settings.upstream
    upstream = Upstream(
        base, settings.connect_timeout, settings.read_timeout, settings.upstream_connections
    )
    await upstream.start()
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


async def _mirror_ctx(app: web.Application) -> AsyncIterator[None]:
    """Mirror an upstream vLLM's KV cache from the events it publishes to `kv_events`."""
    settings = app[SETTINGS]
    if not settings.kv_events or MIRROR in app:
        yield
        return
    from engine.mirror import KVMirror

    mirror = KVMirror(settings.kv_events)
    await mirror.start()
    app[MIRROR] = mirror
    log.info("mirroring the upstream's KV cache from events at %s", settings.kv_events)
    try:
        yield
    finally:
        await mirror.stop()


async def _drain_admission(app: web.Application) -> None:
    """On shutdown, before in-flight calls are waited for: the calls still waiting for
    admission are answered 503 at once, rather than held until the grace period ends."""
    log.info("shutting down: %d calls in flight (finishing them, for up to %.0f s)",
             app[INFLIGHT][0], SHUTDOWN_GRACE)
    if ADMISSION in app and (n := app[ADMISSION].drain()):
        log.info("shutting down: %d calls waiting for admission answered 503", n)


async def _admission_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.admission:
        capacity = settings.admission_capacity_tokens or await _engine_capacity(app)
        if capacity:
            app[ADMISSION] = admission = Admission(
                capacity, fill=settings.admission_fill, max_wait=settings.admission_max_wait,
                ordering=settings.ordering, running=settings.ordering_running,
                suspend=settings.admission_suspend, spare_below=settings.admission_spare_below,
            )
            keeper = None
            if OBSERVER in app:
                app[OBSERVER].on_usage = UsageFeedback(admission)
                if settings.learn:  # what an earlier run learned, kept with the learner's
                    stored = await asyncio.to_thread(_stored_admission, settings.db)
                    if stored is not None and (n := admission.restore(stored)):
                        log.info("admission: restored the sizes of %d finished sessions", n)
                    keeper = asyncio.create_task(_keep_admission(app[OBSERVER], admission))
            _admission_metrics(app[METRICS], admission)
            log.info("admission on: KV cache of %d tokens", capacity)
            try:
                yield
            finally:
                if keeper is not None:
                    keeper.cancel()
                    app[OBSERVER].keep_admission(admission.snapshot())  # before capture ends
            return
        else:
            log.info("admission off: %s", await _why_no_capacity(app))
    yield


def _stored_admission(db: str) -> dict | None:
    """Admission's snapshot in the store's newest learned snapshot (None if there is none)."""
    try:
        store = Store(db)
        try:
            data = load_learned(store)
        finally:
            store.close()
    except Exception:  # a store we cannot read: admission learns afresh
        log.exception("could not read admission's snapshot from the store")
        return None
    return data.get(ADMISSION_KEY) if isinstance(data, dict) else None


async def _keep_admission(observer: ObserverProcess, admission: Admission) -> None:
    """Send what admission has learned to be saved, every KEEP_ADMISSION_EVERY seconds."""
    while True:
        await asyncio.sleep(KEEP_ADMISSION_EVERY)
        observer.keep_admission(admission.snapshot())


def _admission_metrics(metrics: Metrics, admission: Admission) -> None:
    metrics.counter("preheat_admission_total", "Requests admitted to the engine, by how.",
                    lambda: dict(admission.admitted), label="how")
    metrics.gauge("preheat_admission_waiting", "Requests waiting for admission.",
                  lambda: admission.stats().waiting)
    metrics.gauge("preheat_admission_resident_tokens",
                  "Estimated KV tokens of the sessions admission keeps resident.",
                  lambda: admission.stats().resident_tokens)
    metrics.gauge("preheat_admission_wait_seconds_max", "Longest admission wait so far.",
                  lambda: admission.max_wait_seen)
    metrics.counter("preheat_admission_suspended_total",
                    "Sessions set aside mid-way because the resident set outgrew the cache.",
                    lambda: admission.suspended, label=None)
    if admission.runs is not None:
        metrics.counter("preheat_ordering_held_total",
                        "Calls that waited for a smaller workflow run on a loaded engine.",
                        lambda: admission.held_for_smaller, label=None)
        metrics.gauge("preheat_ordering_runs", "Workflow runs under way.",
                      lambda: len(admission.runs))


async def _prewarm_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pre-warm planner, fed by the learner's predictions (needs admission's vLLM view)."""
    settings = app[SETTINGS]
    admission = app.get(ADMISSION)
    observer = app.get(OBSERVER)
    if not settings.prewarm or admission is None or observer is None or not settings.learn:
        yield
        return
    from engine.planner import WarmPlanner
    from engine.tokenizer import EngineTokenizer
    from engine.warm import Warmer

    upstream = app[UPSTREAM]
    model = await _served_model(upstream)
    if model is None:
        yield
        return
    inflight = app[INFLIGHT]
    warmer = Warmer(upstream.server_url, model, mirror=app.get(MIRROR))
    tokenizer = EngineTokenizer(upstream.server_url, model)
    planner = WarmPlanner(warmer, tokenizer, app.get(MIRROR), idle=lambda: inflight[0] == 0,
                          pressure=lambda: admission.pressured,
                          min_probability=settings.prewarm_min_probability,
                          capacity_tokens=admission.capacity_tokens)
    app[PLANNER] = planner
    if isinstance(observer.on_usage, UsageFeedback):
        observer.on_usage.planner = planner
    observer.listen(planner.offer, planner.keep_warm if settings.prewarm_static else None)
    app[METRICS].counter("preheat_warm_total", "Pre-warm planner outcomes.",
                         lambda: {k: v for k, v in vars(planner.stats()).items()
                                  if not k.endswith("tokens")}, label="result")
    app[METRICS].counter("preheat_warm_tokens_total", "Tokens warmed, hit and wasted.",
                         lambda: {k[:-7]: v for k, v in vars(planner.stats()).items()
                                  if k.endswith("_tokens")}, label="kind")
    app[METRICS].gauge("preheat_warm_prefill_seconds_per_1k_tokens",
                       "The engine's prefill time, learned from the warms it ran.",
                       lambda: planner.clock.per_token * 1000)
    log.info("pre-warming on (model %s)", model)
    try:
        yield
    finally:
        await planner.aclose()
        await warmer.aclose()
        await tokenizer.aclose()


async def _served_model(upstream: Upstream) -> str | None:
    try:
        resp = await upstream.send("GET", "/v1/models", [], None)
        async with resp:
            data = await resp.json() if resp.status == 200 else {}
        return data["data"][0]["id"]
    except (PreheatError, ValueError, KeyError, IndexError, TypeError):
        return None


async def _why_no_capacity(app: web.Application) -> str:
    why = await app[UPSTREAM].unreachable()
    if why:
        return (f"{why}; its KV-cache size is read once, at start: restart preheat once it is "
                "up, or set PREHEAT_ADMISSION_CAPACITY_TOKENS")
    return ("the upstream does not report its KV-cache size (vLLM's /metrics does); set "
            "PREHEAT_ADMISSION_CAPACITY_TOKENS to give it")


async def _engine_capacity(app: web.Application) -> int | None:
    upstream = app[UPSTREAM]
    try:
        resp = await upstream.send("GET", "/metrics", [], None)
        async with resp:
            if resp.status != 200:
                return None
            info = cache_info(await resp.text())
            return info.num_blocks * info.block_size if info else None
    except (PreheatError, UnicodeDecodeError):
        return None


class UsageFeedback:
    """Tell admission the true token counts once the observer has read a call's usage."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.planner = None

    def __call__(self, ticket: Ticket, usage: dict | None, cached_tokens: int | None,
                 answer_hashes: list[int]) -> None:
        if self.planner is not None:
            self.planner.completed(ticket.chain, cached_tokens)
        self.admission.answered(ticket, usage, cached_tokens, answer_hashes)


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


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    engine = app.get(ENGINE)
    upstream = app[UPSTREAM]
    body = {"status": "ok", "upstream": redacted(upstream.base_url)}  # no token asked
    if engine is not None:
        body["engine"] = engine.state
        if not engine.ready:
            body["status"] = "engine " + engine.state
            return web.json_response(body, status=503)
    elif why := await upstream.unreachable():
        body["status"], body["error"] = "upstream unreachable", why
        return web.json_response(body, status=503)
    return web.json_response(body)


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(
        text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8"
    )


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
    _engine_up(engine)
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
    if reply is not None:
        return await _send_reply(request, ex, reply, t0)

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
    start = body.lstrip()
    if not start.startswith(b"{"):
        return body
    rest = start[1:].lstrip()
    return b'{"priority":%d%s' % (priority, b"" if rest.startswith(b"}") else b",") + rest


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
        ex.added_latency = ex.t_upstream_sent + (time.perf_counter() - t_headers)
        cap = settings.capture_max_bytes if keep or ex.cache == "MISS" else 0
        kept = 0
        chunks = ex.response_chunks
        try:
            async for chunk in resp.content.iter_any():
                if ex.t_first_byte is None:
                    ex.t_first_byte = time.perf_counter() - t0
                if not ex.response_truncated and kept + len(chunk) <= cap:
                    chunks.append((time.perf_counter() - t0, chunk))
                    kept += len(chunk)
                elif cap:  # only the head is kept: neither stored whole nor cached
                    ex.response_truncated = True
                await out.write(chunk)
        except asyncio.TimeoutError:
            ex.error, ex.error_type = "the upstream stopped sending mid-response", "upstream_timeout"
            log.warning("upstream timed out mid-response on %s %s", ex.method, ex.path)
            request.transport and request.transport.close()  # type: ignore[func-returns-value]
            return out
        except Exception as exc:  # the upstream hung up mid-body: cut the client off too
            if isinstance(exc, ConnectionError) and request.transport is None:
                raise
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


def _new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop roughly halves the CPU an HTTP hop costs; plain asyncio works too
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _freeze_heap(app: web.Application) -> None:
    """Leave what starting made (modules, the app, its clients) out of garbage collection.

    It lives as long as the process, and a full collection that scans it pauses every call
    in flight: 35-45 ms with the ~80k objects the proxy starts with, measured under load.
    """
    gc.collect()
    gc.freeze()


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; then finish in-flight calls and flush captures."""
    # Worker threads (admin page reads) must not hold the event loop off the GIL for 5 ms.
    sys.setswitchinterval(0.0005)
    if settings.port:  # now, not after the engine has started (minutes, on a large model)
        try_bind(settings.host, settings.port)  # OSError: the CLI says so
    app = build_app(settings)
    app.on_startup.append(_freeze_heap)  # after the cleanup contexts have started
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=lambda *_: log.info(
            "preheat listening on http://%s:%s", settings.host, settings.port
        ),
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE,
        loop=_new_loop(),
        **SERVER_KWARGS,
    )
