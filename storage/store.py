"""The capture store: one writer, many readers.

`Store.write()` is synchronous and is called from a single writer thread only (the proxy's
observer; see proxy/observe.py), so writes never block the event loop and SQLite never sees
two writers. Readers (CLI, admin page) open their own `Store` or call the read methods from a
worker thread. Stored rows convert back into `Exchange` objects: `load()` knows every
`EXCHANGE_VERSION` that was ever written.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import socket
import time
from typing import Iterator, Sequence

import xxhash
from sqlalchemy import String, Table, create_engine, delete, event, func, inspect, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session as OrmSession

from learn.canonical import canonical_json, content_hash, dumps, loads
from proxy.exchange import EXCHANGE_VERSION, Exchange
from storage.models import KEPT_HEADERS, Base, ExchangeRow, Message, Meta, Session
import storage.learned  # registers its tables


IMPORTED_KEY = "imported"
IMPORTED_SOURCE = "import:"
"""How an imported call's `session_source` begins (`proxy/importer.py`)."""
IMPORTING_KEY = "importing:"
"""Meta keys of imports writing now (`begin_import`), one per import."""
IMPORT_STALE = 120.0
"""An import that has not written for this long was killed: it holds nothing back."""
SERVING_KEY = "serving"
"""Meta keys of servers writing here begin with this, one key per server (`mark_serving`);
a preheat before 2026-12-06 wrote this key itself."""
SERVING_BEAT = 10.0
SERVING_STALE = 45.0


def _serving_mark(value: str, now: float) -> dict | None:
    """A server's mark (`Store.mark_serving`) if it is understood and fresh, else None."""
    try:
        mark = json.loads(value)
        fresh = now - float(mark["beat"]) < SERVING_STALE
    except (ValueError, KeyError, TypeError):
        return None
    return mark if fresh else None


def _import_mark(value: str) -> tuple[float, float] | None:
    """When the import of a mark (`begin_import`) began and last wrote; None for a mark not
    understood."""
    try:
        mark = json.loads(value)
        return float(mark["began"]), float(mark["beat"])
    except (ValueError, KeyError, TypeError):
        return None


class StoreError(Exception):
    """The store could not be opened or written; the message says why."""


SCHEMA_LOCK = 0x70726568656174
"""PostgreSQL advisory lock held while a store's tables are made or altered ("preheat")."""


def _make_schema(engine: Engine) -> None:
    """Make the tables a store lacks, and the columns added since it was made (create_all
    makes missing tables only). On PostgreSQL, servers that start together on one new
    database take turns, or the second would fail to create what the first just did."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        Base.metadata.create_all(conn)
        have = {c["name"] for c in inspect(conn).get_columns(ExchangeRow.__tablename__)}
        if "stored_at" not in have:
            conn.exec_driver_sql("ALTER TABLE exchanges ADD COLUMN stored_at FLOAT")
            conn.exec_driver_sql(
                "CREATE INDEX IF NOT EXISTS ix_exchanges_stored ON exchanges (stored_at)")
        learned = storage.learned.LearnedSnapshot.__tablename__
        if "server" not in {c["name"] for c in inspect(conn).get_columns(learned)}:
            conn.exec_driver_sql(
                f"ALTER TABLE {learned} ADD COLUMN server VARCHAR(128) NOT NULL DEFAULT ''")


def imported_clause():
    """SQL condition: the exchange was imported (`preheat import`), not captured."""
    return ExchangeRow.session_source.startswith(IMPORTED_SOURCE, autoescape=True)


def captured_clause():
    """SQL condition: the exchange was captured from traffic, not imported."""
    return ~imported_clause() | ExchangeRow.session_source.is_(None)


def store_url(url: str) -> str:
    """A database URL, or a plain file path taken as a SQLite file (`--db data/preheat.db`).
    A PostgreSQL URL without a driver (`postgresql://`, `postgres://`) takes psycopg 3, the
    driver preheat installs (`pip install 'preheat[postgres]'`); SQLAlchemy's own default is
    psycopg2."""
    if "://" not in url:
        return f"sqlite:///{url}"
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else url


def _shown(url: str) -> str:
    """A store's URL as printed: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://..."


def _text_limits(table: Table) -> dict[str, int | None]:
    """A table's text columns, each with its length limit (None: unbounded)."""
    return {c.name: c.type.length for c in table.columns if isinstance(c.type, String)}


def _fit_text(value: str, limit: int | None) -> str:
    """`value` as a text column takes it: NUL, which PostgreSQL refuses in text, becomes
    U+FFFD, and a value longer than `limit` (which SQLite ignores and PostgreSQL refuses)
    keeps its head and ends with a hash of the whole, so two long ids stay apart. The same
    value always fits the same way: an exchange and its session agree on a long session id."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if limit is not None and len(value) > limit:
        digest = xxhash.xxh3_64_hexdigest(value.encode("utf-8", "surrogatepass"))
        value = f"{value[:limit - len(digest) - 1]}~{digest}"
    return value


def _fit_row(row: dict, limits: dict[str, int | None]) -> dict:
    for name, limit in limits.items():
        value = row.get(name)
        if isinstance(value, str):
            row[name] = _fit_text(value, limit)
    return row


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql+psycopg:"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError("a PostgreSQL store needs psycopg 3: pip install "
                             "'preheat[postgres]' (or psycopg[binary])") from None
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30},
            json_serializer=dumps, json_deserializer=loads,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers never wait for the writer
            cur = dbapi_conn.cursor()
            # Takes only in a new file (before WAL writes its header; an existing store keeps
            # its mode): retention gives the pages it frees back (storage/retention.py).
            cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, json_serializer=dumps, json_deserializer=loads)


class Store:
    def __init__(self, url: str) -> None:
        self.url = url = store_url(url)
        self._serving_key: str | None = None
        try:
            self.engine = make_engine(url)
            _make_schema(self.engine)
            # Built once: SQLAlchemy rebuilds a statement's columns each time it is made.
            self._insert_messages = _insert_ignore(Message, self.engine)
            self._upsert_sessions = _upsert_sessions(self.engine)
            self._tenant_key = self._meta_value("tenant_key", lambda: secrets.token_hex(32))
            self._meta_value("schema_version", lambda: str(EXCHANGE_VERSION))
        except Exception as exc:
            raise StoreError(f"cannot open the store at {_shown(url)}: {exc}") from exc

    @property
    def tenant_key(self) -> bytes:
        """The key of the keyed hash that turns an API key into a tenant id."""
        return bytes.fromhex(self._tenant_key)

    def close(self) -> None:
        self.engine.dispose()

    # -- who serves from this store ---------------------------------------------------------

    def mark_serving(self, learning: bool) -> None:
        """Say (again) that a `preheat serve` writes here: called at start and every
        `SERVING_BEAT` s after, by the store's writer. Each server has a mark of its own, so
        several may write one database (PostgreSQL); the marks of servers that were killed
        are cleared here."""
        now = time.time()
        mark = {"pid": os.getpid(), "host": socket.gethostname(), "learning": learning,
                "beat": now}
        if self._serving_key is None:
            self._serving_key = f"{SERVING_KEY}:{secrets.token_hex(8)}"
        with OrmSession(self.engine) as db:
            killed = [row.key for row in self._serving_rows(db)
                      if row.key != self._serving_key and _serving_mark(row.value, now) is None]
            if killed:  # (by key: another server may clear the same marks)
                db.execute(delete(Meta).where(Meta.key.in_(killed)))
            db.merge(Meta(key=self._serving_key, value=json.dumps(mark)))
            db.commit()

    def unmark_serving(self) -> None:
        if self._serving_key is None:
            return
        with OrmSession(self.engine) as db:
            if (row := db.get(Meta, self._serving_key)) is not None:
                db.delete(row)
                db.commit()

    @staticmethod
    def _serving_rows(db: OrmSession) -> list[Meta]:
        return list(db.scalars(select(Meta).where(
            (Meta.key == SERVING_KEY)
            | Meta.key.startswith(f"{SERVING_KEY}:", autoescape=True))))

    def begin_import(self) -> str:
        """Say that an import is about to write; returns the key `renew_import` and
        `end_import` take. Until it ends, `imported()` stays before it began: another
        import's end, noted meanwhile, must not let a server learn past this one's batches
        (each is stamped before it commits, and may commit after that note)."""
        key = f"{IMPORTING_KEY}{secrets.token_hex(8)}"
        now = time.time()
        with OrmSession(self.engine) as db:
            for row in db.scalars(select(Meta).where(
                    Meta.key.startswith(IMPORTING_KEY, autoescape=True))):
                mark = _import_mark(row.value)
                if mark is None or now - mark[1] >= IMPORT_STALE:
                    db.delete(row)  # the mark of an import that was killed
            db.add(Meta(key=key, value=json.dumps({"began": now, "beat": now})))
            db.commit()
        return key

    def renew_import(self, key: str) -> None:
        """The import of `key` still writes (call after each batch)."""
        with OrmSession(self.engine) as db:
            if (row := db.get(Meta, key)) is not None:
                mark = json.loads(row.value)
                row.value = json.dumps({**mark, "beat": time.time()})
                db.commit()

    def end_import(self, key: str | None = None) -> float:
        """Say that an import has written all its calls (after they are committed): a
        server learns the imported calls stored up to the time returned (that of the
        earliest import still writing, if that is sooner: see `imported`)."""
        now = time.time()
        with OrmSession(self.engine) as db:
            if key is not None and (row := db.get(Meta, key)) is not None:
                db.delete(row)
            db.merge(Meta(key=IMPORTED_KEY, value=repr(now)))
            db.commit()
        return now

    def imported(self) -> float:
        """Up to when imported calls are stored whole: the last import's end, or where an
        import still writing began, if sooner; 0 if never."""
        with OrmSession(self.engine) as db:
            row = db.get(Meta, IMPORTED_KEY)
            writing = db.scalars(select(Meta.value).where(
                Meta.key.startswith(IMPORTING_KEY, autoescape=True))).all()
        try:
            done = float(row.value) if row is not None else 0.0
        except ValueError:
            done = 0.0
        now = time.time()
        for value in writing:
            mark = _import_mark(value)
            if mark is not None and now - mark[1] < IMPORT_STALE:
                done = min(done, mark[0])
        return done

    def import_writes(self, after: float, until: float, limit: int) -> list[float]:
        """The times of the first `limit` writes of imported calls stored in (after, until]."""
        q = (select(ExchangeRow.stored_at).distinct()
             .where(ExchangeRow.stored_at > after, ExchangeRow.stored_at <= until,
                    imported_clause())
             .order_by(ExchangeRow.stored_at).limit(limit))
        with OrmSession(self.engine) as db:
            return list(db.scalars(q))

    def servers(self) -> list[dict]:
        """The marks of the `preheat serve`s writing here now (pid, host, learning, beat),
        oldest beat first; a mark not renewed for `SERVING_STALE` s is of a server that was
        killed, and is left out."""
        now = time.time()
        with OrmSession(self.engine) as db:
            marks = [_serving_mark(row.value, now) for row in self._serving_rows(db)]
        return sorted((m for m in marks if m is not None), key=lambda m: float(m["beat"]))

    def serving(self) -> dict | None:
        """The mark of a `preheat serve` writing here now, one that learns if any does; None
        if no server writes here."""
        marks = self.servers()
        return next((m for m in marks if m.get("learning")), marks[0] if marks else None)

    def _meta_value(self, key: str, make) -> str:
        """The value kept under `key`, made and kept first if there is none (the first
        to keep one wins: another server may be doing the same)."""
        with OrmSession(self.engine) as db:
            if (row := db.get(Meta, key)) is not None:
                return row.value
        with self.engine.begin() as conn:
            conn.execute(_insert_ignore(Meta, self.engine).values(key=key, value=make()))
            return conn.execute(select(Meta.value).where(Meta.key == key)).scalar_one()

    # -- writing (single writer thread) --------------------------------------------------

    def write(self, items: Sequence[Exchange]) -> None:
        """Store analysed exchanges and their sessions in one transaction."""
        messages: dict[str, dict] = {}
        rows: list[dict] = []
        sessions: dict[str, dict] = {}
        now = time.time()
        for ex in items:
            rows.append(_fit_row(_row_of(ex, messages) | {"stored_at": now}, _EXCHANGE_TEXT))
            if ex.session_id:
                s = sessions.setdefault(
                    ex.session_id,
                    {"id": ex.session_id, "source": ex.session_source or "new", "tenant": ex.tenant,
                     "first_at": ex.started_at, "last_at": ex.started_at, "exchanges": 0},
                )
                s["first_at"] = min(s["first_at"], ex.started_at)
                s["last_at"] = max(s["last_at"], ex.started_at)
                s["exchanges"] += 1
        # Rows are locked in key order: two servers writing one PostgreSQL database, whose
        # batches meet the same new message or session, would otherwise deadlock.
        with self.engine.begin() as conn:
            if messages:
                conn.execute(self._insert_messages, [messages[h] for h in sorted(messages)])
            if sessions:
                conn.execute(self._upsert_sessions,
                             [_fit_row(sessions[i], _SESSION_TEXT) for i in sorted(sessions)])
            conn.execute(ExchangeRow.__table__.insert(), rows)

    # -- reading -------------------------------------------------------------------------

    def sessions(self, limit: int = 1000) -> list[dict]:
        """Sessions, newest first, each with its ordered exchange ids."""
        with OrmSession(self.engine) as db:
            found = db.scalars(select(Session).order_by(Session.last_at.desc()).limit(limit)).all()
            ids = [s.id for s in found]
            members: dict[str, list[str]] = {i: [] for i in ids}
            if ids:
                q = (
                    select(ExchangeRow.session_id, ExchangeRow.id)
                    .where(ExchangeRow.session_id.in_(ids))
                    .order_by(ExchangeRow.started_at, ExchangeRow.id)
                )
                for sid, eid in db.execute(q):
                    members[sid].append(eid)
            return [
                {"id": s.id, "source": s.source, "tenant": s.tenant, "first_at": s.first_at,
                 "last_at": s.last_at, "exchanges": members[s.id]}
                for s in found
            ]

    def session(self, session_id: str) -> dict | None:
        with OrmSession(self.engine) as db:
            s = db.get(Session, session_id)
            if s is None:
                return None
            ids = db.scalars(
                select(ExchangeRow.id)
                .where(ExchangeRow.session_id == session_id)
                .order_by(ExchangeRow.started_at, ExchangeRow.id)
            ).all()
            return {"id": s.id, "source": s.source, "tenant": s.tenant, "first_at": s.first_at,
                    "last_at": s.last_at, "exchanges": list(ids)}

    def exchange(self, exchange_id: str) -> Exchange | None:
        with OrmSession(self.engine) as db:
            row = db.get(ExchangeRow, exchange_id)
            return None if row is None else self._load(db, [row])[0]

    def exchanges(
        self, session_id: str | None = None, batch: int = 500, since: float | None = None,
        imported: bool | None = None, stored: tuple[float, float] | None = None,
    ) -> Iterator[Exchange]:
        """Stored exchanges in arrival order: of one session, or all; started after `since`;
        imported or captured only (imported: None, either); stored in (`stored`]."""
        q = select(ExchangeRow).order_by(ExchangeRow.started_at, ExchangeRow.id)
        if session_id is not None:
            q = q.where(ExchangeRow.session_id == session_id)
        if since is not None:
            q = q.where(ExchangeRow.started_at > since)
        if imported is not None:
            q = q.where(imported_clause() if imported else captured_clause())
        if stored is not None:
            q = q.where(ExchangeRow.stored_at > stored[0], ExchangeRow.stored_at <= stored[1])
        with OrmSession(self.engine) as db:
            page: list[ExchangeRow] = []
            for row in db.scalars(q.execution_options(yield_per=batch)):
                page.append(row)
                if len(page) >= batch:
                    yield from self._load(db, page)
                    page = []
            if page:
                yield from self._load(db, page)

    def count_exchanges(self) -> int:
        """Calls stored, captured and imported (one count, where `count` makes four)."""
        with OrmSession(self.engine) as db:
            return db.scalar(select(func.count()).select_from(ExchangeRow))

    def count(self) -> dict:
        """Rows stored: exchanges (captured and imported), of them imported, sessions,
        messages."""
        with OrmSession(self.engine) as db:
            return {
                "exchanges": db.scalar(select(func.count()).select_from(ExchangeRow)),
                "imported": db.scalar(select(func.count()).select_from(ExchangeRow)
                                      .where(imported_clause())),
                "sessions": db.scalar(select(func.count()).select_from(Session)),
                "messages": db.scalar(select(func.count()).select_from(Message)),
            }

    def _load(self, db: OrmSession, rows: list[ExchangeRow]) -> list[Exchange]:
        wanted = {h for r in rows for h in (r.message_hashes or [])}
        wanted |= {r.answer_hash for r in rows if r.answer_hash}
        found: dict[str, dict] = {}
        wanted_list = list(wanted)
        for i in range(0, len(wanted_list), 500):
            q = select(Message.hash, Message.data).where(Message.hash.in_(wanted_list[i : i + 500]))
            found.update({h: loads(d) for h, d in db.execute(q)})
        return [load(_row_dict(r), found) for r in rows]


_EXCHANGE_TEXT = _text_limits(ExchangeRow.__table__)
_SESSION_TEXT = _text_limits(Session.__table__)


def _insert_ignore(model, engine: Engine):
    table = model.__table__
    if engine.dialect.name == "sqlite":
        return sqlite_insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    return table.insert().prefix_with("IGNORE")


def _upsert_sessions(engine: Engine):
    """Insert sessions, or widen the time span and add to the count of existing ones."""
    table = Session.__table__
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert

        least, greatest = func.least, func.greatest
    else:  # SQLite's two-argument min/max are scalar
        dialect_insert, least, greatest = sqlite_insert, func.min, func.max
    stmt = dialect_insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.id],
        set_={
            "first_at": least(table.c.first_at, stmt.excluded.first_at),
            "last_at": greatest(table.c.last_at, stmt.excluded.last_at),
            "exchanges": table.c.exchanges + stmt.excluded.exchanges,
        },
    )


def _row_dict(row: ExchangeRow) -> dict:
    return {c.name: getattr(row, c.key) for c in ExchangeRow.__table__.columns}


def _add_message(msg: dict, messages: dict[str, dict]) -> str:
    h = content_hash(msg)
    if h not in messages:
        data = canonical_json(msg).decode()
        role = msg.get("role") or msg.get("type")
        messages[h] = {"hash": h, "role": str(role)[:32] if role else None, "data": data,
                       "size": len(data)}
    return h


def _row_of(ex: Exchange, messages: dict[str, dict]) -> dict:
    ex.analyze()
    request = None
    hashes = None
    prompt_field = None
    body = ex.request_json
    if isinstance(body, dict):
        request = dict(body)
        for name in ("messages", "input"):
            value = body.get(name)
            if isinstance(value, list) and all(isinstance(m, dict) for m in value):
                hashes = [_add_message(m, messages) for m in value]
                prompt_field = name
                del request[name]
                break
    raw = None
    if body is None and ex.request_body:
        raw = ex.request_body
    elif body is not None and not isinstance(body, dict):
        raw = ex.request_body
    response = ex.response_json  # None for a stream: also a stream request's JSON error
    response_raw = None
    if not ex.stream and response is None and ex.response_chunks:
        response_raw = ex.response_body
    return {
        "id": ex.id,
        "version": EXCHANGE_VERSION,
        "method": ex.method,
        "path": ex.path,
        "query": ex.query,
        "headers": [[k, v] for k, v in ex.request_headers if k.lower() in KEPT_HEADERS],
        "started_at": ex.started_at,
        "t_upstream_sent": ex.t_upstream_sent,
        "t_upstream_headers": ex.t_upstream_headers,
        "t_first_byte": ex.t_first_byte,
        "t_first_token": ex.t_first_token,
        "t_done": ex.t_done,
        "added_latency": ex.added_latency,
        "request": request,
        "message_hashes": hashes,
        "prompt_field": prompt_field,
        "request_raw": raw,
        "request_error": ex.request_error,
        "status": ex.status,
        "response_headers": [[k, v] for k, v in ex.response_headers if k.lower() != "set-cookie"],
        "stream": ex.stream,
        "response": response if isinstance(response, (dict, list)) else None,
        "response_raw": response_raw,
        "events": ex.events if ex.stream else None,
        "answer_hash": _add_message(ex.answer, messages) if ex.answer else None,
        "usage": ex.usage,
        "cached_tokens": ex.cached_tokens,
        "model": ex.model,
        "response_id": ex.response_id,
        "error": ex.error or ex.response_error,
        "error_type": ex.error_type,
        "truncated": ex.request_truncated or ex.response_truncated,
        "tenant": ex.tenant,
        "session_id": ex.session_id,
        "session_source": ex.session_source,
        "parent_id": ex.parent_id,
        "cache": ex.cache,
    }


def load(row: dict, messages: dict[str, dict]) -> Exchange:
    """An `Exchange` from a stored row of any version, its messages resolved by hash."""
    version = row.get("version") or 1
    if version > EXCHANGE_VERSION:
        raise StoreError(
            f"exchange {row['id']} was written by a newer preheat (format {version}); upgrade"
        )
    request = copy.deepcopy(row["request"]) if row["request"] is not None else None
    if isinstance(request, dict) and row["prompt_field"]:
        request[row["prompt_field"]] = [messages.get(h, {"missing": h}) for h in row["message_hashes"]]
    ex = Exchange(
        method=row["method"],
        path=row["path"],
        query=row["query"] or "",
        request_headers=[(k, v) for k, v in row["headers"] or []],
        id=row["id"],
        started_at=row["started_at"],
        t_upstream_sent=row["t_upstream_sent"],
        t_upstream_headers=row["t_upstream_headers"],
        t_first_byte=row["t_first_byte"],
        t_first_token=row["t_first_token"],
        t_done=row["t_done"],
        status=row["status"],
        response_headers=[(k, v) for k, v in row["response_headers"] or []],
        error=row["error"],
        error_type=row["error_type"],
        session_id=row["session_id"],
        session_source=row["session_source"],
        tenant=row["tenant"],
        cache=row["cache"],
        added_latency=row["added_latency"],
    )
    ex.analyzed = True
    ex.request_json = request
    ex.request_error = row["request_error"]
    if row["request_raw"] is not None:
        ex.request_body = row["request_raw"]
    elif request is not None:
        ex.request_body = json.dumps(request).encode()
    ex.response_json = row["response"]
    if row["response_raw"] is not None:
        ex.response_chunks = [(row["t_done"] or 0.0, row["response_raw"])]
    ex.stream = bool(row["stream"])
    ex.events = row["events"] or []
    ex.answer = messages.get(row["answer_hash"]) if row["answer_hash"] else None
    ex.usage = row["usage"]
    ex.model = row["model"]
    ex.response_id = row["response_id"]
    ex.parent_id = row.get("parent_id")
    return ex
