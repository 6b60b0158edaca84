"""The end-to-end benchmark's report: the markdown tables and the plot (bench/e2e.py).

Every mode's figures per workload, then the ratios to direct, the headroom preheat-on
captured (of the oracle's, and under cache pressure of the unpressured engine's), and the
pre-warm planner's counters; where workloads were repeated, each run beside the medians.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.cpu import invocation, machine
from bench.e2e_modes import MODES, VARIANT
from bench.summary import ratios


def report(results: dict[str, dict[str, dict]], args, engines: str) -> str:
    lines = [
        "# End to end on vLLM: direct vs through preheat",
        "",
        f"`{invocation('bench/e2e.py')}` on "
        f"{machine()}, {time.strftime('%Y-%m-%d')}; {engines}.",
        f"Each mode starts on an engine left idle for {args.idle:g} s with its prefix cache "
        "emptied (preheat-on " + ("cold: it learned nothing before the run). "
                                  if getattr(args, "cold", False)
                                  else "after learning on other instances of the same "
                                  "workflows" + (", then restarted on its store"
                                                 if getattr(args, "restart", False) else "") +
                                  "). ") +
        ("Answers sampled at temperature 1, each call seeded by its prompt (distinct, as a "
         "real model's; greedy, this model repeats one word). " if getattr(args, "seeded", False) else "") +
        "Instance end-to-end latency includes tool gaps. Ratios: direct / preheat-on (> 1 is "
        "faster); headroom captured = (direct - on) / (direct - oracle), on median e2e. Under "
        "cache pressure the oracle runs on an unpressured engine with every prompt cached "
        "(tool results and answers included: what no server knows before a call is sent); "
        "`unpressured` is direct to that engine, cache empty, and the headroom in brackets is "
        "of it: the share of what the pressure cost that preheat won back.",
        "",
        *_variants_said(getattr(args, "variants", None)),
        "Working set: the peak of tokens that running instances will re-use (prompt prefixes "
        "and answers, held from first use to last), estimated from characters.",
        "",
        "CPU s: seconds of CPU the engine (all its processes) and preheat (the proxy + its "
        "observer, which captures and learns) used during the measured run. At once: calls "
        "on the engine at a time, on average over the makespan (each call's time past "
        "preheat's admission queue), and in brackets those of them the engine ran in its "
        "steps, by its own gauge read every half second (the others waited in it: under "
        "pressure, for KV blocks). Held idle: seconds in which preheat held a call while none "
        "was on the engine (an engine with work to do left idle). Prefilled: the prompt tokens the "
        "engine computed (the tokens its steps computed less those it generated, by its own "
        "counters: prompts prefilled again after a preemption count too, and so does what "
        "preheat warmed in the idle before the run), and the calls it preempted.",
        "",
        "| workload | mode | e2e p50 s | e2e p90 s | makespan s | TTFT p50 s | TTFT p90 s | cached share | calls | working set tok | CPU s engine / preheat | at once | held idle s | prefilled tok / preempted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for mode, r in rows.items():
            lines.append(f"| {name} | {mode} | {r['e2e_p50']:.2f} | {r['e2e_p90']:.2f} | "
                         f"{r['makespan']:.2f} | {r['ttft_p50']:.3f} | {r['ttft_p90']:.3f} | "
                         f"{r['cached_share']:.2f} | {int(r['calls'])} | {int(r['working_set'])} | "
                         f"{_cpu(r)} | {_at_once(r)} | {_held_idle(r)} | {_prefilled(r)} |")
    lines += ["", "| workload | direct / on (e2e p50) | direct / on (makespan) | direct / off | "
              "on / oracle | headroom captured | warms sent / hit / in vain | warmed tokens hit / in vain "
              "| warm precision |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        optimised = [m for m in rows if m == "preheat-on" or m.startswith(VARIANT)]
        if "direct" not in rows or not (optimised or "preheat-off" in rows):
            continue  # a partial run (--modes) with nothing to compare
        d, off, _, o, u = (rows[m]["e2e_p50"] if m in rows else float("nan") for m in MODES)
        if not optimised:  # direct against preheat-off alone (what preheat costs)
            lines.append(f"| {name} | - | - | {_ratio(d, off)} | - | - | - | - | - |")
        for mode in optimised:  # preheat-on, then its variants (--variant)
            lines.append(_ratios(name if mode == "preheat-on" else f"{name}, {mode}", rows,
                                 mode, d, off, o, u))
    repeated = [(name, mode, r["runs"], rows) for name, rows in results.items()
                for mode, r in rows.items() if "runs" in r]
    if repeated:
        lines += ["", f"Each figure above is the median of {len(repeated[0][2]['e2e_p50'])} "
                  "runs, the modes taking turns; the runs themselves, and each set against its "
                  "turn's direct run (direct / mode, on e2e p50 and on makespan):", "",
                  "| workload | mode | e2e p50 s | e2e p90 s | makespan s | direct / mode | "
                  "makespan: direct / mode |",
                  "|---|---|---|---|---|---|---|"]
        for name, mode, runs, rows in repeated:
            versus = ["", ""]
            if mode != "direct":
                versus = [" / ".join(f"{r:.2f}x" for r in ratios(rows, mode, key))
                          for key in ("e2e_p50", "makespan")]
            lines.append(f"| {name} | {mode} | {' / '.join(map(str, runs['e2e_p50']))} | "
                         f"{' / '.join(map(str, runs['e2e_p90']))} | "
                         f"{' / '.join(map(str, runs['makespan']))} | {versus[0]} | "
                         f"{versus[1]} |")
    return "\n".join(lines) + "\n"


def _variants_said(variants: dict[str, dict[str, str]] | None) -> list[str]:
    """The report's words for `--variant`: each mode and the settings it ran with."""
    if not variants:
        return []
    said = "; ".join(f"`{mode}` with " + " ".join(f"{k}={v}" for k, v in settings.items())
                     for mode, settings in variants.items())
    return [f"Variants, each preheat-on with settings of its own and learning as it does, "
            f"run in the same turns: {said}.", ""]


def _ratios(label: str, rows: dict[str, dict], mode: str, d: float, off: float, o: float,
            u: float) -> str:
    """The ratios row of an optimised mode (preheat-on, or a variant of it): to direct (`d`),
    preheat-off (`off`), the oracle (`o`) and, under pressure, the unpressured engine (`u`),
    on median end-to-end time."""
    r = rows[mode]
    on = r["e2e_p50"]
    # No headroom where the oracle is not faster than direct: the ratio would be noise.
    head = _headroom(d, on, o)
    share = _captured(d, on, u)  # a pressure workload: the share of what the pressure cost
    if share is not None:
        head += (" (faster than unpressured)" if on < u else f" ({share:.0%} of unpressured)")
    sent, hit, vain = (int(r.get(f"warm_{k}", 0)) for k in ("sent", "hit", "wasted"))
    sent += int(r.get("warm_static_sent", 0))
    tok_hit, tok_vain = r.get("warm_tokens_hit", 0), r.get("warm_tokens_wasted", 0)
    precision = f"{tok_hit / (tok_hit + tok_vain):.2f}" if tok_hit + tok_vain else "-"
    return (f"| {label} | {d / on:.2f}x | {rows['direct']['makespan'] / r['makespan']:.2f}x "
            f"| {_ratio(d, off)} | {_ratio(on, o)} | {head} | {sent} / {hit} / {vain} "
            f"| {int(tok_hit)} / {int(tok_vain)} | {precision} |")


HEADROOM_MIN = 0.05
"""The share of direct's time the oracle must save for a headroom to be given: a single
run's median moves by up to 10%, and a gap smaller than this is noise (the generated
workflows' oracle was 0.6% and 4.2% faster than direct in two full runs, and preheat-on,
ordering them, 30% faster: "619%" of nothing)."""


def _captured(direct: float, on: float, best: float) -> float | None:
    """(direct - on) / (direct - best); None where `best` was not run, or is not
    HEADROOM_MIN faster than direct (the ratio would be noise)."""
    if best != best or direct - best <= HEADROOM_MIN * direct:
        return None
    return (direct - on) / (direct - best)


def _headroom(direct: float, on: float, best: float) -> str:
    """`_captured` as the report says it; all where preheat-on is faster than `best`
    (ordering the generated workflows gains what no cache does: "336%" said only that the
    oracle's headroom was small)."""
    share = _captured(direct, on, best)
    if share is None:
        return "-" if best != best else f"- (oracle within {HEADROOM_MIN:.0%} of direct)"
    return "all (faster than it)" if on < best else f"{share:.0%}"


def _at_once(r: dict) -> str:
    """Calls past admission at once, and of those the calls the engine ran in its steps (its
    own gauge; the rest waited in it)."""
    if "engine_load" not in r:
        return "-"  # (an older report's)
    running = r.get("engine_running", math.nan)
    return f"{r['engine_load']:.1f}" + (f" ({running:.1f} running)" if running == running
                                        else "")


def _held_idle(r: dict) -> str:
    return f"{r['held_idle']:.1f}" if "held_idle" in r else "-"  # (an older report's)


def _prefilled(r: dict) -> str:
    """The engine's own count of the prompt tokens it computed, and of its preemptions."""
    stepped, generated, preempted = (r.get(k, math.nan) for k in ("stepped", "generated",
                                                                 "preempted"))
    if stepped != stepped or generated != generated:
        return "-"  # a report from before they were counted, or an engine without them
    return (f"{int(stepped - generated)} / "
            + (f"{int(preempted)}" if preempted == preempted else "-"))


def _cpu(r: dict) -> str:
    if "cpu_engine" not in r:
        return "-"  # the oracle, or a report from before CPU was counted
    preheat = r["cpu_proxy"] + r["cpu_observer"]  # 0 only where no proxy ran (direct)
    return f"{r['cpu_engine']:.1f} / {preheat:.1f}" if preheat else f"{r['cpu_engine']:.1f} / -"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b else "-"


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Median end-to-end time per workload and mode, relative to direct (lower is faster)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [n for n, rows in results.items() if "direct" in rows]
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.75 * len(names)))
    modes = list(MODES) + sorted({m for rows in results.values() for m in rows
                                  if m.startswith(VARIANT)})
    height = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        values = [results[n][mode]["e2e_p50"] / results[n]["direct"]["e2e_p50"]
                  if mode in results[n] else 0.0 for n in names]
        ax.barh([i + k * height for i in range(len(names))], values, height, label=mode)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("median end-to-end time per instance, relative to direct (lower is faster)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
