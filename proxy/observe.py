"""The observer: everything that happens to an exchange after its call, off the hot path.

`Observer.process()` takes a batch of finished exchanges, analyses them (parse the body,
reassemble the stream), assigns tenant and session (hashing each message once: the keys ride
on the exchange to the sinks, whose own linkers reuse them), writes them to the store in one
transaction (it is the store's single writer), then feeds the sinks (`learn/`). It runs in
the observer process (proxy/observer_process.py), never in the proxy's: the proxy only
hands over raw bytes and timings. When the batch's transaction fails, its exchanges are
written one by one, so a capture the store refuses loses only itself: counted in `dropped`,
never silent, and never failing a call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Protocol

from learn.canonical import message_key
from learn.sessions import SessionLinker
from proxy.exchange import Exchange
from storage.store import Store

log = logging.getLogger("preheat.observe")


class Sink(Protocol):
    def observe(self, ex: Exchange) -> object: ...


def tenant_of(ex: Exchange, key: bytes) -> str | None:
    """A keyed hash of the caller's API key; the key itself is never kept."""
    secret = ex.api_key
    if not secret:
        return None
    return hashlib.blake2b(secret.encode(), key=key, digest_size=8).hexdigest()


class Drops(Counter):
    """Captures lost, by reason. Every loss is logged, at most once every 5 s."""

    _last_warning = 0.0

    def add(self, reason: str, n: int, exc: BaseException | None = None) -> None:
        self[reason] += n
        now = time.monotonic()
        if now - self._last_warning > 5.0:
            self._last_warning = now
            log.warning(
                "dropped %d capture(s): %s%s (total dropped: %d)",
                n, reason, f" ({exc})" if exc else "", sum(self.values()),
            )


class Observer:
    def __init__(
        self,
        store: Store | None,
        linker: SessionLinker | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.store = store
        self.linker = linker or SessionLinker()
        self.sinks: list[Sink] = list(sinks or [])
        self.dropped = Drops()
        self.written = 0
        self._key = store.tenant_key if store is not None else b"preheat"

    def process(self, batch: list[Exchange]) -> None:
        """Analyse, link, store and learn from `batch`, in order. Never raises."""
        for ex in batch:
            try:
                ex.analyze()
                ex.tenant = tenant_of(ex, self._key)
                # Hashed once here; the sinks (the learner's own linker) read them off `ex`.
                keys = [message_key(m) for m in ex.messages]
                answer_key = message_key(ex.answer) if ex.answer is not None else None
                ex.message_keys, ex.answer_key = keys, answer_key
                link = self.linker.link_keys(ex, keys, answer_key)
                ex.session_id, ex.session_source, ex.parent_id = (
                    link.session_id, link.source, link.parent,
                )
            except Exception:
                log.exception("could not analyse exchange %s; storing it raw", ex.id)
        if self.store is not None:
            try:
                self.store.write(batch)
                self.written += len(batch)
            except Exception:
                for ex in batch:  # one bad capture must not take the others with it
                    try:
                        self.store.write([ex])
                        self.written += 1
                    except Exception as exc:
                        self.dropped.add("store_error", 1, exc)
        for sink in self.sinks:
            for ex in batch:
                try:
                    sink.observe(ex)
                except Exception:
                    log.exception("sink %r failed on exchange %s", sink, ex.id)
