"""preheat's configuration, declared once.

Every option is a field of `Settings` with a default and help text. Each can be set by the
environment as `PREHEAT_<NAME>` and most by a `preheat serve` flag; flags win. The README's
configuration table is checked against this list by a test.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "PREHEAT_"


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    upstream: str | None = _opt(
        None, "Base URL of an OpenAI-compatible server to forward to (e.g. http://127.0.0.1:8000). "
        "With or without a trailing /v1 (vLLM's own /metrics and /tokenize are asked at its "
        "root). When unset preheat runs its own vLLM engine. A user and password in it are "
        "sent as Basic auth on calls without an Authorization header, and never shown."
    )
    model: str | None = _opt(
        None, "Model for the embedded vLLM engine (path or name). Unset with no upstream: an "
        "offline random-weight demo model."
    )
    engine_args: tuple[str, ...] = _opt((), "Extra flags passed to the vLLM engine verbatim.")
    kv_events: str | None = _opt(
        None, "ZMQ endpoint preheat binds for an upstream vLLM's KV-cache events (the engine's "
        "--kv-events-config endpoint, e.g. tcp://127.0.0.1:5557), to mirror its cache. The "
        "embedded engine needs none."
    )
    host: str = _opt("127.0.0.1", "Address to listen on. Loopback unless told otherwise.")
    port: int = _opt(8080, "Port to listen on.")
    db: str = _opt(
        "sqlite:///preheat.db",
        "Capture store: a database URL (SQLite or PostgreSQL), or a SQLite file's path.",
    )
    server_name: str | None = _opt(
        None, "The name this server's learned snapshots are saved and taken up under, where "
        "several servers share one database. Unset: its host name and port. Set it where host "
        "names change at each restart (a Kubernetes Deployment's pods: one name for each "
        "Deployment)."
    )
    capture: bool = _opt(True, "Capture exchanges on the chat, completions and responses routes.")
    max_body_bytes: int = _opt(
        64 * 1024 * 1024, "Largest request body accepted; larger ones get 413."
    )
    capture_max_bytes: int = _opt(
        16 * 1024 * 1024, "Largest request or response body kept by capture (the rest is relayed, "
        "not stored)."
    )
    capture_queue: int = _opt(
        10_000, "Exchanges waiting to be written before new captures are dropped (and counted)."
    )
    capture_queue_bytes: int = _opt(
        256 * 1024 * 1024, "Bytes of exchanges waiting to be written (held by the proxy while the "
        "observer process lags) before new captures are dropped (and counted)."
    )
    retain_days: float | None = _opt(
        None, "Days captured exchanges are kept: older ones (by when they were made and "
        "stored), the sessions left without any and the messages no exchange refers to any "
        "more are deleted every few minutes. Unset: kept for ever. Learned snapshots stay."
    )
    connect_timeout: float = _opt(10.0, "Seconds to wait for a connection to the upstream.")
    read_timeout: float = _opt(
        600.0, "Seconds to wait for the upstream's next byte before answering 504."
    )
    upstream_connections: int = _opt(1000, "Most connections held open to the upstream.")
    session_window: int = _opt(
        200_000, "Conversation prefixes remembered for session inference (oldest forgotten)."
    )
    learn: bool = _opt(
        True, "Learn templates, sessions and workflows online from captured traffic."
    )
    prompt_cache: bool = _opt(
        True, "Answer an identical deterministic request (temperature 0 or a seed) from memory."
    )
    prompt_cache_bytes: int = _opt(256 * 1024 * 1024, "Most bytes of memory the prompt cache "
                                   "holds (its answers' objects counted, not only their bodies).")
    prompt_cache_ttl: float = _opt(3600.0, "Seconds a prompt-cache entry stays valid.")
    admission: bool = _opt(
        True, "Cache-aware admission: keep the working set of the agent sessions being served "
        "within the engine's KV cache (only acts when the cache is under pressure)."
    )
    admission_capacity_tokens: int = _opt(
        0, "KV-cache size in tokens for admission; 0 reads it from the engine's /metrics "
        "(vLLM), and without it admission stays off."
    )
    admission_fill: float = _opt(
        1.25, "Share of the KV cache that the sessions admitted, at the size sessions grow to, "
        "may reserve (over 1: their peaks do not coincide, and the idlest blocks go first)."
    )
    admission_max_wait: float = _opt(
        60.0, "Longest a request waits for admission before it goes in regardless."
    )
    admission_spare_below: float = _opt(
        2.0, "Calls on the engine at once (on average over 20 s) below which it has throughput "
        "to spare: waiting sessions then go in up to 1.2 x the fill, the resident ones being "
        "mostly in tool calls; 0 turns this off."
    )
    admission_suspend: bool = _opt(
        True, "Before the sizes an agent's sessions grow to are learned, when its sessions "
        "outgrow the KV cache, the youngest between calls waits until there is room, so the "
        "older ones keep their histories cached (needs admission)."
    )
    admission_guests: bool | None = _opt(
        None, "A session that would wait for a place in the KV cache runs at once as a guest "
        "while its prompt fits beside the resident sessions' histories, its blocks evicted "
        "first (engine/vllm_plugin.py). Unset: on with preheat's own engine, off with "
        "--upstream (a vLLM without preheat's plugin would evict the resident histories "
        "instead); true where the upstream is a vLLM started from preheat's environment with "
        "PREHEAT_EVICTION_HINTS=1. Needs admission."
    )
    admission_guest_busy_below: float = _opt(
        0.9, "Guests go in only while the engine was busy less than this share of the last "
        "20 s: a guest's calls prefill their history again, which an engine never idle takes "
        "from the resident sessions (a guest whose prompt the resident sessions mostly hold "
        "goes in regardless); 1 lets them in whenever they fit."
    )
    admission_bound_guests: bool = _opt(
        False, "A call let go at the wait bound (PREHEAT_ADMISSION_MAX_WAIT) whose session is "
        "not resident goes in as a guest, its blocks evicted first, where guests are on: the "
        "bound lets the call run without making its session one more resident that the cache "
        "cannot hold; the session's next call waits first in line, as a session under way. "
        "Needs admission."
    )
    admission_evict_done: bool = _opt(
        True, "A session's call that admission expects to be its last (it has made as many "
        "calls as nearly all finished sessions of its agent) asks the engine to evict its "
        "blocks first once answered, all but the head other sessions share, so that they go "
        "before the histories of sessions still under way. Under cache pressure only, where "
        "the engine evicts hinted blocks first (as for guests). Needs admission."
    )
    admission_handoff: bool = _opt(
        True, "Under pressure, a new session that reads an answer of a workflow run whose "
        "resident sessions are all between calls (a critic its actor waits for, a chain's next "
        "step) goes in at once, as a guest where guests are on: those sessions keep the room "
        "it would wait for. Needs admission and ordering (which tells the runs)."
    )
    admission_priority: bool = _opt(
        True, "Under pressure, send admission's order to the engine as vLLM's `priority` "
        "(sessions under way before new ones; needs --scheduling-policy priority, as "
        "preheat's own engine runs, and is ignored by a first-come-first-served vLLM)."
    )
    ordering: bool = _opt(
        True, "Serve the workflow runs with the least work left first: runs are told from "
        "the traffic (sessions, answers pasted into later prompts) and their sizes learned; "
        "with the engine loaded, a run with twice as much work left as another's size waits "
        "for it (needs admission)."
    )
    ordering_running: int = _opt(
        4, "Calls in flight at which ordering starts holding larger runs back."
    )
    prewarm: bool = _opt(
        True, "Pre-warm the predicted next prompt of a session while its agent runs a tool, "
        "on idle engine capacity only (vLLM upstreams)."
    )
    prewarm_static: bool = _opt(
        True, "Keep the static heads of learned workflows (system prompts, tools, fixed "
        "messages) cached: warmed on an idle engine after a restart or an eviction, within 60% "
        "of the cache (vLLM upstreams, with PREHEAT_PREWARM)."
    )
    prewarm_min_probability: float = _opt(
        0.5, "Least predicted probability of the next call for a warm to be sent."
    )
    log_level: str = _opt("INFO", "Logging level.")
    admin_token: str | None = _opt(
        None, "Token the admin page (/admin) asks for, as `Authorization: Bearer`, `?token=` or "
        "its cookie. Unset: a random one is generated and logged at start."
    )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then `PREHEAT_*` variables, then `overrides` (flags) that are not None."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(raw.split())
    except ValueError:
        raise ValueError(
            f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.split(' ')[0]}"
        ) from None
    return raw


def options() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every option, for docs and `--help`."""
    return [
        (ENV_PREFIX + f.name.upper(), repr(f.default), f.metadata["help"])
        for f in dataclasses.fields(Settings)
    ]
