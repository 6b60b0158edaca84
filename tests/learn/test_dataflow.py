"""Data flow: which earlier answers a prompt contains."""

from __future__ import annotations

import json
import random

import pytest

from learn.dataflow import FlowIndex, chunks

WORDS = "market revenue growth margin risk policy customer supply demand contract forecast quarter".split()


def paragraph(rng: random.Random, sentences: int = 5) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                    for _ in range(sentences))


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def prompt_chunks(flow: FlowIndex, *texts: str) -> list[dict[int, int]]:
    return [flow.message_chunks({"role": "user", "content": t}, f"k{hash(t)}") for t in texts]


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda a: f"The experts said:\n\n## expert\n{a}\n\nSummarize.", id="pasted"),
    pytest.param(lambda a: "> " + a.replace("\n", "\n> "), id="quoted"),
    pytest.param(lambda a: json.dumps({"handoff": a})[1:-1], id="json-escaped"),
])
def test_an_answer_pasted_into_a_prompt_is_found(wrap):
    rng = random.Random(1)
    flow = FlowIndex()
    texts = [paragraph(rng).replace(". ", ".\n", 2) for _ in range(6)]
    for i, text in enumerate(texts):
        flow.remember(f"e{i}", f"s{i}", ended=10.0, answer=answer(text), own_prompt=[])
    found = flow.sources(prompt_chunks(flow, wrap(texts[2]), wrap(texts[4])), session="sum", started=11.0)
    assert {s.call for s in found} == {"e2", "e4"}
    assert all(s.share >= 0.5 for s in found)


@pytest.mark.parametrize("case", ["same_session", "not_yet_finished", "too_little_of_it"])
def test_what_is_not_data_flow(case):
    rng = random.Random(2)
    flow = FlowIndex()
    text = paragraph(rng, 6)
    flow.remember("a", "s1", ended=10.0, answer=answer(text), own_prompt=[])
    session, started, shown = "s2", 11.0, text
    if case == "same_session":
        session = "s1"  # a conversation contains its own answers: that is continuation
    elif case == "not_yet_finished":
        started = 9.0
    else:
        shown = text.split(". ")[0] + "."  # one sentence of six
    assert flow.sources(prompt_chunks(flow, shown), session, started) == []


def test_sentences_copied_from_the_own_prompt_are_not_indexed():
    rng = random.Random(3)
    flow = FlowIndex()
    document = paragraph(rng, 8)
    quote = document.split(". ")[3]
    own = prompt_chunks(flow, "Document:\n" + document)
    flow.remember("expert", "s1", 10.0, answer(f"{quote}.\nThe rest is mine alone here."), own)
    # a later call that shows the same document (not the expert's answer) is not fed by it
    assert flow.sources(prompt_chunks(flow, "Document:\n" + document), "s2", 20.0) == []


def test_boilerplate_shared_by_many_answers_is_dropped():
    rng = random.Random(4)
    flow = FlowIndex(max_sharing=3)
    boiler = "Let me know if there is anything else I can help you with today"
    for i in range(6):
        flow.remember(f"a{i}", f"s{i}", 1.0, answer(f"{paragraph(rng, 1)}\n{boiler}."), [])
    assert flow.sources(prompt_chunks(flow, boiler), "x", 5.0) == []


def test_window_bounds_memory():
    rng = random.Random(5)
    flow = FlowIndex(window=20)
    for i in range(200):
        flow.remember(f"a{i}", f"s{i}", 1.0, answer(paragraph(rng, 3)), [])
    assert len(flow) == 20
    assert flow.index_size() <= 20 * 3


def test_chunks_skip_short_pieces():
    assert chunks("ok.\nyes\nshort one") == {}
    assert len(chunks("This sentence is certainly long enough. And so is this second one here.")) == 2


def test_sentences_relayed_by_a_revision_credit_the_revision_only():
    rng = random.Random(6)
    flow = FlowIndex()
    draft = [paragraph(rng, 1) for _ in range(6)]
    flow.remember("draft", "s1", 10.0, answer("\n".join(draft)), [])
    kept = draft[:4] + [paragraph(rng, 1) for _ in range(3)]  # the revision keeps most of the draft
    flow.remember("revision", "s2", 20.0, answer("\n".join(kept)), prompt_chunks(flow, "\n".join(draft)))
    found = flow.sources(prompt_chunks(flow, "Current version:\n" + "\n".join(kept)), "s3", 30.0)
    assert [s.call for s in found] == ["revision"]
    # another answer pasted beside the revision is still a source of its own
    other = paragraph(rng, 4)
    flow.remember("other", "s4", 25.0, answer(other), [])
    both = prompt_chunks(flow, "\n".join(kept), other)
    assert {s.call for s in flow.sources(both, "s3", 30.0)} == {"revision", "other"}


def test_a_hand_off_is_found_by_the_answer_sent_on_whole():
    """A framework hands a conversation to another agent by sending the first agent's answer
    (a short `transfer_to_...` call, no text to chunk) in the next agent's prompt."""
    from learn.canonical import message_key

    flow = FlowIndex()
    transfer = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_7", "type": "function",
        "function": {"name": "transfer_to_booking", "arguments": "{}"}}]}
    flow.remember("triage", "s-triage", ended=10.0, answer=transfer, own_prompt=[],
                  key=message_key(transfer))
    ok = {"role": "assistant", "content": "OK."}  # too short to say who said it
    flow.remember("a", "s-a", ended=10.0, answer=ok, own_prompt=[], key=message_key(ok))
    alike = {"role": "assistant", "content": "I will look into that for you right away."}
    for call in ("b", "c"):  # two answers alike: neither is the one passed on
        flow.remember(call, f"s-{call}", ended=10.0, answer=alike, own_prompt=[],
                      key=message_key(alike))

    keys = [message_key(m) for m in ({"role": "user", "content": "Move my booking"}, transfer,
                                      ok, alike)]
    found = flow.sources([], session="s-booking", started=11.0, keys=keys)
    assert [(s.call, s.share) for s in found] == [("triage", 1.0)]
    # Not its own session's answer (that is a continuation), nor one from the future.
    assert flow.sources([], session="s-triage", started=11.0, keys=keys) == []
    assert flow.sources([], session="s-booking", started=9.0, keys=keys) == []


def test_an_agent_called_as_a_tool_reads_the_arguments_as_its_task():
    """A manager's `ask_booking(input=...)`: the specialist's prompt holds the task's text,
    not the JSON it was asked in."""
    from learn.dataflow import argument_text

    task = "Find when booking 42 flies and whether its fare can change"
    ask = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "ask_booking", "arguments": json.dumps(
            {"input": task, "options": {"urgent": True, "notes": ["from the manager desk"]}})}}]}
    assert argument_text(ask["tool_calls"][0]["function"]["arguments"]).splitlines() == [
        task, "from the manager desk"]
    assert argument_text("not JSON at all") == "not JSON at all"
    flow = FlowIndex()
    flow.remember("manager", "s-manager", ended=10.0, answer=ask, own_prompt=[])
    found = flow.sources(prompt_chunks(flow, task), session="s-booking", started=11.0)
    assert [s.call for s in found] == ["manager"]


def long_answer(rng: random.Random, sentences: int) -> list[str]:
    return [paragraph(rng, 1) for _ in range(sentences)]


def test_held_chunks_stay_under_the_budget():
    """Large answers and large prompt messages, many of them: what is held is bounded in
    chunk entries, not only in answers and messages."""
    rng = random.Random(7)
    flow = FlowIndex(budget=2_000, cache_chunks=3_000, answer_chunks=64)
    for i in range(60):
        document = "\n".join(long_answer(rng, 300))
        own = prompt_chunks(flow, f"Read this:\n{document}", f"Question {i}: what does it say?")
        flow.remember(f"a{i}", f"s{i}", float(i), answer("\n".join(long_answer(rng, 300))), own)
        flow.check()
    held = flow.sizes()
    assert held["answer_chunks"] <= 2_000 and flow.index_size() <= 2_000
    assert held["cached_chunks"] <= 3_000
    assert 2_000 // 64 - 1 <= len(flow) < 60  # the budget, not the window, forced answers out


def test_a_recent_answer_is_still_found_after_the_budget_forced_older_ones_out():
    rng = random.Random(8)
    flow = FlowIndex(budget=2_000, answer_chunks=100)
    texts = ["\n".join(long_answer(rng, 150)) for _ in range(40)]
    for i, text in enumerate(texts):
        flow.remember(f"a{i}", f"s{i}", float(i), answer(text), [])
    assert len(flow) == 20
    recent = texts[-3].split("\n")
    quote = "\n".join(recent[20:120])  # two thirds of it, from the middle
    assert [s.call for s in flow.sources(prompt_chunks(flow, quote), "sum", 100.0)] == ["a37"]
    assert flow.sources(prompt_chunks(flow, texts[0]), "sum", 100.0) == []  # forgotten


@pytest.mark.parametrize("part", [slice(0, 450), slice(75, 525), slice(150, 600)],
                         ids=["head", "middle", "tail"])
def test_a_long_answer_is_sampled_and_any_large_part_of_it_is_found(part):
    """A long answer indexes a sample of its chunks, spread over all of it: a prompt that
    quotes 3/4 of it, wherever from, is fed by it; one that quotes 1/5 is not. (The sample
    follows `hash`, which differs between runs: the margins are some 7 standard deviations.)"""
    rng = random.Random(9)
    flow = FlowIndex(answer_chunks=128)
    sentences = long_answer(rng, 600)
    flow.remember("long", "s1", 10.0, answer("\n".join(sentences)), [])
    assert flow.sizes()["answer_chunks"] == 128
    found = flow.sources(prompt_chunks(flow, "\n".join(sentences[part])), "s2", 11.0)
    assert [s.call for s in found] == ["long"] and 0.5 <= found[0].share < 0.95
    little = "\n".join(sentences[part][:120])
    assert flow.sources(prompt_chunks(flow, little), "s2", 11.0) == []


def test_a_revision_of_a_long_draft_is_credited_alone():
    """Relayed sentences are remembered for sampled answers too."""
    rng = random.Random(10)
    flow = FlowIndex(answer_chunks=128)
    draft = long_answer(rng, 500)
    flow.remember("draft", "s1", 10.0, answer("\n".join(draft)), [])
    kept = draft[:400] + long_answer(rng, 100)
    flow.remember("revision", "s2", 20.0, answer("\n".join(kept)),
                  prompt_chunks(flow, "\n".join(draft)))
    assert flow.sizes()["answer_chunks"] <= 128 + 128 + 4 * 128
    found = flow.sources(prompt_chunks(flow, "\n".join(kept)), "s3", 30.0)
    assert [s.call for s in found] == ["revision"]


def test_index_adds_no_tracked_objects_per_chunk():
    """Millions of small containers (a list per chunk) make each full collection slow."""
    import gc

    rng = random.Random(11)
    flow = FlowIndex(max_sharing=40)
    shared = paragraph(rng, 1)  # a sentence several answers say: a bucket of several calls
    texts = ["\n".join([shared, *long_answer(rng, 200)]) for _ in range(30)]
    gc.collect()
    before = len(gc.get_objects())
    for i, text in enumerate(texts):
        flow.remember(f"a{i}", f"s{i}", 1.0, answer(text), [])
    gc.collect()
    assert flow.index_size() == 30 * 200 + 1
    assert len(gc.get_objects()) - before < 5 * 30
    flow.check()


def test_the_same_call_remembered_twice_leaves_no_stale_chunks():
    rng = random.Random(12)
    flow = FlowIndex()
    first, second = paragraph(rng, 4), paragraph(rng, 4)
    flow.remember("a", "s1", 1.0, answer(first), [])
    flow.remember("a", "s1", 2.0, answer(second), [])
    flow.check()
    assert flow.sources(prompt_chunks(flow, first), "s2", 5.0) == []
    assert [s.call for s in flow.sources(prompt_chunks(flow, second), "s2", 5.0)] == ["a"]


def test_a_message_larger_than_the_cache_is_chunked_but_not_cached():
    rng = random.Random(13)
    flow = FlowIndex(cache_chunks=50)
    small = prompt_chunks(flow, paragraph(rng, 3))[0]
    huge = prompt_chunks(flow, "\n".join(long_answer(rng, 80)))[0]
    assert len(huge) == 80
    assert flow.sizes()["cached_messages"] == 1 and flow.sizes()["cached_chunks"] == len(small)
