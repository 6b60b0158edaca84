"""The proxy's shared state: the typed `web.AppKey`s its parts find each other under.

`proxy.server` builds the app and re-exports these; the cleanup contexts (proxy/lifecycle.py)
fill them in as the app starts, and the handlers (proxy/forward.py, proxy/admin/) read them.
A key whose part is off (capture, the prompt cache, admission, the planner, the embedded
engine, the KV mirror) is absent from the app.
"""

from __future__ import annotations

from aiohttp import web

from engine.admission import Admission
from proxy.cache import PromptCache
from proxy.config import Settings
from proxy.metrics import Metrics
from proxy.observer_process import ObserverProcess
from proxy.stages import Pipeline
from proxy.upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", Upstream)
PIPELINE = web.AppKey("pipeline", Pipeline)
METRICS = web.AppKey("metrics", Metrics)
OBSERVER = web.AppKey("observer", ObserverProcess)
CACHE = web.AppKey("prompt_cache", PromptCache)
ADMISSION = web.AppKey("admission", Admission)
PLANNER = web.AppKey("planner", object)
INFLIGHT = web.AppKey("inflight", list)
"""One-element list: real requests at the upstream now (warms are not counted)."""
ENGINE = web.AppKey("engine", object)
"""The embedded engine supervisor, when preheat runs one (engine/supervisor.py)."""
MIRROR = web.AppKey("kv_mirror", object)
"""The mirror of the embedded engine's KV cache (engine/mirror.py)."""
