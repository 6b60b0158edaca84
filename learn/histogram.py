"""A small sparse histogram of seconds, for gap and duration distributions.

Buckets grow geometrically by 20% from 10 ms up (anything shorter shares one bucket), so any
quantile is within ~10% whatever the scale, from a 50 ms tool call to an hour's wait. Only
buckets in use are stored, each with its count and sum: a gap that is always 2.0 s reports
2.0 s, and an edge's typical distribution costs a handful of entries. Mergeable, serialisable.
"""

from __future__ import annotations

import math

_BASE = 0.01
_RATIO = 1.2
_LOG = math.log(_RATIO)


def _bucket(x: float) -> int:
    return 0 if x < _BASE else 1 + int(math.log(x / _BASE) / _LOG)


class Histogram:
    __slots__ = ("buckets", "n", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, list[float]] = {}
        """bucket -> [count, sum of values]"""
        self.n = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        x = min(max(float(seconds), 0.0), 1e7)
        slot = self.buckets.setdefault(_bucket(x), [0, 0.0])
        slot[0] += 1
        slot[1] += x
        self.n += 1
        self.total += x

    def merge(self, other: "Histogram") -> None:
        for b, (count, total) in other.buckets.items():
            slot = self.buckets.setdefault(b, [0, 0.0])
            slot[0] += count
            slot[1] += total
        self.n += other.n
        self.total += other.total

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def quantile(self, q: float) -> float:
        """The mean of the bucket holding the q-th value (0 when empty)."""
        if not self.n:
            return 0.0
        want, seen = q * self.n, 0
        for b in sorted(self.buckets):
            count, total = self.buckets[b]
            seen += count
            if seen >= want:
                return total / count
        return self.total / self.n

    def to_json(self) -> dict:
        return {"buckets": {str(b): [c, t] for b, (c, t) in sorted(self.buckets.items())}}

    @classmethod
    def from_json(cls, data: dict | None) -> "Histogram":
        h = cls()
        for b, (count, total) in (data or {}).get("buckets", {}).items():
            h.buckets[int(b)] = [int(count), float(total)]
            h.n += int(count)
            h.total += float(total)
        return h
