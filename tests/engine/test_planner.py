"""The pre-warm planner on plain parts: when it warms, when it holds back, what it counts."""

from __future__ import annotations

import asyncio

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
