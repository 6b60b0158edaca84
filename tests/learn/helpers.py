"""Building exchanges for learn/ tests: plain data in, finished `Exchange` out."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.exchange import Exchange

WORKLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "workloads"


def chat(messages: list[dict], answer: dict | None = None, started: float = 1_700_000_000.0,
         done: float = 1.0, tools: list | None = None, headers: list | None = None,
         tenant: str | None = None, path: str = "/v1/chat/completions", **body) -> Exchange:
    """A finished chat call, as the proxy hands it to the learner."""
    payload = {"model": "m", "messages": messages, **body}
    if tools:
        payload["tools"] = tools
    ex = Exchange(method="POST", path=path, request_body=json.dumps(payload).encode(),
                  request_headers=[("content-type", "application/json"), *(headers or [])],
                  started_at=started)
    ex.analyze()
    ex.status, ex.answer, ex.t_done, ex.tenant = 200, answer, done, tenant
    return ex


def say(text: str) -> dict:
    return {"role": "assistant", "content": text}


def tool_call(name: str, call_id: str, args: str = "{}") -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}


def tau_runs() -> tuple[list[dict], list[dict]] | None:
    """The tau-bench airline runs and tools, or None when the workloads are absent."""
    base = WORKLOADS / "tau-bench-airline"
    if not (base / "gpt-4o-airline.json").exists():
        return None
    return json.loads((base / "gpt-4o-airline.json").read_text()), json.loads((base / "tools.json").read_text())


def tau_calls(run: dict, tools: list, t0: float) -> list[Exchange]:
    """One exchange per agent call of a tau-bench run (prompt = trajectory up to the answer)."""
    out, t = [], t0
    for k, message in enumerate(run["traj"]):
        if message.get("role") == "assistant":
            out.append(chat(run["traj"][:k], dict(message), started=t, tools=tools))
            t += 1.0 + (0.5 if message.get("tool_calls") else 5.0)
    return out


def swe_steps() -> list[dict] | None:
    path = WORKLOADS / "swe-agent-demo" / "marshmallow-1867.traj"
    if not path.exists():
        return None
    return json.loads(path.read_text())["trajectory"]
