"""`preheat sessions` and `preheat show` read what the proxy captured."""

from __future__ import annotations

import json

import httpx
import pytest

from proxy.cli import main


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


@pytest.mark.parametrize("argv,message", [
    (["show", "nope"], "no exchange or session with id 'nope'"),
    (["sessions", "--db", "sqlite:////nonexistent/dir/x.db"], "cannot open the store"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
