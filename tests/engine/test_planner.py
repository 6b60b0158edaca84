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


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


async def test_warms_the_conversation_with_its_answer_when_idle():
    tok, warmer = FakeTokenizer(), FakeWarmer()
    planner = WarmPlanner(warmer, tok, idle=lambda: True)
    planner.offer("k1", MESSAGES, ANSWER, [], probability=0.9, expected_in=1.5)
    await _settle()
    [(chat, options)] = tok.calls
    assert chat == MESSAGES + [{"role": "assistant", "content": "calling a tool"}]
    assert options == {"add_generation_prompt": False}  # a true prefix of the next prompt
    assert len(warmer.warmed) == 1
    stats = planner.stats()
    assert stats.sent == 1 and stats.warmed_tokens == 256


async def test_holds_back_when_busy_pressured_or_unlikely():
    busy = WarmPlanner(FakeWarmer(), FakeTokenizer(), idle=lambda: False)
    busy.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)
    pressured = WarmPlanner(FakeWarmer(), FakeTokenizer(), idle=lambda: True,
                            pressure=lambda: True)
    pressured.offer("k", MESSAGES, ANSWER, [], 0.9, 1.0)
    unlikely = WarmPlanner(FakeWarmer(), FakeTokenizer(), idle=lambda: True)
    unlikely.offer("k", MESSAGES, ANSWER, [], 0.2, 1.0)
    soon = WarmPlanner(FakeWarmer(), FakeTokenizer(), idle=lambda: True)
    soon.offer("k", MESSAGES, ANSWER, [], 0.9, 0.01)  # the call is due before a warm helps
    await _settle()
    assert busy.stats().skipped_busy == 1 and pressured.stats().skipped_busy == 1
    assert unlikely.stats().skipped_unlikely == 1 and soon.stats().skipped_unlikely == 1
    for p in (busy, pressured, unlikely, soon):
        assert p.warmer.warmed == [] and p.stats().sent == 0


async def test_the_real_call_cancels_a_warm_still_running():
    hold = asyncio.Event()
    warmer = FakeWarmer(hold)
    planner = WarmPlanner(warmer, FakeTokenizer(), idle=lambda: True)
    planner.offer("k1", MESSAGES, ANSWER, [], 0.9, 2.0)
    await _settle()
    planner.arrived(["other", "k1", "k2"])  # the next call's prompt starts with k1
    await _settle()
    assert warmer.cancelled == 1 and planner.stats().cancelled == 1
    assert planner.stats().sent == 0


async def test_hits_and_waste_are_counted():
    planner = WarmPlanner(FakeWarmer(), FakeTokenizer(), idle=lambda: True)
    planner.offer("a", MESSAGES, ANSWER, [], 0.9, 2.0)
    planner.offer("b", MESSAGES[:1], ANSWER, [], 0.9, 2.0)
    await _settle()
    planner.completed(["x", "a", "y"], cached_tokens=300)  # the warmed 256 were there
    planner.completed(["b", "z"], cached_tokens=0)  # evicted before its call came
    planner.completed(["never-warmed"], cached_tokens=0)
    s = planner.stats()
    assert (s.hit, s.hit_tokens, s.wasted, s.wasted_tokens) == (1, 256, 1, 256)
