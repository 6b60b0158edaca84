"""HTML for the sessions list, a session's timeline, and one exchange, from their JSON data."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from learn.canonical import arguments_of, function_of
from proxy.admin import timeline
from proxy.admin.html import (Safe, html, join, link, num, page, pretty_json, secs, share, table,
                              when)


def _q(value: str) -> str:
    return quote(value, safe="")


def sessions(d: dict) -> Safe:
    rows = [
        (link(f"/admin/sessions/{_q(s['id'])}", s["id"][:48]), s["source"], s["calls"],
         when(s["first_at"]), secs(s["duration"]), s["prompt_tokens"],
         share(s["cached_tokens"], s["prompt_tokens"]), s["completion_tokens"], s["errors"],
         ", ".join(s["models"])[:40])
        for s in d["sessions"]
    ]
    body = join([
        html('<p class="mute">Calls are grouped into sessions by the id a client sent, or, for '
             "agents that send none, because each call continues an earlier call's "
             "conversation. Newest first.</p>"),
        table(["session", "linked by", "calls", "started", "duration", "prompt tokens",
               "cached", "completion tokens", "errors", "model"], rows),
    ])
    return page("Sessions", body, "sessions", "/admin/sessions.json")


def session(d: dict) -> Safe:
    calls = d["calls"]
    if d["timed"]:
        chart = html('<div class="scroll">{t}</div><p class="mute">Bars: dark until the first '
                     "token (waiting and prefill), light while decoding; dashed orange: the tool "
                     "gap since the call it continues ended. Right: cached share of each "
                     "prompt. Click a call for its details.</p>",
                     t=timeline.render(calls, d["span"]))
    else:
        chart = html('<p class="mute">No timings were recorded for these calls (an imported '
                     "trace), so there is no timeline; the calls are listed in order.</p>")
    templates = d.get("templates") or {}
    rows = [
        (i + 1, link(f"/admin/exchanges/{_q(c['id'])}", c["id"]),
         secs(c["start"]) if d["timed"] else "-", secs(c["gap_before"]),
         secs(c["first_token"]), secs(c["end"] - c["start"]) if c["end"] is not None else "-",
         c["messages"], c["prompt_tokens"], c["cached_tokens"] if c["cached_tokens"] is not None
         else "-", c["completion_tokens"],
         link(f"/admin/templates/{templates[c['id']]}", templates[c["id"]])
         if c["id"] in templates else "-",
         html('<span class="{c}">{s}</span>', c="bad" if c["error"] or (c["status"] or 200) >= 400
              else "", s=c["error"] or c["status"]),
         c["answer"])
        for i, c in enumerate(calls)
    ]
    total = sum(c["prompt_tokens"] for c in calls)
    cached = sum(c["cached_tokens"] or 0 for c in calls)
    facts = html('<p>{n} calls, linked by <b>{src}</b>; {p} prompt tokens, {c} cached; '
                 "started {t}.</p>", n=len(calls), src=d["source"], p=num(total),
                 c=share(cached, total), t=when(d["first_at"]))
    body = join([
        facts, chart, html("<h2>Calls</h2>"),
        table(["#", "exchange", "starts at", "tool gap before", "first token", "duration",
               "messages", "prompt tokens", "cached", "completion", "template", "status",
               "answer"], rows),
    ])
    return page(f"Session {d['id'][:60]}", body, "sessions", f"/admin/sessions/{_q(d['id'])}.json")


# -- one exchange ------------------------------------------------------------------------------


def _content(value: Any) -> Safe:
    if isinstance(value, str):
        return html("<pre>{t}</pre>", t=value)
    if value is None:
        return Safe("")
    return pretty_json(value)


def _message(m: Any) -> Safe:
    if not isinstance(m, dict):
        return pretty_json(m)
    role = str(m.get("role") or m.get("type") or "?")
    extra = []
    calls = m.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        if isinstance(call, dict):
            fn = function_of(call)
            extra.append(html('<div class="mute">tool call {id}: <b>{n}</b></div>{a}',
                              id=call.get("id") or "", n=fn.get("name"),
                              a=_content(arguments_of(fn.get("arguments")))))
    if m.get("tool_call_id"):
        extra.insert(0, html('<div class="mute">result of {i}</div>', i=m["tool_call_id"]))
    body = m.get("content") if "content" in m else {k: v for k, v in m.items() if k != "role"}
    return html('<div class="msg {cls}"><div class="role">{r}</div>{x}{b}</div>',
                cls=role if role in ("system", "user", "assistant", "tool") else "", r=role,
                x=join(extra), b=_content(body))


def exchange(d: dict) -> Safe:
    request = d["request"] if isinstance(d["request"], dict) else {}
    messages = request.get("messages") or request.get("input") or []
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(request.get("prompt"), str):
        messages = [{"role": "prompt", "content": request["prompt"]}]
    params = [(k, json.dumps(v, ensure_ascii=False)[:200]) for k, v in request.items()
              if k not in ("messages", "input", "prompt", "tools")]
    t = d["timings"]
    facts = table(["", ""], [
        ("call", f"{d['method']} {d['path']} → {d['status']}"),
        ("session", link(f"/admin/sessions/{_q(d['session_id'])}", d["session_id"])
         if d["session_id"] else "-"),
        ("linked by", d["session_source"] or "-"),
        ("continues", link(f"/admin/exchanges/{_q(d['parent_id'])}", d["parent_id"])
         if d["parent_id"] else "-"),
        ("model", d["model"] or "-"), ("started", when(d["started_at"])),
        ("first token", secs(t["first_token"])), ("done", secs(t["done"])),
        ("sent upstream after", secs(t["upstream_sent"])),
        ("added by preheat", secs(d["added_latency"])), ("prompt cache", d["cache"] or "-"),
        ("usage", json.dumps(d["usage"]) if d["usage"] else "-"),
        ("error", d["error"] or d["request_error"] or "-"),
    ])
    tools = request.get("tools") or []
    tool_names = ", ".join(str((x.get("function") or {}).get("name") or x.get("name"))
                           for x in tools if isinstance(x, dict))
    answer = _message(d["answer"]) if d["answer"] else html('<p class="mute">no answer</p>')
    events = d.get("events") or []
    event_rows = [(secs(e.get("t")), e.get("event") or "", html("<code>{x}</code>",
                                                               x=(e.get("data") or "")[:600]))
                  for e in events]
    raw_response: Any = d.get("response") if d.get("response") is not None else d.get("response_raw")
    body = join([
        facts,
        html("<h2>Request</h2>"),
        table(["parameter", "value"], params),
        html("<details><summary>{n} tools: {names}</summary>{j}</details>", n=len(tools),
             names=tool_names[:300], j=pretty_json(tools)) if tools else Safe(""),
        join(_message(m) for m in messages),
        html("<h2>Answer</h2>{a}", a=answer),
        html("<h2>Stream: {n} events</h2>{t}", n=len(events),
             t=table(["at", "event", "data"], event_rows)) if events else Safe(""),
        html("<h2>Raw</h2><details><summary>request body</summary>{rq}</details>"
             "<details><summary>response body</summary>{rs}</details>"
             "<details><summary>headers</summary>{h}</details>",
             rq=pretty_json(d["request"]), rs=_content(raw_response) if raw_response is not None
             else html('<p class="mute">a stream: see its events above</p>'),
             h=pretty_json({"request": d["request_headers"], "response": d["response_headers"]})),
    ])
    return page(f"Exchange {d['id']}", body, "sessions", f"/admin/exchanges/{_q(d['id'])}.json")
