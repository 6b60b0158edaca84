"""The admin page over HTTP: the token, every page and its JSON twin, nothing proxied."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from proxy.admin import ADMIN_TOKEN
from proxy.admin.graph import NODE_H, NODE_W, Edge, Node, layout, render
from proxy.config import Settings
from tests.conftest import StandInEngine, start_proxy
from tests.proxy.traffic import PAYLOAD, workload

TOKEN = "test-admin-token"


@pytest.fixture
def proxy_settings(upstream, tmp_path) -> Settings:
    return Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/preheat.db", admin_token=TOKEN)


async def _get(proxy, path: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.get(proxy.url + path, **kw)


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("path", ["/admin", "/admin.json", "/admin/sessions", "/admin/templates.json"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Cookie": "preheat_admin=wrong"}])
async def test_without_the_token_every_page_is_refused(proxy, path, headers):
    r = await _get(proxy, path, headers=headers)
    assert r.status_code == 401
    assert "WWW-Authenticate" in r.headers
    if path.endswith(".json"):
        assert r.json()["error"]["code"] == 401


async def test_token_in_the_query_becomes_a_cookie(proxy):
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(proxy.url + f"/admin/sessions?token={TOKEN}")
        assert r.status_code == 302 and r.headers["Location"] == "/admin/sessions"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin" in cookie
        r = await client.get(proxy.url + "/admin/sessions")  # the cookie alone lets it in
        assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
        assert "script-src" not in r.headers["Content-Security-Policy"]  # default-src 'none'
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]


async def test_a_generated_token_is_logged(upstream, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="preheat.admin")
    running = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db"))
    try:
        token = running.app[ADMIN_TOKEN]
        assert len(token) >= 24
        assert f"token={token}" in caplog.text
        r = await _get(running, "/admin.json", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    finally:
        await running.runner.cleanup()


async def test_every_page_and_its_json_twin(proxy_on_each_store, upstream):
    proxy = proxy_on_each_store
    await workload(proxy.url)
    await proxy.observer.flush()
    before = (await proxy.store()).count()["exchanges"]
    seen_upstream = upstream.requests

    overview = (await _get(proxy, "/admin.json", headers=BEARER)).json()
    assert overview["counts"]["exchanges"] == before == 18
    assert overview["tokens"]["prompt"] > 0 and overview["engine"] is None

    sessions = (await _get(proxy, "/admin/sessions.json", headers=BEARER)).json()["sessions"]
    assert sorted(s["calls"] for s in sessions) == [2, 3, 3, 3, 3, 4]
    templates = (await _get(proxy, "/admin/templates.json", headers=BEARER)).json()
    assert templates["templates"], "the learner found call templates"
    flows = (await _get(proxy, "/admin/workflows.json", headers=BEARER)).json()["workflows"]
    assert flows

    session = (await _get(proxy, f"/admin/sessions/{sessions[0]['id']}.json", headers=BEARER)).json()
    assert session["timed"] and all(c["end"] > c["start"] for c in session["calls"])
    assert [c["gap_before"] is None for c in session["calls"]][0]
    assert all(c["gap_before"] > 0 for c in session["calls"][1:])

    pages = ["/admin", "/admin/templates", "/admin/workflows", "/admin/sessions",
             f"/admin/templates/{templates['templates'][0]['id']}",
             f"/admin/workflows/{flows[0]['id']}", f"/admin/sessions/{sessions[0]['id']}",
             f"/admin/exchanges/{session['calls'][0]['id']}"]
    for page in pages:
        html = await _get(proxy, page, headers=BEARER)
        data = await _get(proxy, page + ".json", headers=BEARER)
        assert html.status_code == data.status_code == 200, page
        assert html.text.startswith("<!doctype html>") and "<script" not in html.text.lower()
        assert isinstance(data.json(), dict)

    # None of it went upstream or into the store.
    for path in ("/admin/nothing-here", "/admin/templates/nope", "/admin/exchanges/nope.json"):
        assert (await _get(proxy, path, headers=BEARER)).status_code == 404
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/admin/sessions", headers=BEARER, json={})
    assert r.status_code == 405
    assert upstream.requests == seen_upstream
    assert (await proxy.store()).count()["exchanges"] == before


async def test_captured_text_is_escaped(proxy):
    await workload(proxy.url)
    await proxy.observer.flush()
    sessions = (await _get(proxy, "/admin/sessions.json", headers=BEARER)).json()["sessions"]
    hostile = next(s for s in sessions if s["calls"] == 2)
    session = (await _get(proxy, f"/admin/sessions/{hostile['id']}.json", headers=BEARER)).json()
    page = (await _get(proxy, f"/admin/exchanges/{session['calls'][-1]['id']}",
                       headers=BEARER)).text
    assert "&lt;script&gt;alert(&quot;xss&quot;)&lt;/script&gt;" in page
    assert PAYLOAD not in page and "<img" not in page


@pytest.mark.parametrize("tool_calls", [
    5, [{"id": "c1", "function": "oops"}],
    [{"id": "c1", "function": {"name": "f", "arguments": "[" * 1100 + "]" * 1100}}],
], ids=["not-a-list", "function-not-an-object", "arguments-too-deep"])
async def test_an_exchange_with_malformed_tool_calls_still_has_its_page(proxy, tool_calls):
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": tool_calls}]
    async with httpx.AsyncClient() as client:
        r = await client.post(proxy.url + "/v1/chat/completions",
                              json={"model": "m", "messages": messages})
        assert r.status_code == 200
    (ex,) = (await proxy.store()).exchanges()
    page = await _get(proxy, f"/admin/exchanges/{ex.id}", headers=BEARER)
    assert page.status_code == 200 and "assistant" in page.text


def test_graph_layout_of_26_nodes_has_no_overlaps():
    nodes = [Node(f"t{i}", f"template {i}", entry=i == 0) for i in range(26)]
    edges = [Edge(f"t{i // 3}", f"t{i}", "50%", 0.5) for i in range(1, 26)]
    edges += [Edge("t20", "t1", "back", 0.3), Edge("t5", "t5", "loop", 0.4)]
    lay = layout(nodes, edges)
    boxes = list(lay.boxes.values())
    assert len(boxes) == 26
    for i, (x1, y1) in enumerate(boxes):
        for x2, y2 in boxes[i + 1:]:
            assert abs(x1 - x2) >= NODE_W or abs(y1 - y2) >= NODE_H
        assert 0 <= x1 <= lay.width - NODE_W and 0 <= y1 <= lay.height - NODE_H
    assert len(lay.routes) == len(edges)
    svg = render(nodes, edges)
    assert len(re.findall(r'<g class="g-node', svg)) == 26
    assert svg.count('class="g-edge') == len(edges)


async def test_the_overview_shows_each_optimisation_its_switch_and_what_it_did(
        upstream, tmp_path):
    """A user sees on the admin page which optimisations run, which are off and why, and
    their figures so far, as /metrics has them."""
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admin_token=TOKEN, admission_capacity_tokens=1500, prewarm=False)
    running = await start_proxy(settings)
    try:
        body = {"model": "m", "temperature": 0,
                "messages": [{"role": "user", "content": "the same question"}]}
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(3):  # one miss, then two answers from the prompt cache
                r = await client.post(running.url + "/v1/chat/completions", json=body)
                assert r.status_code == 200
            r = await client.post(running.url + "/v1/chat/completions", json={
                "model": "m", "messages": [{"role": "user", "content": "another"}]})
            assert "preheat-queue;dur=" in r.headers["server-timing"]
            metrics = (await client.get(running.url + "/metrics")).text
        rows = {r["name"]: r for r in (await _get(running, "/admin.json", headers=BEARER))
                .json()["optimisations"]}
        assert rows["cache-aware admission"]["state"] == "on"
        figures = dict(rows["cache-aware admission"]["figures"])
        assert figures["KV cache (tokens)"] == 1500
        let_in = re.findall(r"(\w+) (\d+)", figures["calls let in"])
        assert sum(int(n) for _, n in let_in) == 2  # the two calls the engine answered
        assert 'preheat_admission_total{how="%s"} %s' % let_in[0] in metrics
        assert figures["calls held over 10 ms"] == "0 of 2"  # nothing pressed the cache
        assert dict(rows["prompt cache"]["figures"])["hits"] == 2
        spare = rows["more sessions while the engine has few calls at once"]
        assert spare["state"] == "on" and spare["switch"] == "PREHEAT_ADMISSION_SPARE_BELOW=0"
        assert dict(spare["figures"])["sessions let in on spare throughput"] == 0
        assert rows["pre-warming"]["state"] == "off"
        assert rows["pre-warming"]["switch"] == "--no-prewarm / PREHEAT_PREWARM"
        page = (await _get(running, "/admin", headers=BEARER)).text
        assert "<h2>Optimisations</h2>" in page and "<code>--no-prompt-cache" in page
    finally:
        await running.runner.cleanup()


async def test_the_overview_counts_the_guests_and_says_when_they_cannot_run(upstream, tmp_path):
    """Guests run only where the engine evicts their blocks first: with another vLLM
    (`--upstream`) the row says what they need; with them on, their calls are counted."""
    from engine.admission import Admission, prompt_chain
    from proxy.admin.live import optimisations
    from proxy.appkeys import ADMISSION, SETTINGS

    name = "guests: sessions that would wait run at once, evicted first"
    settings = Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                        admin_token=TOKEN, admission_capacity_tokens=1500, prewarm=False)
    running = await start_proxy(settings)
    try:
        rows = {r["name"]: r for r in (await _get(running, "/admin.json", headers=BEARER))
                .json()["optimisations"]}
    finally:
        await running.runner.cleanup()
    assert rows[name]["state"] == ("inactive (needs admission, and preheat's own engine or "
                                   "PREHEAT_ADMISSION_GUESTS=1)")
    assert rows[name]["switch"] == "--no-admission-guests / PREHEAT_ADMISSION_GUESTS"
    assert rows["finished sessions evicted first"]["state"].startswith("inactive (needs")

    adm = Admission(1000, fill=1.0, hold=60, max_wait=30, guests=True, evict_done=True,
                    guest_busy_below=1.0)
    adm.chars_per_token = 1.0

    def ticket(*contents: str):
        return adm.ticket(*prompt_chain({"messages": [{"role": "user", "content": c}
                                                      for c in contents]}))

    adm.restore({"version": 1, "finished": [[700, 4, ticket("S" * 100).kind]] * 5,
                 "gaps": [], "chars_per_token": 1.0, "runs": []})
    resident, guest = ticket("S" * 100, "a" * 150), ticket("S" * 100, "b" * 150)
    await adm.enter(resident)
    await adm.enter(guest)  # no room for all it grows to beside the resident: a guest
    assert guest.how == "guest"
    app = {SETTINGS: Settings(upstream=upstream.url, admission_guests=True), ADMISSION: adm}
    row = {r["name"]: r for r in optimisations(app)}[name]
    assert row["state"] == "on"
    figures = dict(row["figures"])
    busy = figures.pop("engine busy share, last 20 s (guests go in below 1)")
    assert figures == {"guest calls let in": 1, "guest calls on the engine now": 1}
    assert 0 < busy <= 1  # (the resident's call has run all the while: a few ms)
    adm.leave(guest, 10)
    rows = {r["name"]: r for r in optimisations(app)}
    assert dict(rows[name]["figures"])["guest calls on the engine now"] == 0
    done = rows["finished sessions evicted first"]
    assert done["state"] == "on" and done["figures"] == [["last calls sent to be evicted "
                                                         "first", 0]]


async def test_optimisations_the_upstream_cannot_support_say_why(proxy):
    """The fake upstream reports no KV cache: admission, and what needs it, say so."""
    rows = {r["name"]: r for r in (await _get(proxy, "/admin.json", headers=BEARER))
            .json()["optimisations"]}
    assert rows["cache-aware admission"]["state"].startswith("inactive (needs a vLLM")
    assert rows["least work left first (workflow runs)"]["state"] == "inactive (needs admission)"
    assert rows["cache-aware admission"]["figures"] == []
    assert rows["prompt cache"]["state"] == "on"


def test_a_call_admission_held_shows_its_wait_on_the_timeline():
    from proxy.admin import timeline

    def call(held: float) -> dict:
        return {"id": "x", "start": 0.0, "first_token": 0.8, "end": 1.0, "held": held,
                "prompt_tokens": 10, "cached_tokens": 0, "completion_tokens": 3}

    held = str(timeline.render([call(0.5)], 1.0))
    assert 'fill="#b9c0cc"' in held and "held by preheat 500 ms" in held
    # The engine's part starts when the call was sent: 0.5 s of 1 s into the plot.
    engine_x = timeline.LEFT + timeline.PLOT * 0.5
    assert f'x="{engine_x:.1f}" y="{timeline.TOP + 4}" width=' in held
    parsed = str(timeline.render([call(0.002)], 1.0))  # reading the request: not a hold
    assert 'fill="#b9c0cc"' not in parsed and "held by preheat" not in parsed


def test_the_overview_says_how_long_admission_held_calls():
    from engine.admission import Admission
    from proxy.admin.live import _admission
    from proxy.metrics import Metrics

    admission = Admission(1500)
    metrics = Metrics()
    metrics.count_admission_waits()
    assert dict(_admission(admission, metrics.waits))["calls held over 10 ms"] == "-"
    for wait in [0.0] * 6 + [0.3, 0.4, 4.0, 20.0]:
        metrics.waits.observe(wait)
    assert dict(_admission(admission, metrics.waits))["calls held over 10 ms"] == \
        "4 of 10 (half within 0.01 s, 90% within 5 s)"
    assert metrics.waits.at_most(1.0) == 30.0 and metrics.waits.at_most(0.7) == 0.5


async def test_the_overview_shows_what_the_engine_runs_and_keeps_waiting(upstream, tmp_path):
    """Read from the engine's own gauges when the page is asked for: a user sees whether
    calls wait inside the engine for KV blocks (cache pressure) beside admission's queue."""
    upstream.metrics_page = "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_waiting{engine="0",model_name="m"} 5.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.968',
    ])
    engine = StandInEngine(upstream.url)
    proxy = await start_proxy(Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/p.db",
                                       admin_token=TOKEN, prewarm=False),
                              before=[engine.embedded()])
    try:
        shown = (await _get(proxy, "/admin.json", headers=BEARER)).json()["engine"]
        assert shown["calls running"] == 3 and shown["calls waiting in it"] == 5
        assert shown["KV cache in use"] == "97%"
        page = (await _get(proxy, "/admin", headers=BEARER)).text
        assert "calls waiting in it" in page and "97%" in page
        # A vLLM without metrics, or an engine restarting: the rest of the page as before.
        upstream.metrics_page = None
        shown = (await _get(proxy, "/admin.json", headers=BEARER)).json()["engine"]
        assert shown["state"] == "ready" and "calls running" not in shown
        upstream.metrics_page = 'vllm:num_requests_running{engine="0"} 1.0'
        engine.ready, engine.state = False, "restarting"
        shown = (await _get(proxy, "/admin.json", headers=BEARER)).json()["engine"]
        assert shown["state"] == "restarting" and "calls running" not in shown
    finally:
        await proxy.runner.cleanup()
