"""Agent workloads for the end-to-end benchmark, as plain data.

An `Instance` is one agent task or one workflow run: calls with dependencies, each call's
prompt, its forced output length, and the tool time before it. As a real agent does, a call
sends back what the model answered earlier: `fills` names the messages whose text is the
output of earlier calls (the previous turns of a conversation, the experts' answers a
summarizer reads), `splices` the answers quoted inside a larger message (a debater reading the
others' answers). Output lengths are forced, so every mode does the same work.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from pathlib import Path

from bench.shapes import GenCall, generate

WORKLOADS = Path(__file__).resolve().parents[2] / "shared" / "workloads"
CHARS_PER_TOKEN = 3.6


@dataclass
class Call:
    key: str
    messages: list[dict]
    max_tokens: int
    after: tuple[str, ...] = ()
    gap: float = 0.0
    """Seconds of tool or think time between the last dependency's answer and this call."""
    fills: tuple[tuple[int, tuple[str, ...]], ...] = ()
    """(message index, call keys): that message's text is those calls' outputs, joined."""
    splices: tuple[tuple[int, str, str], ...] = ()
    """(message index, quoted text, call key): the message quotes that call's answer; the
    quoted text (a stand-in written before the call ran) gives way to the call's output."""

    def prompt(self, outputs: dict[str, str]) -> list[dict]:
        """The messages to send, with earlier calls' outputs filled in."""
        messages = list(self.messages)
        for index, keys in self.fills:
            text = "\n\n".join(outputs.get(k, "") for k in keys)
            messages[index] = {**messages[index], "content": text}
        for index, quoted, key in self.splices:
            text = messages[index]["content"].replace(quoted, outputs.get(key, ""), 1)
            messages[index] = {**messages[index], "content": text}
        return messages


@dataclass
class Instance:
    name: str
    kind: str
    calls: list[Call]
    start: float = 0.0
    """Seconds after the workload starts that this instance begins."""
    meta: dict = field(default_factory=dict)


def _text_of(message: dict) -> str:
    content = message.get("content") or ""
    if message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in message["tool_calls"]]
        content = (content + "\n" if content else "") + json.dumps(calls)
    return content


def _as_chat(message: dict) -> dict:
    """The trace's message as plain chat text (the demo model's template renders text only)."""
    role = message["role"]
    if role == "tool":
        return {"role": "user", "content": "[tool result] " + _text_of(message)}
    return {"role": role, "content": _text_of(message)}


def _out_tokens(answer: dict) -> int:
    """The recorded answer's length in tokens, within what a tiny CPU benchmark can afford."""
    return max(8, min(128, int(len(_text_of(answer)) / CHARS_PER_TOKEN)))


def tau_bench(runs: range, max_calls: int, gap_median: float, seed: int,
              stagger: float = 0.25, max_prompt_tokens: int = 6500) -> list[Instance]:
    """Replays of the tau-bench airline agent: each assistant turn is one call."""
    base = WORKLOADS / "tau-bench-airline"
    data = json.loads((base / "gpt-4o-airline.json").read_text())
    tools = json.loads((base / "tools.json").read_text())
    rng = random.Random(seed)
    out = []
    for n, i in enumerate(runs):
        traj = data[i]["traj"]
        system = {"role": "system",
                  "content": traj[0]["content"] + "\n\n# Tools\n" + json.dumps(tools)}
        history = [system] + [_as_chat(m) for m in traj[1:]]
        calls: list[Call] = []
        answered: list[tuple[int, str]] = []  # (index in history, call that wrote it)
        for k, m in enumerate(traj):
            if m["role"] != "assistant" or k == 0:
                continue
            prompt = history[:k]
            if sum(len(p["content"]) for p in prompt) / CHARS_PER_TOKEN > max_prompt_tokens:
                break
            out_tokens = _out_tokens(m)
            gap = rng.lognormvariate(0, 0.5) * gap_median if calls else 0.0
            after = (calls[-1].key,) if calls else ()
            fills = tuple((i, (key,)) for i, key in answered)
            key = f"c{len(calls)}"
            calls.append(Call(key, prompt, out_tokens, after, gap, fills))
            answered.append((k, key))
            if len(calls) >= max_calls:
                break
        out.append(Instance(f"tau-{i}", "tau-bench", calls, start=n * stagger))
    return out


def document(rng: random.Random, tokens: int) -> str:
    vocab = [f"{a}{b}" for a in ("re", "con", "pro", "in", "ex", "de", "per", "trans")
             for b in ("port", "tain", "duct", "vert", "form", "sist", "cede", "spect")]
    return " ".join(rng.choice(vocab) for _ in range(int(tokens * 0.55)))


def map_reduce(instances: int, experts: int, doc_tokens: int, seed: int,
               reuse_every: int = 2, stagger: float = 4.0) -> list[Instance]:
    """N experts answer over one shared document, then a summarizer reads their answers.

    Every `reuse_every`-th instance re-uses the previous instance's document (a document
    seen before). Prompt layout puts the shared text first, as a well-built app does.
    """
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are one of several analysts. " +
              document(rng, 400)}
    out = []
    doc = document(rng, doc_tokens)
    for i in range(instances):
        if i % reuse_every == 0:  # otherwise: the previous instance's document again
            doc = document(rng, doc_tokens)
        calls = []
        for e in range(experts):
            calls.append(Call(f"e{e}", [system, {"role": "user", "content": doc},
                                        {"role": "user", "content": f"As expert {e}, assess "
                                         f"risk factor {rng.randint(1, 99)}."}], 48))
        experts_keys = tuple(f"e{e}" for e in range(experts))
        calls.append(Call("sum", [{"role": "system", "content": "Summarize the analysts."},
                                  {"role": "user", "content": ""}], 64,
                          after=experts_keys, gap=0.05, fills=((1, experts_keys),)))
        out.append(Instance(f"mapreduce-{i}", "map-reduce", calls, start=i * stagger))
    return out


def agent_loops(agents: int, calls: int, seed: int, shared_tokens: int = 600,
                task_tokens: int = 800, tool_tokens: int = 160, out_tokens: int = 40,
                gap_median: float = 1.5, stagger: float = 0.25) -> list[Instance]:
    """Tool-using agent loops, the shape of notes/where-the-time-goes.md B.

    Each agent shares one system prompt, has a task of its own, and for `calls` turns sends
    its whole conversation: the model's answers and a tool result after each. Prompts grow
    from shared + task to about shared + task + calls x (out + tool) tokens; the tool time
    before each call is lognormal around `gap_median` seconds.
    """
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are an operations agent with tools. " +
              document(rng, shared_tokens)}
    out = []
    for a in range(agents):
        history = [system, {"role": "user", "content": document(rng, task_tokens)}]
        loop: list[Call] = []
        answered: list[tuple[int, str]] = []
        for k in range(calls):
            key = f"c{k}"
            gap = rng.lognormvariate(0, 0.5) * gap_median if loop else 0.0
            after = (loop[-1].key,) if loop else ()
            loop.append(Call(key, list(history), out_tokens, after, gap,
                             tuple((i, (ck,)) for i, ck in answered)))
            answered.append((len(history), key))
            history += [{"role": "assistant", "content": ""},
                        {"role": "user", "content": "[tool result] " +
                         document(rng, tool_tokens)}]
        out.append(Instance(f"loop-{a}", "agent-loop", loop, start=a * stagger))
    return out


def generated(shape: str, n: int, seed: int, stagger: float = 3.0) -> list[Instance]:
    """Instances of a generated multi-agent workflow (bench/shapes.py), started `stagger` s apart.

    Prompts are the generated requests as plain chat (tools in the system prompt, as
    `tau_bench` has them), system prompts and documents exactly as generated, so that what
    instances share (1 in 5 re-uses a document) stays shared. Every answer the requests carry
    (the turns of the conversation a call continues, the answers it reads) is the earlier
    call's real output when the workload runs.
    """
    return [Instance(inst.id, shape, _calls_of(inst.calls), start=i * stagger)
            for i, inst in enumerate(generate(shape, n, seed))]


def _calls_of(gen: tuple[GenCall, ...]) -> list[Call]:
    answers = {g.id: _text_of(g.answer) for g in gen}
    made: dict[str, Call] = {}
    for g in gen:  # generated in dependency order
        messages = [_as_chat(m) for m in g.request["messages"]]
        if g.request.get("tools"):
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n# Tools\n"
                           + json.dumps(g.request["tools"])}
        fills, splices = (), ()
        if g.parent:  # its conversation: the parent's prompt, then the parent's answer
            parent = made[g.parent]
            fills = parent.fills + ((len(parent.messages), (g.parent,)),)
            splices = parent.splices
        splices += tuple((i, answers[key], key) for key in g.flow
                         for i, m in enumerate(messages) if answers[key] in m["content"])
        made[g.id] = Call(g.id, messages, _out_tokens(g.answer), g.after, g.gap, fills, splices)
    return list(made.values())


def interleave(groups: list[list[Instance]], stagger: float) -> list[Instance]:
    """The groups' instances taken in turn (the first of each group, then the second...), one
    starting every `stagger` seconds: a mix of workflows sharing one engine."""
    turns = [inst for turn in zip_longest(*groups) for inst in turn if inst is not None]
    return [replace(inst, start=k * stagger) for k, inst in enumerate(turns)]


def working_set_tokens(instances: list[Instance],
                       spans: dict[tuple[str, str], tuple[float, float]] | None = None) -> int:
    """Peak tokens a KV cache must hold for no call to find a prefix it re-uses evicted.

    The prefixes are every distinct prompt prefix (a shared system prompt or document counted
    once) and every answer, at its forced length; estimated from characters. A prefix is held
    from the start of the first call that sends it (an answer: from its own call's start) to
    the end of the last. `spans` are (start, end) by (instance name, call key), as a run
    measured them; without them every call runs at once, an upper bound.
    """
    life: dict[int, tuple[int, float, float]] = {}  # prefix -> (characters, first, last)
    for inst in instances:
        outputs = {c.key: f"{inst.name}/{c.key}".ljust(int(c.max_tokens * CHARS_PER_TOKEN), ".")
                   for c in inst.calls}
        for call in inst.calls:
            begin, end = spans[(inst.name, call.key)] if spans else (0.0, 1.0)
            answer = {"role": "assistant", "content": outputs[call.key]}
            node = 0
            for message in [*call.prompt(outputs), answer]:
                node = hash((node, message["role"], message["content"]))
                chars, first, last = life.get(node, (len(message["content"]), begin, end))
                life[node] = (chars, min(first, begin), max(last, end))
    held = peak = 0
    # A prefix released at the moment another is taken makes room for it: ends sort first.
    for _, chars in sorted([(f, c) for c, f, _ in life.values()] +
                           [(last, -c) for c, _, last in life.values()]):
        held += chars
        peak = max(peak, held)
    return int(peak / CHARS_PER_TOKEN)
