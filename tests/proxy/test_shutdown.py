"""`preheat serve` as users run it: a real process, stopped mid-traffic by SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import httpx
import pytest

from engine.process import free_port
from storage.store import Store


async def _start(upstream_url: str, db: str,
                 env: dict | None = None) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "serve", "--upstream", upstream_url,
        "--port", str(port), "--db", db,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(url + "/healthz")).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError((await proc.stdout.read()).decode())


def _sigterm(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)


def _ctrl_c(proc: asyncio.subprocess.Process) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # a terminal signals the whole process group


@pytest.mark.parametrize("stop", [_sigterm, _ctrl_c], ids=["SIGTERM", "Ctrl-C"])
async def test_stopping_finishes_in_flight_calls_and_loses_no_capture(upstream, tmp_path, stop):
    db = f"sqlite:///{tmp_path}/shutdown.db"
    proc, url = await _start(upstream.url, db)

    async def slow_stream(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": f"s{i}"}]}
        r = await client.post(url + "/v1/chat/completions", json=body,
                              headers={"x-fake-delay": "0.1", "x-fake-events": "8"})
        return r.text.count("data: ")

    async def quick(client: httpx.AsyncClient, i: int) -> int:
        r = await client.post(url + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]})
        return r.status_code

    async with httpx.AsyncClient(timeout=30) as client:
        quick_results = await asyncio.gather(*(quick(client, i) for i in range(30)))
        streams = [asyncio.create_task(slow_stream(client, i)) for i in range(20)]
        await asyncio.sleep(0.3)  # the streams are mid-flight now
        stop(proc)
        stream_results = await asyncio.gather(*streams)
    output = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
    assert await asyncio.wait_for(proc.wait(), 30) == 0, output
    assert quick_results == [200] * 30
    assert stream_results == [11] * 20  # every in-flight stream finished whole
    assert "shutting down: 20 calls in flight" in output  # what it is waiting for, and why
    assert "captures written: 50 this run" in output
    store = Store(db)
    assert store.count()["exchanges"] == 50
    assert all(ex.error is None for ex in store.exchanges())


async def test_calls_waiting_for_admission_are_told_to_retry_at_once(upstream, tmp_path):
    """Stopping does not hold calls that never reached the engine through the grace period:
    they get a 503 to retry elsewhere, while the call on the engine finishes."""
    proc, url = await _start(upstream.url, f"sqlite:///{tmp_path}/p.db",
                             {"PREHEAT_ADMISSION_CAPACITY_TOKENS": "2000",
                              "PREHEAT_PREWARM": "0"})

    async def call(client: httpx.AsyncClient, text: str, delay: str = "0") -> httpx.Response:
        return await client.post(url + "/v1/chat/completions", headers={"x-fake-delay": delay},
                                 json={"model": "m", "messages": [
                                     {"role": "user", "content": text * 3000}]})

    async with httpx.AsyncClient(timeout=60) as client:
        running = asyncio.create_task(call(client, "A ", delay="3"))
        await asyncio.sleep(0.5)
        waiting = [asyncio.create_task(call(client, f"{c} ")) for c in "BCDE"]
        for _ in range(100):  # until all four wait (the cache is full of A)
            metrics = (await client.get(url + "/metrics")).text
            if "preheat_admission_waiting 4" in metrics:
                break
            await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting)
        stop = asyncio.get_running_loop().time()
        _sigterm(proc)
        told = await asyncio.gather(*waiting)
        answered_in = asyncio.get_running_loop().time() - stop
        assert (await running).status_code == 200
    assert [r.status_code for r in told] == [503] * 4 and answered_in < 1.5
    assert {r.json()["error"]["code"] for r in told} == {"shutting_down"}
    assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.mark.parametrize("serving", ["upstream", "engine"])
async def test_port_in_use_is_one_clear_line(upstream, tmp_path, serving):
    """Said at once: not after an engine has started (minutes, for a large model). The model
    named here does not exist, so an engine started first would fail on that instead."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    serve = (["--upstream", upstream.url] if serving == "upstream"
             else ["--model", str(tmp_path / "no-model")])
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "serve", *serve,
            "--port", str(port), "--db", f"sqlite:///{tmp_path}/x.db",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        sock.close()
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()
    assert "Traceback" not in err.decode()
