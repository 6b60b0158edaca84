"""Message templates: each recurring message shape as readable text with `{slots}`.

In the spirit of Drain (He et al., 2017), but for prompts rather than log lines: a slot can
swallow any number of words ("Summarize {text} in {n} words. Answer in JSON."), so matching
is by the template's static parts found in order (C-level `str.find`), not by position.

A message no template matches becomes a singleton template (all of it static). When a later
message of the same role shares enough with a template, the two are aligned word by word and
the template is generalised: what they share stays static, the rest becomes slots. The
generalised template gets a new id (a content hash of its role and static parts, so ids are
stable across restarts) and the old id is recorded as an alias of it; `drain_aliases()` hands
those renames to whoever keyed things by the old id.

How much must be shared depends on the role: system prompts are the identity of an agent and
merge only when 95% of both sides agree and what differs looks like data (has digits, like a
date or an id, or is a long injected block); "bull" vs "bear" stays two agents;
user-side messages merge when a few words at an end are shared and at least half of the
template's static blocks survive.

Messages are mined within a scope (the caller passes the agent's system template and where the
message sits): two agents' messages are never merged with each other, however alike they
start. Within one workflow instance different agents see the same data (a shared document, the
same ticker), which would otherwise pass for static text.

Memory: the miner lives as long as the proxy, so what it keeps is bounded in size, not only
in number. A template keeps its static text whole (a singleton, the entire message, up to
`MAX_MINED_CHARS`), because the next message of its shape is aligned against that text; a
shortened copy could no longer be generalised. So templates are bounded twice: at most
`max_templates` of them (20,000), holding at most `max_chars` characters of static text and
slot names together (`MAX_TEMPLATE_CHARS`, 16 M). Past either bound, templates seen only once
(one message, one session) go first, least recently matched first, then the others in the
same order, until 90% of `max_templates` and `prune_to` (80%) of `max_chars` are left; the
template just matched always stays. A forgotten template is learned again from its next
message. Everything else is small and bounded per template: up to 64 session hashes each,
`max_cache` message keys, the index by first and last word (keyed by the words' hashes,
never a copy of the text; swept of forgotten templates) and the newest aliases.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from learn.align import FULL, common_prefix, common_suffix, generalize, weight
from learn.canonical import canonical_json, restore_sessions, session_key, session_keys

MINED_ROLES = frozenset({"system", "developer", "user", "prompt"})
STRICT_ROLES = frozenset({"system", "developer"})
MIN_SHARED_ENDS = 12
"""Characters a long message must share at its ends with a template before they are aligned."""
MAX_MINED_CHARS = 200_000
"""Longer messages are not mined (aligning them would cost more than they teach)."""
MAX_TEMPLATE_CHARS = 16_000_000
"""Characters all templates may hold together: 16 MB of ASCII text (a Python string of other
scripts takes 2 or 4 bytes a character), the order of the radix tree's and the call
prefixes' token budgets; 160 distinct 100 KB system prompts, or thousands of ordinary ones."""


@dataclass(frozen=True)
class MessageTemplate:
    """One learned message shape."""

    id: str
    role: str
    scope: str
    """Where it was mined: the agent (its system template) and the message's place."""
    parts: tuple[str, ...]
    """The static text around the slots: `len(parts) == len(slots) + 1` (ends may be "")."""
    slots: tuple[str, ...]
    messages: int
    """Distinct messages seen with this shape."""
    sessions: int
    """Distinct sessions that sent one (counted up to 64)."""

    @property
    def text(self) -> str:
        """The template as text, each slot written as `{name}`."""
        out = [self.parts[0]]
        for name, part in zip(self.slots, self.parts[1:]):
            out += ["{" + name + "}", part]
        return "".join(out)


class _Cluster:
    __slots__ = ("id", "role", "scope", "parts", "names", "messages", "sessions", "last",
                 "static_tokens", "chars")

    def __init__(self, role: str, parts: tuple[str, ...], names: tuple[str, ...],
                 scope: str = "") -> None:
        self.role, self.parts, self.names, self.scope = role, parts, names, scope
        self.id = template_id(role, parts, scope)
        self.messages = 0
        self.sessions: set[int] = set()
        self.last = 0
        self.static_tokens = sum(weight(p) for p in parts)
        self.chars = sum(map(len, parts)) + sum(map(len, names))

    @property
    def seen_once(self) -> bool:
        return self.messages <= 1 and len(self.sessions) <= 1

    def public(self) -> MessageTemplate:
        return MessageTemplate(self.id, self.role, self.scope, self.parts, self.names,
                               self.messages, len(self.sessions))


def template_id(role: str, parts: tuple[str, ...], scope: str = "") -> str:
    """The content hash that names a message template: same shape, same id, in any process."""
    return "m" + xxhash.xxh3_64_hexdigest(canonical_json([role, scope, list(parts)]))


def matches(parts: tuple[str, ...], text: str) -> bool:
    """Whether `text` fits the template: its static parts found in order, ends anchored."""
    if len(parts) == 1:
        return text == parts[0]
    first, last = parts[0], parts[-1]
    if not text.startswith(first) or not text.endswith(last):
        return False
    end = len(text) - len(last)
    pos = len(first)
    if end < pos:
        return False
    for part in parts[1:-1]:
        j = text.find(part, pos, end)
        if j < 0:
            return False
        pos = j + len(part)
    return True


def slot_values(parts: tuple[str, ...], text: str) -> list[str]:
    """What fills each slot of a template in `text` (leftmost fit); [] when it does not fit."""
    if len(parts) == 1 or not matches(parts, text):
        return []
    out, pos, end = [], len(parts[0]), len(text) - len(parts[-1])
    for part in parts[1:-1]:
        j = text.find(part, pos, end)
        out.append(text[pos:j])
        pos = j + len(part)
    out.append(text[pos:end])
    return out


def _data_like(value: str) -> bool:
    """A value that varies by data, not by agent: it has digits (a date, an id) or is long."""
    return any(ch.isdigit() for ch in value) or len(value.split()) >= 20 or not value.strip()


class TemplateMiner:
    """Learns message templates online. Not thread-safe.

    `mine(role, text, key, session)` returns the id of the template the message fits (learning
    from it), or None for roles that are data rather than instructions (assistant answers,
    tool output) and for enormous messages. Memory is bounded by `max_templates` templates,
    `max_chars` characters of template text and `max_cache` remembered messages: past either
    of the first two, `mine` forgets templates (those seen once first, least recently matched
    first) until 90% of `max_templates` and `prune_to` of `max_chars` are left.
    """

    def __init__(self, max_templates: int = 20_000, max_cache: int = 100_000,
                 max_chars: int = MAX_TEMPLATE_CHARS, prune_to: float = 0.8) -> None:
        self.max_templates = max_templates
        self.max_cache = max_cache
        self.max_chars = max_chars
        """Characters all templates' static parts and slot names may hold together."""
        self.prune_to = prune_to
        """Share of `max_chars` left after templates are forgotten for it."""
        self._chars = 0
        self._stale = 0
        """Generalised templates whose index entries are not swept yet."""
        self._clusters: dict[str, _Cluster] = {}
        self._alias: dict[str, str] = {}
        self._index: dict[tuple[str, str, str, int], list[str]] = {}
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._renamed: list[tuple[str, str]] = []
        self.clock = 0

    # -- public API ------------------------------------------------------------------------

    def mine(self, role: str, text: str, key: str, session: str = "", scope: str = "") -> str | None:
        if role not in MINED_ROLES or len(text) > MAX_MINED_CHARS:
            return None
        self.clock += 1
        key = f"{scope}|{key}"
        tid = self._cache.get(key)
        cluster = self._clusters.get(self.resolve(tid)) if tid is not None else None
        if cluster is None:
            cluster = self._assign(role, text, scope)
            cluster.messages += 1
            self._cache[key] = cluster.id
            if len(self._cache) > self.max_cache:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if len(cluster.sessions) < 64:
            cluster.sessions.add(session_key(session))
        cluster.last = self.clock
        if len(self._clusters) > self.max_templates or self._chars > self.max_chars:
            self._evict(keep=cluster)
        return cluster.id

    def resolve(self, tid: str) -> str:
        """The current id of a template that may since have been generalised."""
        seen = 0
        while tid in self._alias and seen < 64:
            tid = self._alias[tid]
            seen += 1
        return tid

    def get(self, tid: str) -> MessageTemplate | None:
        cluster = self._clusters.get(self.resolve(tid))
        return cluster.public() if cluster else None

    def usable(self, tid: str) -> bool:
        """Whether a template is established enough to name a call by.

        Instructions (system, developer) always are: they are an agent's identity. Other
        messages must have been seen twice (two messages or two sessions) and have a shape,
        slots or at least 20 static words; a short fixed reply ("Yes, please.") is data.
        """
        cluster = self._clusters.get(self.resolve(tid))
        if cluster is None:
            return False
        if cluster.role in STRICT_ROLES:
            return True
        seen = cluster.messages >= 2 or len(cluster.sessions) >= 2
        return seen and (len(cluster.parts) > 1 or cluster.static_tokens >= 20)

    def drain_aliases(self) -> list[tuple[str, str]]:
        """(old id, new id) for every template generalised since the last call."""
        out, self._renamed = self._renamed, []
        return out

    def templates(self, min_messages: int = 2) -> list[MessageTemplate]:
        """Templates seen at least `min_messages` times (or in two sessions), most used first."""
        found = [c for c in self._clusters.values()
                 if c.messages >= min_messages or len(c.sessions) >= 2]
        found.sort(key=lambda c: (-c.messages, c.id))
        return [c.public() for c in found]

    def __len__(self) -> int:
        return len(self._clusters)

    @property
    def chars(self) -> int:
        """Characters in all templates' static parts and slot names (at most `max_chars`)."""
        return self._chars

    def check(self) -> None:
        """Integrity check (for tests): the character count and the bounds hold."""
        held = sum(c.chars for c in self._clusters.values())
        assert held == self._chars, (held, self._chars)
        assert self._chars <= self.max_chars or len(self._clusters) <= 1, self._chars
        assert len(self._clusters) <= self.max_templates, len(self._clusters)
        assert all(tid == c.id for tid, c in self._clusters.items())
        dead = sum(tid not in self._clusters for bucket in self._index.values() for tid in bucket)
        assert dead <= 2 * self._stale, (dead, self._stale)

    # -- persistence -----------------------------------------------------------------------

    def snapshot(self, min_messages: int = 2) -> dict:
        keep = [c for c in self._clusters.values()
                if c.messages >= min_messages or len(c.sessions) >= 2 or c.role in STRICT_ROLES]
        return {
            "templates": [
                {"role": c.role, "scope": c.scope, "parts": list(c.parts), "slots": list(c.names),
                 "messages": c.messages, "sessions": len(c.sessions),
                 "session_keys": session_keys(c.sessions)}
                for c in keep
            ],
            "aliases": dict(list(self._alias.items())[-10_000:]),
        }

    @classmethod
    def restore(cls, data: dict, **kw) -> "TemplateMiner":
        miner = cls(**kw)
        for t in data.get("templates", []):
            cluster = _Cluster(t["role"], tuple(t["parts"]), tuple(t["slots"]), t.get("scope", ""))
            cluster.messages = int(t.get("messages", 1))
            cluster.sessions = restore_sessions(t.get("sessions", 1), t.get("session_keys"))
            miner._add(cluster)
        miner._alias.update(data.get("aliases", {}))
        if len(miner._clusters) > miner.max_templates or miner._chars > miner.max_chars:
            miner._evict()  # a snapshot from a process with larger bounds
        return miner

    # -- learning --------------------------------------------------------------------------

    def _assign(self, role: str, text: str, scope: str) -> _Cluster:
        first, last = _ends(text)
        candidates = self._candidates((role, scope), first, last)
        fitting = [c for c in candidates if matches(c.parts, text)]
        if fitting:
            return max(fitting, key=lambda c: (c.static_tokens, c.id))
        scored = sorted(((_affix(c.parts, text), c) for c in candidates), key=lambda x: -x[0])[:3]
        for shared, cluster in scored:
            if shared < MIN_SHARED_ENDS and len(text) > FULL:
                continue  # long texts that barely share an end: aligning costs more than it finds
            merged = self._merge(cluster, text)
            if merged is not None:
                return merged
        return self._add(_Cluster(role, (text,), (), scope))

    def _candidates(self, where: tuple[str, str], first: int, last: int) -> list[_Cluster]:
        ids = [*self._index.get((*where, "head", first), ()),
               *self._index.get((*where, "tail", last), ()),
               *self._index.get((*where, "free", 0), ())]
        out, seen = [], set()
        for tid in ids:
            cluster = self._clusters.get(tid)
            if cluster is not None and tid not in seen:
                seen.add(tid)
                out.append(cluster)
        return out

    def _merge(self, cluster: _Cluster, text: str) -> _Cluster | None:
        """Generalise `cluster` to fit `text` too, if they are one shape; else None."""
        merged = generalize(cluster.parts, cluster.names, text)
        if merged is None or merged.static < 3 or len("".join(merged.parts).strip()) < 8:
            return None
        if merged.parts[0] == "" and merged.parts[-1] == "":
            return None  # shares only a middle: too weak to call one shape
        if cluster.role in STRICT_ROLES:
            if merged.static < 0.95 * max(cluster.static_tokens, weight(text)):
                return None
            old = [cluster.parts[0]] if len(cluster.parts) == 1 else []
            if not all(_data_like(v) for t in [text, *old] for v in slot_values(merged.parts, t)):
                return None  # "bull" vs "bear": two agents' prompts, not one with a slot
        elif merged.survivors < 0.5:
            return None
        if merged.parts == cluster.parts or not matches(merged.parts, text):
            return None
        into = self._clusters.get(template_id(cluster.role, merged.parts, cluster.scope))
        if into is None:
            into = self._add(_Cluster(cluster.role, merged.parts, merged.names, cluster.scope))
        into.messages += cluster.messages
        into.sessions |= cluster.sessions
        # Its index entries stay until a bulk sweep (lookups skip them): they keep their places
        # among a crowded bucket's 32, which decide what later messages are compared with.
        self._remove(cluster, unindex=False)
        self._alias[cluster.id] = into.id
        self._renamed.append((cluster.id, into.id))
        self._stale += 1
        if self._stale > self.max_templates:
            self._sweep()
        return into

    def _add(self, cluster: _Cluster) -> _Cluster:
        existing = self._clusters.get(cluster.id)
        if existing is not None:
            return existing
        self._clusters[cluster.id] = cluster
        self._chars += cluster.chars
        self._alias.pop(cluster.id, None)
        cluster.last = self.clock
        for key in _index_keys(cluster):
            bucket = self._index.setdefault(key, [])
            bucket.append(cluster.id)
            if len(bucket) > 32:  # many messages opening alike: keep the recent ones
                del bucket[0]
        return cluster

    def _remove(self, cluster: _Cluster, unindex: bool = True) -> None:
        """Forget a template: its characters and (with `unindex`) its index entries go."""
        if self._clusters.pop(cluster.id, None) is None:
            return
        self._chars -= cluster.chars
        for key in _index_keys(cluster) if unindex else ():
            bucket = [t for t in self._index.get(key, ()) if t != cluster.id]
            if bucket:
                self._index[key] = bucket
            else:
                self._index.pop(key, None)

    def _evict(self, keep: _Cluster | None = None) -> None:
        """Forget templates until both bounds hold with room to spare: those seen once, least
        recently matched first, then any; `keep` (the template just matched) stays."""
        count, chars = int(self.max_templates * 0.9), int(self.max_chars * self.prune_to)
        for cluster in sorted(self._clusters.values(), key=lambda c: (not c.seen_once, c.last)):
            if len(self._clusters) <= count and self._chars <= chars:
                break
            if cluster is not keep:
                self._remove(cluster)
        self._trim_aliases()

    def _sweep(self) -> None:
        """Drop the index entries of generalised templates."""
        self._stale = 0
        for key in list(self._index):
            bucket = [t for t in self._index[key] if t in self._clusters]
            if bucket:
                self._index[key] = bucket
            else:
                del self._index[key]
        self._trim_aliases()

    def _trim_aliases(self) -> None:
        if len(self._alias) > 4 * self.max_templates:
            self._alias = dict(list(self._alias.items())[-2 * self.max_templates :])


def _index_keys(cluster: _Cluster) -> list[tuple[str, str, str, int]]:
    """Where a template is indexed: by its first word, else its last, else as slot-ended."""
    first, last = _ends(cluster.parts[0])
    if len(cluster.parts) == 1:
        slots = [("head", first), ("tail", last)]
    elif cluster.parts[0].strip():
        slots = [("head", first)]
    elif cluster.parts[-1].strip():
        slots = [("tail", _ends(cluster.parts[-1])[1])]
    else:
        slots = [("free", 0)]
    return [(cluster.role, cluster.scope, kind, word) for kind, word in slots]


def _ends(text: str) -> tuple[int, int]:
    """Hashes of a text's first and last words (the index keys; a word may be huge)."""
    words = text.split(None, 1)
    first = words[0] if words else ""
    tail = text.rsplit(None, 1)
    return hash(first), hash(tail[-1] if tail else "")


def _affix(parts: tuple[str, ...], text: str) -> int:
    """Characters a template's ends share with a text (ranks merge candidates cheaply)."""
    head = common_prefix(parts[0], text)
    return head + common_suffix(parts[-1], text, len(text) - head)
