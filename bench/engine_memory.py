"""How the engine's memory grows under sustained agent-like load: as preheat runs it (glibc's
allocator), with glibc's arenas capped, with oneDNN's primitive cache at its own default, off
and at preheat's 64, and with tcmalloc preloaded: the basis for how preheat's engine process
allocates (engine/process.py).

    .venv/bin/python bench/engine_memory.py [--minutes 10] [--only glibc ...]
        [--out bench/results/engine-memory.md]

Each variant starts its own engine (the 512 x 8 offline model, preheat's flags, a 64 MiB KV
cache, so calls evict and recompute one another as under cache pressure) with only its
environment changed, and runs the same load for `--minutes`: eight agents, each resending a
shared 1,024-token head and its own growing history (+200 tokens a call, a new session past
3,000), 32-96 tokens out. Prompts are random token ids from a seeded generator, so every
variant gets the same calls in the same order from each agent. Memory is the proportional set
size (PSS) of the engine's process and its children, sampled every 5 s, and the share of
vLLM's engine-core process in its growth. The tcmalloc variant runs only where Debian's
libtcmalloc-minimal4 is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import machine  # noqa: E402
from bench.engine_env import GLIBC, VOCAB, tcmalloc  # noqa: E402
from engine.model import ensure_default_model  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402

AGENTS = 8
HEAD, STEP, LONGEST = 1024, 200, 3000
SAMPLE_S = 5.0
WARM_S = 60.0
"""Memory after this much load is the baseline growth is measured from."""


def variants() -> dict[str, dict[str, str]]:
    out = {"glibc malloc": GLIBC, "glibc, MALLOC_ARENA_MAX=2": {**GLIBC, "MALLOC_ARENA_MAX": "2"},
           # oneDNN keeps a compiled primitive per shape it met, up to 1,024 of its own accord
           **{f"glibc, ONEDNN_PRIMITIVE_CACHE_CAPACITY={n}": {
               **GLIBC, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(n)} for n in (1024, 0, 64)}}
    if lib := tcmalloc():
        out["tcmalloc preloaded"] = {"LD_PRELOAD": lib}
    return out


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def pss_by_process(pid: int) -> dict[int, tuple[str, float]]:
    """Proportional set size (MiB) and command line of each process in `pid`'s tree."""
    out = {}
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, StopIteration):
            continue
        out[p] = (cmd, kib / 1024)
    return out


def total_mib(processes: dict[int, tuple[str, float]]) -> float:
    """The processes' proportional set size together, MiB (shared pages counted once)."""
    return sum(mib for _, mib in processes.values())


def pss_mib(pid: int) -> float:
    """Proportional set size of `pid`'s process tree, MiB."""
    return total_mib(pss_by_process(pid))


def core_mib(processes: dict[int, tuple[str, float]]) -> float:
    """The share of vLLM's engine-core process (it names itself VLLM::EngineCore)."""
    return sum(mib for cmd, mib in processes.values() if cmd.startswith("VLLM::EngineCore"))


async def agent(client: httpx.AsyncClient, engine: Engine, seed: int, until: float,
                done: list[int]) -> None:
    rng = random.Random(seed)
    head = [random.Random(0).randint(*VOCAB) for _ in range(HEAD)]
    history: list[int] = []
    while time.monotonic() < until:
        if len(history) > LONGEST - HEAD:
            history = []
        history += [rng.randint(*VOCAB) for _ in range(STEP)]
        out = rng.randint(32, 96)
        body = {"model": engine.served_model_name, "prompt": head + history, "max_tokens": out,
                "ignore_eos": True, "temperature": 0}
        r = await client.post(engine.base_url + "/v1/completions", json=body)
        r.raise_for_status()
        done[0] += 1
        done[1] += out


async def measure(model: str, env: dict[str, str], minutes: float) -> dict:
    engine = Engine(model, kv_cache_bytes=kv_bytes(64 << 20), max_model_len=4096,
                    env={"VLLM_SERVER_DEV_MODE": "1", **env})
    await engine.start()
    samples: list[tuple[float, float]] = []
    cores: list[float] = []
    done = [0, 0]
    try:
        start = time.monotonic()
        until = start + minutes * 60
        async with httpx.AsyncClient(timeout=600) as client:
            load = asyncio.gather(*(agent(client, engine, seed, until, done)
                                    for seed in range(1, AGENTS + 1)))
            def sample(t: float) -> None:
                processes = pss_by_process(engine.pid)
                samples.append((t, total_mib(processes)))
                cores.append(core_mib(processes))

            sample(0.0)
            while not load.done():
                await asyncio.wait([load], timeout=SAMPLE_S)
                sample(time.monotonic() - start)
            await load
        elapsed = time.monotonic() - start
    finally:
        await engine.stop()
    first = next(i for i, (t, _) in enumerate(samples) if t >= WARM_S)
    warm = samples[first][1]
    half = [(t, m) for t, m in samples if t >= elapsed / 2]
    slope = statistics.linear_regression([t for t, _ in half], [m for _, m in half]).slope
    return {"idle MiB": samples[0][1], "after 1 min MiB": warm, "end MiB": samples[-1][1],
            "peak MiB": max(m for _, m in samples), "growth MiB": samples[-1][1] - warm,
            "of it, engine core": cores[-1] - cores[first],
            "MiB/min, 2nd half": slope * 60, "calls": done[0], "tokens out/s": done[1] / elapsed}


COLUMNS = ("idle MiB", "after 1 min MiB", "end MiB", "peak MiB", "growth MiB",
           "of it, engine core", "MiB/min, 2nd half", "calls", "tokens out/s")


def report(rows: dict[str, dict], minutes: float, only: list[str] | None = None) -> str:
    picked = " --only " + " ".join(f'"{w}"' if " " in w else w for w in only) if only else ""
    lines = [
        "# The engine's memory under sustained load, by allocator and setting",
        "",
        f"`.venv/bin/python bench/engine_memory.py --minutes {minutes:g}{picked}` on {machine()}, "
        f"{time.strftime('%Y-%m-%d')}; model tiny-llama-512x8 (random weights), vLLM CPU "
        f"build, KV cache 64 MiB, preheat's engine flags. {AGENTS} agents resend a "
        f"{HEAD:,}-token head and a history growing {STEP} tokens a call (new session past "
        f"{LONGEST:,}), 32-96 tokens out, for {minutes:g} minutes a variant, one after "
        "another. PSS of the engine's process tree; growth from the first minute's end.",
        "",
        "| variant | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]:,.0f}" if c in ("calls",) else f"{row[c]:,.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> dict[str, dict]:
    model = str(await asyncio.to_thread(ensure_default_model, 512, 8))
    rows = {}
    for name, env in variants().items():
        if args.only and not any(word in name for word in args.only):
            continue
        rows[name] = await measure(model, env, args.minutes)
        print(name, {k: round(v, 1) for k, v in rows[name].items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", help="run the variants whose names contain these")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/engine-memory.md")
    args = parser.parse_args()
    text = report(asyncio.run(main_async(args)), args.minutes, args.only)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
