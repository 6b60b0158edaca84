"""One real vLLM engine for the whole test run (CPU build, the 256 x 4 offline model).

Engine tests are marked `engine` and skipped with PREHEAT_SKIP_ENGINE=1. They share the
session's event loop, because the engine's watcher and the KV mirror are tasks on it. The
engine runs as a subprocess, so vLLM's import-time warnings never reach pytest. Its KV cache
holds 16,384 tokens (128 blocks of 128: 32 MiB at bfloat16, 64 MiB in float32): small enough
that a few prompts evict others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from engine.model import ensure_default_model
from engine.supervisor import Engine, kv_bytes

KV_CACHE_BYTES = kv_bytes(32 << 20)
"""16,384 tokens in the engine's dtype: 32 MiB at bfloat16, 64 MiB where it runs in float32."""
SKIP = os.environ.get("PREHEAT_SKIP_ENGINE") == "1"


def pytest_collection_modifyitems(config, items):
    if not SKIP:
        return
    skip = pytest.mark.skip(reason="PREHEAT_SKIP_ENGINE=1")
    for item in items:
        if item.get_closest_marker("engine"):
            item.add_marker(skip)


@dataclass
class RunningEngine:
    engine: Engine
    mirror: object  # engine.mirror.KVMirror (imported lazily: pyzmq is an engine extra)

    @property
    def model(self) -> str:
        return self.engine.served_model_name


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The 256 x 4 offline model, built once per machine (about 10 s) in a child Python, so
    that torch's import-time warnings stay out of pytest."""
    return ensure_default_model(256, 4)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def running(tiny_model, tmp_path_factory):
    from engine.mirror import KVMirror

    engine = Engine(
        str(tiny_model),
        kv_cache_bytes=KV_CACHE_BYTES,
        work_dir=tmp_path_factory.mktemp("engine"),
        health_timeout=240,
        env={"VLLM_SERVER_DEV_MODE": "1"},  # for /reset_prefix_cache
    )
    mirror = KVMirror.for_engine(engine)
    await mirror.start()
    try:
        await engine.start()
        yield RunningEngine(engine, mirror)
    finally:
        await engine.stop()
        await mirror.stop()
