"""Prometheus metrics, rendered in the text exposition format at GET /metrics."""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any, Callable

from proxy.exchange import CAPTURED_PATHS, Exchange

KNOWN_ROUTES = CAPTURED_PATHS + ("/v1/embeddings", "/v1/models")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Admission's waits: none without pressure, seconds under it, at most its bound (60 s by
default, PREHEAT_ADMISSION_MAX_WAIT)."""


class Histogram:
    """A Prometheus histogram: counts per upper bound, their sum and number."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1

    def at_most(self, q: float) -> float | None:
        """The least bucket bound that at least a share `q` of the values are within (inf:
        past the last bound; None: no value yet)."""
        if not self.n:
            return None
        cumulative = 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += n
            if cumulative >= q * self.n:
                return bound
        return float("inf")

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        return out + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.n}"]


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = Histogram(
            "preheat_added_latency_seconds",
            "Time the proxy added to a call (admission's hold apart: "
            "preheat_admission_wait_seconds).", LATENCY_BUCKETS)
        self.waits: Histogram | None = None
        """Admission's waits, where admission runs (`count_admission_waits`)."""
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, str | None, Callable[[], Any]]] = {}

    def observe(self, ex: Exchange) -> None:
        route = ex.path if ex.path in KNOWN_ROUTES else "other"
        self.requests[(route, str(ex.status or 0))] += 1
        if ex.error_type:
            self.errors[ex.error_type] += 1
        if ex.added_latency is not None:
            self.latency.observe(ex.added_latency)
        ticket = ex.ticket
        if self.waits is not None and ticket is not None and ticket.admitted is not None:
            self.waits.observe(ticket.waited)

    def count_admission_waits(self) -> None:
        """Admission runs: show how long it held the calls it let go (0 for those it let go
        at once; calls whose client gave up waiting are not counted)."""
        self.waits = Histogram(
            "preheat_admission_wait_seconds",
            "Time calls waited for admission before going to the engine.", WAIT_BUCKETS)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help, read)

    def counter(
        self, name: str, help: str, read: Callable[[], dict[str, float] | float],
        label: str | None = "reason",
    ) -> None:
        """A counter family read at render time: {value of `label`: count}, or one count
        (`label` None)."""
        self.counters[name] = (help, label, read)

    def render(self) -> str:
        out = [
            "# HELP preheat_requests_total Proxied requests by route and status.",
            "# TYPE preheat_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'preheat_requests_total{{route="{route}",status="{status}"}} {n}')
        out += ["# HELP preheat_errors_total Requests that failed in the proxy, by error type.",
                "# TYPE preheat_errors_total counter"]
        for kind, n in sorted(self.errors.items()):
            out.append(f'preheat_errors_total{{type="{kind}"}} {n}')
        out += self.latency.render()
        if self.waits is not None:
            out += self.waits.render()
        for name, (help, read) in sorted(self.gauges.items()):
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {read()}"]
        for name, (help, label, read) in sorted(self.counters.items()):
            out += [f"# HELP {name} {help}", f"# TYPE {name} counter"]
            counts = read()
            if label is None:
                out.append(f"{name} {counts}")
                continue
            for value, n in sorted(counts.items()):
                out.append(f'{name}{{{label}="{value}"}} {n}')
        return "\n".join(out) + "\n"
