"""Prometheus metrics, rendered in the text exposition format at GET /metrics."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from proxy.exchange import CAPTURED_PATHS, Exchange

KNOWN_ROUTES = CAPTURED_PATHS + ("/v1/embeddings", "/v1/models")
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, str | None, Callable[[], Any]]] = {}

    def observe(self, ex: Exchange) -> None:
        route = ex.path if ex.path in KNOWN_ROUTES else "other"
        self.requests[(route, str(ex.status or 0))] += 1
        if ex.error_type:
            self.errors[ex.error_type] += 1
        if ex.added_latency is not None:
            i = 0
            while i < len(LATENCY_BUCKETS) and ex.added_latency > LATENCY_BUCKETS[i]:
                i += 1
            self.latency_counts[i] += 1
            self.latency_sum += ex.added_latency
            self.latency_n += 1

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
        out += ["# HELP preheat_added_latency_seconds Time the proxy added to a call "
                "(admission's hold apart: preheat_admission_wait_seconds_max).",
                "# TYPE preheat_added_latency_seconds histogram"]
        cumulative = 0
        for bound, n in zip(LATENCY_BUCKETS + (float("inf"),), self.latency_counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'preheat_added_latency_seconds_bucket{{le="{le}"}} {cumulative}')
        out.append(f"preheat_added_latency_seconds_sum {self.latency_sum}")
        out.append(f"preheat_added_latency_seconds_count {self.latency_n}")
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
