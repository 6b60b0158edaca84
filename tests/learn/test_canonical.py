"""Parsing JSON for identity and storage: what cannot be stored is refused as not JSON."""

from __future__ import annotations

import pytest

from learn.canonical import canonical_json, loads


@pytest.mark.parametrize("text,reason", [
    ('{"content": "\\ud800"}', "lone surrogate"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("{", "Expecting"),
])
def test_what_no_store_or_hash_could_take_is_not_json(text, reason):
    with pytest.raises(ValueError, match=reason):
        loads(text)


def test_paired_surrogate_escapes_and_wide_integers_still_parse():
    value = loads('{"emoji": "\\ud83d\\ude00", "n": 123456789012345678901234567890}')
    assert value["emoji"] == "\U0001F600"
    assert canonical_json(value)  # and it hashes
