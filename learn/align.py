"""Generalising a message template by aligning it with a message it does not fit.

What both share stays static; every stretch where they differ becomes a slot. Cost is bounded
whatever the message length: the common start and end are found by comparing characters (in
C, by galloping slice compares), and only the stretch in between is aligned word by word
(difflib), in full when short, otherwise just its first and last `WINDOW` characters, since
framing text sits beside the data it frames, not in the middle of it.

Two texts share many short runs of words by chance ("the", "of the"), so a run is only kept
when it is long (3+ words), touches the common start or end, or sits right beside such a run
(the " in " of "Summarize {text} in {n} words. Answer in JSON.").
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple

_TOKEN = re.compile(r"\w+|[^\w\s]+|\s+")  # words, punctuation, whitespace: joins back exactly
_NAME_BEFORE = re.compile(r"(?:([A-Za-z][\w ]{0,30}?)\s*[:=]|<([A-Za-z][\w-]{0,30})>)\s*$")
_NUMBER = re.compile(r"^[-+]?[\d.,:/%$]+$")
FULL = 2_000
"""Middles up to this many characters are aligned in full."""
WINDOW = 500
"""Characters aligned at each end of a longer middle."""
NEAR = 4
"""Tokens a short run may sit from a long one and still count as framing."""


class _Slot:
    """A slot of the old template, or the skipped middle of a long text (`gap`), inside a
    token list: equal to nothing but itself, so it never aligns."""

    __slots__ = ("name", "gap")

    def __init__(self, name: str, gap: bool = False) -> None:
        self.name, self.gap = name, gap


class Merged(NamedTuple):
    parts: tuple[str, ...]
    """Static text around the slots (`len(parts) == len(names) + 1`)."""
    names: tuple[str, ...]
    static: int
    """Words and punctuation marks left static."""
    survivors: float
    """Share of the old template's static parts that keep some of their text."""


def _gallop(limit: int, same) -> int:
    """The largest n <= limit with same(0, n), given same(lo, hi) for growing spans: spans
    that grow 4x at a time, then a binary search in the first one that differs."""
    lo, step = 0, 16
    while lo < limit:
        hi = min(limit, lo + step)
        if not same(lo, hi):
            break
        lo, step = hi, step * 4
    else:
        return limit
    hi = min(limit, lo + step)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if same(lo, mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(a: str, b: str) -> int:
    return _gallop(min(len(a), len(b)), lambda lo, hi: a[lo:hi] == b[lo:hi])


def common_suffix(a: str, b: str, limit: int) -> int:
    la, lb = len(a), len(b)
    return _gallop(min(la, lb, limit),
                   lambda lo, hi: a[la - hi : la - lo] == b[lb - hi : lb - lo])


def weight(text: str) -> int:
    """Words and punctuation marks in a text (whitespace is evidence of nothing)."""
    if len(text) >= 4096:  # long texts: words are close enough, and 10x cheaper to count
        return len(text.split())
    return sum(1 for t in _TOKEN.findall(text) if not t.isspace())


def generalize(parts: tuple[str, ...], names: tuple[str, ...], text: str) -> Merged | None:
    """The template that fits both the old template (`parts`, `names`) and `text`."""
    first, last, single = parts[0], parts[-1], len(parts) == 1
    cp = _snap(text, common_prefix(first, text))
    room = min(len(first) - cp, len(text) - cp) if single else min(len(last), len(text) - cp)
    cs = _snap_end(text, common_suffix(last, text, room))
    if single:
        items: list = [first[cp : len(first) - cs]]
    else:
        slots = iter(names)
        items = [first[cp:]]
        for p in parts[1:-1]:
            items += [_Slot(next(slots, "x")), p]
        items += [_Slot(next(slots, "x")), last[: len(last) - cs]]
    a = _window(items)
    b = _window([text[cp : len(text) - cs]])
    blocks = _widen(_keep(_blocks(a, b), a, len(b)), a, b)
    out, out_names = [text[:cp]], []
    ia = jb = 0
    for i, j, size in [*blocks, (len(a), len(b), 0)]:
        if i > ia or j > jb:
            gap_a = [t for t in a[ia:i] if isinstance(t, _Slot)]
            out_names.append(_name(out[-1], gap_a, b[jb:j]))
            out.append("")
        out[-1] += "".join(a[i : i + size])
        ia, jb = i + size, j + size
    out[-1] += text[len(text) - cs :]
    static = weight(text[:cp]) + weight(text[len(text) - cs :]) + sum(
        1 for i, _, size in blocks for t in a[i : i + size] if not t.isspace())
    return Merged(tuple(out), _unique(out_names), static, _survivors(parts, out))


def _snap(text: str, n: int) -> int:
    """Back `n` off to a token boundary (never split a word between static and slot)."""
    while 0 < n < len(text) and _cls(text[n - 1]) == _cls(text[n]):
        n -= 1
    return n


def _snap_end(text: str, n: int) -> int:
    end = len(text) - n
    while 0 < n < len(text) and _cls(text[end - 1]) == _cls(text[end]):
        n, end = n - 1, end + 1
    return n


def _cls(ch: str) -> int:
    return 0 if ch.isspace() else 1 if (ch.isalnum() or ch == "_") else 2


def _window(items: list) -> list:
    """Tokens of a middle (strings and slots): all of it, or its two ends around a gap."""
    size = sum(len(x) for x in items if isinstance(x, str))
    if size <= FULL:
        return [t for x in items for t in (_TOKEN.findall(x) if isinstance(x, str) else (x,))]
    return [*_edge(items, WINDOW), _Slot("text", gap=True), *_edge(items[::-1], WINDOW, reverse=True)]


def _edge(items: list, budget: int, reverse: bool = False) -> list:
    out: list = []
    for x in items:
        if budget <= 0:
            break
        if isinstance(x, str):
            piece = x[-budget:] if reverse else x[:budget]
            tokens = _TOKEN.findall(piece)
            out += tokens[::-1] if reverse else tokens
            budget -= len(piece)
        else:
            out.append(x)
    return out[::-1] if reverse else out


def _blocks(a: list, b: list) -> list[tuple[int, int, int]]:
    """Matching runs of two token lists, aligned on their words only.

    Whitespace tokens are half of all tokens and match everywhere, which makes difflib
    quadratic; so words and punctuation are aligned, runs are mapped back to the full lists
    (split where the whitespace between two matched words differs) and widened by equal
    whitespace on either side (by `_widen`, once chance runs are gone), so that static text
    keeps the spaces around a slot.
    """
    ai = [i for i, t in enumerate(a) if isinstance(t, _Slot) or not t.isspace()]
    bi = [i for i, t in enumerate(b) if isinstance(t, _Slot) or not t.isspace()]
    matcher = difflib.SequenceMatcher(None, [a[i] for i in ai], [b[j] for j in bi], autojunk=False)
    out: list[tuple[int, int, int]] = []
    for i, j, size in matcher.get_matching_blocks():
        k = 0
        while k < size:
            sa, sb = ai[i + k], bi[j + k]
            ea, eb = sa + 1, sb + 1
            k += 1
            # extend while the next matched words follow with the same whitespace in both
            while (k < size and ai[i + k] - ea == bi[j + k] - eb
                   and a[ea : ai[i + k]] == b[eb : bi[j + k]]):
                ea, eb = ai[i + k] + 1, bi[j + k] + 1
                k += 1
            out.append((sa, sb, ea - sa))
    return out


def _widen(blocks: list[tuple[int, int, int]], a: list, b: list) -> list[tuple[int, int, int]]:
    """Grow each run by the whitespace both texts have right before and after it."""
    widened = []
    prev_a = prev_b = 0
    for n, (sa, sb, size) in enumerate(blocks):
        nxt_a, nxt_b = blocks[n + 1][:2] if n + 1 < len(blocks) else (len(a), len(b))
        if sa > prev_a and sb > prev_b and _space(a[sa - 1]) and a[sa - 1] == b[sb - 1]:
            sa, sb, size = sa - 1, sb - 1, size + 1
        ea, eb = sa + size, sb + size
        if ea < nxt_a and eb < nxt_b and _space(a[ea]) and a[ea] == b[eb]:
            size += 1
        widened.append((sa, sb, size))
        prev_a, prev_b = sa + size, sb + size
    return widened


def _space(t) -> bool:
    return isinstance(t, str) and t.isspace()


def _keep(blocks: list[tuple[int, int, int]], a: list, m: int) -> list[tuple[int, int, int]]:
    n = len(a)

    def strong(k: int) -> bool:
        i, j, size = blocks[k]
        if (i == 0 and j == 0) or (i + size == n and j + size == m):
            return True  # beside the common start or end
        return sum(1 for t in a[i : i + size] if t[:1].isalnum()) >= 3

    out = []
    for k, (i, j, size) in enumerate(blocks):
        if not any(not t.isspace() for t in a[i : i + size]):
            continue
        near = strong(k)
        if not near and k > 0 and strong(k - 1):
            pi, pj, ps = blocks[k - 1]
            near = i - (pi + ps) <= NEAR and j - (pj + ps) <= NEAR
        if not near and k + 1 < len(blocks) and strong(k + 1):
            ni, nj, _ = blocks[k + 1]
            near = ni - (i + size) <= NEAR and nj - (j + size) <= NEAR
        if not near:
            near = (k == 0 and i <= NEAR and j <= NEAR) or (
                k == len(blocks) - 1 and n - i - size <= NEAR and m - j - size <= NEAR)
        if near:
            out.append((i, j, size))
    return out


def _name(before: str, inherited: list[_Slot], value: list) -> str:
    """A readable slot name: the label just before it ("Document:"), else the old slot's
    name, else what its value looks like."""
    label = _NAME_BEFORE.search(before[-40:])
    if label:
        word = (label.group(1) or label.group(2)).strip().split()[-1].lower()
        return re.sub(r"\W", "_", word)[:24] or "x"
    if len(inherited) == 1 and not inherited[0].gap:
        return inherited[0].name.rstrip("0123456789") or "x"
    words = [t for t in value if not isinstance(t, _Slot) and not t.isspace()]
    if any(isinstance(t, _Slot) for t in value) or len(words) > 40:
        return "text"
    if words and all(_NUMBER.match(w) for w in words):
        return "n"
    return "x"


def _unique(names: list[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}{seen[name]}")
    return tuple(out)


def _survivors(old: tuple[str, ...], new: list[str]) -> float:
    statics = [p for p in old if p.strip()]
    if len(statics) < 2:
        return 1.0
    pieces = [p for p in new if len(p.strip()) >= 3]
    alive = sum(1 for p in statics if any(q in p or p in q for q in pieces))
    return alive / len(statics)
