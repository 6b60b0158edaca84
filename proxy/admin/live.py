"""What each optimisation is doing now, for the admin overview.

The same figures as /metrics, read from the proxy's live objects (admission, the prompt
cache, the pre-warm planner) with each one's switch: a user who turned something off, or
whose upstream keeps it off (admission needs the engine's KV-cache size), sees so beside the
figures. Read on the event loop (those objects are not thread-safe); plain JSON out.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.appkeys import ADMISSION, CACHE, METRICS, PLANNER, SETTINGS
from proxy.metrics import WAIT_BUCKETS


def optimisations(app: web.Application) -> list[dict[str, Any]]:
    settings = app[SETTINGS]
    admission = app.get(ADMISSION)
    cache = app.get(CACHE)
    planner = app.get(PLANNER)
    needs = "needs a vLLM upstream that reports its KV-cache size"
    waits = app[METRICS].waits if METRICS in app else None  # (/metrics' histogram)
    return [
        _row("cache-aware admission", "admission", settings.admission, admission is not None,
             needs, _admission(admission, waits) if admission is not None else []),
        _row("set aside sessions that outgrow the cache", "admission_suspend",
             settings.admission_suspend, admission is not None and admission.suspend,
             "needs admission",
             [("sessions set aside", admission.suspended)] if admission is not None else []),
        _row("more sessions while the engine has few calls at once", "admission_spare_below",
             settings.admission_spare_below > 0,
             admission is not None and admission.spare_below > 0, "needs admission",
             [("calls on the engine at once (20 s average)", _or_dash(admission.load())),
              ("sessions let in on spare throughput", admission.admitted.get("spare", 0))]
             if admission is not None else [],
             switch="PREHEAT_ADMISSION_SPARE_BELOW=0"),
        _row("guests: sessions that would wait run at once, evicted first",
             "admission_guests", settings.admission_guests is not False,
             admission is not None and admission.guests,
             "needs admission, and preheat's own engine or PREHEAT_ADMISSION_GUESTS=1",
             [("guest calls let in", admission.admitted.get("guest", 0)),
              ("guest calls on the engine now", admission.guest_calls),
              (f"engine busy share, last 20 s (guests go in below {admission.guest_busy_below:g})",
               admission.busy_share())]
             if admission is not None and admission.guests else []),
        _row("finished sessions evicted first", "admission_evict_done",
             settings.admission_evict_done, admission is not None and admission.evict_done,
             "needs admission, and an engine that evicts hinted blocks first, as guests do",
             [("last calls sent to be evicted first", admission.last_calls)]
             if admission is not None and admission.evict_done else []),
        _row("hand-offs their idle run waits for go in at once", "admission_handoff",
             settings.admission_handoff, admission is not None and admission.handoff
             and admission.runs is not None, "needs admission and ordering",
             [("hand-offs let in", admission.admitted.get("handoff", 0))]
             if admission is not None and admission.handoff else []),
        _row("engine priority for sessions under way", "admission_priority",
             settings.admission_priority, admission is not None, "needs admission", []),
        _row("least work left first (workflow runs)", "ordering", settings.ordering,
             admission is not None and admission.runs is not None, "needs admission",
             [("workflow runs under way", len(admission.runs)),
              ("calls that waited for a run with less left", admission.held_for_smaller)]
             if admission is not None and admission.runs is not None else []),
        _row("prompt cache", "prompt_cache", settings.prompt_cache, cache is not None, "",
             _prompt_cache(cache) if cache is not None else []),
        _row("pre-warming", "prewarm", settings.prewarm, planner is not None,
             "needs admission and learning", _prewarm(planner) if planner is not None else []),
    ]


def _row(name: str, setting: str, on: bool, active: bool, needs: str,
         figures: list[tuple[str, Any]], switch: str = "") -> dict[str, Any]:
    state = "on" if on and active else "off" if not on else f"inactive ({needs})"
    return {"name": name, "switch": switch or f"--no-{setting.replace('_', '-')} / PREHEAT_"
            f"{setting.upper()}", "state": state,
            "figures": [[label, value] for label, value in figures]}


def _or_dash(value: Any) -> Any:
    return "-" if value is None else value


def _admission(admission: Any, waits: Any) -> list[tuple[str, Any]]:
    stats = admission.stats()
    admitted = stats.admitted
    held = "-"
    if waits is not None and waits.n:
        waited = waits.n - waits.counts[0]
        held = f"{waited} of {waits.n}"
        if waited:
            p50, p90 = (waits.at_most(q) for q in (0.5, 0.9))
            held += f" (half within {p50:g} s, 90% within {p90:g} s)"
    return [
        ("KV cache (tokens)", stats.capacity_tokens),
        ("sessions resident", stats.resident_groups),
        ("their tokens (estimated)", stats.resident_tokens),
        ("calls waiting", stats.waiting),
        (f"calls held over {WAIT_BUCKETS[0] * 1000:g} ms", held),
        ("longest wait (s)", round(stats.max_wait_seen, 2)),
        ("calls let in", ", ".join(f"{how} {n}" for how, n in sorted(
            admitted.items(), key=lambda item: -item[1])) or "none yet"),
    ]


def _prompt_cache(cache: Any) -> list[tuple[str, Any]]:
    return [("hits", cache.hits), ("misses", cache.misses), ("entries", len(cache)),
            ("bytes held", cache.bytes)]


def _prewarm(planner: Any) -> list[tuple[str, Any]]:
    s = planner.stats()
    sent = s.sent + s.static_sent
    judged = s.hit_tokens + s.wasted_tokens
    return [
        ("warms sent (of them static heads)", f"{sent} ({s.static_sent})"),
        ("tokens warmed", s.warmed_tokens + s.static_tokens),
        ("warms later hit / in vain", f"{s.hit} / {s.wasted}"),
        ("warmed tokens later hit / in vain", f"{s.hit_tokens} / {s.wasted_tokens}"),
        ("precision", f"{s.hit_tokens / judged:.2f}" if judged else "-"),
        ("skipped: engine busy / unlikely / late", f"{s.skipped_busy} / {s.skipped_unlikely}"
                                                   f" / {s.skipped_late}"),
    ]
