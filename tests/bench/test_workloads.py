"""The benchmark's workloads as data: generated workflows send back the outputs they depend on."""

from __future__ import annotations

import pytest

from bench import workloads
from bench.shapes import SHAPES, generate
from bench.workloads import (Call, Instance, agent_loops, generated, map_reduce,
                             working_set_tokens)


def fake_outputs(instance: Instance) -> dict[str, str]:
    return {c.key: f"<output of {c.key}>" for c in instance.calls}


def text_of(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def ancestors(calls: list[Call]) -> dict[str, set[str]]:
    """Every call's dependencies, transitively."""
    out: dict[str, set[str]] = {}
    for call in calls:
        out[call.key] = set(call.after).union(*(out[d] for d in call.after))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_calls_and_dependencies_follow_the_generated_workflow(shape):
    for gen, inst in zip(generate(shape, 3, seed=1), generated(shape, 3, seed=1)):
        assert [c.key for c in inst.calls] == [g.id for g in gen.calls]
        assert [c.after for c in inst.calls] == [g.after for g in gen.calls]
        seen: set[str] = set()
        for call in inst.calls:
            assert set(call.after) <= seen
            assert 8 <= call.max_tokens <= 128
            seen.add(call.key)


@pytest.mark.parametrize("shape", SHAPES)
def test_prompts_carry_the_outputs_of_the_calls_they_continue_and_read(shape):
    by_id = {g.id: g for inst in generate(shape, 3, seed=1) for g in inst.calls}
    for inst in generated(shape, 3, seed=1):
        outputs, earlier = fake_outputs(inst), ancestors(inst.calls)
        for call in inst.calls:
            sent = text_of(call.prompt(outputs))
            for key in call.after:
                assert outputs[key] in sent
            for key in earlier[call.key]:  # no stand-in answer is ever sent
                assert workloads._text_of(by_id[key].answer) not in sent


@pytest.mark.parametrize("shape", SHAPES)
def test_with_the_stand_in_answers_the_prompts_are_the_generated_requests(shape):
    """System prompts and documents are sent as generated, so instances share what they share."""
    by_id = {g.id: g for inst in generate(shape, 2, seed=2) for g in inst.calls}
    for inst in generated(shape, 2, seed=2):
        stand_ins = {c.key: workloads._text_of(by_id[c.key].answer) for c in inst.calls}
        for call in inst.calls:
            request = by_id[call.key].request
            expected = [workloads._as_chat(m) for m in request["messages"]]
            sent = call.prompt(stand_ins)
            assert [m["role"] for m in sent] == [m["role"] for m in expected]
            assert sent[0]["content"].startswith(expected[0]["content"])  # then the tools
            assert [m["content"] for m in sent[1:]] == [m["content"] for m in expected[1:]]


def test_map_reduce_summarizer_reads_every_expert():
    (inst,) = map_reduce(1, 3, 200, seed=0)
    summary = inst.calls[-1].prompt(fake_outputs(inst))
    assert summary[1]["content"] == "\n\n".join(f"<output of e{e}>" for e in range(3))


def test_working_set_counts_a_shared_prefix_once_and_only_what_is_held_at_once():
    system = {"role": "system", "content": "s" * 360}
    instances = [Instance(name, "test",
                          [Call("c0", [system, {"role": "user", "content": user}], 10)])
                 for name, user in (("a", "a" * 720), ("b", "b" * 720))]
    # 100 tokens of system prompt, 200 of each task, 10 of each answer
    assert working_set_tokens(instances) == 100 + 2 * (200 + 10)
    one_after_the_other = {("a", "c0"): (0.0, 1.0), ("b", "c0"): (2.0, 3.0)}
    assert working_set_tokens(instances, one_after_the_other) == 100 + 200 + 10


def test_a_time_scale_lengthens_the_tool_gaps_and_starts_and_nothing_else():
    # `bench/e2e.py --time-scale N`: on an engine N times slower, agents whose tool time is N
    # times as long spend the same share of their time in the engine.
    from bench.e2e import slowed

    loops = agent_loops(3, 4, seed=4)
    gaps = [[c.gap for c in inst.calls] for inst in loops]
    slow = slowed(loops, 5.0)
    for before, after, were in zip(loops, slow, gaps):
        assert after.start == pytest.approx(5.0 * before.start)
        assert [c.gap for c in after.calls] == pytest.approx([5.0 * g for g in were])
        assert [c.messages for c in after.calls] == [c.messages for c in before.calls]
        assert [c.key for c in after.calls] == [c.key for c in before.calls]
        assert [c.gap for c in before.calls] == were  # the originals are left as they were
    assert any(g > 0 for inst in gaps for g in inst) and any(i.start > 0 for i in loops)
