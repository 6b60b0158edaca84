"""CPU seconds of a process tree, read from /proc (Linux)."""

from __future__ import annotations

import os


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """CPU seconds (user + system) a live process and its live descendants have used so far."""
    if pid is None:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {p for p, parent in parents.items() if parent in frontier} - tree
    return used.get(pid, 0.0), sum(used.get(p, 0.0) for p in tree - {pid})
