"""A live mirror of what the engine's prefix cache holds, fed by its KV events.

    mirror = KVMirror.for_engine(engine)     # before or after engine.start()
    await mirror.start()
    mirror.cached_prefix_tokens(token_ids)   # int, or None while the mirror does not know
    mirror.stats()                           # MirrorStats
    await mirror.stop()

vLLM publishes each scheduler step's events as three ZMQ frames: topic, an 8-byte big-endian
sequence number and msgpack `[ts, [event, ...], dp_rank]`, each event a map with a "type".
The mirror binds a SUB socket on loopback and the engine connects to it, so a restarted
engine finds it where it was. Sequence numbers are checked: a gap is filled from the engine's
replay socket when it still has the missed batches, otherwise the mirror says "unknown"
(`known` False, lookups None) rather than answer wrong. It knows again when the engine
starts afresh (its sequence restarts at 0; an `Engine` listener tells it too) or clears its
cache. `AllBlocksCleared` empties the mirror: the engine then holds nothing, which is known.

Runs as one asyncio task on zmq.asyncio; handling a batch is proportional to its tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import msgpack
import zmq
import zmq.asyncio

from engine.prefix_index import PrefixIndex

if TYPE_CHECKING:
    from engine.supervisor import Engine

log = logging.getLogger(__name__)

END_SEQ = -1
_OWN_MEDIA = (None, "GPU")  # the engine's own block pool, not an offloading tier


@dataclass(frozen=True)
class MirrorStats:
    known: bool
    blocks: int  # distinct blocks in the prefix cache
    tokens: int  # tokens in those blocks
    block_size: int | None
    capacity_blocks: int | None  # the engine's KV cache size in blocks, when told
    usage: float | None  # blocks / capacity_blocks
    batches: int  # event batches applied
    gaps: int  # sequence gaps seen (filled or not)
    resets: int  # times the mirror forgot everything (restart, clear, unfilled gap)
    last_seq: int | None


class KVMirror:
    """Subscribes to one engine's KV events and mirrors its prefix cache."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "kv-events",
        block_size: int | None = None,
        capacity_blocks: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.capacity_blocks = capacity_blocks
        self.index = PrefixIndex(block_size)
        self.known = False
        self._expected: int | None = None  # next sequence number; None: no stream yet
        self._last_ts = 0.0
        self._last_event_at = 0.0
        self._batches = self._gaps = self._resets = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._engine: Engine | None = None
        self._generation: int | None = None  # of the engine process last seen ready
        self._loss_listeners: list[Callable[[], None]] = []

    @classmethod
    def for_engine(cls, engine: Engine, **kw: Any) -> KVMirror:
        """A mirror of `engine`'s cache that forgets it whenever the engine goes down."""
        from engine.supervisor import KV_EVENTS_TOPIC

        mirror = cls(engine.kv_events_endpoint, engine.kv_replay_endpoint, KV_EVENTS_TOPIC, **kw)
        mirror._engine = engine
        engine.add_listener(mirror._engine_state)
        if engine.cache is not None:
            mirror.capacity_blocks = engine.cache.num_blocks
            mirror.index.block_size = mirror.index.block_size or engine.cache.block_size
        return mirror

    # --- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the SUB socket and start consuming; catch up by replay if events went by."""
        if self._task is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 0)  # never drop: a gap costs the whole mirror
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        self._sub.bind(self.endpoint)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kv-mirror")
        await self._ready.wait()
        if self._task.done():  # it failed before it could start: say why
            self._task.result()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._ready.clear()

    def cached_prefix_tokens(self, token_ids: Sequence[int], as_request: bool = True) -> int | None:
        """Tokens at the start of `token_ids` in the engine's prefix cache; None if unknown.

        With `as_request` (default) the answer is what the engine will report as
        `cached_tokens` for a request with this prompt: it always recomputes the last token,
        so at most len-1 tokens, in whole blocks.
        """
        if not self.known:
            return None
        limit = len(token_ids) - 1 if as_request else None
        return self.index.cached_prefix_tokens(token_ids, limit)

    def stats(self) -> MirrorStats:
        cap = self.capacity_blocks
        return MirrorStats(
            known=self.known,
            blocks=self.index.blocks,
            tokens=self.index.tokens,
            block_size=self.index.block_size,
            capacity_blocks=cap,
            usage=(self.index.blocks / cap) if cap else None,
            batches=self._batches,
            gaps=self._gaps,
            resets=self._resets,
            last_seq=None if self._expected is None else self._expected - 1,
        )

    def on_loss(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) whenever the engine's cache is seen to lose
        blocks: evicted, cleared, or a fresh engine's empty cache. The warm planner waits on
        it to put a learned head back at once, not at its next look."""
        self._loss_listeners.append(callback)

    def _lost(self) -> None:
        for callback in self._loss_listeners:
            try:
                callback()
            except Exception:  # a listener's fault must not stop the mirror
                log.exception("KV mirror loss listener failed")

    def reset(self, known: bool, expect_seq: int | None = None) -> None:
        """Forget everything. `known`: the engine's cache is empty now (a fresh engine)."""
        self.index.clear()
        self.known = known
        self._expected = expect_seq
        self._resets += 1
        if known:
            self._lost()

    async def quiesce(self, idle: float = 0.15, timeout: float = 5.0) -> None:
        """Wait until no event has arrived for `idle` s (tests and benchmarks: let the
        events of finished requests land before asking)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(idle / 3)
            if time.monotonic() - self._last_event_at >= idle:
                return

    def feed(self, seq: int, payload: bytes) -> bool:
        """Apply one message; False when a gap before it must be filled first."""
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        ts = float(batch[0])
        if self._expected is not None and seq < self._expected:
            if ts <= self._last_ts:
                return True  # a batch already applied (replay overlap)
            # The sequence went back: a new engine process, whose cache started empty.
            self.reset(known=True, expect_seq=0)
            self._last_ts = 0.0
        if self._expected is None and seq == 0:
            self.reset(known=True, expect_seq=0)
        if self._expected is None or seq > self._expected:
            return False
        self._apply_batch(seq, ts, batch)
        return True

    def skip_to(self, seq: int, payload: bytes) -> None:
        """Give up on the missed batches: apply this one, but answer "unknown" until the
        engine's cache is known again (a fresh engine, or AllBlocksCleared)."""
        if self.known:
            log.warning("KV mirror: missed events before #%d; cache contents unknown until "
                        "the engine restarts or clears its cache", seq)
        self.reset(known=False, expect_seq=seq)
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        self._apply_batch(seq, float(batch[0]), batch)

    # --- internals --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._sub is not None
        engine_down = self._engine is not None and self._engine.state == "stopped"
        try:
            if not self.known and not engine_down:  # a stopped engine has nothing to replay
                await self._catch_up(0)
        finally:
            self._ready.set()
        while True:
            frames = await self._sub.recv_multipart()
            self._last_event_at = time.monotonic()
            if len(frames) < 3:
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            try:
                if not self.feed(seq, frames[2]):
                    self._gaps += 1
                    await self._catch_up(self._expected if self._expected is not None else 0)
                    if not self.feed(seq, frames[2]):
                        self.skip_to(seq, frames[2])
            except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
                log.warning("KV mirror: unreadable event batch #%d (%r)", seq, exc)
                self.reset(known=False, expect_seq=seq + 1)

    async def _catch_up(self, start: int | None) -> None:
        """Ask the engine to replay batches from `start` and apply them."""
        if start is None or not self.replay_endpoint or self._ctx is None:
            return
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            first = True
            while True:
                if not await dealer.poll(1000):
                    return  # no engine listening (yet): nothing to replay
                frames = await dealer.recv_multipart()
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == END_SEQ:
                    if first and start == 0 and not self.known:
                        self.reset(known=True, expect_seq=0)  # nothing published yet
                    return
                if first and seq == 0:
                    self.reset(known=True, expect_seq=0)
                first = False
                if not self.feed(seq, frames[3]):
                    return  # the engine no longer holds those batches
        finally:
            dealer.close(linger=0)

    def _apply_batch(self, seq: int, ts: float, batch: list[Any]) -> None:
        self._expected = seq + 1
        self._last_ts = ts
        self._batches += 1
        index = self.index
        removed = False
        for raw in batch[1]:
            event = _as_map(raw)
            kind = event.get("type")
            if event.get("medium") not in _OWN_MEDIA:
                continue
            group = event.get("group_idx") or 0
            if kind == "BlockStored":
                extra = event.get("extra_keys")
                plain = event.get("lora_name") is None and not (extra and any(extra))
                index.stored(event["block_hashes"], event.get("parent_block_hash"),
                             event["token_ids"], event["block_size"], group, plain)
            elif kind == "BlockRemoved":
                index.removed(event["block_hashes"], group)
                removed = True
            elif kind == "AllBlocksCleared":
                self.reset(known=True, expect_seq=self._expected)  # (listeners told)
        if removed:
            self._lost()

    def _engine_state(self, engine: Engine, state: str) -> None:
        if state == "ready":
            self.replay_endpoint = engine.kv_replay_endpoint  # chosen anew at each start
            if engine.cache is not None:
                self.capacity_blocks = engine.cache.num_blocks
                self.index.block_size = self.index.block_size or engine.cache.block_size
            # A process that was just started: nothing cached, nothing published yet.
            if engine.generation != self._generation:
                self._generation = engine.generation
                self.reset(known=True, expect_seq=0)
                self._last_ts = 0.0
        elif state in ("restarting", "stopped", "failed"):
            self.reset(known=False, expect_seq=None)


_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


def _as_map(event: Any) -> dict[str, Any]:
    """Events are tagged maps today; accept the array form ([tag, *fields]) too."""
    if isinstance(event, dict):
        return event
    tag, *values = event
    return {"type": tag, **dict(zip(_FIELDS.get(tag, ()), values))}
