"""One workload measured in each mode of the end-to-end benchmark (bench/e2e.py).

The agents' client (`run_workload`: every instance's calls streamed, as their dependencies
and tool gaps allow, and the figures of the run), `preheat serve` in its own process in front
of the engine (`Proxy`), and `compare`: the modes run in turn on the same engine, its prefix
cache emptied before each, with the CPU each used and the proxy's counters.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from bench.cpu import cpu_seconds
from bench.workloads import Call, Instance, working_set_tokens
from engine.process import free_port
from engine.supervisor import Engine, metric_totals
from proxy.server import queued_seconds

ROOT = Path(__file__).resolve().parents[1]

MODES = ("direct", "preheat-off", "preheat-on", "oracle", "unpressured")
"""`unpressured` (cache-pressure workloads only): direct to an engine whose cache holds the
working set, starting empty: what the pressure costs, apart from what no server can know
before it is sent (the oracle has every prompt cached, tool results included)."""

VARIANT = "on:"
"""A variant's mode is this and its name (`bench/e2e.py --variant NAME PREHEAT_X=V ...`):
preheat-on with those settings, run in the same turns as the other modes."""

Variants = dict[str, dict[str, str]]
"""Mode (`on:NAME`) -> the PREHEAT_* settings its proxy runs with."""


@dataclass
class CallResult:
    instance: str
    key: str
    start: float  # time.perf_counter() when it was sent
    ttft: float
    latency: float
    prompt_tokens: int
    cached_tokens: int
    text: str
    queued: float = 0.0
    """Seconds preheat's admission held the call (its `Server-Timing`; 0 direct)."""


Priority = Callable[[Instance, Call], int | None]
"""vLLM `priority` to send a call at (bench/priority.py), or None for the engine's default."""

SEEDED = False
"""Sample every call at temperature 1 with a seed taken from its prompt (`bench/e2e.py
--seeded`) instead of greedily. The random-weight model's greedy answers repeat one word
(" pickler pickler ..."), so every answer is like every other, and preheat cannot tell which
later prompt pasted which answer (the hand-offs of multi-agent runs). Sampled, they are as
distinct as a real model's. Seeded by the prompt, each call's answer is the same in every
mode, and a request repeated word for word is the same request, as it is greedy, which
preheat's prompt cache may answer (a seed of each call's own would make every request
unique)."""


def sampling(messages: list[dict]) -> dict:
    if not SEEDED:
        return {"temperature": 0}
    prompt = json.dumps(messages, sort_keys=True).encode()
    return {"temperature": 1.0, "seed": zlib.crc32(prompt)}


async def run_call(client: httpx.AsyncClient, base: str, model: str, inst: Instance, call,
                   outputs: dict[str, str], priority: Priority | None = None) -> CallResult:
    messages = call.prompt(outputs)
    body = {"model": model, "messages": messages, "max_tokens": call.max_tokens,
            "ignore_eos": True, **sampling(messages), "stream": True,
            "stream_options": {"include_usage": True}}
    level = priority(inst, call) if priority else None
    if level is not None:
        body["priority"] = level
    start = time.perf_counter()
    ttft = None
    usage = {}
    text: list[str] = []
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{inst.name}/{call.key}: {r.status_code} {await r.aread()!r}")
        queued = queued_seconds(r.headers.get("server-timing", ""))
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            for choice in obj.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    latency = time.perf_counter() - start
    details = usage.get("prompt_tokens_details") or {}
    return CallResult(inst.name, call.key, start, ttft or latency, latency,
                      usage.get("prompt_tokens", 0), details.get("cached_tokens") or 0,
                      "".join(text), queued)


async def run_instance(client, base, model, inst: Instance, t0: float,
                       priority: Priority | None = None) -> tuple[float, list]:
    await asyncio.sleep(max(0.0, t0 + inst.start - time.perf_counter()))
    begun = time.perf_counter()
    done: dict[str, asyncio.Event] = {c.key: asyncio.Event() for c in inst.calls}
    results: list[CallResult] = []
    outputs: dict[str, str] = {}

    async def one(call) -> None:
        for dep in call.after:
            await done[dep].wait()
        await asyncio.sleep(call.gap)
        result = await run_call(client, base, model, inst, call, outputs, priority)
        results.append(result)
        outputs[call.key] = result.text
        done[call.key].set()

    await asyncio.gather(*(one(c) for c in inst.calls))
    return time.perf_counter() - begun, results


async def run_workload(base: str, model: str, instances: list[Instance],
                       sequential: bool = False, priority: Priority | None = None) -> dict:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        if sequential:  # each instance starts when the one before it has finished
            outs = []
            for inst in instances:
                outs.append(await run_instance(client, base, model, inst, time.perf_counter()
                                               - inst.start, priority))
        else:
            outs = await asyncio.gather(
                *(run_instance(client, base, model, i, t0, priority) for i in instances))
        makespan = time.perf_counter() - t0
    e2e = [o[0] for o in outs]
    calls = [c for o in outs for c in o[1]]
    prompt = sum(c.prompt_tokens for c in calls)
    spans = {(c.instance, c.key): (c.start, c.start + c.latency) for c in calls}
    return {
        "e2e_p50": statistics.median(e2e), "e2e_p90": _pct(e2e, 0.9), "makespan": makespan,
        "ttft_p50": statistics.median(c.ttft for c in calls),
        "ttft_p90": _pct([c.ttft for c in calls], 0.9),
        "cached_share": sum(c.cached_tokens for c in calls) / prompt if prompt else 0.0,
        "calls": len(calls), "prompt_tokens": prompt,
        "working_set": working_set_tokens(instances, spans),
        "engine_load": engine_load(calls, makespan),
        "held_idle": held_idle(calls),
        "instances": {inst.name: round(o[0], 2) for inst, o in zip(instances, outs)},
        "queued": {inst.name: round(sum(c.queued for c in o[1]), 2)
                   for inst, o in zip(instances, outs)},
    }


def engine_load(calls: list[CallResult], makespan: float) -> float:
    """Calls on the engine at once, on average over the makespan: each call's time from
    when preheat's admission let it go (its `Server-Timing`) to its last token."""
    return sum(max(0.0, c.latency - c.queued) for c in calls) / makespan if makespan else 0.0


def held_idle(calls: list[CallResult]) -> float:
    """Seconds in which preheat's admission held a call while no call was on the engine:
    time an engine with work to do spent idle (0 direct, where nothing is held)."""
    events = []
    for c in calls:
        let_go = c.start + min(c.queued, c.latency)
        if c.queued > 0:
            events += [(c.start, 0, 1), (let_go, 0, -1)]
        events += [(let_go, 1, 1), (c.start + c.latency, 1, -1)]
    held = running = 0
    total = 0.0
    last = None
    for at, kind, step in sorted(events, key=lambda e: (e[0], -e[2])):
        if last is not None and held and not running:
            total += at - last
        last = at
        if kind:
            running += step
        else:
            held += step
    return total


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Proxy:
    """`preheat serve` in its own process, in front of the engine."""

    def __init__(self, upstream: str, optimised: bool, capacity: int,
                 kv_events: str | None = None, directory: str | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.dir = directory or tempfile.mkdtemp(prefix="preheat-e2e-")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PREHEAT_LOG_LEVEL=os.environ.get("PREHEAT_LOG_LEVEL", "WARNING"),
                   PREHEAT_ADMISSION="1" if optimised else "0",
                   PREHEAT_PROMPT_CACHE="1" if optimised else "0",
                   PREHEAT_ADMISSION_CAPACITY_TOKENS=str(capacity),
                   PREHEAT_PREWARM="1" if optimised else "0")
        if optimised and kv_events:
            env["PREHEAT_KV_EVENTS"] = kv_events
        if optimised:  # the engine is preheat's own, eviction hints and all, started apart
            env.setdefault("PREHEAT_ADMISSION_GUESTS", "1")
        env.update(settings or {})  # a variant's (`--variant`): they win
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--upstream", upstream,
             "--port", str(self.port), "--db", f"sqlite:///{self.dir}/e2e.db"],
            cwd=ROOT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> "Proxy":
        async with httpx.AsyncClient() as c:
            for _ in range(400):
                try:
                    if (await c.get(self.url + "/healthz")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("preheat did not start")

    async def counters(self) -> dict:
        """Warm and admission counters from the proxy's /metrics."""
        async with httpx.AsyncClient() as c:
            text = (await c.get(self.url + "/metrics")).text
        out = {}
        for line in text.splitlines():
            for family in ("preheat_warm_total", "preheat_warm_tokens_total",
                           "preheat_admission_total", "preheat_prompt_cache_total"):
                if line.startswith(family + "{"):
                    label = line.split('"')[1]
                    out[f"{family[8:-6]}_{label}"] = float(line.rsplit(" ", 1)[1])
            if line.startswith("preheat_admission_wait_seconds_max "):
                out["admission_wait_max"] = float(line.rsplit(" ", 1)[1])
            if line.startswith("preheat_admission_suspended_total "):
                out["admission_suspended"] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _prompt_cache_note(row: dict) -> str:
    if "prompt_cache_hit" not in row:
        return ""
    return f"  prompt cache hits {int(row['prompt_cache_hit'])}"


def _admission_note(row: dict) -> str:
    counts = {k[10:]: int(v) for k, v in row.items() if k.startswith("admission_") and
              k != "admission_wait_max"}
    if not counts:
        return ""
    return f"admitted {counts}, longest wait {row.get('admission_wait_max', 0):.1f} s"


async def reset_cache(engine: Engine) -> None:
    """Empty the engine's prefix cache, as a restart would (without the minutes it takes).

    vLLM announces the reset to KV event subscribers with its next scheduler step, so a
    one-token request follows: the cache is then known to be empty, as after a restart."""
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(engine.base_url + "/reset_prefix_cache")
        r.raise_for_status()
        r = await c.post(engine.base_url + "/v1/completions", json={
            "model": engine.served_model_name, "prompt": "reset", "max_tokens": 1})
        r.raise_for_status()
    await asyncio.sleep(0.5)


async def compare(engine: Engine, oracle_engine: Engine | None, name: str,
                  instances: list[Instance], train: list[Instance], capacity: int,
                  modes: list[str], sequential: bool = False, idle: float = 0.5,
                  repeat: int = 1, restart: bool = False,
                  variants: Variants | None = None) -> dict[str, dict]:
    """Each mode's figures; with `repeat`, the modes run in turn that many times (drift in the
    machine hits them alike) and each figure is the median of the runs. `variants` run as
    modes of their own, after the others in the first turn. From turn to turn the order
    rotates by one, so that no mode always runs in the same place (the relay on the generated
    workflows measured 0.89-0.96x of direct run just after it, 0.91-1.01x run before it:
    bench/NOTEBOOK.md)."""
    runs: dict[str, list[dict]] = {}
    for turn in range(repeat):
        for mode, row in (await _compare_once(engine, oracle_engine, name, instances, train,
                                              capacity, modes, sequential, idle,
                                              restart, variants or {}, turn)).items():
            runs.setdefault(mode, []).append(row)
    return {mode: _median_row(rows) for mode, rows in runs.items()}


def _median_row(rows: list[dict]) -> dict:
    if len(rows) == 1:
        return rows[0]
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]
           if all(isinstance(r.get(k), (int, float)) for r in rows)}
    out["runs"] = {k: [round(r[k], 2) for r in rows] for k in ("e2e_p50", "e2e_p90", "makespan")}
    for key in ("instances", "queued"):  # each instance's figure, median of the runs
        if all(key in r for r in rows):
            out[key] = {name: round(statistics.median(r[key][name] for r in rows), 2)
                        for name in rows[0][key]}
    return out


async def _compare_once(engine: Engine, oracle_engine: Engine | None, name: str,
                        instances: list[Instance], train: list[Instance], capacity: int,
                        modes: list[str], sequential: bool, idle: float,
                        restart: bool = False,
                        variants: Variants | None = None, turn: int = 0) -> dict[str, dict]:
    model = engine.served_model_name
    variants = variants or {}
    rows: dict[str, dict] = {}
    order = [m for m in modes if m in MODES[:3]] + list(variants)  # in the order given,
    shift = turn % len(order) if order else 0                      # rotated by the turn
    for mode in order[shift:] + order[:shift]:
        await reset_cache(engine)
        proxy = None
        base = engine.base_url
        optimised = mode == "preheat-on" or mode in variants
        settings = variants.get(mode)
        if mode != "direct":
            proxy = await Proxy(engine.base_url, optimised, capacity,
                                engine.kv_events_endpoint, settings=settings).ready()
            base = proxy.url
        try:
            if optimised and train:
                # Learning first, on other instances of the same workflows; then the
                # engine starts cold, as it does for the other modes.
                await run_workload(base, model, train, sequential)
                if restart:  # what was learned must come back from the store
                    proxy.stop()
                    proxy = await Proxy(engine.base_url, True, capacity,
                                        engine.kv_events_endpoint, directory=proxy.dir,
                                        settings=settings).ready()
                    base = proxy.url
                await reset_cache(engine)
            # Every mode starts on an engine left idle with an empty cache, as after a
            # restart or a quiet spell: time preheat-on may use to warm what it learned
            # (its prefill: the engine's counters are read before the idle).
            counts = await engine_counters(engine)
            await asyncio.sleep(idle)
            before = _cpu_now(engine, proxy)
            async with GaugeSampler(engine) as gauges:
                rows[mode] = await run_workload(base, model, instances, sequential)
            rows[mode].update(await _counted_since(engine, counts), **gauges.means())
            rows[mode].update({k: v - before[k] for k, v in _cpu_now(engine, proxy).items()})
            if proxy:
                rows[mode].update(await proxy.counters())
        finally:
            if proxy:
                proxy.stop()
        r = rows[mode]
        print(f"  {name:<22} {mode:<12} e2e p50 {r['e2e_p50']:6.2f} s  "
              f"makespan {r['makespan']:6.2f} s  cached {r['cached_share']:.2f}  CPU s: engine "
              f"{r['cpu_engine']:.1f} proxy {r['cpu_proxy']:.1f} observer {r['cpu_observer']:.1f}"
              f" client {r['cpu_client']:.1f}"
              f"  working set {rows[mode]['working_set']} tokens  {r['engine_load']:.1f} at once"
              f" ({r['engine_running']:.1f} running in the engine)"
              f"  queued {sum(r['queued'].values()):.1f} s (engine idle {r['held_idle']:.1f} s)"
              f"  prefilled {r['stepped'] - r['generated']:.0f} tokens, preempted "
              f"{r['preempted']:.0f}  {_admission_note(rows[mode])}"
              f"{_prompt_cache_note(rows[mode])}",
              flush=True)
    if "unpressured" in modes and oracle_engine is not None:
        await reset_cache(oracle_engine)
        counts = await engine_counters(oracle_engine)
        await asyncio.sleep(idle)
        async with GaugeSampler(oracle_engine) as gauges:
            rows["unpressured"] = await run_workload(oracle_engine.base_url, model, instances,
                                                     sequential)
        rows["unpressured"].update(await _counted_since(oracle_engine, counts), **gauges.means())
        print(f"  {name:<22} {'unpressured':<12} e2e p50 {rows['unpressured']['e2e_p50']:6.2f} s"
              f"  makespan {rows['unpressured']['makespan']:6.2f} s"
              f"  {rows['unpressured']['engine_load']:.1f} at once"
              f" ({rows['unpressured']['engine_running']:.1f} running in the engine)", flush=True)
    if "oracle" not in modes:
        return rows
    target = oracle_engine or engine
    await reset_cache(target)
    # The oracle: run once to fill the cache, then measure the same prompts again.
    await run_workload(target.base_url, model, instances, sequential)
    counts = await engine_counters(target)
    async with GaugeSampler(target) as gauges:
        rows["oracle"] = await run_workload(target.base_url, model, instances, sequential)
    rows["oracle"].update(await _counted_since(target, counts), **gauges.means())
    print(f"  {name:<22} {'oracle':<12} e2e p50 {rows['oracle']['e2e_p50']:6.2f} s  "
          f"makespan {rows['oracle']['makespan']:6.2f} s", flush=True)
    return rows


ENGINE_COUNTERS = {
    "preempted": "vllm:num_preemptions_total",
    "stepped": "vllm:iteration_tokens_total_sum",
    "generated": "vllm:generation_tokens_total",
}
"""The engine's own counters (its /metrics) a run's figures take the difference of: the
requests it preempted (their blocks freed, to be computed again when resumed), the tokens
its steps computed, and the tokens it generated. Stepped less generated is the prompt
tokens it prefilled (less one a call, whose first token its prefill gave), those prefilled
again after a preemption included: a call's usage says only what its first schedule found
cached, and vLLM's prefix-cache counters count new requests only."""


async def engine_counters(engine: Engine) -> dict[str, float]:
    """ENGINE_COUNTERS' totals so far, summed over their labels (`metric_totals`)."""
    async with httpx.AsyncClient(timeout=30) as client:
        page = (await client.get(engine.base_url + "/metrics")).text
    return metric_totals(page, ENGINE_COUNTERS)  # NaN for one this engine does not count


ENGINE_GAUGES = {
    "engine_running": "vllm:num_requests_running",
    "engine_waiting": "vllm:num_requests_waiting",
}
"""The engine's own gauges a run's figures average (`GaugeSampler`): the calls it runs in its
steps, and those it keeps waiting (under cache pressure, for KV blocks to free)."""
SAMPLE_EVERY = 0.5
"""Seconds between reads of ENGINE_GAUGES during a run."""


class GaugeSampler:
    """Reads ENGINE_GAUGES every SAMPLE_EVERY seconds while a run goes (`async with`);
    `means()` their averages over the reads, as the run's `engine_load` averages the calls
    past admission over its makespan."""

    def __init__(self, engine: Engine) -> None:
        self.url = engine.base_url + "/metrics"
        self.samples: list[dict[str, float]] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "GaugeSampler":
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                try:
                    resp = await client.get(self.url)
                    if resp.status_code == 200:  # (else a read missed: the next one counts)
                        self.samples.append(metric_totals(resp.text, ENGINE_GAUGES))
                except httpx.HTTPError:
                    pass  # a read missed: the next one counts
                await asyncio.sleep(SAMPLE_EVERY)

    def means(self) -> dict[str, float]:
        """Each gauge's mean over the reads (NaN where none read it)."""
        return {key: (statistics.fmean(s[key] for s in self.samples) if self.samples
                      else math.nan) for key in ENGINE_GAUGES}


async def _counted_since(engine: Engine, before: dict[str, float]) -> dict[str, float]:
    """What the engine counted (`engine_counters`) since it counted `before`."""
    after = await engine_counters(engine)
    return {k: after[k] - before[k] for k in ENGINE_COUNTERS}


def _cpu_now(engine: Engine, proxy: Proxy | None) -> dict[str, float]:
    """CPU seconds so far of the engine (all its processes), the proxy's own process, the
    proxy's observer (its children: capture and learning), and this client."""
    proxy_own, observer = cpu_seconds(proxy.proc.pid if proxy else None)
    return {"cpu_engine": sum(cpu_seconds(engine.pid)), "cpu_proxy": proxy_own,
            "cpu_observer": observer, "cpu_client": time.process_time()}
