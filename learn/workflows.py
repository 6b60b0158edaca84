"""Workflow DAGs: which call templates follow which, how likely, how soon, how many.

Nodes are call templates. An edge A -> B is counted each time a call of template B continues
a call of A (same conversation) or contains its answer (data flow). Each edge keeps:

- the probability that a call of A is followed by at least one B, overall, per answer kind
  (a tool loop's next step depends on which tool the answer asked for) and per answer kind
  and depth in the conversation (a 3-round debate ends after its third answer);
- fan-out (B calls per A call that has any) and fan-in (A calls feeding one B call);
- the gap distribution: seconds from A's response to B's request (tool or think time);
- how much of it is data flow rather than continuation.

Templates joined by edges (or repeatedly started together) form one workflow type; a
workflow's id is derived from the smallest template id in it, so it does not depend on the
order traffic arrived in. Everything updates online; `snapshot()` is JSON with a version.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from learn.histogram import Histogram

GRAPH_VERSION = 1
MAX_DEPTH = 32
"""Depths past this share one bucket."""
MIN_DEPTH_HISTORY = 2
"""Calls of a (kind, depth) seen before its statistics are trusted over the kind's."""


def _at(kind: str, depth: int) -> str:
    return f"{kind}@{min(depth, MAX_DEPTH)}"


@dataclass(frozen=True)
class WorkflowNode:
    template: str
    calls: int
    entries: int
    """Calls of this template that started (or co-started) an instance."""
    fan_out: float
    """Successor calls per call, over all edges."""
    duration_p50: float


@dataclass(frozen=True)
class WorkflowEdge:
    src: str
    dst: str
    probability: float
    """Share of `src` calls followed by at least one `dst` call."""
    count: int
    fan_out: float
    fan_in: float
    gap_p50: float
    gap_p90: float
    data_flow: float
    """Share of transitions that passed an answer on (the rest continued a conversation)."""


@dataclass(frozen=True)
class Workflow:
    id: str
    instances: int
    width: float
    """Root calls per instance: how many agents start together (the fan-out at the start)."""
    entries: tuple[str, ...]
    nodes: tuple[WorkflowNode, ...]
    edges: tuple[WorkflowEdge, ...]

    def text(self, describe: Callable[[str], str] = lambda t: "") -> str:
        """The DAG as text: entry templates, then one line per edge."""
        lines = [f"workflow {self.id}: {self.instances} instances, {len(self.nodes)} templates, "
                 f"{self.width:.1f} agents start together"]
        for node in self.nodes:
            mark = "entry " if node.template in self.entries else "      "
            lines.append(f"  {mark}{node.template}  calls={node.calls}  {describe(node.template)}")
        for e in self.edges:
            how = "data" if e.data_flow >= 0.5 else "next"
            lines.append(f"  {e.src} --{how} p={e.probability:.2f} x{e.fan_out:.1f} "
                         f"gap~{e.gap_p50:.1f}s--> {e.dst}")
        return "\n".join(lines)


class _Node:
    __slots__ = ("calls", "kinds", "entries", "instances", "roots", "duration", "successors", "last")

    def __init__(self) -> None:
        self.calls = 0
        self.kinds: Counter = Counter()
        self.entries = 0
        self.instances = 0
        """Instances whose first root was of this template."""
        self.roots = 0
        """Root calls of those instances (whatever their template): width = roots / instances."""
        self.duration = Histogram()
        self.successors = 0
        self.last = 0


class _Edge:
    __slots__ = ("count", "sources", "targets", "kinds", "data", "gap", "last")

    def __init__(self) -> None:
        self.count = 0
        self.sources = 0
        self.targets = 0
        self.kinds: Counter = Counter()
        self.data = 0
        self.gap = Histogram()
        self.last = 0


class WorkflowGraph:
    """The learned transitions between call templates. Not thread-safe."""

    def __init__(self, min_support: int = 2, max_nodes: int = 5_000, max_edges: int = 50_000) -> None:
        self.min_support = min_support
        self.max_nodes = max_nodes
        self.max_edges = max_edges
        self.nodes: dict[str, _Node] = {}
        self.edges: dict[tuple[str, str], _Edge] = {}
        self._out: dict[str, set[str]] = {}
        self._costarts: Counter = Counter()
        self._uf: dict[str, str] = {}
        self.clock = 0

    def observe_call(self, template: str, kind: str, duration: float | None, root: bool,
                     created: bool, costarted: tuple[str, ...] = (),
                     absorbed: tuple[tuple[str, int], ...] = (), depth: int = 0,
                     first: str | None = None) -> None:
        """One call: its template, answer kind, and depth (answers before it in its conversation).

        `first` is the template of the first root of the call's instance; instance and root
        counts are kept under it, so that a workflow's width counts whole instances."""
        self.clock += 1
        node = self._node(template)
        node.calls += 1
        node.kinds[kind] += 1
        node.kinds[_at(kind, depth)] += 1
        node.last = self.clock
        if duration is not None:
            node.duration.add(duration)
        head = self._node(first or template)
        if root:
            node.entries += 1
            head.roots += 1
        if created:
            head.instances += 1
        for other, roots in absorbed:
            gone = self.nodes.get(other)
            if gone is not None and gone.instances > 0:
                gone.instances -= 1
                gone.roots = max(gone.roots - roots, 0)
                head.roots += roots
        for other in costarted[:32]:
            if other != template:
                pair = (min(template, other), max(template, other))
                self._costarts[pair] += 1
                if self._costarts[pair] >= self.min_support:
                    self._union(*pair)
        if len(self.nodes) > self.max_nodes:
            self._prune()

    def observe_edge(self, src: str, src_kind: str, dst: str, data: bool, gap: float | None,
                     new_source: bool, new_target: bool, src_depth: int = 0) -> None:
        """One transition. `new_source`: the first `dst` call after this `src` call;
        `new_target`: the first `src` call feeding this `dst` call."""
        edge = self.edges.get((src, dst))
        if edge is None:
            edge = self.edges[(src, dst)] = _Edge()
            self._out.setdefault(src, set()).add(dst)
            if len(self.edges) > self.max_edges:
                self._prune_edges()
        edge.count += 1
        edge.last = self.clock
        edge.data += int(data)
        if gap is not None:
            edge.gap.add(gap)
        if new_source:
            edge.sources += 1
            edge.kinds[src_kind] += 1
            edge.kinds[_at(src_kind, src_depth)] += 1
        if new_target:
            edge.targets += 1
        if src in self.nodes:
            self.nodes[src].successors += 1
        if edge.count >= self.min_support:  # >=: a rename can carry a count past the bar
            self._union(src, dst)

    def next(self, template: str, kind: str, depth: int = 0) -> list[tuple[str, float, _Edge]]:
        """Templates expected after a call of `template` whose answer was of `kind`.

        P(dst) is the share of earlier calls of this template with this answer kind at this
        depth that were followed by a dst call; backing off to the kind at any depth, then to
        all its calls, when there is too little history. The call being predicted for is
        already counted, so it is left out of the denominator.
        """
        node = self.nodes.get(template)
        if node is None:
            return []
        at = _at(kind, depth)
        seen_at = node.kinds.get(at, 0) - 1
        if seen_at >= MIN_DEPTH_HISTORY:
            kind, seen_kind = at, seen_at
        else:
            seen_kind = node.kinds.get(kind, 0) - 1
        out = []
        for dst in self._out.get(template, ()):
            edge = self.edges[(template, dst)]
            if seen_kind > 0:
                p = edge.kinds.get(kind, 0) / seen_kind
            else:
                p = edge.sources / max(node.calls - 1, 1)
            if p > 0:
                out.append((dst, min(p, 1.0), edge))
        out.sort(key=lambda x: (-x[1], -x[2].count, x[0]))
        return out

    def workflow_of(self, template: str) -> str:
        return "w" + self._find(template)[1:]

    def rename(self, old: str, new: str) -> None:
        """Fold template `old` into `new` (its message templates were generalised)."""
        node = self.nodes.pop(old, None)
        if node is not None:
            into = self._node(new)
            into.calls += node.calls
            into.kinds.update(node.kinds)
            into.entries += node.entries
            into.instances += node.instances
            into.roots += node.roots
            into.duration.merge(node.duration)
            into.successors += node.successors
            into.last = max(into.last, node.last)
        for (src, dst) in [k for k in self.edges if old in k]:
            edge = self.edges.pop((src, dst))
            self._out.get(src, set()).discard(dst)
            key = (new if src == old else src, new if dst == old else dst)
            into_e = self.edges.get(key)
            if into_e is None:
                self.edges[key] = edge
            else:
                into_e.count += edge.count
                into_e.sources += edge.sources
                into_e.targets += edge.targets
                into_e.kinds.update(edge.kinds)
                into_e.data += edge.data
                into_e.gap.merge(edge.gap)
                into_e.last = max(into_e.last, edge.last)
            self._out.setdefault(key[0], set()).add(key[1])
            if self.edges[key].count >= self.min_support:
                self._union(*key)
        self._out.pop(old, None)
        self._union(old, new)

    def workflows(self, min_support: int | None = None) -> list[Workflow]:
        """One DAG per workflow type: templates and edges seen at least `min_support` times."""
        support = self.min_support if min_support is None else min_support
        groups: dict[str, list[str]] = {}
        for t in self.nodes:
            groups.setdefault(self._find(t), []).append(t)
        out = []
        for root, everyone in groups.items():
            members = [t for t in everyone if self.nodes[t].calls >= support]
            if not members:
                continue
            keep = set(members)
            nodes = tuple(sorted((self._public_node(t) for t in members),
                                 key=lambda n: (-n.entries, -n.calls, n.template)))
            edges = tuple(sorted(
                (self._public_edge(s, d, e) for (s, d), e in self.edges.items()
                 if s in keep and d in keep and e.count >= support),
                key=lambda e: (-e.count, e.src, e.dst)))
            instances = sum(self.nodes[t].instances for t in everyone)
            if instances <= 0:
                continue  # a fragment no instance was seen to start (its entry was renamed or forgotten)
            roots = sum(self.nodes[t].roots for t in everyone)
            entries = tuple(n.template for n in nodes if n.entries > 0)
            out.append(Workflow("w" + root[1:], instances, round(roots / instances, 3), entries, nodes,
                                edges))
        out.sort(key=lambda w: (-w.instances, -len(w.nodes), w.id))
        return out

    def edge(self, src: str, dst: str) -> WorkflowEdge | None:
        e = self.edges.get((src, dst))
        return None if e is None else self._public_edge(src, dst, e)

    def node(self, template: str) -> WorkflowNode | None:
        return self._public_node(template) if template in self.nodes else None

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {
            "version": GRAPH_VERSION,
            "nodes": {t: {"calls": n.calls, "kinds": dict(n.kinds), "entries": n.entries,
                          "instances": n.instances, "roots": n.roots, "successors": n.successors,
                          "duration": n.duration.to_json()} for t, n in self.nodes.items()},
            "edges": [{"src": s, "dst": d, "count": e.count, "sources": e.sources,
                       "targets": e.targets, "kinds": dict(e.kinds), "data": e.data,
                       "gap": e.gap.to_json()} for (s, d), e in self.edges.items()],
            "costarts": [[a, b, n] for (a, b), n in self._costarts.most_common(10_000)],
        }

    @classmethod
    def restore(cls, data: dict, **kw) -> "WorkflowGraph":
        graph = cls(**kw)
        for t, n in data.get("nodes", {}).items():
            node = graph._node(t)
            node.calls, node.entries = int(n["calls"]), int(n.get("entries", 0))
            node.instances, node.successors = int(n.get("instances", 0)), int(n.get("successors", 0))
            node.roots = int(n.get("roots", node.entries))
            node.kinds = Counter(n.get("kinds", {}))
            node.duration = Histogram.from_json(n.get("duration"))
        for e in data.get("edges", []):
            edge = _Edge()
            edge.count, edge.sources = int(e["count"]), int(e["sources"])
            edge.targets = int(e["targets"])
            edge.kinds, edge.data = Counter(e.get("kinds", {})), int(e.get("data", 0))
            edge.gap = Histogram.from_json(e.get("gap"))
            graph.edges[(e["src"], e["dst"])] = edge
            graph._out.setdefault(e["src"], set()).add(e["dst"])
            if edge.count >= graph.min_support:
                graph._union(e["src"], e["dst"])
        for a, b, n in data.get("costarts", []):
            graph._costarts[(a, b)] = int(n)
            if n >= graph.min_support:
                graph._union(a, b)
        return graph

    # -- helpers ---------------------------------------------------------------------------

    def _node(self, template: str) -> _Node:
        node = self.nodes.get(template)
        if node is None:
            node = self.nodes[template] = _Node()
            node.last = self.clock
        return node

    def _find(self, t: str) -> str:
        root = t
        while self._uf.get(root, root) != root:
            root = self._uf[root]
        while t != root:
            self._uf[t], t = root, self._uf[t]
        return root

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:  # the smaller id roots the set: the same set gets the same name
            lo, hi = sorted((ra, rb))
            self._uf[hi] = lo
            self._uf.setdefault(lo, lo)

    def _public_node(self, t: str) -> WorkflowNode:
        n = self.nodes[t]
        return WorkflowNode(t, n.calls, n.entries, round(n.successors / n.calls, 3) if n.calls else 0.0,
                            round(n.duration.quantile(0.5), 3))

    def _public_edge(self, src: str, dst: str, e: _Edge) -> WorkflowEdge:
        calls = self.nodes[src].calls if src in self.nodes else 0
        return WorkflowEdge(
            src, dst, round(min(e.sources / calls, 1.0), 3) if calls else 0.0, e.count,
            round(e.count / e.sources, 3) if e.sources else 0.0,
            round(e.count / e.targets, 3) if e.targets else 0.0,
            round(e.gap.quantile(0.5), 3), round(e.gap.quantile(0.9), 3),
            round(e.data / e.count, 3) if e.count else 0.0)

    def _prune(self) -> None:
        """Forget the coldest templates (fewest calls, longest unseen) and their edges."""
        order = sorted(self.nodes, key=lambda t: (self.nodes[t].calls >= self.min_support,
                                                  self.nodes[t].last))
        for t in order[: len(self.nodes) - int(self.max_nodes * 0.9)]:
            del self.nodes[t]
            for dst in self._out.pop(t, ()):
                self.edges.pop((t, dst), None)
        live = set(self.nodes)
        for key in [k for k in self.edges if k[1] not in live]:
            del self.edges[key]
            self._out.get(key[0], set()).discard(key[1])
        if len(self._uf) > 4 * self.max_nodes:
            self._uf = {t: self._find(t) for t in live}
            for t in live:
                self._uf.setdefault(self._uf[t], self._uf[t])
        if len(self._costarts) > 4 * self.max_nodes:
            self._costarts = Counter(dict(self._costarts.most_common(2 * self.max_nodes)))

    def _prune_edges(self) -> None:
        order = sorted(self.edges, key=lambda k: (self.edges[k].count >= self.min_support,
                                                  self.edges[k].last))
        for key in order[: len(self.edges) - int(self.max_edges * 0.9)]:
            del self.edges[key]
            self._out.get(key[0], set()).discard(key[1])
