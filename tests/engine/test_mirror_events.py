"""KVMirror against a real in-process ZMQ publisher speaking vLLM's wire format.

The fake publisher mirrors vllm/distributed/kv_events.py: PUB connects to the mirror's bound
endpoint and sends (topic, 8-byte big-endian seq, msgpack [ts, [event, ...], dp_rank]); a
ROUTER answers replay requests with the buffered batches and an END_SEQ marker.
"""

from __future__ import annotations

import asyncio
import socket
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from engine.mirror import KVMirror

BS = 4
TOPIC = b"kv-events"
END = (-1).to_bytes(8, "big", signed=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored(hashes, parent, tokens):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def removed(hashes):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


class FakePublisher:
    def __init__(self, endpoint: str, replay_endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        # XPUB is PUB on the wire, and it also hands up the subscriber's subscription, so a
        # test can wait for the handshake instead of sleeping and hoping (a loaded CI machine
        # once lost all of a test's first messages after a fixed 0.2 s).
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.connect(endpoint)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(replay_endpoint)
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self.server = asyncio.get_running_loop().create_task(self._serve_replay())

    async def subscribed(self, topic: bytes, timeout: float = 10.0) -> None:
        """Returns once a subscriber has subscribed to `topic`."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.pub.recv()
                if message[:1] == b"\x01" and topic.startswith(message[1:]):
                    return

    async def publish(self, *events, drop: bool = False, replayable: bool = True) -> None:
        """`drop`: lost on the wire; `replayable`: still in the replay buffer."""
        payload = msgpack.packb([time.time(), list(events), 0])
        if replayable:
            self.buffer.append((self.seq, payload))
        if not drop:
            await self.pub.send_multipart([TOPIC, self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart(
                        [client, b"", TOPIC, seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", b"", END, b""])

    async def close(self) -> None:
        self.server.cancel()
        await asyncio.gather(self.server, return_exceptions=True)
        self.ctx.destroy(linger=0)


@pytest.fixture
async def wire():
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    pub = FakePublisher(endpoint, replay)
    mirror = KVMirror(endpoint, replay, topic="kv-events", block_size=BS)
    await mirror.start()
    await pub.subscribed(TOPIC)
    yield mirror, pub
    await mirror.stop()
    await pub.close()


async def settle(mirror: KVMirror, batches: int) -> None:
    for _ in range(1000):  # 10 s: a loaded machine is slow, not wrong
        if mirror.stats().batches >= batches:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"mirror applied {mirror.stats().batches} of {batches} batches")


async def test_fresh_stream_is_known_and_mirrored(wire):
    mirror, pub = wire
    assert mirror.known  # the replay said nothing was published yet
    await pub.publish(stored([11, 12], None, [1, 2, 3, 4, 5, 6, 7, 8]))
    await settle(mirror, 1)
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7, 8]) == 4  # engine recomputes last
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7, 8], as_request=False) == 8
    await pub.publish(removed([12]))
    await settle(mirror, 2)
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 4
    stats = mirror.stats()
    assert (stats.blocks, stats.tokens, stats.last_seq, stats.gaps) == (1, 4, 1, 0)


async def test_gap_is_filled_from_replay(wire):
    mirror, pub = wire
    await pub.publish(stored([11], None, [1, 2, 3, 4]))
    await pub.publish(stored([12], 11, [5, 6, 7, 8]), drop=True)  # lost on the wire
    await pub.publish(stored([13], 12, [9, 9, 9, 9]))
    await settle(mirror, 3)
    assert mirror.known and mirror.stats().gaps == 1
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9, 0]) == 12


async def test_gap_without_replay_makes_it_unknown_until_restart(wire):
    mirror, pub = wire
    await pub.publish(stored([11], None, [1, 2, 3, 4]))
    await settle(mirror, 1)
    await pub.publish(removed([11]), drop=True, replayable=False)
    await pub.publish(stored([21], None, [5, 5, 5, 5]))
    await settle(mirror, 2)
    assert not mirror.known and mirror.cached_prefix_tokens([1, 2, 3, 4, 5]) is None
    # A new engine process: its sequence starts again at 0 and its cache is empty.
    pub.seq = 0
    await pub.publish(stored([31], None, [7, 7, 7, 7]))
    await settle(mirror, 3)
    assert mirror.known
    assert mirror.cached_prefix_tokens([7, 7, 7, 7, 0]) == 4
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 0]) == 0
    assert mirror.stats().blocks == 1


async def test_all_blocks_cleared_empties_it(wire):
    mirror, pub = wire
    await pub.publish(stored([11], None, [1, 2, 3, 4]))
    await pub.publish({"type": "AllBlocksCleared"}, stored([12], None, [5, 6, 7, 8]))
    await settle(mirror, 2)
    assert mirror.known
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 0]) == 0
    assert mirror.cached_prefix_tokens([5, 6, 7, 8, 0]) == 4


async def test_listeners_hear_of_blocks_lost_and_not_of_blocks_stored(wire):
    """What the warm planner wakes on: an eviction, a cleared cache (once for the batch)."""
    mirror, pub = wire
    heard: list[int] = []
    mirror.on_loss(lambda: heard.append(mirror.stats().batches))
    mirror.on_loss(lambda: 1 / 0)  # a faulty listener costs the others nothing
    await pub.publish(stored([11], None, [1, 2, 3, 4]), stored([12], 11, [5, 6, 7, 8]))
    await settle(mirror, 1)
    assert heard == []
    await pub.publish(removed([12]), removed([11]))
    await settle(mirror, 2)
    assert heard == [2]  # once for the batch, while it was applied
    await pub.publish({"type": "AllBlocksCleared"})
    await settle(mirror, 3)
    assert heard == [2, 3] and mirror.known


async def test_late_mirror_catches_up_by_replay():
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    pub = FakePublisher(endpoint, replay)
    await pub.publish(stored([11], None, [1, 2, 3, 4]))  # nobody listening yet
    mirror = KVMirror(endpoint, replay, block_size=BS)
    try:
        await mirror.start()
        assert mirror.known and mirror.cached_prefix_tokens([1, 2, 3, 4, 0]) == 4
    finally:
        await mirror.stop()
        await pub.close()


def test_feed_accepts_array_form_events():
    mirror = KVMirror("tcp://127.0.0.1:1", block_size=BS)
    event = ["BlockStored", [11], None, [1, 2, 3, 4], BS, None, "GPU", None, None, 0]
    assert mirror.feed(0, msgpack.packb([1.0, [event], 0]))
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5]) == 4
    assert not mirror.feed(5, msgpack.packb([2.0, [], 0]))  # a gap is reported, not applied
    assert mirror.feed(1, msgpack.packb([3.0, [["BlockRemoved", [11], "GPU"]], 0]))
    assert mirror.cached_prefix_tokens([1, 2, 3, 4, 5]) == 0
    offload = dict(stored([12], None, [5, 6, 7, 8]), medium="CPU")  # another tier: ignored
    assert mirror.feed(2, msgpack.packb([4.0, [offload], 0]))
    assert mirror.stats().blocks == 0
