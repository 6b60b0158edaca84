"""Run vLLM's OpenAI server as a child process and keep it alive.

    engine = Engine("/path/to/model", kv_cache_bytes=64 << 20)
    await engine.start()          # waits for /health; EngineError with advice on failure
    engine.base_url               # http://127.0.0.1:PORT
    ...
    await engine.stop()           # SIGTERM, wait, SIGKILL

The engine runs with prefix caching, per-request cached-token counts, priority scheduling and
KV-cache events published over ZMQ to `kv_events_endpoint` (a `KVMirror` binds it; vLLM
connects, so restarts need no new port). On machines with vLLM's CPU build it also gets
bf16, eager mode and an in-process worker (notes/vllm-on-cpu.md). Extra flags pass through
after ours, so they win.

States: starting -> ready -> (restarting -> ready)* -> stopped; "failed" when a restart gave
up. A watcher notices the child dying (or /health failing for long) and restarts it with
exponential backoff. Listeners added with `add_listener` hear every state change; the KV
mirror uses that to forget a dead engine's cache.

Logs go to `<work_dir>/engine.log`; `last_log_lines(n)` reads its tail. `work_dir` also holds
TMPDIR and vLLM's caches, and is deleted on stop when the engine made it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine import process, tool_parser
from engine.errors import EngineError, diagnose
from engine.model import DEMO_MAX_TOKENS, cap_output

log = logging.getLogger(__name__)

STATES = ("starting", "ready", "restarting", "stopped", "failed")


@dataclass(frozen=True)
class CacheInfo:
    """The engine's KV cache, as its /metrics reports it."""

    block_size: int  # tokens per block
    num_blocks: int  # blocks in the cache

    @property
    def tokens(self) -> int:
        """Tokens the cache holds for requests: vLLM keeps one block aside (its null block),
        as its own 'KV cache size' log line counts."""
        return max(0, self.num_blocks - 1) * self.block_size


def cache_info(metrics_text: str) -> CacheInfo | None:
    """The KV cache a vLLM server reports in its /metrics (`vllm:cache_config_info`)."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            try:
                return CacheInfo(int(labels["block_size"]), int(labels["num_gpu_blocks"]))
            except (KeyError, ValueError):
                return None
    return None


LOAD_GAUGES = {
    "calls running": "vllm:num_requests_running",
    "calls waiting in it": "vllm:num_requests_waiting",
    "KV cache in use": "vllm:kv_cache_usage_perc",
}
"""The gauges of a vLLM server's /metrics that say how loaded it is now: the calls its steps
run, the calls it keeps waiting (under cache pressure, for KV blocks to free), and the share of
its KV cache that running calls hold."""


def metric_totals(metrics_text: str, names: dict[str, str]) -> dict[str, float]:
    """The values of `names` (key -> metric name) in a Prometheus page, each summed over its
    label sets (a server with several engines reports one line each); NaN for a metric the
    page lacks."""
    found: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for key, name in names.items():
            if line.startswith((name + "{", name + " ")):
                try:
                    found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    continue
    return {key: found.get(key, math.nan) for key in names}


KV_EVENTS_TOPIC = "kv-events"
DEMO_NAME = "preheat-demo"
CPU_DEFAULT_KV_BYTES = 1 << 30
LOG_HEADER = "=== preheat:"
START_TRIES = 3
"""Starts tried when a port preheat chose free is taken before the engine binds it."""
Listener = Callable[["Engine", str], None]


def default_dtype(python: str | None = None) -> str | None:
    """The dtype preheat runs the engine installed in `python` in (`Engine.dtype`)."""
    cpu = process.engine_flavour(python or sys.executable) == "cpu"
    return process.cpu_dtype() if cpu else None


def kv_bytes(bf16_bytes: int, python: str | None = None, dtype: str | None = None) -> int:
    """KV cache bytes that hold in the engine's dtype (`dtype`, else preheat's choice for
    this machine) the tokens `bf16_bytes` hold at bfloat16: benchmarks and tests size their
    caches by the tokens they hold."""
    return bf16_bytes * process.kv_scale(dtype or default_dtype(python))


class Engine:
    """One supervised vLLM server. Not thread-safe: drive it from one event loop."""

    def __init__(
        self,
        model: str,
        engine_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        kv_cache_bytes: int | None = None,
        max_model_len: int = 8192,
        work_dir: Path | None = None,
        health_timeout: float = 300,
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        max_restarts: int = 5,
        stop_timeout: float = 15,
    ) -> None:
        self.model = str(model)
        self.engine_args = tuple(engine_args)
        self.host = host
        self.kv_cache_bytes = kv_cache_bytes
        self.max_model_len = max_model_len
        self.health_timeout = health_timeout
        self.python = python or sys.executable
        self.extra_env = dict(env or {})
        self.max_restarts = max_restarts
        self.stop_timeout = stop_timeout
        self._requested_port = port
        self.port = port or 0
        # The KV-event port is chosen now, so that a KV mirror can bind it before the engine
        # starts, and kept across restarts, so that every engine publishes where the mirror
        # listens. The replay port (which vLLM binds) is chosen again at each start.
        self._kv_port, self._replay_port = process.free_ports("127.0.0.1", 2)
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else None
        self._proc: process.Child | None = None
        self._watcher: asyncio.Task | None = None
        self._listeners: list[Listener] = []
        self._state = "stopped"
        self.restarts = 0
        self.generation = 0  # incremented for each engine process started
        self.cache: CacheInfo | None = None  # read from /metrics once the engine is healthy

    # --- public contract -------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One of "starting", "ready", "restarting", "stopped", "failed"."""
        return self._state

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def base_url(self) -> str:
        """http://HOST:PORT of the engine's OpenAI server (no /v1)."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        """ZMQ endpoint the engine publishes KV events to; the subscriber binds it."""
        return f"tcp://127.0.0.1:{self._kv_port}"

    @property
    def kv_replay_endpoint(self) -> str:
        """ZMQ ROUTER endpoint where missed KV-event batches can be asked for again (vLLM
        binds it; chosen anew at each start)."""
        return f"tcp://127.0.0.1:{self._replay_port}"

    @property
    def served_model_name(self) -> str:
        """The name clients put in "model" (vLLM's default: the --model argument; preheat's
        offline demo model: `preheat-demo`, its folder's path being no name a client knows)."""
        name = self._arg("--served-model-name")
        if name is not None:
            return name
        return DEMO_NAME if self.demo else self.model

    def _arg(self, name: str) -> str | None:
        """The value `engine_args` give an option (`--name value` or `--name=value`)."""
        args = list(self.engine_args)
        for i, arg in enumerate(args):
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
            if arg == name and i + 1 < len(args):
                return args[i + 1]
        return None

    @property
    def dtype(self) -> str | None:
        """The dtype the model runs in and its KV cache is kept in: one `engine_args` give,
        else on the CPU build the processor's (`process.cpu_dtype`: bfloat16 where it is
        native, float32 elsewhere); None where vLLM chooses (a GPU: the model's own)."""
        given = self._arg("--dtype")
        return given if given is not None else default_dtype(self.python)

    @property
    def demo(self) -> bool:
        """Whether the model is one of preheat's offline random-weight models."""
        return process.looks_like_path(self.model) and process.is_random_weights(
            Path(self.model).expanduser())

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.alive() else None

    @property
    def log_path(self) -> Path | None:
        return self.work_dir / "engine.log" if self.work_dir else None

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(engine, state)` on every state change (from the event loop)."""
        self._listeners.append(listener)

    def last_log_lines(self, n: int = 20) -> list[str]:
        """The last `n` lines the engine wrote (stdout and stderr), oldest first."""
        return process.tail(self.log_path, n) if self.log_path else []

    def command(self) -> list[str]:
        """The argv the engine is started with (ports as chosen for the next start)."""
        kv_config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.kv_events_endpoint,
            "replay_endpoint": self.kv_replay_endpoint,
            "topic": KV_EVENTS_TOPIC,
        }
        argv = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--scheduling-policy", "priority",
            "--kv-events-config", json.dumps(kv_config),
            "--disable-uvicorn-access-log",
        ]
        kv_bytes = self.kv_cache_bytes
        if process.engine_flavour(self.python) == "cpu":
            argv += ["--enforce-eager"]
            if self._arg("--dtype") is None:
                argv += ["--dtype", self.dtype]
            sized = any(a.startswith(("--kv-cache-memory", "--gpu-memory-utilization"))
                        for a in self.engine_args)
            if kv_bytes is None and not sized:
                # The CPU build otherwise reserves 92% of the machine's memory for its cache
                # and refuses to start beside anything else.
                kv_bytes = CPU_DEFAULT_KV_BYTES
        if kv_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(kv_bytes)]
        demo = self.demo
        argv += tool_parser.engine_flags(self.model, self.engine_args, demo_model=demo)
        if demo and not any(a.startswith("--served-model-name") for a in self.engine_args):
            argv += ["--served-model-name", DEMO_NAME, self.model]  # its path answers too
        return argv + list(self.engine_args)

    async def start(self) -> None:
        """Start the engine and wait until /health answers 200 (at most `health_timeout` s).

        Raises EngineError, with what to do and the engine's last log lines, when the model
        path does not exist, vLLM is not installed, the port is taken, or the engine exits or
        stays unhealthy. A port that preheat chose, taken by another process before the engine
        could bind it, costs one more try with other ports (START_TRIES in all). Calling it on
        a running engine does nothing.
        """
        if self._state in ("starting", "ready", "restarting"):
            return
        self._preflight()
        self.restarts = 0
        self._set_state("starting")
        try:
            for attempt in range(1, START_TRIES + 1):
                # Chosen as late as can be, and again when one was taken before the engine
                # bound it. The URL is then kept: a restarted engine answers where it did.
                self.port = self._requested_port or process.free_ports(self.host, 1)[0]
                self._replay_port = process.free_ports("127.0.0.1", 1)[0]
                try:
                    await self._launch()
                    break
                except EngineError as exc:
                    taken = exc.port_in_use
                    if taken is None or taken == self._requested_port or attempt == START_TRIES:
                        raise
                    log.warning("engine start %d of %d failed: port %d was taken before the "
                                "engine bound it; trying other ports", attempt, START_TRIES,
                                taken)
        except BaseException:
            self._set_state("failed")
            self._remove_work_dir()  # the error carries the log's last lines
            raise
        self._set_state("ready")
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="engine-watch")

    async def stop(self) -> None:
        """Stop the engine: SIGTERM, wait up to `stop_timeout` s, then SIGKILL. Idempotent."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await self._terminate()
        if self._state != "stopped":
            self._set_state("stopped")
        self._remove_work_dir()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- internals -------------------------------------------------------------------------

    def _preflight(self) -> None:
        if process.looks_like_path(self.model):
            path = Path(self.model).expanduser()
            if not path.is_dir() or not (path / "config.json").is_file():
                what = "does not exist" if not path.exists() else "holds no config.json"
                raise EngineError(
                    f"Model path {self.model} {what}: build an offline model there with "
                    f"`preheat tiny-model {self.model}` or name a real model "
                    "(e.g. --model Qwen/Qwen2.5-0.5B-Instruct)."
                )
            self.model = str(path.absolute())
            if process.is_random_weights(path):
                log.warning(
                    "model %s has random weights: it exists to try preheat and writes noise "
                    "(send model=%s; a call without max_tokens stops at %d tokens); name a "
                    "real one with --model Qwen/Qwen2.5-0.5B-Instruct",
                    self.model, self.served_model_name, DEMO_MAX_TOKENS)
                try:
                    cap_output(path)
                except OSError as exc:  # a read-only folder: calls without a limit run long
                    log.warning("could not give %s a default output limit: %s", path, exc)
        if self._requested_port and not process.port_free(self.host, self._requested_port):
            raise EngineError(
                f"Port {self._requested_port} on {self.host} is already in use: stop what is "
                "using it or choose another engine port (or leave it unset for a free one)."
            )
        if process.engine_flavour(self.python) is None:
            raise EngineError(
                "vLLM is not installed in this Python; install it with `make engine` "
                f"(or `bash engine/install.sh {self.python}`)."
            )
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="preheat-engine-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)

    def _launch_log(self, n: int) -> list[str]:
        """The last `n` lines of the engine process last started: from preheat's header line
        with its command (each process appends to the log after one)."""
        lines = self.last_log_lines(n)
        starts = [i for i, line in enumerate(lines) if line.startswith(LOG_HEADER)]
        return lines[starts[-1]:] if starts else lines

    def _remove_work_dir(self) -> None:
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    async def _launch(self) -> None:
        """Start one engine process and wait for its health; kill it if it never gets there."""
        self.generation += 1
        assert self.work_dir is not None
        self._proc = process.Child.spawn(
            self.command(), self.work_dir, self._env(),
            header=f"{LOG_HEADER} generation {self.generation}"
        )
        log.info("engine starting (pid %d, %s), log: %s", self._proc.pid, self.base_url,
                 self.log_path)
        try:
            await self._wait_healthy()
            self.cache = await self._read_cache_info()
        except BaseException:
            await self._terminate()
            raise
        log.info("engine ready at %s after %.1f s", self.base_url, self._proc.age())

    async def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.health_timeout
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                code = self._proc.returncode()
                if code is not None:
                    lines = self._launch_log(400)  # not an earlier process's last words
                    said = lines[1:] if lines and lines[0].startswith(LOG_HEADER) else lines
                    raise diagnose(said, code, self.port, lines[-20:])
                if await _healthy(client, self.base_url):
                    return
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"The engine did not become healthy within {self.health_timeout:.0f} s: "
                        "check the model and flags in its log below, or allow more time "
                        "(health_timeout).",
                        self._launch_log(20),
                    )
                await asyncio.sleep(0.25)

    async def _read_cache_info(self) -> CacheInfo | None:
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                return cache_info((await client.get(self.base_url + "/metrics")).text)
        except httpx.HTTPError:
            return None

    async def _watch(self) -> None:
        """Restart the engine when it dies; give up after `max_restarts` failed tries."""
        unhealthy_since: float | None = None
        last_probe = time.monotonic()
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                await asyncio.sleep(0.5)
                assert self._proc is not None
                dead = self._proc.returncode() is not None
                if not dead and time.monotonic() - last_probe >= 5:
                    # A live process that stops answering /health for a minute is as dead.
                    last_probe = time.monotonic()
                    if await _healthy(client, self.base_url):
                        unhealthy_since = None
                    else:
                        unhealthy_since = unhealthy_since or time.monotonic()
                        dead = time.monotonic() - unhealthy_since > 60
                if dead:
                    unhealthy_since = None
                    if not await self._restart():
                        return

    async def _restart(self) -> bool:
        assert self._proc is not None
        log.warning("engine died (exit %s); restarting", self._proc.returncode())
        self._set_state("restarting")
        await self._terminate()
        backoff = 1.0
        for attempt in range(1, self.max_restarts + 1):
            self.restarts += 1
            try:
                await self._launch()
            except EngineError as exc:
                log.warning("engine restart %d failed: %s", attempt, exc)
                if exc.port_in_use is not None and exc.port_in_use != self.port:
                    self._replay_port = process.free_ports("127.0.0.1", 1)[0]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._set_state("ready")
            return True
        log.error("engine gave up after %d restarts; see %s", self.max_restarts, self.log_path)
        self._set_state("failed")
        return False

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.terminate(self.stop_timeout)

    def _env(self) -> dict[str, str]:
        assert self.work_dir is not None
        env = process.engine_env(self.work_dir, cpu=process.engine_flavour(self.python) == "cpu")
        env.update(self.extra_env)
        return env

    def _set_state(self, state: str) -> None:
        assert state in STATES
        self._state = state
        for listener in list(self._listeners):
            try:
                listener(self, state)
            except Exception:  # a listener must never take the supervisor down
                log.exception("engine state listener failed")


async def _healthy(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        return (await client.get(base_url + "/health")).status_code == 200
    except httpx.HTTPError:
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
