"""The upstream seam: a user and password in the upstream URL are used, and shown nowhere."""

from __future__ import annotations

import asyncio
import base64
import logging

import httpx
import pytest

from engine.process import free_port
from proxy.config import Settings
from proxy.upstream import Upstream, redacted
from tests.conftest import start_proxy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SECRET = "s3cret"
BASIC = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()


@pytest.mark.parametrize("url, shown", [
    ("http://user:s3cret@127.0.0.1:1", "http://127.0.0.1:1"),
    ("https://user:s3cret@api.example.com/v1/", "https://api.example.com/v1/"),
    ("http://token@h:8000/v1", "http://h:8000/v1"),
    ("http://:s3cret@h", "http://h"),
    ("http://user:s3c@ret@h/v1", "http://h/v1"),  # an unescaped '@': the last one ends it
    ("http://user:s3c/ret@h", "http://h"),  # a bare '/': not a URL yarl reads
    ("user:s3cret@h:8000", "h:8000"),  # no scheme
    ("http://127.0.0.1:8000/v1?x=1", "http://127.0.0.1:8000/v1?x=1"),  # untouched
])
def test_redacted_drops_the_user_and_password(url, shown):
    assert redacted(url) == shown


@pytest.mark.parametrize("base, path, sent", [
    ("http://h:8000", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "/models?x=1", "http://h:8000/v1/models?x=1"),  # a client without /v1
    ("http://h:8000/v1", "/metrics", "http://h:8000/metrics"),  # vLLM's own routes: at its root
    ("http://h:8000/v1", "/tokenize", "http://h:8000/tokenize"),
    ("https://gw.example.com/llm/v1", "/health", "https://gw.example.com/llm/health"),
    ("https://gw.example.com/llm", "/metrics", "https://gw.example.com/llm/metrics"),
])
def test_an_upstream_given_with_v1_reaches_the_same_routes(base, path, sent):
    """`--upstream http://host:8000/v1`, as OPENAI_BASE_URL habit writes it, works as without:
    admission reads the KV-cache size from /metrics, pre-warming tokenizes at /tokenize."""
    assert str(Upstream(base).url(path)) == sent


@pytest.mark.parametrize("base, server", [
    ("http://h:8000", "http://h:8000"),
    ("http://u:p@h:8000/v1/", "http://u:p@h:8000"),
    ("https://gw.example.com/llm/v1", "https://gw.example.com/llm"),
])
def test_the_server_url_is_the_base_without_v1(base, server):
    assert Upstream(base).server_url == server


async def test_credentials_in_the_upstream_url_reach_no_page_body_log_or_store(tmp_path, caplog):
    """/healthz asks no token, the 502 body goes to any client, and the error is stored."""
    caplog.set_level(logging.INFO)
    upstream = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    proxy = await start_proxy(Settings(upstream=upstream, admin_token="t", admission=False,
                                       prewarm=False, db=f"sqlite:///{tmp_path}/p.db"))
    try:
        async with httpx.AsyncClient() as client:
            health = await client.get(proxy.url + "/healthz")
            failed = await client.post(proxy.url + "/v1/chat/completions", json=CHAT)
            admin = await client.get(proxy.url + "/admin.json",
                                     headers={"Authorization": "Bearer t"})
        assert health.json()["upstream"] == redacted(upstream)
        assert failed.status_code == 502
        assert "cannot connect to the upstream at http://127.0.0.1:" in failed.text
        assert admin.json()["upstream"] == redacted(upstream)
        store = await proxy.store()
        [ex] = list(store.exchanges())
        assert ex.error_type == "upstream_unreachable"
    finally:
        await proxy.runner.cleanup()
    for shown in (health.text, failed.text, admin.text, caplog.text):
        assert SECRET not in shown
    stored = [p for p in tmp_path.iterdir() if p.name.startswith("p.db")]
    assert stored  # the database and, in WAL mode, its -wal file
    for path in stored:
        data = path.read_bytes()
        assert SECRET.encode() not in data and BASIC.split()[1].encode() not in data, path.name


@pytest.mark.parametrize("sent, received", [
    ({}, BASIC),
    ({"Authorization": "Bearer sk-client"}, "Bearer sk-client"),  # the client's own wins
])
async def test_credentials_in_the_upstream_url_are_sent_as_basic_auth(
        upstream, tmp_path, sent, received):
    url = upstream.url.replace("http://", f"http://user:{SECRET}@")
    proxy = await start_proxy(Settings(upstream=url, admission=False, prewarm=False,
                                       db=f"sqlite:///{tmp_path}/p.db"))
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(proxy.url + "/echo/x", headers=sent)
        assert r.status_code == 200
        assert r.json()["headers"]["Authorization"] == received
    finally:
        await proxy.runner.cleanup()


async def test_a_malformed_reply_is_502_without_the_request_headers(tmp_path):
    """aiohttp's error for a reply it cannot parse carries the request's headers in its repr;
    the message must not, or the client's API key lands in the store."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"not HTTP at all\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await start_proxy(Settings(upstream=f"http://user:{SECRET}@127.0.0.1:{port}",
                                       admission=False, prewarm=False,
                                       db=f"sqlite:///{tmp_path}/p.db"))
    try:
        async with httpx.AsyncClient() as client:
            r = await client.post(proxy.url + "/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": "Bearer sk-client-key"})
        assert r.status_code == 502 and "failed before replying" in r.text, r.text
        store = await proxy.store()
        [ex] = list(store.exchanges())
    finally:
        await proxy.runner.cleanup()
        server.close()
    for shown in (r.text, ex.error):
        assert "sk-client-key" not in shown and SECRET not in shown
