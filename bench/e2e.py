"""End to end: agent workloads on the real vLLM, direct vs through preheat, side by side.

Modes, in one run on the same engine (its prefix cache reset before each):
    direct       the agents talk to vLLM (prefix caching on)
    preheat-off  through preheat with every optimisation off (capture only)
    preheat-on   through preheat with its optimisations on
    oracle       a lower bound: the same workload on an engine without cache pressure, with
                 every prompt already cached (the workload was run once just before)
    on:NAME      preheat-on with settings of its own (`--variant NAME PREHEAT_X=VALUE ...`),
                 so that one run compares optimisations switched on and off, in turn

Before preheat-on is measured, the same proxy first serves other instances of the same
workflows (learning: session sizes, tool gaps, templates), then the engine's cache is reset.
With --cold it learns nothing first: preheat-on as on its first day, learning as it serves.
With --restart the proxy that learned is stopped and a new one started on its store first.

Workloads (bench/workloads.py): tool-using agent loops (notes/where-the-time-goes.md B) on a
KV cache 2x and 4x smaller than their working set, tau-bench airline agents replayed
(prompts from the trace, outputs forced to the recorded length, lognormal tool gaps) with
and without cache pressure, map-reduce over a shared document, generated multi-agent
workflows (bench/shapes.py: a trading desk, debates, reflection, parallel tool chains),
tau-bench agents and generated workflows together under cache pressure, one agent at a time.
Writes the table (.md), the figures (.json) and a plot (.png).

This file holds the workloads and the command line; bench/e2e_modes.py runs a workload in
each mode, bench/e2e_report.py writes the report.

    .venv/bin/python bench/e2e.py [--quick] [--only NAME...] [--modes MODE...] [--repeat N]
                                  [--variant NAME PREHEAT_X=VALUE...]...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# CallResult, Priority, engine_load, _median_row, reset_cache and _headroom are imported
# from here too (bench/alone.py, bench/priority.py, tests/bench/test_e2e_report.py).
from bench.e2e_modes import (MODES, CallResult, Priority, compare, engine_load,  # noqa: E402,F401
                             held_idle, _median_row, reset_cache, run_workload)
from bench import e2e_modes  # noqa: E402
from bench.e2e_report import _headroom, plot, report  # noqa: E402,F401
from bench.workloads import (Instance, agent_loops, generated, interleave,  # noqa: E402
                             map_reduce, tau_bench)
from engine.model import ensure_default_model  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402
from proxy.config import Settings, options  # noqa: E402


async def main_async(args) -> None:
    model = str(await asyncio.to_thread(ensure_default_model, args.hidden, args.layers))
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    q = args.quick
    tau_calls = 4 if q else 6
    pressure_runs = range(150, 150 + (4 if q else args.pressure_runs))
    tau_runs = range(150, 150 + (4 if q else 8))
    # (name, instances, instances to learn from first, KV cache MiB (None: the big one),
    #  one instance after another)
    loops = 4 if q else 12
    small, medium = args.small_cache, 2 * args.small_cache
    # Seeds 3 and 8: the second reflection re-uses the first one's document, and no prompt
    # outgrows the pressure runs' 7,168-token context.
    shapes, shapes_train = _shapes_mix(q, seed=3), _shapes_mix(q, seed=30, train=True)
    mixed = _mixed(q, range(176, 178 if q else 180), seed=8)
    # Learned from the same mix (tau agents of as many calls, the same generated shapes).
    mixed_train = _mixed(q, range(182, 184 if q else 186), seed=80)
    workloads = [
        (f"agent loops x{loops}, {medium} MiB cache (pressure 2x)",
         agent_loops(loops, 4 if q else 8, seed=4), agent_loops(6, 4 if q else 8, seed=40),
         medium, False),
        (f"agent loops x{loops}, {small} MiB cache (pressure 4x)",
         agent_loops(loops, 4 if q else 8, seed=4), agent_loops(6, 4 if q else 8, seed=40),
         small, False),
        (f"tau-bench x{len(pressure_runs)}, {small} MiB cache (pressure ~2x)",
         tau_bench(pressure_runs, tau_calls, 1.0, seed=1),
         tau_bench(range(170, 176), tau_calls, 1.0, seed=10), small, False),
        (f"mixed x{len(mixed)}, {small} MiB cache (pressure ~3.5x)", mixed, mixed_train, small,
         False),
        (f"tau-bench x{len(tau_runs)}", tau_bench(tau_runs, tau_calls, 1.0, seed=1),
         tau_bench(range(170, 176), tau_calls, 1.0, seed=10), None, False),
        ("map-reduce 6 experts", map_reduce(2 if q else 4, 6, 3000, seed=2),
         map_reduce(2, 6, 3000, seed=20, stagger=0.0), None, False),
        (f"generated shapes x{len(shapes)}", shapes, shapes_train, None, False),
        # The engine idle between calls: agents one after another, real tool gaps.
        ("one agent at a time", tau_bench(range(190, 192 if q else 193), tau_calls, 1.5, seed=3),
         tau_bench(range(196, 198), tau_calls, 0.0, seed=30), None, True),
    ]
    workloads = [w for w in workloads if not args.only or any(o in w[0] for o in args.only)]
    if args.cold:  # nothing learned first
        workloads = [(name, instances, [], *rest) for name, instances, _, *rest in workloads]
    if args.time_scale != 1.0:
        workloads = [(name, slowed(instances, args.time_scale), slowed(train, args.time_scale),
                      *rest) for name, instances, train, *rest in workloads]

    engines = (f"model {Path(model).name} (random weights), vLLM CPU build, KV cache "
               f"{args.big_cache} MiB (pressure runs: {medium} and {small} MiB)")
    results: dict[str, dict] = {}

    def save() -> str:  # after every workload: a late failure loses nothing measured
        text = report(results, args, engines)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        plot(results, args.out.with_suffix(".png"))
        return text

    big = Engine(model, kv_cache_bytes=kv_bytes(args.big_cache << 20), env=env)
    print(f"engine: {model}, KV cache {args.big_cache} MiB", flush=True)
    await big.start()
    await _warm_up(big)
    try:
        # Cache pressure first: the workloads where admission matters most. Each cache size
        # is its own engine; the oracle runs on the big one.
        for size in sorted({w[3] for w in workloads if w[3]}, reverse=True):
            engine = Engine(model, kv_cache_bytes=kv_bytes(size << 20), env=env, max_model_len=7168)
            await engine.start()
            await _warm_up(engine)
            try:
                for name, instances, train, _, sequential in (w for w in workloads
                                                              if w[3] == size):
                    results[name] = await compare(engine, big, name, instances, train, 0,
                                                  args.modes, sequential, args.idle, args.repeat,
                                                  args.restart, args.variants)
                    save()
            finally:
                await engine.stop()
        for name, instances, train, _, sequential in (w for w in workloads if not w[3]):
            results[name] = await compare(big, None, name, instances, train, 0, args.modes,
                                          sequential, args.idle, args.repeat, args.restart,
                                          args.variants)
            save()
    finally:
        await big.stop()
    print(save())


def _shapes_mix(quick: bool, seed: int, train: bool = False) -> list[Instance]:
    """Multi-agent workflows (bench/shapes.py) sharing the engine, one starting every 3 s
    (to learn from first: one instance of each)."""
    counts = {"debate": 1, "parallel_chains": 1} if quick else {
        "trading_desk": 1, "debate": 2, "reflection": 2, "parallel_chains": 2}
    if train:
        counts = dict.fromkeys(counts, 1)
    return interleave([generated(shape, n, seed) for shape, n in counts.items()], stagger=3.0)


def _mixed(quick: bool, runs: range, seed: int) -> list[Instance]:
    """Tau-bench agents and generated workflows at once, as one engine serving two apps sees."""
    tau = tau_bench(runs, 4 if quick else 6, 1.0, seed=seed)
    counts = {"debate": 1, "parallel_chains": 1} if quick else {
        "debate": 1, "reflection": 2, "parallel_chains": 1}
    return interleave([tau] + [generated(shape, n, seed) for shape, n in counts.items()],
                      stagger=1.0)


async def _warm_up(engine: Engine) -> None:
    """First requests on a fresh engine are slower; keep that out of every mode's figures."""
    warm = tau_bench(range(100, 102), 2, 0.0, seed=9)
    await run_workload(engine.base_url, engine.served_model_name, warm)


def slowed(instances: list[Instance], scale: float) -> list[Instance]:
    """The instances with every tool gap and start `scale` times as long: on an engine
    `scale` times slower, the same share of each agent's time in the engine as on a faster
    one (what admission's trade between waits and recompute turns on)."""
    return [replace(inst, start=inst.start * scale,
                    calls=[replace(c, gap=c.gap * scale) for c in inst.calls])
            for inst in instances]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances (a smoke run)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--big-cache", type=int, default=512, help="MiB")
    parser.add_argument("--small-cache", type=int, default=64,
                        help="MiB of the pressure runs, which also use twice this (it must "
                        "hold one 7k-token prompt: 64 MiB for the 512 x 8 model)")
    parser.add_argument("--pressure-runs", type=int, default=12,
                        help="tau-bench agents at once in the cache-pressure workload")
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds the engine sits idle, its cache empty, before each mode")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="tool gaps and start times this many times as long (on an "
                        "engine N times slower than another, N gives the other's ratio of "
                        "engine time to tool time)")
    parser.add_argument("--only", nargs="*", help="run the workloads whose names contain these")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES,
                        help="direct, preheat-off and preheat-on run in the order given (the "
                        "default's: direct first), variants after them, then unpressured and "
                        "oracle; with --repeat the order (but unpressured and oracle, last) "
                        "rotates by one from turn to turn")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each workload, the modes taking turns; figures are medians")
    parser.add_argument("--cold", action="store_true",
                        help="preheat-on learns nothing before the measured run")
    parser.add_argument("--restart", action="store_true",
                        help="preheat-on is restarted on its store between learning and the run")
    parser.add_argument("--seeded", action="store_true",
                        help="answers sampled at temperature 1, each call seeded by its prompt "
                        "(distinct, as a real model's), not greedy")
    parser.add_argument("--variant", nargs="+", action="append", default=[],
                        metavar="NAME [PREHEAT_X=VALUE]",
                        help="also run preheat-on with these settings, as the mode on:NAME, in "
                        "the same turns as the other modes (repeatable), e.g. --variant "
                        "no-guests PREHEAT_ADMISSION_GUESTS=0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/e2e.md")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plot from the JSON of an earlier run")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.out.with_suffix(".json").read_text())
        plot(results, args.out.with_suffix(".png"))
        return
    e2e_modes.SEEDED = args.seeded
    try:
        args.variants = variants(args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(main_async(args))


def variants(specs: list[list[str]]) -> e2e_modes.Variants:
    """`--variant NAME PREHEAT_X=VALUE ...` arguments as modes and their settings; a name
    used twice, a setting preheat does not have or a value it would refuse is a ValueError
    (a misspelt variable would otherwise measure the defaults under another name)."""
    known = {name for name, _, _ in options()}
    out: e2e_modes.Variants = {}
    for name, *pairs in specs:
        mode = e2e_modes.VARIANT + name
        if mode in out or not name or "=" in name or "|" in name:
            raise ValueError(f"--variant {name!r}: give each variant a name of its own first, "
                             "then its settings")
        settings = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or key not in known:
                raise ValueError(f"--variant {name}: {pair!r} is not a preheat setting "
                                 "(PREHEAT_X=VALUE, as listed in the README's Configuration)")
            settings[key] = value
        Settings.from_env(settings)  # a ValueError that names the variable and its type
        out[mode] = settings
    return out


if __name__ == "__main__":
    main()
