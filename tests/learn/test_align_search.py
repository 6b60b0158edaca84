"""The galloping prefix and suffix search agrees with the plain character-by-character one."""

from __future__ import annotations

import random

import pytest

from learn.align import common_prefix, common_suffix


def plain_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_plain_search(seed):
    rng = random.Random(seed)
    shared = "".join(rng.choice("ab") for _ in range(rng.randint(0, 3000)))
    a = shared + "".join(rng.choice("abc") for _ in range(rng.randint(0, 50)))
    b = shared + "".join(rng.choice("abc") for _ in range(rng.randint(0, 50)))
    assert common_prefix(a, b) == plain_prefix(a, b)
    limit = rng.randint(0, 4000)
    assert common_suffix(a, b, limit) == min(limit, plain_prefix(a[::-1], b[::-1]))


def test_edges():
    assert common_prefix("", "abc") == 0
    assert common_prefix("abc", "abc") == 3
    assert common_suffix("xabc", "yabc", 10) == 3
    assert common_suffix("abc", "abc", 2) == 2
