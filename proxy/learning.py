"""The live learner: `learn/` fed by the observer, its snapshot kept in the store.

The observer calls `observe()` for every finished exchange, in order, in the observer
process (the store's single writer), so learning never touches the proxy's event loop.
Every `save_every` seconds, and on shutdown, the learner's snapshot is saved; at start the
newest one is restored and the learner catches up on what the store holds beyond it
(captures after the last save, imported traces), so templates and workflows survive
restarts. Predictions go to `listeners` (on to the pre-warm planner), each called in order.
The static heads of the agents seen (`learn/heads.py`: the leading messages sessions
share) are learned beside it and saved in the same snapshot, for warming after a restart,
and so is what the proxy's admission learned (session sizes and lengths, tool gaps), which
the proxy sends here and reads back at start.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from learn.heads import StaticHeads
from learn.learner import Learner
from learn.predict import Prediction
from proxy.exchange import Exchange
from storage.learned import load_learned, save_learned
from storage.store import Store

log = logging.getLogger("preheat.learn")
UNTIL_KEY = "preheat_until"
HEADS_KEY = "preheat_heads"
ADMISSION_KEY = "preheat_admission"
"""Admission's own snapshot (`Admission.snapshot`), sent by the proxy, saved alongside."""
IMPORTED_KEY = "preheat_imported"
CATCH_UP_LIMIT = 50_000
IMPORT_WRITES = 4
"""Write batches of an import (500 calls each) learned at a time, between captures."""


class LearnSink:
    def __init__(self, store: Store | None, save_every: float = 60.0, server: str = "") -> None:
        self.store = store
        self.server = server
        """Whose snapshots these are (`storage.learned.server_name`)."""
        self.save_every = save_every
        self.until = 0.0
        """Arrival time of the newest captured exchange learned from."""
        self.imported = 0.0
        """Up to when imported calls were stored whole and learned (`Store.imported`)."""
        self.heads = StaticHeads()
        self.admission: dict | None = None
        """The proxy's admission, as it last sent it (kept through restarts)."""
        self.learner = self._restore()
        self.listeners: list[Callable[[Exchange, list[Prediction]], None]] = []
        self._saved_at = time.monotonic()
        self._unsaved = 0

    def _restore(self) -> Learner:
        if self.store is not None:
            try:
                data = load_learned(self.store, server=self.server)
                if data is not None:
                    self.until = float(data.get(UNTIL_KEY) or 0.0)
                    self.imported = float(data.get(IMPORTED_KEY) or 0.0)
                    self.heads.restore(data.get(HEADS_KEY) or [])
                    self.admission = data.get(ADMISSION_KEY)
                    learner = Learner.restore(data)
                    log.info("restored what was learned from %d calls", learner.observed)
                    return learner
            except Exception:  # a snapshot we cannot read is not worth refusing to start over
                log.exception("could not restore the learned snapshot; learning afresh")
        return Learner()

    def catch_up(self) -> int:
        """Learn from stored exchanges newer than the snapshot (before traffic starts):
        captures after the last save, and what was imported since."""
        if self.store is None:
            return 0
        n = 0
        for ex in self.store.exchanges(since=self.until, imported=False):
            self._learn(ex)
            self.until = max(self.until, ex.started_at)
            n += 1
            if n >= CATCH_UP_LIMIT:
                break
        if n:
            self._unsaved += n
            log.info("learned from %d stored calls", n)
        while self.catch_up_imports():
            pass
        return n

    def catch_up_imports(self, writes: int = IMPORT_WRITES) -> int:
        """Learn from calls `preheat import` stored since the last time (at most `writes` of
        its batches, so that a large import does not hold captures back for long). Imported
        calls are dated in the past, so the captures' `until` cannot find them."""
        if self.store is None:
            return 0
        done = self.store.imported()
        if done <= self.imported:
            return 0
        batches = self.store.import_writes(self.imported, done, writes)
        last = batches[-1] if len(batches) == writes else done
        n = 0
        for ex in self.store.exchanges(imported=True, stored=(self.imported, last)):
            self._learn(ex)
            n += 1
        self.imported = last
        self._unsaved += 1
        if n:
            log.info("learned from %d imported calls", n)
        return n

    def observe(self, ex: Exchange) -> None:
        self.until = max(self.until, ex.started_at)
        predictions = self._learn(ex)
        self._unsaved += 1
        for listener in self.listeners:
            listener(ex, predictions)
        if time.monotonic() - self._saved_at > self.save_every:
            self.save()

    def _learn(self, ex: Exchange) -> list[Prediction]:
        predictions = self.learner.observe(ex)
        self.heads.observe(self.learner.session_of(ex.id), ex.messages, ex.tools, ex.started_at)
        return predictions

    def keep_admission(self, snapshot: dict) -> None:
        """The proxy's admission sent what it has learned: saved with the next snapshot."""
        if snapshot != self.admission:
            self.admission = snapshot
            self._unsaved += 1

    def save(self) -> None:
        """Persist the snapshot."""
        self._saved_at = time.monotonic()
        if self.store is None or not self._unsaved:
            return
        try:
            snapshot = self.learner.snapshot()
            snapshot[UNTIL_KEY] = self.until
            snapshot[IMPORTED_KEY] = self.imported
            snapshot[HEADS_KEY] = self.heads.snapshot()
            if self.admission is not None:
                snapshot[ADMISSION_KEY] = self.admission
            save_learned(self.store, snapshot, server=self.server)
            self._unsaved = 0
        except Exception:
            log.exception("could not save the learned snapshot; will retry")
