"""Token ids for learning when no engine tokenizer is at hand.

The radix tree and the static prefixes speak token ids. With an engine, the ids come from its
tokenizer (injected into `Learner`). Without one, `FallbackTokenizer` gives deterministic ids:
whitespace-separated words, each hashed (xxh32) to a stable id, so the same text gives the
same ids in every process and across restarts. Words are coarser than BPE tokens (one word is
~1.3 tokens) but prefixes are prefixes either way, which is all learning needs.

Speed matters (it runs once per captured exchange): splitting is C-level `str.split`, ids
come from a dict whose misses hash the word once, and each message's ids are cached by its
content key, so a conversation that grows by one message costs one message.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

import xxhash

from learn.canonical import canonical_json, function_of, message_text, tool_calls_of

FALLBACK_NAME = "preheat-words-1"
"""Name recorded with learned token prefixes; prefixes made by another tokenizer are dropped."""

_ID_MASK = 0x7FFFFFFF


class _Vocab(dict):
    """word -> stable id; a miss hashes the word (ids never depend on what was seen before)."""

    def __missing__(self, word: str) -> int:
        value = xxhash.xxh32_intdigest(word.encode("utf-8", "surrogatepass")) & _ID_MASK
        self[word] = value
        return value


ENTRY_IDS = 6
"""What one cached message costs besides its ids, in ids (see `FallbackTokenizer`)."""


class FallbackTokenizer:
    """Deterministic word-level token ids for prompts, with a per-message cache.

    Not thread-safe (the learner runs on one thread). Memory is bounded: the word table is
    cleared past `max_vocab` words (ids are hashes, so nothing changes), and the message
    cache keeps at most `max_cached_tokens` ids, least recently used first out, an entry
    counting `ENTRY_IDS` more for what holding it costs (its key, its tuple: ~210 bytes, an
    id ~36), so that many short messages do not hold more than as many ids would.
    """

    name = FALLBACK_NAME

    def __init__(self, max_vocab: int = 500_000, max_cached_tokens: int = 4_000_000) -> None:
        self.max_vocab = max_vocab
        self.max_cached_tokens = max_cached_tokens
        self._vocab = _Vocab()
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cached_tokens = 0

    def text(self, text: str) -> list[int]:
        """Ids of a text: one per whitespace-separated word."""
        if len(self._vocab) > self.max_vocab:
            self._vocab.clear()
        return list(map(self._vocab.__getitem__, text.split()))

    def marker(self, name: str) -> int:
        """The id of a structural marker (a role, a tool block) no word can collide with."""
        return self._vocab["\x00" + name]

    def message(self, message: dict, key: str | None = None) -> tuple[int, ...]:
        """Ids of one chat message: a role marker, its text, and any tool calls it makes."""
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        role = message.get("role") or message.get("type") or "?"
        ids = [self.marker(str(role))]
        ids += self.text(message_text(message))
        for part in _other_parts(message):
            ids.append(self.marker(part))
        for call in tool_calls_of(message):
            fn = function_of(call)
            ids.append(self.marker("call"))
            ids += self.text(f"{fn.get('name')} {fn.get('arguments')}")
        if "role" not in message:  # a Responses API item other than a message (a built-in tool's)
            ids += self.text(" ".join(str(message.get(k)) for k in ("name", "arguments", "output")
                                      if message.get(k) is not None))
        out = tuple(ids)
        if key is not None:
            self._remember(key, out)
        return out

    def tools(self, tools: Sequence) -> tuple[int, ...]:
        """Ids of a request's tool schemas (rendered first, as most chat templates do)."""
        if not tools:
            return ()
        key = "tools:" + xxhash.xxh3_64_hexdigest(canonical_json(list(tools)))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = (self.marker("tools"), *self.text(canonical_json(list(tools)).decode()))
        self._remember(key, out)
        return out

    def prompt(
        self, messages: Sequence[dict], keys: Iterable[str | None] | None = None, tools: Sequence = ()
    ) -> tuple[int, ...]:
        """Ids of a whole prompt: tools, then every message in order."""
        keys = list(keys) if keys is not None else [None] * len(messages)
        out: list[int] = list(self.tools(tools))
        for m, k in zip(messages, keys):
            out += self.message(m, k)
        return tuple(out)

    def _remember(self, key: str, ids: tuple[int, ...]) -> None:
        if len(ids) > self.max_cached_tokens // 4:
            return  # one enormous message must not flush everything else
        self._cache[key] = ids
        self._cached_tokens += len(ids) + ENTRY_IDS
        while self._cached_tokens > self.max_cached_tokens and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old) + ENTRY_IDS

    def __len__(self) -> int:
        return self._cached_tokens


def _other_parts(message: dict) -> list[str]:
    """Markers for non-text content parts (images, audio, files), in order."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [
        str(p.get("type") or "part")
        for p in content
        if isinstance(p, dict) and not isinstance(p.get("text"), str)
    ]
