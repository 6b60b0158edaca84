"""Replay captured sessions against an OpenAI-compatible server, as they were recorded.

    sessions = plan(exchanges, model="my-model")     # from the store or a trace file
    result = await run(sessions, "http://127.0.0.1:8000", speed=2.0)

The recorded shape is kept: sessions start at their recorded offsets (scaled by 1/speed),
within a session each call waits for the call it continued (its parent, else the latest call
that had ended before it started) and then for the recorded tool gap (scaled too), and calls
that overlapped run concurrently. Each call's output is forced to its recorded length
(`max_tokens` = recorded completion tokens, `ignore_eos: true`, which vLLM accepts) and it is
streamed, so time to first token can be measured. A session without timings (no call has a
duration: an imported trajectory file) is untimed: its recorded start is made up, so untimed
sessions start together, or `stagger` seconds apart, each call right after the previous one
plus any recorded gap; timed sessions in the same replay keep their recorded offsets.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, TextIO

import aiohttp

from proxy.exchange import Exchange
from proxy.sse import parse_sse, reassemble_stream

REPLAYED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass(frozen=True)
class PlannedCall:
    index: int
    exchange_id: str
    path: str
    body: dict
    """The request as it will be sent (length forced, streamed, model replaced)."""
    after: int | None
    """Index of the call of this session it waits for; None: it waits for the session start."""
    gap: float
    """Recorded seconds between that call's end (or the session start) and this call."""
    expected_tokens: int | None
    """The recorded output length, which the replay asks for."""


@dataclass(frozen=True)
class PlannedSession:
    id: str
    offset: float
    """Recorded seconds from the first timed session's start to this one's (untimed: the
    stagger)."""
    calls: tuple[PlannedCall, ...]


def output_tokens(ex: Exchange) -> tuple[int | None, bool]:
    """(recorded completion tokens, whether estimated from the answer's length)."""
    usage = ex.usage or {}
    n = usage.get("completion_tokens", usage.get("output_tokens"))
    if isinstance(n, int) and n > 0:
        return n, False
    answer = ex.answer or {}
    text = answer.get("content") if isinstance(answer.get("content"), str) else ""
    for call in answer.get("tool_calls") or []:
        if isinstance(call, dict):
            fn = call.get("function") or {}
            text += str(fn.get("name") or "") + str(fn.get("arguments") or "")
    return (max(1, len(text) // 4), True) if text else (None, False)


def request_body(ex: Exchange, model: str | None = None, force_length: bool = True) -> dict | None:
    """The request to send for a recorded call, or None when it cannot be replayed."""
    if ex.path not in REPLAYED_PATHS or not isinstance(ex.request_json, dict):
        return None
    body = copy.deepcopy(ex.request_json)
    if model:
        body["model"] = model
    body["stream"] = True
    if ex.path != "/v1/responses":
        body["stream_options"] = {"include_usage": True}
    n, _ = output_tokens(ex)
    if force_length and n:
        if ex.path == "/v1/responses":
            body["max_output_tokens"] = n
        else:
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = n
        body["ignore_eos"] = True
    return body


def plan(exchanges: Iterable[Exchange], model: str | None = None, force_length: bool = True,
         stagger: float = 0.0) -> list[PlannedSession]:
    """Group recorded calls into sessions and work out what each call waits for."""
    by_session: dict[str, list[Exchange]] = {}
    for ex in exchanges:
        if request_body(ex) is not None and (ex.status is None or ex.status < 400):
            by_session.setdefault(ex.session_id or ex.id, []).append(ex)
    if not by_session:
        return []
    timed = {sid for sid, calls in by_session.items() if any(ex.t_done is not None for ex in calls)}
    first = min((ex.started_at for sid in timed for ex in by_session[sid]), default=0.0)
    out = []
    untimed = 0
    for sid, calls in sorted(by_session.items(), key=lambda kv: min(e.started_at for e in kv[1])):
        calls.sort(key=lambda e: (e.started_at, e.id))
        t0 = calls[0].started_at
        index = {ex.id: i for i, ex in enumerate(calls)}
        ends = [ex.started_at + (ex.t_done or 0.0) for ex in calls]
        planned = []
        for i, ex in enumerate(calls):
            after = index.get(ex.parent_id or "")
            if after is None or after >= i:
                done_before = [j for j in range(i) if ends[j] <= ex.started_at + 1e-6]
                after = max(done_before, key=lambda j: ends[j]) if done_before else None
            gap = ex.started_at - (ends[after] if after is not None else t0)
            body = request_body(ex, model, force_length)
            assert body is not None
            planned.append(PlannedCall(i, ex.id, ex.path, body, after, max(gap, 0.0),
                                       output_tokens(ex)[0]))
        if sid in timed:
            offset = t0 - first
        else:
            offset, untimed = untimed * stagger, untimed + 1
        out.append(PlannedSession(sid, offset, tuple(planned)))
    return out


@dataclass
class CallResult:
    session: str
    index: int
    exchange_id: str
    start: float
    """Seconds since the replay started."""
    ttft: float | None = None
    end: float | None = None
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    expected_tokens: int | None = None


@dataclass
class RunResult:
    target: str
    wall: float = 0.0
    calls: list[CallResult] = field(default_factory=list)


class Progress:
    """A one-line progress bar on stderr (a line every 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.done = self.errors = 0
        self.tty = self.stream.isatty()
        self._shown = -1
        self._t0 = time.monotonic()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        decile = 10 * self.done // max(self.total, 1)
        if self.tty or decile != self._shown or self.done == self.total:
            self._shown = decile
            width = 30
            filled = width * self.done // max(self.total, 1)
            line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/"
                    f"{self.total} calls, {self.errors} errors, {time.monotonic() - self._t0:.1f} s")
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            if self.tty and self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


async def run(sessions: list[PlannedSession], target: str, speed: float = 1.0,
              max_sessions: int | None = None, api_key: str | None = None,
              timeout: float = 600.0, progress: Progress | None = None) -> RunResult:
    """Replay `sessions` against `target` (a base URL); every call's outcome, in order."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    base = target.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    run_id = secrets.token_hex(4)  # sessions of two replays of one capture stay apart
    gate = asyncio.Semaphore(max_sessions) if max_sessions else None
    result = RunResult(target)
    connector = aiohttp.TCPConnector(limit=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_read=timeout)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout,
                                     headers=headers) as http:

        async def one_session(s: PlannedSession) -> None:
            await asyncio.sleep(s.offset / speed)
            if gate is not None:
                await gate.acquire()
            try:
                start = time.perf_counter()
                ended: dict[int, asyncio.Future] = {
                    c.index: asyncio.get_running_loop().create_future() for c in s.calls}

                async def one_call(c: PlannedCall) -> None:
                    ready = start if c.after is None else await ended[c.after]
                    delay = ready + c.gap / speed - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    try:
                        res = await _send(http, base, s.id, c, t0, f"replay-{run_id}-{s.id}")
                    except Exception as exc:  # any failure is this call's result, not the run's
                        res = CallResult(s.id, c.index, c.exchange_id, time.perf_counter() - t0,
                                         error=f"{type(exc).__name__}: {exc}"[:300],
                                         expected_tokens=c.expected_tokens)
                    result.calls.append(res)
                    ended[c.index].set_result(time.perf_counter())
                    if progress is not None:
                        progress.update(res.error is None)

                await asyncio.gather(*(one_call(c) for c in s.calls))
            finally:
                if gate is not None:
                    gate.release()

        await asyncio.gather(*(one_session(s) for s in sessions))
    result.wall = time.perf_counter() - t0
    result.calls.sort(key=lambda c: (c.start, c.session, c.index))
    return result


async def _send(http: aiohttp.ClientSession, base: str, session: str, c: PlannedCall,
                t0: float, session_header: str) -> CallResult:
    """Send one call. It says its session (`X-Session-ID`): a replay sends the recorded
    answers, not the ones the target just wrote, so a proxy could not tell the calls of one
    session by their content (an agent resends the answers it got)."""
    sent = time.perf_counter()
    res = CallResult(session, c.index, c.exchange_id, sent - t0, expected_tokens=c.expected_tokens)
    chunks: list[tuple[float, bytes]] = []
    try:
        async with http.post(base + c.path, json=c.body,
                             headers={"X-Session-ID": session_header}) as resp:
            res.status = resp.status
            async for chunk in resp.content.iter_any():
                chunks.append((time.perf_counter() - sent, chunk))
            ctype = resp.headers.get("Content-Type", "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
        res.end = time.perf_counter() - t0
        return res
    res.end = time.perf_counter() - t0
    body = b"".join(b for _, b in chunks)
    if res.status != 200:
        res.error = f"HTTP {res.status}: {body[:300].decode('utf-8', 'replace')}"
        return res
    if "text/event-stream" not in ctype:
        res.error = f"expected a stream, got {ctype or 'no content type'}"
        return res
    stream = reassemble_stream(c.path, parse_sse(chunks))
    res.ttft = stream.first_token_at
    if stream.error:
        res.error = stream.error[:300]
    usage = stream.usage or {}
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    done = usage.get("completion_tokens", usage.get("output_tokens"))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    res.prompt_tokens = prompt if isinstance(prompt, int) else None
    res.completion_tokens = done if isinstance(done, int) else None
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    res.cached_tokens = cached if isinstance(cached, int) else None
    return res


def sessions_of_workflow(store, workflow_id: str) -> list[str]:
    """Captured sessions whose calls the learner places in `workflow_id`, oldest first.

    Learns from the whole store (the same `Learner` the proxy uses), then asks it which
    template each call got and which workflow that template belongs to.
    """
    from learn.learner import Learner

    learner = Learner()
    order: list[tuple[str, str]] = []
    for ex in store.exchanges():
        learner.observe(ex)
        order.append((ex.session_id or ex.id, ex.id))
    found: list[str] = []
    for session, ex_id in order:
        template = learner.template_of(ex_id)
        if template is not None and learner.graph.workflow_of(template) == workflow_id \
                and session not in found:
            found.append(session)
    return found
