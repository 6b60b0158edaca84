"""`preheat sessions` and `preheat show` read what the proxy captured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.cli import ERROR_BODY_CHARS, main
from storage.store import Store

ROOT = Path(__file__).resolve().parents[2]


async def _capture_two_sessions(proxy) -> None:
    async with httpx.AsyncClient() as client:
        for sid in ("alpha", "beta"):
            for i in range(2):
                await client.post(proxy.url + "/v1/chat/completions", headers={"X-Session-ID": sid},
                                  json={"model": "m", "messages": [{"role": "user", "content": f"{sid} {i}"}]})
    await proxy.observer.flush()


async def test_sessions_and_show(proxy, capsys):
    await _capture_two_sessions(proxy)
    assert main(["sessions", "--json", "--db", proxy.db]) == 0
    sessions = json.loads(capsys.readouterr().out)
    assert {s["id"]: len(s["exchanges"]) for s in sessions} == {"alpha": 2, "beta": 2}
    assert all(s["source"] == "header:x-session-id" for s in sessions)

    assert main(["sessions", "--db", proxy.db]) == 0
    table = capsys.readouterr().out
    assert "alpha" in table and "beta" in table

    first = sessions[0]["exchanges"][0]
    assert main(["show", first, "--json", "--db", proxy.db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == first and shown["status"] == 200
    assert shown["request"]["messages"][0]["content"].endswith("0")

    assert main(["show", "alpha", "--db", proxy.db]) == 0
    assert "session alpha" in capsys.readouterr().out
    assert main(["show", "beta", "--json", "--db", proxy.db]) == 0
    assert len(json.loads(capsys.readouterr().out)["calls"]) == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_show_says_why_a_call_failed_and_shows_a_plain_input(proxy, capsys, stream):
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    async with httpx.AsyncClient() as client:
        failed = await client.post(proxy.url + "/v1/chat/completions", json=chat,
                                   headers={"x-fake-status": "404", "X-Session-ID": "bad"})
        assert failed.status_code == 404
        await client.post(proxy.url + "/v1/responses", headers={"X-Session-ID": "plain"},
                          json={"model": "m", "input": "a plain string input"})
    store = await proxy.store()
    try:
        bad, plain = store.session("bad")["exchanges"], store.session("plain")["exchanges"]
    finally:
        store.close()
    assert main(["show", bad[0], "--json", "--db", proxy.db]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == 404 and "fake failure 404" in shown["error_body"]
    assert main(["show", bad[0], "--db", proxy.db]) == 0
    assert "fake failure 404" in capsys.readouterr().out

    assert main(["show", plain[0], "--db", proxy.db]) == 0
    out = capsys.readouterr().out
    assert "[input] a plain string input" in out and "response:" not in out  # 200: no body shown


def test_a_long_error_body_is_cut(tmp_path, capsys):
    from proxy.exchange import Exchange

    db = f"sqlite:///{tmp_path}/e.db"
    ex = Exchange(method="POST", path="/v1/chat/completions", status=500,
                  request_headers=[("content-type", "application/json")],
                  request_body=b'{"model": "m", "messages": []}',
                  response_headers=[("content-type", "text/plain")],
                  response_chunks=[(0.01, b"x" * 5000)], t_done=0.01)
    store = Store(db)
    store.write([ex])
    store.close()
    assert main(["show", ex.id, "--json", "--db", db]) == 0
    body = json.loads(capsys.readouterr().out)["error_body"]
    assert body == "x" * ERROR_BODY_CHARS + "…"


@pytest.mark.parametrize("argv", [
    ["sessions"], ["show", "s-1"], ["templates"], ["workflows"], ["learn"],
    ["replay", "--target", "http://127.0.0.1:9"],
])
def test_readers_refuse_a_missing_store_and_create_none(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREHEAT_DB", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"no capture store at {tmp_path / 'preheat.db'}" in err and "--db" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["show", "nope"], "no exchange or session with id 'nope'"),
    (["sessions", "--db", "sqlite:////nonexistent/dir/x.db"],
     "no capture store at /nonexistent/dir/x.db"),
    (["serve", "--upstream", "http://127.0.0.1:9"],
     "PREHEAT_LOG_LEVEL='verbose' is not a valid level"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREHEAT_DB", raising=False)
    monkeypatch.setenv("PREHEAT_LOG_LEVEL", "verbose")
    Store("sqlite:///preheat.db").close()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`preheat sessions | head`: the reader left before the output was written."""
    db = f"sqlite:///{tmp_path}/p.db"
    Store(db).close()
    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails, as once `head` has exited
    try:
        done = subprocess.run([sys.executable, "-m", "proxy.cli", "sessions", "--db", db],
                              stdout=write, stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == b""
