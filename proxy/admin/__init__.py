"""The admin page, served by the proxy itself at /admin: what preheat captured and learned.

    setup_admin(app)      # in build_app, before the catch-all proxy route

Pages (each also as JSON: append `.json`): the overview (`/admin`), call and message
templates, workflows drawn as graphs, sessions with their timelines, and single exchanges.
Everything is rendered on the server, escaped, with no JavaScript; reads run in worker
threads over a store opened for reading. The page asks for a token (auth.py).

Modules: auth (the token), routes (pages and their JSON twins), queries (store reads),
knowledge (learner reads), views and views_calls (HTML), graph (DAG layout as SVG),
timeline (session timeline as SVG), html (escaping and the page frame).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from aiohttp import web

from proxy.admin.auth import ADMIN_TOKEN, announce, resolve_token
from proxy.admin.routes import ADMIN, AdminState, add_routes

log = logging.getLogger("preheat.admin")

__all__ = ["setup_admin", "ADMIN", "ADMIN_TOKEN"]


def setup_admin(app: web.Application) -> None:
    """Add the /admin routes and what they need to `app` (built by proxy.server.build_app)."""
    from proxy.server import SETTINGS

    settings = app[SETTINGS]
    token, generated = resolve_token(settings.admin_token)
    app[ADMIN_TOKEN] = token
    add_routes(app)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = await asyncio.to_thread(_open_state, app)
        app[ADMIN] = state
        if generated:
            announce(app, settings.host, settings.port)
        else:
            log.info("admin page at http://%s:%s/admin (token from PREHEAT_ADMIN_TOKEN or "
                     "--admin-token)", settings.host, settings.port)
        yield
        if state.own_store:
            state.store.close()

    app.cleanup_ctx.append(ctx)


def _open_state(app: web.Application) -> AdminState:
    from proxy.admin.knowledge import Knowledge
    from proxy.server import ENGINE, OBSERVER, SETTINGS
    from storage.store import Store

    settings = app[SETTINGS]
    observer = app.get(OBSERVER)
    writer = getattr(observer, "store", None)
    url = writer.url if writer is not None else settings.db
    # Reads get their own connections so they never queue behind the writer's transaction;
    # an in-memory database exists only in the writer's connection, so it is shared.
    in_memory = url in ("sqlite://", "sqlite:///:memory:") or ":memory:" in url
    store = writer if in_memory and writer is not None else Store(url)
    return AdminState(
        store=store,
        knowledge=Knowledge(store, lambda: live_learner(app)),
        engine=lambda: app.get(ENGINE),
        upstream=settings.upstream,
        own_store=store is not writer,
    )


def live_learner(app: web.Application) -> Any:
    """The proxy's own learner, when it keeps one (as an app key or an observer sink)."""
    import proxy.server as server
    from learn.learner import Learner

    key = getattr(server, "LEARNER", None)
    if isinstance(key, web.AppKey) and key in app:
        return app[key]
    observer = app.get(server.OBSERVER)
    for sink in getattr(observer, "sinks", ()):
        for candidate in (sink, getattr(sink, "learner", None)):
            if isinstance(candidate, Learner):
                return candidate
    return None
