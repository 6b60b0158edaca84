"""Differential tests: the same request sent directly and through the proxy gets the same answer."""

from __future__ import annotations

import json

import httpx
import pytest

from proxy.sse import parse_sse

CHAT = {"model": "m", "messages": [{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Hello there"}]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look up a thing",
                                           "parameters": {"type": "object", "properties": {
                                               "q": {"type": "string"}}}}}]
IMAGE = {"model": "m", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "What is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}

# (name, method, path, headers, body)
KINDS = [
    ("chat", "POST", "/v1/chat/completions", {}, json.dumps(CHAT)),
    ("chat-stream", "POST", "/v1/chat/completions", {}, json.dumps({**CHAT, "stream": True})),
    ("chat-stream-usage", "POST", "/v1/chat/completions", {},
     json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}})),
    ("chat-tools", "POST", "/v1/chat/completions", {}, json.dumps({**CHAT, "tools": TOOLS})),
    ("chat-tools-stream", "POST", "/v1/chat/completions", {},
     json.dumps({**CHAT, "tools": TOOLS, "stream": True})),
    ("chat-image-parts", "POST", "/v1/chat/completions", {}, json.dumps(IMAGE)),
    ("chat-unicode", "POST", "/v1/chat/completions", {},
     json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo ✓ 你好 🚀"}]},
                ensure_ascii=False)),
    ("completions", "POST", "/v1/completions", {}, json.dumps({"model": "m", "prompt": "Once"})),
    ("completions-stream", "POST", "/v1/completions", {},
     json.dumps({"model": "m", "prompt": "Once", "stream": True})),
    ("responses", "POST", "/v1/responses", {}, json.dumps({"model": "m", "input": "Hi"})),
    ("responses-stream", "POST", "/v1/responses", {},
     json.dumps({"model": "m", "input": [{"role": "user", "content": "Hi"}], "stream": True})),
    ("embeddings", "POST", "/v1/embeddings", {}, json.dumps({"model": "e", "input": "text"})),
    ("models", "GET", "/v1/models", {}, None),
    ("upstream-400-bad-json", "POST", "/v1/chat/completions", {}, "{not json"),
    ("upstream-500", "POST", "/v1/chat/completions", {"x-fake-status": "500"}, json.dumps(CHAT)),
    ("upstream-429", "POST", "/v1/chat/completions", {"x-fake-status": "429"}, json.dumps(CHAT)),
    ("unknown-path-404", "POST", "/v1/nothing/here", {}, "{}"),
    ("echo-query", "GET", "/echo/a/b?x=1&y=%20two&x=3", {"X-Custom": "kept"}, None),
    ("echo-put", "PUT", "/echo/put", {"content-type": "text/plain"}, "plain text body"),
    ("echo-delete", "DELETE", "/echo/thing", {}, None),
    ("echo-empty-post", "POST", "/echo/empty", {}, ""),
    ("echo-wrong-type", "POST", "/echo/x", {"content-type": "application/xml"}, "<a>1</a>"),
]


def _events(text: str) -> list[tuple[str | None, str]]:
    return [(e["event"], e["data"]) for e in parse_sse([(0.0, text.encode())])]


@pytest.mark.parametrize("name,method,path,headers,body", KINDS, ids=[k[0] for k in KINDS])
async def test_same_answer_direct_and_proxied(upstream, proxy, name, method, path, headers, body):
    # Two clients: a shared cookie jar would send the direct answer's Set-Cookie on.
    async with httpx.AsyncClient(timeout=10) as a, httpx.AsyncClient(timeout=10) as b:
        direct = await a.request(method, upstream.url + path, headers=headers, content=body)
        proxied = await b.request(method, proxy.url + path, headers=headers, content=body)
    assert proxied.status_code == direct.status_code
    assert proxied.headers.get("content-type") == direct.headers.get("content-type")
    if "text/event-stream" in direct.headers.get("content-type", ""):
        assert _events(proxied.text) == _events(direct.text)
        assert len(_events(direct.text)) >= 3
    assert proxied.content == direct.content
    for name_ in ("x-echo", "set-cookie", "cache-control"):
        assert proxied.headers.get(name_) == direct.headers.get(name_)


async def test_invalid_utf8_body_is_forwarded_verbatim(upstream, proxy):
    body = b"\xff\xfe{\"broken\": \x80}"
    async with httpx.AsyncClient() as client:
        direct = await client.post(upstream.url + "/echo", content=body)
        proxied = await client.post(proxy.url + "/echo", content=body)
    assert proxied.json()["digest"] == direct.json()["digest"]
    assert proxied.json()["length"] == len(body)


async def test_headers_pass_unchanged_except_hop_by_hop(upstream, proxy):
    headers = {"Authorization": "Bearer sk-test", "X-Custom": "a, b", "User-Agent": "agent/1.0",
               "Connection": "keep-alive, X-Hop", "X-Hop": "dropped", "Keep-Alive": "timeout=5"}
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/echo", headers=headers, content=b"{}")
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert seen["authorization"] == "Bearer sk-test"
    assert seen["x-custom"] == "a, b"
    assert seen["user-agent"] == "agent/1.0"
    for hop in ("x-hop", "keep-alive"):
        assert hop not in seen
    # Nothing added on the way: the upstream sees the client's own Accept-Encoding only.
    assert seen.get("accept-encoding") == r.request.headers.get("accept-encoding")


async def test_large_body_streams_through(upstream, proxy):
    body = bytes(range(256)) * (40 * 1024 * 1024 // 256)  # 40 MiB

    async def chunks():
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    async with httpx.AsyncClient(timeout=60) as client:
        direct = await client.post(upstream.url + "/echo", content=body)
        proxied = await client.post(proxy.url + "/echo", content=chunks())
    assert proxied.status_code == 200
    assert proxied.json()["digest"] == direct.json()["digest"]


async def test_large_response_passes_through(upstream, proxy):
    headers = {"x-fake-size": str(8 * 1024 * 1024)}
    async with httpx.AsyncClient(timeout=60) as client:
        direct = await client.post(upstream.url + "/v1/chat/completions", json=CHAT,
                                   headers=headers)
        proxied = await client.post(proxy.url + "/v1/chat/completions", json=CHAT,
                                    headers=headers)
    assert len(proxied.content) > 8 * 1024 * 1024
    assert proxied.content == direct.content


async def test_stream_events_arrive_as_sent(upstream, proxy):
    """Relay without buffering: each event reaches the client before the next is sent."""
    import time

    headers = {"x-fake-delay": "0.2", "x-fake-events": "4"}
    arrivals = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", proxy.url + "/v1/chat/completions", headers=headers,
                                 json={**CHAT, "stream": True}) as r:
            start = time.perf_counter()
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.perf_counter() - start)
    assert len(arrivals) >= 6
    # The first event is relayed at once, not after the 1 s the whole stream takes.
    assert arrivals[0] < 0.15
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) >= 0.15
