"""The optimised path in front of the real engine: same answers, warms that land, no harm."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from proxy.config import Settings
from proxy.server import ADMISSION, MIRROR, OBSERVER, PLANNER, SERVER_KWARGS, build_app

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

SYSTEM = {"role": "system", "content": "You are a travel agent with tools. " * 60}


async def _serve(settings: Settings, mirror=None):
    app = build_app(settings)
    if mirror is not None:  # the session's mirror already holds the engine's event socket
        app[MIRROR] = mirror
    runner = web.AppRunner(app, access_log=None, **SERVER_KWARGS)
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
    tuned, tuned_url = await _serve(Settings(**base, db=f"sqlite:///{tmp_path}/b.db"),
                                    running.mirror)
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


async def _chat(client, url, model, messages, max_tokens=24):
    r = await client.post(url + "/v1/chat/completions", json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0.7})
    assert r.status_code == 200
    return r.json()


async def test_admission_reads_the_engine_cache(running, two_proxies):
    cache = running.engine.cache
    assert two_proxies[2][ADMISSION].capacity_tokens == cache.tokens


async def test_learned_continuations_reach_the_planner_and_resident_ones_are_not_warmed(
    running, two_proxies
):
    _, tuned_url, app = two_proxies
    planner = app[PLANNER]
    before = planner.stats()
    async with httpx.AsyncClient(timeout=120) as client:
        for task in range(4):  # agent loops: the learner sees each session continue
            messages = [SYSTEM, {"role": "user", "content": f"Task {task}: plan a trip."}]
            for step in range(3):
                reply = await _chat(client, tuned_url, running.model, messages)
                answer = reply["choices"][0]["message"]["content"]
                messages = messages + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": f"tool result {step} " * 30}]
                await app[OBSERVER].flush()
                await asyncio.sleep(0.3)  # the tool runs; the engine is idle
    await asyncio.sleep(1.5)
    stats = planner.stats()
    assert stats.planned > before.planned  # the learner predicted continuations
    # Nothing else runs: vLLM still holds every conversation, so nothing was worth warming.
    assert stats.sent == before.sent
    assert stats.skipped_cached > before.skipped_cached


async def test_an_evicted_conversation_is_warmed_and_the_warm_lands(running, two_proxies):
    _, tuned_url, app = two_proxies
    planner = app[PLANNER]
    before = planner.stats()
    # An agent of its own: a learned static head would be warmed back (see the next test).
    system = {"role": "system", "content": "You are a ferry booking agent with tools. " * 60}
    messages = [system, {"role": "user", "content": "Book a ferry to Rome, please."}]
    async with httpx.AsyncClient(timeout=120) as client:
        reply = await _chat(client, tuned_url, running.model, messages)
        answer = reply["choices"][0]["message"]
        # Other agents fill the cache while this one runs its tool.
        for i in range(6):
            flood = [{"role": "user", "content": f"unrelated document {i} " * 900}]
            await _chat(client, running.engine.base_url, running.model, flood, max_tokens=1)
        await running.mirror.quiesce()
        history = messages + [{"role": "assistant", "content": answer["content"]}]
        assert running.mirror.cached_prefix_tokens(
            await _tokens(running, history)) < 256  # evicted
        await app[OBSERVER].flush()
        key = _chain_end(messages)
        planner.offer(key, messages, answer, [], probability=0.9, expected_in=0.5)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if planner.stats().sent > before.sent:
                break
        assert planner.stats().sent == before.sent + 1
        nxt = await _chat(client, tuned_url, running.model,
                          history + [{"role": "user", "content": "tool result: booked"}])
        await app[OBSERVER].flush()
        await asyncio.sleep(0.3)
    assert nxt["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    assert planner.stats().hit == before.hit + 1


async def test_a_learned_static_head_evicted_is_warmed_for_the_next_new_session(
    running, two_proxies
):
    _, tuned_url, app = two_proxies
    planner = app[PLANNER]
    head = [{"role": "system", "content": "You are a hotel concierge with tools. " * 60}]
    async with httpx.AsyncClient(timeout=120) as client:
        for guest in range(2):  # two sessions start alike: their system prompt is static
            await _chat(client, tuned_url, running.model,
                        head + [{"role": "user", "content": f"Guest {guest} needs a room."}])
        await app[OBSERVER].flush()
        before = planner.stats()
        for i in range(6):  # other work evicts it
            flood = [{"role": "user", "content": f"unrelated report {i} " * 900}]
            await _chat(client, running.engine.base_url, running.model, flood, max_tokens=1)
        await running.mirror.quiesce()
        tokens = await _tokens(running, head)
        whole = len(tokens) - len(tokens) % running.engine.cache.block_size
        # Evicted, or already warmed back: the flood went straight to the engine, so to the
        # planner the engine looked idle throughout, and it may have acted before this line.
        assert (running.mirror.cached_prefix_tokens(tokens) < whole
                or planner.stats().static_sent > before.static_sent)
        for _ in range(100):  # the engine is idle now: the head is warmed again
            await asyncio.sleep(0.1)
            if planner.stats().static_sent > before.static_sent:
                break
        assert planner.stats().static_sent > before.static_sent
        await running.mirror.quiesce()
        assert running.mirror.cached_prefix_tokens(tokens) >= whole
        first = await _chat(client, tuned_url, running.model,
                            head + [{"role": "user", "content": "Guest 2 needs a suite."}])
        await app[OBSERVER].flush()
        await asyncio.sleep(0.3)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] >= whole
    assert planner.stats().hit == before.hit + 1


async def test_a_responses_api_agents_static_head_is_warmed_as_well(running, two_proxies):
    """The OpenAI Agents SDK's default API: instructions, input items and flat function tools
    (read as the chat messages and tools vLLM renders them as)."""
    _, tuned_url, app = two_proxies
    planner = app[PLANNER]
    instructions = "You are a car rental agent with tools. " * 60
    tools = [{"type": "function", "name": "find_car", "description": "Find a car to rent.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]

    async def respond(client, text):
        r = await client.post(tuned_url + "/v1/responses", json={
            "model": running.model, "instructions": instructions, "tools": tools,
            "input": [{"role": "user", "content": text}], "max_output_tokens": 4})
        assert r.status_code == 200
        return r.json()

    async with httpx.AsyncClient(timeout=120) as client:
        for customer in range(2):
            await respond(client, f"Customer {customer} needs a car.")
        await app[OBSERVER].flush()
        before = planner.stats()
        for i in range(6):  # other work evicts it
            flood = [{"role": "user", "content": f"unrelated invoice {i} " * 900}]
            await _chat(client, running.engine.base_url, running.model, flood, max_tokens=1)
        tokens = await _tokens(running, [{"role": "system", "content": instructions}])
        whole = len(tokens) - len(tokens) % running.engine.cache.block_size
        for _ in range(150):  # the engine is idle now: the head is warmed again
            await asyncio.sleep(0.1)
            await running.mirror.quiesce()
            if running.mirror.cached_prefix_tokens(tokens) >= whole:
                break
        assert planner.stats().static_sent > before.static_sent
        first = await respond(client, "Customer 2 needs a van.")
    assert first["usage"]["input_tokens_details"]["cached_tokens"] >= whole


async def _tokens(running, messages):
    from engine.tokenizer import EngineTokenizer

    tok = EngineTokenizer(running.engine.base_url, running.model)
    try:
        return await tok.encode_chat(messages, add_generation_prompt=False)
    finally:
        await tok.aclose()


def _chain_end(messages):
    from engine.admission import prompt_chain

    return prompt_chain({"messages": messages})[0][-1]
