"""The learner end to end: real workloads, generated workflows, bad input, persistence."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from bench.shapes import exchange_of, generate, schedule
from learn.learner import SNAPSHOT_VERSION, LearnConfig, Learner
from learn.predict import CONTINUE
from learn.radix import common_length
from proxy.exchange import Exchange
from tests.learn.helpers import chat, say, swe_steps, tau_calls, tau_runs, tool_call


def feed(learner: Learner, instances, seed: int = 0, start: float = 1_700_000_000.0):
    """Feed generated instances; returns {call id: (exchange id, predictions)} and the end time."""
    out = {}
    timed = schedule(instances, start=start, seed=seed)
    for s, e, call in timed:
        ex = exchange_of(call, s, e)
        out[call.id] = (ex.id, learner.observe(ex))
    return out, max(e for _, e, _ in timed) + 60.0


@pytest.mark.parametrize("shape", ["map_reduce", "debate", "reflection"])
def test_generated_workflows_are_learned(shape):
    instances = generate(shape, 6, seed=3)
    learner = Learner()
    _, t = feed(learner, instances[:4])
    seen, _ = feed(learner, instances[4:], seed=1, start=t)
    calls = [c for i in instances[4:] for c in i.calls]
    template = {c.id: learner.template_of(seen[c.id][0]) for c in calls}
    by_label, by_template = defaultdict(set), defaultdict(set)
    for c in calls:
        by_label[c.label].add(template[c.id])
        by_template[template[c.id]].add(c.label)
    assert all(len(v) == 1 for v in by_label.values()), "a true template was split"
    assert all(len(v) == 1 for v in by_template.values()), "two true templates were merged"
    label_of = {t: labels.pop() for t, labels in by_template.items()}
    right = total = 0
    for inst in instances[4:]:
        after = defaultdict(set)
        for c in inst.calls:
            for p in c.after:
                after[p].add(c.label)
        for c in inst.calls:
            if after[c.id]:
                total += 1
                preds = seen[c.id][1]
                right += bool(preds) and label_of.get(learner.registry.resolve(preds[0].template)) in after[c.id]
    assert right / total >= 0.9
    (workflow,) = [w for w in learner.workflows() if set(label_of) & {n.template for n in w.nodes}]
    assert workflow.width == pytest.approx(sum(i.roots for i in instances) / len(instances), abs=0.5)


def test_tau_bench_next_call_and_static_prefix():
    data = tau_runs()
    if data is None:
        pytest.skip("../shared/workloads is absent")
    runs, tools = data
    learner = Learner()
    for i, run in enumerate(runs[:40]):
        for ex in tau_calls(run, tools, 1_000_000.0 + 1000 * i):
            learner.observe(ex)
    right = total = 0
    for i, run in enumerate(runs[150:160]):
        calls = tau_calls(run, tools, 2_000_000.0 + 1000 * i)
        preds = [learner.observe(ex) for ex in calls]
        for j in range(len(calls) - 1):
            total += 1
            right += bool(preds[j]) and preds[j][0].template == learner.template_of(calls[j + 1].id)
            if preds[j] and preds[j][0].kind == CONTINUE:
                nxt = learner.tokenizer.prompt(calls[j + 1].messages, None, tools)
                assert nxt[: len(preds[j][0].prefix)] == preds[j][0].prefix
    assert right / total >= 0.9
    static = learner.tokenizer.tools(tools) + learner.tokenizer.message(runs[0]["traj"][0])
    best = max(common_length(p.tokens, static, 0) for p in learner.static_prefixes())
    assert best == len(static)


def test_swe_agent_stays_one_session_through_its_rewrites():
    steps = swe_steps()
    if steps is None:
        pytest.skip("../shared/workloads is absent")
    learner = Learner(config=LearnConfig(min_support=1))  # one run: report what was seen once
    calls = [chat(step["messages"][:-2], step["messages"][-2], started=100.0 + 10 * i)
             for i, step in enumerate(steps)]
    for ex in calls:
        learner.observe(ex)
    assert len({learner.session_of(ex.id) for ex in calls}) == 1
    (workflow,) = learner.workflows()
    assert workflow.instances == 1 and workflow.width == 1.0


def bad_exchanges() -> list[tuple[str, Exchange]]:
    """Exchanges learning must survive; each with what it should count as skipped ('' if learned)."""
    def raw(body: bytes, path="/v1/chat/completions", **kw) -> Exchange:
        ex = Exchange(method="POST", path=path, request_body=body,
                      request_headers=[("content-type", "application/json")], **kw)
        ex.analyze()
        ex.status = 200
        return ex

    user = {"role": "user", "content": "hello there"}
    cases = [
        ("unparsed", raw(b"{not json")),
        ("unparsed", raw(b"[1, 2, 3]")),
        ("unparsed", raw(b'{"messages": []}' * 3, request_truncated=True)),
        ("no_messages", raw(b'{"messages": []}')),
        ("no_messages", raw(b'{"messages": "hi"}')),
        ("no_messages", raw(b'{"messages": [1, "x", null]}')),
        ("not_learned_path", raw(b'{"input": "x"}', path="/v1/embeddings")),
        ("error_status", chat([user], say("x"))),
    ]
    cases[-1][1].status = 500
    unanswered = chat([user], None)
    unanswered.status, unanswered.error = None, "upstream timed out"
    cases.append(("no_response", unanswered))
    image = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,AA"}}]}], say("cat"))
    audio = chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA"}}]}], say("hi"))
    huge = chat([{"role": "user", "content": "word " * 400_000}], say("long"))
    partial = chat([user], say("half an ans"))
    partial.response_error = "stream ended before [DONE]"
    odd = chat([{"content": None}, user], {"role": "assistant", "tool_calls": [None, {"function": None}]})
    odder = chat([user, {"role": "assistant", "tool_calls": [{"id": 1, "function": "f(x)"}]},
                  {"role": "tool", "tool_call_id": 1, "content": {"not": "text"}}],
                 {"role": "assistant", "content": 42, "tool_calls": "none"})
    cases += [("", image), ("", audio), ("", huge), ("", partial), ("", odd), ("", odder)]
    return cases


def test_bad_input_is_skipped_or_learned_and_never_poisons_the_dags():
    instances = generate("debate", 3, seed=5)
    clean, dirty = Learner(), Learner()
    feed(clean, instances)
    bad = [ex for reason, ex in bad_exchanges() if reason]
    timed = schedule(instances, seed=0)
    for n, (s, e, call) in enumerate(timed):
        ex = exchange_of(call, s, e)
        assert dirty.observe(ex) is not None
        assert dirty.observe(ex) == []  # the same exchange twice is a duplicate
        assert dirty.observe(bad[n % len(bad)]) == []
    assert dirty.graph.snapshot() == clean.graph.snapshot()
    assert [t.id for t in dirty.templates()] == [t.id for t in clean.templates()]
    assert dirty.skipped["duplicate"] == len(timed)


@pytest.mark.parametrize("reason, ex", bad_exchanges(), ids=lambda x: x if isinstance(x, str) else "")
def test_each_bad_input(reason, ex):
    learner = Learner(config=LearnConfig(max_prompt_tokens=10_000))
    assert isinstance(learner.observe(ex), list)
    if reason:
        assert learner.skipped[reason] == 1 and learner.observed == 0
    else:
        assert learner.observed == 1 and not learner.skipped
        assert learner.radix.tokens <= 10_000
    learner.radix.check()
    json.dumps(learner.snapshot())


def test_snapshot_restores_and_continues_with_the_same_ids():
    instances = generate("reflection", 5, seed=2)
    learner = Learner()
    _, t = feed(learner, instances[:4])
    data = json.loads(json.dumps(learner.snapshot()))
    assert data["version"] == SNAPSHOT_VERSION
    restored = Learner.restore(data)
    assert restored.templates() == learner.templates()
    assert restored.workflows() == learner.workflows()
    assert [p.tokens for p in restored.static_prefixes()] == [p.tokens for p in learner.predictor.warm_prefixes(2)]
    a, _ = feed(learner, instances[4:], start=t)
    b, _ = feed(restored, instances[4:], start=t)
    assert [learner.template_of(a[c][0]) for c in a] == [restored.template_of(b[c][0]) for c in b]


@pytest.mark.parametrize("change, error", [
    (lambda d: d.update(version=SNAPSHOT_VERSION + 1), "newer"),
    (lambda d: d.update(format="something else"), "not a preheat"),
    (lambda d: d.update(graph={"nodes": {"t1": {}}}), "malformed"),
])
def test_unreadable_snapshots_say_why(change, error):
    data = Learner().snapshot()
    change(data)
    with pytest.raises(ValueError, match=error):
        Learner.restore(data)


def test_prefixes_of_another_tokenizer_are_not_restored():
    learner = Learner()
    feed(learner, generate("map_reduce", 3, seed=1))
    assert any(t.prefix_tokens for t in learner.templates())
    restored = Learner.restore(learner.snapshot(), tokenize=lambda ex: [1, 2, 3], tokenizer_name="engine-x")
    assert not any(t.prefix_tokens for t in restored.templates())


def test_an_engine_tokenizer_is_used_and_its_failures_are_survived():
    calls = []

    def tokenize(ex):
        calls.append(ex.id)
        if len(calls) == 3:
            raise RuntimeError("engine is restarting")
        return [len(m.get("content") or "") % 97 for m in ex.messages] + [7] * 10

    learner = Learner(tokenize=tokenize)
    system = {"role": "system", "content": "You are a helpful assistant for an airline."}
    for i in range(6):
        learner.observe(chat([system, {"role": "user", "content": f"question {i}"}], say("answer"), started=i))
    assert len(calls) == 6 and learner.skipped["tokenizer"] == 1 and learner.observed == 6
    assert learner.radix.match(tokenize(chat([system], None)) [:1]).length == 1


def test_predictions_carry_prefixes_and_expected_arrival():
    learner = Learner()
    system = {"role": "system", "content": "You are a research agent. " * 20}
    for i in range(6):
        task = {"role": "user", "content": f"Research task number {i}: find the facts about topic {i}."}
        ask = tool_call("search", f"c{i}")
        t0 = 1000.0 * i
        first = chat([system, task], ask, started=t0, done=2.0)
        preds = learner.observe(first)
        second = chat([system, task, ask, {"role": "tool", "tool_call_id": f"c{i}", "content": "results"}],
                      say("done"), started=t0 + 4.0)
        learner.observe(second)
    top = preds[0]
    assert top.kind == CONTINUE and top.template == learner.template_of(second.id)
    assert top.prefix == learner.tokenizer.prompt(first.messages, None, [])
    assert top.probability >= 0.9 and top.expected_in == pytest.approx(2.0, abs=1.0)
    assert top.expected_at == pytest.approx(first.started_at + 2.0 + top.expected_in)


def test_learning_an_8k_token_exchange_is_cheap():
    import random
    import time

    rng = random.Random(1)
    words = "market revenue growth margin risk policy customer supply demand contract".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    system = {"role": "system", "content": text(1100)}
    learner, costs = Learner(), []
    for s in range(8):
        messages = [system, {"role": "user", "content": text(4000)}]
        for step in range(8):
            ex = chat(messages, say(text(50)), started=1000.0 * s + 10 * step)
            t = time.perf_counter()
            learner.observe(ex)
            costs.append(time.perf_counter() - t)
            messages = messages + [ex.answer, {"role": "user", "content": text(40)}]
    assert sorted(costs)[len(costs) // 2] < 0.004  # ~0.5 ms here; bench/learn_eval.py reports it


def test_memory_stays_bounded_under_long_traffic():
    import random
    import tracemalloc

    cfg = LearnConfig(session_window=400, calls_window=400, flow_window=200, radix_tokens=60_000,
                      max_templates=300, max_call_templates=100, max_nodes=100, max_edges=300,
                      cached_messages=500, cached_tokens=50_000, prefix_tokens=30_000)
    learner = Learner(config=cfg)
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi pi".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    agents = [{"role": "system", "content": f"You are agent {a}. " + text(150)} for a in range(40)]
    sizes, memory = [], []
    tracemalloc.start()
    try:
        t = 0.0
        for _ in range(4):
            for _ in range(200):
                t += 3.0
                messages = [rng.choice(agents), {"role": "user", "content": text(rng.randint(20, 200))}]
                for step in range(rng.randint(1, 4)):
                    answer = tool_call(rng.choice(["a", "b", "c"]), f"c{t}{step}") if step < 2 else say(text(30))
                    learner.observe(chat(messages, answer, started=t + step))
                    messages = messages + [answer, {"role": "tool", "tool_call_id": f"c{t}{step}",
                                                    "content": text(30)}]
            sizes.append(learner.sizes())
            memory.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    last = sizes[-1]
    assert last["radix_tokens"] <= cfg.radix_tokens and last["linker"] <= cfg.session_window
    assert last["calls"] <= cfg.calls_window and last["flow_answers"] <= cfg.flow_window
    assert last["message_templates"] <= cfg.max_templates and last["call_templates"] <= cfg.max_call_templates
    assert last["nodes"] <= cfg.max_nodes and last["edges"] <= cfg.max_edges
    assert 0 <= last["prefix_ids"] <= cfg.prefix_tokens
    assert memory[3] < 1.1 * memory[2], f"memory still growing: {memory}"
    assert Counter(learner.skipped) == Counter()


def test_a_session_seen_before_a_restart_is_not_counted_again():
    """A template seen in one session stays a one-session template after the learned
    snapshot is read back and that session sends it again."""
    from learn.calls import CallRegistry
    from learn.templates import TemplateMiner

    miner = TemplateMiner()
    registry = CallRegistry(miner)
    tid = registry.assign("/v1/chat/completions", [{"role": "user", "content": "hi"}], ["m1"], [],
                          "session-a", None)
    cid = miner.mine("user", "Summarise the quarterly report for the board.", "k1", "session-a")
    miner2 = TemplateMiner.restore(miner.snapshot(min_messages=1))
    registry2 = CallRegistry(miner2)
    registry2.restore(registry.snapshot())
    assert registry2.assign("/v1/chat/completions", [{"role": "user", "content": "hi"}], ["m1"],
                            [], "session-a", None) == tid
    assert miner2.mine("user", "Summarise the quarterly report for the board.", "k1",
                       "session-a") == cid
    assert registry2.get(tid).sessions == 1 and miner2.get(cid).sessions == 1
    miner2.mine("user", "Summarise the quarterly report for the board.", "k1", "session-b")
    assert miner2.get(cid).sessions == 2
