"""Generated multi-agent workflows with known ground truth, for learning and end-to-end benches.

Six shapes studied in the literature: map-reduce (6 experts over one shared document, then a
summariser), debate (3 agents x 3 rounds, then a judge), reflection (answer, critique, revise;
1-2 rounds), iterative refinement (a draft improved 2-4 times), parallel chains (3-5 tool-using
chains sharing a system prompt) and a trading desk (19 agents, ~88 calls: 8 tool-using
analysts, a bull/bear debate, a research manager, a trader, a 3-way risk debate, a portfolio
manager, compliance, execution and a report writer), after TradingAgents (Xiao et al., 2024).

System prompts of 300-1,500 tokens, shared contexts of 2,000-6,000 tokens; data differ per
instance and 1 in 5 re-uses an earlier document. Each call is an OpenAI chat request, a fake
answer and the time it waits after its dependencies (tool time or hand-off), with its ground
truth: a template label and the calls it continues or reads.
`generate(shape, n, seed)` makes instances; `schedule(instances)` times them as an instant
server would see them; `exchange_of(call, start, end)` makes a finished `Exchange` of a call.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Iterable

SHAPES = ("map_reduce", "debate", "reflection", "refinement", "parallel_chains", "trading_desk")

_WORDS = (
    "market revenue growth margin risk policy customer supply demand contract forecast quarter capital "
    "cost price volume trend signal model data evidence report analysis strategy team product service "
    "region segment channel partner regulation compliance exposure liquidity position hedge volatility "
    "earnings guidance outlook inventory pipeline backlog churn retention pricing discount tariff "
    "currency inflation rate yield spread credit default asset liability balance cash flow debt equity "
    "share dividend buyback merger acquisition launch delay incident outage recovery plan milestone "
    "budget headcount hiring vendor system platform feature release roadmap feedback survey benchmark "
    "metric target goal the a an of to in for on with by from as at this that these those which while "
    "because however therefore although moreover significant modest strong weak stable rising falling "
    "higher lower early late recent current prior next annual monthly weekly global local expected "
    "reported estimated adjusted reviewed approved rejected increased decreased improved declined "
    "remained reached exceeded missed delivered shipped signed renewed"
).split()
_NAMES = ("Acme", "Borealis", "Cobalt", "Dunmore", "Everline", "Fairhaven", "Glenrock", "Halcyon",
          "Ironwood", "Juniper", "Kestrel", "Larkspur", "Meridian", "Northwind", "Oakmont")


@dataclass(frozen=True)
class GenCall:
    """One generated LLM call with its ground truth."""

    id: str
    instance: str
    shape: str
    agent: str
    label: str
    """Ground-truth template: agent and turn shape (e.g. 'debate/skeptic/update')."""
    request: dict
    """The OpenAI chat completions request body; `answer` is what a server would return."""
    answer: dict
    parent: str | None = None
    """The call whose conversation this one continues (same agent); `flow`: calls it reads."""
    flow: tuple[str, ...] = ()
    gap: float = 0.0
    """Seconds from its last dependency's answer to its request; `duration`: to answer it."""
    duration: float = 1.0

    @property
    def after(self) -> tuple[str, ...]:
        return ((self.parent,) if self.parent else ()) + self.flow


@dataclass(frozen=True)
class Instance:
    shape: str
    id: str
    calls: tuple[GenCall, ...]

    def true_edges(self) -> set[tuple[str, str]]:
        label = {c.id: c.label for c in self.calls}
        return {(label[p], c.label) for c in self.calls for p in c.after}

    @property
    def roots(self) -> int:
        return sum(1 for c in self.calls if not c.after)


@dataclass
class _Text:
    """Deterministic fake prose, seeded."""

    rng: random.Random

    def sentence(self, lo: int = 8, hi: int = 20) -> str:
        words = self.rng.choices(_WORDS, k=self.rng.randint(lo, hi))
        words[0] = words[0].capitalize()
        if self.rng.random() < 0.3:
            words.insert(self.rng.randrange(len(words)), str(self.rng.randint(2, 990)))
        return " ".join(words) + "."

    def words(self, n: int) -> str:
        """About `n` words of paragraphs."""
        out, count, para = [], 0, []
        while count < n:
            para.append(self.sentence())
            count += para[-1].count(" ") + 1
            if len(para) >= self.rng.randint(3, 6) or count >= n:
                out.append(" ".join(para))
                para = []
        return "\n\n".join(out)

    def tokens(self, lo: int, hi: int) -> str:
        """Text of roughly lo..hi tokens (a word is ~1.3 tokens)."""
        return self.words(int(self.rng.randint(lo, hi) / 1.3))


def system_prompt(shape: str, agent: str) -> str:
    """An agent's fixed instructions (300-1,500 tokens), seeded by (shape, agent): the same in
    every instance."""
    rng = random.Random(f"system/{shape}/{agent}")
    text = _Text(rng)
    rules = "\n".join(f"- {text.sentence(6, 14)}" for _ in range(rng.randint(5, 12)))
    body = text.tokens(150, 1250)
    return (f"You are the {agent.replace('_', ' ')} agent of a {shape.replace('_', ' ')} team.\n\n"
            f"{body}\n\nRules:\n{rules}\n\nAlways answer in English and be precise.")


class _Builder:
    """Collects one instance's calls."""

    def __init__(self, shape: str, iid: str, rng: random.Random) -> None:
        self.shape, self.iid, self.rng, self.text = shape, iid, rng, _Text(rng)
        self.calls: list[GenCall] = []
        self._n = 0

    def call(self, agent: str, turn: str, messages: list[dict], answer: dict, *, tools=None,
             parent: GenCall | None = None, flow: Iterable[GenCall] = (), gap: float | None = None):
        self._n += 1
        body = {"model": "agent-model", "messages": messages, "temperature": 0}
        body.update({"tools": tools} if tools else {})
        words = len(json.dumps(answer)) / 6
        c = GenCall(
            id=f"{self.iid}-{self._n:03d}", instance=self.iid, shape=self.shape, agent=agent,
            label=f"{self.shape}/{agent}/{turn}", request=body, answer=answer,
            parent=parent.id if parent else None, flow=tuple(f.id for f in flow),
            gap=round(gap if gap is not None else self.rng.uniform(0.05, 0.3), 3),
            duration=round(0.4 + words / 45 * self.rng.uniform(0.8, 1.2), 3))
        self.calls.append(c)
        return c

    def say(self, words: int, quote: str | None = None) -> dict:
        text = self.text.words(words)
        if quote and self.rng.random() < 0.3:  # answers sometimes quote their document
            sentences = [s for s in quote.split(". ") if len(s) > 40]
            if sentences:
                text += "\n\nAs the source puts it: " + self.rng.choice(sentences) + "."
        return {"role": "assistant", "content": text}

    def tool_step(self, name: str) -> tuple[dict, dict]:
        """An answer asking for tool `name`, and the tool's result."""
        cid, args = f"call_{self.rng.getrandbits(48):012x}", json.dumps({"query": self.text.sentence(3, 6)})
        rows = [{"item": self.text.sentence(3, 8), "value": round(self.rng.uniform(-50, 500), 2)}
                for _ in range(self.rng.randint(3, 12))]
        call = {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
        return ({"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": cid, "content": json.dumps({"results": rows})})

    def ask(self, agent: str, turn: str, user: str, answer: dict, **kw) -> GenCall:
        """A single-shot call: the agent's system prompt and one user message."""
        messages = [{"role": "system", "content": system_prompt(self.shape, agent)},
                    {"role": "user", "content": user}]
        return self.call(agent, turn, messages, answer, **kw)

    def rounds(self, agents: list[str], opening: dict[str, str], rounds: int, turns: tuple[str, str],
               reply, say, flow: Iterable[GenCall] = (), gap: float | None = None) -> list[GenCall]:
        """Agents answering in rounds (a debate): each round, every agent continues its own
        conversation with `reply(agent, others)`, the others' previous answers. All calls."""
        convs = {a: [{"role": "system", "content": system_prompt(self.shape, a)},
                     {"role": "user", "content": opening[a]}] for a in agents}
        last: dict[str, GenCall] = {}
        every: list[GenCall] = []
        for r in range(rounds):
            now: dict[str, GenCall] = {}
            for a in agents:
                if r == 0:
                    now[a] = self.call(a, turns[0], list(convs[a]), say(), flow=flow, gap=gap)
                else:
                    others = [last[o] for o in agents if o != a]
                    convs[a] += [last[a].answer, {"role": "user", "content": reply(a, others)}]
                    now[a] = self.call(a, turns[1], list(convs[a]), say(), parent=last[a], flow=others)
                every.append(now[a])
            last = now
        return every

    def agent_loop(self, agent: str, task: str, tools: list[str], steps: list[str],
                   flow: Iterable[GenCall] = (), report_words: int = 180) -> GenCall:
        """A tool-using agent: one call per step (each asks for the next tool), then a report."""
        schemas = [_tool_schema(t) for t in tools]
        messages = [{"role": "system", "content": system_prompt(self.shape, agent)},
                    {"role": "user", "content": task}]
        prev, turn = None, "start"
        for name in [*steps, None]:
            answer, result = self.tool_step(name) if name else (self.say(report_words), None)
            gap = self.rng.uniform(0.2, 2.5) if prev else None
            prev = self.call(agent, turn, list(messages), answer, tools=schemas, parent=prev,
                             flow=flow if prev is None else (), gap=gap)
            if result is not None:
                messages += [answer, result]
                turn = f"after:{name}"
        return prev


def _tool_schema(name: str) -> dict:
    params = {"type": "object", "required": ["query"],
              "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}
    return {"type": "function", "function": {"name": name, "parameters": params,
                                             "description": f"{name.replace('_', ' ').capitalize()}."}}


class _Pool(list):
    """Documents of a run: a new one per instance, or (1 in 5) one an earlier instance used."""

    def document(self, b: _Builder, lo: int = 2000, hi: int = 6000) -> str:
        if self and b.rng.random() < 0.2:
            return b.rng.choice(self)
        self.append(b.text.tokens(lo, hi))
        return self[-1]


def _map_reduce(b: _Builder, pool: _Pool) -> None:
    experts = ("finance", "legal", "risk", "technology", "market", "operations")
    doc, q = pool.document(b), b.text.sentence(8, 14)[:-1] + "?"
    answers = []
    for role in experts:
        n = b.rng.choice((80, 120, 150, 200))
        user = (f"Document:\n{doc}\n\nQuestion: {q}\n\nAs the {role} expert, answer from your area of "
                f"expertise in at most {n} words. Answer in JSON with the keys \"answer\" and "
                f"\"confidence\".")
        body = json.dumps({"answer": b.say(b.rng.randint(60, 150), doc)["content"],
                           "confidence": round(b.rng.uniform(0.5, 0.95), 2)})
        answers.append(b.ask(role, "answer", user, {"role": "assistant", "content": body}, gap=0.0))
    joined = "\n\n".join(f"## {c.agent} expert\n{c.answer['content']}" for c in answers)
    b.ask("summarizer", "answer", f"Question: {q}\n\nThe experts answered:\n\n{joined}\n\nWrite the "
          f"final answer for the client. Reconcile disagreements and say which expert said what.",
          b.say(250), flow=answers)


def _debate(b: _Builder, pool: _Pool) -> None:
    agents, rounds = ["optimist", "skeptic", "analyst"], 3
    q, end = b.text.sentence(10, 16)[:-1] + "?", "End with a line 'Final answer: <answer>'."
    say = lambda: {"role": "assistant", "content": b.text.words(b.rng.randint(90, 180))  # noqa: E731
                   + f"\nFinal answer: {b.rng.choice(_WORDS)} {b.rng.randint(1, 99)}"}
    reply = lambda a, others: ("These are the answers of the other agents:\n\n"  # noqa: E731
                               + "\n\n".join(f"One agent answered:\n{o.answer['content']}" for o in others)
                               + f"\n\nUsing the reasoning of the other agents as additional advice, give "
                               f"an updated answer. {end}")
    opening = {a: f"Question: {q}\n\nGive your answer with step-by-step reasoning. {end}" for a in agents}
    last = b.rounds(agents, opening, rounds, ("open", "update"), reply, say, gap=0.0)[-len(agents):]
    finals = "\n\n".join(f"{c.agent}: {c.answer['content']}" for c in last)
    b.ask("judge", "decide", f"Question: {q}\n\nAfter {rounds} rounds the agents gave these final "
          f"answers:\n\n{finals}\n\nDecide the correct final answer and explain why in two sentences.",
          b.say(60), flow=last)


def _reflection(b: _Builder, pool: _Pool) -> None:
    task = b.text.sentence(10, 18)
    ctx = pool.document(b, 2000, 4000)
    conv = [{"role": "system", "content": system_prompt(b.shape, "actor")},
            {"role": "user", "content": f"Task: {task}\n\nContext:\n{ctx}\n\nWrite a complete solution."}]
    actor = b.call("actor", "start", list(conv), b.say(b.rng.randint(200, 350), ctx), gap=0.0)
    for _ in range(b.rng.choice((1, 2))):
        critic = b.ask("critic", "critique", f"Task: {task}\n\nProposed solution:\n"
                       f"{actor.answer['content']}\n\nList the concrete problems of this solution, most "
                       f"important first.", b.say(b.rng.randint(80, 160)), flow=[actor])
        conv += [actor.answer, {"role": "user", "content": f"A reviewer found these problems:\n"
                                f"{critic.answer['content']}\n\nRevise your solution to fix them. Return "
                                f"the full solution."}]
        actor = b.call("actor", "revise", list(conv), b.say(b.rng.randint(200, 350)), parent=actor,
                       flow=[critic])


def _refinement(b: _Builder, pool: _Pool) -> None:
    topic, kind = b.text.sentence(4, 8)[:-1], b.rng.choice(("memo", "briefing", "proposal", "review"))
    notes = pool.document(b, 2000, 4000)
    prev = b.ask("writer", "draft", f"Write a {kind} about {topic}.\n\nUse these notes:\n{notes}",
                 b.say(b.rng.randint(350, 600), notes), gap=0.0)
    for _ in range(b.rng.choice((2, 3, 4))):
        aspect = b.rng.choice(("clarity", "structure", "evidence", "tone", "brevity"))
        kept = [p for p in prev.answer["content"].split("\n\n") if b.rng.random() < 0.5]  # some stays
        doc = "\n\n".join(kept + b.text.words(b.rng.randint(200, 350)).split("\n\n"))
        prev = b.ask("editor", "improve", f"Here is the current version of the document:\n\n"
                     f"{prev.answer['content']}\n\nImprove it. Focus on {aspect}. Return the full "
                     f"revised document.", {"role": "assistant", "content": doc}, flow=[prev])


def _parallel_chains(b: _Builder, pool: _Pool) -> None:
    for _ in range(b.rng.choice((3, 4, 5))):  # one system prompt: all chains are "researcher"
        steps = ["web_search"] + ["fetch_page"] * b.rng.choice((1, 2)) + ["calculator"] * (b.rng.random() < 0.5)
        task = (f"Research task: {b.text.sentence(8, 14)}\n\nReport the three most important "
                f"findings with numbers and sources.")
        b.agent_loop("researcher", task, ["web_search", "fetch_page", "calculator"], steps)


_ANALYSTS = {  # analyst -> (the tool it starts with, the tool it then calls 3-5 times)
    "market": ("get_price_history", "get_indicators"), "news": ("search_news", "read_article"),
    "sentiment": ("get_social_posts", "score_sentiment"), "macro": ("get_macro_series", "get_calendar"),
    "fundamentals": ("get_financials", "get_ratios"), "options": ("get_option_chain", "get_flow"),
    "sector": ("get_sector_peers", "get_price_history"), "earnings": ("get_transcript", "get_estimates")}


def _trading_desk(b: _Builder, pool: _Pool) -> None:
    ticker, day = b.rng.choice(_NAMES).upper()[:4], f"2024-{b.rng.randint(1, 12):02d}-{b.rng.randint(1, 28)}"
    reports = []
    for name, (t1, t2) in _ANALYSTS.items():
        steps = [t1] + [t2] * b.rng.randint(3, 5) + ([t1] if b.rng.random() < 0.5 else [])
        task = f"Analyze {ticker} for the trading day {day}. Use your tools, then write your report."
        reports.append(b.agent_loop(f"{name}_analyst", task, [t1, t2], steps))
    text = "\n\n".join(f"### {c.agent}\n{c.answer['content']}" for c in reports)
    sides = ["bull_researcher", "bear_researcher"]
    opening = {s: f"Ticker: {ticker}\n\nAnalyst reports:\n\n{text}\n\nMake the {s[:4]} case." for s in sides}
    debate = b.rounds(sides, opening, 5, ("open", "rebut"),
                      lambda s, o: f"The {o[0].agent[:4]} researcher argued:\n{o[0].answer['content']}"
                                   f"\n\nRebut their points and strengthen the {s[:4]} case.",
                      lambda: b.say(130), flow=reports)
    transcript = "\n\n".join(f"{c.agent}:\n{c.answer['content']}" for c in debate)
    rm = b.ask("research_manager", "decide", f"Ticker: {ticker}\n\nDebate transcript:\n\n{transcript}"
               f"\n\nDecide: buy, sell or hold, and write an investment plan.", b.say(200), flow=debate)
    trader = b.agent_loop("trader", f"Investment plan:\n{rm.answer['content']}\n\nPropose a concrete "
                          f"trade for {ticker}.", ["get_position", "get_quote"], ["get_position", "get_quote"],
                          flow=[rm], report_words=120)
    risks = ["aggressive_risk", "conservative_risk", "neutral_risk"]
    opening = {x: f"Trader proposal:\n{trader.answer['content']}\n\nAssess it from the "
                  f"{x.split('_')[0]} risk perspective." for x in risks}
    said = lambda x, others: ("The other risk analysts said:\n\n"  # noqa: E731
                              + "\n\n".join(o.answer["content"] for o in others)
                              + "\n\nRespond to their arguments.")
    last = b.rounds(risks, opening, 4, ("open", "respond"), said, lambda: b.say(100), flow=[trader])[-3:]
    finals = "\n\n".join(f"{c.agent}: {c.answer['content']}" for c in last)
    pm = b.ask("portfolio_manager", "decide", f"Trader proposal:\n{trader.answer['content']}\n\nRisk "
               f"debate:\n{finals}\n\nApprove, modify or reject the trade.", b.say(120),
               flow=[trader, *last])
    comp = b.agent_loop("compliance", f"Order to check:\n{pm.answer['content']}\n\nCheck it against the "
                        f"firm's limits.", ["check_limits"], ["check_limits"], flow=[pm], report_words=80)
    exe = b.agent_loop("execution", f"Approved order:\n{pm.answer['content']}\n\nCompliance notes:\n"
                       f"{comp.answer['content']}\n\nPlan the execution.", ["get_order_book"],
                       ["get_order_book"], flow=[pm, comp], report_words=100)
    b.ask("reporter", "write", f"Write the daily desk report for {ticker}.\n\nDecision:\n"
          f"{pm.answer['content']}\n\nExecution plan:\n{exe.answer['content']}", b.say(250),
          flow=[pm, exe])


_GENERATORS: dict[str, Callable[[_Builder, _Pool], None]] = {f.__name__[1:]: f for f in (
    _map_reduce, _debate, _reflection, _refinement, _parallel_chains, _trading_desk)}


def generate(shape: str, n: int, seed: int = 0) -> list[Instance]:
    """`n` instances of a shape; instance i is the same for the same seed, whatever `n` is."""
    if shape not in _GENERATORS:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    pool, out = _Pool(), []
    for i in range(n):
        b = _Builder(shape, f"{shape}-{seed}-{i}", random.Random(f"{shape}/{seed}/{i}"))
        _GENERATORS[shape](b, pool)
        out.append(Instance(shape, b.iid, tuple(b.calls)))
    return out


def schedule(instances: Iterable[Instance], start: float = 1_700_000_000.0,
             spacing: tuple[float, float] = (20.0, 60.0), seed: int = 0,
             concurrent: bool = False) -> list[tuple[float, float, GenCall]]:
    """(start, end, call) for every call, sorted by end (the order a proxy finishes them).

    A call starts its gap after its dependencies are done; an instance's roots start together
    (within 20 ms). Instances follow each other `spacing` seconds apart, or, `concurrent`, start
    at random in a shared window so that they interleave.
    """
    rng, instances, out = random.Random(seed), list(instances), []
    t = start
    for inst in instances:
        begin = start + rng.uniform(0, spacing[1] * len(instances)) if concurrent else t
        ends: dict[str, float] = {}
        for call in inst.calls:  # generated in dependency order
            deps = [ends[d] for d in call.after]
            s = (max(deps) + call.gap) if deps else begin + rng.uniform(0.0, 0.02)
            ends[call.id] = s + call.duration
            out.append((s, s + call.duration, call))
        t = max(ends.values()) + rng.uniform(*spacing)
    out.sort(key=lambda x: (x[1], x[0]))
    return out


def exchange_of(call: GenCall, started: float, ended: float, tenant: str | None = None):
    """The call as a finished, analysed `Exchange`, for feeding a learner offline."""
    from proxy.exchange import Exchange

    json_type = [("content-type", "application/json")]
    body = {"id": "chatcmpl-" + call.id, "object": "chat.completion", "model": "agent-model",
            "choices": [{"index": 0, "message": call.answer, "finish_reason": "stop"}]}
    ex = Exchange(method="POST", path="/v1/chat/completions", request_body=json.dumps(call.request).encode(),
                  request_headers=json_type, started_at=started, status=200, response_headers=json_type,
                  response_chunks=[(ended - started, json.dumps(body).encode())], t_done=ended - started,
                  tenant=tenant)
    return ex.analyze()
