"""Several end-to-end runs in one table: what preheat-on gave, and what caching could give.

    .venv/bin/python bench/summary.py bench/results/e2e.md bench/results/e2e-seeded*.md \
        --out bench/results/summary.md

Reads the `.json` beside each report `bench/e2e.py` wrote, and, per workload over every run
that has it, prints the spread and median of

- direct / preheat-on: median end-to-end time, and makespan (a run repeated with `--repeat`
  counts each of its runs, each against the direct run of its own turn);
- direct / preheat-off (the relay alone);
- direct / unpressured, under cache pressure: direct to an engine whose cache is large
  enough, cache empty. What the pressure costs, and so the most that keeping histories
  cached can win back; order (who goes first) can win more, caching cannot;
- direct / oracle: every prompt already cached, tool results and answers included, which no
  server knows before a call is sent.

A single run's median moves by up to a tenth, so a goal is judged on the spread of runs, not
on one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu import invocation  # noqa: E402

COLUMNS = (("preheat-on", "e2e_p50", "direct / on"), ("preheat-on", "makespan", "makespan"),
           ("preheat-off", "e2e_p50", "direct / off"),
           ("unpressured", "e2e_p50", "direct / unpressured"),
           ("oracle", "e2e_p50", "direct / oracle"))


def run_values(mode: dict, key: str) -> list[float]:
    """A mode's figure in each run of a report: the runs of a repeated one, else its one."""
    runs = mode.get("runs", {}).get(key)
    return list(runs) if runs else [mode[key]]


def ratios(workload: dict, mode: str, key: str) -> list[float]:
    """direct / mode for each run that has both, each against its own turn's direct."""
    if "direct" not in workload or mode not in workload:
        return []
    direct, other = run_values(workload["direct"], key), run_values(workload[mode], key)
    if len(direct) != len(other):  # no turns to pair: the medians
        direct, other = [workload["direct"][key]], [workload[mode][key]]
    return [d / o for d, o in zip(direct, other) if o > 0]


def collect(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Workload -> column -> every run's ratio, over the reports in `paths`."""
    table: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        results = json.loads(path.with_suffix(".json").read_text())
        for name, workload in results.items():
            row = table.setdefault(name, {})
            for mode, key, column in COLUMNS:
                row.setdefault(column, []).extend(ratios(workload, mode, key))
    return table


def cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f}x)"


def render(table: dict[str, dict[str, list[float]]], paths: list[Path]) -> str:
    lines = [
        "# End to end over several runs",
        "",
        f"`{invocation('bench/summary.py')}`: the median over every run (in brackets, the "
        "spread) of each ratio, direct over the mode (> 1: the mode is faster), from "
        f"{len(paths)} reports: " + ", ".join(f"`{p.name}`" for p in paths) + ".",
        "",
        "| workload | runs | " + " | ".join(c for _, _, c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in table.items():
        runs = len(row.get("direct / on", []))
        cells = " | ".join(cell(row.get(c, [])) for _, _, c in COLUMNS)
        lines.append(f"| {name} | {runs} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="reports of bench/e2e.py (.md; "
                        "the .json beside each is read)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    missing = [str(p) for p in args.reports if not p.with_suffix(".json").exists()]
    if missing:
        parser.error("no .json beside " + ", ".join(missing))
    text = render(collect(args.reports), args.reports)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
