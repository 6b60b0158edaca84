"""The aiohttp server: pass-through of every route, SSE relay, the stage pipeline.

A call's hot path is: build the `Exchange`, run the `request` hooks, forward through the one
upstream seam, relay the response bytes as they arrive, run the `done` hooks. Parsing,
capture and learning happen in the observer thread (proxy/observe.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import AsyncIterator

from aiohttp import web

from engine.admission import Admission, prompt_chain
from engine.supervisor import cache_info
from learn.sessions import EXPLICIT_HEADERS
from proxy.cache import HEADER, PromptCache
from proxy.config import Settings
from proxy.errors import BodyTooLarge, EngineUnavailable, PreheatError
from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.observe import Observer
from proxy.stages import Pipeline, Reply, default_stages
from proxy.upstream import Upstream, forward_headers, relay_headers

log = logging.getLogger("preheat.proxy")

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", Upstream)
PIPELINE = web.AppKey("pipeline", Pipeline)
METRICS = web.AppKey("metrics", Metrics)
OBSERVER = web.AppKey("observer", Observer)
CACHE = web.AppKey("prompt_cache", PromptCache)
ADMISSION = web.AppKey("admission", Admission)
LEARNER = web.AppKey("learner", object)
PLANNER = web.AppKey("planner", object)
INFLIGHT = web.AppKey("inflight", list)
"""One-element list: real requests at the upstream now (warms are not counted)."""
"""The live `learn.learner.Learner`, fed by the observer thread."""
ADMITTED_PATHS = ("/v1/chat/completions", "/v1/responses")
ENGINE = web.AppKey("engine", object)
"""The embedded engine supervisor, when preheat runs one (engine/supervisor.py)."""
MIRROR = web.AppKey("kv_mirror", object)
"""The mirror of the embedded engine's KV cache (engine/mirror.py)."""

# Bodies up to this size are read whole (and forwarded with their Content-Length);
# larger ones stream through as they arrive.
INLINE_BODY = 1024 * 1024
SERVER_KWARGS = {"handler_cancellation": True, "auto_decompress": False}
"""Runner options the proxy needs: a client that hangs up cancels its upstream request,
and request bodies are forwarded as sent, compressed or not."""


def build_app(settings: Settings, observer: Observer | None = None) -> web.Application:
    """The proxy application. Without an `observer`, one is made from `settings.db`."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics = Metrics()
    app[INFLIGHT] = [0]
    app.cleanup_ctx.append(_observer_ctx(observer))
    if settings.upstream is None:
        from proxy.embedded import engine_ctx  # the engine is an optional extra

        app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_mirror_ctx)
    app.cleanup_ctx.append(_admission_ctx)
    app.cleanup_ctx.append(_prewarm_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    from proxy.admin import setup_admin  # the admin page (proxy/admin/)

    setup_admin(app)
    app.router.add_route("*", "/{tail:.*}", proxy_call)
    metrics.counter(
        "preheat_captures_dropped_total", "Captures lost (queue full, store failure).",
        lambda: dict(app[OBSERVER].dropped) if OBSERVER in app else {},
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
    return app


def _observer_ctx(given: Observer | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        observer = given
        if observer is None and settings.capture:
            from storage.store import Store

            store = await asyncio.to_thread(Store, settings.db)
            observer = Observer(store, maxsize=settings.capture_queue)
            observer.linker.window = settings.session_window
        learning = None
        if observer is not None and settings.learn:
            from proxy.learning import LearnSink

            learning = await asyncio.to_thread(LearnSink, observer.store)
            await asyncio.to_thread(learning.catch_up)
            observer.sinks.append(learning)
            app[LEARNER] = learning.learner
        if observer is not None:
            app[OBSERVER] = observer
            observer.start()
        cache = None
        if settings.prompt_cache:
            cache = PromptCache(settings.prompt_cache_bytes, settings.prompt_cache_ttl)
            app[CACHE] = cache
        app[PIPELINE] = Pipeline(default_stages(app[METRICS], observer, cache))
        yield
        if observer is not None and given is None:
            await asyncio.to_thread(observer.close)
            if learning is not None:
                await asyncio.to_thread(learning.save)
            if observer.store is not None:
                observer.store.close()

    return ctx


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


async def _admission_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.admission:
        capacity = settings.admission_capacity_tokens or await _engine_capacity(app)
        if capacity:
            app[ADMISSION] = admission = Admission(
                capacity, fill=settings.admission_fill, max_wait=settings.admission_max_wait
            )
            if OBSERVER in app:
                app[OBSERVER].sinks.append(UsageFeedback(admission, asyncio.get_running_loop()))
            _admission_metrics(app[METRICS], admission)
            log.info("admission on: KV cache of %d tokens", capacity)
        else:
            log.info("admission off: the upstream does not report its KV-cache size")
    yield


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


async def _prewarm_ctx(app: web.Application) -> AsyncIterator[None]:
    """The pre-warm planner, fed by the learner's predictions (needs admission's vLLM view)."""
    settings = app[SETTINGS]
    admission = app.get(ADMISSION)
    learner_sink = _learn_sink(app)
    if not settings.prewarm or admission is None or learner_sink is None:
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
    warmer = Warmer(upstream.base_url, model, mirror=app.get(MIRROR))
    tokenizer = EngineTokenizer(upstream.base_url, model)
    planner = WarmPlanner(warmer, tokenizer, app.get(MIRROR), idle=lambda: inflight[0] == 0,
                          pressure=lambda: admission.pressured,
                          min_probability=settings.prewarm_min_probability)
    app[PLANNER] = planner
    loop = asyncio.get_running_loop()
    for sink in app[OBSERVER].sinks:
        if isinstance(sink, UsageFeedback):
            sink.planner = planner
    learner_sink.listeners.append(lambda ex, preds: _offer(loop, planner, ex, preds))
    app[METRICS].counter("preheat_warm_total", "Pre-warm planner outcomes.",
                         lambda: {k: v for k, v in vars(planner.stats()).items()
                                  if not k.endswith("tokens")}, label="result")
    app[METRICS].counter("preheat_warm_tokens_total", "Tokens warmed, hit and wasted.",
                         lambda: {k[:-7]: v for k, v in vars(planner.stats()).items()
                                  if k.endswith("_tokens")}, label="kind")
    log.info("pre-warming on (model %s)", model)
    try:
        yield
    finally:
        await planner.aclose()
        await warmer.aclose()
        await tokenizer.aclose()


def _learn_sink(app: web.Application):
    from proxy.learning import LearnSink

    for sink in app[OBSERVER].sinks if OBSERVER in app else ():
        if isinstance(sink, LearnSink):
            return sink
    return None


def _offer(loop: asyncio.AbstractEventLoop, planner, ex: Exchange, predictions) -> None:
    """Observer thread: hand a continuation prediction to the planner on the loop."""
    if ex.answer is None or not isinstance(ex.request_json, dict):
        return
    best = max((p for p in predictions if p.kind == "continue"),
               key=lambda p: p.probability, default=None)
    if best is None:
        return
    prompt = prompt_chain(ex.request_json)
    if prompt is None or not prompt[0]:
        return
    loop.call_soon_threadsafe(planner.offer, prompt[0][-1], ex.messages, ex.answer, ex.tools,
                              best.probability, best.expected_in)


async def _served_model(upstream: Upstream) -> str | None:
    try:
        resp = await upstream.send("GET", "/v1/models", [], None)
        async with resp:
            data = await resp.json() if resp.status == 200 else {}
        return data["data"][0]["id"]
    except (PreheatError, ValueError, KeyError, IndexError, TypeError):
        return None


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
    """Observer sink: tell admission the true token counts once a call's usage is known."""

    def __init__(self, admission: Admission, loop: asyncio.AbstractEventLoop) -> None:
        self.admission = admission
        self.loop = loop
        self.planner = None

    def observe(self, ex: Exchange) -> None:
        if self.planner is not None and ex.ticket is not None:
            self.loop.call_soon_threadsafe(self.planner.completed, ex.ticket.chain,
                                           ex.cached_tokens)
        usage = ex.usage or {}
        prompt, output = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if ex.ticket is None or not isinstance(prompt, int) or not isinstance(output, int):
            return
        chars = sum(ex.ticket.chars)
        self.loop.call_soon_threadsafe(self._apply, ex.ticket.group, chars, prompt, output)

    def _apply(self, group: str, chars: int, prompt: int, output: int) -> None:
        self.admission.calibrate(chars, prompt)
        self.admission.record_output(group, output)


def _ticket(admission: Admission, ex: Exchange):
    request = ex.request_object()
    if request is None:
        return None
    prompt = prompt_chain(request)
    if prompt is None:
        return None
    session = next((v for v in map(ex.header, EXPLICIT_HEADERS) if v), None)
    return admission.ticket(prompt[0], prompt[1], session=session)


async def healthz(request: web.Request) -> web.Response:
    app = request.app
    engine = app.get(ENGINE)
    body = {"status": "ok", "upstream": app[UPSTREAM].base_url}
    if engine is not None:
        body["engine"] = engine.state
        if not engine.ready:
            body["status"] = "engine " + engine.state
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
    if engine is not None and not engine.ready:
        raise EngineUnavailable(
            f"the inference engine is {engine.state}; retry in a few seconds"
        )
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
    inflight = app[INFLIGHT]
    inflight[0] += 1
    try:
        return await _relay(request, ex, t0, settings, body, keep)
    finally:
        inflight[0] -= 1
        if ex.ticket is not None:
            admission.leave(ex.ticket)


async def _relay(
    request: web.Request, ex: Exchange, t0: float, settings: Settings,
    body: bytes | AsyncIterator[bytes] | None, keep: bool,
) -> web.StreamResponse:
    headers = forward_headers(request.headers)
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
        await out.prepare(request)
        ex.added_latency = ex.t_upstream_sent + (time.perf_counter() - t_headers)
        cap = settings.capture_max_bytes if keep or ex.cache == "MISS" else 0
        kept = 0
        chunks = ex.response_chunks
        try:
            async for chunk in resp.content.iter_any():
                if ex.t_first_byte is None:
                    ex.t_first_byte = time.perf_counter() - t0
                if kept + len(chunk) <= cap:
                    chunks.append((time.perf_counter() - t0, chunk))
                    kept += len(chunk)
                elif keep:
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


def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT; then finish in-flight calls and flush captures."""
    # The observer thread must not hold the event loop off the GIL for the default 5 ms.
    sys.setswitchinterval(0.0005)
    web.run_app(
        build_app(settings),
        host=settings.host,
        port=settings.port,
        print=lambda *_: log.info(
            "preheat listening on http://%s:%s", settings.host, settings.port
        ),
        access_log=None,
        shutdown_timeout=30.0,
        loop=_new_loop(),
        **SERVER_KWARGS,
    )
