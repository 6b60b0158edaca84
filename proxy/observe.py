"""The observer: everything that happens to an exchange after its call, off the hot path.

One background thread takes finished exchanges from a bounded queue, analyses them (parse
the body, reassemble the stream), assigns tenant and session, writes them to the store in
batches (it is the store's single writer), then feeds the sinks (`learn/`). The event loop
only ever does `submit()`, a non-blocking put. When the queue is full or the store fails,
the call still succeeds and the lost capture is counted, never silent.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from typing import Protocol

from learn.sessions import SessionLinker
from proxy.exchange import Exchange
from storage.store import Store

log = logging.getLogger("preheat.observe")

_STOP = object()
BATCH = 256


class Sink(Protocol):
    def observe(self, ex: Exchange) -> object: ...


def tenant_of(ex: Exchange, key: bytes) -> str | None:
    """A keyed hash of the caller's API key; the key itself is never kept."""
    secret = ex.api_key
    if not secret:
        return None
    return hashlib.blake2b(secret.encode(), key=key, digest_size=8).hexdigest()


class Observer:
    def __init__(
        self,
        store: Store | None,
        maxsize: int = 10_000,
        linker: SessionLinker | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.store = store
        self.linker = linker or SessionLinker()
        self.sinks: list[Sink] = list(sinks or [])
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.dropped: Counter[str] = Counter()
        self.written = 0
        self._key = store.tenant_key if store is not None else b"preheat"
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="preheat-observer", daemon=True)
        self._closed = False

    def start(self) -> None:
        """Start the writer thread (once; later calls do nothing)."""
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    def submit(self, ex: Exchange) -> bool:
        """Queue a finished exchange. Never blocks; False (and counted) when it was dropped."""
        if self._closed:
            self._drop("closed", 1)
            return False
        try:
            self.queue.put_nowait(ex)
            return True
        except queue.Full:
            self._drop("queue_full", 1)
            return False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def close(self, timeout: float = 60.0) -> None:
        """Stop accepting, write everything already accepted, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            return
        self.queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("capture did not finish writing within %.0f s; %d left", timeout, self.depth)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything submitted so far is written (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self.queue.get()
            batch: list[Exchange] = []
            n_items = 1
            if item is _STOP:
                stop = True
            else:
                batch.append(item)
            while len(batch) < BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                n_items += 1
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)
            try:
                if batch:
                    self._process(batch)
            finally:
                for _ in range(n_items):
                    self.queue.task_done()

    def _process(self, batch: list[Exchange]) -> None:
        for ex in batch:
            try:
                ex.analyze()
                ex.tenant = tenant_of(ex, self._key)
                link = self.linker.link(ex)
                ex.session_id, ex.session_source, ex.parent_id = (
                    link.session_id, link.source, link.parent,
                )
            except Exception:
                log.exception("could not analyse exchange %s; storing it raw", ex.id)
        if self.store is not None:
            try:
                self.store.write(batch)
                self.written += len(batch)
            except Exception as exc:
                self._drop("store_error", len(batch), exc)
        for sink in self.sinks:
            for ex in batch:
                try:
                    sink.observe(ex)
                except Exception:
                    log.exception("sink %r failed on exchange %s", sink, ex.id)

    def _drop(self, reason: str, n: int, exc: Exception | None = None) -> None:
        self.dropped[reason] += n
        now = time.monotonic()
        if now - self._last_warning > 5.0:  # say it, without flooding the log
            self._last_warning = now
            log.warning(
                "dropped %d capture(s): %s%s (total dropped: %d)",
                n, reason, f" ({exc})" if exc else "", sum(self.dropped.values()),
            )
