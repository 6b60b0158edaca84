"""Seeded calls on the real CPU engine (engine/vllm_plugin.py, `_patch_seeded_sampling`).

vLLM's CPU build died on the first call with a `seed` whose prompt took more than one step to
prefill (2,048 tokens a step): it winds a seeded call's generator back after each thrown-away
sample, and a CPU generator cannot be wound back. Every other call on the engine then failed."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.engine.test_engine import BLOCK, random_tokens

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]


async def test_a_seeded_call_longer_than_a_step_is_answered_and_reproducible(running):
    prompt = random_tokens(random.Random(5), 24 * BLOCK)  # 3,072 tokens: two steps' prefill

    def body(seed: int) -> dict:
        return {"model": running.model, "prompt": prompt, "max_tokens": 8, "temperature": 1.0,
                "seed": seed, "ignore_eos": True}

    async with httpx.AsyncClient(base_url=running.engine.base_url, timeout=120) as client:
        assert (await client.post("/reset_prefix_cache")).status_code == 200
        first = await client.post("/v1/completions", json=body(11))  # prefilled in two steps
        assert first.status_code == 200, first.text
        again = await client.post("/v1/completions", json=body(11))  # cached: in one step
        assert again.status_code == 200, again.text
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 23 * BLOCK
        other = await client.post("/v1/completions", json=body(12))
        assert other.status_code == 200, other.text
        after = await client.post("/v1/completions", json={
            "model": running.model, "prompt": "still there", "max_tokens": 1})
        assert after.status_code == 200, after.text

    def text(r: httpx.Response) -> str:
        return r.json()["choices"][0]["text"]

    # Not what the random model writes, but that a seed decides it: the sample thrown away
    # after the first step did not move the seed's numbers (the same answer whether the prompt
    # took one step or two), and another seed samples another answer.
    assert text(first) == text(again)
    assert text(other) != text(first)
