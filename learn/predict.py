"""Predictions: the calls expected after a finished exchange, and the prefixes to keep warm.

For a finished call of template A whose answer was of kind K, each learned edge A -> B gives
a prediction with P(B | A, K), the median gap as its expected arrival, and the token prefix
the call will start with: this conversation's prompt when B continues it, B's static prefix
when B is another agent (fed this answer, or started after it).

One prediction needs no history: an answer that asks for tools is followed by the same agent
sending those tools' results. Its template is known before it was ever seen (same leading
messages, a turn of those results), so even a new tool loop gets its next step predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from learn.calls import CallRegistry, call_id
from learn.workflows import WorkflowGraph

CONTINUE = "continue"
NEW = "new"


@dataclass(frozen=True)
class Prediction:
    """One call expected next."""

    template: str
    probability: float
    expected_in: float
    """Seconds after the finished exchange's response that the call is expected (median gap)."""
    expected_at: float
    """The same as a wall-clock time (seconds since the epoch)."""
    kind: str
    """'continue': the same conversation goes on; 'new': another agent's call."""
    prefix: tuple[int, ...]
    """Token ids it will start with (the prompt so far, or the template's static prefix)."""
    after: str
    """The exchange this prediction was made for."""
    session: str | None
    """For 'continue', the session it continues."""
    fan_out: float = 1.0
    """How many such calls to expect."""
    workflow: str | None = None


@dataclass(frozen=True)
class WarmPrefix:
    """A static prefix worth keeping cached: where it is used and how often."""

    tokens: tuple[int, ...]
    template: str | None
    workflow: str | None
    calls: int
    """Calls of its template seen (how often the prefix was reused)."""
    sessions: int
    entry: bool
    """The template starts its workflow (new agents arrive with this prefix)."""


class Predictor:
    def __init__(self, graph: WorkflowGraph, registry: CallRegistry, min_probability: float = 0.05,
                 limit: int = 8, tool_continue: float = 0.95, tool_gap: float = 1.0) -> None:
        self.graph = graph
        self.registry = registry
        self.min_probability = min_probability
        self.limit = limit
        self.tool_continue = tool_continue
        self.tool_gap = tool_gap

    def predict(self, exchange: str, template: str, kind: str, session: str, ended: float,
                tokens: Sequence[int] | None, answer_tools: Sequence[str] = (),
                depth: int = 0) -> list[Prediction]:
        """Predictions for a finished call, most likely first."""
        prompt = tuple(tokens) if tokens is not None else ()
        own = self.registry.get(template)
        out: dict[str, Prediction] = {}
        for dst, p, edge in self.graph.next(template, kind, depth):
            if p < self.min_probability:
                continue
            cont = edge.data * 2 < edge.count
            gap = edge.gap.quantile(0.5)
            out[dst] = Prediction(
                template=dst, probability=round(p, 4), expected_in=round(gap, 3),
                expected_at=ended + gap, kind=CONTINUE if cont else NEW,
                prefix=prompt if cont else self.registry.static_prefix(dst), after=exchange,
                session=session if cont else None,
                fan_out=round(edge.count / edge.sources, 3) if edge.sources else 1.0,
                workflow=self.graph.workflow_of(dst))
        if answer_tools and own is not None:
            turn = tuple(dict.fromkeys("tool:" + n for n in answer_tools))
            nxt = call_id(own.path, own.tools, own.head, turn)
            if nxt not in out:  # a tool loop's next step, even never seen before
                out[nxt] = Prediction(
                    template=nxt, probability=self.tool_continue, expected_in=self.tool_gap,
                    expected_at=ended + self.tool_gap, kind=CONTINUE, prefix=prompt,
                    after=exchange, session=session, workflow=self.graph.workflow_of(template))
        ranked = sorted(out.values(), key=lambda p: (-p.probability, p.expected_in, p.template))
        return ranked[: self.limit]

    def warm_prefixes(self, min_sessions: int = 2) -> list[WarmPrefix]:
        """Static prefixes of known templates, entry templates and the most used first."""
        out = []
        for tpl in self.registry.templates(min_calls=1):
            prefix = self.registry.static_prefix(tpl.id)
            if not prefix or tpl.sessions < min_sessions:
                continue
            node = self.graph.node(tpl.id)
            out.append(WarmPrefix(prefix, tpl.id, self.graph.workflow_of(tpl.id), tpl.calls,
                                  tpl.sessions, bool(node and node.entries)))
        out.sort(key=lambda w: (not w.entry, -w.calls * len(w.tokens), w.template or ""))
        return out
