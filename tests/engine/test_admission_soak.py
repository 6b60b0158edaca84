"""Admission under a crowd: many agents at once, every option on, clients that disconnect,
calls the engine refuses, prompts larger than the cache. Whatever the mix, each call goes to
the engine once or is cancelled by its own client, calls of one session keep their order,
no call waits past the bound, and when the crowd has gone the books balance."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from engine.admission import Admission, prompt_chain

CAPACITY = 6000
MAX_WAIT = 0.6
SLACK = 0.35
"""Past `max_wait`: the timer's own delay and the event loop's lag on a busy runner."""
HOWS = {"resident", "fits", "returned", "waited", "backfill", "spare", "idle", "timeout",
        "timeout-guest", "oversize", "guest", "handoff"}


class Crowd:
    def __init__(self, adm: Admission, rng: random.Random) -> None:
        self.adm = adm
        self.rng = rng
        self.sent: dict[str, list[int]] = {}  # session -> its calls' numbers as they arrived
        self.admitted: dict[str, list[tuple]] = {}  # ... (when let go, number, how)
        self.tickets = []
        self.cancelled = 0

    async def call(self, session: str, n: int, messages: list[str]) -> None:
        """One call: wait for admission, run on the engine, leave. Its client may give up
        while it waits, or hang up while it runs; the engine may refuse it."""
        chain, chars = prompt_chain({"messages": [{"role": "user", "content": m}
                                                  for m in messages]})
        t = self.adm.ticket(chain, chars, session=session)
        self.tickets.append(t)
        self.sent.setdefault(session, []).append(n)
        entering = asyncio.ensure_future(self.adm.enter(t))
        if self.rng.random() < 0.08:  # a client that gives up soon
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            entering.cancel()
        try:
            await entering
        except asyncio.CancelledError:
            self.cancelled += 1
            assert t not in self.adm._waiting
            return
        assert t.how in HOWS, t.how
        assert t.waited <= MAX_WAIT + SLACK, (t.how, t.waited)
        self.admitted.setdefault(session, []).append((t.admitted, n, t.how))
        fate = self.rng.random()  # answered, refused by the engine, or the client hangs up
        await asyncio.sleep(self.rng.uniform(0.01, 0.4))  # prefill and decode
        if fate < 0.04:
            self.adm.leave(t, refused=True)
        elif fate < 0.08:
            self.adm.leave(t)  # as the proxy does when the client goes mid-answer
        else:
            output = self.rng.randint(1, 60)
            self.adm.leave(t, output)
            prompt = sum(t.sizes)
            usage = {"prompt_tokens": prompt, "completion_tokens": output}
            self.adm.answered(t, usage, self.rng.randint(0, prompt),
                              answer_hashes=[self.rng.getrandbits(63)])

    async def agent(self, a: int) -> None:
        rng = self.rng
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        head = rng.choice(["You are the planner. " * 30, "You are the coder. " * 40,
                           "You review code. " * 12])
        messages = [head, f"task {a}: " + "x" * rng.randint(20, 600)]
        session = f"agent-{a}" if rng.random() < 0.5 else None  # an explicit session id, or none
        key = session or f"implicit-{a}"
        for n in range(rng.randint(1, 5)):
            if rng.random() < 0.03:  # a prompt no cache this size holds
                messages.append("y" * int(CAPACITY * 1.5))
            if session is not None and rng.random() < 0.5:
                # Two calls of one session at once (parallel tool calls): both in order.
                await asyncio.gather(self.call(session, 2 * n, list(messages)),
                                     self.call(session, 2 * n + 1, list(messages)))
            else:
                await self.call(key if session is None else session, 2 * n, list(messages))
            messages += ["answer " * rng.randint(1, 40), "tool " * rng.randint(5, 120)]
            await asyncio.sleep(rng.choice([0.0, 0.01, 0.05, 0.1, 0.3]))


@pytest.mark.parametrize("seed", range(3))
async def test_a_crowd_of_agents_with_every_option_on_loses_nothing(seed):
    adm = Admission(CAPACITY, fill=1.25, max_wait=MAX_WAIT, hold=0.05, max_hold=0.5,
                    ordering=True, running=3, order_wait=0.3, suspend=True, guests=True,
                    evict_done=True, bound_guests=True)
    adm.chars_per_token = 1.0
    crowd = Crowd(adm, random.Random(seed))
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(crowd.agent(a) for a in range(40))), 30)

    # Every call went to the engine once, or was cancelled by its own client (perhaps as
    # it was let go: then admission took back what it had given it).
    assert sum(adm.admitted.values()) == sum(t.admitted is not None for t in crowd.tickets)
    assert sum(map(len, crowd.admitted.values())) == len(crowd.tickets) - crowd.cancelled
    assert len({id(t) for t in crowd.tickets}) == len(crowd.tickets)
    # Calls of one session went in the order they came (those let go at all).
    for session, admitted in crowd.admitted.items():
        let_go = [n for _, n, _ in sorted(admitted)]
        assert let_go == [n for n in crowd.sent[session] if n in let_go], (session, admitted)
    # The crowd has gone: nothing waits, nothing is counted on the engine, nor held by a run.
    assert not adm._waiting and adm._in_flight == 0 and adm.guest_calls == 0
    assert all(not g.in_flight for g in adm._groups.values())
    assert all(not run.pending for run in adm.runs.active())
    # It was a crowd: admission held calls back, some clients gave up.
    assert adm.max_wait_seen > 0.05 and crowd.cancelled > 0
    # Once the holds pass, the cache is given back.
    await asyncio.sleep(0.6)
    assert adm.stats().resident_groups == 0
    assert time.monotonic() - start < 30
