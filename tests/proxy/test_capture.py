"""Capture: what reaches the store, once, without secrets, with its session."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from proxy.config import Settings
from storage.store import Store
from tests.conftest import start_proxy

SYSTEM = {"role": "system", "content": "You are an airline agent. " * 40}
TOOLS = [{"type": "function", "function": {"name": "get_user", "parameters": {
    "type": "object", "properties": {"user_id": {"type": "string"}}}}}]


async def _agent_loop(client: httpx.AsyncClient, url: str, steps: int, task: str,
                      headers: dict | None = None, stream: bool = False) -> list[dict]:
    """An agent loop as real frameworks run it: history grows by answer + tool result."""
    messages = [SYSTEM, {"role": "user", "content": task}]
    for i in range(steps):
        body = {"model": "m", "messages": messages, "tools": TOOLS, "stream": stream}
        r = await client.post(url + "/v1/chat/completions", json=body, headers=headers or {})
        assert r.status_code == 200
        if stream:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.text.splitlines()
                      if line.startswith("data: {")]
            call = next(d["tool_calls"][0] for d in deltas if d.get("tool_calls"))
            args = "".join(d["tool_calls"][0]["function"].get("arguments", "")
                           for d in deltas if d.get("tool_calls"))
            answer = {"role": "assistant", "content": None, "tool_calls": [{
                "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": args}}]}
        else:
            answer = r.json()["choices"][0]["message"]
            answer.pop("refusal", None)  # SDKs drop fields they do not resend
        call_id = answer["tool_calls"][0]["id"]
        messages = messages + [answer, {"role": "tool", "tool_call_id": call_id,
                                        "content": f"result {i} for {task}"}]
    return messages


async def test_agent_loops_are_linked_into_sessions_and_messages_stored_once(proxy_on_each_store):
    proxy = proxy_on_each_store
    async with httpx.AsyncClient() as client:
        await _agent_loop(client, proxy.url, 6, "book a flight")
        await _agent_loop(client, proxy.url, 4, "cancel a booking", stream=True)
    store = await proxy.store()
    sessions = store.sessions()
    assert sorted(len(s["exchanges"]) for s in sessions) == [4, 6]
    assert all(s["source"] == "new" for s in sessions)
    by_session = {s["id"]: list(store.exchanges(session_id=s["id"])) for s in sessions}
    for calls in by_session.values():
        assert [c.session_source for c in calls] == ["new"] + ["prefix"] * (len(calls) - 1)
        assert [c.parent_id for c in calls[1:]] == [c.id for c in calls[:-1]]
    # Content-addressed: the system prompt is stored once though sent 10 times; each loop's
    # history grows by two messages a call (answer + tool result) and each is stored once.
    counts = store.count()
    distinct = {json.dumps(m, sort_keys=True)
                for calls in by_session.values() for c in calls for m in c.messages}
    answers = {json.dumps(c.answer, sort_keys=True) for calls in by_session.values()
               for c in calls if c.answer}
    assert counts["messages"] == len(distinct | answers)
    assert counts["messages"] < sum(len(c.messages) for cs in by_session.values() for c in cs) / 2


async def test_stored_exchange_reads_back_whole(proxy):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/v1/chat/completions", json=body,
                              headers={"x-fake-delay": "0.05"})
    [ex] = list((await proxy.store()).exchanges())
    assert ex.request_json == body
    assert ex.status == 200 and ex.stream and ex.model == "m"
    streamed = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in r.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert ex.answer["content"] == streamed
    assert ex.usage["completion_tokens"] == 5
    assert [e["data"] for e in ex.events][-1] == "[DONE]"
    assert len(ex.events) == 9
    assert 0 < ex.t_upstream_sent < ex.t_upstream_headers <= ex.t_first_token < ex.t_done
    assert ex.t_first_token < ex.events[-1]["t"]  # the first token came before the end


async def test_secrets_never_reach_the_disk(proxy, tmp_path):
    secret = "sk-live-VERYSECRET-1234567890"
    async with httpx.AsyncClient() as client:
        for header in ({"Authorization": f"Bearer {secret}"}, {"api-key": secret},
                       {"Cookie": f"session={secret}"}, {"X-Api-Key": secret}):
            r = await client.post(proxy.url + "/v1/chat/completions", headers=header,
                                  json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200
    store = await proxy.store()
    exchanges = list(store.exchanges())
    assert len(exchanges) == 4
    tenants = [e.tenant for e in exchanges]
    assert tenants[0] == tenants[1] == tenants[3] is not None  # same key, same tenant
    assert tenants[2] is None
    await proxy.runner.cleanup()  # flush and close the database
    for f in Path(tmp_path).glob("preheat.db*"):
        assert secret.encode() not in f.read_bytes(), f


async def test_tenants_never_share_a_session(proxy):
    async with httpx.AsyncClient() as client:
        for key in ("sk-a", "sk-b"):
            await _agent_loop(client, proxy.url, 3, "same task",
                              headers={"Authorization": f"Bearer {key}"})
    sessions = (await proxy.store()).sessions()
    assert sorted(len(s["exchanges"]) for s in sessions) == [3, 3]
    assert len({s["tenant"] for s in sessions}) == 2


@pytest.mark.parametrize("headers,body_extra,source,session", [
    ({"X-Session-ID": "abc"}, {}, "header:x-session-id", "abc"),
    ({"x-claude-code-session-id": "cc1"}, {}, "header:x-claude-code-session-id", "cc1"),
    ({"Helicone-Session-Id": "h1"}, {"user": "u"}, "header:helicone-session-id", "h1"),
    ({}, {"prompt_cache_key": "pk"}, "body:prompt_cache_key", "pk"),
    ({}, {"user": "alice"}, "body:user", "alice"),
])
async def test_explicit_session_ids_win(proxy, headers, body_extra, source, session):
    async with httpx.AsyncClient() as client:
        for task in ("one", "two"):  # unrelated prompts, one explicit session
            await client.post(proxy.url + "/v1/chat/completions", headers=headers, json={
                "model": "m", "messages": [{"role": "user", "content": task}], **body_extra})
    [s] = (await proxy.store()).sessions()
    assert s["id"] == session and s["source"] == source and len(s["exchanges"]) == 2


async def test_responses_previous_response_id_continues_session(proxy):
    async with httpx.AsyncClient() as client:
        first = (await client.post(proxy.url + "/v1/responses",
                                   json={"model": "m", "input": "start"})).json()
        await client.post(proxy.url + "/v1/responses", json={
            "model": "m", "input": "go on", "previous_response_id": first["id"]})
    [s] = (await proxy.store()).sessions()
    assert len(s["exchanges"]) == 2


async def test_non_llm_routes_are_relayed_but_not_captured(proxy):
    async with httpx.AsyncClient() as client:
        assert (await client.get(proxy.url + "/v1/models")).status_code == 200
        assert (await client.post(proxy.url + "/v1/embeddings", json={"input": "x"})).status_code == 200
    assert (await proxy.store()).count()["exchanges"] == 0


async def test_store_failure_keeps_traffic_flowing_and_counts(upstream, tmp_path):
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db"))
    try:
        from sqlalchemy import text

        store = Store(proxy.db)
        with store.engine.begin() as conn:  # break the table the writer needs
            conn.execute(text("DROP TABLE exchanges"))
        store.close()
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                r = await client.post(proxy.url + "/v1/chat/completions",
                                      json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 200
            await proxy.observer.flush()
            metrics = (await client.get(proxy.url + "/metrics")).text
        assert proxy.observer.dropped["store_error"] == 3
        assert 'preheat_captures_dropped_total{reason="store_error"} 3' in metrics
    finally:
        await proxy.runner.cleanup()


async def test_a_capture_the_store_cannot_take_loses_only_itself(proxy_on_each_store):
    """Text no SQLite column can hold (a lone surrogate escape in the body, a Latin-1 byte in
    a header), and none PostgreSQL can (a NUL, a session id past its column's length), must
    not cost the other calls of its batch their captures."""
    proxy = proxy_on_each_store
    good = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    odd = b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'
    async with httpx.AsyncClient() as client:
        url = proxy.url + "/v1/chat/completions"
        sent = [client.post(url, json=good) for _ in range(10)]
        sent.append(client.post(url, content=odd, headers={"Content-Type": "application/json"}))
        sent.append(client.post(url, json=good, headers={"X-Session-ID": b"caf\xe9"}))
        sent.append(client.post(url, json=good, headers={"X-Session-ID": "s" * 300}))
        sent.append(client.post(url, headers={"x-fake-status": "500"}, json={
            "model": "m\u0000", "messages": [{"role": "user", "content": "\u0000"}]}))
        assert {r.status_code for r in await asyncio.gather(*sent)} <= {200, 400, 500}
    store = await proxy.store()
    stored = list(store.exchanges())
    assert len(stored) == 14 and not proxy.observer.dropped
    raw = [e for e in stored if e.request_error]
    assert len(raw) == 1 and "surrogate" in raw[0].request_error
    assert raw[0].request_body == odd  # kept as it was sent
    assert store.session("café") is not None  # the header's byte read as Latin-1


async def test_credentials_in_the_query_never_reach_the_disk(proxy, tmp_path):
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/v1/chat/completions?api-version=2&key=sk-in-url-123",
                              json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
    (ex,) = (await proxy.store()).exchanges()
    assert ex.query == "api-version=2&key=REDACTED"
    await proxy.runner.cleanup()
    for f in Path(tmp_path).glob("preheat.db*"):
        assert b"sk-in-url-123" not in f.read_bytes(), f


async def test_metrics_count_requests_by_route_and_status(proxy):
    async with httpx.AsyncClient() as client:
        for status in ("200", "500", "500"):
            await client.post(proxy.url + "/v1/chat/completions", headers={"x-fake-status": status},
                              json={"model": "m", "messages": []})
        await client.get(proxy.url + "/some/where")
        text = (await client.get(proxy.url + "/metrics")).text
    assert 'preheat_requests_total{route="/v1/chat/completions",status="200"} 1' in text
    assert 'preheat_requests_total{route="/v1/chat/completions",status="500"} 2' in text
    assert 'preheat_requests_total{route="other",status="404"} 1' in text
    assert "preheat_added_latency_seconds_count 4" in text
    assert "preheat_capture_queue_depth" in text


async def test_live_learner_learns_and_survives_a_restart(upstream, db_url):
    from learn.learner import Learner

    settings = Settings(upstream=upstream.url, db=db_url)
    proxy = await start_proxy(settings)
    async with httpx.AsyncClient() as client:
        for task in ("book a flight", "cancel a booking", "change a seat"):
            await _agent_loop(client, proxy.url, 4, task)
    await proxy.observer.flush()
    learner = await asyncio.to_thread(proxy.observer.learner)
    assert isinstance(learner, Learner) and learner.observed == 12
    templates = len(learner.templates())
    assert templates >= 1
    await proxy.runner.cleanup()  # saves the snapshot

    again = await start_proxy(settings)
    try:
        restored = await asyncio.to_thread(again.observer.learner)
        assert restored.observed == 12 and len(restored.templates()) == templates
    finally:
        await again.runner.cleanup()
