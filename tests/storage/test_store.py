"""The store's own promises, on SQLite and PostgreSQL: a store made by an older preheat opens
and keeps working; what one client sends never keeps another's calls out."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, update

from proxy.exchange import Exchange
from storage.models import ExchangeRow, Meta, Session
from storage.store import Store, StoreError, store_url


def _call(i: int) -> Exchange:
    body = {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]}
    return Exchange(method="POST", path="/v1/chat/completions", status=200, started_at=100.0 + i,
                    request_headers=[("content-type", "application/json")],
                    request_body=json.dumps(body).encode())


def test_a_store_from_before_stored_at_gains_the_column_and_keeps_its_rows(db_url):
    store = Store(db_url)
    store.write([_call(0)])
    with store.engine.begin() as conn:  # as an older preheat made it
        conn.exec_driver_sql("DROP INDEX ix_exchanges_stored")
        conn.exec_driver_sql("ALTER TABLE exchanges DROP COLUMN stored_at")
    store.close()
    reopened = Store(db_url)
    reopened.write([_call(1)])
    assert [ex.started_at for ex in reopened.exchanges()] == [100.0, 101.0]
    with reopened.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT stored_at FROM exchanges ORDER BY started_at").all()
    assert stored[0][0] is None and stored[1][0] is not None


def test_imported_calls_are_found_by_when_they_were_stored(db_url):
    store = Store(db_url)
    captured, imported = _call(0), _call(1)
    imported.session_id, imported.session_source = "s-1", "import:new"
    store.write([captured])
    store.write([imported])
    done = store.end_import()
    assert [ex.id for ex in store.exchanges(imported=True, stored=(0.0, done))] == [imported.id]
    assert [ex.id for ex in store.exchanges(imported=False)] == [captured.id]
    assert store.import_writes(0.0, done, 10) and store.import_writes(done, done + 1, 10) == []


def _imported(i: int) -> Exchange:
    ex = _call(i)
    ex.session_id, ex.session_source = f"s-{i}", "import:new"
    return ex


def test_an_import_still_writing_holds_back_what_a_server_may_learn(db_url, monkeypatch):
    """Two imports at once: the first to end must not let a server learn past where the
    other began (its next batch, stamped before it commits, may land behind that end)."""
    from proxy.learning import LearnSink
    from storage import store as store_module

    store = Store(db_url)
    sink = LearnSink(store)
    first = store.begin_import()
    store.write([_imported(0)])
    store.renew_import(first)
    second = store.begin_import()
    late = _imported(1)
    stamped = __import__("time").time()  # the second import's batch, stamped now...
    ended = store.end_import(first)
    assert store.imported() < stamped < ended  # ...so nothing past where it began is learnable
    assert sink.catch_up_imports() == 1  # the first import's call
    monkeypatch.setattr(store_module.time, "time", lambda: stamped)
    store.write([late])  # ...and committed only now, after the first import's end
    monkeypatch.undo()
    store.renew_import(second)
    assert store.end_import(second) == store.imported()
    assert sink.catch_up_imports() == 1  # the late batch is learned, and nothing twice
    assert sink.catch_up_imports() == 0 and sink.learner.observed == 2


def test_an_import_that_was_killed_holds_nothing_back(db_url, monkeypatch):
    from storage import store as store_module

    store = Store(db_url)
    store.begin_import()  # and never ended
    store.write([_imported(0)])
    ended = store.end_import(store.begin_import())
    assert store.imported() < ended
    now = store_module.time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + store_module.IMPORT_STALE + 1)
    assert store.imported() == ended


def test_the_next_import_clears_the_marks_of_killed_imports(db_url, monkeypatch):
    from storage import store as store_module
    from storage.models import Meta

    store = Store(db_url)
    killed = store.begin_import()  # and never ended
    running = store.begin_import()
    now = store_module.time.time()
    monkeypatch.setattr(store_module.time, "time", lambda: now + store_module.IMPORT_STALE - 1)
    store.renew_import(running)  # still writing
    monkeypatch.setattr(store_module.time, "time", lambda: now + store_module.IMPORT_STALE + 1)
    new = store.begin_import()
    with store.engine.connect() as conn:
        keys = {k for (k,) in conn.execute(Meta.__table__.select().with_only_columns(Meta.key))
                if k.startswith(store_module.IMPORTING_KEY)}
    assert keys == {running, new} and killed not in keys
    ended = store.end_import(new)
    assert store.imported() <= now < ended  # the import still writing holds back, as before


def test_what_one_client_sends_fits_the_store_and_keeps_no_other_call_out(db_url):
    """Text PostgreSQL refuses (a NUL, a value past its column's length; SQLite takes both) is
    stored as near as it fits, in the same batch as another client's call."""
    long_a, long_b = "a" * 250 + "-one", "a" * 250 + "-two"  # alike past the column's length
    odd = [_call(0), _call(1), _call(2)]
    odd[0].session_id, odd[0].session_source = long_a, "header"
    odd[1].session_id, odd[1].session_source = long_b, "header"
    odd[2].request_body = json.dumps({"model": "m" * 300 + "\u0000", "messages": [
        {"role": "user", "content": "a NUL \u0000 in a message"}]}).encode()
    odd[2].error = "upstream said \x00 and more"
    other = _call(3)
    store = Store(db_url)
    store.write([*odd, other])

    stored = {ex.id: ex for ex in store.exchanges()}
    assert set(stored) == {ex.id for ex in [*odd, other]}
    assert stored[other.id].request_json == other.request_json  # untouched
    nul = stored[odd[2].id]
    assert nul.request_json["messages"][0]["content"] == "a NUL \x00 in a message"  # JSON keeps it
    assert "\x00" not in nul.error and nul.error.startswith("upstream said")
    with store.engine.connect() as conn:
        model = conn.execute(ExchangeRow.__table__.select()
                             .with_only_columns(ExchangeRow.model)
                             .where(ExchangeRow.id == odd[2].id)).scalar()
        sessions = dict(conn.execute(Session.__table__.select()
                                     .with_only_columns(Session.id, Session.exchanges)).all())
    assert len(model) <= 256 and model.startswith("m" * 200)
    a, b = stored[odd[0].id].session_id, stored[odd[1].id].session_id
    assert a != b and len(a) <= 200 and a.startswith("a" * 150)  # two sessions, still apart
    assert sessions[a] == sessions[b] == 1  # each exchange's session is its row
    assert store.session(a)["exchanges"] == [odd[0].id]


def test_a_count_past_64_bits_in_an_answer_does_not_cost_its_capture(db_url):
    """An upstream's usage is the upstream's: a cached-token count no 64-bit column holds
    is kept in the usage as sent and not taken for a count (the row was refused whole)."""
    odd = _call(0)
    odd.response_headers = [("content-type", "application/json")]
    usage = {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2**64 - 1}}
    odd.response_chunks = [(0.1, json.dumps({"id": "c", "model": "m", "usage": usage,
                                             "choices": []}).encode())]
    store = Store(db_url)
    store.write([odd, _call(1)])
    stored = {ex.id: ex for ex in store.exchanges()}
    assert len(stored) == 2 and stored[odd.id].cached_tokens is None
    assert stored[odd.id].usage == usage


def test_a_store_url_without_a_driver_and_one_that_cannot_open():
    assert store_url("data/preheat.db") == "sqlite:///data/preheat.db"
    assert store_url("postgres://u@db/p") == "postgresql+psycopg://u@db/p"
    assert store_url("postgresql://u@db/p") == "postgresql+psycopg://u@db/p"
    assert store_url("postgresql+psycopg2://u@db/p") == "postgresql+psycopg2://u@db/p"
    with pytest.raises(StoreError) as failed:  # nothing listens on port 1
        Store("postgresql://preheat:s3cret@127.0.0.1:1/preheat?connect_timeout=5")
    assert "127.0.0.1:1" in str(failed.value) and "s3cret" not in str(failed.value)


def test_two_servers_writing_one_store_at_once_lose_nothing(db_url):
    """Two preheat servers capturing to one database, behind a balancer that spreads each
    agent's calls over both: their batches meet the same new messages and sessions at the
    same moment, in different orders, and every call must still be stored on the first try
    (on PostgreSQL, rows locked in opposite orders would deadlock, and one batch fail)."""
    import threading

    rounds, width = 60, 6
    stores = [Store(db_url), Store(db_url)]
    failures: list[BaseException] = []
    start = threading.Barrier(2, timeout=60)  # a thread that dies frees the other

    def batch(server: int, r: int) -> list[Exchange]:
        out = []
        for k in range(width):
            shared = [{"role": "system", "content": f"round {r} part {j}"} for j in range(width)]
            body = {"model": "m", "messages": shared[::-1] if server else shared}
            body["messages"] = body["messages"] + [
                {"role": "user", "content": f"server {server} call {k}"}]
            ex = Exchange(method="POST", path="/v1/chat/completions", status=200,
                          started_at=1000.0 + r, request_headers=[],
                          request_body=json.dumps(body).encode())
            ex.session_id = f"r{r}-s{width - 1 - k if server else k}"
            out.append(ex)
        return out

    def serve(server: int) -> None:
        todo = [batch(server, r) for r in range(rounds)]
        for items in todo:
            start.wait()  # both batches at the same moment
            try:
                stores[server].write(items)
            except BaseException as exc:  # noqa: BLE001 (each failure is the finding)
                failures.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:1]
    assert stores[0].count_exchanges() == 2 * rounds * width
    sessions = {s["id"]: s for s in stores[1].sessions(limit=10_000)}
    assert len(sessions) == rounds * width
    assert all(len(s["exchanges"]) == 2 for s in sessions.values())
    with stores[0].engine.connect() as conn:  # each server's upsert counted
        assert set(conn.execute(select(Session.exchanges)).scalars()) == {2}
    for s in stores:
        s.close()


def test_servers_started_together_on_a_new_database_all_open_it(postgres):
    """Replicas started at once on a fresh PostgreSQL database each create its tables and
    its tenant key: each must open the store, and all must hash tenants with the same key."""
    import threading

    for _ in range(4):
        url = postgres.new_database()
        opened: list[Store] = []
        failures: list[BaseException] = []
        start = threading.Barrier(3, timeout=60)

        def open_store() -> None:
            start.wait()
            try:
                opened.append(Store(url))
            except BaseException as exc:  # noqa: BLE001 (each failure is the finding)
                failures.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures[:1]
        assert len({s.tenant_key for s in opened}) == 1
        for s in opened:
            s.close()


def test_each_server_on_a_store_keeps_a_mark_of_its_own(db_url):
    """Two servers on one database: stopping one must not hide the other from `preheat
    learn`, and the one that learns is the one reported."""
    import time

    first, second = Store(db_url), Store(db_url)
    first.mark_serving(learning=False)
    second.mark_serving(learning=True)
    assert len(first.servers()) == 2 and first.serving()["learning"] is True
    second.unmark_serving()
    assert [m["learning"] for m in first.servers()] == [False]
    second.mark_serving(learning=True)
    first.unmark_serving()
    assert second.serving()["learning"] is True
    marks = Meta.key.startswith("serving")
    with second.engine.begin() as conn:  # the second server was killed 10 minutes ago
        conn.execute(update(Meta).where(marks).values(
            value=json.dumps({"learning": True, "beat": time.time() - 600})))
    assert second.servers() == [] and second.serving() is None
    first.mark_serving(learning=False)  # a mark's beat clears the marks of killed servers
    with first.engine.connect() as conn:
        assert conn.execute(select(func.count()).where(marks)).scalar() == 1
    for s in (first, second):
        s.close()


def test_each_server_restores_what_it_learned_itself(db_url):
    """Servers on one database serve different agents: a restart takes its own snapshot
    (or a newer one of `preheat learn`), not whichever server saved last."""
    from storage.learned import KEEP, learned_history, load_learned, save_learned

    store = Store(db_url)
    for i in range(KEEP + 2):  # both save every minute, in turn
        save_learned(store, {"who": "a", "i": i}, server="a:8080")
        save_learned(store, {"who": "b", "i": i}, server="b:8080")
    assert load_learned(store, server="a:8080") == {"who": "a", "i": KEEP + 1}
    assert load_learned(store, server="b:8080")["who"] == "b"
    assert load_learned(store, server="new:8080")["who"] == "b"  # none of its own: the newest
    assert load_learned(store)["who"] == "b"
    kept = [h["server"] for h in learned_history(store)]
    assert kept.count("a:8080") == KEEP and kept.count("b:8080") == KEEP
    save_learned(store, {"who": "learn"})  # `preheat learn`, while the servers were stopped
    assert load_learned(store, server="a:8080") == {"who": "learn"}
    save_learned(store, {"who": "a", "i": 99}, server="a:8080")
    assert load_learned(store, server="a:8080") == {"who": "a", "i": 99}
    store.close()


def test_the_snapshots_of_a_server_long_gone_go_when_another_saves(db_url):
    from storage.learned import FORGET_AFTER, LearnedSnapshot, learned_history, save_learned

    store = Store(db_url)
    save_learned(store, {"who": "gone"}, server="gone:8080")
    with store.engine.begin() as conn:
        conn.execute(update(LearnedSnapshot).values(saved_at=LearnedSnapshot.saved_at
                                                     - FORGET_AFTER - 60))
    save_learned(store, {"who": "a"}, server="a:8080")
    assert [h["server"] for h in learned_history(store)] == ["a:8080"]
    store.close()


def test_a_store_from_before_servers_were_named_keeps_its_snapshot(db_url):
    from storage.learned import learned_history, load_learned, save_learned

    store = Store(db_url)
    save_learned(store, {"who": "old"})
    with store.engine.begin() as conn:  # as an older preheat made it
        conn.exec_driver_sql("ALTER TABLE learned DROP COLUMN server")
    store.close()
    reopened = Store(db_url)
    assert load_learned(reopened, server="a:8080") == {"who": "old"}
    save_learned(reopened, {"who": "a"}, server="a:8080")
    assert [h["server"] for h in learned_history(reopened)] == ["a:8080", ""]
    reopened.close()
