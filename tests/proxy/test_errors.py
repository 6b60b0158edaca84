"""Failures: each ends in a clear OpenAI-style error, and none disturbs other clients."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import httpx
import pytest

from engine.process import free_port
from proxy.config import Settings
from proxy.server import ADMISSION
from tests.conftest import start_proxy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}



def _assert_openai_error(r: httpx.Response, status: int, code: str, words: str) -> None:
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code
    assert err["type"]
    assert words in err["message"]


async def test_healthz_says_whether_the_upstream_can_be_reached(upstream, tmp_path):
    """A health check behind a load balancer sees a dead upstream (503, and why), not "ok"."""
    dead = await start_proxy(Settings(upstream=f"http://127.0.0.1:{free_port()}",
                                      admission=False, db=f"sqlite:///{tmp_path}/d.db"))
    live = await start_proxy(Settings(upstream=upstream.url + "/v1", admission=False,
                                      db=f"sqlite:///{tmp_path}/l.db"))
    try:
        async with httpx.AsyncClient() as client:
            down = await client.get(dead.url + "/healthz")
            up = await client.get(live.url + "/healthz")
    finally:
        await dead.runner.cleanup()
        await live.runner.cleanup()
    assert down.status_code == 503
    assert down.json()["status"] == "upstream unreachable"
    assert "cannot connect to the upstream" in down.json()["error"]
    assert up.status_code == 200 and up.json()["status"] == "ok"


async def test_metrics_count_lost_captures_from_zero(proxy):
    """An alert on lost captures needs the series before the first loss."""
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(proxy.url + "/metrics")).text
    for reason in ("queue_full", "store_error", "observer_died"):
        assert f'preheat_captures_dropped_total{{reason="{reason}"}} 0' in metrics


async def test_unreachable_upstream_is_502(tmp_path):
    proxy = await start_proxy(
        Settings(upstream=f"http://127.0.0.1:{free_port()}", db=f"sqlite:///{tmp_path}/p.db")
    )
    try:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/v1/chat/completions", json=CHAT)
        _assert_openai_error(r, 502, "upstream_unreachable", "cannot connect")
        store = await proxy.store()
        [ex] = list(store.exchanges())
        assert ex.status == 502 and ex.error_type == "upstream_unreachable"
    finally:
        await proxy.runner.cleanup()


async def test_a_kept_alive_connection_the_upstream_closes_costs_the_client_nothing(tmp_path):
    """Servers close idle keep-alive connections (vLLM's uvicorn after 5 s): a request sent
    on one as it closes is sent again on a new connection, not answered 502. This upstream
    answers one request per connection and drops the connection on the next."""
    answered: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                if n:  # a reused connection: closed as the request arrives
                    break
                length = sum(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length:"))
                answered.append(await reader.readexactly(length))
                reply = b'{"id": "x", "choices": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy(Settings(upstream=f"http://127.0.0.1:{port}", admission=False,
                                       prewarm=False, db=f"sqlite:///{tmp_path}/p.db"))
    try:
        async with httpx.AsyncClient() as client:
            for i in range(3):
                body = {**CHAT, "messages": [{"role": "user", "content": f"call {i}"}]}
                r = await client.post(proxy.url + "/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
        chats = [a for a in answered if a]  # each call answered once, in order
        assert [b"call %d" % i in a for i, a in enumerate(chats)] == [True] * 3
    finally:
        await proxy.runner.cleanup()
        server.close()


async def test_a_call_the_upstream_dropped_after_working_on_it_is_not_sent_again(upstream,
                                                                                   proxy):
    """Only a connection that closes as the request goes out is a stale one to retry: a
    server that dies mid-call may have done the work (vLLM generating), so the call is not
    sent a second time. The client hears of it, and no one computes it twice."""
    async with httpx.AsyncClient(timeout=30) as client:
        await client.post(proxy.url + "/v1/chat/completions", json=CHAT)  # pools a connection
        r = await client.post(proxy.url + "/v1/chat/completions", json=CHAT,
                              headers={"x-fake-drop": "1"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
    assert upstream.requests == 2


async def test_hanging_upstream_is_504_and_others_still_flow(upstream, tmp_path):
    proxy = await start_proxy(
        Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db", read_timeout=0.5)
    )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            hung = asyncio.create_task(client.post(
                proxy.url + "/v1/chat/completions", json=CHAT, headers={"x-fake-hang": "1"}))
            ok = await client.post(proxy.url + "/v1/chat/completions", json=CHAT)
            assert ok.status_code == 200
            _assert_openai_error(await hung, 504, "upstream_timeout", "did not answer")
    finally:
        await proxy.runner.cleanup()


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_limit_is_413(upstream, tmp_path, chunked):
    proxy = await start_proxy(
        Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                 max_body_bytes=2 * 1024 * 1024)
    )
    body = b"x" * (3 * 1024 * 1024)

    async def gen():
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    try:
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(proxy.url + "/echo", content=gen() if chunked else body)
            _assert_openai_error(r, 413, "request_too_large", "over the limit")
            # The proxy is fine afterwards.
            assert (await client.post(proxy.url + "/echo", content=b"ok")).status_code == 200
    finally:
        await proxy.runner.cleanup()


async def test_upstream_closing_mid_stream_cuts_the_client_and_is_recorded(upstream, proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "POST", proxy.url + "/v1/chat/completions",
                json={**CHAT, "stream": True}, headers={"x-fake-cut": "3"},
            ) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    pass
        # Other traffic is unaffected.
        assert (await client.post(proxy.url + "/v1/chat/completions", json=CHAT)).status_code == 200
    [cut, ok] = list((await proxy.store()).exchanges())
    assert cut.error_type == "upstream_closed"
    assert cut.stream and len(cut.events) == 3  # what did arrive is kept
    assert ok.error is None


async def test_client_disconnect_cancels_upstream(upstream, proxy):
    async with httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(proxy.url + "/v1/chat/completions", json=CHAT,
                              headers={"x-fake-hang": "1"})
    for _ in range(100):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.02)
    assert upstream.cancelled == 1
    [ex] = list((await proxy.store()).exchanges())
    assert ex.error_type == "client_disconnected"


async def test_client_disconnect_mid_stream_cancels_upstream(upstream, proxy):
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST", proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True},
            headers={"x-fake-delay": "0.2", "x-fake-events": "50"},
        ) as r:
            async for _ in r.aiter_bytes():
                break
    for _ in range(100):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.02)
    assert upstream.cancelled == 1


async def test_a_client_gone_while_its_transport_closes_is_not_taken_for_the_upstream(
        upstream, proxy, monkeypatch):
    """aiohttp refuses a write once the client's transport is closing, before it is gone
    ('Cannot write to closing transport'): that is the client hanging up, not the upstream."""
    from types import SimpleNamespace

    from aiohttp import ClientConnectionResetError, web

    from proxy import forward

    class Closing(web.StreamResponse):
        async def write(self, data: bytes) -> None:
            if self.prepared and getattr(self, "_sent", 0) >= 1:
                raise ClientConnectionResetError("Cannot write to closing transport")
            self._sent = getattr(self, "_sent", 0) + 1
            await super().write(data)

    monkeypatch.setattr(forward, "web", SimpleNamespace(StreamResponse=Closing,
                                                        Response=web.Response))
    async with httpx.AsyncClient(timeout=10) as client:
        try:  # (the client here is still there, and sees its stream cut or ended)
            async with client.stream("POST", proxy.url + "/v1/chat/completions",
                                     json={**CHAT, "stream": True},
                                     headers={"x-fake-events": "5", "x-fake-delay": "0.05"}) as r:
                async for _ in r.aiter_bytes():
                    pass
        except httpx.HTTPError:
            pass
    monkeypatch.undo()
    [ex] = list((await proxy.store()).exchanges())
    assert ex.error_type == "client_disconnected"
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(proxy.url + "/metrics")).text
    assert 'type="client_disconnected"} 1' in metrics
    assert 'type="upstream_closed"} 0' in metrics or 'type="upstream_closed"' not in metrics


BAD_BODIES = [
    ("malformed-json", b'{"model": "m", "messages": [', "application/json", "not valid JSON"),
    ("empty", b"", "application/json", "empty body"),
    ("invalid-utf8", b'{"a": "\xff\xfe"}', "application/json", "not valid UTF-8"),
    ("wrong-type", b"model=m", "application/x-www-form-urlencoded", "is not JSON"),
]


@pytest.mark.parametrize("name,body,ctype,reason", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_input_is_forwarded_and_captured_as_unparsed(
    upstream, proxy, name, body, ctype, reason
):
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/v1/chat/completions", content=body,
                              headers={"content-type": ctype})
        assert r.status_code == 400  # the upstream decided
        assert upstream.requests == 1
        good = await client.post(proxy.url + "/v1/chat/completions", json=CHAT)
        assert good.status_code == 200
    [bad, ok] = list((await proxy.store()).exchanges())
    assert reason in bad.request_error
    assert bad.request_body == body
    assert ok.request_error is None and ok.messages == CHAT["messages"]


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", dict(CHAT, stream=True)),
    ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
], ids=["chat", "responses"])
async def test_a_stream_whose_model_is_not_text_is_captured_whole(upstream, proxy, route, body):
    # The fake upstream, like a careless one, echoes the request's model into its stream; a
    # model or id that is not text once made the store refuse the capture (lost, counted).
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + route, json=dict(body, model={"name": "m"}))
        assert r.status_code == 200 and '"name": "m"' in r.text  # relayed as sent
        metrics = (await client.get(proxy.url + "/metrics")).text
    [ex] = list((await proxy.store()).exchanges())
    assert ex.model is None and ex.stream and ex.answer is not None
    assert ex.request_json["model"] == {"name": "m"}
    assert 'preheat_captures_dropped_total{reason="store_error"} 0' in metrics



def _junk(rng: random.Random, depth: int = 0):
    """A JSON value of any shape, with the keys and roles a chat body has."""
    keys = ["role", "content", "type", "text", "name", "tool_calls", "function", "arguments",
            "image_url", "id"]
    pick = rng.randrange(10 if depth < 3 else 6)
    if pick < 6:
        return [None, True, rng.randint(-2**70, 2**70), rng.random() * 1e308,
                "x" * rng.randrange(50), "\ud800 lone surrogate"][pick]
    if pick == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 7:
        return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    if pick == 8:
        return {"role": rng.choice(["system", "user", "assistant", "tool", 1, None]),
                "content": _junk(rng, depth + 1)}
    return [{"type": rng.choice(["text", "image_url", 3]), "text": _junk(rng, depth + 1)}]


def _junk_body(rng: random.Random) -> bytes:
    body = {"model": rng.choice(["m", 3, None, ["m"]]), "messages": _junk(rng)}
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": _junk(rng)} if rng.random() < 0.5
                            else _junk(rng) for _ in range(rng.randrange(5))]
    for key in ("temperature", "seed", "stream", "tools", "max_tokens", "n", "stream_options",
                "tool_choice", "response_format", "user", "input", "prompt"):
        if rng.random() < 0.3:
            body[key] = _junk(rng)
    raw = json.dumps(body).encode()  # (a lone surrogate goes as its \u escape)
    return raw[:rng.randrange(len(raw) + 1)] if rng.random() < 0.1 else raw


async def test_junk_through_every_stage_is_answered_and_costs_the_other_clients_nothing(
        upstream, tmp_path, caplog):
    # Bodies of every shape, valid JSON or cut short, on each route, through admission under
    # pressure, ordering and the prompt cache, beside well-formed agent sessions.
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admission_capacity_tokens=1500, admission_max_wait=1.0, prewarm=False)
    proxy = await start_proxy(settings)
    rng = random.Random(7)
    junk = [(rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/responses"]),
             _junk_body(rng)) for _ in range(240)]
    statuses: list[int] = []
    answers: list[str] = []

    async def junk_client(client: httpx.AsyncClient, share: list) -> None:
        for route, body in share:
            r = await client.post(proxy.url + route, content=body,
                                  headers={"content-type": "application/json"})
            statuses.append(r.status_code)

    async def agent(client: httpx.AsyncClient, i: int) -> None:
        messages = [{"role": "system", "content": "You are a careful agent. " * 20},
                    {"role": "user", "content": f"task {i} " + "detail " * 60}]
        for step in range(4):
            r = await client.post(proxy.url + "/v1/chat/completions",
                                  json={"model": "m", "messages": messages})
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["message"]["content"])
            messages += [{"role": "assistant", "content": answers[-1]},
                         {"role": "user", "content": f"tool output {step}"}]

    try:
        with caplog.at_level(logging.WARNING):
            async with httpx.AsyncClient(timeout=30) as client:
                await asyncio.gather(*(junk_client(client, junk[k::8]) for k in range(8)),
                                     *(agent(client, i) for i in range(6)))
                health = await client.get(proxy.url + "/healthz")
        assert len(statuses) == len(junk) and max(statuses) < 500  # the upstream's answers
        assert 200 in statuses and 400 in statuses  # (both kinds were sent)
        assert len(answers) == 24 and all(answers)
        assert health.status_code == 200
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        stats = proxy.app[ADMISSION].stats()
        assert stats.waiting == 0 and stats.max_wait_seen < 1.0 + 0.5  # none left, none starved
        assert len(list((await proxy.store()).exchanges())) == len(junk) + 24  # all captured
    finally:
        await proxy.runner.cleanup()
