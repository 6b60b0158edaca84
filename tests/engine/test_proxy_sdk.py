"""The official `openai` SDK through the preheat proxy in front of the real engine."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest
import pytest_asyncio
from aiohttp import web

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

server = pytest.importorskip("proxy.server", reason="the proxy is not built yet")
config = pytest.importorskip("proxy.config")


@pytest_asyncio.fixture(loop_scope="session")  # the loop the engine's tasks live on
async def proxy_url(running, tmp_path):
    settings = config.Settings(upstream=running.engine.base_url, db=f"sqlite:///{tmp_path}/p.db")
    runner = web.AppRunner(server.build_app(settings), access_log=None,
                           **getattr(server, "SERVER_KWARGS", {}))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


def sync_calls(url: str, model: str) -> None:
    client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
    try:
        assert model in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5)
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 5
        # A long prompt sent twice: the engine's prefix cache shows through the proxy.
        prompt = [random.Random(10).randrange(100, 16000) for _ in range(400)]
        hits = [client.completions.create(model=model, prompt=prompt, max_tokens=1)
                .usage.prompt_tokens_details.cached_tokens for _ in range(2)]
        assert hits == [0, 384]
    finally:
        client.close()


async def test_sync_client_through_proxy(running, proxy_url):
    # The proxy runs on this loop; the blocking client runs in a thread beside it.
    await asyncio.to_thread(sync_calls, proxy_url, running.model)


async def test_streaming_client_through_proxy(running, proxy_url):
    client = openai.AsyncOpenAI(base_url=proxy_url, api_key="sk-test", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=running.model, messages=[{"role": "user", "content": "Count to five"}],
            max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks, usage = 0, None
        async for chunk in stream:
            chunks += 1
            usage = chunk.usage or usage
        assert chunks >= 2 and usage is not None and 0 < usage.completion_tokens <= 8
    finally:
        await client.close()


async def test_requests_with_tools_are_served(running, proxy_url):
    """Agents send tools with nearly every call: the engine preheat starts has a tool-call
    parser, so they are answered, not refused (vLLM's 400 without one)."""
    tools = [{"type": "function", "function": {
        "name": "find_booking", "description": "Find a booking by its number.",
        "parameters": {"type": "object", "properties": {"number": {"type": "string"}},
                       "required": ["number"]}}}]
    messages = [{"role": "system", "content": "You book flights."},
                {"role": "user", "content": "Where is booking 42?"}]
    client = openai.AsyncOpenAI(base_url=proxy_url, api_key="sk-test", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model=running.model, messages=messages, tools=tools, max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
        stream = await client.chat.completions.create(
            model=running.model, messages=messages, tools=tools, max_tokens=4, stream=True)
        finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
        assert finishes[-1] in ("stop", "length", "tool_calls")
    finally:
        await client.close()


async def test_an_openai_agents_sdk_agent_runs_through_the_proxy(running, proxy_url, monkeypatch):
    """A real agent framework, with a tool, pointed at preheat by OPENAI_BASE_URL alone, on the
    real engine (its random weights answer in noise, so the run ends after one call)."""
    agents = pytest.importorskip("agents")
    from agents.models import openai_provider

    monkeypatch.setenv("OPENAI_BASE_URL", proxy_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    monkeypatch.setattr(openai_provider, "_http_client", None)  # one per event loop
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def find_booking(number: str) -> str:
        """Find a booking by its number."""
        return f"booking {number}: Friday"

    agent = agents.Agent(name="booking", instructions="You find bookings.", model=running.model,
                         tools=[find_booking], model_settings=agents.ModelSettings(max_tokens=8))
    config = agents.RunConfig(model_provider=agents.OpenAIProvider(use_responses=False))
    try:
        result = await agents.Runner.run(agent, "Where is booking 42?", run_config=config,
                                         max_turns=2)
    finally:
        if openai_provider._http_client is not None:
            await openai_provider._http_client.aclose()
    assert isinstance(result.final_output, str) and result.raw_responses
    assert result.raw_responses[0].usage.input_tokens > 0
