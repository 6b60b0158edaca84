"""What order could win: each generated workflow's end-to-end time with the others running
beside it (direct to vLLM, as in bench/e2e.py) against its time alone on the idle engine.

    .venv/bin/python bench/alone.py [--out bench/results/alone.md]

The workload is e2e.py's "generated shapes" (a trading desk, two debates, two reflections,
two parallel-chain runs, one starting every 3 s). Alone, each instance starts on an engine
whose prefix cache was emptied. Where the short workflows take far longer together than
alone, the engine shares its steps among all of them (every running call decodes at once);
serving the short ones first would finish them sooner, at the cost of the long one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import invocation, machine  # noqa: E402
from bench.e2e import _shapes_mix, _warm_up, reset_cache, run_workload  # noqa: E402
from engine.model import ensure_default_model  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402


async def measure(idle: float) -> tuple[dict, dict[str, float], list]:
    model = str(await asyncio.to_thread(ensure_default_model, 512, 8))
    engine = Engine(model, kv_cache_bytes=kv_bytes(512 << 20), env={"VLLM_SERVER_DEV_MODE": "1"})
    await engine.start()
    instances = _shapes_mix(False, seed=3)
    try:
        await _warm_up(engine)
        await reset_cache(engine)
        await asyncio.sleep(idle)
        together = await run_workload(engine.base_url, engine.served_model_name, instances)
        alone = {}
        for inst in instances:
            await reset_cache(engine)
            await asyncio.sleep(idle)
            one = await run_workload(engine.base_url, engine.served_model_name,
                                     [dataclasses.replace(inst, start=0.0)])
            alone[inst.name] = one["e2e_p50"]
            print(f"{inst.name}: together {together['instances'][inst.name]:.2f} s, "
                  f"alone {alone[inst.name]:.2f} s", flush=True)
    finally:
        await engine.stop()
    return together, alone, instances


def report(together: dict, alone: dict[str, float], instances: list) -> str:
    lines = [
        "# Generated workflows together and alone",
        "",
        f"`{invocation('bench/alone.py')}` on {machine()}; model tiny-llama-512x8 (random "
        "weights), vLLM CPU build, KV cache 512 MiB, direct to vLLM.",
        "",
        "| instance | starts at s | calls | together s | alone s | together / alone |",
        "|---|---|---|---|---|---|",
    ]
    for inst in instances:
        t, a = together["instances"][inst.name], alone[inst.name]
        lines.append(f"| {inst.name} | {inst.start:.0f} | {len(inst.calls)} | {t:.2f} | {a:.2f} "
                     f"| {t / a:.2f}x |")
    ts = list(together["instances"].values())
    lines += ["", f"Median end to end together {statistics.median(ts):.2f} s, alone "
              f"{statistics.median(alone.values()):.2f} s; makespan together "
              f"{together['makespan']:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=3.0,
                        help="seconds the engine sits idle, its cache empty, before each run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/alone.md")
    args = parser.parse_args()
    text = report(*asyncio.run(measure(args.idle)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
