"""Pre-warm a prefix: have the engine compute and cache it before the call that needs it.

    warmer = Warmer.for_engine(engine, mirror)
    computed = await warmer.warm(token_ids)     # tokens the engine prefilled; 0 if skipped

A warm is a prefill-only request: the prompt as token ids to `/v1/completions`,
`max_tokens: 1`, at the lowest priority, so that with `--scheduling-policy priority` every
real request waiting in the engine is scheduled first. Only whole blocks are cached, so only
whole blocks are sent. A warm is skipped when the mirror says the prefix is already cached or
the engine is not ready, shares the request of an identical warm in flight, waits for one of
`max_concurrency` slots (a bounded backlog, on its own connections, so real traffic never
queues behind it) and is dropped if it could not start before its deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import xxhash

from engine.errors import EngineRequestError

if TYPE_CHECKING:
    from engine.mirror import KVMirror
    from engine.supervisor import Engine

# vLLM runs lower values first; real traffic has 0 (or better) unless told otherwise.
WARM_PRIORITY = 1_000_000


@dataclass(frozen=True)
class WarmStats:
    requests: int  # warm requests sent to the engine
    warmed_tokens: int  # prompt tokens the engine computed for warms
    skipped_cached: int  # warms the mirror showed to be cached already
    shared: int  # warms that joined an identical warm in flight
    dropped: int  # not started before their deadline, or the engine was not ready
    failed: int  # the engine answered an error or could not be reached
    in_flight: int


class Warmer:
    """Sends warms to one engine. Use from one event loop."""

    def __init__(
        self,
        base_url: str,
        model: str,
        mirror: KVMirror | None = None,
        max_concurrency: int = 2,
        priority: int = WARM_PRIORITY,
        block_size: int | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.mirror = mirror
        self.priority = priority
        self.block_size = block_size
        self._ready = ready or (lambda: True)
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrency)
        self._inflight: dict[bytes, asyncio.Task[int]] = {}
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._counts = dict(requests=0, warmed_tokens=0, skipped_cached=0, shared=0,
                            dropped=0, failed=0)

    @classmethod
    def for_engine(cls, engine: Engine, mirror: KVMirror | None = None, **kw: Any) -> Warmer:
        return cls(engine.base_url, engine.served_model_name, mirror,
                   ready=lambda: engine.ready, **kw)

    async def warm(self, token_ids: Sequence[int], deadline: float | None = None) -> int:
        """Warm the whole blocks of `token_ids`; the number of tokens the engine computed
        (0 when skipped or shared). `deadline`: a `time.monotonic()` past which the warm is
        no longer worth starting. Errors are counted, not raised: a warm is advice."""
        tokens = self._whole_blocks(token_ids)
        if not tokens:
            return 0
        if not self._ready():
            self._counts["dropped"] += 1
            return 0
        if self._cached(tokens):
            self._counts["skipped_cached"] += 1
            return 0
        key = xxhash.xxh3_128_digest(repr(tokens).encode())
        task = self._inflight.get(key)
        if task is not None:
            self._counts["shared"] += 1
            await asyncio.shield(task)
            return 0
        task = asyncio.get_running_loop().create_task(self._send(tokens, deadline))
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    def stats(self) -> WarmStats:
        return WarmStats(in_flight=len(self._inflight), **self._counts)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- internals --------------------------------------------------------------------------

    def _whole_blocks(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        size = self.block_size or (self.mirror.index.block_size if self.mirror else None)
        if not size:
            return tuple(token_ids)
        return tuple(token_ids[: len(token_ids) // size * size])

    def _cached(self, tokens: tuple[int, ...]) -> bool:
        if self.mirror is None:
            return False
        cached = self.mirror.cached_prefix_tokens(tokens, as_request=False)
        return cached is not None and cached >= len(tokens)

    async def _send(self, tokens: tuple[int, ...], deadline: float | None) -> int:
        async with self._slots:
            # Re-checked after the wait: the deadline may have passed, another request may
            # have cached the prefix meanwhile.
            if (deadline is not None and time.monotonic() > deadline) or not self._ready():
                self._counts["dropped"] += 1
                return 0
            if self._cached(tokens):
                self._counts["skipped_cached"] += 1
                return 0
            self._counts["requests"] += 1
            try:
                usage = await self._post(tokens)
            except EngineRequestError:
                self._counts["failed"] += 1
                return 0
        details = usage.get("prompt_tokens_details") or {}
        computed = usage.get("prompt_tokens", len(tokens)) - (details.get("cached_tokens") or 0)
        self._counts["warmed_tokens"] += computed
        return computed

    async def _post(self, tokens: tuple[int, ...]) -> dict[str, Any]:
        if self._closed:  # a client made now would outlive its owner, unclosed
            raise EngineRequestError("closed")
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout)
        body = {"model": self.model, "prompt": list(tokens), "max_tokens": 1,
                "temperature": 0.0, "priority": self.priority}
        try:
            response = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineRequestError(f"warm request failed: {exc!r}") from exc
        if response.status_code != 200:
            raise EngineRequestError(
                f"warm refused ({response.status_code}): {response.text[:300]}",
                response.status_code,
            )
        return response.json().get("usage") or {}
