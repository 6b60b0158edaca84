"""preheat's exceptions, and the OpenAI-style error bodies the proxy answers with.

    PreheatError
    ├── UpstreamError            502  the upstream could not be used
    │   ├── UpstreamUnreachable  502  connection refused, DNS failure, reset before a reply
    │   └── UpstreamTimeout      504  no reply (or no next byte) within the read timeout
    ├── EngineUnavailable        503  the embedded engine is starting or restarting
    ├── ShuttingDown             503  preheat stopped while the call waited for admission
    └── BodyTooLarge             413  the request body is over the configured limit

Anything else is a builtin exception. The upstream seam (proxy/upstream.py) is the only
place that turns aiohttp's exceptions into these.
"""

from __future__ import annotations

import json


class PreheatError(Exception):
    status = 500
    type = "proxy_error"
    code = "internal_error"

    def body(self) -> bytes:
        return error_body(str(self), self.type, self.code)


class UpstreamError(PreheatError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class EngineUnavailable(PreheatError):
    status = 503
    type = "engine_unavailable"
    code = "engine_unavailable"


class ShuttingDown(PreheatError):
    status = 503
    type = "unavailable"
    code = "shutting_down"


class BodyTooLarge(PreheatError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


def error_body(message: str, type: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "code": code}}).encode()
