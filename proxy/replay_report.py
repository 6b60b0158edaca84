"""The report of a replay: a summary per target, as Markdown with PNG plots, and as JSON.

With two targets (`preheat replay --compare A B`) every figure is shown side by side with the
ratio B/A. Plots need matplotlib (`pip install 'preheat[report]'`); without it the Markdown
and JSON are still written and the missing plots are named.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from proxy.replay import RunResult

PLOTS_MISSING = ("the report's plots need matplotlib, which is not installed: "
                 "pip install 'preheat[report]' (the Markdown and JSON are written without them)")


def _q(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))]


def session_latencies(run: RunResult) -> dict[str, float]:
    """Seconds from each session's first request to its last answer."""
    spans: dict[str, list[float]] = {}
    for c in run.calls:
        s = spans.setdefault(c.session, [c.start, c.end or c.start])
        s[0], s[1] = min(s[0], c.start), max(s[1], c.end or c.start)
    return {sid: end - start for sid, (start, end) in spans.items()}


def summarize(run: RunResult) -> dict:
    ok = [c for c in run.calls if c.error is None]
    ttfts = [c.ttft for c in ok if c.ttft is not None]
    lat = list(session_latencies(run).values())
    prompt = sum(c.prompt_tokens or 0 for c in ok)
    cached = sum(c.cached_tokens or 0 for c in ok)
    forced = [c for c in ok if c.expected_tokens is not None and c.completion_tokens is not None]
    return {
        "target": run.target,
        "calls": len(run.calls),
        "errors": len(run.calls) - len(ok),
        "sessions": len(lat),
        "wall_s": run.wall,
        "session_latency_mean_s": statistics.fmean(lat) if lat else None,
        "session_latency_p50_s": _q(lat, 0.5),
        "session_latency_p90_s": _q(lat, 0.9),
        "ttft_p50_s": _q(ttfts, 0.5),
        "ttft_p90_s": _q(ttfts, 0.9),
        "ttft_p99_s": _q(ttfts, 0.99),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_share": cached / prompt if prompt else None,
        "completion_tokens": sum(c.completion_tokens or 0 for c in ok),
        "output_length_as_recorded": (sum(c.completion_tokens == c.expected_tokens for c in forced)
                                      / len(forced)) if forced else None,
    }


ROWS = [
    ("calls", "calls", "{:,}"), ("errors", "errors", "{:,}"), ("sessions", "sessions", "{:,}"),
    ("wall_s", "wall time (s)", "{:.2f}"),
    ("session_latency_mean_s", "session latency, mean (s)", "{:.3f}"),
    ("session_latency_p50_s", "session latency, p50 (s)", "{:.3f}"),
    ("session_latency_p90_s", "session latency, p90 (s)", "{:.3f}"),
    ("ttft_p50_s", "TTFT p50 (s)", "{:.4f}"), ("ttft_p90_s", "TTFT p90 (s)", "{:.4f}"),
    ("ttft_p99_s", "TTFT p99 (s)", "{:.4f}"),
    ("prompt_tokens", "prompt tokens", "{:,}"), ("cached_tokens", "cached prompt tokens", "{:,}"),
    ("cached_share", "cached share", "{:.1%}"), ("completion_tokens", "completion tokens", "{:,}"),
    ("output_length_as_recorded", "calls with the recorded output length", "{:.0%}"),
]
RATIO_KEYS = {"wall_s", "session_latency_mean_s", "session_latency_p50_s",
              "session_latency_p90_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s"}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(summaries: dict[str, dict], meta: dict, plots: list[str], note: str | None) -> str:
    labels = list(summaries)
    compare = len(labels) == 2
    head = ["metric"] + [f"{label} ({summaries[label]['target']})" for label in labels]
    if compare:
        head.append(f"{labels[1]} / {labels[0]}")
    lines = ["# Replay report", "",
             f"{meta['sessions']} sessions, {meta['calls']} calls from {meta['source']}; "
             f"speed x{meta['speed']:g}; output lengths "
             f"{'forced to the recorded ones' if meta['force_length'] else 'not forced'}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, name, fmt in ROWS:
        row = [name] + [_cell(summaries[label][key], fmt) for label in labels]
        if compare:
            a, b = summaries[labels[0]][key], summaries[labels[1]][key]
            row.append(f"{b / a:.2f}x" if key in RATIO_KEYS and a and b is not None else "")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    if note:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def plot(runs: dict[str, RunResult], out: Path) -> list[str]:
    """Write the PNG plots; their file names. ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = {label: session_latencies(run) for label, run in runs.items()}
    order = sorted({s for v in lat.values() for s in v},
                   key=lambda s: -max(v.get(s, 0.0) for v in lat.values()))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(order) + 3), 4))
    width = 0.8 / max(len(runs), 1)
    for k, (label, values) in enumerate(lat.items()):
        ax.bar([i + k * width for i in range(len(order))], [values.get(s, 0.0) for s in order],
               width, label=label)
    ax.set_xlabel("session (slowest first)")
    ax.set_ylabel("seconds, first request to last answer")
    ax.set_title("Latency per session")
    ax.set_xticks([])
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_per_session.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        values = sorted(c.ttft for c in run.calls if c.ttft is not None and c.error is None)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label,
                    drawstyle="steps-post")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("share of calls")
    ax.set_title("TTFT distribution")
    ax.set_ylim(0, 1.02)
    if ax.lines:  # no call answered: an empty plot, and no legend to warn about
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no call answered", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)
    plt.close(fig)
    return ["latency_per_session.png", "ttft_cdf.png"]


def write_report(runs: dict[str, RunResult], out: Path, meta: dict) -> tuple[Path, str | None]:
    """report.md, report.json and the plots in `out`; (path of report.md, a note or None)."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = {label: summarize(run) for label, run in runs.items()}
    note = None
    try:
        plots = plot(runs, out)
    except ImportError:
        plots, note = [], PLOTS_MISSING
    (out / "report.md").write_text(markdown(summaries, meta, plots, note), encoding="utf-8")
    data = {"meta": meta, "summary": summaries,
            "calls": {label: [asdict(c) for c in run.calls] for label, run in runs.items()}}
    (out / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return out / "report.md", note
