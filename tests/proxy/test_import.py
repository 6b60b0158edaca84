"""`preheat import`: external traces become exchanges that look like captured ones."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.importer import RUN_SPACING, TraceError, import_trace, read_trace
from storage.store import Store

WORKLOADS = Path(__file__).resolve().parents[2].parent / "shared" / "workloads"
TAU = WORKLOADS / "tau-bench-airline" / "gpt-4o-airline.json"
SWE = WORKLOADS / "swe-agent-demo" / "marshmallow-1867.traj"


@pytest.mark.skipif(not TAU.exists(), reason="../shared/workloads is not there")
def test_tau_bench_trajectories(db_url, capsys):
    db = db_url
    assert main(["import", str(TAU), "--db", db]) == 0
    assert "imported 2,454 calls in 200 sessions" in capsys.readouterr().out
    runs = json.loads(TAU.read_text())
    tools = json.loads((TAU.parent / "tools.json").read_text())
    store = Store(db)
    try:
        assert store.count()["exchanges"] == 2454
        sessions = store.sessions(limit=1000)
        assert len(sessions) == 200
        # Each run is one session, its calls in order: prompt traj[:k], answer traj[k].
        expected = sorted(sum(m["role"] == "assistant" for m in r["traj"]) for r in runs)
        assert sorted(len(s["exchanges"]) for s in sessions) == expected
        first_run = runs[0]["traj"]
        ks = [k for k, m in enumerate(first_run) if m["role"] == "assistant"]
        oldest = min(sessions, key=lambda s: s["first_at"])
        calls = list(store.exchanges(session_id=oldest["id"]))
        assert [c.messages for c in calls] == [first_run[:k] for k in ks]
        assert [c.answer for c in calls] == [first_run[k] for k in ks]
        assert all(c.tools == tools and c.status == 200 for c in calls)
        assert [c.session_source for c in calls] == \
            ["import:new"] + ["import:prefix"] * (len(calls) - 1)
        assert all(s["source"] == "import:new" for s in sessions)
    finally:
        store.close()
    assert main(["import", str(TAU), "--db", db]) == 0  # again: nothing new
    assert "imported 0 calls" in capsys.readouterr().out


@pytest.mark.skipif(not SWE.exists(), reason="../shared/workloads is not there")
def test_swe_agent_trajectory_keeps_tool_time():
    trace = read_trace(SWE)
    steps = json.loads(SWE.read_text())["trajectory"]
    assert trace.format == "swe-agent" and len(trace.exchanges) == len(steps)
    gaps = [b.started_at - a.started_at for a, b in zip(trace.exchanges, trace.exchanges[1:])]
    assert gaps == pytest.approx([s["execution_time"] + 0.001 for s in steps[:-1]], abs=1e-6)


@pytest.mark.parametrize("written", [-86_400.0, 3_600.0])  # a day ago; by a clock running ahead
def test_untimed_runs_are_dated_in_the_past(tmp_path, written):
    runs = [{"traj": [{"role": "user" if k % 2 == 0 else "assistant", "content": f"{r}.{k}"}
                      for k in range(6)]} for r in range(4)]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    now = time.time()
    os.utime(path, (now + written, now + written))
    trace = read_trace(path)
    assert all(ex.session_source.startswith("import:") for ex in trace.exchanges)
    starts = {}
    for ex in trace.exchanges:
        starts.setdefault(ex.session_id, []).append(ex.started_at)
    first = sorted(min(v) for v in starts.values())
    assert [b - a for a, b in zip(first, first[1:])] == pytest.approx([RUN_SPACING] * 3)
    # The last run ends a run's spacing before the file was written, or before now.
    assert max(ex.started_at for ex in trace.exchanges) < min(now, now + written) - RUN_SPACING + 1
    assert max(ex.started_at for ex in trace.exchanges) > min(now, now + written) - 2 * RUN_SPACING


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_of_requests_and_responses(tmp_path):
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    answer = {"role": "assistant", "content": "hello"}
    response = {"id": "c1", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}
    path = _jsonl(tmp_path / "calls.jsonl", [
        {"request": {"model": "m", "messages": first}, "response": response, "started_at": 100.0,
         "timings": {"first_token": 0.2, "done": 0.5}},
        {"model": "m", "messages": first + [answer, {"role": "user", "content": "and?"}]},
        {"custom_id": "x", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "Once upon"}},
        {"request": {"model": "m", "input": "solo"}, "session_id": "explicit"},
    ])
    trace = read_trace(path)
    assert trace.format == "jsonl"
    a, b, c, d = trace.exchanges
    assert a.answer == answer and a.usage["completion_tokens"] == 2 and a.t_done == 0.5
    assert (b.session_id, b.session_source, b.parent_id) == (a.session_id, "import:prefix", a.id)
    assert a.started_at == 100.0 and b.started_at < time.time() - RUN_SPACING  # as recorded; past
    assert c.path == "/v1/completions" and c.messages[0]["content"] == "Once upon"
    assert d.path == "/v1/responses" and d.session_id == "explicit"
    store = Store(f"sqlite:///{tmp_path}/j.db")
    try:
        result = import_trace(trace, store)
        assert (result.exchanges, result.sessions, result.present) == (4, 3, 0)
        back = store.exchange(a.id)
        assert back is not None and back.answer == answer and back.request_json["messages"] == first
    finally:
        store.close()


@pytest.mark.parametrize("text,message", [
    ("{not json\n", "line 1: not JSON"),
    ('[{"a": 1}]', "not of runs with a 'traj' message list"),
    ('{"model": "m"}\n', "none of messages, input or prompt"),
])
def test_bad_files_say_why(tmp_path, text, message, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_trace(path)
    assert main(["import", str(path), "--db", f"sqlite:///{tmp_path}/x.db"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not SWE.exists(), reason="../shared/workloads is not there")
def test_the_overview_counts_an_import_but_does_not_take_it_for_traffic(tmp_path):
    from proxy.admin import views
    from proxy.admin.queries import overview
    from tests.storage.test_retention import _call

    store = Store(f"sqlite:///{tmp_path}/p.db")
    try:
        now = time.time()
        store.write([_call("live", now - 30, "hi"), _call("live", now - 20, "hi", "more")])
        import_trace(read_trace(SWE), store)  # 13 calls, dated when the trace says
        d = overview(store)
        assert d["counts"]["exchanges"] == 15 and d["counts"]["imported"] == 13
        assert d["window"]["calls"] == 2 and d["window"]["last_at"] == pytest.approx(now - 20)
        assert d["routes"] == [{"path": "/v1/chat/completions", "status": 200, "calls": 2}]
        assert sum(d["per_minute"]) == 2
        text = str(views.overview({**d, "engine": None, "upstream": "u", "optimisations": []}))
        assert ">2</div><div class=\"k\">calls captured" in text
        assert ">13</div><div class=\"k\">calls imported" in text
    finally:
        store.close()
