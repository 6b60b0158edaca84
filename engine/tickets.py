"""What admission works with: a request's prompt as message prefix hashes (`prompt_chain`),
its passage through admission (`Ticket`), a session in the cache (`Group`), and the counts
admission reports (`AdmissionStats`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from learn.canonical import prefix_chain


def prompt_chain(body: dict[str, Any]) -> tuple[list[str], list[int]] | None:
    """Prefix hashes and sizes (JSON characters) of a chat or responses request's prompt.

    Tools come first (chat templates render them into the system turn). The previous prompt
    of a session is a prefix of its next one, as the client sends both the same way, so a
    cheap hash of each message's bytes is enough (`learn.canonical.prefix_chain`).
    """
    items: list[Any] = []
    if body.get("tools"):
        items.append(body["tools"])
    if isinstance(body.get("instructions"), str):
        items.append(body["instructions"])
    prompt = body.get("messages", body.get("input"))
    if isinstance(prompt, str):
        items.append(prompt)
    elif isinstance(prompt, list):
        items.extend(prompt)
    else:
        return None
    return prefix_chain(items)


@dataclass
class Group:
    id: str
    kind: str = ""
    """The agent the session belongs to: the hash of its prompt's first item (tools, or the
    system prompt). Sessions of one agent grow alike; another agent's may not."""
    chain: tuple[str, ...] = ()
    """Prefix hashes of the group's latest prompt, one per message."""
    output_tokens: int = 0
    own_tokens: int = 0
    """Tokens of the group's prompt no other resident group shares, plus its output."""
    in_flight: int = 0
    calls: int = 0
    last_done: float = 0.0
    entered: int = 0
    """When it entered the resident set (a count): groups are released in that order."""


@dataclass(eq=False)
class Ticket:
    """One request's passage through admission."""

    chain: tuple[str, ...]
    sizes: tuple[int, ...]
    """Estimated tokens of each message, aligned with `chain`."""
    chars: tuple[int, ...]
    """JSON characters of each message (for calibrating the token estimate)."""
    group: str
    kind: str = ""
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    how: str = ""
    """'direct' (no pressure), 'resident' (continuation), 'fits' (a new session, at once),
    'returned' (a session under way, back after leaving the cache), 'waited' (first in the
    waiting order), 'backfill' (past one that did not fit), 'spare' (over `fill`, on an
    engine with few calls at once), 'idle', 'timeout', 'oversize' (a prompt larger than the
    cache: `OVERSIZE`), 'guest' (a session that did not fit, run beside the resident ones
    with its blocks evicted first: `Admission.guests`) or 'shutdown' (`drain`)."""
    priority: int = 0
    """The engine priority to run at (`engine.admission.PRIORITY`): set when admitted under
    pressure, else 0."""
    evict_first: int | None = None
    """A guest's call (how 'guest'), or a session's expected last (`Admission.evict_done`):
    the engine evicts its blocks before any other session's once it finishes, all but its
    first `evict_first` tokens (a head other sessions hold or send), sent as vLLM's
    `vllm_xargs` (engine/vllm_plugin.py)."""
    run: str = ""
    """The workflow run the call belongs to (`engine.runs`), with ordering on."""
    prompt_hashes: list[int] | None = None
    """The prompt's chunk hashes, for the first call of a new session (placed again later)."""
    _pending: bool = False
    _held: bool = False
    _future: asyncio.Future | None = None
    _seq: int = 0

    @property
    def waited(self) -> float:
        return (self.admitted or time.monotonic()) - self.arrived


@dataclass(frozen=True)
class AdmissionStats:
    capacity_tokens: int | None
    resident_groups: int
    resident_tokens: int
    waiting: int
    admitted: dict
    max_wait_seen: float
