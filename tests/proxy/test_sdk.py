"""The official `openai` SDK through the proxy, and many clients at once."""

from __future__ import annotations

import asyncio

import httpx
import openai

from proxy.sse import parse_sse

MESSAGES = [{"role": "user", "content": "Say hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


async def test_sync_client(proxy):
    # The proxy runs on this test's event loop; the blocking client runs beside it.
    await asyncio.to_thread(_sync_calls, proxy.url)


def _sync_calls(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 5
    assert [m.id for m in client.models.list()] == ["fake"]
    text = client.completions.create(model="m", prompt="Once")
    assert text.choices[0].text
    resp = client.responses.create(model="m", input="hi")
    assert resp.output_text
    client.close()


async def test_async_streaming_and_tool_calls(proxy):
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert len(pieces) == 7 and usage.completion_tokens == 5

    reply = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"

    stream = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS,
                                                  stream=True)
    names = [c.choices[0].delta.tool_calls[0].function.name async for c in stream
             if c.choices and c.choices[0].delta.tool_calls]
    assert names[0] == "get_weather"

    events = await client.responses.create(model="m", input="hi", stream=True)
    kinds, text = [], []
    async for event in events:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    await client.close()

    stored = list((await proxy.store()).exchanges())
    assert len(stored) == 4
    assert stored[2].answer["tool_calls"][0]["function"]["name"] == "get_weather"
    assert stored[3].path == "/v1/responses" and stored[3].answer["content"] == "".join(text)


async def test_two_hundred_concurrent_streams(upstream, proxy):
    async def one(client: httpx.AsyncClient, i: int) -> list[str]:
        body = {"model": "m", "stream": True,
                "messages": [{"role": "user", "content": f"client {i}"}]}
        async with client.stream("POST", proxy.url + "/v1/chat/completions", json=body,
                                 headers={"x-fake-delay": "0.05"}) as r:
            assert r.status_code == 200
            raw = b"".join([c async for c in r.aiter_bytes()])
        return [e["data"] for e in parse_sse([(0.0, raw)])]

    limits = httpx.Limits(max_connections=250)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(200)))
        direct = await client.post(upstream.url + "/v1/chat/completions", json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "client 7"}]})
    assert all(len(r) == 8 and r[-1] == "[DONE]" for r in results)
    # Nobody received another client's stream.
    assert results[7] == [e["data"] for e in parse_sse([(0.0, direct.content)])]
    assert len({r[1] for r in results}) == 200
    store = await proxy.store()
    assert store.count()["exchanges"] == 200
    assert sum(proxy.observer.dropped.values()) == 0
