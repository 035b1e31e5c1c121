"""The composition root and debug HTTP: readiness gating, last-good on bad input, debounce,
debug endpoints, and ``xdsserver serve`` with no arguments serving the bundled example."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from xdsserver.app import ControlPlane, Debounce, ManifestSource, Runner
from xdsserver.pipeline import ephemeral_certs
from xdsserver.xds.server import start_server
from xdsserver.xds.types import CLUSTER, LISTENER

from harness import Envoy, Serve, http_get, poll
from xdsclient import SotwClient, StreamClosed

REPO = Path(__file__).resolve().parent.parent
BOOKINFO = REPO / "golden" / "bookinfo" / "manifests"


def control_plane(path: Path) -> ControlPlane:
    src = ManifestSource(path)
    return ControlPlane(load_objects=src.objects, certs=ephemeral_certs(), registry=CollectorRegistry())


async def test_streams_refused_until_first_good_load_then_served(tmp_path: Path) -> None:
    shutil.copytree(BOOKINFO, tmp_path / "m")
    bad = tmp_path / "m" / "zz-bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec: {ports: [{port: 0}]}\n")
    cp = control_plane(tmp_path / "m")
    assert cp.rebuild() is False and not cp.cache.ready
    assert "zz-bad.yaml" in cp.state.last_error and "spec.ports[0].port" in cp.state.last_error
    server = await start_server(cp.server, address="127.0.0.1:0")
    target = f"127.0.0.1:{server.xds_port}"
    try:
        async with SotwClient(target, "ambient-worker") as c:
            await c.request(LISTENER, [])
            closed = await c.wait_closed()
            assert closed.code == grpc.StatusCode.UNAVAILABLE
        bad.unlink()
        assert cp.rebuild() is True and cp.cache.ready
        async with SotwClient(target, "ambient-worker") as c:
            await c.request(CLUSTER, [])
            resp = await c.recv(CLUSTER)
            # stock: 4 service ports + 3 tunnel clusters x 2 local identities + ztunnel_outbound_dispatch
            # + 5 fixed + 2 pod tables (10.244.1.x, 10.244.2.x)
            assert len(resp.resources) == 4 + 3 * 2 + 1 + 5 + 2
    finally:
        await server.stop(0)


async def test_unknown_node_refused(tmp_path: Path) -> None:
    cp = control_plane(BOOKINFO)
    assert cp.rebuild()
    server = await start_server(cp.server, address="127.0.0.1:0")
    try:
        async with SotwClient(f"127.0.0.1:{server.xds_port}", "no-such-node") as c:
            await c.request(LISTENER, [])
            closed = await c.wait_closed()
            assert closed.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
            assert "no-such-node" in (closed.details or "")
    finally:
        await server.stop(0)


async def test_bad_edit_keeps_last_good_snapshot(tmp_path: Path) -> None:
    shutil.copytree(BOOKINFO, tmp_path / "m")
    cp = control_plane(tmp_path / "m")
    assert cp.rebuild()
    before = {n: cp.cache.get(n) for n in cp.cache.nodes()}
    (tmp_path / "m" / "dup.yaml").write_text(
        (tmp_path / "m" / "bookinfo.yaml").read_text().split("---")[-1].replace("reviews-v3", "reviews-v3-copy")
    )  # same pod IP as reviews-v3
    assert cp.rebuild() is False
    assert "10.244.2.22" in cp.state.last_error and "already used" in cp.state.last_error
    assert {n: cp.cache.get(n) for n in cp.cache.nodes()} == before


async def test_debounce_merges_bursts_and_respects_max_delay() -> None:
    class Counting:
        def __init__(self) -> None:
            self.rebuilds = 0
            self.metrics = type("M", (), {"debounce_time": type("H", (), {"observe": lambda self, v: None})()})()

        def rebuild(self) -> bool:
            self.rebuilds += 1
            return True

    cp = Counting()
    runner = Runner(cp, Debounce(quiet=0.2, max_delay=0.6))  # type: ignore[arg-type]
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(5):  # a burst inside the quiet period: one rebuild
            runner.notify()
            await asyncio.sleep(0.02)
        await asyncio.wait_for(_until(lambda: cp.rebuilds == 1), 2)
        await asyncio.sleep(0.3)
        assert cp.rebuilds == 1
        # a steady stream of changes never goes quiet: the max delay forces a rebuild
        loop = asyncio.get_running_loop()
        start = loop.time()
        while cp.rebuilds == 1 and loop.time() - start < 3:
            runner.notify()
            await asyncio.sleep(0.05)
        assert cp.rebuilds == 2
        assert loop.time() - start < 1.2
    finally:
        task.cancel()


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.01)


@pytest.mark.envoy
def test_serve_without_arguments_serves_bundled_example(tmp_path: Path) -> None:
    if not shutil.which("envoy"):
        pytest.skip("envoy not installed")
    s = Serve(tmp_path, None).start()  # no --manifests: the bundled bookinfo example
    e = Envoy(tmp_path, "ambient-worker2", s.xds_port)
    try:
        reg = s.get("/debug/registryz")
        assert {p["key"] for p in reg["pods"]} >= {"default/productpage-v1-7c548b785b-mhjm6", "default/reviews-v1-67f5987496-7z5ts"}
        poll(lambda: {r["type"] for r in s.get("/debug/syncz") if r["node"] == "ambient-worker2" and r["acked_version"]}
             == {"CDS", "EDS", "SDS", "LDS", "RDS"}, what="bundled example served to a real Envoy", timeout=30)
        status, metrics = http_get(s.debug + "/metrics")
        assert status == 200
        for name in ("pilot_xds{", "pilot_xds_pushes_total", "pilot_proxy_convergence_time", "pilot_total_xds_rejects_total",
                     "pilot_xds_config_size_bytes", "xdsserver_translate_seconds"):
            assert name in metrics, name
        dump = s.get("/debug/config_dump?node=ambient-worker2")
        types = [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]]
        assert types == ["ClustersConfigDump", "EndpointsConfigDump", "ListenersConfigDump", "RoutesConfigDump", "SecretsConfigDump"]
        assert all(item.get("version_info") for item in dump["configs"][3]["dynamic_route_configs"])
        assert all(item.get("version_info") for item in dump["configs"][0]["dynamic_active_clusters"])
        assert "PRIVATE KEY" not in str(dump)
        assert http_get(s.debug + "/debug/config_dump?node=nope")[0] == 404
        ex = s.get("/debug/explain?node=ambient-worker2&src=10.244.2.3&dst=10.96.183.192:9080")
        assert ex["verdict"] == "tunnel" and len(ex["endpoints"]) == 3
        assert http_get(s.debug + "/healthz")[0] == 200
    finally:
        e.stop()
        s.stop()
