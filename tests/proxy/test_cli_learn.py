"""`preheat learn`, `preheat templates`, `preheat workflows`, and the learned-state store."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.shapes import exchange_of, generate, schedule
from learn.learner import SNAPSHOT_VERSION, Learner
from proxy import cli_learn
from proxy.cli import main
from proxy.learning import LearnSink
from storage.learned import learned_history, load_learned, save_learned
from storage.store import Store


@pytest.fixture
def captured(tmp_path):
    """A store holding three map-reduce instances and three debates, as the proxy captured them."""
    url = f"sqlite:///{tmp_path / 'cap.db'}"
    store = Store(url)
    instances = generate("map_reduce", 3, seed=4) + generate("debate", 3, seed=4)
    store.write([exchange_of(call, s, e) for s, e, call in schedule(instances, seed=4)])
    store.close()
    return url, instances


def test_learn_then_templates_and_workflows(captured, capsys):
    url, instances = captured
    assert main(["learn", "--db", url]) == 0
    out = capsys.readouterr().out
    calls = sum(len(i.calls) for i in instances)
    assert f"learned from {calls} of {calls} exchanges" in out

    direct = Learner()  # the CLI shows what the library learns from the same exchanges
    store = Store(url)
    for ex in store.exchanges():
        direct.observe(ex)
    store.close()

    assert main(["templates", "--json", "--db", url]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in listed["templates"]] == [t.id for t in direct.templates()]
    assert any("{" in m["text"] for m in listed["messages"])

    assert main(["templates", "--db", url]) == 0
    text = capsys.readouterr().out
    assert f"{len(direct.templates())} call templates" in text and "system:" in text

    assert main(["workflows", "--json", "--db", url]) == 0
    flows = json.loads(capsys.readouterr().out)
    assert [w["id"] for w in flows] == [w.id for w in direct.workflows()]
    assert sorted(round(w["width"]) for w in flows) == sorted({i.roots for i in instances})
    assert main(["workflows", "--db", url]) == 0
    assert capsys.readouterr().out.count("workflow w") == len(flows)


def test_a_plain_file_path_names_the_same_sqlite_store(captured, capsys):
    url, instances = captured
    path = url.removeprefix("sqlite:///")
    assert main(["learn", "--db", path]) == 0
    calls = sum(len(i.calls) for i in instances)
    assert f"learned from {calls} of {calls} exchanges" in capsys.readouterr().out
    assert main(["workflows", "--db", url, "--json"]) == 0  # learned through the path
    assert len(json.loads(capsys.readouterr().out)) == 2  # map-reduce and debate


def test_nothing_learned_yet(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREHEAT_DB", f"sqlite:///{tmp_path / 'empty.db'}")
    Store(f"sqlite:///{tmp_path / 'empty.db'}").close()
    assert main(["templates"]) == 0
    assert "run `preheat learn`" in capsys.readouterr().out
    assert main(["workflows", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_register_adds_commands_to_any_parser(captured):
    url, _ = captured
    parser = argparse.ArgumentParser()
    cli_learn.register(parser.add_subparsers())
    for argv in (["learn", "--db", url], ["templates", "--db", url, "--json"], ["workflows", "--db", url]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0


def test_snapshots_are_kept_versioned_and_pruned(captured):
    url, _ = captured
    store = Store(url)
    learner = Learner()
    for ex in store.exchanges():
        learner.observe(ex)
    ids = [save_learned(store, learner.snapshot(), keep=2) for _ in range(3)]
    history = learned_history(store)
    assert [h["id"] for h in history] == ids[:0:-1]
    assert all(h["version"] == SNAPSHOT_VERSION and h["observed"] == learner.observed for h in history)
    assert load_learned(store) == json.loads(json.dumps(learner.snapshot()))
    assert load_learned(store, ids[0]) is None  # pruned
    assert Learner.restore(load_learned(store)).templates() == learner.templates()
    store.close()


def test_an_unreadable_snapshot_is_one_line(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    store = Store(url)
    save_learned(store, {"format": "preheat-learned", "version": SNAPSHOT_VERSION + 5})
    store.close()
    assert main(["templates", "--db", url]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_a_server_restored_from_learn_does_not_learn_the_same_calls_again(captured, capsys):
    url, instances = captured
    assert main(["learn", "--db", url]) == 0
    sink = LearnSink(Store(url))
    assert sink.catch_up() == 0
    assert sink.learner.observed == sum(len(i.calls) for i in instances)


def test_learn_refuses_while_a_server_learns_from_the_store(captured, capsys):
    """Its snapshot would be saved over within a minute by the server's own."""
    url, _ = captured
    Store(url).mark_serving(learning=True)
    assert main(["learn", "--db", url]) == 2
    assert "a preheat serve is learning from this store" in capsys.readouterr().err
    assert load_learned(Store(url)) is None
