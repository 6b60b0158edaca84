"""What engine priorities can give at best: critical-path and smallest-first `priority`, taken
from each workload's own call graph (the ground truth no server has), direct to vLLM.

Issue 6 asks admission to give critical-path calls a better engine priority. Before preheat
learns critical paths, this measures the most such priorities could give: every call is sent
straight to the engine (`--scheduling-policy priority`, as preheat runs it) with a priority
computed from the workload's true dependency graph:

    default              no priority (the engine's default, 0, for every call)
    critical path        minus the call's critical path: the seconds from its start to the
                         end of its workflow run along the longest chain of calls that wait
                         on it (its output at STEP s a token, plus each later call's tool
                         gap and output); the calls the run waits on longest go first
    smallest first       the run's rank by size (output tokens, plus PREFILL_WEIGHT per
                         prompt token): the smallest workflow's calls first
    smallest first + critical path
                         by run size, then critical path within the run

The variants take turns on one engine, its prefix cache emptied and left idle before each.
Writes bench/results/priority.md and .json.

    .venv/bin/python bench/priority.py [--repeat N] [--only NAME...] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import invocation, machine  # noqa: E402
from bench.e2e import Priority, _mixed, _shapes_mix, _warm_up, reset_cache, run_workload  # noqa: E402
from bench.e2e_modes import engine_counters  # noqa: E402
from bench.workloads import CHARS_PER_TOKEN, Instance  # noqa: E402
from engine.model import ensure_default_model  # noqa: E402
from engine.runs import PREFILL_WEIGHT  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402

STEP = 0.03
"""Seconds a decoded token takes on the loaded engine (2 CPU cores, 512 x 8 model: ~11.5 ms
alone, notes/vllm-on-cpu.md; ~30 ms with eight calls at once)."""
VARIANTS = ("default", "critical path", "smallest first", "smallest first + critical path")


def critical_paths(inst: Instance) -> dict[str, float]:
    """Each call's critical path in seconds: its own output's decoding, then the longest
    chain of tool gaps and outputs of the calls that wait on it."""
    after: dict[str, list] = {}
    for call in inst.calls:
        for dep in call.after:
            after.setdefault(dep, []).append(call)
    memo: dict[str, float] = {}
    for call in reversed(inst.calls):  # dependencies come first in an instance's calls
        memo[call.key] = call.max_tokens * STEP + max(
            (c.gap + memo[c.key] for c in after.get(call.key, [])), default=0.0)
    return memo


def service(inst: Instance) -> float:
    """The run's size to rank by: output tokens plus PREFILL_WEIGHT per prompt token (from
    characters, earlier answers at their forced lengths). Every prompt token counts, cached
    or not: `engine.runs` counts only the uncached, which the engine knows after the fact."""
    outputs = {c.key: "x" * int(c.max_tokens * CHARS_PER_TOKEN) for c in inst.calls}
    prompt = sum(len(m["content"]) for c in inst.calls for m in c.prompt(outputs))
    return sum(c.max_tokens for c in inst.calls) + PREFILL_WEIGHT * prompt / CHARS_PER_TOKEN


def priorities(instances: list[Instance]) -> dict[str, Priority | None]:
    paths = {inst.name: critical_paths(inst) for inst in instances}
    by_size = sorted(instances, key=service)
    rank = {inst.name: k for k, inst in enumerate(by_size)}
    span = 1 + max(round(p) for cp in paths.values() for p in cp.values())
    return {
        "default": None,
        "critical path": lambda inst, call: -round(paths[inst.name][call.key]),
        "smallest first": lambda inst, call: rank[inst.name] * span,
        "smallest first + critical path":
            lambda inst, call: rank[inst.name] * span - round(paths[inst.name][call.key]),
    }


async def measure(engine: Engine, instances: list[Instance], repeat: int,
                  idle: float) -> dict[str, dict]:
    chosen = priorities(instances)
    runs: dict[str, list[dict]] = {}
    for k in range(repeat):
        for variant in VARIANTS:
            await reset_cache(engine)
            await asyncio.sleep(idle)
            before = await engine_counters(engine)
            row = await run_workload(engine.base_url, engine.served_model_name, instances,
                                     priority=chosen[variant])
            row["preemptions"] = (await engine_counters(engine))["preempted"] - before["preempted"]
            runs.setdefault(variant, []).append(row)
            print(f"  {variant:<32} run {k + 1}: e2e p50 {row['e2e_p50']:6.2f} s  p90 "
                  f"{row['e2e_p90']:6.2f} s  makespan {row['makespan']:6.2f} s  TTFT p50 "
                  f"{row['ttft_p50']:.3f} s  cached {row['cached_share']:.2f}  preempted "
                  f"{row['preemptions']:.0f}", flush=True)
    keys = ("e2e_p50", "e2e_p90", "makespan", "ttft_p50", "ttft_p90", "cached_share",
            "preemptions")
    return {v: {**{key: statistics.median(r[key] for r in rows) for key in keys},
                "runs": {key: [round(r[key], 2) for r in rows] for key in keys[:3]}}
            for v, rows in runs.items()}


def report(results: dict[str, dict[str, dict]], args) -> str:
    lines = [
        "# Engine priorities at best: critical path and smallest first, from the true call graph",
        "",
        f"`{invocation('bench/priority.py')}` on {machine()}, {time.strftime('%Y-%m-%d')}; model tiny-llama-512x8 (random weights), vLLM CPU "
        "build, `--scheduling-policy priority`; every call direct to the engine with the "
        f"priority its variant gives (see the script's docstring; STEP {STEP} s a token). "
        f"Figures are medians of {args.repeat} runs, the variants taking turns; ratio: "
        "default / variant (> 1: the priorities made it faster); preempted: requests the "
        "engine preempted during the run (`vllm:num_preemptions_total`).",
        "",
        "| workload | variant | e2e p50 s | e2e p90 s | makespan s | TTFT p50 s | TTFT p90 s "
        "| cached share | preempted | p50 ratio | makespan ratio | runs (p50) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        base = rows["default"]
        for variant, r in rows.items():
            lines.append(
                f"| {name} | {variant} | {r['e2e_p50']:.2f} | {r['e2e_p90']:.2f} | "
                f"{r['makespan']:.2f} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | "
                f"{r['cached_share']:.2f} | {r['preemptions']:.0f} | "
                f"{base['e2e_p50'] / r['e2e_p50']:.2f}x | "
                f"{base['makespan'] / r['makespan']:.2f}x | "
                f"{', '.join(f'{v:.2f}' for v in r['runs']['e2e_p50'])} |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> None:
    model = str(await asyncio.to_thread(ensure_default_model, 512, 8))
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    workloads = [  # (name, instances, KV cache MiB, max model length), as bench/e2e.py has them
        ("generated shapes x7", _shapes_mix(False, seed=3), 512, None),
        ("mixed x8, 64 MiB cache (pressure ~3.5x)", _mixed(False, range(176, 180), seed=8),
         64, 7168),
    ]
    results: dict[str, dict] = {}
    for name, instances, mib, max_len in workloads:
        if args.only and not any(o in name for o in args.only):
            continue
        kw = {"max_model_len": max_len} if max_len else {}
        engine = Engine(model, kv_cache_bytes=kv_bytes(mib << 20), env=env, **kw)
        print(f"{name}: engine {model}, KV cache {mib} MiB", flush=True)
        await engine.start()
        try:
            await _warm_up(engine)
            results[name] = await measure(engine, instances, args.repeat, args.idle)
        finally:
            await engine.stop()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report(results, args))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(args.out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--only", nargs="*", help="run the workloads whose names contain these")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/priority.md")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
