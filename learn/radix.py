"""A templated radix tree over token ids: which prompt prefixes many sessions share.

Every learned prompt is inserted as its token ids. Edges are compressed (a node's `key` is a
run of ids), children are found by their first id, and each node counts the distinct
sessions and tenants whose prompts pass through it. A prefix that at least `k` sessions
share is static text (system prompts, tool schemas, few-shot blocks, shared documents); the
point where the counts drop is where the sessions' own text begins.

Public API: `insert`, `match`, `static_prefixes`, `prune`, `check`, `pretty_print`, and
`RadixTree.simulate` to build a tree from plain sequences in tests. Memory is bounded by
`max_tokens`: past it, `insert` prunes the least recently used leaves (cold branches) until
the tree holds `prune_to` of the bound.
"""

from __future__ import annotations

import bisect
import heapq
from typing import Callable, Iterable, NamedTuple, Sequence

import xxhash

_HASH_RANGE = float(1 << 64)


class MatchResult(NamedTuple):
    length: int
    """How many leading ids of the query the tree holds."""
    sessions: int
    """Distinct sessions that share that whole prefix."""
    tenants: int


class InsertResult(NamedTuple):
    matched: int
    """Ids of the prompt that were already in the tree before this insert."""
    added: int
    """Ids newly stored (0 when the prompt was already there)."""
    split: bool
    """Whether an edge was split (a new branch point appeared)."""


class StaticPrefix(NamedTuple):
    tokens: tuple[int, ...]
    sessions: int
    tenants: int
    uses: int
    """Prompts inserted through this prefix."""
    last_used: int
    """The insert clock when a prompt last went through it (higher is more recent)."""


class Node:
    __slots__ = ("key", "children", "parent", "sessions", "tenants", "uses", "ends", "last")

    def __init__(self, key: tuple[int, ...], parent: "Node | None") -> None:
        self.key = key
        self.children: dict[int, Node] = {}
        self.parent = parent
        self.sessions: list[int] = []
        """The smallest session hashes seen (a k-minimum-values sketch): exact below the cap."""
        self.tenants: list[int] = []
        self.uses = 0
        self.ends = 0
        """Prompts that ended exactly here."""
        self.last = 0


def _add(sketch: list[int], h: int, cap: int) -> None:
    if h in sketch:
        return
    if len(sketch) < cap:
        bisect.insort(sketch, h)
    elif h < sketch[-1]:
        sketch.pop()
        bisect.insort(sketch, h)


def _estimate(sketch: list[int], cap: int) -> int:
    """Distinct count: exact below `cap`, the k-minimum-values estimate above it."""
    if len(sketch) < cap:
        return len(sketch)
    return max(cap, int((cap - 1) * _HASH_RANGE / (sketch[-1] + 1)))


def _hash(value: str) -> int:
    return xxhash.xxh3_64_intdigest(value.encode())


def common_length(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of `a` and `b[start:]`, by galloping slice compares.

    Slices compare in C, so an 8k-id prompt costs a handful of compares, not 8k steps.
    """
    limit = min(len(a), len(b) - start)
    step, lo = 8, 0
    while lo < limit:
        hi = min(limit, lo + step)
        if a[lo:hi] != b[start + lo : start + hi]:
            break
        lo = hi
        step *= 4
    else:
        return limit
    hi = min(limit, lo + step)
    while lo < hi:  # invariant: a[:lo] matches, a[:hi+1] does not (beyond hi)
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixTree:
    """Compressed prefix tree of token ids with distinct session and tenant counts per node.

    Not thread-safe. `k` is the number of distinct sessions that make a prefix static.
    """

    def __init__(
        self, k: int = 2, max_tokens: int = 2_000_000, prune_to: float = 0.8, sketch: int = 16
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.max_tokens = max_tokens
        self.prune_to = prune_to
        self.sketch = max(sketch, k + 1)
        self.root = Node((), None)
        self.tokens = 0
        """Ids stored on all edges (what the memory bound counts)."""
        self.nodes = 1
        self.clock = 0

    # -- public API ------------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], session: str = "", tenant: str = "") -> InsertResult:
        """Add one prompt. Side effects: splits at most one edge; may prune cold leaves."""
        ids = tokens if isinstance(tokens, tuple) else tuple(tokens)
        self.clock += 1
        sh, th = _hash(session), _hash(tenant)
        node, i, n, split = self.root, 0, len(ids), False
        self._touch(node, sh, th)
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                leaf = Node(ids[i:], node)
                node.children[ids[i]] = leaf
                self.tokens += n - i
                self.nodes += 1
                self._touch(leaf, sh, th)
                leaf.ends += 1
                result = InsertResult(i, n - i, split)
                break
            key = child.key
            if ids[i : i + len(key)] == key:
                node = child
                i += len(key)
                self._touch(node, sh, th)
                continue
            m = common_length(key, ids, i)
            node = self._split(child, m)
            split = True
            i += m
            self._touch(node, sh, th)
        else:
            node.ends += 1
            result = InsertResult(n, 0, split)
        if self.tokens > self.max_tokens:
            self.prune(int(self.max_tokens * self.prune_to))
        return result

    def match(self, tokens: Sequence[int]) -> MatchResult:
        """The longest prefix of `tokens` in the tree, and who shares it. No side effects."""
        ids = tokens if isinstance(tokens, tuple) else tuple(tokens)
        node, i, n = self.root, 0, len(ids)
        best = self.root
        while i < n:
            child = node.children.get(ids[i])
            if child is None:
                break
            m = common_length(child.key, ids, i)
            i += m
            best = child
            if m < len(child.key):
                break
            node = child
        return MatchResult(i, self._count(best.sessions), self._count(best.tenants, tenants=True))

    def static_prefixes(self, k: int | None = None, min_tokens: int = 1) -> list[StaticPrefix]:
        """Maximal prefixes shared by at least `k` sessions, most shared first.

        A prefix is reported where the sharing drops: at a node with at least `k` sessions
        none of whose children has as many. A shared document after a shared system prompt
        gives two prefixes (the longer one shared by fewer sessions).
        """
        k = self.k if k is None else k
        out: list[StaticPrefix] = []
        stack: list[tuple[Node, tuple[int, ...]]] = [(c, c.key) for c in self.root.children.values()]
        while stack:
            node, path = stack.pop()
            count = self._count(node.sessions)
            if count < k:
                continue
            kids = [c for c in node.children.values() if self._count(c.sessions) >= k]
            if all(self._count(c.sessions) < count for c in node.children.values()):
                if len(path) >= min_tokens:
                    out.append(StaticPrefix(path, count, self._count(node.tenants, True),
                                            node.uses, node.last))
            stack.extend((c, path + c.key) for c in kids)
        out.sort(key=lambda p: (-p.sessions, -len(p.tokens)))
        return out

    def prune(self, target_tokens: int) -> int:
        """Drop least recently used leaves until at most `target_tokens` ids remain.

        Shared prefixes live in inner nodes, so they outlast the per-session tails that hang
        off them. Returns the number of ids removed.
        """
        before = self.tokens
        heap = [(leaf.last, id(leaf), leaf) for leaf in self._leaves()]
        heapq.heapify(heap)
        while heap and self.tokens > target_tokens:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            if parent is None or leaf.children or parent.children.get(leaf.key[0]) is not leaf:
                continue
            del parent.children[leaf.key[0]]
            self.tokens -= len(leaf.key)
            self.nodes -= 1
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last, id(parent), parent))
            elif parent is not self.root and len(parent.children) == 1 and parent.ends == 0:
                (only,) = parent.children.values()
                if only.sessions == parent.sessions:  # a pass-through that says nothing more
                    self._merge_child(parent)
        return before - self.tokens

    def check(self) -> None:
        """Raise AssertionError if an invariant is broken (for tests and after restores)."""
        tokens, nodes = 0, 1
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.key, "empty edge"
                assert child.key[0] == first, "child filed under the wrong id"
                assert child.parent is node, "broken parent link"
                assert child.uses <= node.uses, "child used more than its parent"
                assert set(child.sessions) <= set(node.sessions) or len(node.sessions) >= self.sketch
                assert child.children or child.ends > 0, "leaf that no prompt ended at"
                if len(child.children) == 1 and child.ends == 0:
                    (only,) = child.children.values()
                    assert only.sessions != child.sessions, "uncompressed node"
                tokens += len(child.key)
                nodes += 1
                stack.append(child)
        assert tokens == self.tokens, f"token count {self.tokens} != {tokens} stored"
        assert nodes == self.nodes, f"node count {self.nodes} != {nodes}"

    def pretty_print(
        self, decode: Callable[[Sequence[int]], str] | None = None, width: int = 60,
        max_nodes: int = 200,
    ) -> str:
        """A readable dump: one line per node with its sessions, uses and the start of its edge."""
        lines = [f"radix: {self.nodes} nodes, {self.tokens} ids, k={self.k}"]
        stack: list[tuple[Node, int]] = [(c, 1) for c in self._sorted(self.root)]
        while stack and len(lines) <= max_nodes:
            node, depth = stack.pop()
            if decode is not None:
                text = decode(node.key[:width])
            else:
                text = " ".join(str(t) for t in node.key[:8]) + (" ..." if len(node.key) > 8 else "")
            text = text.replace("\n", "\\n")[:width]
            lines.append(
                f"{'  ' * depth}[{len(node.key)} ids] sessions={self._count(node.sessions)} "
                f"tenants={self._count(node.tenants, True)} uses={node.uses} ends={node.ends} "
                f"| {text}"
            )
            stack.extend((c, depth + 1) for c in self._sorted(node))
        if stack:
            lines.append(f"... {self.nodes - len(lines) + 1} more nodes")
        return "\n".join(lines)

    @classmethod
    def simulate(
        cls, prompts: Iterable[tuple[str, Sequence[int]] | tuple[str, str, Sequence[int]]], **kw
    ) -> "RadixTree":
        """A tree built from (session, ids) or (session, tenant, ids) tuples, for tests."""
        tree = cls(**kw)
        for item in prompts:
            if len(item) == 2:
                tree.insert(item[1], session=item[0])
            else:
                tree.insert(item[2], session=item[0], tenant=item[1])
        return tree

    def __len__(self) -> int:
        return self.tokens

    # -- helpers ---------------------------------------------------------------------------

    def _touch(self, node: Node, session_hash: int, tenant_hash: int) -> None:
        node.uses += 1
        node.last = self.clock
        _add(node.sessions, session_hash, self.sketch)
        _add(node.tenants, tenant_hash, 8)

    def _count(self, sketch: list[int], tenants: bool = False) -> int:
        return _estimate(sketch, 8 if tenants else self.sketch)

    def _split(self, child: Node, m: int) -> Node:
        """Cut `child`'s edge after `m` ids; the new middle node inherits its counts."""
        parent = child.parent
        assert parent is not None and 0 < m < len(child.key)
        mid = Node(child.key[:m], parent)
        mid.sessions, mid.tenants = list(child.sessions), list(child.tenants)
        mid.uses, mid.last = child.uses, child.last
        parent.children[child.key[0]] = mid
        child.key = child.key[m:]
        child.parent = mid
        mid.children[child.key[0]] = child
        self.nodes += 1
        return mid

    def _merge_child(self, node: Node) -> None:
        """Fold a node's only child into it (after pruning left it a pass-through)."""
        (child,) = node.children.values()
        node.key = node.key + child.key
        node.children = child.children
        for grandchild in node.children.values():
            grandchild.parent = node
        node.sessions, node.tenants = child.sessions, child.tenants
        node.uses, node.ends, node.last = child.uses, child.ends, max(node.last, child.last)
        self.nodes -= 1

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def _sorted(self, node: Node) -> list[Node]:
        return sorted(node.children.values(), key=lambda c: c.uses)
