"""How decode throughput depends on the context the engine holds at once, on the real engine
with the 512 x 8 offline model: the basis for a bound on the engine's load
(`PREHEAT_ADMISSION_INFLIGHT_TOKENS`, since reverted: see the README) and for admission's
spare-throughput rule (`SPARE_BELOW`).

    .venv/bin/python bench/decode_load.py [--out bench/results/decode-load.md]

For each prompt length and each count of calls at once, that many distinct random prompts
(token ids) are prefilled first (`max_tokens` 1), then sent again together to decode 128
tokens each (`ignore_eos`), their prompts now cached: the time is decode's, with attention
over the whole context. Throughput is output tokens a second over all calls.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import invocation, machine  # noqa: E402
from engine.model import ensure_default_model  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402

LENGTHS = (1024, 2048, 4096)
COUNTS = (1, 2, 4, 8, 16, 32)
OUTPUT = 128
VOCAB = (100, 16000)


async def together(client: httpx.AsyncClient, engine: Engine, prompts: list[list[int]],
                   max_tokens: int) -> float:
    async def one(prompt: list[int]) -> None:
        body = {"model": engine.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0}
        r = await client.post(engine.base_url + "/v1/completions", json=body)
        r.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - start


async def measure(capacity_mib: int) -> list[tuple[int, int, float]]:
    model = str(await asyncio.to_thread(ensure_default_model, 512, 8))
    engine = Engine(model, kv_cache_bytes=kv_bytes(capacity_mib << 20),
                    env={"VLLM_SERVER_DEV_MODE": "1"})
    await engine.start()
    rng = random.Random(0)
    rows = []
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            await together(client, engine, [[rng.randint(*VOCAB) for _ in range(64)]] * 2, 8)
            for length in LENGTHS:
                for count in COUNTS:
                    prompts = [[rng.randint(*VOCAB) for _ in range(length)]
                               for _ in range(count)]
                    await together(client, engine, prompts, 1)
                    seconds = await together(client, engine, prompts, OUTPUT)
                    rows.append((length, count, seconds))
                    print(f"{length:5d} tokens x {count:2d}: {seconds:6.2f} s, "
                          f"{count * OUTPUT / seconds:6.1f} tokens/s", flush=True)
    finally:
        await engine.stop()
    return rows


def report(rows: list[tuple[int, int, float]], capacity_mib: int) -> str:
    best = {n: max(c * OUTPUT / s for n2, c, s in rows if n2 == n) for n, _, _ in rows}
    lines = [
        "# Decode throughput against the context held at once",
        "",
        f"`{invocation('bench/decode_load.py')}` on {machine()}; model tiny-llama-512x8 "
        f"(random weights), vLLM CPU build, KV cache {capacity_mib} MiB. Prompts cached "
        f"first; {OUTPUT} tokens decoded by each call.",
        "",
        "| prompt tokens | calls at once | context held, tokens | seconds | output tokens/s "
        "| share of the best for that length |",
        "|---|---|---|---|---|---|",
    ]
    for n, c, s in rows:
        rate = c * OUTPUT / s
        lines.append(f"| {n} | {c} | {c * (n + OUTPUT)} | {s:.2f} | {rate:.0f} "
                     f"| {rate / best[n]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=1536, help="KV cache MiB (it holds every prompt at once)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/decode-load.md")
    args = parser.parse_args()
    rows = asyncio.run(measure(args.cache))
    text = report(rows, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
