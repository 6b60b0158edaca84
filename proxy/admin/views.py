"""HTML for the overview, templates and workflows pages, drawn from their JSON data."""

from __future__ import annotations

from typing import Any

from proxy.admin.graph import Edge, Node, render
from proxy.admin.html import Safe, html, join, link, num, page, pretty_json, secs, share, table, when


def _card(value: Any, key: str) -> Safe:
    return html('<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>',
                v=value, k=key)


def _sparkline(values: list[int], width: int = 360, height: int = 46) -> Safe:
    top = max(values, default=0) or 1
    bar = width / max(len(values), 1)
    rects = join(
        html('<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="#2f6fde"><title>{t}</title></rect>',
             x=f"{i * bar:.1f}", y=f"{height - v / top * height:.1f}", w=f"{max(bar - 1, 1):.1f}",
             h=f"{v / top * height:.1f}", t=f"{len(values) - i} min ago: {v} calls")
        for i, v in enumerate(values)
    )
    return html('<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
                'role="img" aria-label="calls per minute">{r}</svg>', w=width, h=height, r=rects)


def overview(d: dict) -> Safe:
    c, tok, ttft, saved = d["counts"], d["tokens"], d["ttft"], d["saved"]
    cards = join([
        _card(num(c["exchanges"] - c["imported"]), "calls captured"),
        *([_card(num(c["imported"]), "calls imported")] if c["imported"] else []),
        _card(num(c["sessions"]), "sessions"),
        _card(share(tok["cached"], tok["prompt"]), "prompt tokens served from cache"),
        _card(secs(saved["seconds"]) if saved["seconds"] is not None else "-",
              "prefill time saved (estimate)"),
        _card(secs(ttft["p50"]), "median time to first token"),
        _card(num(d["errors"]), "errors"),
    ])
    engine = d.get("engine")
    if engine:
        rows = [(k, v) for k, v in engine.items()]
        engine_html = table(["engine", ""], rows)
    else:
        engine_html = html('<p class="mute">No embedded engine: forwarding to {u}.</p>',
                           u=d.get("upstream") or "the configured upstream")
    tokens = table(["tokens", "count"], [
        ("prompt", tok["prompt"]), ("of which cached", tok["cached"]),
        ("completion", tok["completion"]),
    ])
    per = saved["seconds_per_prefill_token"]
    method = html('<p class="mute">Time saved: {m}{r}.</p>', m=saved["method"],
                  r=f" ({per * 1e6:.1f} µs per token)" if per else "; not enough timed calls yet")
    routes = table(["route", "status", "calls"],
                   [(r["path"], r["status"] if r["status"] is not None else "-", r["calls"])
                    for r in d["routes"]])
    latency = table(["time to first token", "seconds"],
                    [(k, secs(ttft[k])) for k in ("p50", "p90", "p99")] + [("calls", ttft["n"])])
    window = d["window"]
    body = join([
        html('<div class="cards">{c}</div>', c=cards),
        html("<h2>Calls per minute</h2>{s}<p class=\"mute\">last hour of traffic, up to {t}</p>",
             s=_sparkline(d["per_minute"]), t=when(window["last_at"])),
        html('<h2>Engine</h2>{e}', e=engine_html),
        _optimisations(d.get("optimisations") or []),
        html('<h2>Traffic</h2><div class="cards">{a}{b}{l}</div>{m}', a=routes, b=tokens,
             l=latency, m=method),
        html('<p class="mute">Token figures cover the newest {n} calls ({f} to {t}); cached '
             "tokens are the upstream's usage.prompt_tokens_details.cached_tokens.</p>",
             n=num(window["calls"]), f=when(window["first_at"]), t=when(window["last_at"])),
    ])
    return page("Overview", body, "overview", "/admin.json")


def _optimisations(rows: list[dict]) -> Safe:
    """Each optimisation: its state, its switch, and what it has done since the start."""
    if not rows:
        return html("")
    figures = [join((html("<div>{k}: <b>{v}</b></div>", k=k, v=v) for k, v in r["figures"]))
               for r in rows]
    return html('<h2>Optimisations</h2>{t}<p class="mute">Since preheat started; the same '
                'figures are in <a href="/metrics">/metrics</a>. Each has its own switch (flag '
                '/ environment variable).</p>',
                t=table(["optimisation", "state", "switch", "so far"],
                        [(r["name"], r["state"], html("<code>{s}</code>", s=r["switch"]), f)
                         for r, f in zip(rows, figures)]))


# -- templates ----------------------------------------------------------------------------------


def template_text(lines: list[dict]) -> Safe:
    """Template lines with their `{slots}` highlighted."""
    out = []
    for line in lines:
        pieces = [esc_part(line["parts"][0])]
        for slot, part in zip(line["slots"], line["parts"][1:]):
            pieces.append(html('<span class="slot">{{{s}}}</span>', s=slot))
            pieces.append(esc_part(part))
        out.append(html('<div><span class="mute">{r}:</span> {t}</div>', r=line["role"],
                        t=join(pieces)))
    return html('<div class="tpl">{l}</div>', l=join(out))


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def esc_part(text: str, limit: int = 20_000) -> Safe:
    return html("{t}", t=text if len(text) <= limit else text[:limit] + " …")


def templates(d: dict) -> Safe:
    rows = [
        (link(f"/admin/templates/{t['id']}", t["label"]), t["calls"], t["sessions"],
         t["prefix_tokens"], link(f"/admin/workflows/{t['workflow']}", t["workflow"]),
         html('<span class="mute">{p}</span>', p=", ".join(t["tools"])[:80]))
        for t in d["templates"]
    ]
    calls = table(["call template", "calls", "sessions", "static prefix (tokens)", "workflow",
                   "tools"], rows)
    msg_rows = [
        (m["role"], template_text([{"role": m["role"], "parts": [_clip(p) for p in m["parts"]],
                                    "slots": m["slots"]}]), m["messages"], m["sessions"])
        for m in d["message_templates"][:200]
    ]
    msgs = table(["role", "message template", "messages", "sessions"], msg_rows)
    body = join([
        html('<p class="mute">A call template is a kind of call, whatever its data: its route, '
             "tools, leading messages and the shape of its newest turn. {n} learned so far.</p>",
             n=len(d["templates"])),
        calls, html("<h2>Message templates</h2>"), msgs,
    ])
    return page("Templates", body, "templates", "/admin/templates.json")


def template(d: dict) -> Safe:
    examples = join(html("<li>{a}</li>", a=link(f"/admin/exchanges/{e}", e)) for e in d["examples"])
    edges = table(["from", "to", "probability", "typical gap", "count"], [
        (link(f"/admin/templates/{e['src']}", d["names"].get(e["src"], e["src"])),
         link(f"/admin/templates/{e['dst']}", d["names"].get(e["dst"], e["dst"])),
         f"{e['probability']:.0%}", secs(e["gap_p50"]), e["count"]) for e in d["edges"]
    ])
    advice = html('<p class="advice">{a}</p>', a=d["advice"]) if d.get("advice") else Safe("")
    facts = table(["", ""], [
        ("id", d["id"]), ("calls", d["calls"]), ("sessions", d["sessions"]),
        ("static prefix", f"{d['prefix_tokens']:,} tokens"),
        ("workflows", join((link(f"/admin/workflows/{w}", w) for w in d["workflows"]), ", ")),
    ])
    body = join([
        advice, facts, html("<h2>Template</h2>{t}", t=template_text(d["lines"])),
        html("<h2>Transitions</h2>{e}", e=edges),
        html('<h2>Example calls</h2><ul>{x}</ul>', x=examples or html("<li class=\"mute\">none "
                                                                       "among recent calls</li>")),
    ])
    return page(f"Template {d['label']}", body, "templates", f"/admin/templates/{d['id']}.json")


# -- workflows ----------------------------------------------------------------------------------


def workflows(d: dict) -> Safe:
    rows = [(link(f"/admin/workflows/{w['id']}", w["id"]), w["instances"], f"{w['width']:.1f}",
             w["nodes"], w["edges"], ", ".join(w["entries"])[:120]) for w in d["workflows"]]
    body = join([
        html('<p class="mute">Call templates that follow one another form a workflow; each '
             "graph is learned from the traffic.</p>"),
        table(["workflow", "instances", "agents starting together", "templates", "edges",
               "entry templates"], rows),
    ])
    return page("Workflows", body, "workflows", "/admin/workflows.json")


def edge_label(e: dict) -> str:
    gap = e.get("gap_p50") or 0.0
    return f"{e['probability']:.0%}" + (f" · {secs(gap)}" if gap >= 0.0005 else "")


def workflow(d: dict) -> Safe:
    nodes = [Node(n["template"], n["label"], f"{n['calls']:,} calls · {secs(n['duration_p50'])}",
                  href=f"/admin/templates/{n['template']}", entry=n["template"] in d["entries"],
                  title=n["text"]) for n in d["nodes"]]
    edges = [Edge(e["src"], e["dst"], edge_label(e), e["probability"],
                  f"{e['probability']:.0%} of calls go on to it, {e['count']} times; "
                  f"gap p50 {secs(e['gap_p50'])}, p90 {secs(e['gap_p90'])}; "
                  f"{e['data_flow']:.0%} data flow")
             for e in d["edges"]]
    names = {n["template"]: n["label"] for n in d["nodes"]}
    edge_rows = [(names.get(e["src"], e["src"]), names.get(e["dst"], e["dst"]),
                  f"{e['probability']:.0%}", secs(e["gap_p50"]), secs(e["gap_p90"]),
                  f"{e['fan_out']:.1f}", f"{e['data_flow']:.0%}", e["count"]) for e in d["edges"]]
    body = join([
        html('<p class="mute">{i} instances; {w} agents start together. Nodes are call '
             "templates (blue: where instances start), edges are transitions labelled with "
             "their probability and typical tool time; dashed edges go back. Hover for details."
             "</p>", i=d["instances"], w=f"{d['width']:.1f}"),
        html('<div class="scroll">{g}</div>', g=render(nodes, edges)),
        html("<h2>Edges</h2>"),
        table(["from", "to", "probability", "gap p50", "gap p90", "fan-out", "data flow",
               "count"], edge_rows),
        html("<details><summary>As JSON</summary>{j}</details>", j=pretty_json(d)),
    ])
    return page(f"Workflow {d['id']}", body, "workflows", f"/admin/workflows/{d['id']}.json")
