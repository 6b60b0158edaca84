"""`preheat replay` against the in-process fake upstream: recorded order, concurrency and tool
gaps are kept, outputs are forced to their recorded length, and the report compares targets."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

import httpx
import pytest

from learn.learner import Learner
from proxy.cli import main
from proxy.cli_replay import register
from proxy.importer import read_trace
from proxy.replay import Progress, plan, run
from proxy.replay_report import PLOTS_MISSING, write_report
from tests.proxy.traffic import agent_loop

SYSTEM = {"role": "system", "content": "You are a travel agent. " * 20}


def _line(session: str, step: int, start: float, done: float, tokens: int) -> dict:
    messages = [SYSTEM, {"role": "user", "content": f"task {session}"}]
    for i in range(step):
        messages += [{"role": "assistant", "content": f"{session} answer {i}"},
                     {"role": "user", "content": f"{session} tool result {i}"}]
    answer = {"role": "assistant", "content": f"{session} answer {step}"}
    return {"session_id": session, "started_at": start, "timings": {"done": done},
            "request": {"model": "recorded-model", "messages": messages, "max_tokens": 999},
            "response": {"id": f"{session}{step}", "object": "chat.completion", "model": "m",
                         "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 50, "completion_tokens": tokens,
                                   "total_tokens": 50 + tokens}}}


@pytest.fixture
def trace(tmp_path) -> Path:
    """A: three calls with 0.4 s tool gaps; B: starts 0.1 s after A; C: one call, then two
    parallel calls, then one that waits for both."""
    lines = [
        _line("A", 0, 100.0, 0.2, 3), _line("A", 1, 100.6, 0.2, 4), _line("A", 2, 101.2, 0.2, 5),
        _line("B", 0, 100.1, 0.1, 2), _line("B", 1, 100.5, 0.1, 2),
        _line("C", 0, 100.0, 0.1, 2), _line("C", 1, 100.2, 0.2, 2), _line("C", 2, 100.2, 0.2, 2),
        _line("C", 3, 100.5, 0.1, 2),
    ]
    lines[7]["request"]["messages"][-1]["content"] += " (the other parallel call)"
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


async def test_order_gaps_and_concurrency_are_kept(trace, proxy):
    sessions = plan(read_trace(trace).exchanges, model="served-model")
    assert [s.id for s in sessions] == ["A", "C", "B"]
    result = await run(sessions, proxy.url, speed=2.0)
    assert [c.error for c in result.calls] == [None] * 9
    calls = {(c.session, c.index): c for c in result.calls}
    a = [calls[("A", i)] for i in range(3)]
    for prev, nxt in zip(a, a[1:]):
        assert 0.2 * 0.9 <= nxt.start - prev.end < 0.2 + 0.15  # 0.4 s recorded, at speed 2
    b0 = calls[("B", 0)]
    assert 0.05 * 0.9 <= b0.start - a[0].start < 0.05 + 0.1  # sessions overlap as recorded
    c = [calls[("C", i)] for i in range(4)]
    assert abs(c[1].start - c[2].start) < 0.03  # the parallel pair starts together
    assert c[3].start >= max(c[1].end, c[2].end) + 0.05 * 0.9
    assert all(x.ttft is not None and x.ttft <= x.end - x.start for x in result.calls)

    # What the target received: recorded output lengths, forced; streamed; the new model.
    store = await proxy.store()
    try:
        sent = {ex.request_json["messages"][1]["content"] + str(len(ex.messages)): ex.request_json
                for ex in store.exchanges()}
    finally:
        store.close()
    first = sent["task A2"]
    assert first["max_tokens"] == 3 and first["ignore_eos"] is True and first["stream"] is True
    assert first["model"] == "served-model"
    assert sent["task A6"]["max_tokens"] == 5
    # The target wrote its own answers, the replay sent the recorded ones; each session's
    # calls are still one session there.
    store = await proxy.store()
    try:
        by_task = {}
        for s in store.sessions():
            tasks = {ex.request_json["messages"][1]["content"]
                     for ex in store.exchanges(session_id=s["id"])}
            assert len(tasks) == 1
            by_task[tasks.pop()] = len(s["exchanges"])
    finally:
        store.close()
    assert by_task == {"task A": 3, "task B": 2, "task C": 4}


async def test_compare_writes_both_columns_and_plots(trace, upstream, proxy, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["replay", "--trace", str(trace), "--compare", upstream.url, proxy.url,
            "--speed", "4", "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    text = (out / "report.md").read_text()
    assert f"A ({upstream.url})" in text and f"B ({proxy.url})" in text and "B / A" in text
    for png in ("latency_per_session.png", "ttft_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    data = json.loads((out / "report.json").read_text())
    assert {k: (v["calls"], v["errors"]) for k, v in data["summary"].items()} == \
        {"A": (9, 0), "B": (9, 0)}
    captured = capsys.readouterr()
    assert "9/9 calls" in captured.err and "replayed 3 sessions, 9 calls" in captured.out


async def test_replay_captured_sessions_by_id_and_by_workflow(proxy, upstream, tmp_path, capsys):
    async with httpx.AsyncClient() as client:
        await agent_loop(client, proxy.url, "airline", "book a flight", 3, tool_time=0.05)
        await agent_loop(client, proxy.url, "airline", "cancel it", 2, tool_time=0.05)
    store = await proxy.store()
    try:
        sessions = store.sessions()
        learner = Learner()
        for ex in store.exchanges():
            learner.observe(ex)
        workflow = learner.workflows()[0].id
    finally:
        store.close()
    longest = max(sessions, key=lambda s: len(s["exchanges"]))
    argv = ["replay", "--db", proxy.db, "--session", longest["id"], "--target", upstream.url,
            "--out", str(tmp_path / "one")]
    assert await asyncio.to_thread(main, argv) == 0
    assert "replayed 1 sessions, 3 calls per target (0 errors)" in capsys.readouterr().out
    argv = ["replay", "--db", proxy.db, "--workflow", workflow, "--target", upstream.url,
            "--speed", "10", "--out", str(tmp_path / "flow")]
    assert await asyncio.to_thread(main, argv) == 0
    assert "replayed 2 sessions, 5 calls" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["replay", "--db", proxy.db, "--session", "nope",
                                          "--target", upstream.url]) == 2
    assert "no captured session 'nope'" in capsys.readouterr().err


def _runs_file(path: Path, runs: int = 3) -> Path:
    """An untimed trajectory file, as `preheat import` reads (it names no model)."""
    path.write_text(json.dumps([
        {"traj": [{"role": "user" if k % 2 == 0 else "assistant", "content": f"run {r} turn {k}"}
                  for k in range(4)]} for r in range(runs)]))
    return path


def test_imported_untimed_sessions_are_staggered_beside_timed_ones(trace, tmp_path):
    imported = read_trace(_runs_file(tmp_path / "runs.json")).exchanges
    sessions = plan(read_trace(trace).exchanges + imported, stagger=0.5)
    offsets = {s.id: s.offset for s in sessions}
    assert [offsets[k] for k in "ABC"] == pytest.approx([0.0, 0.1, 0.0])  # timed: as recorded
    untimed = [s.offset for s in sessions if s.id not in {"A", "B", "C"}]
    assert untimed == [0.0, 0.5, 1.0]  # not the made-up minute between imported runs
    assert all(c.gap < 0.01 for s in sessions if s.id not in {"A", "B", "C"} for c in s.calls)


async def test_an_imported_trace_needs_a_model(tmp_path, upstream, capsys):
    db = f"sqlite:///{tmp_path}/i.db"
    assert main(["import", str(_runs_file(tmp_path / "runs.json")), "--db", db]) == 0
    capsys.readouterr()
    argv = ["replay", "--db", db, "--target", upstream.url, "--out", str(tmp_path / "r")]
    assert await asyncio.to_thread(main, argv) == 2
    err = capsys.readouterr().err
    assert "'imported'" in err and "pass --model" in err
    assert not (tmp_path / "r").exists()  # said up front: nothing was sent


async def test_when_every_call_fails_replay_says_why_and_fails(trace, tmp_path, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    argv = ["replay", "--trace", str(trace), "--target", dead, "--speed", "10",
            "--out", str(tmp_path / "r")]
    assert await asyncio.to_thread(main, argv) == 1
    captured = capsys.readouterr()
    assert "(9 errors)" in captured.out
    assert "9 of 9 calls failed: ClientConnectorError" in captured.err
    assert (tmp_path / "r" / "ttft_cdf.png").exists()  # plotted, without a legend warning


def test_the_default_report_folder_is_ignored_by_git():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = parser.parse_args(["replay", "--target", "http://x"]).out
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert f"{out}/" in ignored or f"/{out}/" in ignored


async def test_without_matplotlib_the_report_says_so(trace, upstream, tmp_path, monkeypatch):
    sessions = plan(read_trace(trace).exchanges)[:1]
    result = await run(sessions, upstream.url, speed=10, progress=Progress(3, "t", sys.stderr))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    report, note = write_report({"target": result}, tmp_path, {
        "source": "t", "sessions": 1, "calls": 3, "speed": 10, "force_length": True})
    assert note == PLOTS_MISSING and "pip install 'preheat[report]'" in report.read_text()
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.json").exists()
