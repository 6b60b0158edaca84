"""The admin page's token: where it comes from and how a request proves it has it.

A request is let in when it carries the token as `Authorization: Bearer TOKEN`, as
`?token=TOKEN` (an HTML page then answers with a redirect to the same URL without the token
and sets an HttpOnly cookie, so the token leaves the address bar and the browser history), or
as that cookie. Anything else gets 401. Comparison is constant-time.
"""

from __future__ import annotations

import logging
import secrets
from typing import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("preheat.admin")

COOKIE = "preheat_admin"
ADMIN_TOKEN = web.AppKey("admin_token", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SECURITY_HEADERS = {
    # The pages have no scripts; forbid them outright, so escaping is not the only defence.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def resolve_token(configured: str | None) -> tuple[str, bool]:
    """The token to require, and whether it was generated here (so it must be shown)."""
    if configured:
        return configured, False
    return secrets.token_urlsafe(24), True


def announce(app: web.Application, host: str, port: int) -> None:
    """Log where the admin page is, with the token preheat made up for it."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    log.warning("admin page: http://%s:%s/admin?token=%s (set PREHEAT_ADMIN_TOKEN to choose "
                "the token)", reachable, port, app[ADMIN_TOKEN])


def _presented(request: web.Request) -> tuple[str | None, bool]:
    """(token the request presents, whether it came in the query string)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    if "token" in request.query:
        return request.query["token"], True
    return request.cookies.get(COOKIE), False


def _matches(given: str | None, token: str) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


def require_token(handler: Handler) -> Handler:
    """Wrap an admin handler: 401 without the token; security headers on every answer."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[ADMIN_TOKEN]
        given, from_query = _presented(request)
        if not _matches(given, token):
            resp = _refused(request, given is not None)
        elif from_query and request.method == "GET" and not request.path.endswith(".json"):
            query = {k: v for k, v in request.query.items() if k != "token"}
            resp = web.Response(status=302,
                                headers={"Location": str(request.rel_url.with_query(query))})
            _set_cookie(resp, token, request)
        else:
            resp = await handler(request)
            if from_query:
                _set_cookie(resp, token, request)
        resp.headers.update(SECURITY_HEADERS)
        return resp

    guarded.__name__ = getattr(handler, "__name__", "admin")
    guarded.__doc__ = handler.__doc__
    return guarded


def _set_cookie(resp: web.StreamResponse, token: str, request: web.Request) -> None:
    resp.set_cookie(COOKIE, token, path="/admin", httponly=True, samesite="Strict",
                    secure=request.secure)


def _refused(request: web.Request, wrong: bool) -> web.Response:
    why = "the admin token is wrong" if wrong else "the admin page needs its token"
    hint = ("give it as ?token=..., or as the header Authorization: Bearer ...; preheat logs "
            "it at start when PREHEAT_ADMIN_TOKEN is unset")
    if request.path.endswith(".json"):
        body = {"error": {"message": f"{why}; {hint}", "type": "unauthorized", "code": 401}}
        return web.json_response(body, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="preheat admin"'})
    from proxy.admin.html import esc

    text = (f"<!doctype html><title>401 · preheat</title><h1>401: {esc(why)}</h1>"
            f"<p>{esc(hint)}.</p>")
    return web.Response(status=401, text=text, content_type="text/html",
                        headers={"WWW-Authenticate": 'Bearer realm="preheat admin"'})
