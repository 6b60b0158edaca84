"""Workflow runs at arrival, and admission serving the smallest runs first."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from engine.admission import Admission, prompt_chain
from engine.runs import BURST, WINDOW, Runs, answer_hashes, prompt_hashes, text_hashes

ANSWER = ("Revenue rose in the third quarter while margins held steady.\n"
          "The guidance for next year assumes modest growth in every region.")


def test_calls_are_placed_by_session_by_answer_read_and_by_start_time():
    runs = Runs(together=0.5)
    expert, _ = runs.place("expert-1", "kind-expert", list, now=0.0)
    other, _ = runs.place("expert-2", "kind-expert", list, now=0.2)
    assert other == expert  # launched together: one run
    again, hashes = runs.place("expert-1", "kind-expert", list, now=3.0)
    assert again == expert and hashes is None  # a continuation: its session's run
    unrelated, _ = runs.place("lonely", "kind-x", list, now=5.0)
    assert unrelated != expert  # a root started later: a run of its own
    runs.answered(expert, 100, text_hashes([ANSWER]))
    prompt = {"messages": [{"role": "system", "content": "You summarise expert reports."},
                           {"role": "user", "content": "Report one:\n" + ANSWER + "\nSummarise."}]}
    summary, hashes = runs.place("summariser", "kind-sum", lambda: prompt_hashes(prompt), now=6.0)
    assert summary == expert and hashes  # it reads the expert's answer
    assert runs.get(expert).service == 100


def test_steady_traffic_does_not_chain_every_new_session_into_one_run():
    """A new session every 0.4 s, each within `together` of the last: a run takes roots for
    `BURST` s from its start, or one run would never end, its size never learned."""
    runs = Runs(together=0.5, idle=1.0)
    placed = [runs.place(f"s{i}", f"kind-{i % 7}", list, now=0.4 * i)[0] for i in range(1000)]
    assert placed[1] == placed[0] and placed[int(BURST / 0.4)] == placed[0]  # one burst
    assert len(set(placed)) >= 1000 * 0.4 / (BURST + 0.4)
    for i, rid in enumerate(placed):  # each session makes one call, answered at once
        runs.arrived(rid)
        runs.left(rid, now=0.4 * i)
        runs.answered(rid, 10.0, [])
    runs.expire(now=400.0 + 2)
    assert len(runs) == 0 and len(runs._finished) == len(set(placed))  # ended and learned
    assert {kind for kind, _ in runs._finished.values()} <= {f"kind-{k}" for k in range(7)}


def test_a_prompt_that_came_before_its_sources_answer_joins_the_run_later():
    runs = Runs(together=0.5)
    expert, _ = runs.place("expert", "k1", list, now=0.0)
    prompt = {"messages": [{"role": "user", "content": "Review this:\n" + ANSWER}]}
    early, hashes = runs.place("reviewer", "k2", lambda: prompt_hashes(prompt), now=2.0)
    assert early != expert  # the expert's answer was not reported yet
    runs.answered(expert, 50, text_hashes([ANSWER]))
    joined = runs.answered(early, 30, [], hashes)
    assert joined == expert and runs.find(early) == expert
    assert runs.get(early).service == 80  # one run, both calls' work
    assert runs.place("reviewer", "k2", list, now=3.0)[0] == expert


def teach(runs: Runs, kind: str, sizes: tuple[float, ...], t0: float = -10_000.0) -> None:
    """Runs of `kind` with these sizes, long ended."""
    for i, size in enumerate(sizes):
        rid, _ = runs.place(f"{kind}-old-{i}", kind, list, now=t0 + i * 100)
        runs.arrived(rid)
        runs.answered(rid, size, [])
        runs.left(rid, now=t0 + i * 100 + 1)
    runs.expire(now=t0 + len(sizes) * 100 + 1000)


def test_sizes_are_learned_from_ended_runs_of_the_same_kind():
    runs = Runs(together=0.0, idle=10.0)
    teach(runs, "big", (1000, 1200, 5000), t0=0.0)
    teach(runs, "small", (50, 60, 70), t0=1000.0)
    assert len(runs) == 0  # all ended
    big, _ = runs.place("big-new", "big", list, now=6000.0)
    small, _ = runs.place("small-new", "small", list, now=6001.0)
    assert runs.expected_left(runs.get(big)) == 1200  # the median of its kind
    assert runs.expected_left(runs.get(small)) == 64  # 60, floored
    runs.answered(big, 1100, [])  # past most runs of its kind: likely the big one
    assert runs.expected_left(runs.get(big)) == 5000 - 1100
    assert runs.expected_size(runs.get(big)) == 5000
    runs.answered(big, 3850, [])  # near the largest of its kind: little left
    assert runs.expected_left(runs.get(big)) == 64
    runs.answered(big, 1350, [])  # past it by 1,300: as much again past it
    assert runs.expected_left(runs.get(big)) == 1300
    rare, _ = runs.place("rare", "never-seen", list, now=6002.0)
    assert runs.expected_left(runs.get(rare)) == 1000  # the median of all kinds
    runs.answered(rare, 6000, [])  # larger than any run of any kind: as much again
    assert runs.expected_left(runs.get(rare)) == 6000


def test_one_ended_run_of_a_kind_says_more_than_all_kinds_together():
    """A workflow's first run to end is the size its next runs are judged by: the sizes of
    all kinds (a desk of ~11,000, a debate of ~2,300, chains of ~1,000) made a debate that
    had used 1,600 look like a desk with ~9,500 left."""
    runs = Runs(together=0.0, idle=10.0)
    for kind, size in (("desk", 11150), ("debate", 2279), ("reflection", 1519),
                       ("chains", 977)):
        teach(runs, kind, (size,), t0=-10_000.0 - len(kind))
    debate, _ = runs.place("debater", "debate", list, now=0.0)
    chains, _ = runs.place("chain", "chains", list, now=1.0)
    assert runs.expected_left(runs.get(debate)) == 2279
    runs.answered(debate, 1600, [])  # its debaters are done: the judge is left
    assert runs.expected_left(runs.get(debate)) == 2279 - 1600
    assert runs.expected_left(runs.get(chains)) == 977  # more than the debate has left


def test_run_sizes_survive_a_snapshot_and_give_way_to_newer_ones():
    learned = Runs(together=0.0, idle=10.0)
    teach(learned, "big", (1000, 1200, 5000), t0=0.0)
    fresh = Runs(together=0.0, idle=10.0)
    fresh.restore(json.loads(json.dumps(learned.snapshot())))
    big, _ = fresh.place("big-new", "big", list, now=6000.0)
    assert fresh.expected_size(fresh.get(big)) == 1200  # as the runs that ended said
    teach(fresh, "big", (9000,), t0=10_000.0)  # a run ends since: it is the newest
    assert fresh.snapshot() == [["big", 1000.0], ["big", 1200.0], ["big", 5000.0],
                                ["big", 9000.0]]
    fresh.restore([["big", 1.0]] * WINDOW)  # a window's worth restored: what ended here stays
    assert fresh.snapshot()[-1] == ["big", 9000.0] and len(fresh.snapshot()) == WINDOW


def test_until_runs_have_ended_nothing_is_said_of_sizes():
    runs = Runs(together=0.0)
    a, _ = runs.place("a", "k", list, now=0.0)
    runs.answered(a, 5000, [])
    assert runs.expected_size(runs.get(a)) is None


def test_a_chunk_two_runs_wrote_links_neither():
    runs = Runs(together=0.0)
    a, _ = runs.place("a", "k", list, now=0.0)
    b, _ = runs.place("b", "k", list, now=1.0)
    runs.answered(a, 1, text_hashes([ANSWER]))
    runs.answered(b, 1, text_hashes([ANSWER]))  # a degenerate model answers alike
    prompt = {"messages": [{"role": "user", "content": ANSWER}]}
    c, _ = runs.place("c", "k", lambda: prompt_hashes(prompt), now=2.0)
    assert c not in (a, b)


SYSTEMS = {"big": "You are one of the big workflow's many agents.",
           "small": "You are the small workflow's only agent.",
           "other": "You are an agent of some other app.",
           "medium": "You are the medium workflow's agent."}


def _ticket(adm: Admission, workflow: str, text: str, session: str):
    chain, chars = prompt_chain({"messages": [{"role": "system", "content": SYSTEMS[workflow]},
                                              {"role": "user", "content": text}]})
    return adm.ticket(chain, chars, session=session)


def _learned(running: int, max_wait: float = 5.0, **kw) -> Admission:
    """Admission that has seen big runs of ~5,000 tokens and small ones of ~100 end."""
    adm = Admission(1_000_000, ordering=True, running=running, max_wait=max_wait, **kw)
    for workflow, size in (("big", 5000), ("small", 100)):
        kind = _ticket(adm, workflow, "x", "probe").kind
        teach(adm.runs, kind, (size, size, size), t0=time.monotonic() - 10_000)
    return adm


async def test_a_loaded_engine_serves_a_small_run_before_a_big_one():
    adm = _learned(running=2)
    big = [_ticket(adm, "big", f"agent {i}", f"big-{i}") for i in range(2)]
    for t in big:
        await adm.enter(t)
    assert adm.runs.find(big[0].run) == adm.runs.find(big[1].run)  # launched together
    await asyncio.sleep(0.6)  # the next run starts later
    small = _ticket(adm, "small", "task", "small-0")
    await asyncio.wait_for(adm.enter(small), 0.1)  # the engine is loaded: the small run goes
    big_next = _ticket(adm, "big", "agent 0 continues", "big-0")
    waiting_big = asyncio.create_task(adm.enter(big_next))
    await asyncio.sleep(0.01)
    assert not waiting_big.done()  # the big run waits while the small one runs
    assert adm.held_for_smaller == 1
    adm.leave(big[1], 10)  # a place frees up, but the engine is still loaded
    await asyncio.sleep(0.01)
    assert not waiting_big.done()
    adm.leave(small, 10)  # the load falls below the bound
    await asyncio.wait_for(waiting_big, 2.0)


async def test_without_load_sizes_or_ordering_nothing_waits():
    cases = {"loaded, sized": (1, True, True), "not loaded": (100, True, True),
             "no sizes": (1, False, True), "ordering off": (1, True, False)}
    waited = {}
    for case, (running, learned, ordering) in cases.items():
        adm = (_learned(running, max_wait=0.2) if learned
               else Admission(1_000_000, ordering=True, running=running, max_wait=0.2))
        adm.runs.together = 0.0  # every session a run of its own
        if not ordering:
            adm.runs = None
        tickets = [_ticket(adm, "big" if i % 2 else "small", f"task {i}", f"s{i}")
                   for i in range(20)]
        await asyncio.gather(*(adm.enter(t) for t in tickets))
        waited[case] = (max(t.waited for t in tickets), adm.held_for_smaller,
                        sum(t.how == "timeout" for t in tickets))
    longest, held, _ = waited.pop("loaded, sized")
    assert longest > 0.15 and held > 0  # big runs wait for the small ones
    # The others go at once: none held, none let go by its bound (counted, not timed: on a
    # loaded machine the event loop itself takes milliseconds to run them)
    assert {case: (h, n) for case, (_, h, n) in waited.items()} == dict.fromkeys(waited, (0, 0))


async def test_when_the_cache_frees_up_the_smaller_run_goes_first():
    """Both wait for room in the cache; the small run arrived last but goes in first. Runs
    of one size keep their order of arrival."""
    for workflows, first in ((("big", "small"), "small-b"), (("big", "big"), "big-a")):
        adm = _learned(running=100, hold=0.05)
        adm.capacity_tokens, adm.fill, adm.chars_per_token = 1000, 1.0, 1.0
        adm.runs.together = 0.0
        filler = _ticket(adm, "other", "F" * 900, "filler")  # (its size says nothing of theirs)
        await adm.enter(filler)
        names = ["big-a", workflows[1] + "-b"]
        tickets = {}
        for name, workflow in zip(names, workflows):
            tickets[name] = _ticket(adm, workflow, name * 50, name)
        order: list[str] = []

        async def enter(name):
            await adm.enter(tickets[name])
            order.append(name)

        tasks = [asyncio.create_task(enter(n)) for n in names]
        await asyncio.sleep(0.05)
        assert not order  # the cache is full
        adm.leave(filler, 10)
        await asyncio.wait_for(asyncio.gather(*tasks), 2.0)
        assert order[0] == first


async def test_a_run_near_its_end_is_not_held_for_a_smaller_run_just_begun():
    """Ordering weighs the work a run has left, not its size: a big run down to its last
    call goes before a small run that has all of its work ahead of it."""
    adm = _learned(running=1)
    adm.runs.together = 0.0  # every new session a run of its own
    big = _ticket(adm, "big", "agent", "big")
    await adm.enter(big)
    adm.answered(big, {"prompt_tokens": 10, "completion_tokens": 4950}, 0)
    adm.leave(big, 4950)  # nearly all of a big run's ~5,000 done
    await asyncio.sleep(0.6)
    small = _ticket(adm, "small", "task", "small")
    await adm.enter(small)  # the engine is loaded now
    last = _ticket(adm, "big", "agent, the last step", "big")
    await asyncio.wait_for(adm.enter(last), 0.1)  # ~64 left against the small run's 100
    assert adm.held_for_smaller == 0
    fresh = _ticket(adm, "big", "another agent", "big-2")  # a big run just begun waits
    waiting = asyncio.create_task(adm.enter(fresh))
    await asyncio.sleep(0.05)
    assert not waiting.done() and adm.held_for_smaller == 1
    adm.leave(small, 10)
    adm.leave(last, 10)
    await asyncio.wait_for(waiting, 2.0)


async def test_a_run_about_to_end_holds_no_run_through_its_last_tool_time():
    """The runs a call waits for are weighed by their size: a small run down to its last
    call, between calls, does not hold a run with less work left than twice its size (weighed
    by what they had left, runs about to end held every other run, and the generated
    workflows' median fell to 0.94x and 1.03x of direct)."""
    adm = _learned(running=1, hold=30.0)
    adm.runs.together = 0.0
    teach(adm.runs, _ticket(adm, "medium", "x", "probe").kind, (200, 200, 200),
          t0=time.monotonic() - 20_000)
    small = _ticket(adm, "small", "task", "small")
    await adm.enter(small)
    adm.answered(small, {"prompt_tokens": 0, "completion_tokens": 90}, 0)
    adm.leave(small, 90)  # ~10 of its ~100 left, in its tool time
    await asyncio.sleep(0.6)
    big = _ticket(adm, "big", "agent", "big")
    await adm.enter(big)  # the engine is loaded now
    await asyncio.sleep(0.6)
    medium = _ticket(adm, "medium", "task", "medium")
    await asyncio.wait_for(adm.enter(medium), 0.1)  # 200 left: under twice the small run's size
    assert adm.held_for_smaller == 0 and medium.how != "timeout"


@pytest.mark.parametrize("max_wait, order_wait, how", [
    (0.3, 30.0, "timeout"),  # admission's own bound
    (60.0, 0.3, "resident"),  # ordering's: not the minute of max_wait
])
async def test_ordering_never_holds_a_call_past_its_bound(max_wait, order_wait, how):
    adm = _learned(running=1, max_wait=max_wait, hold=30.0, order_wait=order_wait)
    assert adm.order_wait == 0.3
    big = _ticket(adm, "big", "agent", "big")
    await adm.enter(big)
    await asyncio.sleep(0.6)
    small = _ticket(adm, "small", "task", "small")
    await adm.enter(small)  # the engine is loaded, the small run goes in
    nxt = _ticket(adm, "big", "agent again", "big")
    await asyncio.wait_for(adm.enter(nxt), 2.0)
    assert nxt.how == how and 0.25 < nxt.waited < 1.0


async def test_when_the_cache_decides_ordering_holds_nothing_back():
    """A session with its history resident is not held for a smaller run while the cache is
    full: holding it would keep its share of the cache idle."""
    adm = _learned(running=1, max_wait=5.0)
    adm.capacity_tokens, adm.fill, adm.chars_per_token = 1000, 1.0, 1.0
    adm.runs.together = 0.0
    big = _ticket(adm, "big", "B" * 1100, "big")
    await adm.enter(big)  # an empty engine takes anything; now the cache is full
    small = _ticket(adm, "small", "task", "small")
    waiting_small = asyncio.create_task(adm.enter(small))
    await asyncio.sleep(0.01)
    assert not waiting_small.done()  # no room in the cache
    nxt = _ticket(adm, "big", "B" * 1100 + "more", "big")
    await asyncio.wait_for(adm.enter(nxt), 0.1)
    assert nxt.how == "resident" and adm.held_for_smaller == 0
    waiting_small.cancel()


async def _debate_beside_a_filler(fill: float = 1.0, sizes: tuple[int, int] = (280, 480),
                                  guests: bool = False):
    """A cache of 1,000 tokens, 580 of them a filler's call in flight; then a debate starts
    (a run of its own) with two debaters of `sizes` tokens (by default the first fits, the
    second will not)."""
    adm = Admission(1000, fill=fill, ordering=True, running=100, hold=0.05, max_wait=10.0,
                    guests=guests, guest_busy_below=1.0)  # guests however busy the engine
    adm.chars_per_token = 1.0
    adm.runs.together = 0.5

    def call(text: str, session: str):
        chain, chars = prompt_chain({"messages": [{"role": "user", "content": text}]})
        return adm.ticket(chain, chars, session=session)

    filler = call("F" * 580, "filler")
    await adm.enter(filler)
    await asyncio.sleep(0.6)
    first, second = call("D" * sizes[0], "debater-1"), call("E" * sizes[1], "debater-2")
    return adm, call, filler, first, second


async def test_the_agents_of_a_run_under_way_go_before_a_run_not_begun():
    """Two debaters launched together: one fits the cache, the other waits. A smaller
    session of another workflow arrives later. When room frees, the second debater goes
    first (the first cannot start its next round without it), though the other adds less."""
    adm, call, filler, first, second = await _debate_beside_a_filler()
    assert adm.runs.find(first.run) == adm.runs.find(second.run)
    await adm.enter(first)
    assert first.how == "fits"
    order: list[str] = []

    async def enter(t, name):
        await adm.enter(t)
        order.append(name)

    waiting = [asyncio.create_task(enter(second, "debater-2"))]
    await asyncio.sleep(0.6)
    other = call("O" * 430, "other-workflow")
    assert adm.runs.find(other.run) != adm.runs.find(first.run)
    waiting.append(asyncio.create_task(enter(other, "other-workflow")))
    await asyncio.sleep(0.05)
    assert not order  # neither fits beside the filler
    adm.leave(filler, 10)  # its hold lapses: room for one of them
    await asyncio.sleep(0.3)
    assert order == ["debater-2"]
    adm.leave(first, 10)
    adm.leave(second, 10)
    await asyncio.wait_for(waiting[1], 2.0)
    assert order == ["debater-2", "other-workflow"]


async def test_a_run_begun_by_a_guest_is_under_way():
    """A debater that went in as a guest began its run as much as one that went in resident:
    the second debater, waiting, goes before a smaller session of a run not begun."""
    adm, call, filler, first, second = await _debate_beside_a_filler(0.8, (180, 450), True)
    await adm.enter(first)
    assert first.how == "guest"  # past the fill beside the filler, its prompt fits the cache
    debater = asyncio.create_task(adm.enter(second))
    await asyncio.sleep(0.6)
    other = call("O" * 400, "other-workflow")
    assert adm.runs.find(other.run) != adm.runs.find(first.run)
    waiting = asyncio.create_task(adm.enter(other))
    await asyncio.sleep(0.05)
    assert not debater.done() and not waiting.done()  # neither fits, nor as a guest
    adm.leave(filler, 10)  # room for one of them
    await asyncio.wait_for(debater, 1.0)
    assert second.how == "waited" and not waiting.done()
    adm.leave(first, 10)
    adm.leave(second, 10)
    await asyncio.wait_for(waiting, 2.0)


async def test_a_session_that_fits_goes_in_while_a_larger_one_waits_for_room():
    """The second debater goes first but does not fit beside the first; a small session of
    another workflow that fits does not wait behind it (backfill). The debater goes in as
    soon as there is room."""
    adm, call, filler, first, second = await _debate_beside_a_filler()
    await adm.enter(first)
    waiting = asyncio.create_task(adm.enter(second))
    await asyncio.sleep(0.6)
    small = call("S" * 40, "small-workflow")
    assert adm.runs.find(small.run) != adm.runs.find(first.run)
    await asyncio.wait_for(adm.enter(small), 0.1)
    assert small.how == "backfill"
    assert not waiting.done()  # still no room for the debater
    adm.leave(filler, 10)  # its hold lapses
    await asyncio.wait_for(waiting, 2.0)
    assert second.how == "waited"


async def test_a_call_past_the_ordering_bound_waits_for_room_without_spinning(monkeypatch):
    """A call that has waited out `order_wait` and still finds no room in the cache waits on
    (for room, or `max_wait`). Admission looks again when something changes or a bound comes,
    not every millisecond: it did, and took 70% of a core from the engine beside it while a
    session waited (the mixed workload under pressure, proxy CPU 4.5 s against 0.6 s)."""
    adm, call, filler, first, second = await _debate_beside_a_filler()
    adm.order_wait = 0.1
    await adm.enter(first)
    looks = 0
    look = adm._release_ready

    def counted() -> None:
        nonlocal looks
        looks += 1
        look()

    monkeypatch.setattr(adm, "_release_ready", counted)
    waiting = asyncio.create_task(adm.enter(second))
    await asyncio.sleep(0.25)  # past ordering's bound, far from max_wait
    looks = 0
    await asyncio.sleep(0.5)
    assert not waiting.done()  # still no room
    assert looks <= 3  # (its idle recheck is once a second)
    adm.leave(filler, 10)  # its hold lapses: room
    await asyncio.wait_for(waiting, 2.0)
    assert second.how == "waited"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_hand_off_with_no_text_joins_the_run_by_its_call_id(api):
    """A front desk's `transfer_to_booking` call, sent on in the specialist's prompt."""
    runs = Runs(together=0.5)
    desk, _ = runs.place("desk", "kind-desk", list, now=0.0)
    transfer = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_Xy7", "type": "function",
        "function": {"name": "transfer_to_booking", "arguments": "{}"}}]}
    runs.answered(desk, 20, answer_hashes(transfer))
    user = {"role": "user", "content": "Move my booking"}
    if api == "chat":
        prompt = {"messages": [{"role": "system", "content": "You are the booking desk."}, user,
                               transfer, {"role": "tool", "tool_call_id": "call_Xy7",
                                          "content": "{}"}]}
    else:
        prompt = {"instructions": "You are the booking desk.", "input": [
            user, {"type": "function_call", "call_id": "call_Xy7", "name": "transfer_to_booking",
                   "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_Xy7", "output": "{}"}]}
    specialist, _ = runs.place("booking", "kind-booking", lambda: prompt_hashes(prompt), now=3.0)
    assert specialist == desk
    stranger = {"messages": [user, dict(transfer, tool_calls=[dict(
        transfer["tool_calls"][0], id="call_other")])]}
    assert runs.place("other", "kind-booking", lambda: prompt_hashes(stranger), now=9.0)[0] != desk


@pytest.mark.parametrize("guests, handoff", [(True, True), (False, True), (True, False)])
async def test_a_hand_off_its_idle_run_waits_for_goes_in_at_once(guests, handoff):
    """An actor waits between calls for its critic, which reads its answer. The actor and
    another session fill the cache, so the critic would wait for room that only the actor's
    leaving makes: it goes in at once, while a session of another run waits (and so does
    the critic, with the switch off)."""
    adm = Admission(1000, fill=1.0, ordering=True, running=100, hold=30.0, max_wait=10.0,
                    guests=guests, handoff=handoff, guest_busy_below=1.0)
    adm.chars_per_token = 1.0
    adm.runs.together = 0.0  # every root a run of its own

    def call(text: str, session: str, system: str = "agent"):
        body = {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": text}]}
        chain, chars = prompt_chain(body)
        return adm.ticket(chain, chars, session=session, hashes=lambda: prompt_hashes(body))

    other = call("O" * 400, "other", "another app")
    await adm.enter(other)  # on the engine all along: it is not idle
    actor = call("A" * 400, "actor")
    await adm.enter(actor)
    usage = {"prompt_tokens": 400, "completion_tokens": 20}
    adm.answered(actor, usage, 0, text_hashes([ANSWER]))
    adm.leave(actor, 20)  # between calls, held: it waits for its critic
    await asyncio.sleep(0.01)

    stranger = call("S" * 300, "stranger", "a third app")  # another run: no room for it
    waiting = asyncio.create_task(adm.enter(stranger))
    critic = call("Critique this answer:\n" + ANSWER + "\n" + "C" * 200, "critic", "critic")
    assert adm.runs.find(critic.run) == adm.runs.find(actor.run)
    if not handoff:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(adm.enter(critic), 0.3)
        waiting.cancel()
        return
    await asyncio.wait_for(adm.enter(critic), 0.5)
    assert critic.how == "handoff" and critic.waited < 0.1
    assert (adm.guest_calls == 1) == guests
    await asyncio.sleep(0.05)
    assert not waiting.done()
    waiting.cancel()
