"""Retention: captures older than `retain_days` leave the store, a little at a time.

The store's single writer (the observer process) calls `Retention.step()` between batches.
Every `EVERY` seconds a pass begins, and each step works about `BUDGET` seconds of it (it ends
with the transaction under way: 99 steps in 100 under 100 ms, measured while deleting 140k of
200k exchanges), so a live capture waits no longer behind it. A pass with nothing to delete
costs 3 ms.

1. `expire()`: exchanges made and stored before the cutoff (an import dated last year is kept
   as long as a capture made the day it was imported), `EXCHANGES_AT_ONCE` per transaction,
   with the sessions they leave: a session with no exchange left is deleted, the others keep
   a true count and first time.
2. Messages are content-addressed and shared between exchanges, with no count of who refers
   to them (keeping one would rewrite every message of a session's history on each call).
   At most every `MESSAGES_EVERY` s, after a pass that deleted exchanges, one read in a
   worker thread finds those no exchange refers to (`unreferenced()`: an anti-join over
   every prompt's hashes, 2-3 s for 200k exchanges and 320k messages on SQLite, 2.7 s for
   200k and 400k on PostgreSQL, off the writer's thread); `forget()` deletes them
   `MESSAGES_AT_ONCE` at a time, each delete checking again against the exchanges stored
   since the read began (`MARGIN` before, for an import whose write waited on the lock), so
   a message a new call refers to is never lost.
3. `release()`: a SQLite store made with `auto_vacuum=INCREMENTAL` (every store this preheat
   creates) gives its free pages back to the file system, `PAGES_AT_ONCE` at a time. An older
   store keeps its size and reuses the free pages for new captures: it stops growing instead
   of shrinking, until it is vacuumed with the server stopped (README: Configuration).

Learned snapshots (`storage/learned.py`) are never touched.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from sqlalchemy import bindparam, delete, func, select, text, update

from storage.models import ExchangeRow, Session
from storage.store import Store

log = logging.getLogger("preheat.retention")

EVERY = 300.0
"""Seconds between passes."""
MESSAGES_EVERY = 3600.0
"""Least seconds between two searches for messages no exchange refers to."""
BUDGET = 0.05
"""Seconds one step works (its last transaction ends after)."""
EXCHANGES_AT_ONCE = 500
MESSAGES_AT_ONCE = 1000
MESSAGES_FOUND = 500_000
"""Most unreferenced messages one search hands back; the next search finds the rest."""
PAGES_AT_ONCE = 256
MARGIN = 120.0
"""Seconds before a search began whose stored exchanges are checked again before a delete:
a write is stamped before it waits (up to 30 s) for the lock."""


class Expired(NamedTuple):
    found: int
    """Old exchanges found: fewer than the limit, and the pass has found them all."""
    exchanges: int
    """Of those, deleted by this pass (another server's pass may have been first)."""
    sessions: int


def expire(store: Store, cutoff: float, limit: int = EXCHANGES_AT_ONCE) -> Expired:
    """Delete up to `limit` exchanges made and stored before `cutoff` (epoch seconds), and
    the sessions they leave empty; the sessions they leave not empty are counted again."""
    ex = ExchangeRow
    old = ex.started_at < cutoff
    with store.engine.begin() as conn:
        found = conn.execute(select(ex.id, ex.session_id)
                             .where(ex.stored_at < cutoff, old).limit(limit)).all()
        if len(found) < limit:  # rows from before `stored_at` was kept
            found += conn.execute(select(ex.id, ex.session_id)
                                  .where(ex.stored_at.is_(None), old)
                                  .limit(limit - len(found))).all()
        if not found:
            return Expired(0, 0, 0)
        deleted = conn.execute(delete(ex).where(ex.id.in_([r.id for r in found]))).rowcount
        touched = list({r.session_id for r in found if r.session_id is not None})
        left = conn.execute(select(ex.session_id, func.count(), func.min(ex.started_at))
                            .where(ex.session_id.in_(touched)).group_by(ex.session_id)).all()
        empty = set(touched) - {sid for sid, _, _ in left}
        gone = 0
        if empty:
            gone = conn.execute(delete(Session).where(Session.id.in_(empty))).rowcount
        if left:
            s = Session.__table__
            conn.execute(update(s).where(s.c.id == bindparam("sid"))
                         .values(exchanges=bindparam("n"), first_at=bindparam("first")),
                         [{"sid": sid, "n": n, "first": first} for sid, n, first in left])
    return Expired(len(found), deleted, gone)


def _references(dialect: str, since: bool) -> str:
    """SQL for every message hash an exchange refers to (stored since `:since`, if `since`)."""
    # A request without a prompt list (a completion's prompt, a body that did not parse) has
    # JSON null for `message_hashes`, not SQL NULL; one NULL among the references would make
    # NOT IN true of no message.
    recent = " AND stored_at >= :since" if since else ""
    if dialect == "postgresql":
        prompts = (f"SELECT json_array_elements_text(message_hashes) FROM exchanges"
                   f" WHERE json_typeof(message_hashes) = 'array'{recent}")
    else:
        prompts = (f"SELECT j.value FROM exchanges, json_each(exchanges.message_hashes) AS j"
                   f" WHERE j.value IS NOT NULL{recent}")
    return (f"{prompts} UNION ALL SELECT answer_hash FROM exchanges"
            f" WHERE answer_hash IS NOT NULL{recent}")


def _unreferenced(dialect: str, since: bool) -> str:
    """SQL condition: no exchange (stored since `:since`, if `since`) refers to the message."""
    references = _references(dialect, since)
    if dialect == "postgresql":
        # NOT IN over a subquery larger than work_mem is a nested loop there: 400k messages
        # against 2.2M references ran for over ten minutes; this is a hash anti-join.
        return f"NOT EXISTS (SELECT 1 FROM ({references}) AS r(h) WHERE r.h = messages.hash)"
    return f"hash NOT IN ({references})"  # SQLite builds an index of the subquery once


def unreferenced(store: Store, limit: int = MESSAGES_FOUND) -> list[str]:
    """Hashes of up to `limit` messages that no exchange refers to. Only reads: call it from
    any thread."""
    sql = (f"SELECT hash FROM messages WHERE"
           f" {_unreferenced(store.engine.dialect.name, False)} LIMIT :limit")
    with store.engine.connect() as conn:
        return list(conn.execute(text(sql), {"limit": limit}).scalars())


def forget(store: Store, hashes: list[str], since: float) -> int:
    """Delete the messages `hashes` (found by `unreferenced()`) but those that exchanges
    stored since `since` refer to; the writer's thread. How many were deleted."""
    sql = (f"DELETE FROM messages WHERE hash IN :hashes AND"
           f" {_unreferenced(store.engine.dialect.name, True)}")
    stmt = text(sql).bindparams(bindparam("hashes", expanding=True))
    with store.engine.begin() as conn:
        return conn.execute(stmt, {"hashes": hashes, "since": since}).rowcount


def incremental(store: Store) -> bool:
    """Whether the store gives freed pages back to the file system (`release()`)."""
    if store.engine.dialect.name != "sqlite":
        return False
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2


def release(store: Store, pages: int = PAGES_AT_ONCE) -> tuple[int, int]:
    """Give up to `pages` free pages back to the file system: (pages given, pages left)."""
    with store.engine.connect() as conn:
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
        # sqlite3's execute() runs this pragma one page at a time; executescript runs it whole.
        conn.connection.driver_connection.executescript(f"PRAGMA incremental_vacuum({pages})")
        left = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
    return free - left, left


class Retention:
    """When and how much: a pass every `every` s, about `budget` s of work a step.

    What it deleted so far is in `deleted` (exchanges, sessions, messages, pages)."""

    def __init__(self, store: Store, days: float, every: float = EVERY,
                 messages_every: float = MESSAGES_EVERY, budget: float = BUDGET) -> None:
        self.store = store
        self.keep = days * 86400.0
        self.every, self.messages_every, self.budget = every, messages_every, budget
        self.deleted = dict.fromkeys(("exchanges", "sessions", "messages", "pages"), 0)
        self._pass = dict(self.deleted)
        self._incremental = incremental(store)
        self._next_pass = self._next_search = -float("inf")
        self._cutoff: float | None = None
        self._expired = False  # exchanges deleted since the last search for messages
        self._search: Future[list[str]] | None = None
        self._since = 0.0
        self._orphans: list[str] = []
        self._releasing = False
        self._pool: ThreadPoolExecutor | None = None

    @property
    def busy(self) -> bool:
        """A pass is under way."""
        return (self._cutoff is not None or self._search is not None or bool(self._orphans)
                or self._releasing)

    def step(self, now: float | None = None) -> None:
        """Work on the pass under way (or begin one, when due) for about `budget` s."""
        now = time.monotonic() if now is None else now
        if not self.busy:
            if now < self._next_pass:
                return
            self._next_pass = now + self.every
            self._cutoff = time.time() - self.keep
        deadline = time.monotonic() + self.budget
        while time.monotonic() < deadline:
            if self._cutoff is not None:
                done = expire(self.store, self._cutoff)
                self._count(exchanges=done.exchanges, sessions=done.sessions)
                self._expired |= done.exchanges > 0
                if done.found < EXCHANGES_AT_ONCE:
                    self._cutoff = None
                    self._releasing = self._incremental and self._expired
                    if self._expired and now >= self._next_search:
                        self._begin_search(now)
            elif self._search is not None:
                if not self._search.done():
                    return
                search, self._search = self._search, None
                self._orphans = search.result()
                if len(self._orphans) >= MESSAGES_FOUND:  # the rest at the next pass
                    self._expired, self._next_search = True, -float("inf")
            elif self._orphans:
                batch = self._orphans[-MESSAGES_AT_ONCE:]
                del self._orphans[-MESSAGES_AT_ONCE:]
                self._count(messages=forget(self.store, batch, self._since))
            elif self._releasing:
                given, left = release(self.store)
                self._count(pages=given)
                self._releasing = left > 0 and given > 0
            else:
                self._report()
                return

    def _begin_search(self, now: float) -> None:
        self._expired, self._next_search = False, now + self.messages_every
        self._since = time.time() - MARGIN
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="preheat-retention")
        self._search = self._pool.submit(unreferenced, self.store)

    def _count(self, **n: int) -> None:
        for k, v in n.items():
            self.deleted[k] += v
            self._pass[k] += v

    def _report(self) -> None:
        if any(self._pass.values()):
            log.info("retention (%g days): deleted %d exchanges, %d sessions, %d messages; "
                     "%d free pages given back", self.keep / 86400, *self._pass.values())
            self._pass = dict.fromkeys(self.deleted, 0)

    def abandon(self) -> None:
        """Give up the pass under way (after an error); the next begins on time."""
        if self._search is not None:
            self._search.cancel()
        self._cutoff, self._search, self._orphans, self._releasing = None, None, [], False
        self._expired = True

    def close(self) -> None:
        """Wait for a search under way to end (it only reads)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
