"""Admission in the proxy: under pressure nothing is lost, duplicated, reordered or starved."""

from __future__ import annotations

import asyncio
import time

import httpx

from proxy.config import Settings
from proxy.server import ADMISSION
from tests.conftest import start_proxy

SYSTEM = {"role": "system", "content": "You are a careful agent. " * 20}


async def _session(client: httpx.AsyncClient, url: str, i: int, calls: int) -> list[str]:
    messages = [SYSTEM, {"role": "user", "content": f"task {i} " + "detail " * 80}]
    seen = []
    for step in range(calls):
        r = await client.post(url + "/v1/chat/completions", json={
            "model": "m", "messages": messages, "temperature": 0.5},
            headers={"x-fake-delay": "0.02"})
        assert r.status_code == 200
        answer = r.json()["choices"][0]["message"]
        seen.append(r.json()["id"])
        messages = messages + [{"role": "assistant", "content": answer["content"]},
                               {"role": "user", "content": f"tool output {step}"}]
        await asyncio.sleep(0.01)
    return seen


async def test_pressure_loses_nothing_and_keeps_session_order(upstream, tmp_path):
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1500, admission_max_wait=1.0, prewarm=False)
    proxy = await start_proxy(settings)
    try:
        admission = proxy.app[ADMISSION]
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=30) as client:
            results = await asyncio.gather(*(_session(client, proxy.url, i, 4) for i in range(12)))
        elapsed = time.monotonic() - start
        stats = admission.stats()
        assert upstream.requests == 48  # every call reached the upstream exactly once
        assert all(len(set(r)) == 4 for r in results)
        held_back = ("waited", "returned", "idle", "timeout")  # all went in after a wait
        assert sum(stats.admitted.get(k, 0) for k in held_back) > 0
        assert stats.max_wait_seen < 1.0 + 0.25  # the bound held
        assert elapsed < 30
        # Captured order of each session is the order its calls were made.
        store = await proxy.store()
        for s in store.sessions():
            calls = list(store.exchanges(session_id=s["id"]))
            assert [c.started_at for c in calls] == sorted(c.started_at for c in calls)
            assert [len(c.messages) for c in calls] == [2, 4, 6, 8]
    finally:
        await proxy.runner.cleanup()


async def test_admission_stays_off_without_a_known_cache(proxy):
    assert ADMISSION not in proxy.app  # the fake upstream reports no KV cache
