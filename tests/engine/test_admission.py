"""Cache-aware admission, on plain data: who waits, who goes in, and that nothing starves."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from engine import admission as admission_module
from engine.admission import IDLE_RECHECK, Admission, prompt_chain
from engine.supervisor import cache_info

CPT = 1.0  # one character per token keeps the arithmetic readable


def body(*contents: str, tools: bool = False) -> dict:
    b: dict = {"messages": [{"role": "user", "content": c} for c in contents]}
    if tools:
        b["tools"] = [{"type": "function", "function": {"name": "f"}}]
    return b


def ticket(adm: Admission, b: dict, session: str | None = None):
    chain, chars = prompt_chain(b)
    return adm.ticket(chain, chars, session=session)


def make(capacity: int | None, **kw) -> Admission:
    adm = Admission(capacity, fill=1.0, **kw)
    adm.chars_per_token = CPT
    return adm


async def test_without_capacity_everything_goes_straight_in():
    adm = make(None)
    tickets = [ticket(adm, body("x" * 10_000, str(i))) for i in range(20)]
    await asyncio.gather(*(adm.enter(t) for t in tickets))
    assert {t.how for t in tickets} == {"direct"}


async def test_no_pressure_means_no_waiting():
    adm = make(1_000_000)
    tickets = [ticket(adm, body("system " * 100, f"task {i}")) for i in range(50)]
    await asyncio.gather(*(adm.enter(t) for t in tickets))
    assert {t.how for t in tickets} == {"fits"}
    assert max(t.waited for t in tickets) < 0.01


async def test_new_session_waits_while_resident_one_continues():
    adm = make(1000, hold=0.3, max_wait=5)
    a1 = ticket(adm, body("A" * 600))
    await adm.enter(a1)
    c = ticket(adm, body("C" * 100))  # another agent's call keeps the engine busy
    await adm.enter(c)
    b1 = ticket(adm, body("B" * 600))
    waiting = asyncio.create_task(adm.enter(b1))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # A's history fills the cache
    adm.leave(a1, 10)
    # A comes back from its tool call: its continuation goes first, B still waits.
    a2 = ticket(adm, body("A" * 600, "tool result"))
    assert a2.group == a1.group
    await asyncio.wait_for(adm.enter(a2), 1)
    assert a2.how == "resident" and not waiting.done()
    adm.leave(a2, 10)
    # A's hold lapses (no further call), B goes in.
    await asyncio.wait_for(waiting, 2)
    assert b1.how == "waited" and 0.25 < b1.waited < 1.5


async def test_a_session_the_engine_refused_at_once_holds_no_place():
    """A first call the engine answers with an error (a prompt over its context, say) left
    nothing in the cache: the sessions waiting behind it go in, without waiting out a hold."""
    adm = make(1000, hold=5, max_wait=5)
    c = ticket(adm, body("C" * 100))  # another agent's call keeps the engine busy
    await adm.enter(c)
    a1 = ticket(adm, body("A" * 800))
    await adm.enter(a1)
    b1 = ticket(adm, body("B" * 600))
    waiting = asyncio.create_task(adm.enter(b1))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    adm.leave(a1, refused=True)
    await asyncio.wait_for(waiting, 1)
    assert b1.waited < 0.5 and a1.group not in adm._footprints.profiles


async def test_a_prompt_larger_than_the_cache_goes_at_once_for_the_engine_to_refuse():
    """No cache that small will ever hold it, so waiting for room would only hold it until
    the bound (60 s by default) before vLLM refuses it all the same."""
    adm = make(1000, hold=30, max_wait=30)
    for name in "AB":  # two sessions resident, in flight
        await adm.enter(ticket(adm, body(name * 400)))
    huge = ticket(adm, body("H" * 1300))
    await asyncio.wait_for(adm.enter(huge), 1)
    assert huge.how == "oversize" and huge.waited < 0.1
    adm.leave(huge, refused=True)
    assert huge.group not in adm._groups
    large = ticket(adm, body("L" * 1200))  # within the estimate's margin: it waits for room
    waiting = asyncio.create_task(adm.enter(large))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()


async def test_a_call_refused_mid_session_keeps_the_sessions_place():
    adm = make(1000, hold=5, max_wait=5)
    a1 = ticket(adm, body("A" * 600))
    await adm.enter(a1)
    adm.leave(a1, 10)
    a2 = ticket(adm, body("A" * 600, "tool result"))
    await adm.enter(a2)
    adm.leave(a2, refused=True)  # its history is still cached for the next try
    assert a2.group in adm._groups


async def test_an_idle_engine_never_keeps_work_waiting():
    adm = make(1000, hold=30, max_wait=30)
    a = ticket(adm, body("A" * 900))
    await adm.enter(a)
    b = ticket(adm, body("B" * 900))
    waiting = asyncio.create_task(adm.enter(b))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # A runs and fills the cache
    adm.leave(a, 10)  # A is in its tool call, held: the engine has nothing to do
    await asyncio.wait_for(waiting, 2)
    # Busy all its short life until now, the engine is idle once the quiet outweighs that:
    # the next look at it (IDLE_RECHECK) lets B in.
    assert b.how == "idle" and b.waited < IDLE_RECHECK + 0.5


EMPTY = prompt_chain(body(""))[1][0]
"""Tokens of a message with no content (its JSON), at one character per token."""


async def _sessions_in_tool_calls(adm: Admission, running: int):
    """Sessions A and B (350 tokens each) let in and back in their tool calls (held), with
    `running` short calls of other agents kept on the engine. Returns those calls' tickets."""
    for name in "AB":
        t = ticket(adm, body(name * 350))
        await adm.enter(t)
        adm.leave(t, 0)
    calls = [ticket(adm, body(f"{i}" * 50)) for i in range(running)]
    for t in calls:
        await adm.enter(t)
    assert {t.how for t in calls} == {"fits"}  # within the fill
    return calls


@pytest.mark.parametrize("running, how", [(1, "spare"), (3, None)])
async def test_an_engine_with_few_calls_at_once_takes_sessions_over_the_fill(
        monkeypatch, running, how):
    # The cache's share is full (fill 1.0), the resident sessions are in their tool calls and
    # held for 30 s. With one call on the engine, its load stays under SPARE_BELOW: once that
    # has lasted SPARE_SPAN, a session that fits within SPARE_RAISE x fill goes in. With three
    # calls at once the engine is busy enough, and the session waits for room.
    monkeypatch.setattr(admission_module, "SPARE_SPAN", 0.3)
    adm = make(1000, hold=30, max_wait=30)
    calls = await _sessions_in_tool_calls(adm, running)
    resident = adm.stats().resident_tokens  # 800 + 50 x running, with the messages' JSON
    d = ticket(adm, body("D" * (1150 - resident - EMPTY)))
    task = asyncio.create_task(adm.enter(d))
    await asyncio.sleep(0.05)
    assert not task.done()
    if how is None:
        await asyncio.sleep(IDLE_RECHECK + 0.6)
        assert not task.done() and adm.stats().waiting == 1
        task.cancel()
    else:
        await asyncio.wait_for(task, IDLE_RECHECK + 0.6)
        assert d.how == how and 0.25 < d.waited < IDLE_RECHECK + 0.6
    for t in calls:
        adm.leave(t, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_the_engine_load_is_the_calls_on_it_averaged_over_time(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(admission_module, "time", clock)
    adm = make(1_000_000)
    a = ticket(adm, body("A" * 10))
    await adm.enter(a)  # one call on the engine
    clock.now += 4
    b = ticket(adm, body("B" * 10))
    await adm.enter(b)  # two
    clock.now += 2
    adm.leave(a, 0)  # one again
    clock.now += 4  # 4 x 1 + 2 x 2 + 4 x 1 call-seconds in the 10 s since A went in
    assert adm._load_mean() == pytest.approx(1.2)
    assert adm._busy_share() == pytest.approx(1.0)  # some call ran all the time
    clock.now += 10  # the last 20 s: 2 x 2 + 18 x 1
    assert adm._load_mean() == pytest.approx(1.1)
    for _ in range(1000):  # many calls come and go: the window keeps only its own
        clock.now += 0.01
        t = ticket(adm, body("C" * 10))
        await adm.enter(t)
        adm.leave(t, 0)
    clock.now += 30
    assert adm._load_mean() == pytest.approx(1.0)  # B alone, for the whole window
    assert len(adm._load) <= 2


@pytest.mark.parametrize("seed", range(4))
async def test_sessions_are_released_as_when_every_one_was_asked(monkeypatch, seed):
    """`_expire` asks only the sessions between calls whose hold may have ended (the oldest
    answers, and those that may be done); what it releases is what asking every resident
    session releases, in the resident set's order, as finished sessions, tool gaps and
    the clock move."""
    clock = Clock()
    monkeypatch.setattr(admission_module, "time", clock)
    adm = make(10**9, hold=1.0, max_hold=10.0)
    # until sessions of their own agent finish, sessions are taken to make 2-4 calls
    adm.restore({"version": 1, "finished": [[100, n, "other"] for n in (2, 3, 3, 4) * 10],
                 "gaps": [], "chars_per_token": CPT, "runs": []})
    hold_ended, released = adm._hold_ended, []

    def every_one_asked(now: float) -> list:
        every = [g for g in adm._groups.values() if not g.in_flight and not adm._held(g, now)]
        got = hold_ended(now)
        assert got == every
        released.extend(g.calls for g in got)
        return got

    monkeypatch.setattr(adm, "_hold_ended", every_one_asked)
    rng = random.Random(seed)
    sessions: list[list] = []  # [messages, calls left, ticket in flight]
    for _ in range(3000):
        clock.now += rng.choice([0.0, 0.05, 0.2, 0.5, 1.5, 12.0])
        idle = [s for s in sessions if s[2] is None and s[1]]
        busy = [s for s in sessions if s[2] is not None]
        if busy and rng.random() < 0.5:
            s = rng.choice(busy)
            adm.leave(s[2], rng.randint(1, 50))
            s[1], s[2] = s[1] - 1, None
            continue
        if idle and rng.random() < 0.6:
            s = rng.choice(idle)
            s[0] = [*s[0], "answer", "tool output " * rng.randint(1, 20)]
        elif len(idle) + len(busy) < 60:
            s = [["system", f"task {len(sessions)}"], rng.randint(1, 6), None]
            sessions.append(s)
        else:
            adm.stats()
            continue
        s[2] = ticket(adm, body(*s[0]))
        await asyncio.wait_for(adm.enter(s[2]), 1)
        assert set(adm._resident.idle) == {g.id for g in adm._groups.values() if not g.in_flight}
    assert set(released) == {1, 2, 3, 4, 5, 6}  # after their holds, or with their last answers
    assert len(adm._footprints.finished) > 40  # sessions finished meanwhile (the holds changed with them)


async def test_spare_throughput_never_takes_a_session_past_the_raised_fill(monkeypatch):
    monkeypatch.setattr(admission_module, "SPARE_SPAN", 0.3)
    adm = make(1000, hold=30, max_wait=30)
    calls = await _sessions_in_tool_calls(adm, 1)
    big = ticket(adm, body("D" * (1250 - adm.stats().resident_tokens - EMPTY)))  # > 1.2 x 1000
    task = asyncio.create_task(adm.enter(big))
    await asyncio.sleep(IDLE_RECHECK + 0.6)
    assert not task.done()  # the engine has spare throughput, but not the cache
    task.cancel()
    adm.leave(calls[0], 0)


async def test_a_burst_after_a_quiet_spell_is_not_taken_for_an_idle_engine():
    adm = make(1000, hold=0.2, max_wait=30)
    await _call(adm, body("early " * 20))
    await asyncio.sleep(0.5)  # a quiet spell: nothing resident, the engine idle
    a, c = ticket(adm, body("A" * 450)), ticket(adm, body("C" * 450))
    await adm.enter(a)
    await adm.enter(c)
    await asyncio.sleep(0.1)  # their calls run: since the burst began, the engine was busy
    adm.leave(a, 10)
    adm.leave(c, 10)
    b = ticket(adm, body("B" * 900))
    await asyncio.wait_for(adm.enter(b), 2)
    assert b.how == "waited" and b.waited > 0.1  # for the holds, not let in as idle


async def test_a_single_session_between_calls_does_not_keep_work_waiting():
    adm = make(1000, hold=30, max_wait=30)
    a = ticket(adm, body("A" * 900))
    await adm.enter(a)
    await asyncio.sleep(0.2)  # A's call runs: the engine has been busy all along
    b = ticket(adm, body("B" * 900))
    waiting = asyncio.create_task(adm.enter(b))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # A's call fills the cache
    adm.leave(a, 10)  # A is in its tool call, held for 30 s: nothing else would run
    await asyncio.wait_for(waiting, 0.5)
    assert b.how == "idle" and b.waited < 0.1
    # With B's call running, a third session waits (the engine is not idle)...
    c = ticket(adm, body("C" * 900))
    third = asyncio.create_task(adm.enter(c))
    await asyncio.sleep(0.05)
    assert not third.done()
    # ...and still does once B is between calls too: two sessions are held, and the engine
    # has been busy lately.
    adm.leave(b, 10)
    await asyncio.sleep(0.1)
    assert not third.done()
    third.cancel()


async def test_a_session_back_from_a_long_tool_call_goes_before_new_ones():
    adm = make(1000, hold=0.05, max_wait=30)
    a1 = ticket(adm, body("A" * 500))
    await adm.enter(a1)
    adm.leave(a1, 10)
    await asyncio.sleep(0.1)  # A's hold lapses: its share of the cache is released
    busy = ticket(adm, body("C" * 500))
    await adm.enter(busy)  # the engine is busy and its cache half full
    new = ticket(adm, body("N" * 600))  # does not fit beside C
    new_task = asyncio.create_task(adm.enter(new))
    await asyncio.sleep(0.01)
    a2 = ticket(adm, body("A" * 500, "late tool result"))
    assert a2.group == a1.group  # still the same session
    a2_task = asyncio.create_task(adm.enter(a2))
    await asyncio.sleep(0.01)
    assert not new_task.done() and not a2_task.done()
    adm.leave(busy, 10)
    await asyncio.wait_for(a2_task, 1)
    assert a2.how in ("returned", "idle")  # the session under way first...
    assert not new_task.done()  # ...and the new one waits for room
    new_task.cancel()


async def _two_sessions_outgrow_the_cache(adm: Admission):
    """Sessions A, then B, let in small (with a third agent's call keeping the engine busy);
    A comes back from its tool call grown past what the cache holds beside B."""
    a1 = ticket(adm, body("A" * 300))
    await adm.enter(a1)
    b1 = ticket(adm, body("B" * 300))
    await adm.enter(b1)
    busy = ticket(adm, body("F" * 50))
    await adm.enter(busy)
    adm.leave(a1, 10)
    adm.leave(b1, 10)
    a2 = ticket(adm, body("A" * 300, "a" * 400))
    await asyncio.wait_for(adm.enter(a2), 1)
    assert a2.how == "resident"
    return a2, b1


async def test_sessions_that_outgrow_the_cache_set_the_youngest_aside():
    # fill 1.5: what admission reserves may exceed the cache; what is resident may not.
    adm = Admission(1000, fill=1.5, hold=0.3, max_wait=30)
    adm.chars_per_token = CPT
    a2, b1 = await _two_sessions_outgrow_the_cache(adm)
    assert adm.suspended == 1  # B, younger and between calls, made room for A
    # B comes back: it would fit what may be reserved, not what the cache holds with A.
    b2 = ticket(adm, body("B" * 300, "b" * 100))
    assert b2.group == b1.group
    waiting = asyncio.create_task(adm.enter(b2))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await asyncio.sleep(0.6)  # away twice its hold, but waiting: under way, not finished
    adm.stats()
    assert adm.expected_footprint() == 0
    # A's last answer; once its hold lapses B goes on, before any new session.
    adm.leave(a2, 10)
    new = ticket(adm, body("N" * 100))
    new_task = asyncio.create_task(adm.enter(new))
    await asyncio.wait_for(waiting, 2)
    assert b2.how == "returned" and 0.9 < b2.waited < 3
    await asyncio.wait_for(new_task, 1)


async def test_sessions_within_their_learned_size_are_not_set_aside():
    """With sizes learned, what is reserved for each session may exceed the cache (`fill`):
    that overflow is planned, and no session within its learned size is set aside."""
    adm = Admission(2500, fill=1.5, hold=0.05, max_wait=30)
    adm.chars_per_token = CPT
    shared = "S" * 200
    await _finished_sessions(adm, shared)  # sessions grow to about 1,000 tokens of their own
    firsts = [ticket(adm, body(shared, f"{i}" * 300)) for i in range(3)]
    for t in firsts:
        await asyncio.wait_for(adm.enter(t), 1)
        adm.leave(t, 0)
    assert {t.how for t in firsts} == {"fits"}
    for i in range(3):  # each grows by 500, within what was learned; together past the cache
        t = ticket(adm, body(shared, f"{i}" * 300, "more" * 125))
        await asyncio.wait_for(adm.enter(t), 1)
        adm.leave(t, 0)
        assert t.how == "resident"
    assert adm.stats().resident_tokens > 0.95 * 2500 and adm.suspended == 0


async def test_setting_sessions_aside_has_a_switch():
    adm = Admission(1000, fill=1.5, hold=0.3, max_wait=30, suspend=False)
    adm.chars_per_token = CPT
    await _two_sessions_outgrow_the_cache(adm)
    b2 = ticket(adm, body("B" * 300, "b" * 100))
    await asyncio.wait_for(adm.enter(b2), 1)
    assert b2.how == "resident" and adm.suspended == 0


async def _call(adm: Admission, b: dict, session: str | None = None) -> None:
    """One call through admission, answered at once."""
    t = ticket(adm, b, session=session)
    await adm.enter(t)
    adm.leave(t, 0)


TOOL_GAP = 0.1
"""The tool time of the earlier sessions: what an idle session is held for (x1.2, and x2.5
while it is shorter than sessions usually are), long enough to see on a busy machine."""


async def _let_go(adm: Admission) -> None:
    """Wait out every hold: the idle sessions leave the cache."""
    await asyncio.sleep(3 * TOOL_GAP * 2.5)
    adm.stats()


async def _finished_sessions(adm: Admission, shared: str, n: int = 3) -> None:
    """`n` earlier sessions of three calls, each growing to about 1,000 tokens of its own,
    that have left the cache: what admission learns a session to be."""
    for i in range(n):
        for k, own in enumerate((300, 600, 1000)):
            if k:
                await asyncio.sleep(TOOL_GAP)
            await _call(adm, body(shared, f"{i}" * own), session=f"old{i}")
    await _let_go(adm)


async def _no_room_beside_two_growing_sessions(adm: Admission, shared: str) -> None:
    """Two sessions on their first call, 300 tokens each now, that will each grow to about
    1,000 (what `_finished_sessions` taught): a third, tiny now, would overflow the cache
    of 2,500 then, so it waits."""
    for i in range(2):
        busy = ticket(adm, body(shared, f"busy{i}" * 60), session=f"busy{i}")
        await asyncio.wait_for(adm.enter(busy), 0.5)
    late = ticket(adm, body(shared, "x" * 50))
    task = asyncio.create_task(adm.enter(late))
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()


async def test_new_sessions_leave_room_for_what_sessions_grow_to():
    adm = make(2500, hold=0.05, max_wait=30)
    shared = "S" * 200
    first = ticket(adm, body(shared, "first call"))
    await adm.enter(first)
    adm.leave(first, 0)
    assert adm.expected_footprint() == 0  # a session under way teaches nothing yet
    await _finished_sessions(adm, shared)
    assert adm.expected_footprint() >= 1000 and adm.expected_calls() == 3
    await _no_room_beside_two_growing_sessions(adm, shared)


async def test_a_session_is_done_by_the_length_of_its_own_agent():
    adm = make(3000, hold=0.05, max_wait=30)
    agent_a, agent_b = "A" * 200, "B" * 200
    await _finished_sessions(adm, agent_a)  # agent A's sessions make three calls
    for i in range(3):  # agent B's make one
        await _call(adm, body(agent_b, f"b{i}" * 100))
    await _let_go(adm)
    assert adm.expected_calls(ticket(adm, body(agent_a)).kind) == 3
    assert adm.expected_calls(ticket(adm, body(agent_b)).kind) == 1
    # After one call, an agent B session is done and leaves the cache with its answer;
    # an agent A session is coming back and keeps its place.
    await _call(adm, body(agent_b, "new b"))
    assert adm.stats().resident_groups == 0
    await _call(adm, body(agent_a, "new a"))
    assert adm.stats().resident_groups == 1


async def test_one_finished_session_of_an_agent_says_more_than_other_agents_sessions():
    """A debater's sessions make one call, a long-running agent's three: after the first
    debater finishes, the next one leaves with its answer rather than being held for a
    tool call that the long agent's sessions would make."""
    adm = make(3000, hold=0.05, max_wait=30)
    agent_a, debater = "A" * 200, "D" * 200
    await _finished_sessions(adm, agent_a)  # three sessions of three calls
    await _call(adm, body(debater, "first debate" * 20))
    await _let_go(adm)
    assert adm.expected_calls(ticket(adm, body(debater)).kind) == 1
    long_kind = ticket(adm, body(agent_a)).kind
    assert adm.expected_footprint(ticket(adm, body(debater)).kind) < 600
    assert adm.expected_footprint(long_kind) > 1000
    await _call(adm, body(debater, "second debate"))
    assert adm.stats().resident_groups == 0  # done: its place is free at once
    never = ticket(adm, body("N" * 200))  # an agent none of whose sessions finished
    assert adm.expected_calls(never.kind) == 3  # all agents' sessions, as before


async def test_a_session_that_outstays_its_hold_is_not_yet_a_finished_one():
    """Before any session has finished, one whose tool call outlasts its hold leaves the
    cache, but it is not a finished session of one call: the next sessions of its agent
    are still held through their tool calls, not let go after every call as if one call
    were all the agent makes. It counts as finished once it has stayed away."""
    adm = make(3000, hold=0.05, max_wait=30)
    agent = "A" * 200
    kind = ticket(adm, body(agent)).kind
    await _call(adm, body(agent, "first task " * 20), session="a")
    await asyncio.sleep(0.06)  # past its hold: A leaves the cache during its tool call
    assert adm.stats().resident_groups == 0
    await _call(adm, body(agent, "second task " * 20), session="b")
    assert adm.stats().resident_groups == 1  # B is held through its tool call
    assert adm.expected_calls(kind) == 0  # no session has finished yet
    # A process stopping now saves A, gone, and B, under way, as finished sessions of one
    # call so far: after a restart either would come back as a new session.
    assert [calls for _, calls, _ in adm.snapshot()["finished"]] == [1, 1]
    await asyncio.sleep(0.25)  # neither comes back: both have finished, after one call
    adm.stats()
    assert adm.expected_calls(kind) == 1


async def test_what_admission_learned_starts_the_next_process():
    """A snapshot (plain JSON) taken into a fresh admission: it knows the agent's session
    size, length and tool gaps before any session of its own has finished, and acts on
    them: two new sessions on their first call, which will grow, leave no room for a third.
    A snapshot that cannot be read changes nothing."""
    adm = make(2500, hold=0.05, max_wait=30)
    shared = "S" * 200
    await _finished_sessions(adm, shared)
    snapshot = json.loads(json.dumps(adm.snapshot()))
    fresh = make(2500, hold=0.05, max_wait=30)
    for junk in ("junk", {"version": 1, "finished": [["x"]]}, {"version": 99}):
        assert fresh.restore(junk) == 0
    assert fresh.expected_footprint() == 0 and fresh.expected_calls() == 0
    assert fresh.restore(snapshot) == 3
    assert fresh.expected_footprint() == adm.expected_footprint() >= 1000
    assert fresh.expected_calls() == adm.expected_calls() == 3
    assert fresh._gap_p90() == adm._gap_p90()
    await _no_room_beside_two_growing_sessions(fresh, shared)


async def test_a_session_as_long_as_finished_ones_leaves_with_its_last_answer():
    adm = make(3000, hold=0.05, max_wait=30)
    shared = "S" * 200
    await _finished_sessions(adm, shared)
    for own in (300, 600):
        await _call(adm, body(shared, "L" * own), session="long")
        assert adm.stats().resident_groups == 1  # short of the usual length: held
    await _call(adm, body(shared, "L" * 1000), session="long")
    assert adm.stats().resident_groups == 0  # as long as every finished session: done
    # One that comes back after all is a session under way: it goes straight in again.
    t = ticket(adm, body(shared, "L" * 1200), session="long")
    await asyncio.wait_for(adm.enter(t), 0.5)
    assert t.how == "returned"
    adm.leave(t, 0)
    # A session short of the usual length is held through its tool call.
    await _call(adm, body(shared, "s" * 300), session="short")
    assert adm.stats().resident_groups == 1


async def test_shared_prefix_adds_little_and_is_preferred():
    adm = make(1000, hold=5, max_wait=5)
    doc = "D" * 700
    first = ticket(adm, body(doc, "expert 1"))
    await adm.enter(first)
    other = ticket(adm, body("X" * 700, "unrelated"))
    other_task = asyncio.create_task(adm.enter(other))
    await asyncio.sleep(0.01)
    sharing = ticket(adm, body(doc, "expert 2"))
    sharing_task = asyncio.create_task(adm.enter(sharing))
    await asyncio.sleep(0.01)
    adm.leave(first, 0)  # a completion: the queue is looked at again
    await asyncio.wait_for(sharing_task, 1)
    assert sharing.how == "waited"  # the document is resident, only 8 tokens are new
    assert not other_task.done()
    other_task.cancel()


async def test_waiting_sessions_that_share_a_prompt_head_go_in_together():
    """Three agents wait with one long system prompt, not resident; another waits with a
    prompt shorter than that head but longer than its share. The three go first: the head
    is computed once for all of them."""
    adm = make(1000, hold=0.05, max_wait=5)
    filler = ticket(adm, body("F" * 900))
    await adm.enter(filler)
    head = "H" * 600
    agents = [ticket(adm, body(head, f"task {i}" * 6)) for i in range(3)]
    other = ticket(adm, body("U" * 400))
    tasks = [asyncio.create_task(adm.enter(t)) for t in (*agents, other)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)  # the filler's history fills the cache
    adm.leave(filler, 0)  # its hold lapses
    await asyncio.wait_for(asyncio.gather(*tasks[:3]), 1)
    assert not tasks[3].done()  # the other waits for room
    tasks[3].cancel()


async def test_a_session_that_does_not_fit_runs_as_a_guest_while_its_prompt_fits():
    adm = make(1000, hold=60, max_wait=30, guests=True, guest_busy_below=1.0)  # however busy
    head = "S" * 100
    kind = ticket(adm, body(head)).kind
    adm.restore({"version": 1, "finished": [[700, 4, kind]] * 5, "gaps": [],
                 "chars_per_token": CPT, "runs": []})  # sessions grow to 700 tokens
    a = ticket(adm, body(head, "a" * 150))
    await adm.enter(a)  # resident, its growth reserved: no room for another session's
    guests = [ticket(adm, body(head, f"{i}" * 150)) for i in range(4)]
    for g in guests[:3]:
        await asyncio.wait_for(adm.enter(g), 0.5)
        assert g.how == "guest" and g.waited < 0.05
        assert 100 <= g.evict_first < 150  # the head it shares with the resident session
    # Three guests' prompts and A's fill the cache: the fourth waits for room.
    fourth = asyncio.create_task(adm.enter(guests[3]))
    await asyncio.sleep(0.05)
    assert not fourth.done() and adm.stats().resident_groups == 1
    adm.leave(guests[0], 10)
    await asyncio.wait_for(fourth, 0.5)
    assert guests[3].how == "guest"
    for g in guests[1:]:
        adm.leave(g, 10)
    assert adm._in_flight == 1  # the books balance: A's call alone is in flight


async def test_a_guest_comes_back_as_the_same_session_and_goes_in_when_it_fits_whole():
    adm = make(1000, hold=60, max_wait=30, guests=True, guest_busy_below=1.0)
    head = "S" * 100
    kind = ticket(adm, body(head)).kind
    adm.restore({"version": 1, "finished": [[700, 4, kind]] * 5, "gaps": [],
                 "chars_per_token": CPT, "runs": []})
    a = ticket(adm, body(head, "a" * 150))
    await adm.enter(a)
    guest = ticket(adm, body(head, "g" * 150))
    await adm.enter(guest)  # room for all it will grow to, which A holds: a guest
    assert guest.how == "guest"
    adm.leave(guest, 10)
    again = ticket(adm, body(head, "g" * 150, "tool result"))
    assert again.group == guest.group  # not a new session at each call
    await adm.enter(again)
    assert again.how == "guest"  # its history went first: it still needs room for it all
    adm.leave(again, 10)
    adm.leave(a, 10)
    adm._release(adm._groups[a.group])  # A has finished
    last = ticket(adm, body(head, "g" * 150, "tool result", "more"))
    await adm.enter(last)
    assert last.group == guest.group and last.how == "returned"  # a session under way
    assert adm.stats().resident_groups == 1 and adm._groups[last.group].calls == 3


async def test_guests_go_in_only_on_an_engine_that_was_idle_some_of_the_time(monkeypatch):
    # A guest's history goes first, so each of its calls prefills again: on an engine busy
    # all the time that is taken from the resident sessions, and the guest waits instead,
    # unless the resident sessions hold most of its prompt (a long shared head).
    clock = Clock()
    monkeypatch.setattr(admission_module, "time", clock)
    adm = make(2000, hold=60, max_wait=30, guests=True)  # busy share below 0.9, the default
    head = "S" * 400
    kind = ticket(adm, body(head)).kind
    adm.restore({"version": 1, "finished": [[1500, 4, kind]] * 5, "gaps": [],
                 "chars_per_token": CPT, "runs": []})  # one session at a time fits
    a = ticket(adm, body(head, "a" * 150))
    await adm.enter(a)
    clock.now += 10  # A's call has kept the engine busy all the while
    dear = ticket(adm, body(head, "b" * 600))  # most of its prompt its own: prefilled again
    waiting = asyncio.create_task(adm.enter(dear))
    await asyncio.sleep(0.05)
    assert not waiting.done() and adm.busy_share() == 1.0 and adm.guest_calls == 0
    cheap = ticket(adm, body(head, "c" * 100))  # mostly the head A holds
    await asyncio.wait_for(adm.enter(cheap), 0.5)  # at once, past the one that waits
    assert cheap.how == "guest" and not waiting.done()
    adm.leave(cheap, 10)
    waiting.cancel()  # (its client gave up)
    await asyncio.gather(waiting, return_exceptions=True)
    adm.leave(a, 10)
    clock.now += 10  # A in its tool call: the engine idle half of the last 20 s
    a = ticket(adm, body(head, "a" * 150, "tool result"))
    await adm.enter(a)
    assert a.how == "resident"
    clock.now += 1
    dear = ticket(adm, body(head, "d" * 600))
    await asyncio.wait_for(adm.enter(dear), 0.5)
    assert dear.how == "guest" and adm.busy_share() == 0.5
    adm.leave(dear, 10)
    adm.leave(a, 10)


async def test_a_sessions_last_call_is_sent_to_be_evicted_first_under_pressure():
    # Left as any call's, a finished session's history is the newest in the cache, and the
    # engine would evict the histories of sessions still under way before it.
    async def calls_of_a(evict_done: bool, capacity: int) -> list[int | None]:
        adm = make(capacity, hold=60, max_wait=30, evict_done=evict_done)
        head = "S" * 100
        kind = ticket(adm, body(head)).kind
        adm.restore({"version": 1, "finished": [[300, 3, kind]] * 5, "gaps": [],
                     "chars_per_token": CPT, "runs": []})  # sessions make three calls
        prompt = [head, "a" * 150]
        a = ticket(adm, body(*prompt))
        b = ticket(adm, body(head, "b" * 150))
        await adm.enter(a)
        await adm.enter(b)
        c = ticket(adm, body("C" * 500))  # no room for it beside A and B
        waiting = asyncio.create_task(adm.enter(c))
        await asyncio.sleep(0.01)
        hints = [a.evict_first]
        for n in (2, 3):
            adm.leave(a, 10)
            prompt.append(f"tool result {n}")
            a = ticket(adm, body(*prompt))
            await asyncio.wait_for(adm.enter(a), 0.5)
            hints.append(a.evict_first)
        assert adm.last_calls == (hints[-1] is not None)
        adm.leave(a, 10)
        adm.leave(b, 10)
        await asyncio.wait_for(waiting, 2)  # A is done and gone: C goes in
        return hints

    first, second, last = await calls_of_a(True, 1000)
    assert first is None and second is None
    assert 100 <= last < 150  # all but the head B sends too
    assert await calls_of_a(False, 1000) == [None, None, None]  # switched off
    assert await calls_of_a(True, 100_000) == [None, None, None]  # no pressure: as any call


async def test_guests_are_off_unless_asked():
    adm = make(1000, hold=60, max_wait=0.2)
    a = ticket(adm, body("A" * 600))
    await adm.enter(a)
    b = ticket(adm, body("B" * 300, "more" * 100))
    await asyncio.wait_for(adm.enter(b), 2)
    assert b.how == "timeout" and b.evict_first is None


async def test_a_call_let_go_at_the_bound_runs_as_a_guest_and_its_session_waits_first():
    # Let in as a resident, a session the cache cannot hold would stay one, and its history
    # would evict the resident session's at every call; as a guest, its blocks go first, and
    # its next call waits first in line, ahead of a session not begun, until there is room.
    # (All of one agent, its tools: the place a resident leaves is one a guest can take.)
    async def run(bound_guests: bool) -> tuple:
        adm = make(1000, hold=60, max_wait=0.2, guests=True, guest_busy_below=1.0,
                   bound_guests=bound_guests)
        a = ticket(adm, body("A" * 600, tools=True))
        await adm.enter(a)
        b = ticket(adm, body("B" * 600, tools=True))  # fits neither beside A nor as a guest
        start = time.monotonic()
        await asyncio.wait_for(adm.enter(b), 2)
        assert 0.18 < time.monotonic() - start < 0.6  # the bound holds either way
        resident = adm.stats().resident_groups
        adm.leave(b, 10)
        c = ticket(adm, body("C" * 600, tools=True))  # a session not begun, waiting first
        c_in = asyncio.create_task(adm.enter(c))
        await asyncio.sleep(0.02)
        b2 = ticket(adm, body("B" * 600, "tool result", tools=True))
        b2_in = asyncio.create_task(adm.enter(b2))
        await asyncio.sleep(0.02)
        adm.leave(a, 10)
        adm._release(adm._groups[a.group])  # A has finished
        adm._release_ready()
        done, _ = await asyncio.wait({c_in, b2_in}, timeout=1,
                                     return_when=asyncio.FIRST_COMPLETED)
        first = "b" if b2_in in done else "c"
        for task in (c_in, b2_in):
            task.cancel()
        await asyncio.gather(c_in, b2_in, return_exceptions=True)
        return b.how, b.evict_first, resident, b2.group == b.group, first

    how, hint, resident, same, first = await run(True)
    assert (how, resident, same, first) == ("timeout-guest", 1, True, "b")
    assert 0 < hint < 100  # all but the tools A holds goes first
    how, hint, resident, same, _ = await run(False)
    assert (how, hint, resident, same) == ("timeout", None, 2, True)  # one more resident


async def test_at_the_bound_only_a_session_that_can_take_a_residents_place_is_a_guest():
    # As a guest it would wait again at each call, for room that may come only as the cache
    # empties: a session of the residents' agent, no larger than one's place, goes as a
    # guest, to take the place one leaves; a larger one, or another agent's, as a resident.
    adm = make(1000, hold=60, max_wait=0.2, guests=True, guest_busy_below=1.0,
               bound_guests=True)
    for name in "AD":  # two sessions of one agent (its tools) fill the cache
        await adm.enter(ticket(adm, body(name * 400, tools=True)))
    hows = []
    for name, size, tools in (("E", 400, True), ("B", 900, True), ("F", 400, False)):
        t = ticket(adm, body(name * size, tools=tools))  # fits neither beside them nor as a guest
        start = time.monotonic()
        await asyncio.wait_for(adm.enter(t), 2)
        assert 0.18 < time.monotonic() - start < 0.6  # the bound holds either way
        hows.append((t.how, t.evict_first is not None, adm.stats().resident_groups))
    assert hows == [("timeout-guest", True, 2), ("timeout", False, 3), ("timeout", False, 4)]


async def test_every_wait_is_bounded():
    adm = make(100, hold=60, max_wait=0.2)
    a = ticket(adm, body("A" * 90))
    await adm.enter(a)
    b = ticket(adm, body("B" * 90))
    start = time.monotonic()
    await asyncio.wait_for(adm.enter(b), 2)
    assert b.how == "timeout"
    assert 0.18 < time.monotonic() - start < 0.6


async def test_calls_of_one_session_keep_their_order():
    adm = make(100, hold=0.05, max_wait=5)
    blocker = ticket(adm, body("Z" * 90))
    await adm.enter(blocker)
    order: list[int] = []

    async def call(i: int) -> None:
        t = ticket(adm, body(f"same session call {i}" + "y" * (40 - i)), session="s1")
        await adm.enter(t)
        order.append(i)
        adm.leave(t)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(call(i)))
        await asyncio.sleep(0.005)
    adm.leave(blocker)
    await asyncio.wait_for(asyncio.gather(*tasks), 3)
    assert order == [0, 1, 2, 3, 4]


async def test_cancelled_waiter_leaves_no_trace():
    adm = make(100, hold=0.05, max_wait=5)
    a = ticket(adm, body("A" * 90))
    await adm.enter(a)
    b = ticket(adm, body("B" * 90))
    c = ticket(adm, body("C" * 90))
    tb = asyncio.create_task(adm.enter(b))
    tc = asyncio.create_task(adm.enter(c))
    await asyncio.sleep(0.01)
    tb.cancel()
    adm.leave(a)
    await asyncio.wait_for(tc, 2)
    assert adm.stats().waiting == 0


def test_one_clients_odd_prompts_move_the_token_estimate_only_so_far():
    # 100,000 spaces may be a handful of tokens; every client's prompts are sized by the
    # same estimate, so what one call may say of it is bounded.
    adm = Admission(capacity_tokens=10_000)
    for _ in range(500):
        adm.calibrate(prompt_chars=100_000, prompt_tokens=3)
    assert adm.chars_per_token == pytest.approx(20.0, rel=1e-3)
    for _ in range(500):
        adm.calibrate(prompt_chars=10, prompt_tokens=10_000)
    assert adm.chars_per_token == pytest.approx(0.5, rel=1e-3)
    before = adm.chars_per_token
    adm.calibrate(prompt_chars=3_600, prompt_tokens=1_000)  # an ordinary call still counts
    assert adm.chars_per_token > before
    restored = Admission(capacity_tokens=10_000)
    assert restored.restore(adm.snapshot()) >= 0 and restored.chars_per_token == pytest.approx(
        adm.chars_per_token)  # a bounded estimate is one a snapshot can carry


@pytest.mark.parametrize("b,n", [
    (body("a", "b"), 2),
    (body("a", tools=True), 2),
    ({"input": "hello", "instructions": "be brief"}, 2),
    ({"prompt": "raw"}, None),
])
def test_prompt_chain_shapes(b, n):
    got = prompt_chain(b)
    assert (got is None) if n is None else len(got[0]) == n


def test_prompt_chain_is_prefix_stable():
    short, _ = prompt_chain(body("sys", "user"))
    long, _ = prompt_chain(body("sys", "user", "answer", "tool"))
    assert long[: len(short)] == short


def test_capacity_from_vllm_metrics():
    text = 'vllm:cache_config_info{block_size="128",cache_dtype="auto",num_gpu_blocks="512"} 1.0\n'
    info = cache_info(text)
    assert (info.block_size, info.num_blocks) == (128, 512)
    assert info.tokens == 511 * 128  # as vLLM counts: one block is its null block
    assert cache_info("nothing here") is None
