"""The engine's exact token ids for a prompt or a chat, through its `POST /tokenize`.

    tok = EngineTokenizer.for_engine(engine)
    ids = await tok.encode_chat(messages)          # chat template applied as the engine will
    ids = await tok.encode_prompt("text")
    ids = await tok.encode_request(chat_or_completion_body)

Results are kept in an LRU keyed by the xxh3-128 hash of the canonical JSON of what was
asked, and concurrent asks for the same content share one request. Each miss is an HTTP call
to the engine (a millisecond or more), so this serves learning and warming, never the hot
path of a proxied call.

The LRU is bounded in token ids, not entries: every pre-warm asks for a whole conversation,
each one different, so entries are large (8,000 ids and more). Ids are held as `array('I')`,
4 bytes an id instead of ~36 as a tuple of ints, and a hit is made a tuple again on the way
out (~120 us for 8,000 ids, against the HTTP call and JSON of a miss).
"""

from __future__ import annotations

import asyncio
import json
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import xxhash

from engine.errors import EngineRequestError

if TYPE_CHECKING:
    from engine.supervisor import Engine

TokenIds = tuple[int, ...]
ENTRY_IDS = 56
"""What one cached entry costs besides its ids, in ids of 4 bytes: its key (49 bytes), its
array's header (64) and its place in the LRU (~100); measured with tracemalloc, ~210 bytes."""
# Fields of a chat request that change what the chat template renders.
_CHAT_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt",
                "continue_final_message", "documents", "chat_template")


@dataclass(frozen=True)
class TokenizerStats:
    hits: int
    misses: int
    size: int
    """Entries cached."""
    tokens: int
    """Token ids cached, each entry counting `ENTRY_IDS` more (see `EngineTokenizer`)."""


def content_key(body: Mapping[str, Any]) -> bytes:
    """xxh3-128 of the canonical JSON of `body`: equal content, equal key."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return xxhash.xxh3_128_digest(canonical.encode())


class EngineTokenizer:
    """Tokenize through one engine, cached. Safe to share within one event loop.

    The cache keeps at most `max_cached_tokens` ids (4 M: ~16 MiB), least recently used first
    out, an entry counting `ENTRY_IDS` more for what holding it costs; a prompt of more than
    a quarter of that is returned but not kept, so that it does not flush everything else.
    """

    def __init__(self, base_url: str, model: str, max_cached_tokens: int = 4_000_000,
                 timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_cached_tokens = max_cached_tokens
        self._timeout = timeout
        self._cache: OrderedDict[bytes, array[int]] = OrderedDict()
        self._cached_tokens = 0
        self._inflight: dict[bytes, asyncio.Future[TokenIds]] = {}
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._hits = self._misses = 0

    @classmethod
    def for_engine(cls, engine: Engine, **kw: Any) -> EngineTokenizer:
        return cls(engine.base_url, engine.served_model_name, **kw)

    async def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> TokenIds:
        """Token ids of a completion prompt, as `/v1/completions` would see it."""
        return await self._tokenize({"prompt": prompt, "add_special_tokens": add_special_tokens})

    async def encode_chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> TokenIds:
        """Token ids of a chat after the engine's chat template (with the generation prompt
        unless `add_generation_prompt=False`). `options`: tools, chat_template_kwargs, ..."""
        return await self._tokenize({"messages": list(messages), **options})

    async def encode_request(self, body: Mapping[str, Any]) -> TokenIds:
        """Token ids of the prompt of a chat-completions or completions request body."""
        if "messages" in body:
            options = {k: body[k] for k in _CHAT_FIELDS if body.get(k) is not None}
            return await self.encode_chat(body["messages"], **options)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return await self.encode_prompt(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return tuple(prompt)
        raise ValueError("the request has neither messages nor a single prompt to tokenize")

    def stats(self) -> TokenizerStats:
        return TokenizerStats(self._hits, self._misses, len(self._cache), self._cached_tokens)

    async def aclose(self) -> None:
        self._closed = True
        # A fetch outlives the callers it was shielded from: one still posting when the
        # client closes could leave its connection behind, unclosed.
        pending = list(self._inflight.values())
        for fetch in pending:
            fetch.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- internals --------------------------------------------------------------------------

    async def _tokenize(self, body: dict[str, Any]) -> TokenIds:
        key = content_key(body)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self._hits += 1
            return tuple(cached)
        pending = self._inflight.get(key)
        if pending is None:
            self._misses += 1
            # The request belongs to no one caller: one that is cancelled (a warm the real
            # call took over) must not cancel it for the others waiting on the same content.
            pending = self._inflight[key] = asyncio.ensure_future(self._fetch(key, body))
            pending.add_done_callback(_retrieve)
        else:
            self._hits += 1
        return await asyncio.shield(pending)

    async def _fetch(self, key: bytes, body: dict[str, Any]) -> TokenIds:
        try:
            ids = await self._post(body)
        finally:
            del self._inflight[key]
        self._remember(key, ids)
        return ids

    def _remember(self, key: bytes, ids: TokenIds) -> None:
        if len(ids) > self.max_cached_tokens // 4:
            return  # one enormous prompt must not flush everything else
        try:
            compact = array("I", ids)
        except OverflowError:  # an id no engine gives (negative, or 2**32 and up): not kept
            return
        self._cache[key] = compact
        self._cached_tokens += len(compact) + ENTRY_IDS
        while self._cached_tokens > self.max_cached_tokens:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old) + ENTRY_IDS

    async def _post(self, body: dict[str, Any]) -> TokenIds:
        if self._closed:  # a client made now would outlive its owner, unclosed
            raise EngineRequestError("closed")
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout)
        try:
            response = await self._client.post("/tokenize", json={"model": self.model, **body})
        except httpx.HTTPError as exc:
            raise EngineRequestError(
                f"the engine could not be reached to tokenize: {exc!r}") from exc
        if response.status_code != 200:
            raise EngineRequestError(
                f"the engine refused to tokenize ({response.status_code}): {response.text[:300]}",
                response.status_code,
            )
        return tuple(response.json()["tokens"])


def _retrieve(task: asyncio.Future) -> None:
    """Mark a shared request's failure as seen, should every caller have gone meanwhile."""
    if not task.cancelled():
        task.exception()
