"""`preheat replay` against the real engine: every output has its recorded length (vLLM honours
`ignore_eos`), and a session's later calls find their history in the prefix cache."""

from __future__ import annotations

import pytest

from proxy.exchange import Exchange
from proxy.replay import plan, run

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

SYSTEM = {"role": "system", "content": "You help travellers change their bookings. " * 40}


def _session(name: str, lengths: list[int], t0: float) -> list[Exchange]:
    """A recorded agent session: each call resends the history, 50 ms of tool time between."""
    calls, messages, t = [], [SYSTEM, {"role": "user", "content": f"I am {name}."}], t0
    for i, n in enumerate(lengths):
        ex = Exchange(method="POST", path="/v1/chat/completions", id=f"{name}{i}", started_at=t,
                      t_done=0.1, status=200, session_id=name)
        ex.analyzed = True
        ex.request_json = {"model": "recorded", "messages": list(messages)}
        ex.answer = {"role": "assistant", "content": f"answer {i}"}
        ex.usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
        calls.append(ex)
        messages += [ex.answer, {"role": "user", "content": f"and then {i}?"}]
        t += 0.15
    return calls


async def test_replay_forces_recorded_lengths_on_vllm(running):
    recorded = _session("ana", [7, 5, 9], 100.0) + _session("bo", [3, 11], 100.02)
    sessions = plan(recorded, model=running.model)
    result = await run(sessions, running.engine.base_url, speed=2.0)
    assert [c.error for c in result.calls] == [None] * 5
    assert sorted((c.session, c.index, c.completion_tokens) for c in result.calls) == [
        ("ana", 0, 7), ("ana", 1, 5), ("ana", 2, 9), ("bo", 0, 3), ("bo", 1, 11)]
    assert all(c.ttft is not None and c.prompt_tokens for c in result.calls)
    later = [c for c in result.calls if c.index > 0]
    assert sum(c.cached_tokens or 0 for c in later) > 0
