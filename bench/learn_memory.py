"""The online learner's memory under stress: RSS, time per call and what its bounded stores hold.

    .venv/bin/python bench/learn_memory.py            # every scenario (about 2 minutes on 2 cores)
    .venv/bin/python bench/learn_memory.py --quick    # small N, for a smoke run (prints only)

The learner lives as long as the proxy, so what it keeps must be bounded in bytes, not only in
number. Each scenario feeds N synthetic exchanges through the observer's path in-process, as
the observer child runs it (`proxy.observe.Observer` without a store, the learner's
`LearnSink` as its sink; no capture, no SQLite), in a fresh process of its own so that its RSS
is its own (the script re-runs itself with `--scenario NAME`). At N/8, N/4, N/2 and N calls
(one-long-session: turns N/20, N/4, N/2, N) it reports the process's RSS (VmRSS) and peak
(VmHWM), the mean time of `Observer.process` over the last 50 calls, the slowest call since the
previous mark (a full garbage collection shows there), and what each bounded store holds
beside its cap:

- distinct-system: every session sends its own ~100 KB system prompt (a pasted document), once;
- big-answers: every answer is a tool call whose arguments carry ~100 KB (a written file);
- long-histories: the last call of sessions of 400 messages, each session its own opening;
- one-long-session: one tool loop that resends its whole growing history, for N turns.

Writes bench/results/learn-memory.md and .json (with --quick, only where --out says).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learn.sessions import SessionLinker  # noqa: E402
from proxy.exchange import Exchange  # noqa: E402
from proxy.learning import LearnSink  # noqa: E402
from proxy.observe import Observer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "learn-memory.md"
WINDOW = 50
"""Calls the time per call is averaged over, up to each mark."""
DOCUMENT = 100 * 1024
"""Characters of a large message (a system prompt, a tool call's arguments)."""

_rng = random.Random(0)
VOCAB = ["".join(_rng.choices("abcdefghijklmnopqrstuvwxyz", k=_rng.randint(2, 9)))
         for _ in range(5000)]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCAB, k=n))


def document(rng: random.Random, size: int = DOCUMENT) -> str:
    """Distinct prose of about `size` characters: sentences of 12 words, one a line."""
    lines, n = [], 0
    while n < size:
        line = words(rng, 12).capitalize() + "."
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines)


def exchange(messages: list[dict], answer: dict, started: float,
             tools: list | None = None) -> Exchange:
    """A finished, non-streamed chat call in its raw form, as the proxy hands it over."""
    body = {"model": "m", "messages": messages, **({"tools": tools} if tools else {})}
    response = {"id": "cmpl-" + os.urandom(6).hex(), "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    ex = Exchange(method="POST", path="/v1/chat/completions", request_body=json.dumps(body).encode(),
                  request_headers=[("content-type", "application/json"),
                                   ("authorization", "Bearer sk-bench")], started_at=started)
    ex.status, ex.t_done = 200, 1.0
    ex.response_headers = [("content-type", "application/json")]
    ex.response_chunks = [(1.0, json.dumps(response).encode())]
    return ex


# -- scenarios ---------------------------------------------------------------------------------

T0 = 1_700_000_000.0
WRITE_FILE = [{"type": "function",
               "function": {"name": "write_file", "parameters": {"type": "object"}}}]
BASH = [{"type": "function", "function": {"name": "bash", "description": "run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}}]


def distinct_system(rng: random.Random, n: int) -> Iterator[Exchange]:
    for i in range(n):
        yield exchange([{"role": "system", "content": document(rng)},
                        {"role": "user", "content": "Question: " + words(rng, 15)}],
                       {"role": "assistant", "content": "Answer " + words(rng, 40)}, T0 + i)


def big_answers(rng: random.Random, n: int) -> Iterator[Exchange]:
    for i in range(n):
        arguments = json.dumps({"path": f"f{i}.py", "content": document(rng)})
        yield exchange([{"role": "system", "content": "You write files."},
                        {"role": "user", "content": "Write module " + words(rng, 10)}],
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": f"c{i}", "type": "function",
                            "function": {"name": "write_file", "arguments": arguments}}]},
                       T0 + i, WRITE_FILE)


def long_histories(rng: random.Random, n: int, length: int = 400) -> Iterator[Exchange]:
    for s in range(n):
        messages = [{"role": "system", "content": "You are a helpful agent."},
                    {"role": "user", "content": f"Ticket {s}: " + words(rng, 8)}]
        for k in range(length // 2 - 1):
            messages += [{"role": "assistant", "content": None, "tool_calls": [
                             {"id": f"c{s}_{k}", "type": "function",
                              "function": {"name": "look", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": f"c{s}_{k}", "content": f"result {k}"}]
        yield exchange(messages, {"role": "assistant", "content": "done"}, T0 + 10.0 * s)


def one_long_session(rng: random.Random, n: int) -> Iterator[Exchange]:
    messages = [{"role": "system", "content": "You are a coding agent. " + words(rng, 200)},
                {"role": "user", "content": "Fix the bug in " + words(rng, 30)}]
    for i in range(1, n + 1):
        answer = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "bash", "arguments": json.dumps({"cmd": "ls " + words(rng, 5)})}}]}
        yield exchange(list(messages), answer, T0 + 2.0 * i, BASH)
        messages += [answer, {"role": "tool", "tool_call_id": f"call_{i}", "content": words(rng, 40)}]


SCENARIOS: dict[str, tuple[Callable[[random.Random, int], Iterator[Exchange]], int, int]] = {
    # name: (exchanges, N, N with --quick)
    "distinct-system": (distinct_system, 8000, 240),  # 240 x 100 KB passes the 16 M template cap
    "big-answers": (big_answers, 6000, 200),
    "long-histories": (long_histories, 6000, 200),
    "one-long-session": (one_long_session, 2000, 200),
}


def marks(name: str, n: int) -> list[int]:
    shares = (20, 4, 2, 1) if name == "one-long-session" else (8, 4, 2, 1)
    return sorted({max(1, n // d) for d in shares})


# -- one scenario, in its own process ----------------------------------------------------------

def memory_mb() -> tuple[float, float]:
    """This process's resident set now and at its peak (VmRSS, VmHWM), in MB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                found[line[:5]] = int(line.split()[1]) / 1024
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


class ObserverPath:
    """The observer child's path for one exchange: analyse, link, learn (no store)."""

    def __init__(self) -> None:
        self.observer = Observer(None, SessionLinker())
        self.sink = LearnSink(None)
        self.observer.sinks.append(self.sink)

    def feed(self, ex: Exchange) -> float:
        t = time.perf_counter()
        self.observer.process([ex])
        return time.perf_counter() - t

    def held(self) -> dict[str, int]:
        """What each bounded store holds now."""
        learner = self.sink.learner
        flow = learner.flow.sizes()
        return {
            "template_chars": learner.miner.chars, "templates": len(learner.miner),
            "flow_answer_chunks": flow["answer_chunks"], "flow_cached_chunks": flow["cached_chunks"],
            "history_bytes": learner.linker.history_bytes,
            "observer_history_bytes": self.observer.linker.history_bytes,
            "linker_prefixes": len(learner.linker), "observer_prefixes": len(self.observer.linker),
            "radix_tokens": learner.radix.tokens, "token_cache": len(learner.tokenizer),
            "prefix_ids": learner.registry.prefix_ids,
            "head_agents": len(self.sink.heads._by_agent),  # StaticHeads has no __len__
            "head_chars": self.sink.heads.chars,
        }

    def caps(self) -> dict[str, int | None]:
        """The bound of each of `held()`'s figures."""
        learner = self.sink.learner
        return {
            "template_chars": learner.miner.max_chars, "templates": learner.miner.max_templates,
            "flow_answer_chunks": learner.flow.budget,
            # a constructor argument FlowIndex keeps private
            "flow_cached_chunks": learner.flow._cache_chunks,
            "history_bytes": learner.linker.history_budget,
            "observer_history_bytes": self.observer.linker.history_budget,
            "linker_prefixes": learner.linker.window, "observer_prefixes": self.observer.linker.window,
            "radix_tokens": learner.radix.max_tokens,
            "token_cache": learner.tokenizer.max_cached_tokens,
            "prefix_ids": learner.registry.prefix_budget,
            "head_agents": self.sink.heads.max_agents, "head_chars": self.sink.heads.max_chars,
        }

    def check(self) -> None:
        """The stores' own integrity checks: their counters are what they really hold."""
        learner = self.sink.learner
        learner.miner.check()
        learner.flow.check()
        learner.linker.check()
        self.observer.linker.check()
        learner.radix.check()


def run_scenario(name: str, n: int, check: bool) -> dict:
    make, _, _ = SCENARIOS[name]
    path = ObserverPath()
    at = set(marks(name, n))
    times: list[float] = []
    rows, fed, slowest = [], 0, 0.0
    started = time.perf_counter()
    for i, ex in enumerate(make(random.Random(1), n), 1):
        fed += len(ex.request_body) + sum(len(c) for _, c in ex.response_chunks)
        times.append(path.feed(ex))
        slowest = max(slowest, times[-1])
        if i not in at:
            continue
        rss, peak = memory_mb()
        window = times[-WINDOW:]
        row = {"calls": i, "fed_mb": fed / 1e6, "rss_mb": rss, "peak_mb": peak,
               "ms_per_call": 1e3 * sum(window) / len(window), "max_ms": 1e3 * slowest,
               **path.held(), "sizes": path.sink.learner.sizes(),
               "skipped": dict(path.sink.learner.skipped)}
        rows.append(row)
        slowest = 0.0
        print(f"{name:>16} {i:6d} calls  RSS {rss:7.1f} MB  {row['ms_per_call']:7.2f} ms/call  "
              f"max {row['max_ms']:7.1f} ms", file=sys.stderr, flush=True)
        if check:
            path.check()
    return {"scenario": name, "n": n, "rows": rows, "caps": path.caps(),
            "seconds": time.perf_counter() - started}


def in_fresh_process(name: str, n: int, check: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--scenario", name, "--n", str(n)]
    out = subprocess.run(cmd + (["--check"] if check else []), cwd=ROOT, stdout=subprocess.PIPE,
                         check=True, timeout=900)
    return json.loads(out.stdout)


# -- report ------------------------------------------------------------------------------------

def _n(value: float) -> str:
    return f"{value:,.0f}"


def report(results: list[dict], seconds: float, command: str) -> str:
    caps = results[0]["caps"]
    lines = [
        "# learn/: memory and time per call under stress", "",
        f"`{command}` on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d')} ({seconds:.0f} s). Each scenario in a fresh process: "
        "synthetic exchanges through the observer's path in-process (`Observer` without a store, "
        "then the learner's `LearnSink`), as the observer child runs them, capture aside. "
        f"RSS is the whole process's (VmRSS; peak: VmHWM); ms per call is `Observer.process` "
        f"averaged over the {WINDOW} calls before the mark, max the slowest call since the "
        "previous mark.", "",
        "- distinct-system: every session its own ~100 KB system prompt, one call each.",
        "- big-answers: every answer a tool call with ~100 KB of arguments.",
        "- long-histories: the last call of sessions of 400 messages, each its own opening.",
        "- one-long-session: one tool loop resending its growing history; calls = turns.", "",
        "| scenario | calls | fed MB | RSS MB | peak RSS MB | ms per call | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['scenario']} | {r['calls']} | {r['fed_mb']:.1f} | {r['rss_mb']:.0f} "
                         f"| {r['peak_mb']:.0f} | {r['ms_per_call']:.2f} | {r['max_ms']:.1f} |")
    lines += [
        "", "What the bounded stores hold (cap: the default bound):", "",
        "| scenario | calls | template chars | templates | data-flow answer chunks | data-flow "
        "cached chunks | session histories KiB, learner / observer | radix tokens | token cache ids "
        "| prefix ids | static heads: agents, M characters |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| cap | | {_n(caps['template_chars'])} | {_n(caps['templates'])} "
        f"| {_n(caps['flow_answer_chunks'])} | {_n(caps['flow_cached_chunks'])} "
        f"| {_n(caps['history_bytes'] / 1024)} / {_n(caps['observer_history_bytes'] / 1024)} "
        f"| {_n(caps['radix_tokens'])} | {_n(caps['token_cache'])} | {_n(caps['prefix_ids'])} "
        f"| {caps['head_agents']}, {caps['head_chars'] / 1e6:.1f} |",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"| {res['scenario']} | {r['calls']} | {_n(r['template_chars'])} | {_n(r['templates'])} "
                f"| {_n(r['flow_answer_chunks'])} | {_n(r['flow_cached_chunks'])} "
                f"| {_n(r['history_bytes'] / 1024)} / {_n(r['observer_history_bytes'] / 1024)} "
                f"| {_n(r['radix_tokens'])} | {_n(r['token_cache'])} | {_n(r['prefix_ids'])} "
                f"| {r['head_agents']}, {r['head_chars'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small N and the stores' integrity checks (smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report path, .json beside it (default {RESULTS.relative_to(ROOT)}; "
                             "with --quick, none)")
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scenario:  # the child: one scenario, its result as JSON on stdout
        _, full, quick = SCENARIOS[args.scenario]
        print(json.dumps(run_scenario(args.scenario, args.n or full, args.check)))
        return 0
    started = time.perf_counter()
    results = [in_fresh_process(name, quick if args.quick else full, args.quick)
               for name, (_, full, quick) in SCENARIOS.items()]
    seconds = time.perf_counter() - started
    command = ".venv/bin/python bench/learn_memory.py" + (" --quick" if args.quick else "")
    text = report(results, seconds, command)
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "cores": os.cpu_count(), "seconds": seconds,
             "date": time.strftime("%Y-%m-%d"), "scenarios": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
