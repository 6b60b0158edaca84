"""Eviction hints on the real engine (engine/vllm_plugin.py): a call that asks for it has its
blocks evicted before older ones; calls without it are evicted least recently used first."""

from __future__ import annotations

import random

import httpx
import pytest

from engine.vllm_plugin import HINT
from tests.engine.test_engine import BLOCK, complete, random_tokens

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]


async def _after_a_large_call(running, hint: dict | None, seed: int) -> tuple[int, int]:
    """Cache A, C, then B (with `hint`), then a call larger than the room left: what of A and
    of B is cached afterwards (as the KV mirror sees it). Of the cache's 128 blocks (one vLLM's
    null block), A and B take 24 cached blocks each and C 40, and each one more for its token
    decoded (not cached, so reused first); 39 are then free. The large call needs 59."""
    rnd = random.Random(seed)
    a, b = random_tokens(rnd, 24 * BLOCK), random_tokens(rnd, 24 * BLOCK)
    c, large = random_tokens(rnd, 40 * BLOCK), random_tokens(rnd, 59 * BLOCK - 10)
    mirror = running.mirror
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=120) as client:
        assert (await client.post("/reset_prefix_cache")).status_code == 200
        await complete(client, running.model, a)
        await complete(client, running.model, c)
        await complete(client, running.model, b, **({"vllm_xargs": hint} if hint else {}))
        await complete(client, running.model, large)
        await mirror.quiesce()
    return mirror.cached_prefix_tokens(a, as_request=False), mirror.cached_prefix_tokens(
        b, as_request=False)


async def test_a_hinted_call_is_evicted_before_an_older_one(running):
    whole = 24 * BLOCK
    a, b = await _after_a_large_call(running, None, seed=21)
    assert (a, b) == (4 * BLOCK, whole)  # least recently used first: A's last 20 blocks go
    a, b = await _after_a_large_call(running, {HINT: 0}, seed=22)
    assert (a, b) == (whole, 0)  # B asked to go first, and all of it went
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=120) as client:
        chat = await client.post("/v1/chat/completions", json={  # as the proxy sends a guest's
            "vllm_xargs": {HINT: 7}, "model": running.model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text


async def test_a_hint_keeps_the_head_it_names(running):
    # B's first 4 blocks stay where any call's go, the newest of all; its other 20 go first,
    # and with the 39 free blocks that is the 59 the large call needs.
    a, b = await _after_a_large_call(running, {HINT: 4 * BLOCK}, seed=23)
    assert (a, b) == (24 * BLOCK, 4 * BLOCK)
    # A head longer than the call: all of it is freed as any call's is.
    a, b = await _after_a_large_call(running, {HINT: 100 * BLOCK}, seed=24)
    assert (a, b) == (4 * BLOCK, 24 * BLOCK)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # vLLM's imports, not ours
async def test_vllm_elsewhere_in_this_environment_is_left_as_it_is(monkeypatch):
    # vLLM loads the plugin in any engine started from this environment; only preheat's own
    # (which sets PREHEAT_EVICTION_HINTS) is changed.
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from engine import vllm_plugin

    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    before, sample = KVCacheManager.free, CPUModelRunner._sample
    vllm_plugin.register()
    assert KVCacheManager.free is before and not getattr(before, "_preheat", False)
    assert CPUModelRunner._sample is sample and not getattr(sample, "_preheat", False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_vllm_version_it_was_not_tested_on_is_left_as_it_is(monkeypatch, caplog):
    # The patch replaces how vLLM's block pool frees blocks: another version may free them
    # otherwise, so it runs unpatched (and preheat's proxy leaves its guests off).
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from engine import vllm_plugin

    monkeypatch.setenv(vllm_plugin.ENV, "1")
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.40.1")
    before, sample = KVCacheManager.free, CPUModelRunner._sample
    with caplog.at_level("WARNING", logger="preheat.vllm_plugin"):
        vllm_plugin.register()
    assert KVCacheManager.free is before and CPUModelRunner._sample is sample
    assert "eviction hints are off: they were tested on vLLM 0.32.x" in caplog.text
    assert vllm_plugin._missing_parts() == []  # the version tested has every part it uses
