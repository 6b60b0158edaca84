"""What the learner knows, kept in the store: versioned snapshots of templates and DAGs.

`Learner.snapshot()` is plain JSON with a format version; this module stores it as one row
per save (the newest few are kept) and hands back the newest. Converting an older version is
the learner's job (`learn.learner.upgrade`, called by `Learner.restore`), so a snapshot saved
by any earlier preheat still loads.

    save_learned(store, learner.snapshot())
    learner = Learner.restore(load_learned(store))

Writes go through the caller's thread: the proxy saves from its single writer thread, the CLI
from its own process (SQLite's busy timeout serialises them).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Float, Integer, String, Text, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from learn.canonical import dumps, loads
from storage.models import Base

KEEP = 3
"""Snapshots kept; older ones are deleted on save."""


class LearnedSnapshot(Base):
    __tablename__ = "learned"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer)
    """The snapshot's format version (`learn.learner.SNAPSHOT_VERSION` when it was saved)."""
    saved_at: Mapped[float] = mapped_column(Float)
    observed: Mapped[int] = mapped_column(Integer, default=0)
    """Exchanges the learner had learned from."""
    tokenizer: Mapped[str] = mapped_column(String(128), default="")
    data: Mapped[str] = mapped_column(Text)
    """The snapshot as JSON."""


def _engine(store: Any) -> Engine:
    return store if isinstance(store, Engine) else store.engine


def save_learned(store: Any, snapshot: dict, keep: int = KEEP) -> int:
    """Store a snapshot (a `Store` or an SQLAlchemy engine); returns its row id."""
    row = {"version": int(snapshot.get("version", 0)), "saved_at": time.time(),
           "observed": int(snapshot.get("observed", 0)),
           "tokenizer": str(snapshot.get("tokenizer", ""))[:128], "data": dumps(snapshot)}
    table = LearnedSnapshot.__table__
    with _engine(store).begin() as conn:
        new_id = conn.execute(table.insert().values(**row)).inserted_primary_key[0]
        old = conn.execute(select(table.c.id).order_by(table.c.id.desc()).offset(keep)).scalars().all()
        if old:
            conn.execute(delete(table).where(table.c.id.in_(old)))
    return int(new_id)


def load_learned(store: Any, snapshot_id: int | None = None) -> dict | None:
    """The newest snapshot (or the one with `snapshot_id`) as saved, or None if there is none."""
    table = LearnedSnapshot.__table__
    query = select(table.c.data)
    query = query.where(table.c.id == snapshot_id) if snapshot_id is not None else \
        query.order_by(table.c.id.desc()).limit(1)
    with _engine(store).connect() as conn:
        data = conn.execute(query).scalar()
    return None if data is None else loads(data)


def learned_history(store: Any) -> list[dict]:
    """The kept snapshots, newest first: id, version, saved_at, observed, tokenizer."""
    table = LearnedSnapshot.__table__
    cols = [table.c.id, table.c.version, table.c.saved_at, table.c.observed, table.c.tokenizer]
    with _engine(store).connect() as conn:
        rows = conn.execute(select(*cols).order_by(table.c.id.desc())).all()
    return [dict(r._mapping) for r in rows]
