"""The web console (/ui/) in a real headless Chromium (Debian's ``chromium``, driven by Playwright
with ``executable_path``; no browser is downloaded), against ``xdsserver serve`` on the bundled
bookinfo with two real Envoy ztunnels (one SotW, one delta) connected over ADS.

Screenshots go to ``$XDS_CONSOLE_ARTIFACTS`` (default ``build/console-artifacts/``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import REPO, Envoy, Serve, http_get, http_send, poll

pytestmark = [pytest.mark.envoy, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
BOOKINFO = REPO / "golden" / "bookinfo" / "manifests"
PRODUCTPAGE = "default/productpage-v1-7c548b785b-mhjm6"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
BAD_CLUSTER = {"name": "injected-bad", "type": "ORIGINAL_DST", "lb_policy": "ROUND_ROBIN"}
ARTIFACTS = Path(os.environ.get("XDS_CONSOLE_ARTIFACTS", REPO / "build" / "console-artifacts"))

playwright_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists() or not shutil.which("envoy"):
    pytest.skip("needs /usr/bin/chromium (scripts/setup-browser) and envoy", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    work = tmp_path_factory.mktemp("console")
    s = Serve(work, BOOKINFO).start()
    envoys = [Envoy(work, "ambient-worker2", s.xds_port), Envoy(work, "ambient-worker", s.xds_port, delta=True)]
    try:
        poll(lambda: {(r["node"], r["type"]) for r in s.get("/debug/syncz") if r["acked_version"] and r["acked_version"] == r["sent_version"]}
             == {(n, t) for n in ("ambient-worker", "ambient-worker2") for t in ("CDS", "EDS", "LDS", "SDS", "RDS")},
             what="both Envoys ACK every type", timeout=60)
        yield s
    finally:
        for e in envoys:
            e.stop()
        s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, mesh: Serve, tmp_path: Path) -> Iterator[Any]:
    """A page that records console errors, uncaught exceptions and any request off this server."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.errors, pg.foreign = [], []  # type: ignore[attr-defined]
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("request", lambda r: None if r.url.startswith((mesh.debug, "data:")) else pg.foreign.append(r.url))
    yield pg
    ctx.close()
    assert pg.errors == [], pg.errors  # 0 console errors on every page
    assert pg.foreign == [], pg.foreign  # offline: nothing loaded from anywhere else


def shoot(pg: Any, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.png"
    pg.screenshot(path=str(out), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, ARTIFACTS / out.name)


def test_overview_lists_both_nodes_with_acked_versions(page: Any, mesh: Serve, tmp_path: Path) -> None:
    page.goto(mesh.debug + "/ui/")
    page.wait_for_selector("#live.on")
    syncz = mesh.get("/debug/syncz")
    for node in ("ambient-worker", "ambient-worker2"):
        card = page.locator(f"[data-node='{node}']")
        card.wait_for()
        assert card.get_attribute("data-state") == "ok"
        for row in (r for r in syncz if r["node"] == node):
            cell = card.locator(f"tr[data-type='{row['type']}'] td[data-acked]")
            assert cell.get_attribute("data-acked") == row["acked_version"] and cell.inner_text() == row["acked_version"]
    assert "All clear" in page.inner_text("#attention")
    shoot(page, tmp_path, "overview")


def test_injected_nack_turns_node_into_alert_without_reload(page: Any, mesh: Serve, tmp_path: Path) -> None:
    page.goto(mesh.debug + "/ui/")
    page.wait_for_selector("[data-node='ambient-worker2'][data-state='ok']")
    page.wait_for_selector("#live.on")
    page.evaluate("window.__noReload = true")
    t0 = time.monotonic()
    http_send(mesh.debug + "/debug/test/inject", "POST", {"node": "ambient-worker2", "type_url": CDS, "resource": BAD_CLUSTER})
    try:
        alert = page.locator("[data-node='ambient-worker2'].alert[role='alert']")
        alert.wait_for(timeout=15000)  # bound for a loaded machine; the measured latency is printed below
        latency = time.monotonic() - t0
        print(f"NACK -> alert in the page: {latency * 1000:.0f} ms")
        (ARTIFACTS / "nack-latency.txt").parent.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "nack-latency.txt").write_text(f"{latency:.3f}\n")
        assert page.evaluate("window.__noReload") is True  # updated live, not reloaded
        nack = next(n for n in mesh.get("/debug/nackz") if n["node"] == "ambient-worker2" and n["active"])
        assert nack["message"] and nack["message"][:40] in alert.inner_text()  # Envoy's own message
        assert "ambient-worker2" in page.inner_text("#attention")
        assert page.get_attribute("[data-node='ambient-worker']", "data-state") == "ok"
        shoot(page, tmp_path, "overview-nack")
    finally:
        http_send(mesh.debug + "/debug/test/inject", "DELETE")
    page.wait_for_selector("[data-node='ambient-worker2'][data-state='ok']", timeout=15000)  # recovers on the next ACK


def test_path_productpage_to_reviews_vip_matches_explain(page: Any, mesh: Serve, tmp_path: Path) -> None:
    page.goto(mesh.debug + "/ui/#/path")
    page.fill("#path-src", PRODUCTPAGE)
    page.fill("#path-dst", "default/reviews:9080")
    page.click("#path-go")
    page.wait_for_selector("#walk-branches .branch")
    cli = json.loads(subprocess.run([sys.executable, "-m", "xdsserver", "explain", "--manifests", str(BOOKINFO), "--node", "ambient-worker2",
                                     "--src", "10.244.2.3", "--dst", "10.96.183.192:9080", "--json"],
                                    check=True, capture_output=True, text=True).stdout)
    branches = page.locator("#walk-branches .branch")
    assert branches.count() == len(cli["endpoints"]) == 3
    drawn = []
    for i in range(branches.count()):
        b = branches.nth(i)
        t = b.locator(".box.tunnel")
        drawn.append({"endpoint": b.get_attribute("data-endpoint"), "tunnel": t.get_attribute("data-tunnel"),
                      "server": t.get_attribute("data-server-identity"), "client": t.get_attribute("data-client-identity"),
                      "inbound": b.locator(".box.inbound").get_attribute("data-node")})
        assert t.get_attribute("data-tunnel") in t.inner_text() and t.get_attribute("data-server-identity") in t.inner_text()
    inbound_node = {ib["final_destination"]: ib["node"] for ib in cli["inbound"]}
    assert drawn == [{"endpoint": e["endpoint_id"], "tunnel": e["tunnel_address"], "server": e["server_identity"],
                      "client": cli["client_identity"], "inbound": inbound_node[e["destination"]]} for e in cli["endpoints"]]
    stages = page.locator("#walk .box.stage[data-listener]")
    assert [stages.nth(i).get_attribute("data-listener") for i in range(stages.count())] == [s["listener"] for s in cli["stages"]]
    assert page.get_attribute("#walk", "data-verdict") == "tunnel"
    shoot(page, tmp_path, "path-reviews")
    page.locator("#walk").screenshot(path=str(ARTIFACTS / "path-walk.png"))  # the drawing alone (README)
    # passthrough is drawn as such: a destination outside the mesh
    page.fill("#path-dst", "192.0.2.10:443")
    page.click("#path-go")
    page.wait_for_selector("#walk[data-verdict='passthrough'] #walk-terminal.passthrough")


def test_node_page_shows_pods_matchers_resources_and_secret_expiry(page: Any, mesh: Serve, tmp_path: Path) -> None:
    page.goto(mesh.debug + "/ui/#/node/ambient-worker2")
    page.wait_for_selector("#matchers")
    assert page.locator(f"tr[data-pod='{PRODUCTPAGE}']").count() == 1
    listeners = page.locator("#matchers details[data-listener]")
    assert [listeners.nth(i).get_attribute("data-listener") for i in range(3)] == [
        "ztunnel_outbound", "ztunnel_outbound_dispatch", "ztunnel_outbound_pod"]
    page.click("#matchers details[data-listener='ztunnel_outbound_dispatch'] > summary")  # expandable
    assert page.locator("#matchers details[data-listener='ztunnel_outbound_dispatch'] [data-key='10.96.183.192']").is_visible()
    # an address with no exact key falls to the pod ranges: each /24 leads to its pod table, then stage 3
    page.click("#matchers details[data-listener='ztunnel_outbound_dispatch'] details[data-key='(no match)'] > summary")
    pods = page.locator("#matchers details[data-listener='ztunnel_outbound_dispatch'] [data-key='10.244.2.*']")
    assert pods.is_visible()
    assert re.search(r"pods_10\.244\.2\.0_24 \(pod table, \d+ rows\) ⇢ ztunnel_outbound_pod", pods.inner_text()), pods.inner_text()
    lds = mesh.get("/ui/api/node?node=ambient-worker2")["resources"]["LDS"]
    page.click("#resources details[data-type='LDS'] > summary")
    assert all(page.locator("#resources details[data-type='LDS']").get_by_text(r["name"], exact=True).count() == 1 for r in lds)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \(in ", page.inner_text("#secrets tr[data-secret='ROOTCA']"))
    page.wait_for_selector("#node-card [data-node='ambient-worker2']")
    shoot(page, tmp_path, "node")


def test_keys_never_appear_in_any_page_or_response(page: Any, mesh: Serve) -> None:
    keys = [p.read_text() for p in (mesh.workdir / "ca").rglob("*.pem") if "PRIVATE KEY" in p.read_text()]
    assert keys, "no private keys found in the CA dir to look for"
    blocks = [b for k in keys for b in re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\n(.*?)-----END", k, re.S)]
    needles = ["PRIVATE KEY"] + [line for b in blocks for line in b.splitlines() if len(line) >= 40]
    assert len(needles) > 1
    bodies = {}
    for path in ["/ui/", "/ui/app.js", "/ui/style.css", "/ui/index.html", "/ui/api/overview", "/ui/api/targets",
                 f"/ui/api/path?src={PRODUCTPAGE}&dst=default/reviews:9080", "/debug/syncz", "/debug/nackz", "/debug/registryz",
                 "/debug/connections", "/debug/pushz", "/debug/nodes", "/metrics"] + [
                     f"/{kind}?node={n}" for n in ("ambient-worker", "ambient-worker2") for kind in ("ui/api/node", "debug/config_dump")]:
        status, body = http_get(mesh.debug + path)
        assert status == 200, (path, status)
        bodies[path] = body
    for view in ("#/", "#/node/ambient-worker", "#/node/ambient-worker2", f"#/path?src={PRODUCTPAGE}&dst=default/reviews:9080"):
        page.goto(mesh.debug + "/ui/" + view)
        page.wait_for_selector("[data-node], #walk")
        bodies[view] = page.content()
    leaks = [(where, n[:20]) for where, body in bodies.items() for n in needles if n in body]
    assert leaks == [], leaks
    # the events stream too (first message)
    with __import__("urllib.request").request.urlopen(mesh.debug + "/ui/api/events", timeout=5) as r:
        first = r.readline().decode() + r.readline().decode()
    assert first.startswith("event: overview") and not any(n in first for n in needles)
