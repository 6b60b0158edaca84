"""The pre-warm planner on plain parts: when it warms, when it holds back, what it counts."""

from __future__ import annotations

import asyncio

import pytest

from engine.planner import WarmPlanner

MESSAGES = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}]
ANSWER = {"role": "assistant", "content": "calling a tool"}


class FakeTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[list, dict]] = []

    async def encode_chat(self, messages, **options):
        self.calls.append((messages, options))
        return tuple(range(300))


class FakeWarmer:
    block_size = 128

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.hold = hold
        self.warmed: list[tuple] = []
        self.cancelled = 0

    async def warm(self, tokens):
        if self.hold is not None:
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.warmed.append(tokens)
        return 256


class FakeMirror:
    def __init__(self, cached: int | None = 0) -> None:
        self.cached = cached

    def cached_prefix_tokens(self, tokens):
        return self.cached


def planner(warmer=None, tokenizer=None, mirror=None, **kw) -> WarmPlanner:
    kw.setdefault("lead", 5.0)  # warm at once: every offer below expects its call in < 5 s
    return WarmPlanner(warmer or FakeWarmer(), tokenizer or FakeTokenizer(),
                       FakeMirror() if mirror is None else mirror, **kw)


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_warms_the_conversation_with_its_answer_when_idle():
    tok, warmer = FakeTokenizer(), FakeWarmer()
    p = planner(warmer, tok, idle=lambda: True)
    p.offer("k1", MESSAGES, ANSWER, [], probability=0.9, expected_in=1.5)
    await _settle()
    [(chat, options)] = tok.calls
    assert chat == MESSAGES + [{"role": "assistant", "content": "calling a tool"}]
    assert options == {"add_generation_prompt": False}  # a true prefix of the next prompt
    assert len(warmer.warmed) == 1
    stats = p.stats()
    assert stats.sent == 1 and stats.warmed_tokens == 256


async def test_holds_back_when_busy_pressured_or_unlikely():
    busy = planner(idle=lambda: False)
    busy.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)
    pressured = planner(idle=lambda: True, pressure=lambda: True)
    pressured.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)
    unlikely = planner(idle=lambda: True)
    unlikely.offer("k", MESSAGES, ANSWER, [], 0.2, 1.0)
    soon = planner(idle=lambda: True)
    soon.offer("k", MESSAGES, ANSWER, [], 0.9, 0.01)  # the call is due before a warm helps
    await _settle()
    assert busy.stats().skipped_busy == 1 and pressured.stats().skipped_busy == 1
    assert unlikely.stats().skipped_unlikely == 1 and soon.stats().skipped_unlikely == 1
    for q in (busy, pressured, unlikely, soon):
        assert q.warmer.warmed == [] and q.stats().sent == 0


async def test_the_warm_waits_until_shortly_before_the_call():
    warmer = FakeWarmer()
    p = planner(warmer, idle=lambda: True, lead=0.1)
    p.offer("k1", MESSAGES, ANSWER, [], 0.9, expected_in=0.3)
    await asyncio.sleep(0.1)
    assert warmer.warmed == []  # not yet: the tool is still running
    await asyncio.sleep(0.25)
    assert len(warmer.warmed) == 1


async def test_the_real_call_cancels_a_warm_still_running():
    hold = asyncio.Event()
    warmer = FakeWarmer(hold)
    p = planner(warmer, idle=lambda: True)
    p.offer("k1", MESSAGES, ANSWER, [], 0.9, 2.0)
    await _settle()
    p.arrived(["other", "k1", "k2"])  # the next call's prompt starts with k1
    await _settle()
    assert warmer.cancelled == 1 and p.stats().cancelled == 1
    assert p.stats().sent == 0


async def test_resident_or_unknown_prefixes_are_not_warmed():
    resident = planner(mirror=FakeMirror(cached=256), idle=lambda: True)  # 300 tokens: all
    resident.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)                   # whole blocks held
    unknown = planner(mirror=FakeMirror(cached=None), idle=lambda: True)
    unknown.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)
    await _settle()
    assert resident.stats().skipped_cached == 1 and unknown.stats().skipped_unknown == 1
    assert resident.warmer.warmed == [] and unknown.warmer.warmed == []


async def test_hits_and_waste_are_counted():
    p = planner(idle=lambda: True)
    p.offer("a", MESSAGES, ANSWER, [], 0.9, 2.0)
    p.offer("b", MESSAGES[:1], ANSWER, [], 0.9, 2.0)
    await _settle()
    p.completed(["x", "a", "y"], cached_tokens=300)  # the warmed 256 were there
    p.completed(["b", "z"], cached_tokens=0)  # evicted before its call came
    p.completed(["never-warmed"], cached_tokens=0)
    s = p.stats()
    assert (s.hit, s.hit_tokens, s.wasted, s.wasted_tokens) == (1, 256, 1, 256)


# -- static heads ------------------------------------------------------------------------

HEAD = ("h1", [{"role": "system", "content": "sys"}], [], 5)


class CountingMirror(FakeMirror):
    capacity_blocks = 100

    def __init__(self, cached: int | None = 0) -> None:
        super().__init__(cached)
        self.asked = 0

    def cached_prefix_tokens(self, tokens):
        self.asked += 1
        return self.cached


async def _rounds(p: WarmPlanner, n: int = 3) -> None:
    await asyncio.sleep(p.keep_every * n + 0.02)


async def test_a_missing_head_is_warmed_on_an_idle_engine_once_in_whole_blocks():
    tok, warmer, mirror = FakeTokenizer(), FakeWarmer(), CountingMirror(cached=0)
    p = planner(warmer, tok, mirror, idle=lambda: True, keep_every=0.01)
    p.keep_warm([HEAD])
    await _rounds(p)
    [(chat, options)] = tok.calls  # rendered once, as the engine renders a prompt's start
    assert chat == HEAD[1] and options == {"add_generation_prompt": False}
    assert warmer.warmed and warmer.warmed[0] == tuple(range(256))  # 300 tokens: 2 blocks
    mirror.cached = 256  # now resident: nothing more is sent
    sent = len(warmer.warmed)
    await _rounds(p)
    assert len(warmer.warmed) == sent and mirror.asked > sent
    assert p.stats().static_sent == sent and p.stats().static_tokens == 256 * sent
    await p.aclose()


class ListeningMirror(CountingMirror):
    def __init__(self, cached: int | None = 0) -> None:
        super().__init__(cached)
        self.listeners = []

    def on_loss(self, callback) -> None:
        self.listeners.append(callback)

    def lose(self, cached: int) -> None:
        self.cached = cached
        for callback in self.listeners:
            callback()


async def test_a_head_the_cache_loses_is_warmed_at_once_not_at_the_next_look():
    """A reset or an eviction the mirror sees wakes the keeper: with a look every 10 s, the
    head is sent again within a fraction of a second (and not without the mirror's word)."""
    tok, warmer, mirror = FakeTokenizer(), FakeWarmer(), ListeningMirror(cached=256)
    p = planner(warmer, tok, mirror, idle=lambda: True, keep_every=10.0)
    p.keep_warm([HEAD])
    await asyncio.sleep(0.05)
    mirror.cached = 0  # gone, unseen: nothing until the next look
    await asyncio.sleep(0.2)
    assert warmer.warmed == []
    mirror.lose(0)
    for _ in range(100):
        if warmer.warmed:
            break
        await asyncio.sleep(0.01)
    assert warmer.warmed == [tuple(range(256))]
    mirror.lose(256)  # an eviction elsewhere: the head is there, nothing is sent
    await asyncio.sleep(0.1)
    assert len(warmer.warmed) == 1 and mirror.asked >= 2
    await p.aclose()


async def test_heads_wait_for_an_idle_unpressured_engine_and_a_known_cache():
    busy = planner(idle=lambda: False, keep_every=0.01)
    pressured = planner(idle=lambda: True, pressure=lambda: True, keep_every=0.01)
    unknown = planner(mirror=CountingMirror(cached=None), idle=lambda: True, keep_every=0.01)
    for q in (busy, pressured, unknown):
        q.keep_warm([HEAD])
    await _rounds(busy)
    for q in (busy, pressured, unknown):
        assert q.warmer.warmed == [] and q.stats().static_sent == 0
        await q.aclose()
    assert unknown.stats().skipped_unknown >= 1


class ByContent(FakeTokenizer):
    async def encode_chat(self, messages, **options):
        await super().encode_chat(messages, **options)
        first = 1000 * int(messages[0]["content"])
        return tuple(range(first, first + 300))


async def test_heads_stay_within_their_share_of_the_cache():
    tok, warmer, mirror = ByContent(), FakeWarmer(), CountingMirror(cached=0)
    mirror.capacity_blocks = 4  # 512 tokens: a 60% share holds one 256-token head
    p = planner(warmer, tok, mirror, idle=lambda: True, keep_every=0.01)
    p.keep_warm([(f"h{i}", [{"role": "system", "content": str(i)}], [], 9 - i)
                 for i in range(4)])
    await _rounds(p, 2)
    await p.aclose()
    assert warmer.warmed and {t[0] for t in warmer.warmed} == {0}  # the most shared only
    assert {c[0][0]["content"] for c in tok.calls} <= {"0", "1"}  # the rest never rendered
    blind = planner(FakeWarmer(), ByContent(), FakeMirror(cached=0), idle=lambda: True,
                    keep_every=0.01, capacity_tokens=512)  # the size from admission instead
    blind.keep_warm([(f"h{i}", [{"role": "system", "content": str(i)}], [], 9 - i)
                     for i in range(4)])
    await _rounds(blind, 2)
    await blind.aclose()
    assert blind.warmer.warmed and {t[0] for t in blind.warmer.warmed} == {0}


async def test_a_real_request_with_the_head_takes_over_its_warm():
    hold = asyncio.Event()
    warmer = FakeWarmer(hold)
    p = planner(warmer, FakeTokenizer(), CountingMirror(cached=0), idle=lambda: True,
                keep_every=0.01)
    p.keep_warm([HEAD, ("h2", [{"role": "system", "content": "other"}], [], 1)])
    await _rounds(p, 1)
    p.arrived(["h1", "k2"])  # a session starting with the head arrived
    await _settle()
    assert warmer.cancelled == 1 and p.stats().cancelled == 1
    hold.set()
    await _rounds(p, 2)
    assert warmer.warmed  # the keeper went on to the other head
    await p.aclose()


async def test_nothing_starts_once_closed():
    """Heads and offers still arrive from the observer while the proxy shuts down; a warm
    started then would open a connection after the warmer closed."""
    tok, warmer = FakeTokenizer(), FakeWarmer()
    p = planner(warmer, tok, CountingMirror(cached=0), idle=lambda: True, keep_every=0.01)
    await p.aclose()
    p.keep_warm([HEAD])
    p.offer("k1", MESSAGES, ANSWER, [], 0.9, 1.0)
    await _rounds(p)
    assert tok.calls == [] and warmer.warmed == []


async def test_warmer_and_tokenizer_refuse_work_once_closed():
    """After `aclose()` neither opens a new connection (one would outlive its owner)."""
    from engine.errors import EngineRequestError
    from engine.tokenizer import EngineTokenizer
    from engine.warm import Warmer

    warmer = Warmer("http://127.0.0.1:9", "m", block_size=4)
    await warmer.aclose()
    assert await warmer.warm(list(range(8))) == 0  # advice: counted, not raised
    assert warmer.stats().failed == 1 and warmer._client is None
    tokenizer = EngineTokenizer("http://127.0.0.1:9", "m")
    await tokenizer.aclose()
    with pytest.raises(EngineRequestError, match="closed"):
        await tokenizer.encode_prompt("hello")
    assert tokenizer._client is None


async def test_a_caller_cancelled_while_tokenizing_leaves_the_others_their_answer():
    """Two callers share one tokenize request for the same content; the first is a warm
    that the real call takes over (cancelled): the second still gets the token ids."""
    from engine.tokenizer import EngineTokenizer

    tokenizer = EngineTokenizer("http://127.0.0.1:9", "m")
    posts = []

    async def post(body):
        posts.append(body)
        await asyncio.sleep(0.05)
        return (1, 2, 3)

    tokenizer._post = post
    first = asyncio.ensure_future(tokenizer.encode_prompt("shared head"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(tokenizer.encode_prompt("shared head"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == (1, 2, 3) and first.cancelled()
    assert len(posts) == 1 and await tokenizer.encode_prompt("shared head") == (1, 2, 3)


def test_the_prefill_clock_learns_the_engines_own_timings():
    from engine.planner import PrefillClock

    clock = PrefillClock()
    assert clock.per_token == 0.00025  # the prior, until the engine has been timed
    for n in (256, 512, 1024, 2048):
        clock.observe(n, 0.05 + 0.001 * n)  # an engine four times slower than the prior
    assert clock.fixed == pytest.approx(0.05) and clock.per_token == pytest.approx(0.001)
    same = PrefillClock()
    for _ in range(3):
        same.observe(512, 0.256)  # no spread in size: all of it per token
    assert same.fixed == 0.0 and same.per_token == pytest.approx(0.0005)


async def test_a_warm_that_would_land_late_or_save_too_little_is_not_sent():
    late = planner(idle=lambda: True)
    late.clock.per_token = 0.01  # 256 missing tokens: 2.56 s of prefill, the call due in 0.3 s
    late.offer("k", MESSAGES, ANSWER, [], 0.7, expected_in=0.3)
    in_time = planner(idle=lambda: True)
    in_time.clock.per_token = 0.01
    in_time.offer("k", MESSAGES, ANSWER, [], 0.7, expected_in=4.0)
    tiny = planner(idle=lambda: True)
    tiny.clock.fixed = 1.0  # a request costs more than the prefill it would spare
    tiny.offer("k", MESSAGES, ANSWER, [], 0.9, expected_in=4.0)
    await _settle()
    assert late.stats().skipped_late == 1 and late.warmer.warmed == []
    assert tiny.stats().skipped_unlikely == 1 and tiny.warmer.warmed == []
    assert in_time.stats().sent == 1


async def test_warms_teach_the_clock():
    class SlowWarmer(FakeWarmer):
        async def warm(self, tokens):
            await asyncio.sleep(0.02)
            return await super().warm(tokens)

    p = planner(SlowWarmer(), idle=lambda: True)
    for i in range(3):
        p.offer(f"k{i}", MESSAGES, ANSWER, [], 0.9, expected_in=1.0)
        await asyncio.sleep(0.05)
    assert p.stats().sent == 3
    # 256 tokens in a little over 20 ms each time: faster than the prior's 0.25 ms a token
    assert 0.02 / 256 <= p.clock.per_token < 0.00025
