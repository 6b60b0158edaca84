"""Message templates: known templates filled with varied data must be recovered."""

from __future__ import annotations

import random

import pytest

from learn.align import generalize
from learn.templates import TemplateMiner, matches, template_id

WORDS = ("market revenue growth margin risk policy customer supply demand contract forecast quarter "
         "capital cost price volume trend signal model data evidence report analysis strategy").split()


def prose(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def fill(template: list[str | None], rng: random.Random, sizes: dict[int, int]) -> str:
    """A message from a template given as static strings and None for slots."""
    out, slot = [], 0
    for part in template:
        if part is None:
            n = sizes.get(slot, 3)
            out.append(str(rng.randint(10, 999)) if n == 0 else prose(rng, n)[:-1])
            slot += 1
        else:
            out.append(part)
    return "".join(out)


# (template as static parts with None for slots, words per slot: 0 means a number)
TEMPLATES = [
    pytest.param(["Summarize ", None, " in ", None, " words. Answer in JSON."], {0: 400, 1: 0}, id="mid-message"),
    pytest.param(["Document:\n", None, "\n\nQuestion: As the risk expert, what is ", None,
                  "? Answer in JSON with the keys answer and confidence."], {0: 1500, 1: 8}, id="long-document"),
    pytest.param([None, "\n\nTranslate the text above into French. Keep the formatting."], {0: 30}, id="slot-first"),
    pytest.param(["Here is the current draft of the report:\n\n", None], {0: 200}, id="slot-last"),
    pytest.param(["Ticker: ", None, ". Date: ", None, ". Use your tools, then write the report for ", None,
                  "."], {0: 0, 1: 0, 2: 1}, id="many-short-slots"),
]


@pytest.mark.parametrize("template, sizes", TEMPLATES)
def test_a_filled_template_is_recovered(template, sizes):
    rng = random.Random(1)
    miner = TemplateMiner()
    ids = [miner.mine("user", fill(template, rng, sizes), key=f"k{i}", session=f"s{i}") for i in range(4)]
    learned = miner.get(ids[-1])
    static = tuple(p for p in template if p is not None)
    assert tuple(p for p in learned.parts if p) == tuple(p for p in static if p)
    assert len(learned.slots) == template.count(None)
    assert learned.messages == 4
    assert miner.usable(learned.id)
    assert "{" + learned.slots[0] + "}" in learned.text


def test_slot_names_come_from_labels_and_values():
    miner = TemplateMiner()
    for i, (doc, n) in enumerate([("the quarterly report", 100), ("a memo to all staff about hiring", 250)]):
        tid = miner.mine("user", f"Document: {doc}\n\nSummarize it in {n} words.", key=str(i))
    assert miner.get(tid).text == "Document: {document}\n\nSummarize it in {n} words."


POLICY = ("Answer every question using the documents provided. Cite the section you relied on. "
          "When the documents do not say, reply that you do not know. Never give legal advice. "
          "Keep answers under two hundred words and use plain language. ") * 3


@pytest.mark.parametrize("a, b, merged", [
    pytest.param(f"You are a support agent. Today is 2024-05-01.\n{POLICY}",
                 f"You are a support agent. Today is 2024-06-11.\n{POLICY}", True, id="date-in-system-prompt"),
    pytest.param("You are the bull researcher. Argue that the stock will rise, citing the reports. " + POLICY,
                 "You are the bear researcher. Argue that the stock will fall, citing the reports. " + POLICY,
                 False, id="two-agents-alike"),
])
def test_system_prompts_merge_only_when_nearly_identical(a, b, merged):
    miner = TemplateMiner()
    first = miner.mine("system", a, "a")
    second = miner.mine("system", b, "b")
    assert (miner.resolve(first) == second) is merged


def test_scopes_keep_agents_apart():
    miner = TemplateMiner()
    rng = random.Random(3)
    doc = prose(rng, 300)
    a = miner.mine("user", f"Document:\n{doc}\n\nAs the risk expert, assess it.", "a", scope="risk")
    b = miner.mine("user", f"Document:\n{doc}\n\nAs the legal expert, assess it.", "b", scope="legal")
    assert a != b
    assert miner.get(a).parts == (f"Document:\n{doc}\n\nAs the risk expert, assess it.",)


def test_ids_are_content_hashes_stable_across_miners_and_restores():
    rng = random.Random(5)
    messages = [f"Please review pull request {rng.randint(1, 999)} of {prose(rng, 5)}" for _ in range(5)]
    one, two = TemplateMiner(), TemplateMiner()
    ids_one = [one.mine("user", m, str(i)) for i, m in enumerate(messages)]
    ids_two = [two.mine("user", m, str(i)) for i, m in enumerate(messages)]
    assert ids_one == ids_two
    final = one.get(ids_one[-1])
    assert final.id == template_id("user", final.parts, final.scope)
    restored = TemplateMiner.restore(one.snapshot())
    again = restored.mine("user", f"Please review pull request 7 of {prose(rng, 4)}", "new")
    assert again == final.id


def test_generalised_templates_leave_aliases_for_renames():
    miner = TemplateMiner()
    first = miner.mine("user", "Write a memo about the budget. Use the notes below.", "a")
    second = miner.mine("user", "Write a memo about the hiring plan. Use the notes below.", "b")
    assert first != second and miner.resolve(first) == second
    assert miner.drain_aliases() == [(first, second)]
    assert miner.drain_aliases() == []


def test_free_text_is_not_usable_as_a_call_shape():
    miner = TemplateMiner()
    tid = miner.mine("user", "Yes, please go ahead.", "a", session="s1")
    assert not miner.usable(tid)
    miner.mine("user", "Yes, please go ahead.", "b", session="s2")
    assert not miner.usable(tid)  # seen twice, but a short fixed reply is data


@pytest.mark.parametrize("role", ["assistant", "tool"])
def test_answers_and_tool_output_are_not_mined(role):
    assert TemplateMiner().mine(role, "anything at all", "k") is None


def test_memory_is_bounded():
    miner = TemplateMiner(max_templates=50, max_cache=100)
    rng = random.Random(9)
    for i in range(500):
        miner.mine("user", prose(rng, 12), key=str(i), session=str(i))
    assert len(miner) <= 50


def document(rng: random.Random, chars: int) -> str:
    """A distinct document of about `chars` characters (like a RAG system prompt)."""
    return "\n".join(prose(rng, 12) for _ in range(chars // 80))


def test_characters_held_stay_under_the_budget():
    miner = TemplateMiner(max_chars=200_000)
    rng = random.Random(11)
    for i in range(60):  # 60 distinct 20 KB system prompts, each sent once: 1.2 M characters
        miner.mine("system", f"Agent {i}.\n" + document(rng, 20_000), key=str(i), session=str(i))
        miner.check()
        assert miner.chars <= miner.max_chars
    assert 0 < miner.chars and len(miner) < 60
    assert miner.get(miner.mine("system", "A new agent.", key="new")) is not None


def test_a_template_seen_often_survives_one_off_texts():
    miner = TemplateMiner(max_chars=100_000)
    rng = random.Random(12)
    common = f"You are the research agent.\n{POLICY}"
    kept = miner.mine("system", common, key="common", session="a")
    assert miner.mine("system", common, key="common", session="b") == kept
    for i in range(200):  # 1 MB of newer one-off prompts: ten times the budget
        miner.mine("system", document(rng, 5_000), key=str(i), session=str(i))
        miner.check()
    assert miner.get(kept).sessions == 2  # least recently matched, but seen twice: kept
    assert len(miner) < 30


def test_restore_keeps_the_budget_of_the_new_process():
    big = TemplateMiner()
    rng = random.Random(13)
    for i in range(20):
        big.mine("system", document(rng, 10_000), key=str(i))
    small = TemplateMiner.restore(big.snapshot(), max_chars=50_000)
    small.check()
    assert 0 < len(small) < len(big)


@pytest.mark.parametrize("parts, text, fits", [
    (("a ", " b ", " c"), "a x b y c", True),
    (("a ", " b ", " c"), "a x c", False),
    (("", " end"), "anything end", True),
    (("start ", ""), "start anything", True),
    (("whole",), "whole", True),
])
def test_matches(parts, text, fits):
    assert matches(parts, text) is fits


def test_generalize_bounds_its_work_on_huge_texts():
    rng = random.Random(2)
    a = "Header line.\n" + prose(rng, 20_000) + "\nFooter line."
    b = "Header line.\n" + prose(rng, 20_000) + "\nFooter line."
    merged = generalize((a,), (), b)
    assert merged.parts[0].startswith("Header line.") and merged.parts[-1].endswith("Footer line.")
