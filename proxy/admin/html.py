"""Escaped-by-default HTML for the admin pages.

Captured prompts are hostile input: a prompt may hold `<script>`. Every value that goes into
a page passes through `esc()` unless it is already `Safe` (markup this package built), so
forgetting to escape is impossible by construction: `html(template, **values)` escapes all
of its values. Pages carry no JavaScript at all, and the response's Content-Security-Policy
forbids scripts, so even a bug here could not run one.
"""

from __future__ import annotations

import html as _html
import json
import time
from typing import Any, Iterable


class Safe(str):
    """Markup built by this package: inserted as it is, never escaped again."""


def esc(value: Any) -> Safe:
    """`value` as HTML text (Safe values pass through)."""
    if isinstance(value, Safe):
        return value
    return Safe(_html.escape("" if value is None else str(value), quote=True))


def html(template: str, **values: Any) -> Safe:
    """`template.format(**values)` with every value escaped (a `Safe` value as it is)."""
    return Safe(template.format(**{k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


def link(href: str, text: Any, cls: str = "") -> Safe:
    return html('<a href="{h}"{c}>{t}</a>', h=href, t=text,
                c=Safe(f' class="{esc(cls)}"') if cls else "")


def table(headers: list[str], rows: Iterable[Iterable[Any]], cls: str = "") -> Safe:
    """A table; cells are escaped unless Safe. Numeric cells are right-aligned."""
    head = join(html("<th>{h}</th>", h=h) for h in headers)
    body = []
    for row in rows:
        cells = [
            html('<td class="num">{v}</td>', v=v) if isinstance(v, (int, float)) and
            not isinstance(v, bool) else html("<td>{v}</td>", v=v)
            for v in row
        ]
        body.append(html("<tr>{c}</tr>", c=join(cells)))
    if not body:
        return html('<p class="empty">nothing yet</p>')
    return html('<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>',
                cls=cls, h=head, b=join(body))


def pretty_json(value: Any) -> Safe:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return html('<pre class="json">{t}</pre>', t=text)


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def num(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def share(part: float | None, whole: float | None) -> str:
    if not whole or part is None:
        return "-"
    return f"{100 * part / whole:.1f}%"


NAV = (("/admin", "overview"), ("/admin/templates", "templates"),
       ("/admin/workflows", "workflows"), ("/admin/sessions", "sessions"))

CSS = """
:root { --fg:#1d2430; --mute:#667085; --line:#d9dee7; --bg:#f7f8fa; --accent:#2f6fde;
        --slot:#fff1c2; --slotfg:#7a4b00; --ok:#1a7f37; --bad:#c2352b; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#16202e; color:#fff; padding:10px 24px; display:flex; gap:22px;
         align-items:baseline; }
header b { font-size:16px; letter-spacing:.5px; }
header a { color:#c9d6ea; text-decoration:none; }
header a.on { color:#fff; border-bottom:2px solid #7fb0ff; }
header .json { margin-left:auto; font-size:12px; }
main { padding:18px 24px 48px; max-width:1500px; }
h1 { font-size:20px; margin:4px 0 14px; } h2 { font-size:16px; margin:22px 0 8px; }
a { color:var(--accent); }
table { border-collapse:collapse; background:#fff; border:1px solid var(--line);
        margin:6px 0 12px; }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:left;
         vertical-align:top; }
th { background:#eef1f6; font-weight:600; font-size:12px; color:#394456; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin-bottom:10px; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px 14px;
        min-width:170px; }
.card .v { font-size:22px; font-weight:600; } .card .k { color:var(--mute); font-size:12px; }
.mute, .empty { color:var(--mute); }
pre { background:#fff; border:1px solid var(--line); padding:8px 10px; overflow:auto;
      white-space:pre-wrap; word-break:break-word; max-height:520px; margin:4px 0; }
.tpl { white-space:pre-wrap; font-family:ui-monospace, Menlo, monospace; font-size:12.5px; }
.slot { background:var(--slot); color:var(--slotfg); border-radius:3px; padding:0 2px;
        font-weight:600; }
.msg { background:#fff; border:1px solid var(--line); border-left:4px solid #98a2b3;
       border-radius:4px; margin:6px 0; padding:6px 10px; }
.msg.system { border-left-color:#7c5cc4; } .msg.user { border-left-color:#2f6fde; }
.msg.assistant { border-left-color:var(--ok); } .msg.tool { border-left-color:#c97a00; }
.msg .role { font-size:11px; text-transform:uppercase; color:var(--mute); font-weight:600; }
.msg pre { border:0; padding:2px 0; margin:0; max-height:360px; }
details { margin:6px 0; } summary { cursor:pointer; color:#394456; }
.scroll { overflow:auto; border:1px solid var(--line); background:#fff; }
.bad { color:var(--bad); } .ok { color:var(--ok); }
.advice { background:#fff6e5; border:1px solid #f0c36d; padding:8px 12px; border-radius:4px; }
"""


def page(title: str, body: Any, active: str = "", json_href: str | None = None) -> Safe:
    """A whole admin page: header with navigation, then `body` (escaped unless Safe)."""
    nav = join(link(href, label, "on" if label == active else "") for href, label in NAV)
    json_link = link(json_href, "JSON", "json") if json_href else Safe("")
    return html(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>{title} · preheat</title><style>{css}</style></head>"
        "<body><header><b>preheat</b>{nav}{json}</header><main><h1>{title}</h1>{body}"
        "</main></body></html>",
        title=title, css=Safe(CSS), nav=nav, json=json_link, body=body,
    )
