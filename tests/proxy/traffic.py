"""Agent traffic for admin and replay tests: tool loops of two kinds of agent, sent through a
proxy in front of the fake upstream, with tool time between calls."""

from __future__ import annotations

import asyncio

import httpx

PAYLOAD = '<script>alert("xss")</script><img src=x onerror="alert(2)">'
"""Hostile text a prompt may hold; the admin page must show it as text."""


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}


AGENTS = {
    "airline": ({"role": "system", "content": "You are an airline agent. Follow the policy. " * 30},
                [tool("get_user"), tool("book")]),
    "coder": ({"role": "system", "content": "You are a careful programmer. Use the tools. " * 30},
              [tool("read_file"), tool("run_tests")]),
}


async def agent_loop(client: httpx.AsyncClient, url: str, agent: str, task: str, steps: int,
                     tool_time: float = 0.02, stream: bool = True) -> list[str]:
    """One agent session: each call resends the history plus answer plus tool result.
    Returns the answers' tool-call ids (one per step)."""
    system, tools = AGENTS[agent]
    messages = [system, {"role": "user", "content": task}]
    ids = []
    for i in range(steps):
        body = {"model": "m", "messages": messages, "tools": tools, "stream": stream,
                "stream_options": {"include_usage": True} if stream else None}
        if not stream:
            del body["stream_options"]
        r = await client.post(url + "/v1/chat/completions", json=body,
                              headers={"x-fake-delay": "0.01"})
        assert r.status_code == 200
        call_id, name, args = _tool_call(r, stream)
        answer = {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}
        await asyncio.sleep(tool_time)  # the tool runs
        messages = messages + [answer, {"role": "tool", "tool_call_id": call_id,
                                        "content": f"result {i} of {name} for {task}"}]
        ids.append(call_id)
    return ids


def _tool_call(r: httpx.Response, stream: bool) -> tuple[str, str, str]:
    import json

    if not stream:
        call = r.json()["choices"][0]["message"]["tool_calls"][0]
        return call["id"], call["function"]["name"], call["function"]["arguments"]
    deltas = [json.loads(line[6:])["choices"] for line in r.text.splitlines()
              if line.startswith("data: {")]
    calls = [c[0]["delta"]["tool_calls"][0] for c in deltas if c and c[0]["delta"].get("tool_calls")]
    args = "".join(c["function"].get("arguments", "") for c in calls)
    return calls[0]["id"], calls[0]["function"]["name"], args


async def workload(url: str) -> None:
    """Five sessions of two agents, run together, plus one call holding a script payload."""
    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(
            agent_loop(client, url, "airline", "book a flight to Paris", 4),
            agent_loop(client, url, "airline", "cancel my booking", 3),
            agent_loop(client, url, "airline", "change my seat", 3, stream=False),
            agent_loop(client, url, "coder", "fix the failing test", 3),
            agent_loop(client, url, "coder", "add a feature", 3),
        )
        await agent_loop(client, url, "coder", "explain " + PAYLOAD, 2)
