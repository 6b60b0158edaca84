"""How the engine's process setup changes its speed, on the real engine with the 512 x 8
offline model: the basis for running vLLM's worker inside its engine process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, engine/process.py); bench/engine_memory.py measures the
allocator's memory.

    .venv/bin/python bench/engine_env.py [--repeat 2] [--out bench/results/engine-env.md]
    .venv/bin/python bench/engine_env.py --dtype [--out bench/results/engine-dtype.md]

Each variant starts its own engine with preheat's flags and only its environment changed,
the variants taking turns `--repeat` times. It then measures start-up (to /health), the
prefill of six distinct 2,048-token prompts one after another, the decoding of 128 tokens
by eight calls at once and by one (prompts cached first), and sixteen 512-token prompts
sent together, 64 tokens each. Prompts are random token ids. Figures are medians over the
repeats. The first two variants run on glibc's malloc, as preheat's engine does; the
tcmalloc variant only where it is installed (Debian's libtcmalloc-minimal4: vLLM's CPU build
asks for it in LD_PRELOAD and bundles none in its wheel). With `--dtype` the variants are the
model's dtype instead (bfloat16, float32; `engine.process.cpu_dtype` chooses), each with a
KV cache holding the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import machine  # noqa: E402
from bench.decode_load import together  # noqa: E402
from engine.model import ensure_default_model  # noqa: E402
from engine.supervisor import Engine, kv_bytes  # noqa: E402

GLIBC = {"LD_PRELOAD": ""}
"""An engine on glibc's malloc, whatever the shell preloads."""
TCMALLOC = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",  # Debian: libtcmalloc-minimal4
            "/usr/lib64/libtcmalloc_minimal.so.4")  # Fedora: gperftools-libs
VOCAB = (100, 16000)
METRICS = (("start s", False), ("prefill 6 x 2,048 s", False), ("decode 8 at once tok/s", True),
           ("decode 1 tok/s", True), ("16 x (512 + 64) s", False))
"""Each figure, and whether higher is better."""


def tcmalloc() -> str | None:
    """The path of an installed tcmalloc, or None."""
    return next((p for pattern in TCMALLOC for p in sorted(glob.glob(pattern))), None)


DTYPES = ("bfloat16", "float32")


def variants(dtype: bool = False) -> dict[str, dict[str, str]]:
    """Each variant's environment; with `dtype`, the dtypes (`measure` passes `--dtype`)."""
    if dtype:
        return {name: GLIBC for name in DTYPES}
    out = {"worker in the engine process": GLIBC,
           "vLLM's default: worker in its own process": {
               **GLIBC, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    if lib := tcmalloc():
        out["worker in the engine process, tcmalloc preloaded"] = {"LD_PRELOAD": lib}
    return out


async def measure(model: str, env: dict[str, str], seed: int,
                  dtype: str | None = None) -> dict[str, float]:
    """One variant's figures; `dtype` runs the model in it (else preheat's choice)."""
    args = ["--dtype", dtype] if dtype else []
    engine = Engine(model, kv_cache_bytes=kv_bytes(256 << 20, dtype=dtype),
                    env={"VLLM_SERVER_DEV_MODE": "1", **env}, engine_args=args)
    start = time.perf_counter()
    await engine.start()
    out = {"start s": time.perf_counter() - start}
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randint(*VOCAB) for _ in range(n)]

    try:
        async with httpx.AsyncClient(timeout=600) as client:
            await together(client, engine, [prompt(64)], 8)
            out["prefill 6 x 2,048 s"] = sum(
                [await together(client, engine, [prompt(2048)], 1) for _ in range(6)])
            cached = [prompt(1024) for _ in range(8)]
            await together(client, engine, cached, 1)
            out["decode 8 at once tok/s"] = 8 * 128 / await together(client, engine, cached, 128)
            out["decode 1 tok/s"] = 128 / await together(client, engine, cached[:1], 128)
            out["16 x (512 + 64) s"] = await together(
                client, engine, [prompt(512) for _ in range(16)], 64)
    finally:
        await engine.stop()
    return out


def report(runs: dict[str, list[dict[str, float]]], repeat: int, dtype: bool = False) -> str:
    medians = {name: {m: statistics.median(r[m] for r in rs) for m, _ in METRICS}
               for name, rs in runs.items()}
    base = next(iter(medians.values()))
    lines = [
        "# The model's dtype and the engine's speed" if dtype else
        "# The engine's process setup and its speed",
        "",
        f"`.venv/bin/python bench/engine_env.py --repeat {repeat}{' --dtype' if dtype else ''}`"
        f" on {machine()}, "
        f"{time.strftime('%Y-%m-%d')}; model tiny-llama-512x8 (random weights), vLLM CPU build, "
        "KV cache 256 MiB (at bfloat16: the same tokens in each variant), preheat's engine "
        "flags. Medians of the runs (variants taking "
        "turns); in brackets, the ratio to the first row (> 1: better).",
        "",
        "| variant | " + " | ".join(m for m, _ in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, row in medians.items():
        cells = []
        for m, higher in METRICS:
            ratio = row[m] / base[m] if higher else base[m] / row[m]
            cells.append(f"{row[m]:.2f} ({ratio:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args) -> dict[str, list[dict[str, float]]]:
    model = str(await asyncio.to_thread(ensure_default_model, 512, 8))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants(args.dtype)}
    for i in range(args.repeat):
        for name, env in variants(args.dtype).items():
            result = await measure(model, env, seed=i, dtype=name if args.dtype else None)
            runs[name].append(result)
            print(name, {k: round(v, 2) for k, v in result.items()}, flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dtype", action="store_true",
                        help="compare the model's dtypes instead of process setups")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.out = args.out or ROOT / f"bench/results/engine-{'dtype' if args.dtype else 'env'}.md"
    text = report(asyncio.run(main_async(args)), args.repeat, args.dtype)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
