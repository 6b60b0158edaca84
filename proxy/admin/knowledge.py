"""What `learn/` knows, as the admin pages show it. Synchronous: call from a worker thread.

The learner is a recent copy of the proxy's live one when the app has one (it learns in the
observer process), else one the admin page feeds itself from the store: every stored
exchange, in arrival order, then only the new ones on later views. A store past
`REBUILD_LIMIT` exchanges that holds a saved snapshot (storage/learned.py, `preheat learn`)
is read from the snapshot instead. Either way the pages call `Learner` methods, one page at
a time; nothing here learns anything itself.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Callable, TypeVar

from learn.learner import Learner
from proxy.admin import queries
from storage.store import Store

log = logging.getLogger("preheat.admin")
T = TypeVar("T")
REBUILD_LIMIT = 100_000


class Knowledge:
    def __init__(self, store: Store, live: Callable[[], Learner | None] = lambda: None) -> None:
        self.store = store
        self._live = live
        self._lock = threading.Lock()
        self._own: Learner | None = None
        self._seen: set[str] = set()
        self.source = "none"
        """Where the learner came from: 'live', 'store' (fed here) or 'snapshot'."""

    def learner(self) -> Learner | None:
        """The live learner, or the admin's own one brought up to date with the store."""
        live = self._live()
        if live is not None:
            self.source = "live"
            return live
        with self._lock:
            if self.source == "snapshot":
                return self._own
            if self._own is None and self.store.count_exchanges() > REBUILD_LIMIT:
                from storage.learned import load_learned

                try:
                    data = load_learned(self.store)
                except Exception:  # no snapshot table in this store: learn from it instead
                    data = None
                if data is not None:
                    self._own, self.source = Learner.restore(data), "snapshot"
                    return self._own
            if self._own is None:
                self._own, self.source = Learner(), "store"
                for ex in self.store.exchanges():
                    self._own.observe(ex)
                    self._seen.add(ex.id)
            else:
                for ex_id in queries.exchange_ids_after(self.store, self._seen):
                    ex = self.store.exchange(ex_id)
                    if ex is not None:
                        self._own.observe(ex)
                    self._seen.add(ex_id)
            return self._own

    def read(self, fn: Callable[[Learner], T], default: T) -> T:
        """`fn(learner)`, or `default` when there is nothing learned to read."""
        learner = self.learner()
        if learner is None:
            return default
        with self._lock:
            return fn(learner)


# -- views over a learner ----------------------------------------------------------------------


def template_lines(learner: Learner, tpl) -> list[dict]:
    """A call template as lines of static text and slots: {'role', 'parts', 'slots'}."""
    lines = [{"role": "call", "parts": [tpl.path + (f"  tools: {', '.join(tpl.tools)}"
                                                    if tpl.tools else "")], "slots": []}]
    lines += [_element(learner, el) for el in tpl.head]
    if tpl.turn is not None:
        lines.append({"role": "…", "parts": ["conversation so far"], "slots": []})
        lines += [_element(learner, el) for el in tpl.turn]
    return lines


def _element(learner: Learner, el: str) -> dict:
    if el.startswith("tool:"):
        return {"role": "tool", "parts": ["", ""], "slots": [f"{el[5:]} result"]}
    if el.startswith("{") and el.endswith("}"):
        return {"role": el[1:-1], "parts": ["", ""], "slots": [el[1:-1]]}
    msg = learner.miner.get(el)
    if msg is None:
        return {"role": "?", "parts": [el], "slots": []}
    return {"role": msg.role, "parts": list(msg.parts), "slots": list(msg.slots), "id": msg.id,
            "messages": msg.messages, "sessions": msg.sessions}


def label(learner: Learner, tpl) -> str:
    """A short name for a call template: what its newest turn is, or its first call's task."""
    if tpl.turn:
        return "after " + ", ".join(t[5:] if t.startswith("tool:") else t for t in tpl.turn)
    for el in tpl.head:  # the agent's instructions say which agent this is
        line = _element(learner, el)
        text = " ".join(line["parts"][0].split())
        if text:
            return "start: " + (text if len(text) <= 40 else text[:39] + "…")
    return "start"


def advice(learner: Learner, tpl) -> str | None:
    """Say so when variable text comes before the shared text (no prefix cache can help)."""
    if not tpl.head:
        return None
    first = _element(learner, tpl.head[0])
    static = sum(len(p) for p in first["parts"])
    if first["slots"] and len(first["parts"][0].strip()) < 0.2 * max(static, 1) and static > 200:
        return (f"The {first['role']} message starts with variable text ({{{first['slots'][0]}}}) "
                "before most of its fixed text, so no prefix cache can share it between calls: "
                "move the variable part after the fixed text.")
    return None


def templates(k: Knowledge) -> list[dict]:
    def read(learner: Learner) -> list[dict]:
        return [{**asdict(t), "label": label(learner, t),
                 "workflow": learner.graph.workflow_of(t.id)} for t in learner.templates()]

    return k.read(read, [])


def message_templates(k: Knowledge) -> list[dict]:
    return k.read(lambda learner: [{**asdict(m), "text": m.text}
                                   for m in learner.message_templates()], [])


def template(k: Knowledge, template_id: str, examples: int = 10) -> dict | None:
    recent = queries.recent_exchange_ids(k.store)

    def read(learner: Learner) -> dict | None:
        tid = learner.registry.resolve(template_id)
        tpl = learner.registry.get(tid)
        if tpl is None:
            return None
        wid = learner.graph.workflow_of(tpl.id)
        flows = [w for w in learner.workflows() if w.id == wid]
        edges = [asdict(e) for w in flows for e in w.edges if tpl.id in (e.src, e.dst)]
        found = []
        for ex_id in recent:
            if learner.template_of(ex_id) == tpl.id:
                found.append(ex_id)
                if len(found) >= examples:
                    break
        names = {}
        for e in edges:
            for t in (e["src"], e["dst"]):
                other = learner.registry.get(t)
                names[t] = label(learner, other) if other is not None else t
        return {**asdict(tpl), "label": label(learner, tpl), "lines": template_lines(learner, tpl),
                "workflows": [w.id for w in flows], "edges": edges, "names": names,
                "examples": found, "advice": advice(learner, tpl)}

    return k.read(read, None)


def workflows(k: Knowledge) -> list[dict]:
    def read(learner: Learner) -> list[dict]:
        out = []
        for w in learner.workflows():
            names = {n.template: label(learner, t) for n in w.nodes
                     if (t := learner.registry.get(n.template)) is not None}
            out.append({"id": w.id, "instances": w.instances, "width": w.width,
                        "nodes": len(w.nodes), "edges": len(w.edges),
                        "entries": [names.get(e, e) for e in w.entries]})
        return out

    return k.read(read, [])


def workflow(k: Knowledge, workflow_id: str) -> dict | None:
    def read(learner: Learner) -> dict | None:
        for w in learner.workflows():
            if w.id != workflow_id:
                continue
            data = asdict(w)
            for node in data["nodes"]:
                tpl = learner.registry.get(node["template"])
                node["label"] = label(learner, tpl) if tpl else node["template"]
                node["text"] = tpl.text if tpl else ""
            return data
        return None

    return k.read(read, None)


def templates_of(k: Knowledge, exchange_ids: list[str]) -> dict[str, str]:
    """The call template of each exchange the learner still remembers."""
    def read(learner: Learner) -> dict[str, str]:
        out = {}
        for ex_id in exchange_ids:
            tid = learner.template_of(ex_id)
            if tid is not None:
                out[ex_id] = tid
        return out

    return k.read(read, {})

