"""The real engine: health, tokenize, warm, and the KV mirror against cached_tokens."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from engine.model import DEMO_MAX_TOKENS
from engine.process import kv_scale
from engine.supervisor import DEMO_NAME, LOAD_GAUGES, metric_totals
from engine.tokenizer import EngineTokenizer
from engine.warm import Warmer
from tests.engine.conftest import KV_CACHE_BYTES

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

BLOCK = 128
VOCAB = (100, 16000)  # clear of the special tokens at the bottom of the vocabulary


def random_tokens(rnd: random.Random, n: int) -> list[int]:
    return [rnd.randrange(*VOCAB) for _ in range(n)]


async def complete(client: httpx.AsyncClient, model: str, prompt, **kw) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, **kw}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def cached_tokens(reply: dict) -> int:
    return reply["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_started_healthy_with_our_flags(running):
    engine = running.engine
    assert engine.state == "ready" and engine.ready and engine.pid
    assert engine.base_url.startswith("http://127.0.0.1:")
    assert engine.cache is not None and engine.cache.block_size == BLOCK
    # 16,384 tokens: 2 KiB a token at bfloat16, 4 KiB in float32 (the cache's bytes doubled)
    assert engine.cache.num_blocks == KV_CACHE_BYTES // (kv_scale(engine.dtype) * 2048 * BLOCK)
    assert engine.cache.num_blocks * BLOCK == 16_384
    async with httpx.AsyncClient(base_url=engine.base_url) as client:
        assert (await client.get("/health")).status_code == 200
        models = (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]][0] == running.model
    assert any("Application startup complete" in line for line in engine.last_log_lines(200))


async def test_the_engine_reports_the_gauges_the_admin_page_and_benchmark_read(running):
    """vLLM's own names for the calls it runs and keeps waiting, and its KV cache in use
    (`LOAD_GAUGES`), and for what it computed (`ENGINE_COUNTERS`): renamed in a later vLLM,
    they would silently read as nothing."""
    from bench.e2e_modes import ENGINE_COUNTERS

    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
        page = (await client.get("/metrics")).text
    load = metric_totals(page, LOAD_GAUGES)
    assert all(v == v for v in load.values()), load  # none missing (NaN)
    assert 0.0 <= load["KV cache in use"] <= 1.0
    counters = metric_totals(page, ENGINE_COUNTERS)
    assert all(v == v for v in counters.values()), counters


async def test_the_demo_model_has_a_name_and_a_default_output_limit(running):
    """An unmodified agent names a model and often sets no max_tokens: the random-weight demo
    never writes an end of turn, so each such call would otherwise run to the whole context."""
    assert running.model == DEMO_NAME
    chat = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=120) as client:
        unlimited = await client.post("/v1/chat/completions", json={"model": DEMO_NAME, **chat})
        asked = await client.post("/v1/chat/completions", json={
            "model": running.engine.model, "max_tokens": DEMO_MAX_TOKENS + 8, **chat})  # its path
    assert unlimited.status_code == 200, unlimited.text
    assert unlimited.json()["usage"]["completion_tokens"] == DEMO_MAX_TOKENS
    assert asked.status_code == 200, asked.text
    assert asked.json()["usage"]["completion_tokens"] == DEMO_MAX_TOKENS + 8  # a call's own wins


async def test_tokenizer_matches_what_the_engine_counts(running):
    tok = EngineTokenizer.for_engine(running.engine)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three prime numbers."}]
    try:
        ids = await tok.encode_chat(messages)
        assert await tok.encode_chat(messages) == ids and tok.stats().hits == 1
        async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
            body = {"model": running.model, "messages": messages, "max_tokens": 1}
            reply = (await client.post("/v1/chat/completions", json=body)).json()
        assert reply["usage"]["prompt_tokens"] == len(ids)
        assert await tok.encode_request(body) == ids
        text = await tok.encode_prompt("def main():\n    return 0\n")
        assert 3 < len(text) < 30
    finally:
        await tok.aclose()


async def test_warm_then_request_hits_the_warmed_blocks(running):
    rnd = random.Random(3)
    prefix = random_tokens(rnd, 700)  # 5 whole blocks (640 tokens) and a partial one
    warmer = Warmer.for_engine(running.engine, running.mirror)
    try:
        computed = await warmer.warm(prefix)
        assert computed == 640  # only whole blocks are sent
        await running.mirror.quiesce()
        assert await warmer.warm(prefix) == 0 and warmer.stats().skipped_cached == 1
        async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
            reply = await complete(client, running.model, prefix + random_tokens(rnd, 50))
        assert cached_tokens(reply) == 640
        stats = warmer.stats()
        assert (stats.requests, stats.warmed_tokens, stats.failed) == (1, 640, 0)
    finally:
        await warmer.aclose()


async def test_concurrent_warms_of_one_prefix_share_a_request(running):
    prefix = random_tokens(random.Random(4), 512)
    warmer = Warmer.for_engine(running.engine, running.mirror)
    try:
        results = await asyncio.gather(*(warmer.warm(prefix) for _ in range(3)))
        assert sorted(results) == [0, 0, 512]
        assert (warmer.stats().requests, warmer.stats().shared) == (1, 2)
    finally:
        await warmer.aclose()


async def test_mirror_agrees_with_cached_tokens_on_20_random_prompts(running):
    rnd = random.Random(5)
    shared = [random_tokens(rnd, 900) for _ in range(3)]
    mirror = running.mirror
    agree = []
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
        for _ in range(20):
            head = rnd.choice(shared)[: rnd.choice([0, 100, 128, 300, 512, 900])]
            prompt = head + random_tokens(rnd, rnd.randrange(1, 600))
            await mirror.quiesce()
            predicted = mirror.cached_prefix_tokens(prompt)
            reply = await complete(client, running.model, prompt)
            agree.append((predicted, cached_tokens(reply)))
    assert all(p == c for p, c in agree), agree
    assert sum(c for _, c in agree) > 0  # the shared heads were hit
    mirror.index.check()


async def test_eviction_under_a_small_cache_shows_in_the_mirror(running):
    rnd = random.Random(6)
    mirror = running.mirror
    prompts = [random_tokens(rnd, 2000) for _ in range(10)]  # 150 blocks > 128 in the cache
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
        for prompt in prompts:
            await complete(client, running.model, prompt)
        await mirror.quiesce()
        stats = mirror.stats()
        assert stats.known and stats.blocks <= stats.capacity_blocks == 128
        first = mirror.cached_prefix_tokens(prompts[0])
        last = mirror.cached_prefix_tokens(prompts[-1])
        assert first < 1920 and last == 1920  # the oldest was evicted, the newest is whole
        reply = await complete(client, running.model, prompts[0])
    assert cached_tokens(reply) == first


async def test_reset_prefix_cache_empties_the_mirror(running):
    rnd = random.Random(8)
    before, after = random_tokens(rnd, 300), random_tokens(rnd, 300)
    mirror = running.mirror
    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=60) as client:
        await complete(client, running.model, before)
        await mirror.quiesce()
        assert mirror.cached_prefix_tokens(before) == 256
        assert (await client.post("/reset_prefix_cache")).status_code == 200
        # The engine publishes the AllBlocksCleared with its next scheduler step.
        await complete(client, running.model, after)
        await mirror.quiesce()
    assert mirror.known and mirror.cached_prefix_tokens(before) == 0
    assert mirror.stats().blocks == 2 and mirror.cached_prefix_tokens(after) == 256
