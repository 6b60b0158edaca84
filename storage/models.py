"""The capture store's tables (SQLAlchemy 2). SQLite by default, PostgreSQL by URL.

Messages are content-addressed: each distinct message is stored once under the xxh3-128 of
its canonical JSON, and an exchange refers to its prompt as an ordered list of those hashes,
so an agent session whose history grows by one message a call stores each message once.
Secrets never reach these tables: only `KEPT_HEADERS` of a request are stored, and a tenant
is a keyed hash of the API key.
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from learn.sessions import EXPLICIT_HEADERS

# Request headers worth keeping. Everything else (Authorization, api-key, cookies, ...) is
# dropped before storage: a whitelist cannot leak a secret header nobody thought of.
KEPT_HEADERS = frozenset(
    {
        *EXPLICIT_HEADERS,  # session ids
        "content-type",
        "content-length",
        "user-agent",
        "accept",
        "openai-beta",
        "x-stainless-lang",
        "x-stainless-package-version",
        "x-stainless-runtime",
        "x-stainless-retry-count",
        "x-request-id",
        "cache-control",
    }
)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key-value facts about the store itself: schema version, the tenant-hash key."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Message(Base):
    __tablename__ = "messages"
    hash: Mapped[str] = mapped_column(String(32), primary_key=True)
    role: Mapped[str | None] = mapped_column(String(32))
    data: Mapped[str] = mapped_column(Text)
    """The message as canonical JSON."""
    size: Mapped[int] = mapped_column(Integer)


class Session(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str | None] = mapped_column(String(32))
    first_at: Mapped[float] = mapped_column(Float)
    last_at: Mapped[float] = mapped_column(Float)
    exchanges: Mapped[int] = mapped_column(Integer, default=0)


class ExchangeRow(Base):
    __tablename__ = "exchanges"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(256))
    query: Mapped[str] = mapped_column(Text, default="")
    headers: Mapped[list] = mapped_column(JSON)
    """Kept request headers, as [name, value] pairs."""
    started_at: Mapped[float] = mapped_column(Float)
    t_upstream_sent: Mapped[float | None] = mapped_column(Float)
    t_upstream_headers: Mapped[float | None] = mapped_column(Float)
    t_first_byte: Mapped[float | None] = mapped_column(Float)
    t_first_token: Mapped[float | None] = mapped_column(Float)
    t_done: Mapped[float | None] = mapped_column(Float)
    added_latency: Mapped[float | None] = mapped_column(Float)

    request: Mapped[dict | None] = mapped_column(JSON)
    """The parsed body without its prompt messages, which are in `message_hashes`."""
    message_hashes: Mapped[list | None] = mapped_column(JSON)
    prompt_field: Mapped[str | None] = mapped_column(String(32))
    """Where the messages came from in the body: 'messages' or 'input'."""
    request_raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The body as sent, when it could not be parsed (up to the capture limit)."""
    request_error: Mapped[str | None] = mapped_column(Text)

    status: Mapped[int | None] = mapped_column(Integer)
    response_headers: Mapped[list | None] = mapped_column(JSON)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    response: Mapped[dict | None] = mapped_column(JSON)
    """A non-streamed JSON response body."""
    response_raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    """A response body that is neither JSON nor a stream (up to the capture limit)."""
    events: Mapped[list | None] = mapped_column(JSON)
    """A stream's SSE events, each {'t', 'event', 'data'}, to replay it exactly."""
    answer_hash: Mapped[str | None] = mapped_column(String(32))
    usage: Mapped[dict | None] = mapped_column(JSON)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(256))
    response_id: Mapped[str | None] = mapped_column(String(256))
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)

    tenant: Mapped[str | None] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(String(200))
    session_source: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(String(32))
    """The exchange this one continues (prefix inference)."""
    cache: Mapped[str | None] = mapped_column(String(8))
    stored_at: Mapped[float | None] = mapped_column(Float)
    """When the row was written (None in stores older than the column): what `preheat
    import` wrote since a time, whatever times its calls are dated with."""

    __table_args__ = (
        Index("ix_exchanges_session", "session_id", "started_at"),
        Index("ix_exchanges_started", "started_at"),
        Index("ix_exchanges_stored", "stored_at"),
    )
