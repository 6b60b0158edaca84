"""The prompt cache: same answer as pass-through, per tenant, bounded, skippable."""

from __future__ import annotations

import json
import time
import tracemalloc

import httpx
import pytest

from proxy.cache import Entry, PromptCache, whole
from proxy.config import Settings
from tests.conftest import start_proxy

GREEDY = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "2+2?"}]}


async def _post(client, url, body, headers=None):
    return await client.post(url + "/v1/chat/completions", json=body, headers=headers or {})


@pytest.mark.parametrize("body", [
    GREEDY,
    {**GREEDY, "stream": True, "stream_options": {"include_usage": True}},
    {"model": "m", "seed": 7, "messages": [{"role": "user", "content": "pick"}]},
    {"model": "m", "temperature": 0, "tools": [{"type": "function", "function": {"name": "f"}}],
     "messages": [{"role": "user", "content": "call f"}]},
], ids=["greedy", "greedy-stream", "seeded", "tool-call"])
async def test_hit_replays_exactly_what_pass_through_answered(upstream, proxy, body):
    async with httpx.AsyncClient() as client:
        direct = await _post(client, upstream.url, body)
        first = await _post(client, proxy.url, body)
        second = await _post(client, proxy.url, body)
    assert first.headers["X-Preheat-Cache"] == "MISS"
    assert second.headers["X-Preheat-Cache"] == "HIT"
    assert direct.content == first.content == second.content
    assert second.headers["content-type"] == direct.headers["content-type"]
    assert upstream.requests == 2  # direct + the miss; the hit never reached the upstream


async def test_tenants_never_share_answers(upstream, proxy):
    async with httpx.AsyncClient() as client:
        a1 = await _post(client, proxy.url, GREEDY, {"Authorization": "Bearer sk-a"})
        b1 = await _post(client, proxy.url, GREEDY, {"Authorization": "Bearer sk-b"})
        a2 = await _post(client, proxy.url, GREEDY, {"Authorization": "Bearer sk-a"})
    assert [r.headers["X-Preheat-Cache"] for r in (a1, b1, a2)] == ["MISS", "MISS", "HIT"]
    assert upstream.requests == 2


@pytest.mark.parametrize("body,headers", [
    ({**GREEDY, "temperature": 0.7}, {}),
    ({k: v for k, v in GREEDY.items() if k != "temperature"}, {}),
    (GREEDY, {"Cache-Control": "no-cache"}),
], ids=["sampled", "default-temperature", "no-cache"])
async def test_not_cached(upstream, proxy, body, headers):
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            r = await _post(client, proxy.url, body, headers)
            assert "X-Preheat-Cache" not in r.headers
    assert upstream.requests == 2


async def test_failures_are_not_cached(upstream, proxy):
    async with httpx.AsyncClient() as client:
        r1 = await _post(client, proxy.url, GREEDY, {"x-fake-status": "500"})
        r2 = await _post(client, proxy.url, GREEDY)
    assert r1.status_code == 500 and r2.status_code == 200
    assert r2.headers["X-Preheat-Cache"] == "MISS"


async def test_a_stream_that_failed_midway_is_not_cached(upstream, proxy):
    body = {**GREEDY, "stream": True}
    async with httpx.AsyncClient() as client:
        failed = await _post(client, proxy.url, body, {"x-fake-stream-error": "1"})
        retried = await _post(client, proxy.url, body)
        again = await _post(client, proxy.url, body)
    assert failed.status_code == 200 and b'"error"' in failed.content
    assert [r.headers["X-Preheat-Cache"] for r in (failed, retried, again)] == ["MISS", "MISS",
                                                                              "HIT"]
    assert b'"error"' not in again.content  # the hit is the answer that finished
    assert upstream.requests == 2


@pytest.mark.parametrize("stream,expected", [
    (b'data: {"choices":[]}\n\ndata: [DONE]\n\n', True),
    (b'data: {"choices":[]}\r\n\r\ndata:[DONE]\r\n\r\n', True),
    (b'event: response.created\ndata: {}\n\nevent: response.completed\ndata: {}\n\n', True),
    (b'data: {"choices":[{"delta":{"content":"\\"finish_reason\\": \\"error\\""}}]}\n\n'
     b'data: [DONE]\n\n', True),  # the words quoted in an answer are not a failure
    (b'data: {"choices":[]}\n\n', False),  # never finished
    (b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n', False),
    (b'data: {"choices":[{"delta":{},"finish_reason":"error"}]}\n\ndata: [DONE]\n\n', False),
    (b'event: response.failed\ndata: {}\n\n', False),
], ids=["done", "crlf", "responses", "quoted", "unfinished", "error-event", "finish-error",
        "response-failed"])
def test_only_a_whole_successful_stream_is_kept(stream, expected):
    half = len(stream) // 2
    assert whole((stream[:half], stream[half:]), "text/event-stream; charset=utf-8") is expected


async def test_an_answer_over_the_capture_limit_is_not_cached(upstream, tmp_path):
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                                       capture=False, capture_max_bytes=2000))
    body = {**GREEDY, "stream": True}
    try:
        async with httpx.AsyncClient() as client:
            answers = [await _post(client, proxy.url, body, {"x-fake-events": "200"})
                       for _ in range(2)]
    finally:
        await proxy.runner.cleanup()
    assert len(answers[0].content) > 2000
    assert [r.headers["X-Preheat-Cache"] for r in answers] == ["MISS", "MISS"]
    assert answers[0].content == answers[1].content and upstream.requests == 2


async def test_the_query_string_is_part_of_the_key(upstream, proxy):
    async with httpx.AsyncClient() as client:
        url = proxy.url + "/v1/chat/completions"
        hits = [(await client.post(url + query, json=GREEDY)).headers["X-Preheat-Cache"]
                for query in ("?key=tenant-a", "?key=tenant-b", "?api-version=2", "?key=tenant-a")]
    assert hits == ["MISS", "MISS", "MISS", "HIT"]


async def test_switch_off(upstream, tmp_path):
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                                       prompt_cache=False))
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(2):
                assert "X-Preheat-Cache" not in (await _post(client, proxy.url, GREEDY)).headers
        assert upstream.requests == 2
    finally:
        await proxy.runner.cleanup()


async def test_hits_are_captured_as_exchanges(upstream, proxy):
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            await _post(client, proxy.url, GREEDY)
    stored = list((await proxy.store()).exchanges())
    assert [e.cache for e in stored] == ["MISS", "HIT", "HIT"]
    assert stored[2].answer == stored[0].answer


def _entry(size: int, at: float = 0.0) -> Entry:
    return Entry(200, (), (b"x" * size,), at)


def test_bounded_by_bytes_least_recently_used_first():
    cache = PromptCache(max_bytes=4000)
    for k in "abc":
        cache.put(k, _entry(500, at=1e12))  # 961 bytes each, with what holding one costs
    cache.get("a")  # a is now the most recently used
    cache.put("d", _entry(520, at=1e12))
    cache.put("e", _entry(520, at=1e12))
    assert cache.get("b") is None and cache.get("a") is not None
    assert cache.bytes <= 4000


def test_bounded_by_age():
    cache = PromptCache(ttl=10)
    cache.put("old", _entry(10, at=-100.0))
    assert cache.get("old") is None and len(cache) == 0


def test_expired_entries_are_swept_when_an_answer_is_stored():
    """Without being looked up: from the least recently used end, up to the first that is
    not expired (an older one used since stays until looked up)."""
    now = 0.0
    cache = PromptCache(ttl=10, clock=lambda: now)
    for k in "abc":  # stored at 0, 1, 2
        cache.put(k, _entry(10, at=now))
        now += 1
    now = 8.0
    assert cache.get("a") is not None  # used at 8: b, c, a from least recently used
    now = 11.5  # a and b are expired, c is not
    cache.put("d", _entry(10, at=now))
    assert "b" not in cache and all(k in cache for k in "cad")
    assert cache.get("a") is None  # dropped once looked up
    now = 100.0
    cache.put("e", _entry(10, at=now))
    assert len(cache) == 1 and cache.bytes == _entry(10).size


def _answer(i: int) -> tuple[bytes, ...]:
    """A one-token chat completion, as vLLM sends it."""
    return (json.dumps({
        "id": f"chatcmpl-{i:024x}", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "4"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1}}).encode(),)


def _stream(i: int) -> tuple[bytes, ...]:
    """Twenty events of one token each, one chunk an event, and the end."""
    events = [
        b'data: {"id":"chatcmpl-%024x","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"tok%d "}}]}\n\n' % (i, k) for k in range(20)]
    return (*events, b"data: [DONE]\n\n")


@pytest.mark.parametrize("answer", [_answer, _stream], ids=["one-token", "stream-20-events"])
def test_memory_held_stays_within_the_byte_bound(answer):
    """What the cache's objects really take (tracemalloc), not only their body bytes: short
    answers are mostly the objects holding them."""
    limit = 4 << 20
    cache = PromptCache(max_bytes=limit)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(10_000):  # two to ten times what fits
            headers = (("content-type", "application/json"), ("server", "uvicorn"),
                       ("x-request-id", f"chatcmpl-{i:016x}"))
            headers = tuple((k.encode().decode(), v.encode().decode()) for k, v in headers)
            cache.put(f"{i:032x}", Entry(200, headers, answer(i), time.monotonic()))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(cache) < 5000  # the bound was reached: entries were pushed out
    assert 0.8 * limit < held < 1.2 * limit
