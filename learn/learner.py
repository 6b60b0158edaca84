"""The learner: one object that turns finished exchanges into templates, DAGs and predictions.

    learner = Learner()                       # or Learner(tokenize=engine_ids_of_exchange)
    for ex in finished_exchanges:             # in order, from one thread
        predictions = learner.observe(ex)
    learner.templates(); learner.workflows(); learner.static_prefixes()
    data = learner.snapshot(); Learner.restore(data)

Per exchange: link it to its session (prefix continuation, rewritten histories, explicit ids),
tokenize it (engine ids or the fallback), insert it in the radix tree, give it a call
template, find the earlier answers its prompt contains, place it in a workflow instance,
count its transitions in the workflow graph, and predict what comes next.

Bad input never raises: an exchange without a parsed body, without messages, with an error
status or no response at all, or seen before is skipped and counted in `skipped`; an answer from a broken stream is not
learned from (the prompt still is); a prompt past `max_prompt_tokens` is cut for the radix
tree. An unexpected error is logged and counted in `skipped['error']`.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from learn.calls import CallRegistry, CallTemplate, answer_kind, role_of
from learn.canonical import function_of, message_key, tool_calls_of
from learn.dataflow import FlowIndex
from learn.histogram import Histogram
from learn.instances import Instances
from learn.predict import Prediction, Predictor, WarmPrefix
from learn.radix import RadixTree
from learn.sessions import SessionLink, SessionLinker
from learn.templates import MessageTemplate, TemplateMiner
from learn.tokens import FALLBACK_NAME, FallbackTokenizer
from learn.workflows import Workflow, WorkflowGraph

if TYPE_CHECKING:
    from proxy.exchange import Exchange

log = logging.getLogger("preheat.learn")

SNAPSHOT_VERSION = 1
SNAPSHOT_FORMAT = "preheat-learned"
LEARNED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")

# Converters from older snapshot versions: version -> function returning the next version.
_UPGRADES: dict[int, Callable[[dict], dict]] = {}


@dataclass(frozen=True)
class LearnConfig:
    """Knobs of the learner. Defaults suit one proxy in front of one engine."""

    k: int = 2
    """Distinct sessions that make a shared prefix static."""
    min_support: int = 2
    """Calls (or transitions) before a template or an edge is reported."""
    session_window: int = 200_000
    """Conversations remembered for session linking."""
    calls_window: int = 50_000
    """Recent calls remembered (for edges from a later call back to them)."""
    flow_window: int = 20_000
    """Recent answers indexed for data-flow detection."""
    flow_share: float = 0.5
    """Share of an answer that must appear in a prompt for a data-flow edge."""
    together: float = 0.5
    """Root calls starting within this many seconds form one workflow instance."""
    radix_tokens: int = 2_000_000
    """Memory bound of the radix tree, in token ids."""
    max_prompt_tokens: int = 262_144
    """Longer prompts are cut to this many ids before insertion."""
    max_templates: int = 20_000
    """Message templates kept (least recently used single-message ones go first)."""
    max_call_templates: int = 5_000
    max_nodes: int = 5_000
    max_edges: int = 50_000
    min_probability: float = 0.05
    """Predictions less likely than this are not returned."""
    cached_messages: int = 50_000
    """Messages whose template, chunks and conversation openings are remembered."""
    cached_tokens: int = 4_000_000
    """Token ids of recent messages kept by the fallback tokenizer."""
    prefix_tokens: int = 4_000_000
    """Token ids the call templates' static prefixes may hold together."""


class _Call:
    __slots__ = ("template", "kind", "session", "ended", "depth", "succ")

    def __init__(self, template: str, kind: str, session: str, ended: float, depth: int) -> None:
        self.template, self.kind, self.session, self.ended = template, kind, session, ended
        self.depth = depth
        self.succ: set[str] = set()


class _Digest(NamedTuple):
    id: str
    path: str
    messages: list[dict]
    keys: list[str]
    tools: list
    answer: dict | None
    started: float
    ended: float
    duration: float | None
    tenant: str
    answer_key: str | None
    """The key of `ex.answer` (which the linker remembers even when `answer` is None)."""


class Learner:
    """Learns from finished exchanges. Not thread-safe: feed it from one thread, in order."""

    def __init__(self, tokenize: Callable[["Exchange"], list[int]] | None = None,
                 config: LearnConfig | None = None, tokenizer_name: str | None = None) -> None:
        self.config = cfg = config or LearnConfig()
        self._tokenize = tokenize
        self.tokenizer = FallbackTokenizer(max_cached_tokens=cfg.cached_tokens)
        self.tokenizer_name = (tokenizer_name or getattr(tokenize, "name", None) or "engine") \
            if tokenize else FALLBACK_NAME
        self.linker = SessionLinker(cfg.session_window, heads=max(cfg.cached_messages // 4, 16))
        self.radix = RadixTree(k=cfg.k, max_tokens=cfg.radix_tokens)
        self.miner = TemplateMiner(max_templates=cfg.max_templates, max_cache=cfg.cached_messages)
        self.registry = CallRegistry(self.miner, max_templates=cfg.max_call_templates,
                                     prefix_budget=cfg.prefix_tokens)
        self.flow = FlowIndex(window=cfg.flow_window, min_share=cfg.flow_share,
                              cache=cfg.cached_messages)
        self.instances = Instances(together=cfg.together, window=cfg.calls_window)
        self.graph = WorkflowGraph(cfg.min_support, cfg.max_nodes, cfg.max_edges)
        self.predictor = Predictor(self.graph, self.registry, cfg.min_probability)
        self._tool_gaps = Histogram()
        self._calls: OrderedDict[str, _Call] = OrderedDict()
        self.observed = 0
        self.skipped: Counter[str] = Counter()

    # -- learning --------------------------------------------------------------------------

    def observe(self, ex: "Exchange") -> list[Prediction]:
        """Learn from one finished exchange; the calls expected next, most likely first."""
        try:
            digest = self._digest(ex)
        except Exception:
            log.exception("could not read exchange %s for learning", getattr(ex, "id", "?"))
            digest = "error"
        if isinstance(digest, str):
            self.skipped[digest] += 1
            return []
        try:
            out = self._learn(ex, digest)
        except Exception:
            log.exception("learning from exchange %s failed", digest.id)
            self.skipped["error"] += 1
            return []
        self.observed += 1
        return out

    def _digest(self, ex: "Exchange") -> _Digest | str:
        """What learning needs from an exchange, or why it has nothing to teach."""
        ex.analyze()
        if ex.id in self._calls:
            return "duplicate"  # the same exchange twice would count its transitions twice
        if ex.path not in LEARNED_PATHS:
            return "not_learned_path"
        if not isinstance(ex.request_json, dict):
            return "unparsed"
        if ex.status is not None and ex.status >= 400:
            return "error_status"
        if ex.status is None and ex.error:
            return "no_response"  # the upstream never answered: the agent will retry
        messages = ex.messages
        if not messages:
            return "no_messages"
        keys, answer_key = ex.message_keys, ex.answer_key  # hashed by the observer that linked it
        if keys is None or len(keys) != len(messages):  # it did not (catch-up, CLI, benchmarks)
            answer_key = None
            try:
                keys = [message_key(m) for m in messages]
            except (TypeError, ValueError):  # not JSON-able after all (e.g. a NaN, a huge int key)
                return "unreadable"
        answer = ex.answer if isinstance(ex.answer, dict) else None
        if answer is not None and answer_key is None:
            try:
                answer_key = message_key(answer)
            except (TypeError, ValueError):
                answer = None
        if ex.response_error or ex.error:
            answer = None  # a broken stream's partial answer is not what the agent will resend
        done = ex.t_done if isinstance(ex.t_done, (int, float)) else None
        return _Digest(ex.id, ex.path, messages, keys, ex.tools, answer, float(ex.started_at),
                       float(ex.started_at) + (done or 0.0), done, ex.tenant or "", answer_key)

    def _learn(self, ex: "Exchange", d: _Digest) -> list[Prediction]:
        link: SessionLink = self.linker.link_keys(ex, d.keys, d.answer_key)
        session = link.session_id
        tokens = self._tokens(ex, d)
        if tokens:
            self.radix.insert(tokens, session, d.tenant)
        template = self.registry.assign(d.path, d.messages, d.keys, d.tools, session, tokens)
        kind = answer_kind(d.answer)
        depth = sum(1 for m in d.messages if role_of(m) == "assistant")

        # Data flow: only messages new since the conversation's last step can carry it.
        start = link.continued if link.parent else 0
        new = [self.flow.message_chunks(m, k) for m, k in zip(d.messages[start:], d.keys[start:])]
        sources = [s.call for s in self.flow.sources(new, session, d.started, d.keys[start:])
                   if s.call in self._calls]
        parent = link.parent if link.parent in self._calls else None

        linked = [*([parent] if parent else []), *sources]
        joined = self.instances.join(d.id, template, d.started, d.tenant, linked)
        self.graph.observe_call(template, kind, d.duration, joined.root, joined.created,
                                joined.costarted, joined.absorbed, depth, joined.first)
        self._count_edges(template, d.started, parent, sources)

        if d.answer is not None:
            own = [self.flow.message_chunks(m, k) for m, k in zip(d.messages, d.keys)]
            self.flow.remember(d.id, session, d.ended, d.answer, own, d.answer_key)
        self._calls[d.id] = _Call(template, kind, session, d.ended, depth)
        while len(self._calls) > self.config.calls_window:
            self._calls.popitem(last=False)
        for old, new in self.registry.drain_renames():
            self.graph.rename(old, new)

        tools = [str(function_of(c).get("name")) for c in tool_calls_of(d.answer or {})]
        return self.predictor.predict(d.id, self.registry.resolve(template), kind, session, d.ended,
                                      tokens, tools, depth)

    def _count_edges(self, template: str, started: float, parent: str | None,
                     sources: list[str]) -> None:
        """One transition from the call this one continues and from each call it read."""
        seen: set[str] = set()
        for call, data in [*([(parent, False)] if parent else []), *((s, True) for s in sources)]:
            rec = self._calls[call]
            src = self.registry.resolve(rec.template)
            gap = started - rec.ended
            self.graph.observe_edge(src, rec.kind, template, data, gap, template not in rec.succ,
                                    src not in seen, rec.depth)
            rec.succ.add(template)
            seen.add(src)
            if not data and rec.kind.startswith("tools:"):  # how long tools take, for new loops
                self._tool_gaps.add(gap)
                self.predictor.tool_gap = self._tool_gaps.quantile(0.5)

    def _tokens(self, ex: "Exchange", d: _Digest) -> tuple[int, ...] | None:
        if self._tokenize is not None:
            try:
                ids = tuple(self._tokenize(ex))
            except Exception as exc:  # no ids this time: templates and DAGs still learn
                log.debug("tokenizer failed on %s: %r", d.id, exc)
                self.skipped["tokenizer"] += 1
                return None
        else:
            ids = self.tokenizer.prompt(d.messages, d.keys, d.tools)
        return ids[: self.config.max_prompt_tokens]

    # -- what was learned ------------------------------------------------------------------

    def templates(self, min_calls: int | None = None) -> list[CallTemplate]:
        """Call templates seen at least `min_calls` times (default `min_support`)."""
        return self.registry.templates(self.config.min_support if min_calls is None else min_calls)

    def message_templates(self) -> list[MessageTemplate]:
        return self.miner.templates(self.config.min_support)

    def workflows(self) -> list[Workflow]:
        return self.graph.workflows()

    def static_prefixes(self) -> list[WarmPrefix]:
        """Prefixes worth keeping warm: each template's static prefix (with its workflow), then
        other prefixes many sessions share (e.g. a document several instances reused)."""
        out = self.predictor.warm_prefixes(self.config.k)
        known = {p.tokens for p in out}
        for p in self.radix.static_prefixes(self.config.k, min_tokens=16):
            if p.tokens not in known:
                out.append(WarmPrefix(p.tokens, None, None, p.uses, p.sessions, False))
        return out

    def template_of(self, exchange_id: str) -> str | None:
        """The call template a recent exchange was given (None once forgotten)."""
        rec = self._calls.get(exchange_id)
        return self.registry.resolve(rec.template) if rec else None

    def session_of(self, exchange_id: str) -> str | None:
        """The session a recent exchange was linked to (None once forgotten)."""
        rec = self._calls.get(exchange_id)
        return rec.session if rec else None

    def describe(self, template: str) -> str:
        """A one-line label for a call template: its turn (or 'start'), then whose it is."""
        tpl = self.registry.get(template)
        if tpl is None:
            return ""
        step = "after " + ", ".join(e[5:] if e.startswith("tool:") else e for e in tpl.turn) \
            if tpl.turn else "start"
        lines = tpl.text.split("\n")[1 : 1 + len(tpl.head)]
        who = next((ln for ln in lines if not ln.endswith("}")), lines[0] if lines else "")
        return f"{step} | {who[:70]}"

    def sizes(self) -> dict[str, int]:
        """How much each part holds (the memory bounds a soak test checks)."""
        return {"radix_tokens": self.radix.tokens, "radix_nodes": self.radix.nodes,
                "linker": len(self.linker), "message_templates": len(self.miner),
                "call_templates": len(self.registry), "prefix_ids": self.registry.prefix_ids,
                "flow_answers": len(self.flow),
                "flow_chunks": self.flow.index_size(), "instances": len(self.instances),
                "calls": len(self._calls), "nodes": len(self.graph.nodes),
                "edges": len(self.graph.edges), "tokenizer_cache": len(self.tokenizer)}

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything worth keeping across restarts, as JSON-able data with a version."""
        return {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "tokenizer": self.tokenizer_name,
            "observed": self.observed,
            "skipped": dict(self.skipped),
            "config": asdict(self.config),
            "messages": self.miner.snapshot(self.config.min_support),
            "calls": self.registry.snapshot(),
            "graph": self.graph.snapshot(),
        }

    @classmethod
    def restore(cls, data: dict[str, Any], tokenize: Callable[["Exchange"], list[int]] | None = None,
                tokenizer_name: str | None = None) -> "Learner":
        """A learner that continues from `snapshot()` data of this or any older version.

        Token prefixes are kept only when made by the same tokenizer as this learner uses.
        """
        data = upgrade(data)
        try:
            return cls._restore(data, tokenize, tokenizer_name)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed learned snapshot: {exc!r}") from exc

    @classmethod
    def _restore(cls, data: dict[str, Any], tokenize, tokenizer_name) -> "Learner":
        known = {f.name for f in fields(LearnConfig)}
        config = LearnConfig(**{k: v for k, v in data.get("config", {}).items() if k in known})
        learner = cls(tokenize=tokenize, config=config, tokenizer_name=tokenizer_name)
        learner.miner = TemplateMiner.restore(data.get("messages", {}),
                                              max_templates=config.max_templates,
                                              max_cache=config.cached_messages)
        learner.registry = CallRegistry(learner.miner, max_templates=config.max_call_templates,
                                        prefix_budget=config.prefix_tokens)
        learner.registry.restore(data.get("calls", {}),
                                 with_prefixes=data.get("tokenizer") == learner.tokenizer_name)
        learner.graph = WorkflowGraph.restore(data.get("graph", {}), min_support=config.min_support,
                                              max_nodes=config.max_nodes, max_edges=config.max_edges)
        learner.predictor = Predictor(learner.graph, learner.registry, config.min_probability)
        learner.observed = int(data.get("observed", 0))
        learner.skipped = Counter(data.get("skipped", {}))
        return learner


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Bring snapshot data of any older version to `SNAPSHOT_VERSION`."""
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not a preheat learned snapshot")
    version = int(data.get("version", 0))
    if version > SNAPSHOT_VERSION:
        raise ValueError(f"snapshot version {version} is newer than this preheat "
                         f"({SNAPSHOT_VERSION}); upgrade preheat to read it")
    while version < SNAPSHOT_VERSION:
        if version not in _UPGRADES:
            raise ValueError(f"no converter from snapshot version {version}")
        data = _UPGRADES[version](data)
        version = int(data["version"])
    return data
