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
from proxy.appkeys import ENGINE, OBSERVER, SETTINGS

log = logging.getLogger("preheat.admin")

__all__ = ["setup_admin", "ADMIN", "ADMIN_TOKEN"]


def setup_admin(app: web.Application) -> None:
    """Add the /admin routes and what they need to `app` (built by proxy.server.build_app)."""
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
        state.store.close()

    app.cleanup_ctx.append(ctx)


def _open_state(app: web.Application) -> AdminState:
    from proxy.admin.knowledge import Knowledge
    from proxy.admin.live import optimisations
    from proxy.upstream import redacted
    from storage.store import Store

    settings = app[SETTINGS]
    # The pages read through their own connections (the writer is the observer process), so
    # an in-memory database, which lives in that process only, shows empty here.
    store = Store(settings.db)
    return AdminState(
        store=store,
        knowledge=Knowledge(store, lambda: live_learner(app)),
        engine=lambda: app.get(ENGINE),
        upstream=redacted(settings.upstream) if settings.upstream else None,
        live=lambda: optimisations(app),
    )


def live_learner(app: web.Application) -> Any:
    """A recent copy of the proxy's live learner (blocks: call from a worker thread)."""
    observer = app.get(OBSERVER)
    return observer.learner() if observer is not None else None
