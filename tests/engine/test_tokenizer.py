"""The engine tokenizer's cache on a fake `/tokenize`: bounded in token ids, compact."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc

import pytest
from aiohttp import web

from engine.tokenizer import ENTRY_IDS, EngineTokenizer


class FakeTokenize:
    """A `/tokenize` answering `{"content": "N ..."}` with N distinct ids, counting asks."""

    def __init__(self) -> None:
        self.asked = 0
        self.url = ""
        self.gate: asyncio.Event | None = None  # set: each answer waits until it opens
        self._runner: web.AppRunner | None = None

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.asked += 1
        if self.gate is not None:
            await self.gate.wait()
        text = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        count = int(text.split()[0])
        return web.json_response({"count": count, "tokens": list(range(1000, 1000 + count))})

    async def start(self) -> FakeTokenize:
        app = web.Application(client_max_size=1 << 26)
        app.router.add_post("/tokenize", self.tokenize)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        await self._runner.cleanup()


@pytest.fixture
async def engine():
    fake = await FakeTokenize().start()
    yield fake
    await fake.stop()


def _memory_held(tok: EngineTokenizer) -> int:
    """Bytes the cache frees when emptied (it is left empty)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tok._cache.clear()
        held = before - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return held


def _chat(tokens: int, n: int) -> list[dict]:
    return [{"role": "user", "content": f"{tokens} conversation {n}"}]


async def test_the_cache_holds_at_most_its_token_ids_oldest_out_first(engine):
    """Pre-warms each tokenize a different long conversation: the ids held stay within the
    bound, in memory as much as in count, and the least recently used go first."""
    bound = 200_000  # 24 entries of 8,000 ids
    tok = EngineTokenizer(engine.url, "m", max_cached_tokens=bound)
    try:
        for n in range(60):  # 480,000 ids asked for, more than twice the bound
            ids = await tok.encode_chat(_chat(8000, n), add_generation_prompt=False)
            assert len(ids) == 8000 and tok.stats().tokens <= bound
            if n == 50:  # 27 to 50 are held: the oldest is used again
                await tok.encode_chat(_chat(8000, 27), add_generation_prompt=False)
        stats = tok.stats()
        assert stats.size == 24 and stats.tokens == 24 * (8000 + ENTRY_IDS)
        asked = engine.asked
        for n in (59, 27, 37, 36):  # the newest and the one used again are held; 28-36 went
            await tok.encode_chat(_chat(8000, n), add_generation_prompt=False)
        assert engine.asked == asked + 1
        assert _memory_held(tok) < 1.2 * 4 * bound  # 4 bytes an id: a tuple would take ~9x
    finally:
        await tok.aclose()


async def test_hits_are_the_ids_of_the_miss_and_a_huge_prompt_is_not_kept(engine):
    tok = EngineTokenizer(engine.url, "m", max_cached_tokens=40_000)
    try:
        first = await tok.encode_prompt("300 words")
        assert await tok.encode_prompt("300 words") == first == tuple(range(1000, 1300))
        assert type(await tok.encode_prompt("300 words")) is tuple
        huge = await tok.encode_prompt("10001 words")  # over a quarter of the bound
        assert len(huge) == 10001 and len(await tok.encode_prompt("10001 words")) == 10001
        assert engine.asked == 3 and tok.stats().size == 1  # the small one is still there
    finally:
        await tok.aclose()


async def test_closing_ends_a_fetch_still_in_flight_and_its_callers_hear_of_it(engine):
    """A fetch is shielded from its callers (one cancelled must not cancel it for the
    others), so closing must end it itself: none outlives the client it posts with."""
    engine.gate = asyncio.Event()
    tok = EngineTokenizer(engine.url, "m")
    caller = asyncio.ensure_future(tok.encode_prompt("300 words"))
    while engine.asked == 0:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(tok.aclose(), 5)
    assert tok._inflight == {} and tok._client is None
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, 5)
