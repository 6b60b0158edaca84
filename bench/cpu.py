"""What a report says of where its figures came from: the machine (`machine`), the command
and the settings it ran under (`invocation`), and CPU seconds of a process tree (Linux /proc)."""

from __future__ import annotations

import os
import shlex
import sys

from engine.process import (cpu_dtype, cpu_flags, engine_flavour, kv_scale, proc_fields,
                            stat_cpu_seconds)


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """CPU seconds a live process and (apart) its live descendants have used so far."""
    if pid is None:
        return 0.0, 0.0
    stats = {int(e): proc_fields(e) for e in os.listdir("/proc") if e.isdigit()}
    parents = {p: int(f[1]) for p, f in stats.items() if f}
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {p for p, parent in parents.items() if parent in frontier} - tree
    used = {p: stat_cpu_seconds(stats.get(p)) or 0.0 for p in tree}
    return used[pid], sum(used[p] for p in tree - {pid})


def machine() -> str:
    """The cores and the processor the figures were taken on, for a report's header
    ("2 CPU cores (AMD EPYC, AVX-512 BF16)"): the same benchmark ran twice as fast on one
    machine of this project's kind as on another, so a figure names its processor."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pass
    name = next((line.partition(":")[2].strip() for line in text.splitlines()
                 if line.partition(":")[0].strip() == "model name"), "")
    flags = cpu_flags(text)
    isa = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
    about = ", ".join(x for x in (name, isa) if x)
    dtype = cpu_dtype(text) if engine_flavour(sys.executable) == "cpu" else None
    scale = kv_scale(dtype)
    engine = (f"; the engine in {dtype}, its KV caches {scale}x the bytes named, for the same "
              "tokens" if dtype and scale != 1 else "")
    return f"{os.cpu_count()} CPU cores" + (f" ({about}{engine})" if about or engine else "")


SETTINGS = ("PREHEAT_", "VLLM_", "ONEDNN_", "DNNL_", "OMP_", "KMP_", "LD_PRELOAD")
"""Environment variables that change what a benchmark measures: preheat's switches and knobs
(the benchmarks pass the environment on to the preheat and vLLM they start), the engine's
and its maths libraries'."""
NOT_SETTINGS = ("PREHEAT_DB", "PREHEAT_UPSTREAM", "PREHEAT_HOST", "PREHEAT_PORT",
                "PREHEAT_LOG_LEVEL")
"""Where to store, listen and log: the benchmarks choose their own, or it changes no figure."""
SECRET = ("TOKEN", "KEY", "SECRET", "PASSWORD")


def invocation(script: str, argv: list[str] | None = None) -> str:
    """The command a report's figures came from, as one would type it again, with the
    settings it ran under in front (`PREHEAT_ADMISSION_MAX_WAIT=5 .venv/bin/python
    bench/e2e.py --only loops`): a variant measured by setting a variable is not taken for
    the defaults. A variable whose name says it holds a secret is named, its value not."""
    settings = []
    for name, value in sorted(os.environ.items()):
        if not name.startswith(SETTINGS) or name in NOT_SETTINGS:
            continue
        if any(word in name for word in SECRET):
            value = "..."
        settings.append(f"{name}={shlex.quote(value)}")
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(settings + [shlex.join([".venv/bin/python", script, *argv])])
