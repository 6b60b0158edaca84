"""CPU seconds of a process tree, read from /proc (Linux)."""

from __future__ import annotations

import os

from engine.process import proc_fields, stat_cpu_seconds


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
