"""Admission in the proxy: under pressure nothing is lost, duplicated, reordered or starved."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from engine.admission import Admission, prompt_chain
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.server import ADMISSION, ENGINE, _ticket, queued_seconds
from tests.conftest import StandInEngine, start_proxy

SYSTEM = {"role": "system", "content": "You are a careful agent. " * 20}


async def _session(client: httpx.AsyncClient, url: str, i: int, calls: int,
                   timings: list[str] | None = None) -> list[str]:
    messages = [SYSTEM, {"role": "user", "content": f"task {i} " + "detail " * 80}]
    seen = []
    for step in range(calls):
        r = await client.post(url + "/v1/chat/completions", json={
            "model": "m", "messages": messages, "temperature": 0.5},
            headers={"x-fake-delay": "0.02"})
        assert r.status_code == 200
        answer = r.json()["choices"][0]["message"]
        seen.append(r.json()["id"])
        if timings is not None:
            timings.append(r.headers.get("server-timing", ""))
        messages = messages + [{"role": "assistant", "content": answer["content"]},
                               {"role": "user", "content": f"tool output {step}"}]
        await asyncio.sleep(0.01)
    return seen


async def test_pressure_loses_nothing_and_keeps_session_order(upstream, tmp_path):
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1500, admission_max_wait=1.0, prewarm=False)
    proxy = await start_proxy(settings)
    try:
        admission = proxy.app[ADMISSION]
        start = time.monotonic()
        timings: list[str] = []
        async with httpx.AsyncClient(timeout=30) as client:
            results = await asyncio.gather(*(_session(client, proxy.url, i, 4, timings)
                                             for i in range(12)))
        elapsed = time.monotonic() - start
        stats = admission.stats()
        assert upstream.requests == 48  # every call reached the upstream exactly once
        assert all(len(set(r)) == 4 for r in results)
        held_back = ("waited", "backfill", "returned", "idle", "timeout")  # went in after a wait
        assert sum(stats.admitted.get(k, 0) for k in held_back) > 0
        assert stats.max_wait_seen < 1.0 + 0.25  # the bound held
        # Every answer tells its client how long admission held it, and why it went in.
        waits = [re.fullmatch(r'preheat-queue;dur=([0-9.]+);desc="(\w+)"', t) for t in timings]
        assert len(waits) == 48 and all(waits), timings[:3]
        held = [float(m[1]) for m in waits if m[2] in held_back]
        assert held and max(held) > 0
        assert max(float(m[1]) for m in waits) <= 1000 * stats.max_wait_seen + 1
        assert queued_seconds(timings[0]) == float(waits[0][1]) / 1000  # (bench/e2e.py reads it)
        assert elapsed < 30
        # Twelve sessions outgrow the cache mid-way: the youngest were set aside, and still
        # every call went through once, in order.
        assert admission.suspended > 0
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(proxy.url + "/metrics")).text
        assert f"preheat_admission_suspended_total {admission.suspended}" in metrics
        # How long admission held each call, as a histogram: every call, none past the bound.
        assert "preheat_admission_wait_seconds_count 48" in metrics
        assert 'preheat_admission_wait_seconds_bucket{le="2.5"} 48' in metrics
        at_once = int(re.search(r'preheat_admission_wait_seconds_bucket\{le="0.01"\} (\d+)',
                                metrics)[1])
        assert 0 < at_once < 48  # most went at once; some waited
        total = float(re.search(r"preheat_admission_wait_seconds_sum (\S+)", metrics)[1])
        assert total == pytest.approx(sum(float(m[1]) for m in waits) / 1000, abs=0.01)
        # Captured order of each session is the order its calls were made.
        store = await proxy.store()
        for s in store.sessions():
            calls = list(store.exchanges(session_id=s["id"]))
            assert [c.started_at for c in calls] == sorted(c.started_at for c in calls)
            assert [len(c.messages) for c in calls] == [2, 4, 6, 8]
        # The capture keeps when each call went upstream (the admin timeline draws the hold).
        sent = [c.t_upstream_sent for s in store.sessions()
                for c in store.exchanges(session_id=s["id"])]
        assert max(sent) >= max(held) / 1000
        # ...and the latency preheat added is its own work, the hold apart.
        added = [c.added_latency for s in store.sessions()
                 for c in store.exchanges(session_id=s["id"])]
        assert max(added) < max(held) / 1000
    finally:
        await proxy.runner.cleanup()


async def test_clients_that_give_up_or_hang_up_cost_the_others_nothing(upstream, tmp_path):
    """Amid twelve sessions outgrowing the cache, some clients time out while their calls
    wait for admission, and some hang up mid-stream: every other call still goes through
    once, within the bound, and once the crowd has gone admission holds nothing
    for the calls that left."""
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1500, admission_max_wait=1.0,
                        admission_guests=True, prewarm=False)
    proxy = await start_proxy(settings)
    url = proxy.url + "/v1/chat/completions"

    async def impatient(client: httpx.AsyncClient, i: int) -> str:
        for _ in range(500):  # until calls queue: then this one will too
            if admission.stats().waiting:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02 * i)
        try:
            r = await client.post(url, timeout=0.1, json={
                "model": "m", "temperature": 0.5,
                "messages": [{"role": "user", "content": f"impatient {i} " + "x " * 2400}]})
            return f"answered {r.status_code}"
        except httpx.TimeoutException:
            return "gave up"

    async def hangs_up(client: httpx.AsyncClient, i: int) -> str:
        await asyncio.sleep(0.05 * i)
        async with client.stream("POST", url, headers={"x-fake-delay": "0.05",
                                                       "x-fake-events": "40"}, json={
                "model": "m", "temperature": 0.5, "stream": True,
                "messages": [{"role": "user", "content": f"hangs up {i} " + "y " * 300}]}) as r:
            async for _ in r.aiter_lines():
                break  # the first event, then gone
        return f"hung up {r.status_code}"

    admission = proxy.app[ADMISSION]
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            ends = await asyncio.gather(*(_session(client, proxy.url, i, 4) for i in range(12)),
                                        *(impatient(client, i) for i in range(6)),
                                        *(hangs_up(client, i) for i in range(4)))
        assert all(len(set(r)) == 4 for r in ends[:12])  # the patient ones all answered
        assert "gave up" in ends[12:18] and ends[18:] == ["hung up 200"] * 4
        assert admission.stats().max_wait_seen < 1.0 + 0.25
        await asyncio.sleep(0.3)  # the hung-up streams' handlers finish
        assert admission.stats().waiting == 0
        assert admission._in_flight == 0 and admission.guest_calls == 0
        assert all(not g.in_flight for g in admission._groups.values())
        async with httpx.AsyncClient() as client:  # and the proxy serves on
            r = await client.post(url, json={"model": "m", "messages": [
                {"role": "user", "content": "after the crowd"}]})
        assert r.status_code == 200
    finally:
        await proxy.runner.cleanup()


async def test_admission_stays_off_without_a_known_cache(proxy):
    assert ADMISSION not in proxy.app  # the fake upstream reports no KV cache


async def test_under_pressure_sessions_under_way_go_first_on_the_engine(upstream, tmp_path):
    """Admission's order reaches vLLM as `priority`; a client's own priority wins, the
    capture keeps the client's request as sent, and the switch turns it off."""
    for enabled in (True, False):
        upstream.priorities.clear()
        settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p{enabled}.db",
                            admission_capacity_tokens=1500, admission_max_wait=1.0,
                            admission_priority=enabled, prewarm=False)
        proxy = await start_proxy(settings)
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                own = client.post(proxy.url + "/v1/chat/completions", json={
                    "model": "m", "messages": [SYSTEM, {"role": "user", "content": "mine"}],
                    "priority": 7, "temperature": 0.5})
                *_, mine = await asyncio.gather(
                    *(_session(client, proxy.url, i, 4) for i in range(12)), own)
            assert mine.status_code == 200
            seen = upstream.priorities
            assert len(seen) == 49 and seen.count(7) == 1  # the client's own, untouched
            if enabled:
                assert seen.count(-1) > 0 and set(seen) <= {None, -1, 7}
            else:
                assert set(seen) == {None, 7}
            store = await proxy.store()
            captured = [c.request_object() for c in store.exchanges()]
            assert len(captured) == 49
            assert sum("priority" in r for r in captured) == 1  # only the client's
        finally:
            await proxy.runner.cleanup()


async def test_without_pressure_the_engine_gets_requests_as_sent(upstream, tmp_path):
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1_000_000, prewarm=False)
    proxy = await start_proxy(settings)
    try:
        upstream.priorities.clear()
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(_session(client, proxy.url, i, 3) for i in range(4)))
        assert upstream.priorities == [None] * 12
        assert proxy.app[ADMISSION].stats().admitted.get("resident", 0) > 0
    finally:
        await proxy.runner.cleanup()


async def test_calls_held_when_the_engine_dies_are_told_to_retry(upstream, tmp_path):
    """A call admission let go after the engine died gets the 503 of an engine restarting,
    not the 502 of sending it to a dead engine."""
    engine = StandInEngine(upstream.url)
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                                       admission_capacity_tokens=2000, admission_max_wait=1,
                                       prewarm=False), before=[engine.embedded()])
    url = proxy.url + "/v1/chat/completions"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.ensure_future(client.post(url, headers={"x-fake-delay": "2"}, json={
                "model": "m", "messages": [SYSTEM, {"role": "user", "content": "A " * 3000}]}))
            await asyncio.sleep(0.3)
            held = asyncio.ensure_future(client.post(url, json={
                "model": "m", "messages": [{"role": "user", "content": "B " * 3000}]}))
            await asyncio.sleep(0.3)
            assert not held.done()
            engine.ready, engine.state = False, "restarting"
            r = await held
            assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
            await first
    finally:
        await proxy.runner.cleanup()


async def test_the_prompt_cache_answers_while_the_engine_restarts(upstream, tmp_path):
    engine = StandInEngine(upstream.url)
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                                       prewarm=False), before=[engine.embedded()])
    url = proxy.url + "/v1/chat/completions"
    call = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.post(url, json=call)
            assert first.status_code == 200 and first.headers["X-Preheat-Cache"] == "MISS"
            engine.ready, engine.state = False, "restarting"
            again = await client.post(url, json=call)
            assert again.status_code == 200 and again.headers["X-Preheat-Cache"] == "HIT"
            assert again.content == first.content
            other = await client.post(url, json={**call, "messages": [
                {"role": "user", "content": "something else"}]})
            assert other.status_code == 503 and "restarting" in other.json()["error"]["message"]
        assert upstream.requests == 1
    finally:
        await proxy.runner.cleanup()


def test_one_tenants_session_id_never_lets_anothers_calls_in():
    adm = Admission(1000)
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'

    def group(key: str, session: str = "1") -> str:
        ex = Exchange(method="POST", path="/v1/chat/completions", request_body=body,
                      request_headers=[("Authorization", f"Bearer {key}"),
                                       ("X-Session-ID", session)])
        return _ticket(adm, ex).group

    assert group("sk-a") == group("sk-a") != group("sk-b")
    assert group("sk-a", "s" * 8000) != group("sk-a", "s" * 7999)
    assert len(group("sk-a", "s" * 8000)) < 40  # what admission remembers of a session: its id


async def test_a_body_too_deep_to_parse_is_forwarded_as_sent(upstream, tmp_path):
    """Admission looks inside each request; one it cannot read goes on unchanged, and the
    upstream, not preheat, answers it."""
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1_000_000, prewarm=False)
    proxy = await start_proxy(settings)
    deep = b'{"model":"m","temperature":0,"messages":[{"role":"user","content":' + \
        b"[" * 1100 + b"]" * 1100 + b"}]}"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(proxy.url + "/v1/chat/completions", content=deep,
                                  headers={"Content-Type": "application/json", "x-marker": "deep"})
            assert upstream.last_headers.get("x-marker") == "deep"
            ok = await client.post(proxy.url + "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert ok.status_code == 200
        assert r.status_code == 400 and r.json()["error"]["message"] == "body is not JSON"
        assert "X-Preheat-Cache" not in r.headers
        (bad, _) = (await proxy.store()).exchanges()
        assert bad.request_body == deep and "too deeply" in bad.request_error
    finally:
        await proxy.runner.cleanup()


async def test_a_call_reading_another_agents_answer_joins_its_workflow_run(upstream, tmp_path):
    """Ordering's runs through the proxy: the observer reports each answer's chunks, and a
    new agent whose prompt pastes that answer is placed in the same run on arrival."""
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/r.db",
                        admission_capacity_tokens=1_000_000, prewarm=False)
    proxy = await start_proxy(settings)
    try:
        runs = proxy.app[ADMISSION].runs

        async def call(client, system: str, user: str) -> str:
            r = await client.post(proxy.url + "/v1/chat/completions", json={
                "model": "m", "temperature": 0.5, "messages": [
                    {"role": "system", "content": system}, {"role": "user", "content": user}]},
                headers={"x-fake-events": "40"})
            assert r.status_code == 200
            return r.json()["choices"][0]["message"]["content"]

        async with httpx.AsyncClient(timeout=30) as client:
            answer = await call(client, "You are the market expert.", "Assess the outlook.")
            for _ in range(200):  # the observer reports the answer beside the hot path
                if any(r.service for r in runs.active()):
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.6)  # past the window of agents launched together
            await call(client, "You are an unrelated agent.", "Something else entirely.")
            await asyncio.sleep(0.6)
            await call(client, "You summarise reports.", f"Report:\n{answer}\nSummarise it.")
            metrics = (await client.get(proxy.url + "/metrics")).text
        assert "preheat_ordering_runs 2" in metrics
        assert "preheat_ordering_held_total 0" in metrics
        calls = sorted(r.calls for r in runs.active())
        assert calls == [1, 2]  # the summariser joined the expert's run, not a new one
    finally:
        await proxy.runner.cleanup()


async def test_what_admission_learned_survives_a_restart(upstream, tmp_path):
    """Admission's snapshot is saved with the learner's when the proxy stops, and read back
    when it starts: after a restart the sizes and lengths of the agents' sessions are known
    before any session has finished."""
    learned = Admission(100_000, hold=0.05)
    sizes = {"finished": [[900 + i, 4, "agent-a"] for i in range(3)] + [[120, 1, "agent-b"]],
             "gaps": [0.5, 0.8, 1.0, 1.2, 2.0], "chars_per_token": 3.2, "runs": [],
             "version": learned.snapshot()["version"]}
    assert learned.restore(sizes) == 4
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/r.db",
                        admission_capacity_tokens=100_000, prewarm=False, ordering=False)
    first = await start_proxy(settings)
    try:
        assert first.app[ADMISSION].expected_calls("agent-a") == 0  # a new store: nothing
        first.app[ADMISSION].restore(learned.snapshot())
        async with httpx.AsyncClient(timeout=30) as client:
            await _session(client, first.url, 0, 2)  # traffic, and learning, go on as ever
    finally:
        await first.runner.cleanup()
    second = await start_proxy(settings)
    try:
        admission = second.app[ADMISSION]
        assert admission.expected_calls("agent-a") == 4
        assert admission.expected_footprint("agent-a") == 901  # upper quartile of 900-902
        assert admission.expected_calls("agent-b") == 1
        assert admission.chars_per_token == pytest.approx(3.2, abs=0.2)
    finally:
        await second.runner.cleanup()


async def test_guests_run_at_once_with_their_blocks_marked_to_go_first(upstream, tmp_path):
    """With guests on, sessions that do not fit run at once, each call asking the engine to
    evict its blocks first (past the head it shares with the resident sessions); a client's
    own vllm_xargs wins, and the capture keeps every request as the client sent it. So does
    the last call of a resident session, as the learned sessions make four."""
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/g.db",
                        admission_capacity_tokens=1500, admission_max_wait=30.0,
                        admission_guests=True, admission_guest_busy_below=1.0, prewarm=False)
    proxy = await start_proxy(settings)
    try:
        # As if learned: these sessions grow to 500 tokens of their own, so three fit.
        agent = prompt_chain({"messages": [SYSTEM]})[0][0]
        proxy.app[ADMISSION].restore({"version": 1, "finished": [[500, 4, agent]] * 5,
                                      "gaps": [], "chars_per_token": 3.6, "runs": []})
        async with httpx.AsyncClient(timeout=30) as client:
            upstream.xargs.clear()
            own = client.post(proxy.url + "/v1/chat/completions", json={
                "model": "m", "messages": [SYSTEM, {"role": "user", "content": "mine"}],
                "vllm_xargs": {"mine": 1}, "temperature": 0.5})
            *results, mine = await asyncio.gather(
                *(_session(client, proxy.url, i, 4) for i in range(12)), own)
        assert mine.status_code == 200 and len(upstream.xargs) == 49
        assert all(len(set(r)) == 4 for r in results)  # every call answered, once
        stats = proxy.app[ADMISSION].stats()
        guests = stats.admitted.get("guest", 0)
        assert guests > 0 and stats.max_wait_seen < 5
        hints = [x for x in upstream.xargs if x and "preheat_evict_first" in x]
        last = proxy.app[ADMISSION].last_calls  # resident sessions' fourth calls, their last
        assert last > 0  # (the client's own call may be a guest:)
        assert len(hints) in (guests + last, guests + last - 1)
        assert all(isinstance(x["preheat_evict_first"], int) for x in hints)
        assert upstream.xargs.count({"mine": 1}) == 1  # the client's own, untouched
        store = await proxy.store()
        captured = [c.request_object() for c in store.exchanges()]
        assert len(captured) == 49 and sum("vllm_xargs" in r for r in captured) == 1
    finally:
        await proxy.runner.cleanup()


async def test_guests_are_on_by_themselves_only_with_preheats_own_engine(upstream, tmp_path):
    # Another vLLM would not evict a guest's blocks first (no plugin): there guests would
    # evict the resident histories, so with --upstream they are off unless asked for.
    for asked, on in ((None, False), (True, True), (False, False)):
        settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/{asked}.db",
                            admission_capacity_tokens=1500, admission_guests=asked,
                            prewarm=False)
        proxy = await start_proxy(settings)
        try:
            assert proxy.app[ADMISSION].guests is on
            assert proxy.app[ADMISSION].evict_done is on  # as the hints, where guests are
        finally:
            await proxy.runner.cleanup()


def test_guests_stay_off_where_preheats_own_vllm_cannot_evict_them_first(monkeypatch, caplog):
    # The plugin replaces a private part of vLLM: on a version it was not tested on it
    # leaves vLLM as it is, and guests would evict the resident histories.
    from engine import vllm_plugin
    from proxy.lifecycle import _eviction_hints

    own, other = {ENGINE: object()}, {}
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.32.0")
    assert _eviction_hints(own, Settings()) is True
    assert _eviction_hints(other, Settings()) is False  # another vLLM, said nothing of
    assert _eviction_hints(other, Settings(admission_guests=True)) is True  # has the plugin
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.40.1")
    with caplog.at_level("WARNING", logger="preheat.proxy"):
        assert _eviction_hints(own, Settings()) is False
    assert "tested on vLLM 0.32.x, and this is 0.40.1" in caplog.text
    monkeypatch.setenv(vllm_plugin.ENV, "force")  # the user takes the risk
    assert _eviction_hints(own, Settings()) is True
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: None)
    assert _eviction_hints(own, Settings()) is False
