"""Shared fixtures: a fake upstream and a proxy in front of it, both in-process on port 0."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from aiohttp import web

from proxy.config import Settings
from proxy.observer_process import ObserverProcess
from proxy.server import OBSERVER, SERVER_KWARGS, build_app
from storage.store import Store
from tests.fake_upstream import FakeUpstream


@pytest.fixture
async def upstream():
    fake = await FakeUpstream().start()
    yield fake
    await fake.stop()


@dataclass
class RunningProxy:
    url: str
    app: web.Application
    db: str
    runner: web.AppRunner

    @property
    def observer(self) -> ObserverProcess:
        return self.app[OBSERVER]

    async def store(self) -> Store:
        """The capture store, once everything sent so far is written."""
        await self.observer.flush()
        return Store(self.db)


async def start_proxy(settings: Settings, before=()) -> RunningProxy:
    """A proxy on a free port; `before`: startup contexts to run ahead of preheat's own."""
    app = build_app(settings)
    app.cleanup_ctx[:0] = list(before)
    runner = web.AppRunner(app, access_log=None, **SERVER_KWARGS)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    return RunningProxy(f"http://127.0.0.1:{port}", app, settings.db, runner)


@pytest.fixture
def proxy_settings(upstream, tmp_path) -> Settings:
    return Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/preheat.db")


@pytest.fixture
async def proxy(proxy_settings):
    running = await start_proxy(proxy_settings)
    yield running
    await running.runner.cleanup()
