"""A session's timeline as server-side SVG: its LLM calls and the tool gaps between them on
one time axis, one row per call, with each call's cached share of its prompt beside it.

A call's bar is grey while preheat held it before sending it on (admission's queue, when the
engine's cache is under pressure), dark up to its first token (the engine's queueing and
prefill: what a warm prefix cache shortens) and light after it (decoding). The dashed orange
line before a bar is the gap since the call it continues ended: the agent's tool or think time.
"""

from __future__ import annotations

import math
from urllib.parse import quote

from proxy.admin.html import Safe, html, join, num, secs

LEFT, PLOT, RIGHT = 56, 860, 220
HELD_SHOWN = 0.01
"""Seconds before a call went upstream below which its hold is not drawn (parsing alone)."""
ROW, TOP = 24, 34


def _ticks(span: float) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering 0..span."""
    if span <= 0:
        return [0.0]
    raw = span / 8
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [round(i * step, 6) for i in range(int(span / step + 1e-9) + 1)]


def render(calls: list[dict], span: float) -> Safe:
    span = max(span, 1e-3)

    def x(t: float) -> float:
        return LEFT + PLOT * t / span

    height = TOP + ROW * len(calls) + 16
    parts: list[Safe] = []
    for t in _ticks(span):
        parts.append(html(
            '<line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#e3e7ee"/>'
            '<text x="{x}" y="20" text-anchor="middle" class="tick">{t}</text>',
            x=f"{x(t):.1f}", y0=TOP - 8, y1=height - 10, t=secs(t)))
    for i, c in enumerate(calls):
        y = TOP + i * ROW
        row: list[Safe] = [html('<text x="{x}" y="{y}" text-anchor="end" class="tick">#{n}</text>',
                                x=LEFT - 8, y=y + 15, n=i + 1)]
        start, end, first = c["start"], c["end"], c["first_token"]
        if c.get("gap_before"):
            g0 = start - c["gap_before"]
            row.append(html(
                '<line x1="{a}" y1="{y}" x2="{b}" y2="{y}" stroke="#c97a00" stroke-width="2" '
                'stroke-dasharray="4 3"><title>tool gap {g}</title></line>',
                a=f"{x(g0):.1f}", b=f"{x(start):.1f}", y=y + 11, g=secs(c["gap_before"])))
            if x(start) - x(g0) > 60:
                row.append(html('<text x="{m}" y="{y}" text-anchor="middle" class="gap">{g}</text>',
                                m=f"{(x(g0) + x(start)) / 2:.1f}", y=y + 7, g=secs(c["gap_before"])))
        held = c.get("held") or 0.0
        shown = end is not None and HELD_SHOWN <= held < end - start
        sent = start + held if shown else start  # when the engine got it
        if shown:
            row.append(html('<rect x="{a}" y="{y}" width="{w}" height="14" fill="#b9c0cc"/>',
                            a=f"{x(start):.1f}", y=y + 4, w=f"{x(sent) - x(start):.1f}"))
        if end is not None:
            split = start + first if first is not None and first <= (end - start) else end
            split = max(split, sent)
            bad = c.get("error") or (c.get("status") or 200) >= 400
            row.append(html(
                '<rect x="{a}" y="{y}" width="{w1}" height="14" fill="{f1}"/>'
                '<rect x="{b}" y="{y}" width="{w2}" height="14" fill="{f2}"/>',
                a=f"{x(sent):.1f}", b=f"{x(split):.1f}", y=y + 4,
                w1=f"{max(x(split) - x(sent), 1.5):.1f}", w2=f"{max(x(end) - x(split), 0):.1f}",
                f1="#c2352b" if bad else "#2f5fb0", f2="#f0a8a2" if bad else "#9dbdf0"))
        else:
            row.append(html('<circle cx="{a}" cy="{y}" r="4" fill="#2f5fb0"/>',
                            a=f"{x(start):.1f}", y=y + 11))
        row.append(_cached_bar(c, LEFT + PLOT + 14, y))
        title = (f"call {i + 1}: starts at {secs(start)}, "
                 + (f"held by preheat {secs(held)}, " if shown else "")
                 + f"first token {secs(first)}, "
                 f"done at {secs(end)}; {num(c['prompt_tokens'])} prompt tokens, "
                 f"{num(c['cached_tokens'])} cached, {num(c['completion_tokens'])} generated")
        parts.append(html('<a href="/admin/exchanges/{id}"><g class="call"><title>{t}</title>'
                          '<rect x="0" y="{y}" width="{w}" height="{h}" fill="transparent"/>{r}'
                          "</g></a>", id=quote(c["id"], safe=""), t=title, y=y, w=LEFT + PLOT,
                          h=ROW, r=join(row)))
    width = LEFT + PLOT + RIGHT
    style = Safe("<style>.tick{font:11px system-ui,sans-serif;fill:#667085}"
                 ".gap{font:10px system-ui,sans-serif;fill:#9a5d00}"
                 ".cached{font:11px system-ui,sans-serif;fill:#1d2430}"
                 ".call:hover rect:first-of-type{fill:#eef3fb}</style>")
    return html('<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{w}" '
                'height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="session timeline">'
                '{s}<text x="{cx}" y="20" class="tick">cached / prompt tokens</text>{p}</svg>',
                w=width, h=height, s=style, cx=LEFT + PLOT + 14, p=join(parts))


def _cached_bar(c: dict, x0: float, y: float) -> Safe:
    prompt, cached = c.get("prompt_tokens") or 0, c.get("cached_tokens") or 0
    if not prompt:
        return html('<text x="{x}" y="{y}" class="cached mute">no usage</text>', x=x0, y=y + 15)
    w = 80
    fill = w * min(cached / prompt, 1.0)
    return html(
        '<rect x="{x}" y="{y}" width="{w}" height="10" fill="#e7ebf2"/>'
        '<rect x="{x}" y="{y}" width="{f}" height="10" fill="#1a7f37"/>'
        '<text x="{tx}" y="{ty}" class="cached">{c} / {p}</text>',
        x=f"{x0:.0f}", y=y + 6, w=w, f=f"{fill:.1f}", tx=f"{x0 + w + 6:.0f}", ty=y + 15,
        c=num(cached), p=num(prompt))
