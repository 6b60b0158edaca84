"""Eviction hints in preheat's own vLLM: a call may ask for its blocks to be evicted first.

vLLM keeps a finished call's blocks cached in a free queue and evicts from its front, the
blocks used least recently first. Under cache pressure that is the wrong order for agents:
the session that has sat longest in its tool call is the one about to come back, and a
session that will not come back (or that admission did not count on keeping) holds the
blocks used most recently. A call sent with `vllm_xargs: {"preheat_evict_first": N}` has its
blocks past the first N tokens put at the front of the queue when it finishes (its last
block first), still cached, so a later call finds them if nothing needed the room meanwhile,
and anything that does need room takes them before any other session's history. Its first N
tokens (a prefix other sessions share) are freed as vLLM frees any call's.

vLLM loads this in each of its processes (entry point `vllm.general_plugins`, pyproject.toml);
it changes nothing unless PREHEAT_EVICTION_HINTS=1 is set, as preheat sets it for the engine
it runs (`engine.process.engine_env`), and a call without the hint is freed as before. Tested
on the real engine: tests/engine/test_eviction_hints.py.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("preheat.vllm_plugin")
HINT = "preheat_evict_first"
ENV = "PREHEAT_EVICTION_HINTS"


def register() -> None:
    """vLLM's plugin entry point: patch the KV cache manager's free, if asked to."""
    if os.environ.get(ENV) != "1":
        return
    try:
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_manager import KVCacheManager
    except ImportError:  # a vLLM without these: run as it is
        log.warning("preheat's eviction hints need vLLM's V1 KV cache manager; not installed")
        return
    if getattr(KVCacheManager.free, "_preheat", False):
        return
    free, free_blocks = KVCacheManager.free, BlockPool.free_blocks

    def hinted_free(self, request) -> None:
        keep = _hint(request)
        if keep is None:
            return free(self, request)
        pool = self.block_pool
        managers = getattr(self.coordinator, "single_type_managers", ())
        block_size = managers[0].block_size if managers else 16
        pool._preheat_keep = keep // max(1, block_size)
        try:
            free(self, request)
        finally:
            pool._preheat_keep = None

    def hinted_free_blocks(self, ordered_blocks) -> None:
        keep = getattr(self, "_preheat_keep", None)
        if keep is None:
            return free_blocks(self, ordered_blocks)
        self._preheat_keep = None  # once: a request's blocks come in one call per group
        blocks = list(ordered_blocks)  # the request's last block first
        cut = max(0, len(blocks) - keep)  # (a head as long as the request: all kept)
        head, rest = blocks[cut:], blocks[:cut]
        first = []
        for block in rest:
            if block.pool is not None and block.pool is not self:
                free_blocks(self, [block])
                continue
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                first.append(block)
        self.free_block_queue.prepend_n(first)
        free_blocks(self, head)

    hinted_free._preheat = True
    KVCacheManager.free = hinted_free
    BlockPool.free_blocks = hinted_free_blocks
    log.info("preheat's eviction hints are on")


def _hint(request) -> int | None:
    params = getattr(request, "sampling_params", None)
    args = getattr(params, "extra_args", None)
    if not isinstance(args, dict):
        return None
    value = args.get(HINT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
