"""Shared fixtures: a fake upstream and a proxy in front of it, both in-process on port 0."""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import warnings
from dataclasses import dataclass

import pytest
from aiohttp import web
from sqlalchemy.engine import make_url

from proxy.config import Settings
from proxy.observer_process import ObserverProcess
from proxy.server import ENGINE, OBSERVER, SERVER_KWARGS, build_app
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


class StandInEngine:
    """The engine preheat runs, as far as the proxy asks: where it is, and whether it is up
    (a fake upstream plays its server)."""

    def __init__(self, base_url: str) -> None:
        self.base_url, self.ready, self.state = base_url, True, "ready"

    def embedded(self):
        """A startup context (`start_proxy`'s `before`) that makes it the proxy's engine."""
        async def ctx(app: web.Application):
            app[ENGINE] = self
            yield
        return ctx


@pytest.fixture
def proxy_settings(upstream, tmp_path) -> Settings:
    return Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/preheat.db")


@pytest.fixture
async def proxy(proxy_settings):
    running = await start_proxy(proxy_settings)
    yield running
    await running.runner.cleanup()


class Postgres:
    """A PostgreSQL server the tests make their databases on: their own (pgserver's binaries,
    from PyPI), or the one PREHEAT_TEST_POSTGRES names, to test on another version."""

    ENV = "PREHEAT_TEST_POSTGRES"

    def __init__(self, url: str) -> None:
        self.url = url  # one of the server's databases, to connect to
        self.created: list[str] = []

    @staticmethod
    def shown(url: str) -> str:
        """The URL, its password hidden."""
        return make_url(url).render_as_string(hide_password=True)

    def _url(self, database: str | None = None) -> str:
        url = make_url(self.url).set(drivername="postgresql")
        if database:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    def _connect(self):
        import psycopg
        return psycopg.connect(self._url(), autocommit=True, connect_timeout=10)

    def new_database(self) -> str:
        """A new, empty database's URL, as `PREHEAT_DB` names one."""
        name = f"t{secrets.token_hex(6)}"
        with self._connect() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.created.append(name)
        return self._url(name)

    def drop_created(self) -> None:
        """Drop the databases the tests made (on a server of the user's, not only ours)."""
        with self._connect() as conn:
            for name in self.created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pytest_report_header(config) -> str | None:
    url = os.environ.get(Postgres.ENV)
    if url:
        return f"PostgreSQL: {Postgres.shown(url)} ({Postgres.ENV})"
    return None


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """The PostgreSQL server of this test run: `PREHEAT_TEST_POSTGRES` (a URL of a database on
    a server whose user may create databases) or, without it, one of the run's own."""
    url = os.environ.get(Postgres.ENV)
    if url:
        server = Postgres(url)
        try:
            server._connect().close()
        except Exception as exc:  # noqa: BLE001 (any failure: say which server, and why)
            pytest.fail(f"{Postgres.ENV}: cannot connect to {Postgres.shown(url)}: {exc}",
                        pytrace=False)
        yield server
        server.drop_created()
        return
    with warnings.catch_warnings():  # platformdirs: no XDG_RUNTIME_DIR here
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            pytest.skip("pgserver is not installed (pip install -e '.[test]')")
        own = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    yield Postgres(own.get_uri())
    own.cleanup()


@pytest.fixture
def postgres_url(postgres) -> str:
    """A new, empty PostgreSQL database, as `PREHEAT_DB` names one."""
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new, empty store of each kind preheat supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/preheat.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
async def proxy_on_each_store(proxy_settings, db_url):
    """`proxy`, capturing to a SQLite file, then to a PostgreSQL database."""
    running = await start_proxy(dataclasses.replace(proxy_settings, db=db_url))
    yield running
    await running.runner.cleanup()
