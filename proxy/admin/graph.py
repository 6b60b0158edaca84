"""Draw a directed graph (a workflow DAG) as server-side SVG, left to right by layers.

A small Sugiyama layout: the edges that lead away from the entry templates (breadth-first
distance grows along them) form a DAG, and each node goes to the layer after its longest
path in it, so an agent's tool loop (hub -> tool step -> hub) stays two layers deep instead of
one long chain. Edges that span several layers get invisible waypoints ("dummy" nodes, which
reserve room so edges do not cross nodes), and barycenter sweeps order each layer to cut
crossings. Edges that go back are drawn dashed, entering and leaving nodes lower down so a
two-way pair stays two lines; edges within a layer are arcs beside it; self-loops are small
arcs above their node. Sizes are fixed
in pixels, so a graph of 20+ nodes scrolls rather than shrinking into unreadability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.admin.html import Safe, html, join

NODE_W, NODE_H = 200, 46
LAYER_GAP = 130  # horizontal room between layers: edge labels live there
ROW_GAP = 22
DUMMY_H = 12
MARGIN = 30
SWEEPS = 8


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    sub: str = ""
    href: str | None = None
    entry: bool = False
    title: str = ""
    """Full text shown on hover."""


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str = ""
    weight: float = 1.0
    """0..1: how strongly to draw it (probability)."""
    title: str = ""


@dataclass
class Layout:
    """Where everything went: node boxes (x, y of the top-left corner) and edge polylines."""

    boxes: dict[str, tuple[float, float]] = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    routes: list[tuple[Edge, list[tuple[float, float]], bool]] = field(default_factory=list)
    """(edge, points from its source to its target, whether it goes back)."""
    width: float = 0.0
    height: float = 0.0


def layout(nodes: list[Node], edges: list[Edge]) -> Layout:
    ids = [n.id for n in nodes]
    known = set(ids)
    edges = [e for e in edges if e.src in known and e.dst in known]
    # Layers: the longest path over a DAG made of the edges between strongly connected
    # components and, inside one, the edges that lead away from the entries (breadth-first
    # distance grows along them). A tool loop's edges back to its hub do not stretch the
    # drawing into one long chain; a real DAG keeps its longest-path layers.
    dist = _distances(nodes, edges)
    scc = _components(ids, edges)
    layer = _longest_path_layers(ids, [(e.src, e.dst) for e in edges if scc[e.src] != scc[e.dst]
                                       or dist[e.dst] > dist[e.src]])
    same = {(e.src, e.dst) for e in edges if e.src != e.dst and layer[e.src] == layer[e.dst]}
    back = {(e.src, e.dst) for e in edges if layer[e.dst] < layer[e.src]}
    spans = {(e.dst, e.src) if (e.src, e.dst) in back else (e.src, e.dst)
             for e in edges if e.src != e.dst and (e.src, e.dst) not in same}

    # Waypoints for edges spanning more than one layer.
    order: dict[int, list[str]] = {}
    for v in ids:
        order.setdefault(layer[v], []).append(v)
    chains: dict[tuple[str, str], list[str]] = {}
    links: list[tuple[str, str]] = []
    for a, b in sorted(spans):
        chain = [a]
        for lv in range(layer[a] + 1, layer[b]):
            d = f"\0{a}\0{b}\0{lv}"
            layer[d] = lv
            order.setdefault(lv, []).append(d)
            chain.append(d)
        chain.append(b)
        chains[(a, b)] = chain
        links += list(zip(chain, chain[1:]))
    _order_layers(order, links)

    out = Layout(layers={v: layer[v] for v in ids})
    n_layers = max(order) + 1 if order else 0
    heights = {lv: sum(_h(v) for v in vs) + ROW_GAP * (len(vs) - 1) for lv, vs in order.items()}
    tallest = max(heights.values(), default=0)
    pos: dict[str, tuple[float, float]] = {}
    for lv, vs in order.items():
        y = MARGIN + (tallest - heights[lv]) / 2 + 14  # room for self-loop arcs on top
        x = MARGIN + lv * (NODE_W + LAYER_GAP)
        for v in vs:
            pos[v] = (x, y)
            y += _h(v) + ROW_GAP
    out.boxes = {v: pos[v] for v in ids}
    out.width = 2 * MARGIN + n_layers * NODE_W + max(n_layers - 1, 0) * LAYER_GAP + 40
    out.height = 2 * MARGIN + tallest + 40

    for e in edges:
        x, y = pos[e.src]
        if e.src == e.dst:
            out.routes.append((e, [(x + NODE_W - 44, y), (x + NODE_W - 14, y)], False))
            continue
        if (e.src, e.dst) in same:  # an arc out of the column's right side and back in
            x2, y2 = pos[e.dst]
            out.routes.append((e, [(x + NODE_W, y + NODE_H / 2 + 8),
                                   (x + NODE_W + 46, (y + y2) / 2 + NODE_H / 2),
                                   (x2 + NODE_W, y2 + NODE_H / 2 + 8)], True))
            continue
        is_back = (e.src, e.dst) in back
        a, b = (e.dst, e.src) if is_back else (e.src, e.dst)
        chain = chains[(a, b)]
        drop = 12 if is_back else 0
        points = [(pos[a][0] + NODE_W, pos[a][1] + _h(a) / 2 + drop)]
        points += [(pos[d][0] + NODE_W / 2, pos[d][1] + DUMMY_H / 2 + drop) for d in chain[1:-1]]
        points.append((pos[b][0], pos[b][1] + _h(b) / 2 + drop))
        out.routes.append((e, points[::-1] if is_back else points, is_back))
    return out


def _distances(nodes: list[Node], edges: list[Edge]) -> dict[str, int]:
    """Breadth-first distance from the entry nodes (then from any node not yet reached)."""
    succ: dict[str, list[str]] = {n.id: [] for n in nodes}
    for e in edges:
        succ[e.src].append(e.dst)
    dist: dict[str, int] = {}
    starts = [n.id for n in nodes if n.entry] + [n.id for n in nodes if not n.entry]
    for s in starts:
        if s in dist:
            continue
        dist[s] = 0
        frontier = [s]
        while frontier:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w not in dist:
                        dist[w] = dist[v] + 1
                        nxt.append(w)
            frontier = nxt
    return dist


def _h(v: str) -> float:
    return DUMMY_H if v.startswith("\0") else NODE_H


def _components(ids: list[str], edges: list[Edge]) -> dict[str, int]:
    """Strongly connected components (Tarjan's algorithm, without recursion)."""
    succ: dict[str, list[str]] = {v: [] for v in ids}
    for e in edges:
        succ[e.src].append(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    comp: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for root in ids:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            for w in succ[v]:
                if w in on_stack:
                    low[v] = min(low[v], low[w])
            if low[v] == index[v]:
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp[w] = index[v]
                    if w == v:
                        break
    return comp


def _longest_path_layers(ids: list[str], dag: list[tuple[str, str]]) -> dict[str, int]:
    succ: dict[str, set[str]] = {v: set() for v in ids}
    indeg = {v: 0 for v in ids}
    for a, b in set(dag):
        if b not in succ[a]:
            succ[a].add(b)
            indeg[b] += 1
    layer = {v: 0 for v in ids}
    ready = [v for v in ids if indeg[v] == 0]
    while ready:
        v = ready.pop(0)
        for w in sorted(succ[v]):
            layer[w] = max(layer[w], layer[v] + 1)
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    return layer


def _order_layers(order: dict[int, list[str]], links: list[tuple[str, str]]) -> None:
    """Barycenter sweeps, down then up, to reduce crossings (in place)."""
    up: dict[str, list[str]] = {}
    down: dict[str, list[str]] = {}
    for a, b in links:
        down.setdefault(a, []).append(b)
        up.setdefault(b, []).append(a)
    levels = sorted(order)
    for sweep in range(SWEEPS):
        seq = levels[1:] if sweep % 2 == 0 else levels[-2::-1]
        near = up if sweep % 2 == 0 else down
        for lv in seq:
            ref = order[lv - 1] if sweep % 2 == 0 else order[lv + 1]
            where = {v: i for i, v in enumerate(ref)}
            current = {v: i for i, v in enumerate(order[lv])}

            def center(v: str) -> float:
                ns = [where[n] for n in near.get(v, ()) if n in where]
                return sum(ns) / len(ns) if ns else current[v]

            order[lv].sort(key=lambda v: (center(v), current[v]))


# -- drawing ---------------------------------------------------------------------------------

STYLE = """
.g-node rect { fill:#fff; stroke:#5b6b82; stroke-width:1.2; rx:6; }
.g-node.entry rect { stroke:#2f6fde; stroke-width:2.2; fill:#f2f7ff; }
.g-node text { font:12px system-ui, sans-serif; fill:#1d2430; }
.g-node text.sub { font-size:11px; fill:#667085; }
.g-edge { fill:none; stroke:#5b6b82; }
.g-edge.back { stroke:#b4690e; stroke-dasharray:5 4; }
.g-label { font:11px system-ui, sans-serif; fill:#1d2430; paint-order:stroke;
           stroke:#f7f8fa; stroke-width:4px; stroke-linejoin:round; }
"""


def render(nodes: list[Node], edges: list[Edge], label_min: float = 0.1) -> Safe:
    """The graph as an `<svg>` element. Edges weighing less than `label_min` go unlabelled
    (their numbers are in the tooltip) so a dense graph stays legible."""
    lay = layout(nodes, edges)
    parts: list[Safe] = [html("<style>{s}</style>", s=Safe(STYLE)), _markers()]
    placed: list[tuple[float, float, float, float]] = []
    labels: list[Safe] = []
    for e, points, is_back in lay.routes:
        width = 0.8 + 2.6 * max(0.0, min(e.weight, 1.0))
        d = _self_loop(points) if e.src == e.dst else _path(points)
        parts.append(html(
            '<path class="g-edge{b}" d="{d}" stroke-width="{w}" stroke-opacity="{o}" '
            'marker-end="url(#{m})"><title>{t}</title></path>',
            b=" back" if is_back else "", d=d, w=f"{width:.1f}", o=f"{0.45 + 0.55 * min(e.weight, 1):.2f}",
            m="arr-back" if is_back else "arr", t=e.title or e.label,
        ))
        if e.label and e.weight >= label_min:
            x, y = _label_point(points, e.src == e.dst, is_back)
            y = _free_spot(x, y, len(e.label) * 6.2, placed)
            labels.append(html('<text class="g-label" x="{x}" y="{y}" text-anchor="middle">{t}'
                               "<title>{tt}</title></text>",
                               x=f"{x:.0f}", y=f"{y:.0f}", t=e.label, tt=e.title or e.label))
    by_id = {n.id: n for n in nodes}
    for v, (x, y) in lay.boxes.items():
        parts.append(_node(by_id[v], x, y))
    parts += labels  # on top of everything
    return html('<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="{w}" height="{h}" '
                'viewBox="0 0 {w} {h}" role="img" aria-label="workflow graph">{p}</svg>',
                w=f"{lay.width:.0f}", h=f"{lay.height:.0f}", p=join(parts))


def _markers() -> Safe:
    return Safe(
        '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
        'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#5b6b82"/></marker><marker id="arr-back" viewBox="0 0 10 10" refX="9" refY="5" '
        'markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse"><path '
        'd="M0,0 L10,5 L0,10 z" fill="#b4690e"/></marker></defs>'
    )


def _node(n: Node, x: float, y: float) -> Safe:
    label = n.label if len(n.label) <= 30 else n.label[:29] + "…"
    sub = n.sub if len(n.sub) <= 34 else n.sub[:33] + "…"
    inner = html(
        '<g class="g-node{e}" data-id="{id}"><title>{t}</title>'
        '<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6"/>'
        '<text x="{tx}" y="{ty}">{label}</text><text class="sub" x="{tx}" y="{sy}">{sub}</text></g>',
        e=" entry" if n.entry else "", id=n.id, t=n.title or n.label, x=f"{x:.0f}", y=f"{y:.0f}",
        w=NODE_W, h=NODE_H, tx=f"{x + 9:.0f}", ty=f"{y + 19:.0f}", sy=f"{y + 36:.0f}",
        label=label, sub=sub,
    )
    return html('<a href="{h}">{i}</a>', h=n.href, i=inner) if n.href else inner


def _path(points: list[tuple[float, float]]) -> str:
    """A smooth path: cubic segments with horizontal tangents at every point."""
    (x0, y0) = points[0]
    d = [f"M{x0:.1f},{y0:.1f}"]
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        dx = (xb - xa) / 2
        d.append(f"C{xa + dx:.1f},{ya:.1f} {xb - dx:.1f},{yb:.1f} {xb:.1f},{yb:.1f}")
    return " ".join(d)


def _self_loop(points: list[tuple[float, float]]) -> str:
    (xa, ya), (xb, yb) = points
    return f"M{xa:.1f},{ya:.1f} C{xa - 6:.1f},{ya - 34:.1f} {xb + 6:.1f},{yb - 34:.1f} {xb:.1f},{yb:.1f}"


def _label_point(points: list[tuple[float, float]], loop: bool, back: bool) -> tuple[float, float]:
    """Where an edge's label goes: on the part of the edge where edges fan out (near the
    target of a forward edge, near the source of one going back), not where they converge."""
    if loop:
        (xa, ya), (xb, _) = points
        return (xa + xb) / 2, ya - 30
    if len(points) > 2:  # on a waypoint: out in a layer gap's open space
        p = points[1] if back else points[-2]
        return p[0], p[1] - 4
    (xa, ya), (xb, yb) = points
    t = 0.3 if back else 0.7
    # The cubic with horizontal tangents used by _path(): y follows 3t^2 - 2t^3.
    s = 3 * t * t - 2 * t * t * t
    return xa + (xb - xa) * t, ya + (yb - ya) * s - 4


def _free_spot(x: float, y: float, w: float, placed: list[tuple[float, float, float, float]]) -> float:
    """Move a label down until it overlaps no earlier one (a few tries)."""
    for _ in range(6):
        box = (x - w / 2, y - 11, x + w / 2, y + 2)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                   for b in placed):
            break
        y += 13
    placed.append((x - w / 2, y - 11, x + w / 2, y + 2))
    return y
