"""Retention: old captures leave the store, and nothing a kept capture needs goes with them
(on SQLite and PostgreSQL; giving pages back is SQLite's own)."""

from __future__ import annotations

import json
import os
import time

from sqlalchemy import select, update

from proxy.exchange import Exchange
from storage import retention
from storage.learned import load_learned, save_learned
from storage.models import ExchangeRow, Message, Session
from storage.store import Store

DAY = 86400.0
SYSTEM = {"role": "system", "content": "You are an airline agent."}


def _call(session: str, at: float, *texts: str, answer: str = "ok") -> Exchange:
    body = {"model": "m", "messages": [SYSTEM] + [{"role": "user", "content": t} for t in texts]}
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
    ex = Exchange(method="POST", path="/v1/chat/completions", status=200, started_at=at,
                  request_headers=[("content-type", "application/json")],
                  request_body=json.dumps(body).encode(),
                  response_headers=[("content-type", "application/json")],
                  response_chunks=[(at, json.dumps(reply).encode())])
    ex.session_id, ex.session_source = session, "prefix"
    return ex


def _write(store: Store, *calls: Exchange, stored: float | None = None) -> None:
    """Write `calls` as if stored at `stored` (when they were made, if None)."""
    store.write(list(calls))
    with store.engine.begin() as conn:
        for ex in calls:
            conn.execute(update(ExchangeRow).where(ExchangeRow.id == ex.id)
                         .values(stored_at=stored or ex.started_at))


def _run(r: retention.Retention) -> None:
    r.step()
    for _ in range(1000):
        if not r.busy:
            return
        time.sleep(0.005)
        r.step()
    raise AssertionError("the pass never ended")


def _referenced(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(ExchangeRow.message_hashes, ExchangeRow.answer_hash)).all()
    return {h for hashes, answer in rows for h in (hashes or []) + [answer] if h}


def test_old_exchanges_go_with_their_sessions_and_messages_and_nothing_else(db_url):
    store = Store(db_url)
    now = time.time()
    old, recent = now - 10 * DAY, now - 3600
    gone = [_call("old", old, "book a flight", answer="which day?"),
            _call("old", old + 5, "book a flight", "monday"),
            _call("span", old + 9, "cancel it")]
    kept = [_call("span", recent, "cancel it", "now"),
            _call("new", recent + 1, "monday", answer="which day?")]  # shares two messages
    imported = _call("import:1", old + 20, "a call from last year's trace")
    imported.session_source = "import:new"
    completion = _call("new", recent + 2)  # no list of messages: its hashes are JSON null
    completion.request_body = json.dumps({"model": "m", "prompt": "once upon"}).encode()
    kept.append(completion)
    _write(store, *gone, *kept)
    _write(store, imported, stored=now)  # imported just now: kept as long as a capture
    learned = {"version": 1, "observed": 6, "anything": ["the learner's own"]}
    save_learned(store, learned)
    with store.engine.connect() as conn:
        before = set(conn.execute(select(Message.hash)).scalars())

    r = retention.Retention(store, days=1)
    _run(r)

    ids = {ex.id for ex in store.exchanges()}
    assert ids == {ex.id for ex in kept} | {imported.id}
    sessions = {s["id"]: s for s in store.sessions()}
    assert set(sessions) == {"span", "new", "import:1"}
    with store.engine.connect() as conn:
        span = conn.execute(select(Session.exchanges, Session.first_at)
                            .where(Session.id == "span")).one()
        left = set(conn.execute(select(Message.hash)).scalars())
    assert tuple(span) == (1, recent)
    assert left == _referenced(store) and left < before  # the rest went
    contents = {json.loads(d)["content"] for d in _data(store)}
    assert "book a flight" not in contents  # the old calls' own message
    assert {SYSTEM["content"], "which day?", "monday", "cancel it"} <= contents  # shared
    for ex in store.exchanges():  # every kept call reads back whole
        assert all("missing" not in m for m in ex.request_json.get("messages", [])) and ex.answer
    assert r.deleted["exchanges"] == 3 and r.deleted["sessions"] == 1
    assert r.deleted["messages"] == len(before - left) == 1
    assert load_learned(store)["anything"] == learned["anything"]

    r.step()  # the next pass is not due yet
    assert not r.busy and store.count()["exchanges"] == 4


def _data(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(Message.data)).scalars())


def test_a_message_a_new_call_refers_to_during_the_search_is_kept(db_url):
    store = Store(db_url)
    now = time.time()
    _write(store, _call("a", now - 10 * DAY, "first", answer="one"))
    retention.expire(store, now - DAY)
    since = time.time() - retention.MARGIN
    orphans = retention.unreferenced(store)
    assert len(orphans) == 3  # system prompt, "first", "one"
    _write(store, _call("b", now, "first", answer="two"), stored=now)  # meanwhile
    assert retention.forget(store, orphans, since) == 1  # "one" only
    assert all("missing" not in m for ex in store.exchanges()
               for m in ex.request_json["messages"])


def test_a_new_store_gives_the_pages_it_frees_back_and_an_old_one_reuses_them(tmp_path):
    import sqlite3

    made_before = tmp_path / "before.db"  # as stores made before retention existed
    sqlite3.connect(made_before).execute("PRAGMA journal_mode=WAL").close()
    sizes = {}
    for name, path in (("new", tmp_path / "new.db"), ("old", made_before)):
        store = Store(f"sqlite:///{path}")
        assert retention.incremental(store) is (name == "new")
        now = time.time()
        _write(store, *[_call(f"s{i}", now - 10 * DAY, f"{i} " + "x" * 20_000)
                        for i in range(100)])
        _write(store, _call("kept", now, "recent"))
        checkpoint = "PRAGMA wal_checkpoint(TRUNCATE)"
        with store.engine.connect() as conn:
            conn.exec_driver_sql(checkpoint)
        full = os.path.getsize(path)
        _run(retention.Retention(store, days=1))
        with store.engine.connect() as conn:
            conn.exec_driver_sql(checkpoint)
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
        sizes[name] = (full, os.path.getsize(path), free)
        assert store.count() == {"exchanges": 1, "imported": 0, "sessions": 1, "messages": 3}
        store.close()
    (full, now_size, free) = sizes["new"]
    assert now_size < full / 10 and free == 0
    (full, now_size, free) = sizes["old"]
    assert now_size == full and free * 4096 > full / 2  # reused by the next captures


def test_the_search_on_postgresql_is_an_anti_join(postgres_url):
    """NOT IN over the references is a nested loop on PostgreSQL once they outgrow its
    work_mem (400k messages, 2.2M references: over ten minutes, against 2.7 s this way)."""
    from sqlalchemy import text

    store = Store(postgres_url)
    sql = f"EXPLAIN SELECT hash FROM messages WHERE {retention._unreferenced('postgresql', False)}"
    with store.engine.connect() as conn:
        plan = "\n".join(conn.execute(text(sql)).scalars())
    assert "Anti Join" in plan and "SubPlan" not in plan, plan


def test_two_servers_passing_over_one_store_at_once_delete_each_old_call_once(
        db_url, monkeypatch):
    """Several hosts on one database each run their own retention: two passes deleting the
    same old calls at the same moment both end, without an error, and leave what a single
    pass leaves."""
    import threading

    monkeypatch.setattr(retention, "EXCHANGES_AT_ONCE", 20)  # many small transactions
    store = Store(db_url)
    now = time.time()
    old, recent = now - 10 * DAY, now - 3600
    gone = [_call(f"s{i % 40}", old + i, f"task {i % 40}", f"step {i}") for i in range(300)]
    kept = [_call(f"s{i}", recent + i, f"task {i}", "again") for i in range(0, 40, 3)]
    _write(store, *gone, *kept)

    stores = [Store(db_url), Store(db_url)]
    passes = [retention.Retention(s, days=1) for s in stores]
    start = threading.Barrier(2, timeout=60)  # a thread that dies frees the other
    failed: list[BaseException] = []

    def sweep(r: retention.Retention) -> None:
        try:
            start.wait()
            _run(r)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failed.append(exc)

    threads = [threading.Thread(target=sweep, args=(r,)) for r in passes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failed, failed
    assert {ex.id for ex in store.exchanges()} == {ex.id for ex in kept}
    assert sum(r.deleted["exchanges"] for r in passes) == len(gone)  # each one deleted once
    with store.engine.connect() as conn:
        sessions = dict(conn.execute(select(Session.id, Session.exchanges)).all())
        left = set(conn.execute(select(Message.hash)).scalars())
    assert sessions == {f"s{i}": 1 for i in range(0, 40, 3)}  # a true count, whoever was last
    assert left == _referenced(store)
    for s in stores:
        s.close()
    store.close()
