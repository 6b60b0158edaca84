"""Running preheat's own vLLM engine inside the proxy's lifetime (aiohttp cleanup_ctx)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from aiohttp import web

from proxy.appkeys import ENGINE, MIRROR, SETTINGS

log = logging.getLogger("preheat.engine")

DEMO_NOTICE = (
    "No --model given: serving an offline demo model with RANDOM weights (its text is noise). "
    "It exists to try preheat; name a real model with --model, e.g. "
    "`preheat serve --model Qwen/Qwen2.5-0.5B-Instruct`."
)


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    from engine.mirror import KVMirror
    from engine.supervisor import Engine

    settings = app[SETTINGS]
    model = settings.model
    if model is None:
        from engine.model import ensure_default_model

        log.warning(DEMO_NOTICE)
        model = str(await asyncio.to_thread(ensure_default_model))
    engine = Engine(model, engine_args=list(settings.engine_args))
    mirror = KVMirror.for_engine(engine)
    await mirror.start()  # before the engine, so its first events are seen
    try:
        await engine.start()
        app[ENGINE] = engine
        app[MIRROR] = mirror
        log.info("engine ready at %s (model %s): clients send \"model\": %s", engine.base_url,
                 model, json.dumps(engine.served_model_name))
        yield
    finally:
        await engine.stop()
        await mirror.stop()
        if ENGINE in app:
            log.info("engine stopped")
