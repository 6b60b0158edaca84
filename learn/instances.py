"""Workflow instances: the calls of one run of a workflow.

A call belongs to the instance of the call it continues and of every call whose answer it
contains (union-find: a summariser joins its experts' instance, and two instances it reads
from become one). A call with neither (a root) starts a new instance, unless another root of
the same tenant started within `together` seconds: agents a framework launches at once
(parallel experts, debaters, analysts) arrive within milliseconds of each other.

Memory is bounded: calls and instances are forgotten oldest first past `window`.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import NamedTuple


class Joined(NamedTuple):
    instance: str
    root: bool
    """The call had no predecessor: it starts (or co-starts) its instance."""
    created: bool
    """A new instance was opened for it."""
    costarted: tuple[str, ...]
    """Templates of the roots it started together with."""
    absorbed: tuple[tuple[str, int], ...]
    """(first-root template, roots) of instances merged into this one (one fewer instance each)."""
    first: str
    """The template of the instance's first root: instance counts are kept under it."""


class _Instance:
    __slots__ = ("id", "first", "started", "roots", "calls")

    def __init__(self, iid: str, first: str, started: float) -> None:
        self.id, self.first, self.started = iid, first, started
        self.roots: Counter = Counter()
        self.calls = 0


class Instances:
    """Not thread-safe."""

    def __init__(self, together: float = 0.5, window: int = 50_000) -> None:
        self.together = together
        self.window = window
        self._calls: OrderedDict[str, str] = OrderedDict()
        self._parent: dict[str, str] = {}
        self._info: OrderedDict[str, _Instance] = OrderedDict()
        self._roots: list[tuple[float, str, str]] = []  # (started, tenant, instance), recent
        self._next = 0

    def __len__(self) -> int:
        return len(self._info)

    def find(self, iid: str) -> str:
        root = iid
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        while iid != root:  # path compression
            self._parent[iid], iid = root, self._parent[iid]
        return root

    def of(self, call: str) -> str | None:
        iid = self._calls.get(call)
        return self.find(iid) if iid is not None else None

    def info(self, iid: str) -> _Instance | None:
        return self._info.get(self.find(iid))

    def join(self, call: str, template: str, started: float, tenant: str,
             links: list[str]) -> Joined:
        """Place one call given the calls it is linked to (its parent and its data sources)."""
        found = [i for i in (self.of(c) for c in links) if i is not None and i in self._info]
        absorbed: list[tuple[str, int]] = []
        costarted: tuple[str, ...] = ()
        created = False
        root = not links
        if found:
            target = found[0]
            for other in found[1:]:
                if self.find(other) != self.find(target):
                    absorbed.append(self._union(target, other))
            target = self.find(target)
        else:
            target = self._costart(started, tenant) if root else None
            if target is None:
                target = self._new(template, started)
                created = True
            else:
                costarted = tuple(self._info[target].roots)
            if root:
                self._roots.append((started, tenant, target))
                if len(self._roots) > 256:
                    del self._roots[:128]
        inst = self._info[target]
        inst.calls += 1
        if root:
            inst.roots[template] += 1
        self._info.move_to_end(target)
        self._calls[call] = target
        while len(self._calls) > self.window:
            self._calls.popitem(last=False)
        while len(self._info) > self.window:
            old, _ = self._info.popitem(last=False)
            self._parent.pop(old, None)
        if len(self._parent) > 4 * self.window:  # merged-away ids nobody refers to any more
            live = set(self._calls.values()) | set(self._info)
            self._parent = {k: self.find(k) for k in live if k in self._parent}
        return Joined(target, root, created, costarted, tuple(absorbed), inst.first)

    def _costart(self, started: float, tenant: str) -> str | None:
        for t, who, iid in reversed(self._roots):
            if who == tenant and abs(t - started) <= self.together:
                iid = self.find(iid)
                if iid in self._info:
                    return iid
        return None

    def _new(self, template: str, started: float) -> str:
        self._next += 1
        iid = f"i{self._next}"
        self._info[iid] = _Instance(iid, template, started)
        self._parent[iid] = iid
        return iid

    def _union(self, keep: str, other: str) -> tuple[str, int]:
        """Merge `other` into `keep`; returns the absorbed instance's first template and roots."""
        a, b = self._info[self.find(keep)], self._info.pop(self.find(other))
        self._parent[b.id] = a.id
        a.roots.update(b.roots)
        a.calls += b.calls
        a.started = min(a.started, b.started)
        return b.first, sum(b.roots.values())
