"""Session linking: explicit ids, prefix continuation, and histories the agent rewrote."""

from __future__ import annotations

import json

import pytest

from learn.sessions import ENTRY_BYTES, SessionLinker
from proxy.exchange import Exchange
from tests.learn.helpers import chat, say, swe_steps, tool_call

SYSTEM = {"role": "system", "content": "You are a careful coding agent."}
TASK = {"role": "user", "content": "Fix the failing test in utils.py."}


@pytest.mark.parametrize("headers, body, source", [
    ([("X-Session-ID", "abc")], {}, "header:x-session-id"),
    ([("x-claude-code-session-id", "abc")], {}, "header:x-claude-code-session-id"),
    ([], {"prompt_cache_key": "abc"}, "body:prompt_cache_key"),
    ([], {"user": "abc"}, "body:user"),
])
def test_explicit_ids_are_believed(headers, body, source):
    link = SessionLinker().link(chat([SYSTEM, TASK], say("ok"), headers=headers, **body))
    assert (link.session_id, link.source) == ("abc", source)


def test_a_conversation_links_by_prefix_and_names_its_parent():
    linker = SessionLinker()
    first = chat([SYSTEM, TASK], tool_call("read", "c1"))
    second = chat([SYSTEM, TASK, first.answer, {"role": "tool", "tool_call_id": "c1", "content": "..."}],
                  say("done"))
    a, b = linker.link(first), linker.link(second)
    assert a.source == "new" and b.source == "prefix"
    assert (b.session_id, b.parent, b.continued, b.rewritten) == (a.session_id, first.id, 3, False)


def test_an_explicit_session_still_names_the_call_it_continues():
    linker = SessionLinker()
    first = chat([SYSTEM, TASK], say("which file?"), headers=[("X-Session-ID", "s")])
    second = chat([SYSTEM, TASK, first.answer, {"role": "user", "content": "utils.py"}], say("ok"),
                  headers=[("X-Session-ID", "s")])
    linker.link(first)
    link = linker.link(second)
    assert (link.session_id, link.source, link.parent) == ("s", "header:x-session-id", first.id)


def test_tenants_never_share_sessions():
    linker = SessionLinker()
    first = chat([SYSTEM, TASK], say("which file?"), tenant="t1")
    linker.link(first)
    other = chat([SYSTEM, TASK, first.answer, {"role": "user", "content": "utils.py"}], say("ok"), tenant="t2")
    assert linker.link(other).source == "new"


def test_responses_api_previous_response_id():
    linker = SessionLinker()
    first = chat([TASK], path="/v1/responses")
    first.response_id = "resp_1"
    a = linker.link(first)
    second = chat([TASK], path="/v1/responses", previous_response_id="resp_1")
    assert linker.link(second).session_id == a.session_id


def test_swe_agent_rewritten_history_still_links_every_step():
    steps = swe_steps()
    if steps is None:
        pytest.skip("../shared/workloads is absent")
    linker = SessionLinker()
    links, calls = [], []
    for step in steps:
        call = chat(step["messages"][:-2], step["messages"][-2])  # the step's prompt and its answer
        calls.append(call)
        links.append(linker.link(call))
    assert len({link.session_id for link in links}) == 1
    assert [link.parent for link in links[1:]] == [c.id for c in calls[:-1]]
    assert any(link.rewritten for link in links)  # SWE-agent elided old tool output on the way


def test_a_new_conversation_with_the_same_opening_is_not_a_continuation():
    linker = SessionLinker()
    first = chat([SYSTEM, TASK], tool_call("read", "c1"))
    linker.link(first)
    other_answer = tool_call("grep", "c9")
    rerun = chat([SYSTEM, TASK, other_answer, {"role": "tool", "tool_call_id": "c9", "content": "x"}], say("ok"))
    assert linker.link(rerun).source == "new"


def test_memory_is_bounded_by_the_window():
    linker = SessionLinker(window=50, heads=10)
    for i in range(300):
        linker.link(chat([SYSTEM, {"role": "user", "content": f"task {i}"}], say(f"answer {i}")))
    assert len(linker) <= 50
    assert len(linker._by_head) <= 10


def test_a_responses_api_loop_links_with_its_output_items_sent_back():
    """The Responses API (the OpenAI Agents SDK's default) sends an answer's output items back
    as input items, one per function call, reasoning included: still one conversation."""
    from proxy.exchange import Exchange, _answer_of

    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "status": "completed"},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Looking both up.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_a", "name": "find_customer",
         "arguments": '{"booking": "42"}', "status": "completed"},
        {"type": "function_call", "id": "fc_2", "call_id": "call_b", "name": "read_booking",
         "arguments": '{"booking": "42"}', "status": "completed"},
    ]

    def call(items: list[dict], answer: dict) -> Exchange:
        body = {"model": "m", "instructions": SYSTEM["content"], "input": items}
        ex = Exchange(method="POST", path="/v1/responses", request_body=json.dumps(body).encode())
        ex.analyze()
        ex.status, ex.answer = 200, answer
        return ex

    task = {"role": "user", "content": TASK["content"]}
    first = call([task], _answer_of("/v1/responses", {"output": output}))
    results = [{"type": "function_call_output", "call_id": "call_a", "output": "gold tier"},
               {"type": "function_call_output", "call_id": "call_b", "output": "Friday"}]
    second = call([task, *output, *results], say("Friday, gold tier."))
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "tool", "tool"]
    assert second.messages[2] == first.answer
    linker = SessionLinker()
    a, b = linker.link(first), linker.link(second)
    assert (b.session_id, b.source, b.parent, b.continued) == (a.session_id, "prefix", first.id, 3)


def test_a_tool_call_sent_back_serialised_anew_still_continues_its_session():
    """pydantic-ai parses a call's arguments and sends them back in its own spacing and order."""
    first = chat([SYSTEM, TASK], tool_call("read", "c1", '{"path": "utils.py", "lines": [1, 40]}'))
    again = tool_call("read", "c1", '{"lines":[1,40],"path":"utils.py"}')
    second = chat([SYSTEM, TASK, again, {"role": "tool", "tool_call_id": "c1", "content": "..."}],
                  say("done"))
    other = tool_call("read", "c1", '{"lines":[1,41],"path":"utils.py"}')  # not the same call
    third = chat([SYSTEM, TASK, other, {"role": "tool", "tool_call_id": "c1", "content": "..."}],
                 say("done"))
    linker = SessionLinker()
    a, b, c = linker.link(first), linker.link(second), linker.link(third)
    assert (b.session_id, b.source, b.parent) == (a.session_id, "prefix", first.id)
    assert c.session_id != a.session_id


def _loop(opening: str, turns: int) -> list[dict]:
    """An agent's history: its opening, then `turns` tool calls with their results."""
    messages = [SYSTEM, {"role": "user", "content": opening}]
    for t in range(turns):
        messages += [tool_call("run", f"c{t}"), {"role": "tool", "tool_call_id": f"c{t}",
                                                 "content": f"{opening}: output {t}"}]
    return messages


def test_remembered_histories_stay_under_the_byte_budget_through_many_long_sessions():
    budget = 100_000
    linker = SessionLinker(history_budget=budget)
    for s in range(60):
        for turns in (50, 100, 150):  # three calls of one session, each a longer history
            linker.link(chat(_loop(f"task {s}", turns), say("next")))
            assert linker.history_bytes <= budget
    linker.check()
    keys = sum(len(conv) // 8 for sessions in linker._by_head.values() for _, conv in sessions.values())
    assert budget // 2 < linker.history_bytes and keys * 8 < budget


def test_a_recently_continued_session_outlives_older_ones_under_the_budget():
    def step(opening: str, turns: int) -> Exchange:
        return chat(_loop(opening, turns), tool_call("run", f"c{turns}"))

    def rewritten(opening: str, turns: int) -> Exchange:
        """The next prompt after `step(opening, turns)`, with its first tool output elided."""
        messages = [*_loop(opening, turns), tool_call("run", f"c{turns}"),
                    {"role": "tool", "tool_call_id": f"c{turns}", "content": "..."}]
        messages[3] = {"role": "tool", "tool_call_id": "c0", "content": "(output omitted)"}
        return chat(messages, say("done"))

    linker = SessionLinker(history_budget=20 * (ENTRY_BYTES + 8 * 42))
    kept, forgotten = step("kept", 1), step("forgotten", 1)
    linker.link(kept)
    linker.link(forgotten)
    kept, forgotten = step("kept", 2), step("forgotten", 2)
    session = linker.link(kept).session_id
    linker.link(forgotten)
    for i in range(60):  # other agents' long sessions fill the budget many times over
        linker.link(step(f"other {i}", 20))
        if i % 10 == 9:
            kept = step("kept", 2 + i // 10 + 1)
            assert linker.link(kept).session_id == session
    linker.check()
    link = linker.link(rewritten("kept", 8))
    assert (link.session_id, link.parent, link.rewritten) == (session, kept.id, True)
    assert not linker.link(rewritten("forgotten", 2)).rewritten  # only its exact prefix is left
