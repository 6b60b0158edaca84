"""The observer process: capture, analysis and learning, off the proxy's GIL.

In the proxy process a finished exchange costs the event loop one pickle of its raw fields
(`Exchange.raw()`) and one non-blocking write to a socket. A child process reads them in
batches and runs the `Observer` (analyse, link, store) and the live learner, so none of that
competes with the event loop for the GIL (bench/results/overhead.md says what it did).

    proxy: ObserverProcess                         observer process: _Child
    submit(ex) ─────── ("ex", raw, feedback) ──▶  Observer.process(batch) ─▶ store, learn/
               ◀── ("done", n, written, dropped) ─ after every batch
               ◀── ("usage", id, usage, cached, answer hashes) ─ for calls admission wants
               ◀── ("offer", key, ..., expected) ─ predictions, once the planner listens
               ◀── ("heads", [(key, messages, tools, sessions)]) ─ static heads, when changed
    learned()  ──────────── ("learned",) ──────▶
               ◀─────── ("learned", snapshot) ─── for the admin pages
    keep_admission(s) ─── ("admission", s) ────▶  saved with the learned snapshot

Each frame is a 4-byte length and a pickle. Captures stay countable: `depth` is submitted
minus processed; a full queue (in exchanges, or in bytes the proxy holds for the child), a
child that died holding exchanges, and a child not running all lose captures, counted in
`dropped` by reason (with those the child itself lost), and a dead child is started again.
With `retain_days` the child also deletes old captures (storage/retention.py), in steps of
about 50 ms while it waits for captures (and one every `RETAIN_BUSY` s when they never
stop). The child ignores SIGINT (Ctrl-C reaches the whole process group, and the proxy
decides when capture ends); it stops when the proxy closes its end of the socket, after
writing everything it was sent, or on SIGTERM after what it has received.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from collections import Counter, deque
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from engine.admission import Ticket, prompt_chain
from engine.runs import answer_hashes
from learn.learner import Learner
from learn.predict import Prediction
from learn.sessions import SessionLinker
from proxy.config import Settings
from proxy.exchange import Exchange
from proxy.learning import LearnSink
from proxy.observe import Drops, Observer
from storage.learned import server_name
from storage.retention import Retention
from storage.store import SERVING_BEAT, Store, StoreError

log = logging.getLogger("preheat.observe")

_LENGTH = struct.Struct("<I")
BATCH = 256
"""Most exchanges written in one transaction."""
HEADS_SENT = 8
"""Static heads the child names to the pre-warm planner."""
IMPORTS_EVERY = 2.0
"""Seconds between looks for calls `preheat import` stored, to learn them."""
NICE = 10
"""The child's CPU priority below the proxy's: its work can wait, a call's cannot."""
RESTART_DELAY = 1.0
RETAIN_BUSY = 0.5
"""Seconds between retention's steps while captures arrive without a pause."""
COPY_TTL = 2.0
"""Seconds an admin page's copy of the live learner is reused before a fresh one is asked."""


def _frame(message: tuple) -> bytes:
    payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def _unframe(buf: bytearray) -> list[bytes]:
    """The complete frames at the head of `buf`, removed from it."""
    out: list[bytes] = []
    at = 0
    while len(buf) - at >= _LENGTH.size:
        (n,) = _LENGTH.unpack_from(buf, at)
        if len(buf) - at - _LENGTH.size < n:
            break
        out.append(bytes(buf[at + _LENGTH.size:at + _LENGTH.size + n]))
        at += _LENGTH.size + n
    del buf[:at]
    return out


class ObserverProcess:
    """The proxy's end: hands exchanges to the observer process and hears back from it.

    Every method runs on the event loop except `learner()`, which blocks (worker threads).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.maxsize = settings.capture_queue
        self.max_bytes = settings.capture_queue_bytes
        self.dropped = Drops()
        self.written = 0
        self.restarts = 0
        self.on_usage: Callable[[Ticket, dict | None, int | None, list[int]], None] | None = None
        """Called with (ticket, usage, cached tokens, the answer's chunk hashes:
        `engine.runs.answer_hashes`) once the child read a ticketed call."""
        self._on_offer: Callable[..., None] | None = None
        self._on_heads: Callable[[list], None] | None = None
        self._submitted = 0
        self._processed = 0
        self._tickets: dict[str, Ticket] = {}
        self._waiters: list[asyncio.Future] = []
        self._learned: deque[asyncio.Future] = deque()
        self._transport: asyncio.Transport | None = None
        self._process: BaseProcess | None = None
        self._ready: asyncio.Future | None = None
        self._gone: asyncio.Future | None = None
        self._restarting: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._running = False
        self._copy: Learner | None = None
        self._copy_at = 0.0
        self._copy_lock = threading.Lock()

    @property
    def depth(self) -> int:
        """Exchanges handed over and not yet processed."""
        return self._submitted - self._processed

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Start the child; return once its store is open (`StoreError` if it cannot be)."""
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        context = multiprocessing.get_context("forkserver")  # restarts skip the imports
        context.set_forkserver_preload([__name__])
        process = context.Process(target=_child_main, args=(theirs, self.settings),
                                  name="preheat-observer", daemon=True)
        try:
            await asyncio.to_thread(process.start)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process = process
        self._ready, self._gone = self._loop.create_future(), self._loop.create_future()
        await self._loop.create_unix_connection(lambda: _Link(self), sock=ours)
        try:
            await self._ready
        except BaseException:
            if self._transport is not None:
                self._transport.close()  # the child sees the end of its input and exits
            await asyncio.to_thread(self._reap)
            raise
        self._running = True
        if self._on_offer is not None and self._transport is not None:
            self._transport.write(_frame(("listen",)))

    def submit(self, ex: Exchange) -> bool:
        """Hand a finished exchange over. Never blocks; False (and counted) when dropped."""
        if self._closed:
            self.dropped.add("closed", 1)
            return False
        if self._transport is None:
            self.dropped.add("observer_down", 1)
            return False
        if self.depth >= self.maxsize:
            self.dropped.add("queue_full", 1)
            return False
        # What the child has not read yet waits in the transport's buffer, in this process:
        # bounded so, it holds at most `max_bytes` and one exchange more. Checked before the
        # pickle, so a lagging child costs the event loop nothing per call dropped.
        if self._transport.get_write_buffer_size() >= self.max_bytes:
            self.dropped.add("queue_bytes", 1)
            return False
        feedback = ex.ticket is not None and self.on_usage is not None
        self._transport.write(_frame(("ex", ex.raw(), feedback)))
        self._submitted += 1
        if feedback:
            self._tickets[ex.id] = ex.ticket
        return True

    def keep_admission(self, snapshot: dict) -> None:
        """Have admission's snapshot saved with the learner's (read back after a restart)."""
        if self._transport is not None and not self._closed:
            self._transport.write(_frame(("admission", snapshot)))

    def listen(self, on_offer: Callable[..., None],
               on_heads: Callable[[list], None] | None = None) -> None:
        """Hand the learner's predictions that a session continues to `on_offer`, as
        (prompt key, messages, answer, tools, probability, expected in seconds), and the
        static heads worth keeping warm to `on_heads`, as [(key, messages, tools, sessions)]
        (sent once at once, then whenever they change)."""
        self._on_offer = on_offer
        self._on_heads = on_heads
        if self._transport is not None:
            self._transport.write(_frame(("listen",)))

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything submitted so far is processed (or lost, and counted)."""
        assert self._loop is not None
        target, deadline = self._submitted, self._loop.time() + timeout
        while self._processed < target and self._loop.time() < deadline:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - self._loop.time())
            except asyncio.TimeoutError:
                break

    async def learned(self) -> dict | None:
        """The live learner's snapshot, learned from everything submitted before the call."""
        if self._transport is None or not self.settings.learn:
            return None
        assert self._loop is not None
        reply = self._loop.create_future()
        self._learned.append(reply)
        self._transport.write(_frame(("learned",)))
        return await reply

    def learner(self, timeout: float = 30.0) -> Learner | None:
        """A copy of the live learner, at most `COPY_TTL` old. Blocks: call from a thread."""
        if self._loop is None or not self.settings.learn:
            return None
        with self._copy_lock:
            if self._copy is None or time.monotonic() - self._copy_at > COPY_TTL:
                data = asyncio.run_coroutine_threadsafe(self.learned(), self._loop).result(timeout)
                if data is not None:
                    self._copy, self._copy_at = Learner.restore(data), time.monotonic()
            return self._copy

    async def close(self, timeout: float = 60.0) -> None:
        """Stop accepting, let the child write everything it was sent, then stop it."""
        if self._closed:
            return
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
        if self._transport is not None and self._gone is not None:
            self._transport.write_eof()
            try:
                await asyncio.wait_for(asyncio.shield(self._gone), timeout)
            except asyncio.TimeoutError:
                log.error("capture did not finish writing within %.0f s; %d left", timeout,
                          self.depth)
                self._transport.abort()
        await asyncio.to_thread(self._reap)

    def _reap(self) -> int | None:
        """Wait for the child to exit (killed after 10 s); its exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        process.join(10)
        if process.exitcode is None:
            process.kill()
            process.join()
        code = process.exitcode
        process.close()
        return code

    # -- from the child ----------------------------------------------------------------------

    def _received(self, message: tuple) -> None:
        kind = message[0]
        if kind == "done":
            _, n, written, dropped = message
            self._processed += n
            self.written += written
            self.dropped.update(dropped)
            self._wake()
        elif kind == "usage":
            ticket = self._tickets.pop(message[1], None)
            if ticket is not None and self.on_usage is not None:
                self.on_usage(ticket, message[2], message[3], message[4])
        elif kind == "offer":
            if self._on_offer is not None:
                self._on_offer(*message[1:])
        elif kind == "heads":
            if self._on_heads is not None:
                self._on_heads(message[1])
        elif kind == "learned":
            if self._learned:
                _settle(self._learned.popleft(), message[1])
        elif kind == "ready":
            assert self._ready is not None
            self._ready.set_result(None)
        elif kind == "failed":
            assert self._ready is not None
            self._ready.set_exception(StoreError(message[1]))

    def _lost(self) -> None:
        """The child's end closed: it finished after `close()`, or it died."""
        self._transport = None
        lost = self._submitted - self._processed
        if lost:
            self.dropped.add("observer_died", lost)
        self._processed = self._submitted
        self._tickets.clear()
        while self._learned:
            _settle(self._learned.popleft(), None)
        self._wake()
        assert self._ready is not None and self._gone is not None
        self._gone.set_result(None)
        if not self._ready.done():
            self._ready.set_exception(RuntimeError("the observer process exited while starting"))
        if self._running and not self._closed:
            assert self._loop is not None
            self._restarting = self._loop.create_task(self._restart(lost))
        self._running = False

    async def _restart(self, lost: int) -> None:
        code = await asyncio.to_thread(self._reap)
        log.error("the observer process exited (code %s) with %d capture(s) in hand; "
                  "starting it again", code, lost)
        while not self._closed:
            await asyncio.sleep(RESTART_DELAY)
            try:
                await self.start()
                self.restarts += 1
                return
            except Exception:
                log.exception("could not start the observer process; trying again")

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _settle(waiter, None)


def _settle(future: asyncio.Future, result: Any) -> None:
    if not future.done():  # its waiter may have given up
        future.set_result(result)


class _Link(asyncio.Protocol):
    def __init__(self, owner: ObserverProcess) -> None:
        self.owner = owner
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        for payload in _unframe(self.buf):
            self.owner._received(pickle.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost()


# -- the observer process ----------------------------------------------------------------------


def _child_main(sock: socket.socket, settings: Settings) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.nice(NICE)
    from proxy.cli import LOG_FORMAT

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    _Child(sock, settings).run(stop)


class _Child:
    """Reads exchanges, processes them in batches, and reports back, on one thread."""

    def __init__(self, sock: socket.socket, settings: Settings) -> None:
        self.sock = sock
        self.settings = settings
        self.observer: Observer | None = None
        self.learning: LearnSink | None = None
        self.retention: Retention | None = None
        self.feedback: set[str] = set()
        self.offers = False
        self.heads_sent = -1
        self.out: list[bytes] = []
        self.reported = Counter[str]()
        self.reported_written = 0
        self.ticked = self.marked = self.retained = -math.inf

    def run(self, stop: threading.Event) -> None:
        if not self._open():
            return
        buf = bytearray()
        while not stop.is_set():
            self._tick()
            busy = self.retention is not None and self.retention.busy
            if not select.select([self.sock], [], [], 0.01 if busy else 0.5)[0]:
                self._retain(idle=True)
                continue  # woken only to notice SIGTERM, or to go on with retention
            self._retain(idle=False)
            data = self.sock.recv(1 << 20)
            if not data:
                break
            buf += data
            self._handle(_unframe(buf))
        try:  # after SIGTERM: what has already arrived is still written
            while data := self.sock.recv(1 << 20, socket.MSG_DONTWAIT):
                buf += data
        except (BlockingIOError, ConnectionError):
            pass
        self._handle(_unframe(buf))
        self._close()

    def _open(self) -> bool:
        try:
            store = Store(self.settings.db)
        except StoreError as exc:
            self._send(("failed", str(exc)))
            self._flush_out()
            return False
        self.observer = Observer(store, SessionLinker(window=self.settings.session_window))
        if self.settings.learn:
            self.learning = LearnSink(store, server=server_name(
                self.settings.port, self.settings.server_name))
            self.learning.catch_up()
            self.learning.listeners.append(self._offer)
            self.observer.sinks.append(self.learning)
        self.observer.sinks.append(self)
        if self.settings.retain_days is not None:
            self.retention = Retention(store, self.settings.retain_days)
        self._tick()
        self._send(("ready",))
        self._flush_out()
        return True

    def _tick(self) -> None:
        """Keep the store's mark that a server writes to it (every `SERVING_BEAT` s; `preheat
        learn` reads it), and learn what `preheat import` stored meanwhile (every
        `IMPORTS_EVERY` s: one row read, unless there is something to learn)."""
        now = time.monotonic()
        if now - self.ticked < IMPORTS_EVERY:
            return
        self.ticked = now
        assert self.observer is not None and self.observer.store is not None
        try:
            if now - self.marked >= SERVING_BEAT:
                self.marked = now
                self.observer.store.mark_serving(self.learning is not None)
            if self.learning is not None:
                self.learning.catch_up_imports()
        except Exception as exc:  # a busy or failing store: the captures say more
            log.warning("could not mark the store as served or learn its imports: %s", exc)

    def _retain(self, idle: bool) -> None:
        """Delete what is older than `retain_days` while a pass is under way (every 5
        minutes), a step of about 50 ms at a time: whenever nothing waits to be read, and
        every `RETAIN_BUSY` s between batches when captures keep coming."""
        if self.retention is None:
            return
        now = time.monotonic()
        if not idle and now - self.retained < RETAIN_BUSY:
            return
        self.retained = now
        try:
            self.retention.step()
        except Exception:
            log.exception("retention failed; trying again at its next pass")
            self.retention.abandon()

    def _close(self) -> None:
        assert self.observer is not None and self.observer.store is not None
        if self.retention is not None:
            self.retention.close()
        if self.learning is not None:
            self.learning.save()
        try:
            self.observer.store.unmark_serving()
        except Exception as exc:
            log.warning("could not clear the store's mark of this server: %s", exc)
        self.observer.store.close()
        self._flush_out()
        self.sock.close()

    def _handle(self, frames: list[bytes]) -> None:
        batch: list[Exchange] = []
        unreadable = 0
        for payload in frames:
            try:
                message = pickle.loads(payload)
                kind = message[0]
                if kind == "ex":
                    ex = Exchange.from_raw(message[1])
                    if message[2]:
                        self.feedback.add(ex.id)
                    batch.append(ex)
            except Exception:  # the proxy sends little else: count it as an exchange lost
                log.exception("an unreadable message reached the observer process")
                unreadable += 1
                continue
            if kind == "learned":
                self._process(batch, unreadable)
                batch, unreadable = [], 0
                self._send(("learned", self._snapshot()))
            elif kind == "listen":
                self.offers = True
            elif kind == "admission" and self.learning is not None:
                self.learning.keep_admission(message[1])
        self._process(batch, unreadable)
        self._send_heads()
        self._flush_out()

    def _process(self, batch: list[Exchange], unreadable: int) -> None:
        assert self.observer is not None
        if unreadable:
            self.observer.dropped.add("unreadable", unreadable)
            self._report(unreadable)
        for i in range(0, len(batch), BATCH):
            chunk = batch[i:i + BATCH]
            self.observer.process(chunk)
            self._report(len(chunk))

    def _report(self, n: int) -> None:
        """Tell the proxy `n` more exchanges are done with, and what was written and lost."""
        assert self.observer is not None
        dropped = self.observer.dropped - self.reported
        self.reported = Counter(self.observer.dropped)
        written, self.reported_written = (self.observer.written - self.reported_written,
                                          self.observer.written)
        self._send(("done", n, written, dict(dropped)))

    def _snapshot(self) -> dict | None:
        if self.learning is None:
            return None
        try:
            return self.learning.learner.snapshot()
        except Exception:
            log.exception("could not take a snapshot of the learner for the admin page")
            return None

    def observe(self, ex: Exchange) -> None:
        """Sink: the proxy waits on the usage of calls that admission let in."""
        if ex.id in self.feedback:
            self.feedback.discard(ex.id)
            hashes = answer_hashes(ex.answer)
            self._send(("usage", ex.id, ex.usage, ex.cached_tokens, hashes))

    def _offer(self, ex: Exchange, predictions: list[Prediction]) -> None:
        """Learner listener: the likeliest continuation of this call's session, for warming."""
        if not self.offers or ex.answer is None or not isinstance(ex.request_json, dict):
            return
        best = max((p for p in predictions if p.kind == "continue"),
                   key=lambda p: p.probability, default=None)
        if best is None:
            return
        prompt = prompt_chain(ex.request_json)
        if prompt is None or not prompt[0]:
            return
        self._send(("offer", prompt[0][-1], ex.messages, ex.answer, ex.tools, best.probability,
                    best.expected_in))

    def _send_heads(self) -> None:
        """The static heads worth keeping warm, whenever they change (and once on `listen`)."""
        if not self.offers or self.learning is None:
            return
        heads = self.learning.heads
        if heads.version == self.heads_sent:
            return
        self.heads_sent = heads.version
        top = heads.top(HEADS_SENT, now=time.time())
        self._send(("heads", [(h.key, list(h.messages), list(h.tools), h.sessions) for h in top]))

    def _send(self, message: tuple) -> None:
        self.out.append(_frame(message))

    def _flush_out(self) -> None:
        if self.out:
            data, self.out = b"".join(self.out), []
            try:
                self.sock.sendall(data)
            except OSError:  # the proxy is gone; nobody is left to tell
                pass
