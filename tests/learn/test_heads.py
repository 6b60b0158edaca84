"""Static heads: what a new session of an agent will certainly send first."""

from __future__ import annotations

import json

from engine.admission import prompt_chain
from learn.heads import StaticHeads, head_key

SYSTEM = {"role": "system", "content": "You are an airline agent. Policy: ..."}
TOOLS = [{"type": "function", "function": {"name": "book", "parameters": {}}}]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_a_head_is_what_sessions_share_never_one_sessions_history():
    heads = StaticHeads()
    heads.observe("s1", [SYSTEM, user("I want to fly")], TOOLS, 10.0)
    heads.observe("s1", [SYSTEM, user("I want to fly"), {"role": "assistant",
                  "content": "where to?"}, user("Paris")], TOOLS, 11.0)
    assert heads.top() == []  # one session: its task is not static
    heads.observe("s2", [SYSTEM, user("cancel my trip")], TOOLS, 12.0)
    [head] = heads.top()
    assert head.messages == (SYSTEM,) and head.tools == tuple(TOOLS)
    assert head.sessions == 2 and head.calls == 3


def test_the_newest_message_is_never_in_a_head_and_tools_tell_agents_apart():
    heads = StaticHeads()
    same = [SYSTEM, user("the same question")]
    heads.observe("s1", same, [], 1.0)
    heads.observe("s2", same, [], 2.0)
    assert [h.messages for h in heads.top()] == [(SYSTEM,)]
    other = StaticHeads()
    other.observe("s1", same, TOOLS, 1.0)
    other.observe("s2", same, [], 2.0)
    assert other.top() == []  # one session each: two agents, neither known to be static


def test_fixed_messages_after_the_system_prompt_belong_to_the_head():
    heads = StaticHeads()
    preamble = user("Here are the house rules: ... Now the task follows.")
    for i in range(3):
        heads.observe(f"s{i}", [SYSTEM, preamble, user(f"task {i}")], [], float(i))
    [head] = heads.top()
    assert head.messages == (SYSTEM, preamble) and head.sessions == 3


def test_the_most_shared_head_comes_first():
    heads = StaticHeads()
    rare = {"role": "system", "content": "a rarely used agent"}
    for i in range(3):
        heads.observe(f"s{i}", [SYSTEM, user(f"task {i}")], [], float(i))
    heads.observe("r1", [rare, user("x")], [], 5.0)
    heads.observe("r2", [rare, user("y")], [], 6.0)
    first, second = heads.top()
    assert first.messages == (SYSTEM,) and first.sessions == 3
    assert second.messages == (rare,)
    assert heads.top(1) == [first]


def test_the_key_is_the_prompt_chain_link_a_real_request_names_it_by():
    heads = StaticHeads()
    heads.observe("s1", [SYSTEM, user("a")], TOOLS, 1.0)
    heads.observe("s2", [SYSTEM, user("b")], TOOLS, 2.0)
    [head] = heads.top()
    chain, _ = prompt_chain({"messages": [SYSTEM, user("c"), user("d")], "tools": TOOLS})
    assert head.key == head_key([SYSTEM], TOOLS) and head.key in chain


def test_old_heads_are_forgotten_and_the_snapshot_restores_the_rest():
    heads = StaticHeads(ttl=100.0)
    heads.observe("s1", [SYSTEM, user("a")], [], 1_000.0)
    heads.observe("s2", [SYSTEM, user("b")], [], 1_010.0)
    assert heads.top(now=1_050.0) and heads.top(now=1_200.0) == []
    restored = StaticHeads(ttl=100.0)
    restored.restore(heads.snapshot())
    assert restored.top(now=1_050.0) == heads.top(now=1_050.0)
    restored.restore([{"agent": "bad"}, {"messages": None}])  # unreadable items: skipped
    assert len(restored.top(now=1_050.0)) == 1


def test_the_candidates_hold_at_most_their_characters_the_newest_agents_kept():
    heads = StaticHeads(max_chars=50_000)
    for i in range(40):  # agents whose first call sent a long history
        history = [{"role": "system", "content": f"agent {i} " + "x" * 1000}] + [
            {"role": "user", "content": f"turn {k} " + "y" * 500} for k in range(8)]
        heads.observe(f"s{i}", [*history, {"role": "user", "content": "now"}], [], float(i))
    held = sum(len(json.dumps(c.messages, separators=(",", ":"))) for c in
               heads._by_agent.values())
    assert heads.chars <= 50_000 and abs(held - heads.chars) < 0.05 * heads.chars
    assert len(heads._by_agent) < 40
    shared = [{"role": "system", "content": "agent 39 " + "x" * 1000}]
    heads.observe("s-next", [*shared, {"role": "user", "content": "hello"}], [], 40.0)
    assert [h.messages for h in heads.top()] == [tuple(shared)]  # the newest agent survived
