"""The admin page in a real headless Chromium (Debian's, driven by Playwright), screenshots
saved under tests/artifacts/: pages render, the DAG draws, a script in a prompt stays text,
a wrong token is refused."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path

import pytest

from proxy.admin.graph import Edge, Node, render
from proxy.admin.html import page
from proxy.config import Settings
from proxy.importer import import_trace, read_trace
from storage.store import Store
from tests.conftest import start_proxy
from tests.proxy.traffic import PAYLOAD, workload

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
TAU = ROOT.parent / "shared" / "workloads" / "tau-bench-airline" / "gpt-4o-airline.json"
TOKEN = "browser-test-token"

async_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no {CHROMIUM} (make browser installs it)")


@pytest.fixture
async def browser():
    async with async_api.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        await chromium.close()


@pytest.fixture
def proxy_settings(upstream, tmp_path) -> Settings:
    return Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/preheat.db", admin_token=TOKEN)


async def _shot(pg, name: str) -> None:
    """Save a screenshot for people to look at (the assertions are on the page itself).
    Chromium sometimes cannot capture one on a loaded machine: try again, then go on."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            await pg.screenshot(path=str(ARTIFACTS / f"admin-{name}.png"), full_page=True)
            return
        except async_api.Error as e:
            failed = e
            await asyncio.sleep(0.5 * (attempt + 1))
    warnings.warn(f"no screenshot of {name}: {failed}")


async def _open(pg, url: str, name: str) -> None:
    resp = await pg.goto(url)
    assert resp is not None and resp.status == 200, url
    await _shot(pg, name)


async def test_pages_render_and_the_script_stays_text(proxy, browser):
    await workload(proxy.url)
    await proxy.observer.flush()
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    pg = await ctx.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # The token in the address bar becomes a cookie and leaves the address bar.
    await _open(pg, f"{proxy.url}/admin?token={TOKEN}", "overview")
    assert pg.url == f"{proxy.url}/admin"
    assert "calls captured" in await pg.inner_text("main")

    await _open(pg, f"{proxy.url}/admin/templates", "templates")
    first = pg.locator("main table a").first
    await first.click()
    await pg.wait_for_load_state()
    await _shot(pg, "template")
    assert await pg.locator(".tpl .slot").count() >= 1, "slots are highlighted"

    await _open(pg, f"{proxy.url}/admin/workflows", "workflows")
    await pg.locator("main table a").first.click()
    await pg.wait_for_load_state()
    await _shot(pg, "workflow")
    data = await (await ctx.request.get(pg.url + ".json")).json()
    assert await pg.locator("svg.dag g.g-node").count() == len(data["nodes"]) >= 2
    assert await pg.locator("svg.dag path.g-edge").count() == len(data["edges"])

    await _open(pg, f"{proxy.url}/admin/sessions", "sessions")
    sessions = await (await ctx.request.get(f"{proxy.url}/admin/sessions.json")).json()
    hostile = next(s for s in sessions["sessions"] if s["calls"] == 2)
    await _open(pg, f"{proxy.url}/admin/sessions/{hostile['id']}", "session")
    assert await pg.locator("svg.timeline g.call").count() == 2
    await pg.locator("svg.timeline a").last.click()
    await pg.wait_for_load_state()
    await _shot(pg, "exchange")

    # The payload is on the page as text, and nothing of it ran or became markup.
    assert PAYLOAD in await pg.inner_text("main")
    assert await pg.locator("script").count() == 0
    assert await pg.locator("main img").count() == 0
    assert await pg.evaluate("() => document.querySelectorAll('[onerror]').length") == 0
    assert dialogs == []
    await ctx.close()


async def test_a_wrong_token_is_refused(proxy, browser):
    ctx = await browser.new_context()
    pg = await ctx.new_page()
    resp = await pg.goto(f"{proxy.url}/admin?token=wrong")
    assert resp is not None and resp.status == 401
    assert "401" in await pg.inner_text("body")
    await _shot(pg, "refused")
    resp = await pg.goto(f"{proxy.url}/admin/sessions")  # no cookie was set
    assert resp is not None and resp.status == 401
    await ctx.close()


async def test_a_graph_of_26_nodes_is_readable(browser):
    nodes = [Node(f"t{i:02d}", f"step {i}: a call template", f"{10 + i} calls · 0.4 s",
                  entry=i < 2) for i in range(26)]
    edges = [Edge(f"t{i // 3:02d}", f"t{i:02d}", f"{30 + i}% · 1.2 s", 0.3 + i / 40)
             for i in range(2, 26)]
    edges += [Edge("t20", "t03", "20% · 2 s", 0.2), Edge("t07", "t07", "40%", 0.4)]
    pg = await browser.new_page(viewport={"width": 1600, "height": 1000})
    await pg.set_content(page("A graph of 26 nodes", render(nodes, edges)))
    await _shot(pg, "graph-26")
    boxes = await pg.evaluate(
        "() => [...document.querySelectorAll('g.g-node rect')].map(r => {"
        " const b = r.getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })")
    assert len(boxes) == 26
    for i, (x1, y1, w, h) in enumerate(boxes):
        assert w >= 150 and h >= 40, "node boxes are drawn at full size, not shrunk"
        for x2, y2, _, _ in boxes[i + 1:]:
            assert abs(x1 - x2) >= w or abs(y1 - y2) >= h, "nodes do not overlap"
    await pg.close()


@pytest.mark.skipif(not TAU.exists(), reason="../shared/workloads is not there")
async def test_a_real_workflow_from_an_imported_trace(upstream, tmp_path, browser):
    db = f"sqlite:///{tmp_path}/tau.db"
    store = Store(db)
    import_trace(read_trace(TAU, limit=40), store)
    store.close()
    running = await start_proxy(Settings(upstream=upstream.url, db=db, admin_token=TOKEN))
    try:
        pg = await browser.new_page(viewport={"width": 1400, "height": 900})
        await pg.goto(f"{running.url}/admin/workflows?token={TOKEN}")
        await pg.locator("main table a").first.click()
        await pg.wait_for_load_state()
        await _shot(pg, "workflow-tau-bench")
        assert await pg.locator("svg.dag g.g-node").count() >= 5
        await _open(pg, f"{running.url}/admin/sessions", "sessions-tau-bench")
        await pg.locator("main table a").first.click()
        await pg.wait_for_load_state()
        await _shot(pg, "session-untimed")
        assert "No timings were recorded" in await pg.inner_text("main")
    finally:
        await running.runner.cleanup()
