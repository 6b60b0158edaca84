"""What the learner knows, kept in the store: versioned snapshots of templates and DAGs.

`Learner.snapshot()` is plain JSON with a format version; this module stores it as one row
per save, marked with the server that saved it (the newest few of each are kept), and hands
back the newest that the asking server or `preheat learn` saved (any server's if neither
did): several servers on one database (PostgreSQL, each with its own engine and agents)
each learn their own traffic. Converting an older version is the learner's job
(`learn.learner.upgrade`, called by `Learner.restore`), so a snapshot saved by any earlier
preheat still loads.

    save_learned(store, learner.snapshot())
    learner = Learner.restore(load_learned(store))

Writes go through the caller's thread: the proxy saves from its single writer thread, the CLI
from its own process (SQLite's busy timeout serialises them).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from sqlalchemy import Float, Integer, String, Text, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from learn.canonical import dumps, loads
from storage.models import Base

KEEP = 3
"""Snapshots kept of each server; its older ones are deleted when it saves."""
FORGET_AFTER = 7 * 86400.0
"""Seconds after which a server's save deletes the snapshots of others (of a server long gone,
or one since renamed)."""


class LearnedSnapshot(Base):
    __tablename__ = "learned"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[int] = mapped_column(Integer)
    """The snapshot's format version (`learn.learner.SNAPSHOT_VERSION` when it was saved)."""
    saved_at: Mapped[float] = mapped_column(Float)
    observed: Mapped[int] = mapped_column(Integer, default=0)
    """Exchanges the learner had learned from."""
    tokenizer: Mapped[str] = mapped_column(String(128), default="")
    server: Mapped[str] = mapped_column(String(128), default="", server_default="")
    """Who saved it (`server_name`); "" for `preheat learn`, which every server may restore."""
    data: Mapped[str] = mapped_column(Text)
    """The snapshot as JSON."""


def _engine(store: Any) -> Engine:
    return store if isinstance(store, Engine) else store.engine


def server_name(port: int, name: str | None = None) -> str:
    """How a server's snapshots are told from others': the name it was given
    (`PREHEAT_SERVER_NAME`), else its host and port."""
    return (name or f"{socket.gethostname()}:{port}")[:128]


def save_learned(store: Any, snapshot: dict, keep: int = KEEP, server: str = "") -> int:
    """Store a snapshot (a `Store` or an SQLAlchemy engine) as `server`'s; returns its row id."""
    now = time.time()
    row = {"version": int(snapshot.get("version", 0)), "saved_at": now,
           "observed": int(snapshot.get("observed", 0)),
           "tokenizer": str(snapshot.get("tokenizer", ""))[:128], "server": server[:128],
           "data": dumps(snapshot)}
    table = LearnedSnapshot.__table__
    with _engine(store).begin() as conn:
        new_id = conn.execute(table.insert().values(**row)).inserted_primary_key[0]
        old = conn.execute(select(table.c.id).where(table.c.server == row["server"])
                           .order_by(table.c.id.desc()).offset(keep)).scalars().all()
        old += conn.execute(select(table.c.id).where(
            table.c.server != row["server"], table.c.saved_at < now - FORGET_AFTER)).scalars().all()
        if old:
            conn.execute(delete(table).where(table.c.id.in_(old)))
    return int(new_id)


def load_learned(store: Any, snapshot_id: int | None = None,
                 server: str | None = None) -> dict | None:
    """The snapshot with `snapshot_id`, or else the newest that `server` or `preheat learn`
    saved, or else the newest of all (`server` None: the newest of all), as saved; None if
    there is none."""
    table = LearnedSnapshot.__table__
    newest = select(table.c.data).order_by(table.c.id.desc()).limit(1)
    with _engine(store).connect() as conn:
        if snapshot_id is not None:
            data = conn.execute(select(table.c.data).where(table.c.id == snapshot_id)).scalar()
        else:
            data = None
            if server is not None:
                data = conn.execute(newest.where(table.c.server.in_([server, ""]))).scalar()
            if data is None:
                data = conn.execute(newest).scalar()
    return None if data is None else loads(data)


def learned_history(store: Any) -> list[dict]:
    """The kept snapshots, newest first: id, version, saved_at, observed, tokenizer, server."""
    table = LearnedSnapshot.__table__
    cols = [table.c.id, table.c.version, table.c.saved_at, table.c.observed, table.c.tokenizer,
            table.c.server]
    with _engine(store).connect() as conn:
        rows = conn.execute(select(*cols).order_by(table.c.id.desc())).all()
    return [dict(r._mapping) for r in rows]
