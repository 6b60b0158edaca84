"""The templated radix tree, checked against brute force on plain sequences."""

from __future__ import annotations

import random

import pytest

from learn.radix import RadixTree


def brute_match(prompts: list[tuple[str, list[int]]], query: list[int]) -> tuple[int, int]:
    """Longest prefix of `query` any prompt starts with, and how many sessions share it."""
    def lcp(a, b):
        n = 0
        while n < len(a) and n < len(b) and a[n] == b[n]:
            n += 1
        return n

    best = max((lcp(ids, query) for _, ids in prompts), default=0)
    sessions = {s for s, ids in prompts if lcp(ids, query) >= best}
    return best, len(sessions) if best else len({s for s, _ in prompts})


CASES = [
    pytest.param([("a", [1, 2, 3]), ("b", [1, 2, 4])], [1, 2, 9], id="split-at-branch"),
    pytest.param([("a", [1, 2, 3]), ("a", [1, 2, 3, 4, 5])], [1, 2, 3, 4, 5, 6], id="continuation"),
    pytest.param([("a", [5, 6]), ("b", [7, 8])], [9], id="no-common-prefix"),
    pytest.param([("a", [1] * 50), ("b", [1] * 20 + [2])], [1] * 30, id="long-repeats"),
    pytest.param([("a", [])], [1], id="empty-prompt"),
]


@pytest.mark.parametrize("prompts, query", CASES)
def test_match_agrees_with_brute_force(prompts, query):
    tree = RadixTree.simulate(prompts)
    tree.check()
    got = tree.match(query)
    want_len, want_sessions = brute_match(prompts, query)
    assert got.length == want_len
    if want_len:
        assert got.sessions == want_sessions


@pytest.mark.parametrize("seed", range(5))
def test_random_inserts_keep_invariants_and_counts(seed):
    rng = random.Random(seed)
    system = [rng.randrange(50) for _ in range(rng.randint(0, 30))]
    prompts = []
    for s in range(12):
        conv = system + [rng.randrange(50) for _ in range(rng.randint(0, 5))]
        for _ in range(rng.randint(1, 4)):  # an agent loop: each prompt extends the last
            conv = conv + [rng.randrange(50) for _ in range(rng.randint(1, 6))]
            prompts.append((f"s{s}", list(conv)))
    rng.shuffle(prompts)
    tree = RadixTree.simulate(prompts, k=2)
    tree.check()
    for _, ids in prompts:
        assert tree.match(ids).length == len(ids)
    query = system + [99]
    want_len, want_sessions = brute_match(prompts, query)
    got = tree.match(query)
    assert (got.length, got.sessions) == (want_len, want_sessions)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_static_prefixes_are_shared_by_k_sessions(k):
    rng = random.Random(k)
    system = [rng.randrange(1000) for _ in range(40)]
    document = [rng.randrange(1000) for _ in range(25)]
    prompts = [(f"s{i}", system + [1000 + i] * 3) for i in range(k + 2)]
    prompts += [(f"d{i}", system + document + [2000 + i]) for i in range(k)]  # k sessions reuse it
    tree = RadixTree.simulate(prompts, k=k)
    found = {p.tokens: p.sessions for p in tree.static_prefixes()}
    assert found[tuple(system)] == 2 * k + 2
    assert found[tuple(system + document)] == k
    assert all(n >= k for n in found.values())
    tree.check()


def test_tenants_are_counted_apart_from_sessions():
    tree = RadixTree.simulate([("s1", "t1", [1, 2, 3]), ("s2", "t1", [1, 2, 4]), ("s3", "t2", [1, 2, 5])])
    got = tree.match([1, 2])
    assert (got.sessions, got.tenants) == (3, 2)


def test_prune_keeps_memory_bound_and_shared_prefixes():
    rng = random.Random(7)
    system = tuple(rng.randrange(10**6) for _ in range(500))
    tree = RadixTree(k=2, max_tokens=20_000)
    for s in range(300):
        conv = system
        for _ in range(5):
            conv = conv + tuple(rng.randrange(10**6) for _ in range(40))
            tree.insert(conv, session=f"s{s}")
            assert tree.tokens <= tree.max_tokens
    tree.check()
    assert tree.match(system).length == len(system)
    assert tree.static_prefixes()[0].tokens == system


def test_prune_directly_drops_cold_leaves_first():
    tree = RadixTree.simulate([("a", [1, 2, 3, 4]), ("b", [1, 2, 5, 6]), ("c", [1, 2, 7, 8])])
    removed = tree.prune(target_tokens=tree.tokens - 2)
    tree.check()
    assert removed >= 2
    assert tree.match([1, 2, 7, 8]).length == 4  # the most recent survives
    assert tree.match([1, 2, 3, 4]).length == 2


def test_pretty_print_shows_every_node_with_counts():
    tree = RadixTree.simulate([("a", [1, 2, 3]), ("b", [1, 2, 4])])
    dump = tree.pretty_print(decode=lambda ids: "-".join(map(str, ids)))
    assert dump.splitlines()[0].startswith(f"radix: {tree.nodes} nodes")
    assert "1-2" in dump and "sessions=2" in dump and "sessions=1" in dump


def test_check_catches_a_broken_tree():
    tree = RadixTree.simulate([("a", [1, 2, 3]), ("b", [1, 2, 4])])
    tree.tokens += 1
    with pytest.raises(AssertionError):
        tree.check()


def test_insert_reports_what_was_new():
    tree = RadixTree()
    first = tree.insert([1, 2, 3], "a")
    again = tree.insert([1, 2, 3, 4], "a")
    assert (first.matched, first.added) == (0, 3)
    assert (again.matched, again.added) == (3, 1)
