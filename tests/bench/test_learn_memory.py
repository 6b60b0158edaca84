"""bench/learn_memory.py --quick: every scenario reported in numbers, every bounded store within
its cap (the children run the stores' own integrity checks too)."""

from __future__ import annotations

import json
import math

import pytest

from bench.learn_memory import SCENARIOS, main, marks

BOUNDED = ("template_chars", "templates", "flow_answer_chunks", "flow_cached_chunks",
           "history_bytes", "observer_history_bytes", "linker_prefixes", "observer_prefixes",
           "radix_tokens", "token_cache", "prefix_ids", "head_agents", "head_chars")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("learn-memory") / "learn-memory.md"
    assert main(["--quick", "--out", str(out)]) == 0
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def cost_rows(text: str) -> dict[str, list[list[str]]]:
    """The first table's cells after the scenario, by scenario."""
    table = text.split("\n\n| scenario | calls | fed MB |", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, list[list[str]]] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.setdefault(cells[0], []).append(cells[1:])
    return rows


def test_the_table_gives_every_scenario_at_every_mark_rss_and_ms_as_numbers(quick):
    text, _ = quick
    rows = cost_rows(text)
    assert list(rows) == list(SCENARIOS)
    for name, (_, _, n) in SCENARIOS.items():
        assert [int(r[0]) for r in rows[name]] == marks(name, n)
        for calls, fed, rss, peak, ms, slowest in rows[name]:
            values = [float(v) for v in (rss, peak, ms, slowest)]
            assert all(math.isfinite(v) and v > 0 for v in values), (name, calls, values)
            assert float(fed) >= 0
            assert float(rss) <= float(peak)
    assert "| cap | | 16,000,000 |" in text


def test_every_bounded_store_stays_within_its_cap(quick):
    _, data = quick
    for res in data["scenarios"]:
        caps = res["caps"]
        for row in res["rows"]:
            for key in BOUNDED:
                assert 0 <= row[key] <= caps[key], (res["scenario"], row["calls"], key, row[key])
            assert row["skipped"] == {}, (res["scenario"], row["skipped"])


def test_the_template_bound_acts_in_the_quick_run(quick):
    """The quick run is sized so that one bound really acts: 240 prompts of 100 KB, 16 M cap."""
    _, data = quick
    (res,) = [r for r in data["scenarios"] if r["scenario"] == "distinct-system"]
    last, cap = res["rows"][-1], res["caps"]["template_chars"]
    assert last["fed_mb"] * 1e6 > 1.5 * cap  # fed half as much again as the miner may hold
    assert 0.5 * cap < last["template_chars"] <= cap
    assert last["templates"] < 2 * last["calls"]  # a system prompt and a question per call
