"""The live learner: `learn/` fed by the observer thread, its snapshot kept in the store.

The observer calls `observe()` for every finished exchange, in order, on its own thread
(the store's single writer), so learning never touches the event loop. Every `save_every`
seconds, and on shutdown, the learner's snapshot is saved; at start the newest one is
restored, so templates and workflows survive restarts. Predictions go to `listeners`
(the pre-warm planner), each called on the observer thread and expected to hand off fast.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from learn.learner import Learner
from learn.predict import Prediction
from proxy.exchange import Exchange
from storage.learned import load_learned, save_learned
from storage.store import Store

log = logging.getLogger("preheat.learn")


class LearnSink:
    def __init__(self, store: Store | None, save_every: float = 60.0) -> None:
        self.store = store
        self.save_every = save_every
        self.learner = self._restore()
        self.listeners: list[Callable[[Exchange, list[Prediction]], None]] = []
        self._saved_at = time.monotonic()
        self._unsaved = 0

    def _restore(self) -> Learner:
        if self.store is not None:
            try:
                data = load_learned(self.store)
                if data is not None:
                    learner = Learner.restore(data)
                    log.info("restored what was learned from %d calls", learner.observed)
                    return learner
            except Exception:  # a snapshot we cannot read is not worth refusing to start over
                log.exception("could not restore the learned snapshot; learning afresh")
        return Learner()

    def observe(self, ex: Exchange) -> None:
        predictions = self.learner.observe(ex)
        self._unsaved += 1
        for listener in self.listeners:
            listener(ex, predictions)
        if time.monotonic() - self._saved_at > self.save_every:
            self.save()

    def save(self) -> None:
        """Persist the snapshot (observer thread, or after it stopped)."""
        self._saved_at = time.monotonic()
        if self.store is None or not self._unsaved:
            return
        try:
            save_learned(self.store, self.learner.snapshot())
            self._unsaved = 0
        except Exception:
            log.exception("could not save the learned snapshot; will retry")
