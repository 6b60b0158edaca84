"""The pre-warm planner: warm what the learned workflow says comes next, on idle capacity only.

Measured on vLLM (notes/where-the-time-goes.md): a warm pays only when it takes prefill off
the critical path of a later call while the engine would otherwise sit idle; on a busy engine
it competes with real decodes and evicts other sessions' blocks (p90 53 s -> 80 s). So:

- A warm is planned when a call finishes and the learner predicts the session's next call
  (a continuation) with probability >= `min_probability`, arriving no sooner than
  `min_ahead` seconds (the agent is busy in a tool): the prompt so far plus the answer, as
  the engine's chat template will render them, is to be warmed `lead` seconds before the
  call is expected, so that what other sessions evicted during the tool call is back in time.
- It is sent only while no real request is in flight (`idle()`) and admission reports no
  cache pressure (`pressure()`), only if the KV mirror shows that the engine no longer holds
  the prefix (vLLM keeps a conversation and its generated answer cached by itself: warming
  what is resident is pure overhead, and without a mirror nothing is known, so nothing is
  sent), and only if the expected saving beats the cost. The saving is the probability x the
  prefill time taken off the call's path: the time to prefill the tokens the mirror shows
  missing, as far as it fits before the call is expected (a warm that would land late saves
  only what it finished). The cost is (1 - probability) x that prefill time, weighted by
  `waste_weight`, plus the fixed cost of a request. Both times come from `PrefillClock`,
  fitted online to the engine's own timings of the warms it ran.
- When the predicted call arrives, a warm still running is cancelled: the real request takes
  over the prefill from where the warm got to. Warm requests run at the lowest engine
  priority, on their own connections (engine/warm.py), so a real request never queues
  behind one in the proxy.

Static heads (`learn/heads.py`: the system prompt, tools and fixed messages that sessions of
an agent start with) are kept warm too: every `keep_every` seconds, and at once when the
mirror sees the cache lose blocks, while the engine is idle and unpressured, each head the
mirror shows missing (after a restart, a cache reset, or eviction) is rendered by the
engine's chat template and warmed, the most shared first, within `static_share` of the
cache (a head every session starts with is worth more than any one session's history, but
a cache filled with heads serves nobody). The notes measured this case: warming an idle
engine before work arrives gave map-reduce 1.48x. A real request that starts with a head
cancels its warm and takes over from where it got to.

Counters: warms sent, tokens warmed, warms hit (the next call reported at least the warmed
prefix as cached), warms in vain, warms skipped because the engine was busy, because the
prefix was still cached, or because the cache's contents were unknown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("preheat.warm")


class PrefillClock:
    """Seconds the engine takes to prefill n tokens, `fixed + per_token * n`, fitted by least
    squares to the latest `window` warms (each a prefill-only request on an idle engine, so
    its latency is its prefill). Until three are seen, a prior holds: 0.25 ms a token (the
    512 x 8 model on two CPU cores served 1k-token prompts at 1.6 requests/s with 32 tokens
    decoded at ~11.5 ms each: notes/vllm-on-cpu.md) and an assumed 20 ms a request."""

    def __init__(self, fixed: float = 0.02, per_token: float = 0.00025, window: int = 64) -> None:
        self.fixed = fixed
        self.per_token = per_token
        self._seen: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        self._seen.append((tokens, seconds))
        if len(self._seen) < 3:
            return
        n = len(self._seen)
        mean_t = sum(t for t, _ in self._seen) / n
        mean_s = sum(s for _, s in self._seen) / n
        var = sum((t - mean_t) ** 2 for t, _ in self._seen)
        slope = (sum((t - mean_t) * (s - mean_s) for t, s in self._seen) / var) if var else 0.0
        fixed = mean_s - slope * mean_t
        if slope <= 0 or fixed < 0:  # too little spread to separate the two: all per token
            fixed, slope = 0.0, mean_s / mean_t
        self.fixed, self.per_token = fixed, slope


@dataclass(frozen=True)
class PlannerStats:
    planned: int
    sent: int
    warmed_tokens: int
    hit: int
    hit_tokens: int
    wasted: int
    wasted_tokens: int
    cancelled: int
    skipped_busy: int
    skipped_unlikely: int
    skipped_late: int
    skipped_cached: int
    skipped_unknown: int
    static_sent: int
    static_tokens: int


class WarmPlanner:
    def __init__(
        self,
        warmer: Any,
        tokenizer: Any,
        mirror: Any,
        idle: Callable[[], bool],
        pressure: Callable[[], bool] = lambda: False,
        min_probability: float = 0.5,
        min_ahead: float = 0.2,
        waste_weight: float = 0.5,
        lead: float = 1.0,
        max_tracked: int = 10_000,
        keep_every: float = 1.0,
        static_share: float = 0.6,
        capacity_tokens: int | None = None,
    ) -> None:
        self.warmer = warmer
        self.tokenizer = tokenizer
        self.mirror = mirror
        self.idle = idle
        self.pressure = pressure
        self.min_probability = min_probability
        self.min_ahead = min_ahead
        self.waste_weight = waste_weight
        self.lead = lead
        self.keep_every = keep_every
        self.static_share = static_share
        self.capacity_tokens = capacity_tokens
        """The engine's KV cache in tokens, when the mirror does not know it."""
        self._heads: list[tuple[str, list[dict], list, int]] = []
        self._head_tokens: dict[str, tuple[int, ...]] = {}
        self._keeper: asyncio.Task | None = None
        self._lost = asyncio.Event()
        """Set when the mirror sees the cache lose blocks: the keeper looks at once."""
        if callable(getattr(mirror, "on_loss", None)):
            mirror.on_loss(self._lost.set)
        self._closed = False
        self._running: dict[str, asyncio.Task] = {}
        self._warmed: OrderedDict[str, int] = OrderedDict()
        self._max_tracked = max_tracked
        self._counts = dict.fromkeys(PlannerStats.__dataclass_fields__, 0)
        self.clock = PrefillClock()

    def stats(self) -> PlannerStats:
        return PlannerStats(**self._counts)

    def pays(self, probability: float, tokens: int, available: float | None) -> bool:
        """Warming `tokens` missing tokens, with `available` seconds before the call is
        expected (None: unknown), saves more than it costs (see the module's docstring)."""
        prefill = self.clock.per_token * tokens
        done = prefill if available is None else min(prefill, max(0.0, available))
        cost = (1.0 - probability) * self.waste_weight * prefill + self.clock.fixed
        return probability * done > cost

    # -- called on the event loop ------------------------------------------------------

    def offer(self, key: str, messages: Sequence[dict], answer: dict | None, tools: list,
              probability: float, expected_in: float | None) -> None:
        """A call ended; its session is expected to continue. `key` names its prompt prefix."""
        if answer is None or self._closed:
            return
        if (probability < self.min_probability
                or (expected_in is not None and expected_in < self.min_ahead)):
            self._counts["skipped_unlikely"] += 1
            return
        if key in self._running:
            return
        self._counts["planned"] += 1
        chat = [*messages, {"role": "assistant", "content": answer.get("content") or "",
                            **({"tool_calls": answer["tool_calls"]}
                               if answer.get("tool_calls") else {})}]
        delay = max(0.0, (expected_in or 0.0) - self.lead)
        due = None if expected_in is None else time.monotonic() + expected_in
        task = asyncio.ensure_future(self._warm(key, chat, tools, delay, probability, due))
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    def keep_warm(self, heads: Sequence[tuple[str, list[dict], list, int]]) -> None:
        """The static heads to keep cached, most shared first: (key, messages, tools, sessions)."""
        if self._closed:  # heads still arriving from the observer during shutdown
            return
        self._heads = list(heads)
        keys = {h[0] for h in self._heads}
        self._head_tokens = {k: v for k, v in self._head_tokens.items() if k in keys}
        if self._heads and self._keeper is None:
            self._keeper = asyncio.ensure_future(self._keep())

    def arrived(self, chain: Sequence[str]) -> None:
        """A real request whose prompt has these prefix hashes arrived: cancel its warm."""
        for h in chain:
            task = self._running.get(h)
            if task is not None and not task.done():
                task.cancel()
                self._counts["cancelled"] += 1

    def completed(self, chain: Sequence[str], cached_tokens: int | None) -> None:
        """The call that followed a warm finished: was the warmed prefix there for it?"""
        if cached_tokens is None:
            return
        for h in reversed(chain):
            warmed = self._warmed.pop(h, None)
            if warmed is None:
                continue
            if cached_tokens >= warmed:
                self._counts["hit"] += 1
                self._counts["hit_tokens"] += warmed
            else:
                self._counts["wasted"] += 1
                self._counts["wasted_tokens"] += warmed
            return

    async def aclose(self) -> None:
        self._closed = True  # nothing new starts: the warmer and tokenizer close next
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    # -- the warm itself ---------------------------------------------------------------

    async def _warm(self, key: str, chat: list[dict], tools: list, delay: float = 0.0,
                    probability: float = 1.0, due: float | None = None) -> None:
        await asyncio.sleep(delay)  # cancelled meanwhile if the call comes early
        if not self.idle() or self.pressure():
            self._counts["skipped_busy"] += 1
            return
        try:
            options: dict[str, Any] = {"add_generation_prompt": False}
            if tools:
                options["tools"] = tools
            tokens = await self.tokenizer.encode_chat(chat, **options)
            if not self.idle() or self.pressure():  # traffic came in while we tokenized
                self._counts["skipped_busy"] += 1
                return
            block = getattr(self.warmer, "block_size", None) or 128
            cached = None if self.mirror is None else self.mirror.cached_prefix_tokens(tokens)
            if cached is None:
                self._counts["skipped_unknown"] += 1
                return
            whole = len(tokens) - len(tokens) % block
            if cached + block >= whole:
                self._counts["skipped_cached"] += 1  # all but the last block is resident
                return
            if not self.pays(probability, whole - cached, None):
                self._counts["skipped_unlikely"] += 1  # too little to warm for its odds
                return
            if due is not None and not self.pays(probability, whole - cached,
                                                 due - time.monotonic()):
                self._counts["skipped_late"] += 1  # the call would come before it helped
                return
            computed = await self._timed(tokens)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed warm costs nothing but the attempt
            log.debug("warm failed: %s", exc)
            return
        if computed:
            self._counts["sent"] += 1
            self._counts["warmed_tokens"] += computed
            self._warmed[key] = len(tokens) - len(tokens) % block
            while len(self._warmed) > self._max_tracked:
                self._warmed.popitem(last=False)

    async def _timed(self, tokens: Sequence[int]) -> int:
        """Warm, and teach the clock how long the engine took for the tokens it computed."""
        start = time.monotonic()
        computed = await self.warmer.warm(tokens)
        if computed:
            self.clock.observe(computed, time.monotonic() - start)
        return computed

    # -- static heads ------------------------------------------------------------------

    async def _keep(self) -> None:
        """Look every `keep_every` seconds, and at once when the mirror sees the cache lose
        blocks (a head evicted, the cache cleared, a fresh engine), so that a head is back
        before the next session needs it: on the AVX2 machine a 4,608-token head takes
        about 4 s to prefill, and a second's wait for the next look was a quarter of that."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self.keep_every)
            except asyncio.TimeoutError:
                pass
            self._lost.clear()
            if not self.idle() or self.pressure():
                continue
            try:
                await self._keep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again, a full round later
                log.debug("keeping heads warm failed: %s", exc)
                await asyncio.sleep(self.keep_every)

    async def _keep_once(self) -> None:
        """Warm, one at a time, the heads the mirror shows missing, while nothing else runs."""
        block = getattr(self.warmer, "block_size", None) or 128
        blocks = getattr(self.mirror, "capacity_blocks", None)
        capacity = blocks * block if blocks else self.capacity_tokens
        budget = self.static_share * capacity if capacity else float("inf")
        for key, messages, tools, _ in list(self._heads):
            tokens = self._head_tokens.get(key)
            if tokens is None:
                options: dict[str, Any] = {"add_generation_prompt": False}
                if tools:
                    options["tools"] = tools
                tokens = tuple(await self.tokenizer.encode_chat(messages, **options))
                self._head_tokens[key] = tokens
            whole = len(tokens) - len(tokens) % block
            budget -= whole
            if budget < 0:
                return
            if not whole or key in self._running:
                continue
            cached = self.mirror.cached_prefix_tokens(tokens) if self.mirror is not None else None
            if cached is None:
                self._counts["skipped_unknown"] += 1
                return
            if cached >= whole:
                continue
            if not self.idle() or self.pressure():
                return
            log.debug("warming head %s: %d tokens, %d cached", key, whole, cached)
            started = time.monotonic()
            task = asyncio.ensure_future(self._timed(tokens[:whole]))
            self._running[key] = task
            try:
                computed = await task
            except asyncio.CancelledError:
                if task.cancelled() and self._keeper is not None and not self._keeper.cancelling():
                    log.debug("head %s taken over by a request after %.2f s", key,
                              time.monotonic() - started)
                    continue  # a real request with this head arrived and took over
                raise
            finally:
                self._running.pop(key, None)
            log.debug("head %s warmed in %.2f s (%d tokens computed)", key,
                      time.monotonic() - started, computed)
            if computed:
                self._counts["static_sent"] += 1
                self._counts["static_tokens"] += computed
                self._warmed[key] = whole
