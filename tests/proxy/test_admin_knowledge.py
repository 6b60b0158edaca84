"""Where the admin page's learner comes from when the proxy has no live one."""

from __future__ import annotations

import json

from learn.learner import Learner
from proxy.admin import knowledge as knowledge_module
from proxy.admin.knowledge import Knowledge
from proxy.exchange import Exchange
from storage.learned import save_learned
from storage.store import Store


def _call(i: int) -> Exchange:
    body = {"model": "m", "messages": [{"role": "system", "content": "You are a helpful agent."},
                                       {"role": "user", "content": f"question {i}"}]}
    return Exchange(method="POST", path="/v1/chat/completions", status=200, started_at=100.0 + i,
                    request_headers=[("content-type", "application/json")],
                    request_body=json.dumps(body).encode())


def test_a_large_store_with_a_snapshot_is_read_from_it_and_a_small_one_is_learned(tmp_path,
                                                                                  monkeypatch):
    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.write([_call(i) for i in range(3)])
    learned = Learner()
    learned.observe(_call(0))
    save_learned(store, learned.snapshot())

    small = Knowledge(store)
    assert small.learner().observed == 3 and small.source == "store"

    monkeypatch.setattr(knowledge_module, "REBUILD_LIMIT", 2)
    large = Knowledge(store)
    assert large.learner().observed == 1 and large.source == "snapshot"
