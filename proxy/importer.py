"""Turn external traces into `Exchange` objects, the same ones the proxy captures.

Three formats, told apart by their content:

- trajectories: a JSON list of runs, each with `traj`, an OpenAI-format message list (the
  tau-bench files). The assistant message at index k becomes one exchange whose prompt is
  `traj[:k]` and whose answer is `traj[k]`; each run is one session. Tool schemas come from a
  `tools.json` beside the file when there is one.
- SWE-agent `.traj`: a JSON object whose `trajectory` steps hold the full model input
  (`messages`), the answer and the tool's `execution_time`, which becomes the gap before the
  next call.
- JSONL: one OpenAI request body per line, or a wrapper object with `request` (or `body`,
  as in the Batch API) and optionally `response`, `answer`, `path`/`url`, `session_id`,
  `started_at` and `timings` ({first_token, done} in seconds since the call started).

No timing is recorded in trajectory files: their calls get start times 1 ms apart within a
run (runs a minute apart) and no durations, which replay reads as "untimed". Such made-up
times lie in the past: the last untimed call starts `RUN_SPACING` before the file was last
written (or before now, if that is earlier), so an import never dates calls after the traffic
captured next. Exchange ids are derived from the file's name and the call's place in it, so
importing a file twice adds nothing the second time. Sessions come from
`learn.sessions.SessionLinker`, as for traffic; an imported call's `session_source` is the
linker's prefixed with `import:` (`import:new`, `import:prefix`, ...), which is how the store,
the CLI and the admin page tell imported calls from captured ones.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import xxhash

from learn.sessions import SessionLinker
from proxy.exchange import Exchange
from storage.store import IMPORTED_SOURCE

JSON_HEADERS = [("content-type", "application/json")]
RUN_SPACING = 60.0
"""Seconds between the runs of an untimed trajectory file: far enough apart that the learner
never takes two runs for agents of one workflow instance started together."""
CALL_SPACING = 0.001
PLACEHOLDER_MODEL = "imported"
"""The model recorded for calls of a file that names none (and no `--model` was given)."""
IMPORTED = IMPORTED_SOURCE
"""Prefix of an imported call's `session_source`."""


class TraceError(ValueError):
    """The file is not in a format preheat can import; the message says why."""


@dataclass(frozen=True)
class Trace:
    """What was read from a file: its format and its exchanges, in call order."""

    format: str
    exchanges: list[Exchange]

    @property
    def sessions(self) -> int:
        return len({ex.session_id for ex in self.exchanges})


def read_trace(path: str | Path, tools: str | Path | None = None, model: str | None = None,
               limit: int | None = None) -> Trace:
    """Read a trace file into analysed, session-linked exchanges (at most `limit` sessions)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path} is not UTF-8 text") from None
    stripped = text.lstrip()
    data = None
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # JSONL: several objects, one a line
    # Where made-up start times end: a run's spacing before the file was written (or now).
    last = min(os.path.getmtime(path), time.time()) - RUN_SPACING
    if isinstance(data, list) and data and all(isinstance(r, dict) and "traj" in r for r in data):
        tools_path = Path(tools) if tools else path.with_name("tools.json")
        schemas = _load_tools(tools_path) if tools or tools_path.exists() else None
        runs = data[:limit] if limit else data
        base = last - (len(runs) - 1) * RUN_SPACING
        return Trace("trajectories", list(_trajectories(path.name, runs, schemas, model, base)))
    if isinstance(data, dict) and isinstance(data.get("trajectory"), list):
        calls = list(_swe_agent(path.name, data["trajectory"], model, 0.0))
        shift = last - calls[-1].started_at if calls else 0.0  # the span: known once all are read
        for ex in calls:
            ex.started_at += shift
        return Trace("swe-agent", calls)
    if data is not None and not isinstance(data, dict):
        raise TraceError(f"{path}: a JSON list, but not of runs with a 'traj' message list")
    lines = stripped.splitlines() if data is None else [stripped]
    base = last - len(lines) * CALL_SPACING
    return Trace("jsonl", list(_jsonl(path.name, lines, model, base, limit)))


def _load_tools(path: Path) -> list:
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TraceError(f"cannot read the tool schemas in {path}: {exc}") from None
    if not isinstance(tools, list):
        raise TraceError(f"{path}: tool schemas must be a JSON list")
    return tools


def _id(source: str, *where: object) -> str:
    return xxhash.xxh3_128_hexdigest(":".join(map(str, (source, *where))).encode())[:24]


def _exchange(ex_id: str, path: str, body: dict, started: float) -> Exchange:
    ex = Exchange(method="POST", path=path, request_headers=list(JSON_HEADERS), id=ex_id,
                  started_at=started, status=200)
    ex.request_body = json.dumps(body, ensure_ascii=False).encode()
    return ex


def _finish(ex: Exchange, body: dict, answer: dict | None, linker: SessionLinker) -> Exchange:
    """Mark an imported call analysed, with its answer, and give it its session."""
    ex.analyzed = True
    ex.request_json = body
    ex.stream = bool(body.get("stream"))
    ex.model = body.get("model") if isinstance(body.get("model"), str) else None
    ex.answer = answer
    _link(ex, linker)
    return ex


def _link(ex: Exchange, linker: SessionLinker) -> None:
    link = linker.link(ex)
    ex.session_id, ex.parent_id = link.session_id, link.parent
    ex.session_source = IMPORTED + link.source


def _trajectories(source: str, runs: list[dict], tools: list | None, model: str | None,
                  base: float) -> Iterator[Exchange]:
    for r, run in enumerate(runs):
        traj = run.get("traj")
        if not isinstance(traj, list):
            continue
        linker = SessionLinker()  # one run, one session, whatever other runs said
        calls = 0
        for k, message in enumerate(traj):
            if not (isinstance(message, dict) and message.get("role") == "assistant") or k == 0:
                continue
            body: dict = {"model": model or PLACEHOLDER_MODEL, "messages": traj[:k]}
            if tools:
                body["tools"] = tools
            ex = _exchange(_id(source, r, k), "/v1/chat/completions", body,
                           base + r * RUN_SPACING + calls * CALL_SPACING)
            calls += 1
            yield _finish(ex, body, message, linker)


def _swe_agent(source: str, steps: list, model: str | None, base: float) -> Iterator[Exchange]:
    linker = SessionLinker()
    t = base
    for i, step in enumerate(steps):
        messages = step.get("messages") if isinstance(step, dict) else None
        if not isinstance(messages, list) or not messages:
            continue
        nxt = steps[i + 1].get("messages") if i + 1 < len(steps) else None
        answer = None
        if isinstance(nxt, list) and len(nxt) > len(messages) and \
                isinstance(nxt[len(messages)], dict) and nxt[len(messages)].get("role") == "assistant":
            answer = nxt[len(messages)]  # the answer as the agent resent it
        elif isinstance(step.get("response"), str):
            answer = {"role": "assistant", "content": step["response"]}
        body = {"model": model or PLACEHOLDER_MODEL, "messages": messages}
        ex = _exchange(_id(source, i), "/v1/chat/completions", body, t)
        gap = step.get("execution_time")
        t += (gap if isinstance(gap, (int, float)) and gap > 0 else 0.0) + CALL_SPACING
        yield _finish(ex, body, answer, linker)


def _jsonl(source: str, lines: Iterable[str], model: str | None, base: float,
           limit: int | None) -> Iterator[Exchange]:
    linker = SessionLinker()
    sessions: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise TraceError(f"{source} line {n}: not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{source} line {n}: expected a JSON object")
        ex = _raw_call(source, n, obj, model, base)
        _link(ex, linker)
        if limit and ex.session_id not in sessions and len(sessions) >= limit:
            continue
        sessions.add(ex.session_id or "")
        yield ex


def _raw_call(source: str, n: int, obj: dict, model: str | None, base: float) -> Exchange:
    """One JSONL line: a bare request body, or a wrapper with request and response."""
    body = obj.get("request", obj.get("body"))
    wrapped = isinstance(body, dict) and not any(k in obj for k in ("messages", "prompt", "input"))
    if not wrapped:
        body, obj = obj, {}
    body = dict(body)
    if model:
        body["model"] = model
    path = obj.get("path") or obj.get("url") or _path_of(body)
    started = obj.get("started_at")
    ex = _exchange(_id(source, n), str(path), body,
                   float(started) if isinstance(started, (int, float)) else base + n * CALL_SPACING)
    if isinstance(obj.get("session_id"), str):
        ex.request_headers.append(("x-session-id", obj["session_id"]))
    timings = obj.get("timings") if isinstance(obj.get("timings"), dict) else {}
    ex.t_first_token = _seconds(timings.get("first_token"))
    ex.t_done = _seconds(timings.get("done"))
    response = obj.get("response")
    if isinstance(response, dict) and isinstance(response.get("body"), dict):
        response = response["body"]  # Batch API output: {status_code, body}
    if isinstance(response, dict):
        ex.response_headers = list(JSON_HEADERS)
        ex.response_chunks = [(ex.t_done or 0.0, json.dumps(response).encode())]
    ex.analyze()  # the proxy's own parsing: the answer and usage come out as for traffic
    if ex.answer is None and isinstance(obj.get("answer"), dict):
        ex.answer = obj["answer"]
    if isinstance(obj.get("usage"), dict) and ex.usage is None:
        ex.usage = obj["usage"]
    return ex


def _path_of(body: dict) -> str:
    if "messages" in body:
        return "/v1/chat/completions"
    if "input" in body:
        return "/v1/responses"
    if "prompt" in body:
        return "/v1/completions"
    raise TraceError("a request has none of messages, input or prompt")


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


@dataclass(frozen=True)
class ImportResult:
    format: str
    exchanges: int
    """Exchanges written (those already in the store are not written again)."""
    sessions: int
    present: int
    """Exchanges of the file the store already held."""


def import_trace(trace: Trace, store, batch: int = 500) -> ImportResult:
    """Write a trace's exchanges through `Store.write`, skipping those already stored."""
    present = _stored_ids(store, [ex.id for ex in trace.exchanges])
    todo = [ex for ex in trace.exchanges if ex.id not in present]
    if todo:
        key = store.begin_import()
        try:
            for i in range(0, len(todo), batch):
                store.write(todo[i : i + batch])
                store.renew_import(key)
        finally:  # a server learns what was written now (and a restarted one, whatever its times)
            store.end_import(key)
    return ImportResult(trace.format, len(todo), len({ex.session_id for ex in todo}),
                        len(trace.exchanges) - len(todo))


def _stored_ids(store, ids: list[str]) -> set[str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session as OrmSession

    from storage.models import ExchangeRow

    found: set[str] = set()
    with OrmSession(store.engine) as db:
        for i in range(0, len(ids), 500):
            q = select(ExchangeRow.id).where(ExchangeRow.id.in_(ids[i : i + 500]))
            found.update(db.scalars(q))
    return found
