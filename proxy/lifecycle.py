"""What the proxy starts with the app and stops with it: the aiohttp cleanup contexts.

In the order `build_app` lists them: the observer process and the stage pipeline, the
upstream (or the embedded engine's address), the mirror of the upstream's KV cache,
admission (its capacity read from the engine, what an earlier run learned restored, kept
every KEEP_ADMISSION_EVERY seconds), and the pre-warm planner. On shutdown, the calls still
waiting for admission are answered at once (`drain_admission`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from aiohttp import web

from engine.admission import Admission, Ticket
from engine.supervisor import cache_info
from engine.vllm_plugin import tested_vllm
from proxy.appkeys import (ADMISSION, CACHE, ENGINE, INFLIGHT, METRICS, MIRROR, OBSERVER,
                           PIPELINE, PLANNER, SETTINGS, UPSTREAM)
from proxy.cache import PromptCache
from proxy.config import Settings
from proxy.errors import PreheatError
from proxy.learning import ADMISSION_KEY
from proxy.metrics import Metrics
from proxy.observer_process import ObserverProcess
from proxy.stages import Pipeline, default_stages
from proxy.upstream import Upstream
from storage.learned import load_learned, server_name
from storage.store import Store

log = logging.getLogger("preheat.proxy")

SHUTDOWN_GRACE = 30.0
"""Seconds calls in flight at SIGTERM or Ctrl-C are given to finish."""
KEEP_ADMISSION_EVERY = 60.0
"""Seconds between the snapshots of admission sent to be saved (and one at shutdown)."""


async def observer_ctx(app: web.Application) -> AsyncIterator[None]:
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


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
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


async def mirror_ctx(app: web.Application) -> AsyncIterator[None]:
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


async def drain_admission(app: web.Application) -> None:
    """On shutdown, before in-flight calls are waited for: the calls still waiting for
    admission are answered 503 at once, rather than held until the grace period ends."""
    log.info("shutting down: %d calls in flight (finishing them, for up to %.0f s)",
             app[INFLIGHT][0], SHUTDOWN_GRACE)
    if ADMISSION in app and (n := app[ADMISSION].drain()):
        log.info("shutting down: %d calls waiting for admission answered 503", n)


def _eviction_hints(app: web.Application, settings: Settings) -> bool:
    """The engine evicts the blocks of a call that asks for it first (`engine.vllm_plugin`):
    preheat's own, on the vLLM versions the patch was tested on; another vLLM where the user
    said it has the plugin (PREHEAT_ADMISSION_GUESTS=1). Guests are on by default only
    there, and only there do finished sessions' last calls ask."""
    if ENGINE not in app:
        return settings.admission_guests is True
    if (why := tested_vllm()) is not None:
        log.warning("admission: the engine cannot evict blocks first (%s): guests off unless "
                    "PREHEAT_ADMISSION_GUESTS=1 (evicted as any call), and finished sessions "
                    "evicted as any", why)
        return False
    return True


async def admission_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.admission:
        capacity = settings.admission_capacity_tokens or await _engine_capacity(app)
        if capacity:
            hints = _eviction_hints(app, settings)
            guests = hints if settings.admission_guests is None else settings.admission_guests
            app[ADMISSION] = admission = Admission(
                capacity, fill=settings.admission_fill, max_wait=settings.admission_max_wait,
                ordering=settings.ordering, running=settings.ordering_running,
                suspend=settings.admission_suspend, spare_below=settings.admission_spare_below,
                guests=guests, evict_done=settings.admission_evict_done and hints,
                handoff=settings.admission_handoff,
                guest_busy_below=settings.admission_guest_busy_below,
                bound_guests=settings.admission_bound_guests,
            )
            keeper = None
            if OBSERVER in app:
                app[OBSERVER].on_usage = UsageFeedback(admission)
                if settings.learn:  # what an earlier run learned, kept with the learner's
                    stored = await asyncio.to_thread(
                        _stored_admission, settings.db,
                        server_name(settings.port, settings.server_name))
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


def _stored_admission(db: str, server: str) -> dict | None:
    """Admission's snapshot in this server's newest learned snapshot (None if there is none)."""
    try:
        store = Store(db)
        try:
            data = load_learned(store, server=server)
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
    metrics.count_admission_waits()
    metrics.counter("preheat_admission_total", "Requests admitted to the engine, by how.",
                    lambda: dict(admission.admitted), label="how")
    metrics.gauge("preheat_admission_waiting", "Requests waiting for admission.",
                  lambda: admission.stats().waiting)
    metrics.gauge("preheat_admission_resident_tokens",
                  "Estimated KV tokens of the sessions admission keeps resident.",
                  lambda: admission.stats().resident_tokens)
    metrics.gauge("preheat_admission_wait_seconds_max", "Longest admission wait so far.",
                  lambda: admission.max_wait_seen)
    metrics.counter("preheat_admission_last_calls_total",
                    "Calls expected to be their session's last, sent to be evicted first.",
                    lambda: admission.last_calls, label=None)
    metrics.counter("preheat_admission_suspended_total",
                    "Sessions set aside mid-way because the resident set outgrew the cache.",
                    lambda: admission.suspended, label=None)
    if admission.runs is not None:
        metrics.counter("preheat_ordering_held_total",
                        "Calls that waited for a workflow run with less work left on a loaded "
                        "engine.",
                        lambda: admission.held_for_smaller, label=None)
        metrics.gauge("preheat_ordering_runs", "Workflow runs under way.",
                      lambda: len(admission.runs))


async def prewarm_ctx(app: web.Application) -> AsyncIterator[None]:
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
            return info.tokens if info else None
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

