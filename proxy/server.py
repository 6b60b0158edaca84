"""The aiohttp server: the app's assembly, its status routes, and serving it until a signal.

`build_app` puts the parts together: the cleanup contexts that start and stop the observer,
the upstream, admission and the planner (proxy/lifecycle.py), /healthz and /metrics, the
admin page (proxy/admin/), and the catch-all route every other call takes (the hot path,
proxy/forward.py). The app's shared state lives under the typed keys of proxy/appkeys.py,
which are importable from here as well.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time

from aiohttp import web

from engine.process import cpu_seconds, try_bind
from proxy.appkeys import (ADMISSION, CACHE, ENGINE, INFLIGHT, METRICS, MIRROR, OBSERVER,
                           PIPELINE, PLANNER, SETTINGS, UPSTREAM)
from proxy.config import Settings
from proxy.forward import _ticket  # noqa: F401  (tests make a call's ticket with it)
from proxy.forward import proxy_call, queued_seconds, server_timing, with_priority
from proxy.lifecycle import (SHUTDOWN_GRACE, UsageFeedback, admission_ctx, drain_admission,
                             mirror_ctx, observer_ctx, prewarm_ctx, upstream_ctx)
from proxy.metrics import Metrics
from proxy.upstream import redacted

__all__ = [
    "ADMISSION", "CACHE", "DROP_REASONS", "ENGINE", "INFLIGHT", "METRICS", "MIRROR", "OBSERVER",
    "PIPELINE", "PLANNER", "SERVER_KWARGS", "SETTINGS", "SHUTDOWN_GRACE", "UPSTREAM",
    "UsageFeedback", "build_app", "healthz", "metrics_page", "proxy_call", "queued_seconds",
    "run", "server_timing", "with_priority",
]

log = logging.getLogger("preheat.proxy")

DROP_REASONS = ("queue_full", "queue_bytes", "store_error", "observer_down", "observer_died",
                "unreadable", "closed")
"""Why captures are lost: each counted from 0 on /metrics, so an alert sees the series."""
SERVER_KWARGS = {"handler_cancellation": True, "auto_decompress": False}
"""Runner options the proxy needs: a client that hangs up cancels its upstream request,
and request bodies are forwarded as sent, compressed or not."""


def build_app(settings: Settings) -> web.Application:
    """The proxy application; it captures to `settings.db` through an observer process."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics = Metrics()
    app[INFLIGHT] = [0]
    app.cleanup_ctx.append(observer_ctx)
    if settings.upstream is None:
        from proxy.embedded import engine_ctx  # the engine is an optional extra

        app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(mirror_ctx)
    app.cleanup_ctx.append(admission_ctx)
    app.cleanup_ctx.append(prewarm_ctx)
    app.on_shutdown.append(drain_admission)
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
