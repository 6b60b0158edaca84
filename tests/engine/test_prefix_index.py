"""PrefixIndex on synthetic events: the radix tree of cached blocks."""

from __future__ import annotations

import random

import pytest

from engine.prefix_index import PrefixIndex

BS = 4


def chain(tokens, parent=None, start=0):
    """Block hashes for `tokens` after `parent`, hashed as a chain (like vLLM's)."""
    hashes = []
    for i in range(0, len(tokens) // BS * BS, BS):
        parent = hash((parent, tuple(tokens[i:i + BS])))
        hashes.append(parent)
    return hashes


@pytest.mark.parametrize(
    ("stored", "query", "limit", "expected"),
    [
        ([[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2, 3, 4, 5, 6, 7, 8, 9], None, 8),
        ([[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2, 3, 4, 5, 6, 7, 9], None, 4),
        ([[1, 2, 3, 4, 5, 6, 7, 8]], [9, 2, 3, 4], None, 0),
        ([[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2, 3, 4, 5, 6, 7, 8], 7, 4),  # as a request: len-1
        ([[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2, 3], None, 0),  # shorter than a block
        ([[1, 2, 3, 4], [1, 2, 3, 4, 9, 9, 9, 9]], [1, 2, 3, 4, 9, 9, 9, 9, 0], None, 8),
        ([], [1, 2, 3, 4], None, 0),
    ],
)
def test_lookup(stored, query, limit, expected):
    index = PrefixIndex.from_prompts(stored, BS)
    index.check()
    assert index.cached_prefix_tokens(query, limit) == expected


def test_store_split_across_events_and_remove():
    index = PrefixIndex()
    tokens = list(range(100, 112))
    h = chain(tokens)
    index.stored(h[:2], None, tokens[:8], BS)  # first chunk of a prefill
    index.stored(h[2:], h[1], tokens[8:], BS)  # next chunk names its parent
    assert index.block_size == BS and index.blocks == 3 and index.tokens == 12
    assert index.cached_prefix_tokens(tokens + [1]) == 12
    index.removed([h[1]])  # a middle block leaves: the rest is unreachable, as in vLLM
    assert index.cached_prefix_tokens(tokens + [1]) == 4
    index.stored([h[1]], h[0], tokens[4:8], BS)  # and reachable again once re-stored
    assert index.cached_prefix_tokens(tokens + [1]) == 12
    index.check()


def test_copies_are_counted():
    """The engine can hold one hash in two physical blocks; it leaves with the last copy."""
    index = PrefixIndex(BS)
    h = chain([1, 2, 3, 4])
    index.stored(h, None, [1, 2, 3, 4], BS)
    index.stored(h, None, [1, 2, 3, 4], BS)
    index.removed(h)
    assert index.cached_prefix_tokens([1, 2, 3, 4, 5]) == 4
    index.removed(h)
    assert index.cached_prefix_tokens([1, 2, 3, 4, 5]) == 0 and index.blocks == 0
    index.removed(h)  # unknown blocks are ignored
    index.check()


def test_unmatchable_blocks_are_counted_not_matched():
    index = PrefixIndex(BS)
    index.stored(["salted"], None, [1, 2, 3, 4], BS, matchable=False)
    index.stored(["partial"], None, [1, 2], 2)  # a partial block: never a hit by itself
    assert index.blocks == 2 and index.tokens == 6
    assert index.cached_prefix_tokens([1, 2, 3, 4, 5]) == 0
    index.check()


def test_random_against_brute_force():
    rnd = random.Random(7)
    prompts = [[rnd.randrange(3) for _ in range(rnd.randrange(0, 30))] for _ in range(60)]
    index = PrefixIndex.from_prompts(prompts, BS)
    index.check()
    blocks = {tuple(p[:i + BS]) for p in prompts for i in range(0, len(p) // BS * BS, BS)}
    for _ in range(300):
        query = [rnd.randrange(3) for _ in range(rnd.randrange(0, 30))]
        expected = 0
        while expected + BS <= len(query) and tuple(query[:expected + BS]) in blocks:
            expected += BS
        assert index.cached_prefix_tokens(query) == expected
    assert "x1" in index.pretty_print()
