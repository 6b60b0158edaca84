"""CPU seconds of a process tree, read from /proc (Linux)."""

from __future__ import annotations

import os

from engine.process import cpu_seconds as own_cpu_seconds
from engine.process import proc_fields


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """CPU seconds a live process and (apart) its live descendants have used so far."""
    if pid is None:
        return 0.0, 0.0
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        fields = proc_fields(entry) if entry.isdigit() else None
        if fields:
            parents[int(entry)] = int(fields[1])
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {p for p, parent in parents.items() if parent in frontier} - tree
    below = sum(own_cpu_seconds(p) or 0.0 for p in tree - {pid})
    return own_cpu_seconds(pid) or 0.0, below
