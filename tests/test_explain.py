"""``explain`` walks the generated config and reproduces the seeds' narratives (issue 2 acceptance)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdsserver.explain import Explanation, explain
from xdsserver.model import Flavor, Identity
from xdsserver.translate import names
from xdsserver.pipeline import CaCerts, Cluster, build_cluster, ephemeral_certs

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
FLAVORS = list(Flavor)
SA = "spiffe://cluster.local/ns/{}/sa/{}".format
PRODUCTPAGE, REVIEWS = SA("default", "bookinfo-productpage"), SA("default", "bookinfo-reviews")
CLIENT, SERVER = SA("ambient", "client"), SA("ambient", "server")
REVIEWS_CHAIN = f"{PRODUCTPAGE}_to_http_reviews.default.svc.cluster.local_outbound_internal"  # istio-2022
ID = {s: Identity("cluster.local", ns, sa) for s, (ns, sa) in {PRODUCTPAGE: ("default", "bookinfo-productpage"),
      REVIEWS: ("default", "bookinfo-reviews"), CLIENT: ("ambient", "client"), SERVER: ("ambient", "server")}.items()}
DISPATCH = names.OUTBOUND_DISPATCH
POD = names.OUTBOUND_POD


def stage1_hop(src: str) -> str:
    """Stock flavor: the hop from the source identity's chain on ztunnel_outbound to stage 2."""
    return f"ztunnel_outbound chain {names.source_chain(ID[src])} -> cluster {DISPATCH} -> internal listener {DISPATCH}"


def stage2_pod_hop(dst: str, ip: str) -> str:
    """Stock flavor: the hop from stage 2's chain for the destination's /24 through its pod
    table (the row for the IP names the identity) to stage 3."""
    table = names.pod_table(ip[: ip.rfind(".") + 1])
    return f"{DISPATCH} chain {table} -> cluster {table} (pod table, row {ip}, identity {dst}) -> internal listener {POD}"


@cache
def certs() -> CaCerts:
    return ephemeral_certs()


@cache
def scenario(name: str, flavor: Flavor = Flavor.ENVOY) -> Cluster:
    return build_cluster(GOLDEN / name / "manifests", flavor, certs())


def run(name: str, node: str, src: str, dst: str, flavor: Flavor = Flavor.ENVOY) -> Explanation:
    return explain(scenario(name, flavor).nodes, node, src, dst)


# ---- seed 001: productpage -> reviews VIP ----------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_productpage_to_reviews_vip(flavor: Flavor) -> None:
    ex = run("bookinfo", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080", flavor)
    assert ex.verdict == "tunnel", ex.text()
    stock = flavor is Flavor.ENVOY
    stage2 = f"{DISPATCH}: " if stock else ""
    assert ex.matched == ["port 9080 not listed -> on_no_match", "source-ip 10.244.2.3 matched",
                          f"{stage2}ip 10.96.183.192 matched", f"{stage2}port 9080 matched"]
    assert ex.hops == ([stage1_hop(PRODUCTPAGE)] if stock else [])
    service_cluster = names.service_port_cluster("http", "reviews.default.svc.cluster.local") if stock else REVIEWS_CHAIN
    assert ex.chain == ex.cluster == service_cluster
    assert ex.client_identity == PRODUCTPAGE
    # the three reviews pods: 15008 to the other node; on the same node istio-2022 addresses 15088,
    # stock 15008 like everywhere (one CLA for every node; the pod-CIDR REDIRECT loops it locally)
    local = "15008" if stock else "15088"
    assert sorted((e.tunnel_address, e.destination, e.endpoint_id) for e in ex.endpoints) == [
        ("10.244.1.23:15008", "10.244.1.23:9080", "10.244.1.23:9080"),
        (f"10.244.2.22:{local}", "10.244.2.22:9080", "10.244.2.22:9080"),
        (f"10.244.2.23:{local}", "10.244.2.23:9080", "10.244.2.23:9080"),
    ]
    assert {e.server_identity for e in ex.endpoints} == {REVIEWS}
    tunnel_listener = names.OUTBOUND_TUNNEL_LIS if stock else f"outbound_tunnel_lis_{PRODUCTPAGE}"
    assert {e.internal_listener for e in ex.endpoints} == {tunnel_listener}
    assert not any(e.plain for e in ex.endpoints)
    assert ex.tunnel_listener == tunnel_listener
    assert ex.tunnel_cluster == f"outbound_tunnel_clus_{PRODUCTPAGE}"  # stock: resolved from the source identity
    # the destination side, on each pod's own node
    assert sorted((ib.node, ib.chain, ib.final_destination) for ib in ex.inbound) == [
        ("ambient-worker", "inbound_10.244.1.23", "10.244.1.23:9080"),
        ("ambient-worker2", "inbound_10.244.2.22", "10.244.2.22:9080"),
        ("ambient-worker2", "inbound_10.244.2.23", "10.244.2.23:9080"),
    ]
    for ib in ex.inbound:
        assert (ib.listener, ib.server_identity, ib.cluster) == ("ztunnel_inbound", REVIEWS, "virtual_inbound")
        assert ib.client_cert_required is True and ib.trusted_peer_prefix == "spiffe://cluster.local/"
        assert re.fullmatch(ib.destination_guard, ib.final_destination)
    text = ex.text()
    for needle in ("10.244.1.23:15008", f"10.244.2.22:{local}", f"10.244.2.23:{local}", f"client identity (client cert): {PRODUCTPAGE}",
                   f"expected server {REVIEWS}", "verdict: tunnel", *(f"via: {h}" for h in ex.hops)):
        assert needle in text


# ---- seed 003: client -> server pod IP -----------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_client_to_server_pod_ip(flavor: Flavor) -> None:
    ex = run("client-server", "ambient-worker", "10.244.1.4", "10.244.2.5:8080", flavor)
    assert ex.verdict == "tunnel", ex.text()
    if flavor is Flavor.ENVOY:  # stage 2's chain per destination identity, then stage 3's other-node chain; the cluster is resolved per source
        assert ex.hops == [stage1_hop(CLIENT), stage2_pod_hop(SERVER, "10.244.2.5")]
        assert ex.matched[-3:] == [f"{DISPATCH}: ip 10.244.2.5 not listed -> on_no_match", f"{DISPATCH}: ip 10.244.2.5 matched prefix '10.244.2.'",
                                   f"{POD}: ip 10.244.2.5 not listed -> on_no_match"]
        assert ex.chain == names.POD_TUNNEL_CHAIN
        assert "same node" not in ex.reason
    else:
        assert ex.hops == []
        assert ex.chain == f"fc-outbound_pod_tunnel_clus_{CLIENT}_to_{SERVER}"
    assert ex.cluster == ex.tunnel_cluster == f"outbound_pod_tunnel_clus_{CLIENT}"
    assert ex.client_identity == CLIENT and ex.expected_server_identity == SERVER
    [ep] = ex.endpoints
    assert (ep.tunnel_address, ep.destination, ep.server_identity) == ("10.244.2.5:15008", "10.244.2.5:8080", SERVER)
    [ib] = ex.inbound
    assert (ib.node, ib.listener, ib.chain, ib.server_identity) == ("ambient-worker2", "ztunnel_inbound", "inbound_10.244.2.5", SERVER)
    assert (ib.cluster, ib.final_destination, ib.client_cert_required) == ("virtual_inbound", "10.244.2.5:8080", True)
    assert "10.244.2.5:15008" in ex.text()


def test_client_to_server_vip() -> None:
    ex = run("client-server", "ambient-worker", "10.244.1.4", "10.96.0.105:9080")
    assert ex.verdict == "tunnel" and ex.client_identity == CLIENT
    assert [(e.tunnel_address, e.destination, e.server_identity) for e in ex.endpoints] == [("10.244.2.5:15008", "10.244.2.5:8080", SERVER)]
    assert [ib.chain for ib in ex.inbound] == ["inbound_10.244.2.5"]


def test_same_node_pod_ip_uses_15088() -> None:
    ex = run("bookinfo", "ambient-worker2", "10.244.2.3", "10.244.2.22:9080")
    assert ex.verdict == "tunnel"
    assert ex.hops == [stage1_hop(PRODUCTPAGE), stage2_pod_hop(REVIEWS, "10.244.2.22")]
    # stage 2 is the same on every node (the /24's prefix); stage 3 keys this node's own pod IPs
    assert ex.matched[-2:] == [f"{DISPATCH}: ip 10.244.2.22 matched prefix '10.244.2.'", f"{POD}: ip 10.244.2.22 matched"]
    assert ex.chain == names.POD_LOCAL_TUNNEL_CHAIN
    assert ex.cluster == ex.tunnel_cluster == names.outbound_pod_local_tunnel_clus(ID[PRODUCTPAGE])
    assert ex.client_identity == PRODUCTPAGE and ex.expected_server_identity == REVIEWS
    assert [e.tunnel_address for e in ex.endpoints] == ["10.244.2.22:15088"]
    assert "same node" in ex.reason
    assert [(ib.node, ib.chain) for ib in ex.inbound] == [("ambient-worker2", "inbound_10.244.2.22")]


# ---- passthrough, blackhole, rejection ---------------------------------------------------------------


def test_destination_outside_the_mesh_passes_through() -> None:
    ex = run("bookinfo", "ambient-worker2", "10.244.2.3", "1.1.1.1:443")
    assert ex.verdict == "passthrough"
    assert ex.chain == "PassthroughFilterChain" and ex.cluster == "PassthroughCluster"
    # a known source: decided by stage 2's default chain (ALLOW_ANY)
    assert ex.hops == [stage1_hop(PRODUCTPAGE)]
    assert ex.matched[-2:] == [f"{DISPATCH}: ip 1.1.1.1 not listed, no on_no_match", f"{DISPATCH}: -> default_filter_chain"]
    assert not ex.endpoints and not ex.inbound


def test_non_mesh_pod_destination_passes_through() -> None:
    # legacy-server (default namespace, not enrolled) is in a mesh pod range but has no row in its
    # pod table: the default subset, then plain to the original destination
    ex = run("client-server", "ambient-worker", "10.244.1.4", "10.244.2.2:8080")
    assert ex.verdict == "passthrough" and ex.cluster == "PassthroughCluster"
    table = names.pod_table("10.244.2.")
    assert ex.hops[-1] == f"{DISPATCH} chain {table} -> cluster {table} (pod table, no row: default subset) -> internal listener {names.OUTBOUND_PASSTHROUGH}"


def test_non_enrolled_source_passes_through() -> None:
    ex = run("client-server", "ambient-worker", "10.244.1.5", "10.96.0.105:9080")  # legacy pod, default ns
    assert ex.verdict == "passthrough"
    assert ex.matched == ["port 9080 not listed -> on_no_match", "source-ip 10.244.1.5 not listed -> on_no_match"]
    assert ex.chain == "PassthroughFilterChain" and not ex.client_identity
    assert ex.hops == []  # an unknown source never reaches stage 2


def test_capture_port_is_blackholed() -> None:
    ex = run("bookinfo", "ambient-worker2", "10.244.2.3", "10.96.183.192:15001")
    assert ex.verdict == "blackhole"
    assert ex.matched == ["port 15001 matched"]
    assert ex.chain == "blackhole outbound" and ex.cluster == "BlackHoleCluster"
    assert ex.hops == []


def _write(tmp_path: Path, docs: list[dict[str, Any]]) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "o.yaml").write_text(yaml.safe_dump_all(docs))
    return tmp_path / "m"


def _pod(name: str, ip: str, node: str, **labels: str) -> dict[str, Any]:
    ready = labels.pop("ready", "True")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name, **labels}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}


def _svc(name: str, vip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": vip, "selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


NS = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}


def test_registry_only_rejects_unknown_destination(tmp_path: Path) -> None:
    mesh = {"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "m"}, "spec": {"outboundTrafficPolicy": "REGISTRY_ONLY"}}
    c = build_cluster(_write(tmp_path, [NS, mesh, _pod("client", "10.0.1.1", "n1"), _pod("web", "10.0.2.1", "n2"), _svc("web", "10.96.0.1")]),
                      Flavor.ENVOY, certs())
    ex = explain(c.nodes, "n1", "10.0.1.1", "1.1.1.1:443")
    assert ex.verdict == "rejected" and "no default chain" in ex.reason
    assert ex.reason.startswith(f"{DISPATCH}: ")  # the known source got through stage 1; stage 2 refused
    assert explain(c.nodes, "n1", "10.0.1.1", "10.96.0.1:80").verdict == "tunnel"
    assert explain(c.nodes, "n1", "10.0.1.9", "1.1.1.1:443").verdict == "passthrough"  # unknown source


def test_plain_backend_and_no_ready_endpoints(tmp_path: Path) -> None:
    docs = [NS, _pod("client", "10.0.1.1", "n1"),
            _pod("plain", "10.0.2.1", "n2", **{"istio.io/dataplane-mode": "none"}), _svc("plain", "10.96.0.1"),
            _pod("down", "10.0.2.2", "n2", ready="False"), _svc("down", "10.96.0.2")]
    c = build_cluster(_write(tmp_path, docs), Flavor.ENVOY, certs())
    ex = explain(c.nodes, "n1", "10.0.1.1", "10.96.0.1:80")
    assert ex.verdict == "direct" and [(e.endpoint_id, e.plain) for e in ex.endpoints] == [("10.0.2.1:8080", True)]
    assert not ex.inbound
    ex = explain(c.nodes, "n1", "10.0.1.1", "10.96.0.2:80")
    assert ex.verdict == "rejected" and "no ready endpoints" in ex.reason


def test_ipv6_connection(tmp_path: Path) -> None:
    docs = [NS, _pod("client", "fd00:10:244:1::4", "n1"), _pod("web", "FD00:10:244:2:0::5", "n2"), _svc("web", "fd00:10:96::1")]
    c = build_cluster(_write(tmp_path, docs), Flavor.ENVOY, certs())
    ex = explain(c.nodes, "n1", "fd00:10:244:1:0::4", "[fd00:10:96:0::1]:80")
    assert ex.verdict == "tunnel" and ex.dst == "[fd00:10:96::1]:80"
    assert [(e.tunnel_address, e.destination) for e in ex.endpoints] == [("[fd00:10:244:2::5]:15008", "[fd00:10:244:2::5]:8080")]
    [ib] = ex.inbound
    assert ib.node == "n2" and ib.chain == "inbound_fd00:10:244:2::5" and re.fullmatch(ib.destination_guard, ib.final_destination)


# ---- the CLI ------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsserver", "explain", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_matches_library() -> None:
    args = ["--manifests", str(GOLDEN / "bookinfo" / "manifests"), "--node", "ambient-worker2",
            "--src", "10.244.2.3", "--dst", "10.96.183.192:9080"]
    r = _cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == run("bookinfo", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080").to_dict()
    assert got["client_identity"] == PRODUCTPAGE
    assert sorted(e["tunnel_address"] for e in got["endpoints"]) == ["10.244.1.23:15008", "10.244.2.22:15008", "10.244.2.23:15008"]
    text = _cli(*args)
    assert text.returncode == 0 and text.stdout.strip() == run("bookinfo", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080").text()


def test_cli_unknown_node_is_an_error() -> None:
    r = _cli("--manifests", str(GOLDEN / "bookinfo" / "manifests"), "--node", "nope", "--src", "10.244.2.3", "--dst", "10.96.183.192:9080")
    assert r.returncode == 2 and "unknown node 'nope'" in r.stderr and "ambient-worker2" in r.stderr


@pytest.mark.parametrize("src,dst", [("foo", "10.96.183.192:9080"), ("10.244.2.3", "10.96.183.192")], ids=["bad-src", "dst-without-port"])
def test_cli_malformed_address_is_a_usage_error(src: str, dst: str) -> None:
    r = _cli("--manifests", str(GOLDEN / "bookinfo" / "manifests"), "--node", "ambient-worker2", "--src", src, "--dst", dst)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("flavor", FLAVORS)
def test_policy_verdict_read_from_the_served_rbac(flavor: Flavor) -> None:
    """The destination verdict comes from the generated RBAC: stock flavor from the pod's
    RouteConfiguration (RBACPerRoute over RDS), istio-2022 from the inline filters; same answer."""
    allowed = run("policy", "ambient-worker", "10.244.1.4", "10.244.2.5:8080", flavor).inbound[0].policy
    assert allowed.allowed and allowed.decided_by == "ns[ambient]-policy[allow-client]-rule[0]", allowed
    denied = run("policy", "ambient-worker", "10.244.1.4", "10.244.2.5:9090", flavor).inbound[0].policy
    assert not denied.allowed and denied.decided_by == "no ALLOW rule matches", denied
    assert denied.dry_run == ["ns[ambient]-policy[dry-run-deny-admin]-rule[0]: would deny"], denied
