"""Proxy overhead: direct to an upstream vs through preheat, interleaved in one run.

The upstream is the in-process-style fake (tests/fake_upstream.py) in its own process, so
what is measured is preheat's own cost: its HTTP server, the upstream hop, the relay and
capture (on, writing to SQLite from the observer process). Each worker alternates direct
and proxied calls so both see the same machine state.

    .venv/bin/python bench/overhead.py [--requests N] [--out bench/results/overhead.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import cpu_seconds  # noqa: E402
from engine.process import free_port  # noqa: E402

BODY = {"model": "m", "messages": [{"role": "system", "content": "You are a helpful agent. " * 20},
                                   {"role": "user", "content": "What is the weather?"}]}


# How long the mock upstream takes: a non-streamed reply after 50 ms, streams with 5 ms
# between events (an LLM's pace is slower still). With no delay at all, concurrency 64 only
# measures how fast two cores can run three HTTP stacks, which `--saturate` reports.
UPSTREAM_DELAY = {False: 0.05, True: 0.005}



async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def call(session: aiohttp.ClientSession, url: str, stream: bool, i: int) -> tuple[float, float, list[float]]:
    """(total seconds, seconds to first event, gaps between events)."""
    body = dict(BODY, stream=stream, messages=BODY["messages"] + [{"role": "user", "content": str(i)}])
    headers = {"x-fake-events": "16", "x-fake-delay": str(UPSTREAM_DELAY[stream])}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
        if not stream:
            await r.read()
            t = time.perf_counter() - t0
            return t, t, []
        first = None
        stamps = []
        async for line in r.content:  # one line at a time, as a client's SSE reader does
            if not line.startswith(b"data:"):
                continue
            now = time.perf_counter()
            stamps.append(now)
            if first is None:
                first = now - t0
        total = time.perf_counter() - t0
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return total, first or total, gaps


async def run_mode(direct: str, proxied: str, stream: bool, concurrency: int, n: int) -> dict:
    results: dict[str, dict[str, list[float]]] = {
        k: {"total": [], "first": [], "gap": []} for k in ("direct", "proxied")}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Warm both paths (connections, caches) before measuring.
        for url in (direct, proxied):
            await asyncio.gather(*(call(session, url, stream, -1) for _ in range(concurrency)))
        per_worker = max(1, n // concurrency)

        async def worker(w: int) -> None:
            for j in range(per_worker):
                order = ("direct", "proxied") if (w + j) % 2 == 0 else ("proxied", "direct")
                for name in order:
                    url = direct if name == "direct" else proxied
                    total, first, gaps = await call(session, url, stream, w * 10_000 + j)
                    results[name]["total"].append(total)
                    results[name]["first"].append(first)
                    results[name]["gap"].extend(gaps)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return results


def summarize(kind: str, concurrency: int, res: dict, cpu: tuple[float, float]) -> dict:
    metric = "first" if kind == "stream" else "total"
    d, p = res["direct"][metric], res["proxied"][metric]
    row = {
        "kind": kind, "concurrency": concurrency, "n": len(p),
        "direct_p50": pct(d, 0.5) * 1e3, "proxied_p50": pct(p, 0.5) * 1e3,
        "direct_p99": pct(d, 0.99) * 1e3, "proxied_p99": pct(p, 0.99) * 1e3,
    }
    row["added_p50"] = row["proxied_p50"] - row["direct_p50"]
    row["added_p99"] = row["proxied_p99"] - row["direct_p99"]
    row["ratio_p50"] = row["proxied_p50"] / row["direct_p50"]
    # The proxy's CPU per proxied call: what a proxy takes from the cores an engine shares
    # with it (the observer's capture and learning apart). Idle time's timers count too.
    calls = len(p) + concurrency  # the warm-up calls ran while CPU was counted
    row["cpu_proxy_ms"] = cpu[0] / calls * 1e3
    row["cpu_observer_ms"] = cpu[1] / calls * 1e3
    if kind == "stream":
        row["gap_direct_p50"] = statistics.median(res["direct"]["gap"]) * 1e3
        row["gap_proxied_p50"] = statistics.median(res["proxied"]["gap"]) * 1e3
    return row


async def main_async(args: argparse.Namespace) -> list[dict]:
    up_port, px_port = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="preheat-bench-")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", str(up_port)], cwd=ROOT,
                         env=env),
        subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--upstream",
                          f"http://127.0.0.1:{up_port}", "--port", str(px_port),
                          "--db", f"sqlite:///{tmp}/bench.db"], cwd=ROOT, env=env),
    ]
    direct, proxied = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{px_port}"
    rows = []
    try:
        await wait_ready(direct + "/v1/models")
        await wait_ready(proxied + "/healthz")
        for kind in ("non-stream", "stream"):
            for concurrency in (1, 64):
                n = args.requests if concurrency > 1 else max(200, args.requests // 4)
                before = cpu_seconds(procs[1].pid)
                res = await run_mode(direct, proxied, kind == "stream", concurrency, n)
                await asyncio.sleep(1.0)  # the observer's share of the last calls
                after = cpu_seconds(procs[1].pid)
                cpu = (after[0] - before[0], after[1] - before[1])
                rows.append(summarize(kind, concurrency, res, cpu))
                r = rows[-1]
                print(f"{kind:>10} c={concurrency:<3} added p50 {r['added_p50']:+.2f} ms  "
                      f"p99 {r['added_p99']:+.2f} ms  ratio p50 {r['ratio_p50']:.2f}x  CPU per call "
                      f"{r['cpu_proxy_ms']:.2f} ms proxy + {r['cpu_observer_ms']:.2f} ms observer",
                      flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    return rows


def write_report(rows: list[dict], path: Path, requests: int) -> str:
    lines = [
        "# Proxy overhead",
        "",
        f"`.venv/bin/python bench/overhead.py --requests {requests}` on {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}. Fake upstream, proxy and load generator each in their own "
        "process on this machine; capture and learning on (SQLite), in preheat's observer process, "
        "which the proxy hands each exchange with one pickle and one socket write. Each worker "
        "alternates direct and proxied calls. Non-stream: whole-call latency; stream: time to the "
        "first event (16-event streams). CPU: the proxy's own, and its observer's (capture and "
        "learning, in a child process at lower priority) per proxied call, idle time's timers "
        "included.",
        "",
        "| kind | concurrency | calls | direct p50 ms | proxied p50 ms | added p50 ms | direct p99 ms | proxied p99 ms | added p99 ms | ratio p50 | CPU ms per call, proxy / observer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['concurrency']} | {r['n']} | {r['direct_p50']:.2f} | "
            f"{r['proxied_p50']:.2f} | {r['added_p50']:+.2f} | {r['direct_p99']:.2f} | "
            f"{r['proxied_p99']:.2f} | {r['added_p99']:+.2f} | {r['ratio_p50']:.2f}x | "
            f"{r['cpu_proxy_ms']:.2f} / {r['cpu_observer_ms']:.2f} |")
    streams = [r for r in rows if r["kind"] == "stream"]
    if streams:
        lines += ["", "Per-event delay inside streams (median gap between events):", ""]
        for r in streams:
            lines.append(f"- concurrency {r['concurrency']}: direct {r['gap_direct_p50']:.3f} ms, "
                         f"proxied {r['gap_proxied_p50']:.3f} ms")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/overhead.md")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print(write_report(rows, args.out, args.requests))


if __name__ == "__main__":
    main()
