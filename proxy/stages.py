"""The stage pipeline: small classes with hook methods, run for every proxied call.

Hooks, in the order a call meets them:
    request(ex)  before forwarding; may return a `Reply` to answer without the upstream
                 (a cache hit is just that)
    done(ex)     after the call ended, successfully or not; must return quickly and push
                 any real work off the hot path

A failing hook is logged and skipped (mitmproxy's safecall): a stage never breaks a call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.exchange import Exchange

if TYPE_CHECKING:
    from proxy.cache import PromptCache
    from proxy.metrics import Metrics
    from proxy.observer_process import ObserverProcess

log = logging.getLogger("preheat.stages")


@dataclass
class Reply:
    """A response produced by a stage instead of the upstream."""

    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes] = field(default_factory=list)


class Stage:
    name = "stage"

    def request(self, ex: Exchange) -> Reply | None:
        return None

    def done(self, ex: Exchange) -> None:
        return None


class Pipeline:
    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.failures = 0

    def request(self, ex: Exchange) -> Reply | None:
        for stage in self.stages:
            try:
                reply = stage.request(ex)
            except Exception:
                self._failed(stage, "request")
                continue
            if reply is not None:
                return reply
        return None

    def done(self, ex: Exchange) -> None:
        for stage in self.stages:
            try:
                stage.done(ex)
            except Exception:
                self._failed(stage, "done")

    def _failed(self, stage: Stage, hook: str) -> None:
        self.failures += 1
        log.exception("stage %s failed in %s; the call goes on without it", stage.name, hook)


class MetricsStage(Stage):
    name = "metrics"

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def done(self, ex: Exchange) -> None:
        self.metrics.observe(ex)


class CaptureStage(Stage):
    """Hands finished exchanges on captured routes to the observer process."""

    name = "capture"

    def __init__(self, observer: "ObserverProcess") -> None:
        self.observer = observer

    def done(self, ex: Exchange) -> None:
        if ex.captured:
            self.observer.submit(ex)


def default_stages(
    metrics: "Metrics", observer: "ObserverProcess | None", cache: "PromptCache | None" = None
) -> list[Stage]:
    stages: list[Stage] = [MetricsStage(metrics)]
    if cache is not None:
        from proxy.cache import PromptCacheStage

        stages.insert(0, PromptCacheStage(cache))
    if observer is not None:
        stages.append(CaptureStage(observer))
    return stages
