"""The observer process: capture goes on whatever happens to it, and every loss is counted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from learn import canonical, learner, sessions
from learn.canonical import message_key
from proxy import observe
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.learning import LearnSink
from proxy.observe import Observer
from proxy.observer_process import ObserverProcess
from storage.store import Store
from tests.proxy.test_import import TAU as TAU_BENCH


def _exchange(i: int) -> Exchange:
    return Exchange(method="POST", path="/v1/chat/completions",
                    request_headers=[("content-type", "application/json")],
                    request_body=json.dumps({"messages": [{"role": "user", "content": str(i)}]}).encode())


async def test_a_full_queue_drops_and_counts_and_never_blocks(tmp_path):
    db = f"sqlite:///{tmp_path}/q.db"
    observer = ObserverProcess(Settings(db=db, capture_queue=3))
    await observer.start()
    try:
        os.kill(observer.pid, signal.SIGSTOP)  # nothing drains the queue
        try:
            accepted = [observer.submit(_exchange(i)) for i in range(10)]
        finally:
            os.kill(observer.pid, signal.SIGCONT)
        assert accepted == [True] * 3 + [False] * 7
        assert observer.dropped == {"queue_full": 7}
        await observer.flush()
        assert observer.written == 3 and observer.depth == 0
    finally:
        await observer.close()
    assert Store(db).count()["exchanges"] == 3
    assert not observer.submit(_exchange(10)) and observer.dropped["closed"] == 1


async def test_what_waits_for_a_lagging_observer_is_bounded_in_bytes(tmp_path):
    """Agent calls carry long contexts: 10,000 queued exchanges of 128 KB held 1.3 GB in the
    proxy before the queue bound (in exchanges) dropped any."""
    db = f"sqlite:///{tmp_path}/b.db"
    bound, body = 4 << 20, 256 << 10
    observer = ObserverProcess(Settings(db=db, capture_queue_bytes=bound))
    await observer.start()
    try:
        os.kill(observer.pid, signal.SIGSTOP)
        try:
            accepted, held = [], []
            for i in range(100):  # 25 MiB of calls, 6 times the bound
                ex = _exchange(i)
                ex.request_body = ex.request_body[:-3] + b"x" * body + b'"}]}'
                accepted.append(observer.submit(ex))
                held.append(observer._transport.get_write_buffer_size())
        finally:
            os.kill(observer.pid, signal.SIGCONT)
        taken = sum(accepted)
        assert bound // body <= taken < 60 and accepted == [True] * taken + [False] * (100 - taken)
        assert observer.dropped == {"queue_bytes": 100 - taken}
        assert max(held) < bound + 2 * body  # the bound, and the one call that crossed it
        await observer.flush()
        assert observer.written == taken and observer.depth == 0
        assert observer.submit(_exchange(100))  # drained: captured again
    finally:
        await observer.close()
    assert Store(db).count()["exchanges"] == taken + 1


async def test_an_exchange_it_cannot_read_is_stored_raw_and_the_next_one_too(tmp_path):
    db = f"sqlite:///{tmp_path}/g.db"
    observer = ObserverProcess(Settings(db=db))
    await observer.start()
    try:
        garbage = Exchange(
            method="POST", path="/v1/chat/completions", status=200,
            request_headers=[("content-type", "application/json")], request_body=b"\xff{not json",
            response_headers=[("content-type", "text/event-stream"), ("content-encoding", "gzip")],
            response_chunks=[(0.1, b"\x00 not gzip")],
        )
        assert observer.submit(garbage) and observer.submit(_exchange(1))
        await observer.flush()
    finally:
        await observer.close()
    assert observer.dropped == {}
    bad, good = Store(db).exchanges()
    assert bad.id == garbage.id and "UTF-8" in bad.request_error
    assert bad.request_body == garbage.request_body and bad.response_body == b"\x00 not gzip"
    assert good.request_json == {"messages": [{"role": "user", "content": "1"}]}


async def _call(client: httpx.AsyncClient, url: str, i: int) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": f"call {i}"}]}
    return (await client.post(url + "/v1/chat/completions", json=body)).status_code


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_a_dead_observer_process_is_counted_and_started_again(proxy, sig):
    observer = proxy.observer
    first = observer.pid
    async with httpx.AsyncClient(timeout=30) as client:
        before = await asyncio.gather(*(_call(client, proxy.url, i) for i in range(5)))
        await observer.flush()
        os.kill(first, sig)
        during = await asyncio.gather(*(_call(client, proxy.url, i) for i in range(5, 10)))
        for _ in range(200):
            if observer.restarts == 1 and observer.pid not in (None, first):
                break
            await asyncio.sleep(0.05)
        after = await asyncio.gather(*(_call(client, proxy.url, i) for i in range(10, 15)))
        metrics = (await client.get(proxy.url + "/metrics")).text
    assert before + during + after == [200] * 15  # the agents never noticed
    assert observer.restarts == 1
    stored = {ex.request_json["messages"][0]["content"] for ex in (await proxy.store()).exchanges()}
    assert {f"call {i}" for i in (*range(5), *range(10, 15))} <= stored
    lost = sum(observer.dropped.values())
    assert len(stored) + lost == 15  # each call stored or counted, none both
    assert set(observer.dropped) <= {"observer_down", "observer_died"}
    assert ("preheat_captures_dropped_total" in metrics) and (not lost or "observer_" in metrics)
    # What preheat costs in CPU, the restarted observer's own included.
    cpu = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
           if line.startswith("preheat_cpu_seconds_total{")}
    assert set(cpu) == {"proxy", "observer"} and cpu["proxy"] > 0 and cpu["observer"] >= 0


def _agent_call(session: int, turn: int, at: float) -> Exchange:
    """A finished chat call of agent `session`: a shared system prompt, its own task."""
    system = {"role": "system", "content": "You are the booking agent. " + "Policy. " * 50}
    messages = [system, {"role": "user", "content": f"task {session}: fly me somewhere"}]
    for t in range(turn):
        messages += [{"role": "assistant", "content": f"step {t}"},
                     {"role": "user", "content": f"[tool result] {session}/{t}"}]
    answer = {"choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": f"step {turn}"}}]}
    return Exchange(method="POST", path="/v1/chat/completions", status=200, started_at=at,
                    t_done=0.5, request_headers=[("content-type", "application/json")],
                    request_body=json.dumps({"model": "m", "messages": messages}).encode(),
                    response_headers=[("content-type", "application/json")],
                    response_chunks=[(0.5, json.dumps(answer).encode())])


async def test_static_heads_reach_the_listener_and_survive_a_restart(tmp_path):
    db = f"sqlite:///{tmp_path}/h.db"
    heard: list[list] = []
    observer = ObserverProcess(Settings(db=db))
    await observer.start()
    try:
        observer.listen(lambda *offer: None, heard.append)
        for i, (session, turn) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]):
            assert observer.submit(_agent_call(session, turn, time.time() - 60 + 10 * i))
        await observer.flush()
        await asyncio.sleep(0.2)
    finally:
        await observer.close()
    [(key, messages, tools, sessions)] = heard[-1]
    assert [m["role"] for m in messages] == ["system"] and tools == [] and sessions >= 2
    again: list[list] = []
    restarted = ObserverProcess(Settings(db=db))
    await restarted.start()
    try:
        restarted.listen(lambda *offer: None, again.append)
        for _ in range(50):  # named once at once, from the snapshot saved at close
            if again:
                break
            await asyncio.sleep(0.05)
    finally:
        await restarted.close()
    assert again and again[0][0][:2] == (key, messages)


def test_each_message_is_hashed_once_for_both_session_linkers(monkeypatch):
    """The observer's linker and the learner's each link every call; the keys they compare
    (the slowest part of a long session's call) are computed once, by the observer."""
    hashed: list[dict] = []

    def counted(message: dict) -> str:
        hashed.append(message)
        return message_key(message)

    for module in (canonical, sessions, learner, observe):
        monkeypatch.setattr(module, "message_key", counted)
    learning = LearnSink(None)
    observer = Observer(None, sinks=[learning])
    for turn in range(4):
        ex = _agent_call(0, turn, 1_700_000_000.0 + 10 * turn)
        hashed.clear()
        observer.process([ex])
        assert len(hashed) == len(ex.messages) + 1  # its prompt's messages and its answer
        assert learning.learner.session_of(ex.id) == ex.session_id
    assert learning.learner.observed == 4 and ex.session_source == "prefix"


async def test_the_store_says_a_server_writes_to_it_while_one_does(tmp_path):
    """`preheat learn` must know: a server running on the store saves over what it learned."""
    db = f"sqlite:///{tmp_path}/s.db"
    observer = ObserverProcess(Settings(db=db))
    await observer.start()
    try:
        mark = Store(db).serving()
    finally:
        await observer.close()
    assert mark is not None and mark["learning"] is True
    assert Store(db).serving() is None  # stopped cleanly: the mark is gone
    # (a killed server's mark, and several servers': tests/storage/test_store.py)


@pytest.mark.skipif(not TAU_BENCH.exists(), reason="../shared/workloads is not there")
async def test_a_running_server_learns_an_import_once_and_a_restart_not_again(tmp_path):
    """Imported calls are dated before the captures that came first (untimed traces end in
    the past), so neither a running server nor a restarted one finds them by their times."""
    from proxy.importer import import_trace, read_trace

    db = f"sqlite:///{tmp_path}/i.db"
    observer = ObserverProcess(Settings(db=db))
    await observer.start()
    try:
        for turn in range(3):  # captured now: the learner's newest time is after the import's
            assert observer.submit(_agent_call(0, turn, time.time()))
        await observer.flush()
        before = (await observer.learned())["observed"]
        trace = read_trace(TAU_BENCH, limit=3)
        import_trace(trace, Store(db))
        assert max(ex.started_at for ex in trace.exchanges) < time.time() - 30
        for _ in range(100):  # looked for every 2 s
            learned = (await observer.learned())["observed"]
            if learned > before:
                break
            await asyncio.sleep(0.1)
    finally:
        await observer.close()
    assert learned == before + len(trace.exchanges)
    again = LearnSink(Store(db))  # a restart: the saved snapshot says the import was learned
    assert again.catch_up() == 0 and again.catch_up_imports() == 0
    assert again.learner.observed == learned


async def test_the_observer_deletes_what_is_older_than_retain_days(tmp_path):
    """The store's single writer enforces retention, between the captures it writes."""
    db = f"sqlite:///{tmp_path}/r.db"
    store = Store(db)
    old = [_exchange(i) for i in range(3)]
    for ex in old:
        ex.started_at = time.time() - 10 * 86400
    store.write(old)
    with store.engine.begin() as conn:  # captured ten days ago
        conn.exec_driver_sql("UPDATE exchanges SET stored_at = started_at")
    observer = ObserverProcess(Settings(db=db, retain_days=7, learn=False))
    await observer.start()
    try:
        assert observer.submit(_exchange(3))
        await observer.flush()
        for _ in range(200):  # the first pass begins at start, messages are searched after
            if store.count() == {"exchanges": 1, "imported": 0, "sessions": 1, "messages": 1}:
                break
            await asyncio.sleep(0.05)
    finally:
        await observer.close()
    assert store.count() == {"exchanges": 1, "imported": 0, "sessions": 1, "messages": 1}
    assert [ex.request_json["messages"][0]["content"] for ex in store.exchanges()] == ["3"]


async def test_two_servers_on_one_store_each_take_up_what_they_learned(db_url):
    """Two hosts' servers capture to one database (a balancer sends each agent to one of
    them): both are marked as serving while they run, and each saves, and after a restart
    takes up, what it learned itself, not whichever server saved last."""
    from storage.learned import load_learned, server_name

    store = Store(db_url)
    a = ObserverProcess(Settings(db=db_url, port=18081))
    b = ObserverProcess(Settings(db=db_url, port=18082))
    await a.start()
    await b.start()
    try:
        now = time.time()
        for turn in range(3):  # server b's agent, then server a's two, later
            assert b.submit(_agent_call(2, turn, now - 100 + turn))
        for i, (session, turn) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert a.submit(_agent_call(session, turn, now - 60 + 10 * i))
        await a.flush()
        await b.flush()
        assert len(store.servers()) == 2
    finally:
        await b.close()  # b saves last
        assert len(store.servers()) == 1  # a's mark outlives b's
        await a.close()
    assert store.servers() == []
    assert load_learned(store, server=server_name(18081))["observed"] == 4
    assert load_learned(store, server=server_name(18082))["observed"] == 3
    restarted = ObserverProcess(Settings(db=db_url, port=18081))
    await restarted.start()
    try:
        assert (await restarted.learned())["observed"] == 4
    finally:
        await restarted.close()
    store.close()


async def test_a_named_server_takes_up_its_own_snapshot_on_a_new_host(db_url):
    """A Kubernetes Deployment's pod comes back with a new host name: named with
    PREHEAT_SERVER_NAME, it takes up what its name saved, not whatever server saved last."""
    from storage.learned import load_learned

    store = Store(db_url)
    now = time.time()
    # Another server saves last. Its calls are dated before desk's last, so desk's catch-up
    # does not take them: 4 observed is desk's snapshot, 6 the other's (begun from desk's).
    for settings, calls in ((Settings(db=db_url, port=18081, server_name="desk"), 4),
                            (Settings(db=db_url, port=18082), 2)):
        server = ObserverProcess(settings)
        await server.start()
        try:
            for i in range(calls):
                assert server.submit(_agent_call(i // 2, i % 2, now - 100 + 10 * i))
            await server.flush()
        finally:
            await server.close()
    assert load_learned(store, server="desk")["observed"] == 4
    elsewhere = ObserverProcess(Settings(db=db_url, port=18083, server_name="desk"))
    await elsewhere.start()  # another host and port, the same name
    try:
        assert (await elsewhere.learned())["observed"] == 4
    finally:
        await elsewhere.close()
    store.close()
