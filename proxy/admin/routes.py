"""The admin routes: every page is `/admin/...` as HTML and `/admin/....json` as its data.

Each page is a pair: a data function (run in a worker thread, over a store opened for reading
and the learner) and a renderer of that data. The JSON twin is the data itself, so the two
can never disagree. Anything else under /admin answers 404 (never forwarded upstream).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable

import httpx
from aiohttp import web

from engine.supervisor import LOAD_GAUGES, metric_totals
from proxy.admin import knowledge as kn
from proxy.admin import queries, views, views_calls
from proxy.admin.auth import require_token
from proxy.admin.knowledge import Knowledge
from storage.store import Store


@dataclass
class AdminState:
    """What the pages read: a store opened for reading, the learner, and the app's engine."""

    store: Store
    knowledge: Knowledge
    engine: Callable[[], Any]
    upstream: str | None
    live: Callable[[], list] = list
    """Each optimisation's switch and live figures (`proxy.admin.live`; on the event loop)."""


ENGINE_READ_TIMEOUT = 1.0
"""Seconds the overview waits for the engine's /metrics."""
ADMIN = web.AppKey("admin", AdminState)
LIVE = "live"
"""Where a page that shows live figures finds them in its data function's arguments."""


def _overview(s: AdminState, m: dict) -> dict:
    data = queries.overview(s.store)
    engine = s.engine()
    data["engine"] = _engine_state(engine) if engine is not None else None
    data["upstream"] = s.upstream
    data["optimisations"] = m.get(LIVE, [])
    return data


def _engine_state(engine: Any) -> dict:
    out: dict[str, Any] = {}
    for name in ("state", "ready", "base_url", "model", "served_model_name", "pid"):
        try:
            value = getattr(engine, name)
        except Exception:  # a property of an engine mid-restart; show what can be read
            continue
        out[name] = value if isinstance(value, (str, int, float, bool)) or value is None \
            else str(value)
    cache = getattr(engine, "cache", None)
    if cache is not None and hasattr(cache, "tokens"):
        out["kv_cache_tokens"] = cache.tokens
    if out.get("ready") is True and isinstance(out.get("base_url"), str):
        out.update(_engine_load(out["base_url"]))
    return out


def _engine_load(base_url: str) -> dict[str, Any]:
    """What the engine's own gauges say now (`LOAD_GAUGES`): the calls it runs, those it keeps
    waiting, and the share of its KV cache in use; nothing where its /metrics cannot be read
    within ENGINE_READ_TIMEOUT (the page never waits on a busy engine for long)."""
    try:
        resp = httpx.get(base_url + "/metrics", timeout=ENGINE_READ_TIMEOUT)
        text = resp.text if resp.status_code == 200 else ""
    except httpx.HTTPError:
        return {}
    out: dict[str, Any] = {}
    for key, value in metric_totals(text, LOAD_GAUGES).items():
        if value == value:  # (NaN: a gauge this vLLM does not report)
            out[key] = f"{value:.0%}" if key == "KV cache in use" else int(value)
    return out


def _templates(s: AdminState, _: dict) -> dict:
    return {"templates": kn.templates(s.knowledge),
            "message_templates": kn.message_templates(s.knowledge)}


def _template(s: AdminState, m: dict) -> dict | None:
    return kn.template(s.knowledge, m["id"])


def _workflows(s: AdminState, _: dict) -> dict:
    return {"workflows": kn.workflows(s.knowledge)}


def _workflow(s: AdminState, m: dict) -> dict | None:
    return kn.workflow(s.knowledge, m["id"])


def _sessions(s: AdminState, _: dict) -> dict:
    return {"sessions": queries.sessions(s.store)}


def _session(s: AdminState, m: dict) -> dict | None:
    data = queries.session(s.store, m["id"])
    if data is not None:
        data["templates"] = kn.templates_of(s.knowledge, [c["id"] for c in data["calls"]])
    return data


def _exchange(s: AdminState, m: dict) -> dict | None:
    return queries.exchange(s.store, m["id"])


# (path, data function, renderer); a path's JSON twin is the path with ".json" appended.
PAGES: list[tuple[str, Callable[[AdminState, dict], dict | None], Callable[[dict], str]]] = [
    ("/admin", _overview, views.overview),
    ("/admin/templates", _templates, views.templates),
    ("/admin/templates/{id}", _template, views.template),
    ("/admin/workflows", _workflows, views.workflows),
    ("/admin/workflows/{id}", _workflow, views.workflow),
    ("/admin/sessions", _sessions, views_calls.sessions),
    ("/admin/sessions/{id:.+}", _session, views_calls.session),
    ("/admin/exchanges/{id}", _exchange, views_calls.exchange),
]
LIVE_PAGES = (_overview,)


def _handler(data_fn, render, as_json: bool):
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[ADMIN]
        args = dict(request.match_info)
        if data_fn in LIVE_PAGES:  # read here, on the event loop: not in the worker thread
            args[LIVE] = state.live()
        data = await asyncio.to_thread(data_fn, state, args)
        if data is None:
            return _not_found(request)
        if as_json:
            return web.Response(text=json.dumps(data, default=str, ensure_ascii=False),
                                content_type="application/json")
        return web.Response(text=render(data), content_type="text/html")

    return handle


def _not_found(request: web.Request) -> web.Response:
    if request.path.endswith(".json"):
        return web.json_response({"error": {"message": f"nothing at {request.path}",
                                             "type": "not_found", "code": 404}}, status=404)
    from proxy.admin.html import html, page

    return web.Response(status=404, content_type="text/html",
                        text=page("Not found", html("<p>Nothing at <code>{p}</code>.</p>",
                                                    p=request.path)))


async def _elsewhere(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    if request.path == "/admin/":
        return web.Response(status=302, headers={"Location": "/admin"})
    return _not_found(request)


def add_routes(app: web.Application) -> None:
    for path, data_fn, render in PAGES:
        # The JSON twin first: "{id}" would otherwise swallow "x.json" as an id.
        app.router.add_get(path + ".json", require_token(_handler(data_fn, render, True)))
        app.router.add_get(path, require_token(_handler(data_fn, render, False)))
    # Everything else under /admin stays here: never proxied upstream, never captured.
    app.router.add_route("*", "/admin/{tail:.*}", require_token(_elsewhere))
