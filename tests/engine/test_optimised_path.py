"""The optimised path in front of the real engine: same answers, warms that land, no harm."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.config import Settings
from proxy.server import ADMISSION, OBSERVER, PLANNER, SERVER_KWARGS, build_app

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

SYSTEM = {"role": "system", "content": "You are a travel agent with tools. " * 60}


async def _serve(settings: Settings):
    runner = web.AppRunner(build_app(settings), access_log=None, **SERVER_KWARGS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


@pytest_asyncio.fixture(loop_scope="session")
async def two_proxies(running, tmp_path):
    """Plain pass-through and everything on, both in front of the same engine."""
    base = dict(upstream=running.engine.base_url)
    plain, plain_url = await _serve(Settings(**base, db=f"sqlite:///{tmp_path}/a.db",
                                             prompt_cache=False, admission=False, prewarm=False))
    tuned, tuned_url = await _serve(Settings(**base, db=f"sqlite:///{tmp_path}/b.db"))
    yield plain_url, tuned_url, tuned.app
    await plain.cleanup()
    await tuned.cleanup()


async def test_deterministic_requests_answer_alike_and_repeat_from_the_cache(running, two_proxies):
    plain_url, tuned_url, _ = two_proxies
    body = {"model": running.model, "temperature": 0, "max_tokens": 6, "ignore_eos": True,
            "messages": [SYSTEM, {"role": "user", "content": "Find me a flight to Oslo."}]}
    async with httpx.AsyncClient(timeout=120) as client:
        plain = await client.post(plain_url + "/v1/chat/completions", json=body)
        first = await client.post(tuned_url + "/v1/chat/completions", json=body)
        again = await client.post(tuned_url + "/v1/chat/completions", json=body)
    assert plain.status_code == first.status_code == again.status_code == 200
    assert first.headers["X-Preheat-Cache"] == "MISS" and again.headers["X-Preheat-Cache"] == "HIT"
    assert "X-Preheat-Cache" not in plain.headers
    p, f = plain.json()["usage"], first.json()["usage"]
    assert p["prompt_tokens"] == f["prompt_tokens"]
    assert p["completion_tokens"] == f["completion_tokens"] == 6
    assert again.content == first.content


async def test_admission_reads_the_engine_cache_and_warms_land(running, two_proxies):
    _, tuned_url, app = two_proxies
    cache = running.engine.cache
    assert app[ADMISSION].capacity_tokens == cache.num_blocks * cache.block_size
    planner = app[PLANNER]
    async with httpx.AsyncClient(timeout=120) as client:
        for task in range(4):  # agent loops: the learner sees each session continue
            messages = [SYSTEM, {"role": "user", "content": f"Task {task}: plan a trip."}]
            for step in range(3):
                r = await client.post(tuned_url + "/v1/chat/completions", json={
                    "model": running.model, "messages": messages, "max_tokens": 24,
                    "ignore_eos": True, "temperature": 0.7})
                assert r.status_code == 200
                answer = r.json()["choices"][0]["message"]["content"]
                messages = messages + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": f"tool result {step} " * 30}]
                app[OBSERVER].flush()
                await asyncio.sleep(0.6)  # the tool runs; the engine is idle
    app[OBSERVER].flush()
    await asyncio.sleep(0.2)
    stats = planner.stats()
    assert stats.sent >= 3, stats
    assert stats.hit >= 2, stats  # the next call found the warmed prefix cached
    assert stats.hit_tokens >= stats.hit * 128
