"""The global prompt cache: an identical deterministic request is answered from memory.

A request is deterministic when it asks for greedy decoding (`temperature: 0`) or fixes a
`seed`; the same request then gets the same answer, so the upstream need not compute it
again. The stored answer is the exact bytes the upstream sent (a stream replays as the same
event sequence). Entries are scoped per tenant (a keyed hash of the API key): one tenant
never sees another's answers. The cache is bounded in bytes, counted as the memory an entry
really takes (its objects as well as its body: see `ENTRY_BYTES`), least recently used
entries going first, and in age: expired entries are dropped when looked up, and swept from
the least recently used end whenever an answer is stored. `Cache-Control: no-cache` (or
`no-store`) skips it; the response header `X-Preheat-Cache` says HIT or MISS whenever the
cache looked. Only a whole, successful answer is kept: a stream must have ended as the server
ends one that finished (`data: [DONE]`, or the Responses API's `response.completed`) with no
error event in it (vLLM reports a generation that fails after the headers went out as an
error event in a 200 stream).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from learn.canonical import canonical_json
from proxy.exchange import CAPTURED_PATHS, Exchange
from proxy.stages import Reply, Stage
from proxy.upstream import HOP_BY_HOP

HEADER = "X-Preheat-Cache"
# Fields that do not change what the model generates.
IGNORED_FIELDS = ("user", "metadata", "prompt_cache_key", "store", "service_tier")
# A stream that finished, and one that failed on the way (`finish_reason: "error"` is
# matched as JSON, never inside a string, where its quotes would be escaped).
STREAM_ENDED = re.compile(rb"^data: ?\[DONE\]\s*$|^event: ?response\.completed\s*$", re.M)
STREAM_FAILED = re.compile(
    rb'^data: ?\{\s*"error"\s*:|"finish_reason"\s*:\s*"error"'
    rb"|^event: ?(?:error|response\.failed|response\.incomplete)\s*$", re.M)


# What holding an answer costs in memory besides the bytes of its body and header text, as
# tracemalloc counts it on 64-bit CPython 3.11, object by object (a snapshot's traces grouped
# by line) over thousands of answers stored, the oldest pushed out. Short answers are mostly
# these: a one-token answer with three headers takes ~1.25 KB for ~340 bytes of body and
# headers, so counting the body alone undercounted 2.75 times.
# tests/proxy/test_prompt_cache.py checks the sum against tracemalloc.
ENTRY_BYTES = 420
"""One entry: its key (a 32-digit str, 81), the `Entry` (72), its two tuples (80), its time
and size (56) and its place in the LRU: a node and its share of the tables (70-140 as they
fill, and fill up with the keys pushed out until they are rebuilt)."""
CHUNK_BYTES = 41
"""One chunk (a stream's event): a bytes object's header (33) and its place in the tuple (8)."""
HEADER_BYTES = 162
"""One header: its pair (56), its place in the tuple (8) and two str objects (49 each)."""


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]
    stored_at: float
    size: int = field(init=False)
    """Bytes of memory the entry holds (`ENTRY_BYTES`), what the cache's bound counts."""

    def __post_init__(self) -> None:
        size = ENTRY_BYTES + len(self.chunks) * CHUNK_BYTES + sum(map(len, self.chunks))
        size += sum(HEADER_BYTES + len(k) + len(v) for k, v in self.headers)
        object.__setattr__(self, "size", size)


class PromptCache:
    """An LRU map from request key to a stored response, bounded in bytes and age.

    `put` first drops expired entries from the least recently used end, stopping at the
    first that is not: every entry after it was used since, so none is left that was neither
    stored nor used within the `ttl`. One that was used since but is older than the `ttl` is
    dropped when next looked up, or pushed out by size.
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        """What `Entry.stored_at` is read against (a fake one in tests)."""
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        """Held, expired or not; unlike `get`, this neither drops nor refreshes it."""
        return key in self._entries

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() - entry.stored_at > self.ttl:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        self._expire(self.clock())
        if entry.size > self.max_bytes // 4:  # one huge answer must not flush everything
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def _expire(self, now: float) -> None:
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now - oldest.stored_at <= self.ttl:
                return
            self._remove(key)

    def _remove(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size


class PromptCacheStage(Stage):
    name = "prompt_cache"

    def __init__(self, cache: PromptCache) -> None:
        self.cache = cache
        self._key = os.urandom(16)  # entries live in memory only: a per-process key suffices

    def key_of(self, ex: Exchange) -> str | None:
        """The cache key of a deterministic request, or None when it must not be cached."""
        body = ex.request_body
        if ex.method != "POST" or ex.path not in CAPTURED_PATHS or not body:
            return None
        if b'"temperature"' not in body and b'"seed"' not in body:
            return None  # cheap test before parsing: most agent calls are not deterministic
        control = (ex.header("cache-control") or "").lower()
        if "no-cache" in control or "no-store" in control:
            return None
        request = ex.request_object()
        if request is None:
            return None
        temperature, seed = request.get("temperature"), request.get("seed")
        greedy = isinstance(temperature, (int, float)) and temperature == 0
        if not greedy and not (isinstance(seed, int) and not isinstance(seed, bool)):
            return None
        scoped = {k: v for k, v in request.items() if k not in IGNORED_FIELDS}
        secret = (ex.api_key or "").encode("utf-8", "surrogateescape")
        tenant = hashlib.blake2b(secret, key=self._key, digest_size=16)
        where = f"{ex.path}?{ex.query}".encode("utf-8", "surrogateescape")  # a key, a version
        return xxhash.xxh3_128_hexdigest(tenant.digest() + where + b"\0" + canonical_json(scoped))

    def request(self, ex: Exchange) -> Reply | None:
        key = self.key_of(ex)
        if key is None:
            return None
        ex.cache_key = key
        entry = self.cache.get(key)
        if entry is None:
            ex.cache = "MISS"
            self.cache.misses += 1
            return None
        ex.cache = "HIT"
        self.cache.hits += 1
        return Reply(entry.status, list(entry.headers) + [(HEADER, "HIT")], list(entry.chunks))

    def done(self, ex: Exchange) -> None:
        if ex.cache != "MISS" or ex.cache_key is None:
            return
        if ex.status != 200 or ex.error or ex.response_truncated or not ex.response_chunks:
            return
        headers = tuple(
            (k, v) for k, v in ex.response_headers
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("content-length", "date",
                                                                  "set-cookie", HEADER.lower())
        )
        chunks = tuple(c for _, c in ex.response_chunks)
        if not whole(chunks, ex.response_header("content-type") or ""):
            return
        self.cache.put(ex.cache_key, Entry(ex.status, headers, chunks, self.cache.clock()))


def whole(chunks: tuple[bytes, ...], content_type: str) -> bool:
    """The answer came whole and without error: a stream ended as finished streams end, with
    no error event in it; any other body is whole once its 200 status and every byte came."""
    if "text/event-stream" not in content_type.lower():
        return True
    body = b"".join(chunks)
    return STREAM_ENDED.search(body) is not None and STREAM_FAILED.search(body) is None
