"""What the admin pages read from the capture store. Synchronous: call from a worker thread.

Whole exchanges come from `Store` (`exchange`, `exchanges`, `sessions`); the summaries that
would otherwise load every message of every call (traffic, token sums, per-session totals)
select only the small columns of the exchanges table. Every function returns plain JSON-able
data: the JSON twin of a page is exactly what its HTML is drawn from.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from proxy.cli import exchange_summary
from storage.models import ExchangeRow
from storage.store import Store, captured_clause

_SMALL = (ExchangeRow.id, ExchangeRow.session_id, ExchangeRow.path, ExchangeRow.status,
          ExchangeRow.started_at, ExchangeRow.t_first_token, ExchangeRow.t_done,
          ExchangeRow.usage, ExchangeRow.cached_tokens, ExchangeRow.error, ExchangeRow.model,
          ExchangeRow.cache, ExchangeRow.stream)


def _tokens(usage: Any) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a usage object of any of the three APIs."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    done = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else 0), (done if isinstance(done, int) else 0)


def overview(store: Store, recent: int = 50_000) -> dict:
    """Traffic, tokens and the estimated prefill time the cached tokens saved. Traffic is
    the calls captured: imported traces (`preheat import`) are counted, not taken for
    traffic (they are dated when their trace says, and carry no timings)."""
    counts = store.count()
    with OrmSession(store.engine) as db:
        rows = db.execute(select(*_SMALL).where(captured_clause())
                          .order_by(ExchangeRow.started_at.desc()).limit(recent)).all()
        by_route = Counter()
        for path, status, n in db.execute(select(ExchangeRow.path, ExchangeRow.status, func.count())
                                          .where(captured_clause())
                                          .group_by(ExchangeRow.path, ExchangeRow.status)):
            by_route[(path, status)] += n
    prompt = completion = cached = errors = 0
    ttfts: list[float] = []
    fit: list[tuple[int, float]] = []
    for r in rows:
        p, c = _tokens(r.usage)
        prompt, completion, cached = prompt + p, completion + c, cached + (r.cached_tokens or 0)
        errors += bool(r.error) or (r.status or 200) >= 400
        if r.t_first_token is not None and (r.status or 0) < 400:
            ttfts.append(r.t_first_token)
            if p:
                fit.append((p - (r.cached_tokens or 0), r.t_first_token))
    per_token = prefill_seconds_per_token(fit)
    first = min((r.started_at for r in rows), default=None)
    last = max((r.started_at for r in rows), default=None)
    return {
        "counts": counts,
        "window": {"calls": len(rows), "first_at": first, "last_at": last},
        "routes": [{"path": p, "status": s, "calls": n} for (p, s), n in
                   sorted(by_route.items(), key=lambda kv: -kv[1])],
        "errors": errors,
        "tokens": {"prompt": prompt, "completion": completion, "cached": cached,
                   "cached_share": cached / prompt if prompt else None},
        "ttft": _quantiles(ttfts),
        "saved": {
            "seconds_per_prefill_token": per_token,
            "seconds": cached * per_token if per_token else None,
            "method": "cached prompt tokens x the prefill time per token, fitted as the slope "
                      "of time to first token against uncached prompt tokens over these calls",
        },
        "per_minute": _per_minute([r.started_at for r in rows], last),
    }


def prefill_seconds_per_token(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of TTFT against uncached prompt tokens; None without a signal."""
    if len(points) < 5:
        return None
    xs = [x for x, _ in points]
    if max(xs) - min(xs) < 16:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / var
    return slope if slope > 0 else None


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None}
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"n": len(values), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def _per_minute(times: list[float], last: float | None, minutes: int = 60) -> list[int]:
    """Calls per minute over the last `minutes` minutes of traffic, oldest first."""
    out = [0] * minutes
    if last is None:
        return out
    for t in times:
        back = int((last - t) // 60)
        if 0 <= back < minutes:
            out[minutes - 1 - back] += 1
    return out


def sessions(store: Store, limit: int = 200) -> list[dict]:
    """Sessions, newest first, each with its totals."""
    found = store.sessions(limit=limit)
    ids = [s["id"] for s in found]
    totals: dict[str, dict] = {i: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                   "cached_tokens": 0, "errors": 0, "end": None, "timed": False,
                                   "models": set()} for i in ids}
    if ids:
        with OrmSession(store.engine) as db:
            for i in range(0, len(ids), 500):
                q = select(*_SMALL).where(ExchangeRow.session_id.in_(ids[i : i + 500]))
                for r in db.execute(q):
                    t = totals[r.session_id]
                    p, c = _tokens(r.usage)
                    t["calls"] += 1
                    t["prompt_tokens"] += p
                    t["completion_tokens"] += c
                    t["cached_tokens"] += r.cached_tokens or 0
                    t["errors"] += bool(r.error) or (r.status or 200) >= 400
                    end = r.started_at + (r.t_done or 0.0)
                    t["end"] = end if t["end"] is None else max(t["end"], end)
                    t["timed"] |= r.t_done is not None
                    if r.model:
                        t["models"].add(r.model)
    out = []
    for s in found:
        t = totals[s["id"]]
        out.append({
            "id": s["id"], "source": s["source"], "tenant": s["tenant"],
            "first_at": s["first_at"], "last_at": s["last_at"], "calls": t["calls"],
            "duration": (t["end"] - s["first_at"]) if t["timed"] and t["end"] else None,
            "prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
            "cached_tokens": t["cached_tokens"], "errors": t["errors"],
            "models": sorted(t["models"]),
        })
    return out


def session(store: Store, session_id: str) -> dict | None:
    """One session's calls on one time axis: start, first token and end of each call (seconds
    since the session's first call), and the gap before it (tool or think time)."""
    meta = store.session(session_id)
    if meta is None:
        return None
    calls = list(store.exchanges(session_id=session_id))
    t0 = calls[0].started_at if calls else 0.0
    ends: dict[str, float] = {}
    out = []
    prev_end: float | None = None
    for ex in calls:
        start = ex.started_at - t0
        end = start + ex.t_done if ex.t_done is not None else None
        parent_end = ends.get(ex.parent_id or "", prev_end)
        p, c = _tokens(ex.usage)
        answer = ex.answer or {}
        tools = [str((tc.get("function") or {}).get("name")) for tc in answer.get("tool_calls") or []
                 if isinstance(tc, dict)]
        out.append({
            "id": ex.id, "start": start, "first_token": ex.t_first_token, "end": end,
            "held": ex.t_upstream_sent,
            "gap_before": (start - parent_end) if parent_end is not None and ex.t_done is not None
            else None,
            "parent_id": ex.parent_id, "status": ex.status, "error": ex.error, "stream": ex.stream,
            "messages": len(ex.messages), "prompt_tokens": p, "completion_tokens": c,
            "cached_tokens": ex.cached_tokens, "cache": ex.cache, "model": ex.model,
            "answer": "tool calls: " + ", ".join(tools) if tools else
            _clip(answer.get("content") if isinstance(answer.get("content"), str) else ""),
        })
        if end is not None:
            ends[ex.id] = end
            prev_end = end if prev_end is None else max(prev_end, end)
    timed = any(c["end"] is not None for c in out)
    return {**meta, "calls": out, "timed": timed,
            "span": max((c["end"] or c["start"] for c in out), default=0.0)}


def _clip(text: str, n: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def exchange(store: Store, exchange_id: str) -> dict | None:
    """One exchange as the CLI shows it (`preheat show --json`), plus what the page adds."""
    ex = store.exchange(exchange_id)
    if ex is None:
        return None
    data = exchange_summary(ex)
    data.update({
        "query": ex.query,
        "request_headers": [list(h) for h in ex.request_headers],
        "response_headers": [list(h) for h in ex.response_headers],
        "response": ex.response_json,
        "response_raw": None if ex.response_json is not None or ex.stream or not ex.response_chunks
        else ex.response_body.decode("utf-8", errors="replace"),
        "cache": ex.cache,
        "added_latency": ex.added_latency,
        "cached_tokens": ex.cached_tokens,
        "timings": {**data["timings"], "first_byte": ex.t_first_byte},
    })
    return data


def recent_exchange_ids(store: Store, n: int = 5_000) -> list[str]:
    """The newest exchange ids, newest first (to find example calls of a template)."""
    with OrmSession(store.engine) as db:
        q = select(ExchangeRow.id).order_by(ExchangeRow.started_at.desc()).limit(n)
        return list(db.scalars(q))


def exchange_ids_after(store: Store, seen: set[str]) -> list[str]:
    """Ids of stored exchanges not in `seen`, in arrival order."""
    with OrmSession(store.engine) as db:
        q = select(ExchangeRow.id).order_by(ExchangeRow.started_at, ExchangeRow.id)
        return [i for i in db.scalars(q) if i not in seen]
