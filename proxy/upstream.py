"""The one seam to the upstream server.

Every forwarded call goes through `Upstream.send()`, which maps aiohttp's exceptions to
preheat's own (proxy/errors.py) with `raise ... from exc`. Nothing is added to the request:
aiohttp's automatic headers (User-Agent, Accept-Encoding, ...) are suppressed and responses
are not decompressed, so bytes pass through exactly as sent. The one exception: a user and
password in the upstream URL are sent as Basic auth on calls that carry no Authorization.
Wherever the URL is shown (messages, /healthz, the admin page, the store) it is `redacted()`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import re
import time
from typing import Any, AsyncIterable, Callable

import aiohttp
from yarl import URL

from proxy.errors import PreheatError, UpstreamTimeout, UpstreamUnreachable

# RFC 9110 7.6.1: connection-specific headers are not forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
KEEPALIVE = 4.0
"""Seconds an idle connection to the upstream is kept for the next request: under uvicorn's
5 s (vLLM's server), after which the server closes it. A request sent on a connection as the
server closes it fails unread; `send` then sends it once more, on a new connection."""
STALE_WITHIN = 0.5
"""Seconds after sending within which a closed connection is taken for a stale pooled one
(it fails at once); one that closes later was a server dying mid-call: not sent again."""
SERVER_PATHS = ("/metrics", "/tokenize", "/detokenize", "/health")
"""A vLLM server's own routes, at its root even where its API is under /v1."""
log = logging.getLogger("preheat.upstream")


def redacted(url: str) -> str:
    """`url` without its user name and password: what messages, pages and logs may show."""
    try:
        parsed: URL | None = URL(url)
    except ValueError:
        parsed = None
    if parsed is not None and parsed.absolute:
        if parsed.user is None and parsed.password is None:
            return url
        return str(parsed.with_user(None))
    # Not a URL with a host that yarl reads (no scheme; a bare '/' in a password): drop
    # everything up to its last '@'.
    return _USERINFO.sub(r"\1", url)


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?.*@")


@functools.lru_cache(maxsize=8)
def _basic_auth(url: str) -> str | None:
    """The Authorization value for the user and password in `url`; None when it has none."""
    try:
        parsed = URL(url)
    except ValueError:  # sending to it fails, in `Upstream.url`
        return None
    if parsed.user is None and parsed.password is None:
        return None
    userpass = f"{parsed.user or ''}:{parsed.password or ''}".encode()
    return "Basic " + base64.b64encode(userpass).decode("ascii")


def forward_headers(headers: Any) -> list[tuple[str, str]]:
    """Request headers to send upstream: all but hop-by-hop ones and Host."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(k, v) for k, v in headers.items() if k.lower() not in drop and k.lower() != "host"]


def relay_headers(headers: Any) -> list[tuple[str, str]]:
    """Response headers to return to the client: all but hop-by-hop ones."""
    drop = HOP_BY_HOP | _connection_tokens(headers) | {"content-length"}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def _connection_tokens(headers: Any) -> set[str]:
    value = headers.get("Connection") or ""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


class Upstream:
    """A pooled HTTP client for one upstream base URL (which may change, e.g. on restart)."""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        max_connections: int = 1000,
    ) -> None:
        self._base = base_url
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._answered = -math.inf  # monotonic time of the last reply begun
        self._failed: tuple[float, str] = (-math.inf, "")  # and of the last failure to connect

    @property
    def base_url(self) -> str:
        return self._base() if callable(self._base) else self._base

    @property
    def server_url(self) -> str:
        """The base URL without a trailing /v1: where a vLLM server's own routes are."""
        base = URL(self.base_url)
        prefix = base.path.rstrip("/")
        prefix = prefix[:-3] if prefix.endswith("/v1") else prefix
        return str(base.with_path(prefix or "/", encoded=True)).rstrip("/")

    def url(self, path_qs: str) -> URL:
        """The upstream URL for a request path; a base ending in /v1 does not double it, nor
        holds the server's own routes (/metrics, /tokenize, /health: vLLM's are at its root)."""
        base = URL(self.base_url)
        prefix = base.path.rstrip("/")
        if prefix.endswith("/v1") and (
                path_qs == "/v1" or path_qs.startswith(("/v1/", "/v1?"))
                or path_qs.split("?", 1)[0] in SERVER_PATHS):
            prefix = prefix[:-3]
        return URL(str(base.origin()) + prefix + path_qs, encoded=True)

    async def start(self) -> None:
        if self._session is None:
            if _basic_auth(self.base_url):
                log.info("the upstream URL %s carries a user and password: they are sent as "
                         "Basic auth on calls without an Authorization header of their own",
                         redacted(self.base_url))
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300,
                                             keepalive_timeout=KEEPALIVE)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def unreachable(self, fresh: float = 5.0, timeout: float = 3.0) -> str | None:
        """Why the upstream cannot be reached, or None: a reply begun in the last `fresh` s
        says it can; else it is asked (any HTTP answer to GET /health will do)."""
        now = time.monotonic()
        if self._answered > max(self._failed[0], now - fresh):
            return None
        if self._failed[0] > now - min(fresh, 1.0):
            return self._failed[1]  # a health checker polling a dead upstream: not each time
        try:
            resp = await asyncio.wait_for(self.send("GET", "/health", [], None), timeout)
        except asyncio.TimeoutError:
            why = f"the upstream at {redacted(self.base_url)} did not answer within {timeout:g} s"
            self._failed = (time.monotonic(), why)
            return why
        except PreheatError as exc:
            return str(exc)
        resp.release()
        return None

    async def send(
        self,
        method: str,
        path_qs: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send a request; the caller reads and releases the response."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        url = self.url(path_qs)  # without the URL's user and password: see `_basic_auth`
        auth = _basic_auth(self.base_url)
        if auth is not None and not any(k.lower() == "authorization" for k, _ in headers):
            headers = [*headers, ("Authorization", auth)]
        session = self._session

        async def request() -> aiohttp.ClientResponse:
            return await session.request(method, url, headers=headers, data=body,
                                         allow_redirects=False, compress=None, chunked=None)

        try:
            sent = time.monotonic()
            try:
                resp = await request()
                self._answered = time.monotonic()
                return resp
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError) or not (
                        body is None or isinstance(body, bytes)) or (
                        time.monotonic() - sent > STALE_WITHIN):
                    raise  # not a pooled connection closing; or a body that cannot be resent
                # The upstream closed the pooled connection as the request went out (an idle
                # keep-alive timing out): no answer was begun. Once more, on a new one.
                log.info("the upstream closed a kept-alive connection under %s %s (%r); "
                         "sending it again", method, url.path, exc)
                resp = await request()
                self._answered = time.monotonic()
                return resp
        except asyncio.TimeoutError as exc:
            raise UpstreamTimeout(f"the upstream at {redacted(self.base_url)} did not answer "
                                  f"within {self.read_timeout:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            why = f"cannot connect to the upstream at {redacted(self.base_url)}: " \
                  f"{exc.os_error or exc}"
            self._failed = (time.monotonic(), why)
            raise UpstreamUnreachable(why) from exc
        except aiohttp.ClientError as exc:
            # Not {exc!r}: a ClientResponseError's repr holds the request's headers, and with
            # them the client's API key (or our Basic auth), which would reach the store.
            raise UpstreamUnreachable(f"the upstream at {redacted(self.base_url)} failed before "
                                      f"replying: {type(exc).__name__}: {exc}") from exc
