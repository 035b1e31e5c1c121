"""Translator invariants (ztunnel-config.md §12, D1-D10) on every golden scenario and on small
in-test scenarios (IPv6, UDP ports, REGISTRY_ONLY, a node without workloads).

Expectations are derived independently of the translator: node locality and enrollment are
recomputed from the raw manifests, and every check walks the emitted protos.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from google.protobuf import any_pb2, json_format, symbol_database, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from xds.type.matcher.v3 import matcher_pb2

from xdsserver import translate as translate_pkg
from xdsserver.dump import dump_json, render
from xdsserver.model import Flavor, Identity
from xdsserver.model.index import MeshIndex
from xdsserver.pipeline import CaCerts, build_cluster, ephemeral_certs
from xdsserver.sources.manifests import load_model, read_objects
from xdsserver.sources.objects import build_model
from xdsserver.translate import NodeResources, TranslationError, names, refcheck, translate

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden"
SCENARIOS = sorted(p.parent.name for p in GOLDEN.glob("*/manifests"))
FLAVORS = list(Flavor)
TD = "cluster.local"
SPIFFE_RE = re.compile(r"spiffe://[a-z0-9.-]+/ns/[a-z0-9-]+/sa/[a-z0-9.-]+")  # '_' ends an id inside a name
TLS13 = common_pb2.TlsParameters.TLSv1_3
_db = symbol_database.Default()

# ---- shared fixtures and proto helpers ---------------------------------------------------------


@cache
def certs() -> CaCerts:
    """One real CA for the module (issuing is cached per identity, so outputs are comparable)."""
    return ephemeral_certs(TD)


@cache
def golden_cluster(scenario: str, flavor: Flavor) -> Any:
    return build_cluster(GOLDEN / scenario / "manifests", flavor, certs())


def golden_nodes() -> list[tuple[str, str]]:
    return [(sc, node) for sc in SCENARIOS for node in sorted(golden_cluster(sc, Flavor.ENVOY).nodes)]


GOLDEN_NODES = golden_nodes()
GOLDEN_IDS = [f"{sc}/{node}" for sc, node in GOLDEN_NODES]


def all_golden() -> Iterator[tuple[str, str, Flavor, NodeResources]]:
    for flavor in FLAVORS:
        for sc, node in GOLDEN_NODES:
            yield sc, node, flavor, golden_cluster(sc, flavor).nodes[node]


def unpack(a: any_pb2.Any) -> Message:
    msg = _db.GetSymbol(a.TypeName())()
    a.Unpack(msg)
    return msg


def walk(msgs: Any) -> Iterator[Message]:
    for m in msgs:
        yield from refcheck.walk(m)


def listener(res: NodeResources, name: str) -> listener_pb2.Listener:
    return next(lis for lis in res.listeners if lis.name == name)


def cluster(res: NodeResources, name: str) -> cluster_pb2.Cluster:
    return next(c for c in res.clusters if c.name == name)


def filters(chain: listener_components_pb2.FilterChain) -> list[Message]:
    return [unpack(f.typed_config) for f in chain.filters]


def filter_state(chain: listener_components_pb2.FilterChain) -> dict[str, str]:
    out = {}
    for f in filters(chain):
        if isinstance(f, set_filter_state_pb2.Config):
            out.update({v.object_key: v.format_string.text_format_source.inline_string for v in f.on_new_connection})
    return out


def filter_state_sharing(chain: listener_components_pb2.FilterChain) -> dict[str, str]:
    """object key -> shared_with_upstream (NONE | ONCE | TRANSITIVE) of the chain's set_filter_state."""
    share = value_pb2.FilterStateValue.SharedWithUpstream
    out = {}
    for f in filters(chain):
        if isinstance(f, set_filter_state_pb2.Config):
            out.update({v.object_key: share.Name(v.shared_with_upstream) for v in f.on_new_connection})
    return out


def cel_chain_filter(expression: str):
    """The stage-2 log filter as a predicate on a chain's name. Only the one shape translation
    emits is understood (a test failure, not a guess, if it changes)."""
    m = re.fullmatch(r"xds\.filter_chain_name\.startsWith\('([^']*)'\) && xds\.filter_chain_name\.endsWith\('([^']*)'\)", expression)
    assert m, expression
    return lambda name: name.startswith(m.group(1)) and name.endswith(m.group(2))


def tcp_proxy(chain: listener_components_pb2.FilterChain) -> tcp_proxy_pb2.TcpProxy:
    return next(f for f in filters(chain) if isinstance(f, tcp_proxy_pb2.TcpProxy))


def lb_endpoints(res: NodeResources) -> Iterator[tuple[str, Any]]:
    """Service endpoints (the pod tables' rows: :func:`pod_table_rows`)."""
    for cla in res.endpoints:
        if cla.cluster_name.startswith(names.POD_TABLE_PREFIX):
            continue
        for group in cla.endpoints:
            for lbe in group.lb_endpoints:
                yield cla.cluster_name, lbe


def tunnel_md(lbe: Any) -> dict[str, Any]:
    return json_format.MessageToDict(lbe.metadata.filter_metadata["tunnel"])


def action_name(on_match: matcher_pb2.Matcher.OnMatch) -> str:
    v = wrappers_pb2.StringValue()
    on_match.action.typed_config.Unpack(v)
    return v.value


def _destinations(m: matcher_pb2.Matcher) -> dict[str, Any]:
    """destination IP -> chain name | {port: chain name} of a destination-IP matcher."""
    dsts: dict[str, Any] = {}
    for dst, dom in m.matcher_tree.exact_match_map.map.items():
        if dom.HasField("matcher"):
            dsts[dst] = {p: action_name(pm) for p, pm in dom.matcher.matcher_tree.exact_match_map.map.items()}
        else:
            dsts[dst] = action_name(dom)
    return dsts


def _source_matches(res: NodeResources) -> dict[str, matcher_pb2.Matcher.OnMatch]:
    root = listener(res, "ztunnel_outbound").filter_chain_matcher
    src_m = root.on_no_match
    if not src_m.HasField("matcher"):
        return {}
    return dict(src_m.matcher.matcher_tree.exact_match_map.map.items())


def source_chains(res: NodeResources) -> dict[str, str]:
    """Stock flavor, stage 1: source IP -> the chain it goes to (a direct action, no sub-matcher)."""
    out = {}
    for src, om in _source_matches(res).items():
        assert om.HasField("action") and not om.HasField("matcher"), src
        out[src] = action_name(om)
    return out


def pod_table_rows(res: NodeResources) -> dict[str, tuple[str, str, str]]:
    """Stock flavor: pod IP -> (its pod table, the internal listener its endpoint leads to, the
    SPIFFE ID the endpoint's tunnel metadata pins), over every pod-table CLA."""
    out = {}
    for cla in res.endpoints:
        if not cla.cluster_name.startswith(names.POD_TABLE_PREFIX):
            continue
        for group in cla.endpoints:
            for lbe in group.lb_endpoints:
                lb = json_format.MessageToDict(lbe.metadata.filter_metadata[names.LB_METADATA])
                if "ip" in lb:
                    addr = lbe.endpoint.address.envoy_internal_address
                    assert addr.endpoint_id == lb["ip"], lb
                    out[lb["ip"]] = (cla.cluster_name, addr.server_listener_name, tunnel_md(lbe)["identity"])
    return out


def pod_row(spiffe: str) -> str:
    """What :func:`dispatch_map` shows for a pod IP: the pod-table row it resolves to."""
    return f"pod-table row {spiffe}"


def stage2_chain(res: NodeResources, ip: str) -> str | None:
    """Stage 2's chain for ``ip`` as Envoy matches it: an exact key (a direct action), else the
    longest /24 string prefix of on_no_match, else None (the default chain)."""
    m = listener(res, names.OUTBOUND_DISPATCH).filter_chain_matcher
    exact = m.matcher_tree.exact_match_map.map
    if ip in exact:
        return action_name(exact[ip]) if exact[ip].HasField("action") else None
    ranges = m.on_no_match.matcher if m.on_no_match.HasField("matcher") else (m if m.matcher_tree.HasField("prefix_match_map") else None)
    if ranges is None:
        return None
    hits = [k for k in ranges.matcher_tree.prefix_match_map.map if ip.startswith(k)]
    return action_name(ranges.matcher_tree.prefix_match_map.map[max(hits, key=len)]) if hits else None


def dispatch_map(res: NodeResources) -> dict[str, Any]:
    """Stock flavor, stage 2 (``ztunnel_outbound_dispatch``): destination IP -> chain | {port:
    chain} of its exact keys, and every pod-table row's IP -> :func:`pod_row` of its identity,
    after checking that stage 2 sends that IP to the row's table."""
    lis = next((x for x in res.listeners if x.name == names.OUTBOUND_DISPATCH), None)
    if lis is None or not lis.HasField("filter_chain_matcher"):
        return {}
    keys = _destinations(lis.filter_chain_matcher)
    for ip, (table, _, spiffe) in pod_table_rows(res).items():
        assert stage2_chain(res, ip) == table, (ip, table)
        keys[ip] = pod_row(spiffe)
    return keys


def pod_stage_keys(res: NodeResources) -> dict[str, str]:
    """Stock flavor, stage 3 (``ztunnel_outbound_pod``): destination IP -> chain of its exact keys."""
    lis = next((x for x in res.listeners if x.name == names.OUTBOUND_POD), None)
    if lis is None or not lis.HasField("filter_chain_matcher"):
        return {}
    keys = _destinations(lis.filter_chain_matcher)
    assert all(isinstance(v, str) for v in keys.values()), keys  # no port level: the port is the stage-2 chain's business
    return keys


def pod_stage_chain(res: NodeResources, dst_ip: str) -> listener_components_pb2.FilterChain:
    """Stock flavor, stage 3: the chain a pod-IP connection to ``dst_ip`` takes, read the way Envoy
    matches it (an exact key, else on_no_match, else the default chain)."""
    lis = listener(res, names.OUTBOUND_POD)
    if not lis.HasField("filter_chain_matcher"):
        assert lis.HasField("default_filter_chain")
        return lis.default_filter_chain
    m = lis.filter_chain_matcher
    keys = m.matcher_tree.exact_match_map.map
    if dst_ip in keys:
        name = action_name(keys[dst_ip])
    else:
        assert m.HasField("on_no_match") and m.on_no_match.HasField("action"), "stage 3 must catch every other pod IP"
        name = action_name(m.on_no_match)
    [chain] = [ch for ch in lis.filter_chains if ch.name == name]
    return chain


def check_pod_stage(res: NodeResources, local_ips: set[str]) -> None:
    """Stock flavor, stage 3: two chains; exactly this node's pod IPs are keyed, to the same-node
    chain; every other (pod) IP falls to on_no_match, the other-node chain."""
    lis = listener(res, names.OUTBOUND_POD)
    assert lis.HasField("internal_listener") and not lis.HasField("default_filter_chain")
    assert sorted(ch.name for ch in lis.filter_chains) == sorted([names.POD_TUNNEL_CHAIN, names.POD_LOCAL_TUNNEL_CHAIN])
    assert pod_stage_keys(res) == {ip: names.POD_LOCAL_TUNNEL_CHAIN for ip in local_ips}
    m = lis.filter_chain_matcher
    assert m.on_no_match.HasField("action") and action_name(m.on_no_match) == names.POD_TUNNEL_CHAIN


def pod_route(res: NodeResources, target: str, dst_ip: str) -> listener_components_pb2.FilterChain:
    """The chain that finally carries a pod-IP connection whose capture matcher picked ``target``:
    istio-2022, that chain itself; stock, stage 2's chain hands it to stage 3 (``ztunnel_outbound_pod``)."""
    if res.flavor is not Flavor.ENVOY:
        return outbound_chain(res, target)
    table, stage3, spiffe = pod_table_rows(res)[dst_ip]
    assert target == pod_row(spiffe), target
    assert tcp_proxy(outbound_chain(res, table)).cluster == table and stage3 == names.OUTBOUND_POD, (table, stage3)
    return pod_stage_chain(res, dst_ip)


def matcher_sources(res: NodeResources) -> dict[str, dict[str, Any]]:
    """source IP -> destination key -> chain name | {port: chain name}, read back from the proto:
    istio-2022 nests destinations under each source; the stock flavor's stage 1 sends every known
    source to its chain and stage 2 (shared) maps destinations, so each source sees that map."""
    if res.flavor is Flavor.ENVOY:
        stage2 = dispatch_map(res)
        return {src: stage2 for src in source_chains(res)}
    return {src: _destinations(om.matcher) for src, om in _source_matches(res).items()}


def outbound_chain(res: NodeResources, name: str) -> listener_components_pb2.FilterChain:
    """A capture-path chain by name: on ``ztunnel_outbound`` or (stock) its stages 2 and 3."""
    for lis in res.listeners:
        if lis.name in ("ztunnel_outbound", names.OUTBOUND_DISPATCH, names.OUTBOUND_POD):
            for ch in lis.filter_chains:
                if ch.name == name:
                    return ch
    raise AssertionError(f"no outbound chain {name!r}")


SOURCE_STATE_FORMAT = f"%FILTER_STATE({names.SOURCE_IDENTITY_STATE}:PLAIN)%"


def resolve_for(fmt: str, src_identity: str) -> str:
    """A run-time ``envoy.tcp_proxy.cluster`` format as Envoy resolves it for one source identity."""
    name = fmt.replace(SOURCE_STATE_FORMAT, src_identity)
    assert "%" not in name, fmt
    return name


def chosen_cluster(res: NodeResources, src_ip: str, chain: listener_components_pb2.FilterChain) -> str:
    """The cluster a connection from ``src_ip`` reaching ``chain`` is proxied to: the tcp_proxy's,
    or (stock) the ``envoy.tcp_proxy.cluster`` filter state resolved with the source identity
    that ``src_ip``'s stage-1 chain set."""
    fmt = filter_state(chain).get(names.TCP_PROXY_CLUSTER_STATE)
    if fmt is None:
        return tcp_proxy(chain).cluster
    stage1 = outbound_chain(res, source_chains(res)[src_ip])
    return resolve_for(fmt, filter_state(stage1)[names.SOURCE_IDENTITY_STATE])


def ident(spiffe: str) -> Identity:
    td, ns_kw, ns, sa_kw, sa = spiffe.removeprefix("spiffe://").split("/")
    assert (ns_kw, sa_kw) == ("ns", "sa"), spiffe
    return Identity(td, ns, sa)


def ids_in(name: str) -> list[str]:
    return SPIFFE_RE.findall(name)


def source_of(name: str) -> str:
    """The first SPIFFE ID in a per-identity resource name (the source identity)."""
    found = ids_in(name)
    assert found, f"no identity in {name!r}"
    return found[0]


def tls_contexts(res: NodeResources) -> Iterator[tuple[str, Message]]:
    for lis in res.listeners:
        for m in refcheck.walk(lis):
            if isinstance(m, (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext)):
                yield lis.name, m
    for c in res.clusters:
        for m in refcheck.walk(c):
            if isinstance(m, (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext)):
                yield c.name, m


# ---- independent expectations from the raw manifests -------------------------------------------


@dataclasses.dataclass
class Expect:
    local_ids: dict[str, set[str]]  # node -> SPIFFE IDs of enrolled pods there
    local_ips: dict[str, set[str]]  # node -> IPs of enrolled pods there
    ip_identity: dict[str, str]  # IP of every enrolled pod -> its SPIFFE ID
    ip_node: dict[str, str]
    tcp_vip_ports: int  # TCP ports of services with a cluster IP (a service cluster each: stock shared, istio-2022 per local id)
    service_ports: set[tuple[str, str]]  # (port name, hostname) of those TCP ports
    tcp_vips: set[str]  # cluster IPs of services with at least one TCP port

    def local_pods(self, node: str) -> dict[str, str]:
        """IP -> SPIFFE ID of the enrolled pods on ``node``."""
        return {ip: self.ip_identity[ip] for ip in self.local_ips.get(node, ())}


@cache
def expect(scenario: str) -> Expect:
    docs = []
    for f in sorted((GOLDEN / scenario / "manifests").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    ambient_ns = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Namespace" and (d["metadata"].get("labels") or {}).get("istio.io/dataplane-mode") == "ambient"
    } - {"istio-system", "kube-system"}
    e = Expect({}, {}, {}, {}, 0, set(), set())
    for d in docs:
        if d["kind"] == "Pod":
            meta, spec, status = d["metadata"], d["spec"], d.get("status") or {}
            mode = (meta.get("labels") or {}).get("istio.io/dataplane-mode")
            enrolled = (meta["namespace"] in ambient_ns or mode == "ambient") and mode != "none"
            if not enrolled or spec.get("hostNetwork") or not status.get("podIP") or status.get("phase") != "Running":
                continue
            ident = f"spiffe://{TD}/ns/{meta['namespace']}/sa/{spec.get('serviceAccountName') or 'default'}"
            node = spec["nodeName"]
            e.local_ids.setdefault(node, set()).add(ident)
            e.local_ips.setdefault(node, set()).add(status["podIP"])
            e.ip_identity[status["podIP"]] = ident
            e.ip_node[status["podIP"]] = node
        elif d["kind"] == "Service" and d["spec"].get("clusterIP") not in (None, "", "None"):
            tcp = [p for p in d["spec"]["ports"] if p.get("protocol", "TCP") == "TCP"]
            e.tcp_vip_ports += len(tcp)
            host = f"{d['metadata']['name']}.{d['metadata'].get('namespace', 'default')}.svc.cluster.local"
            e.service_ports |= {(p["name"], host) for p in tcp}
            if tcp:
                e.tcp_vips |= set(d["spec"].get("clusterIPs") or [d["spec"]["clusterIP"]])
    return e


def test_golden_scenarios_are_present() -> None:
    assert {"bookinfo", "sleep-httpbin", "client-server"} <= set(SCENARIOS)
    assert ("bookinfo", "ambient-worker") in GOLDEN_NODES and ("bookinfo", "ambient-worker2") in GOLDEN_NODES


# ---- D1: node-local scoping ----------------------------------------------------------------------

PER_ID_CLUSTERS = ("outbound_tunnel_clus_", "outbound_pod_tunnel_clus_", "outbound_pod_local_tunnel_clus_")
FIXED_CLUSTERS = {"virtual_inbound", "virtual_inbound_hbone", "PassthroughCluster", "PassthroughCluster-tcp", "BlackHoleCluster"}
CATCH_ALL_CHAINS = {"PassthroughFilterChain", "blackhole outbound"}


def check_node_local(res: NodeResources, local_pods: dict[str, str], service_ports: set[tuple[str, str]]) -> None:
    """Everything per identity on this node belongs to an identity with a pod on this node.

    ``local_pods``: IP -> SPIFFE ID of the enrolled pods on the node; ``service_ports``: (port
    name, hostname) of every TCP port of a service with a cluster IP."""
    local_ids, local_ips = set(local_pods.values()), set(local_pods)
    stock = res.flavor is Flavor.ENVOY
    internal = {lis.name for lis in res.listeners if lis.HasField("internal_listener")}
    if stock:
        # stages 2 and 3 and ONE tunnel listener shared by every source, only if a local pod can use them
        # (+ the pod tables' passthrough for an address of a pod range with no mesh pod, ALLOW_ANY)
        stages = [names.OUTBOUND_DISPATCH, names.OUTBOUND_POD, names.OUTBOUND_TUNNEL_LIS, names.OUTBOUND_PASSTHROUGH] if local_ids else []
        assert internal == set(stages)
        assert len(res.listeners) == 3 + len(internal)
        assert [lis.name for lis in res.listeners] == ["ztunnel_outbound", "ztunnel_inbound", "ztunnel_inbound_plaintext", *stages]
        if local_ids:  # stage 3 keys this node's pods, nobody else's
            check_pod_stage(res, local_ips)
    else:
        # internal listeners: exactly the local identities
        assert {n.removeprefix("outbound_tunnel_lis_") for n in internal} == local_ids
        assert len(res.listeners) == 3 + len(local_ids)
    # tunnel clusters: three per local identity, nothing else
    for prefix in PER_ID_CLUSTERS:
        assert {c.name.removeprefix(prefix) for c in res.clusters if c.name.startswith(prefix)} == local_ids, prefix
    service_clusters = [c.name for c in res.clusters if c.name.endswith("_outbound_internal")]
    if stock:
        # service clusters: one per TCP service port, shared by the sources (no identity in the name)
        want = {names.service_port_cluster(port, host) for port, host in service_ports} if local_ids else set()
        assert sorted(service_clusters) == sorted(want)
        assert not [n for n in service_clusters if ids_in(n)]
        # the STATIC cluster reaching stage 2, then the fixed clusters, then the pod tables (one per
        # /24 of mesh pods anywhere: stage 2 reaches stage 3 through them)
        tables = [c.name for c in res.clusters if c.name.startswith(names.POD_TABLE_PREFIX)]
        stage2 = {names.OUTBOUND_DISPATCH, *tables} if local_ids else set()
        if local_ids:
            order, k = [c.name for c in res.clusters], len(tables)
            assert k and order[-6 - k] == names.OUTBOUND_DISPATCH and set(order[-5 - k:-k]) == FIXED_CLUSTERS and order[-k:] == tables
            assert {t for t, _, _ in pod_table_rows(res).values()} == set(tables)
    else:
        # service clusters: identity x TCP service port, local identities only
        tcp_vip_ports = len(service_ports)
        assert {source_of(n) for n in service_clusters} == (local_ids if tcp_vip_ports else set())
        assert len(service_clusters) == len(local_ids) * tcp_vip_ports
        stage2 = set()
    assert {c.name for c in res.clusters} == set(service_clusters) | FIXED_CLUSTERS | stage2 | {
        p + i for p in PER_ID_CLUSTERS for i in local_ids
    }
    assert len(res.clusters) == len({c.name for c in res.clusters})
    # EDS only for those service clusters, pointing at the (stock: shared; istio-2022: the source's own) internal listener
    assert sorted(cla.cluster_name for cla in res.endpoints) == sorted(service_clusters + (tables if stock and local_ids else []))
    for name, lbe in lb_endpoints(res):
        if lbe.endpoint.address.HasField("envoy_internal_address"):
            want_lis = names.OUTBOUND_TUNNEL_LIS if stock else f"outbound_tunnel_lis_{source_of(name)}"
            assert lbe.endpoint.address.envoy_internal_address.server_listener_name == want_lis
    # secrets: the local identities' certificates (with that SAN) + ROOTCA; no other key material
    secrets = {s.name: s for s in res.secrets}
    assert set(secrets) == local_ids | {"ROOTCA"}
    for ident_ in local_ids:
        leaf = x509.load_pem_x509_certificates(secrets[ident_].tls_certificate.certificate_chain.inline_string.encode())[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [ident_]
    # outbound chains and matcher sources: local workloads only
    out = listener(res, "ztunnel_outbound")
    if stock:
        # stage 1: exactly one chain per local identity, recording that identity; SRC keys = local pod IPs
        stage1 = [c for c in out.filter_chains if c.name not in CATCH_ALL_CHAINS]
        assert sorted(c.name for c in stage1) == sorted(names.source_chain(ident(i)) for i in local_ids)
        for chain in stage1:
            assert filter_state(chain)[names.SOURCE_IDENTITY_STATE] == source_of(chain.name), chain.name
        assert source_chains(res) == {ip: names.source_chain(ident(i)) for ip, i in local_pods.items()}
    else:
        for chain in out.filter_chains:
            if chain.name not in CATCH_ALL_CHAINS:
                assert source_of(chain.name) in local_ids, chain.name
    assert set(matcher_sources(res)) == local_ips
    # inbound chains: one per local pod on both inbound listeners
    for lname, catch_all in (("ztunnel_inbound", "blackhole inbound"), ("ztunnel_inbound_plaintext", "blackhole inbound plaintext")):
        chains = [c.name for c in listener(res, lname).filter_chains]
        assert chains[-1] == catch_all
        assert set(chains[:-1]) == {f"inbound_{ip}" for ip in local_ips}


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
@pytest.mark.parametrize(("scenario", "node"), GOLDEN_NODES, ids=GOLDEN_IDS)
def test_node_local_scoping_on_goldens(scenario: str, node: str, flavor: Flavor) -> None:
    e = expect(scenario)
    assert len(e.service_ports) == e.tcp_vip_ports  # (port name, hostname) tells the ports apart
    res = golden_cluster(scenario, flavor).nodes[node]
    check_node_local(res, e.local_pods(node), e.service_ports)


def test_goldens_have_different_identities_per_node() -> None:
    """The scoping test above is not vacuous: each seed puts different identities on its nodes."""
    for sc in ("bookinfo", "client-server", "sleep-httpbin"):
        ids = expect(sc).local_ids
        assert ids["ambient-worker"] and ids["ambient-worker2"] and ids["ambient-worker"] != ids["ambient-worker2"], sc


# ---- small in-test scenarios -------------------------------------------------------------------


def ns_obj(name: str, ambient: bool = True) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"} if ambient else {}}}


def pod_obj(name: str, ips: list[str], node: str, sa: str, *, ns: str = "default", app: str | None = None,
            port: int = 8080, ready: bool = True, host_network: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "serviceAccountName": sa,
                            "containers": [{"name": "app", "ports": [{"containerPort": port, "name": "http"}]}]}
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app or name}},
        "spec": spec,
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": i} for i in ips],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def svc_obj(name: str, vips: list[str], app: str, ports: list[dict[str, Any]], *, ns: str = "default", created: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"clusterIP": vips[0], "clusterIPs": vips, "selector": {"app": app}, "ports": ports}}


def build(tmp_path: Path, docs: list[dict[str, Any]], flavor: Flavor = Flavor.ENVOY) -> Any:
    d = tmp_path / "manifests"
    d.mkdir(parents=True, exist_ok=True)
    (d / "objects.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return build_cluster(d, flavor, certs())


HTTP = [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]


def synthetic_docs() -> list[dict[str, Any]]:
    """n1: a, a, b; n2: a, c; n3: only a hostNetwork pod and a pod outside the mesh; n4: nothing."""
    return [
        ns_obj("default"),
        ns_obj("legacy", ambient=False),
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n4"}},
        pod_obj("a-1", ["10.0.1.1"], "n1", "sa-a", app="a"),
        pod_obj("a-2", ["10.0.1.2"], "n1", "sa-a", app="a"),
        pod_obj("b-1", ["10.0.1.3"], "n1", "sa-b", app="b"),
        pod_obj("a-3", ["10.0.2.1"], "n2", "sa-a", app="a"),
        pod_obj("c-1", ["10.0.2.2"], "n2", "sa-c", app="c", ready=False),
        pod_obj("host", ["172.18.0.3"], "n3", "sa-host", app="host", host_network=True),
        pod_obj("outside", ["10.0.3.1"], "n3", "default", ns="legacy", app="outside"),
        svc_obj("a", ["10.96.0.1"], "a", HTTP, created="2024-01-01T00:00:01Z"),
        svc_obj("b", ["10.96.0.2"], "b", HTTP + [{"name": "grpc", "port": 90, "targetPort": 9090}], created="2024-01-01T00:00:02Z"),
        svc_obj("c", ["10.96.0.3"], "c", HTTP, created="2024-01-01T00:00:03Z"),
        svc_obj("outside", ["10.96.0.4"], "outside", HTTP, ns="legacy", created="2024-01-01T00:00:04Z"),
    ]


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_node_local_scoping_synthetic(tmp_path: Path, flavor: Flavor) -> None:
    c = build(tmp_path, synthetic_docs(), flavor)
    sa = lambda s: f"spiffe://{TD}/ns/default/sa/{s}"  # noqa: E731
    host = lambda s, ns="default": f"{s}.{ns}.svc.cluster.local"  # noqa: E731
    tcp_ports = {("http", host("a")), ("http", host("b")), ("grpc", host("b")), ("http", host("c")), ("http", host("outside", "legacy"))}
    assert sorted(c.nodes) == ["n1", "n2", "n3", "n4"]
    check_node_local(c.nodes["n1"], {"10.0.1.1": sa("sa-a"), "10.0.1.2": sa("sa-a"), "10.0.1.3": sa("sa-b")}, tcp_ports)
    check_node_local(c.nodes["n2"], {"10.0.2.1": sa("sa-a"), "10.0.2.2": sa("sa-c")}, tcp_ports)
    check_node_local(c.nodes["n3"], {}, tcp_ports)
    check_node_local(c.nodes["n4"], {}, tcp_ports)
    # resource counts of ztunnel-config.md §10 ("ours" column) for n1: Il=2, P_tcp=5
    n1 = c.nodes["n1"]
    counts = (len(n1.listeners), len(n1.clusters), len(n1.endpoints), len(n1.secrets))
    if flavor is Flavor.ENVOY:  # linear: listeners fixed, service clusters and CLAs per port (+ the stage-2 cluster, and a
        # cluster and CLA per /24 of mesh pods: 10.0.1.x, 10.0.2.x)
        assert counts == (3 + 4, 5 + 3 * 2 + 1 + 5 + 2, 5 + 2, 2 + 1)
    else:
        assert counts == (3 + 2, 2 * 5 + 3 * 2 + 5, 2 * 5, 2 + 1)
    # the not-ready c-1 is a source and an inbound chain on n2 but no endpoint anywhere
    for res in c.nodes.values():
        assert all(not lbe.endpoint.address.envoy_internal_address.endpoint_id.startswith("10.0.2.2:") for _, lbe in lb_endpoints(res))


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_node_without_local_workloads(tmp_path: Path, flavor: Flavor) -> None:
    res = build(tmp_path, synthetic_docs(), flavor).nodes["n3"]
    root = listener(res, "ztunnel_outbound").filter_chain_matcher
    # cleanup of §4.2: the root's on_no_match goes straight to the passthrough chain
    assert root.on_no_match.HasField("action") and action_name(root.on_no_match) == "PassthroughFilterChain"
    assert {k: action_name(v) for k, v in root.matcher_tree.exact_match_map.map.items()} == {"15001": "blackhole outbound"}
    assert [ch.name for ch in listener(res, "ztunnel_outbound").filter_chains] == ["PassthroughFilterChain", "blackhole outbound"]
    assert [lis.name for lis in res.listeners] == ["ztunnel_outbound", "ztunnel_inbound", "ztunnel_inbound_plaintext"]
    assert {c.name for c in res.clusters} == FIXED_CLUSTERS
    assert res.endpoints == () and [s.name for s in res.secrets] == ["ROOTCA"]
    assert [ch.name for ch in listener(res, "ztunnel_inbound").filter_chains] == ["blackhole inbound"]
    assert [ch.name for ch in listener(res, "ztunnel_inbound_plaintext").filter_chains] == ["blackhole inbound plaintext"]


# ---- stock flavor: linear three-stage layout -------------------------------------------------------


def check_linear(res: NodeResources, node: str, e: Expect) -> None:
    """Capture-path chains grow with local identities + service ports + destination identities,
    not with their product: stage 1 one per local identity (+ passthrough and blackhole); stage 2
    (the same on every node) one per TCP service port and one pod chain per mesh identity (+
    passthrough); stage 3 two chains (same node / other node). Stage 2 keys: the TCP services'
    VIPs and every mesh pod IP; stage 3 keys: this node's pod IPs."""
    local_ids = e.local_ids.get(node, set())
    mesh_ids = set(e.ip_identity.values())
    capture = [lis for lis in res.listeners if lis.name in ("ztunnel_outbound", names.OUTBOUND_DISPATCH, names.OUTBOUND_POD)]
    assert [lis.name for lis in capture] == (["ztunnel_outbound", names.OUTBOUND_DISPATCH, names.OUTBOUND_POD] if local_ids else ["ztunnel_outbound"])
    ranges = {ip[: ip.rfind(".") + 1] for ip in e.ip_identity if ":" not in ip}
    tables = {names.pod_table(r) for r in ranges} | ({names.pod_table("")} if any(":" in ip for ip in e.ip_identity) else set())
    n_chains = sum(len(lis.filter_chains) for lis in capture)
    assert n_chains == (len(local_ids) + 2) + (len(e.service_ports) + len(tables) + 1) + 2, node
    stage2 = listener(res, names.OUTBOUND_DISPATCH)
    assert len(stage2.filter_chains) == len(e.service_ports) + len(tables) + 1, node
    want = [names.service_port_cluster(p, h) for p, h in e.service_ports]
    want += sorted(tables)  # one chain per pod range, not per pod or identity
    assert sorted(ch.name for ch in stage2.filter_chains) == sorted([*want, "PassthroughFilterChain"])
    # stage 2's own keys: the VIPs exactly, the pod ranges by /24 string prefix (no per-pod key)
    assert set(_destinations(stage2.filter_chain_matcher)) == e.tcp_vips
    assert set(stage2.filter_chain_matcher.on_no_match.matcher.matcher_tree.prefix_match_map.map) == ranges
    stage2_keys = dispatch_map(res)
    assert set(stage2_keys) == e.tcp_vips | set(e.ip_identity)
    # every pod IP, here or elsewhere, resolves to its identity's row: no node-specific key in stage 2
    assert {ip: stage2_keys[ip] for ip in e.ip_identity} == {ip: pod_row(i) for ip, i in e.ip_identity.items()}
    assert len(listener(res, names.OUTBOUND_POD).filter_chains) == 2
    check_pod_stage(res, e.local_ips.get(node, set()))


@pytest.mark.parametrize(("scenario", "node"), GOLDEN_NODES, ids=GOLDEN_IDS)
def test_stock_layout_is_linear_on_goldens(scenario: str, node: str) -> None:
    check_linear(golden_cluster(scenario, Flavor.ENVOY).nodes[node], node, expect(scenario))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_stage2_is_identical_on_every_node(scenario: str) -> None:
    """Stage 2 does not depend on the node: identical bytes on every node of a golden (one
    message per model); only stage 3, which keys this node's pod IPs, differs."""
    nodes = golden_cluster(scenario, Flavor.ENVOY).nodes
    staged = [n for n in sorted(nodes) if expect(scenario).local_ids.get(n)]
    assert len(staged) >= 2, scenario
    stage2 = {n: listener(nodes[n], names.OUTBOUND_DISPATCH).SerializeToString(deterministic=True) for n in staged}
    assert len(set(stage2.values())) == 1, scenario
    stage3 = {n: listener(nodes[n], names.OUTBOUND_POD).SerializeToString(deterministic=True) for n in staged}
    assert len(set(stage3.values())) == len(staged), scenario  # not vacuous: the per-node part does differ
    # built once per model: every node of one index gets the very same message
    index = MeshIndex(load_model(GOLDEN / scenario / "manifests"))
    msgs = [listener(translate(index.node_view(n), Flavor.ENVOY, certs()), names.OUTBOUND_DISPATCH) for n in staged]
    assert all(m is msgs[0] for m in msgs), scenario
    assert msgs[0].SerializeToString(deterministic=True) == stage2[staged[0]]


def test_stock_layout_is_linear_synthetic(tmp_path: Path) -> None:
    """More identities than fit in a golden: same-identity pods on both nodes, a not-ready pod
    (a source and a destination, no endpoint), pods outside the mesh (no chain)."""
    c = build(tmp_path, synthetic_docs())
    sa = lambda s: f"spiffe://{TD}/ns/default/sa/{s}"  # noqa: E731
    host = lambda s, ns="default": f"{s}.{ns}.svc.cluster.local"  # noqa: E731
    ips = {"10.0.1.1": ("n1", "sa-a"), "10.0.1.2": ("n1", "sa-a"), "10.0.1.3": ("n1", "sa-b"),
           "10.0.2.1": ("n2", "sa-a"), "10.0.2.2": ("n2", "sa-c")}
    e = Expect(
        local_ids={"n1": {sa("sa-a"), sa("sa-b")}, "n2": {sa("sa-a"), sa("sa-c")}},
        local_ips={"n1": {"10.0.1.1", "10.0.1.2", "10.0.1.3"}, "n2": {"10.0.2.1", "10.0.2.2"}},
        ip_identity={ip: sa(s) for ip, (_, s) in ips.items()},
        ip_node={ip: n for ip, (n, _) in ips.items()},
        tcp_vip_ports=5,
        service_ports={("http", host("a")), ("http", host("b")), ("grpc", host("b")), ("http", host("c")), ("http", host("outside", "legacy"))},
        tcp_vips={"10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4"},
    )
    for node in ("n1", "n2"):
        check_linear(c.nodes[node], node, e)
    # sa-a is on both nodes -> the same row identity in both ranges' tables (the same on both
    # nodes); stage 3 tells this node's sa-a pods (same-node chain) from the other node's
    for node, here, there in (("n1", "10.0.1.1", "10.0.2.1"), ("n2", "10.0.2.1", "10.0.1.1")):
        res = c.nodes[node]
        assert dispatch_map(res)[here] == dispatch_map(res)[there] == pod_row(sa("sa-a"))
        assert pod_table_rows(res)[here][0] != pod_table_rows(res)[there][0]  # two /24s, two tables
        assert pod_stage_chain(res, here).name == names.POD_LOCAL_TUNNEL_CHAIN, node
        assert pod_stage_chain(res, there).name == names.POD_TUNNEL_CHAIN, node
    stage2 = {n: listener(c.nodes[n], names.OUTBOUND_DISPATCH).SerializeToString(deterministic=True) for n in ("n1", "n2")}
    assert stage2["n1"] == stage2["n2"]
    assert not [lis for n in ("n3", "n4") for lis in c.nodes[n].listeners if lis.name in (names.OUTBOUND_DISPATCH, names.OUTBOUND_POD)]
    # three local pods, two identities: one stage-1 chain per identity, not per pod
    assert len(set(source_chains(c.nodes["n1"]).values())) == 2


def test_stock_connection_walk_resolves_per_source(tmp_path: Path) -> None:
    """Two local identities share every stage-2 and stage-3 chain and the tunnel listener, yet
    each leaves with its own tunnel cluster (client certificate)."""
    res = build(tmp_path, synthetic_docs()).nodes["n1"]
    a, b = (f"spiffe://{TD}/ns/default/sa/{s}" for s in ("sa-a", "sa-b"))
    pod_chain = pod_route(res, dispatch_map(res)["10.0.2.1"], "10.0.2.1")  # sa-a on n2
    local_chain = pod_route(res, dispatch_map(res)["10.0.1.3"], "10.0.1.3")  # sa-b here on n1
    vip_chain = outbound_chain(res, dispatch_map(res)["10.96.0.3"]["80"])  # service c
    assert (pod_chain.name, local_chain.name) == (names.POD_TUNNEL_CHAIN, names.POD_LOCAL_TUNNEL_CHAIN)
    assert chosen_cluster(res, "10.0.1.1", pod_chain) == names.outbound_pod_tunnel_clus(ident(a))
    assert chosen_cluster(res, "10.0.1.3", pod_chain) == names.outbound_pod_tunnel_clus(ident(b))
    assert chosen_cluster(res, "10.0.1.1", local_chain) == names.outbound_pod_local_tunnel_clus(ident(a))
    assert chosen_cluster(res, "10.0.1.3", local_chain) == names.outbound_pod_local_tunnel_clus(ident(b))
    assert chosen_cluster(res, "10.0.1.1", vip_chain) == chosen_cluster(res, "10.0.1.3", vip_chain) == names.service_port_cluster(
        "http", "c.default.svc.cluster.local")
    tunnel = listener(res, names.OUTBOUND_TUNNEL_LIS).filter_chains[0]
    fmt = filter_state(tunnel)[names.TCP_PROXY_CLUSTER_STATE]
    for src in (a, b):
        assert cluster(res, resolve_for(fmt, src)).transport_socket.name == "envoy.transport_sockets.tls"
        assert resolve_for(fmt, src) == names.outbound_tunnel_clus(ident(src))


# ---- D2: no dangling references ------------------------------------------------------------------


def problems(res: NodeResources) -> list[str]:
    """Every check translate() runs before emitting (refcheck.check covers STATIC clusters' internal endpoints)."""
    found = refcheck.check(res.listeners, res.clusters, (c.cluster_name for c in res.endpoints), (s.name for s in res.secrets), routes=res.routes)
    return found + refcheck.check_endpoints(res.endpoints, {lis.name for lis in res.listeners})


def test_refcheck_clean_on_every_golden() -> None:
    checked = 0
    for sc, node, flavor, res in all_golden():
        assert problems(res) == [], f"{sc}/{node}/{flavor.value}"
        checked += 1
    assert checked == 2 * len(GOLDEN_NODES) >= 12


def _bookinfo_w2(flavor: Flavor = Flavor.ENVOY) -> NodeResources:
    return golden_cluster("bookinfo", flavor).nodes["ambient-worker2"]


def _drop_chain(res: NodeResources, chain: str, lis_name: str = "ztunnel_outbound") -> NodeResources:
    lis = [copy.deepcopy(x) for x in res.listeners]
    out = next(x for x in lis if x.name == lis_name)
    keep = [c for c in out.filter_chains if c.name != chain]
    assert len(keep) == len(out.filter_chains) - 1, chain  # the chain was there
    del out.filter_chains[:]
    out.filter_chains.extend(keep)
    return dataclasses.replace(res, listeners=tuple(lis))


def _drop(res: NodeResources, family: str, name: str) -> NodeResources:
    key = "cluster_name" if family == "endpoints" else "name"
    kept = tuple(x for x in getattr(res, family) if getattr(x, key) != name)
    assert len(kept) == len(getattr(res, family)) - 1, (family, name)  # it was there
    return dataclasses.replace(res, **{family: kept})


def _eds_service_name(res: NodeResources, cluster: str, service_name: str) -> NodeResources:
    clusters = [copy.deepcopy(c) for c in res.clusters]
    next(c for c in clusters if c.name == cluster).eds_cluster_config.service_name = service_name
    return dataclasses.replace(res, clusters=tuple(clusters))


SERVICE_CHAIN = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage_to_http_reviews.default.svc.cluster.local_outbound_internal"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
REVIEWS = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
# stock flavor
REVIEWS_PORT = names.service_port_cluster("http", "reviews.default.svc.cluster.local")
SOURCE_CHAIN = names.source_chain(ident(PRODUCTPAGE))
REVIEWS_TABLE = names.pod_table("10.244.2.")  # reviews-v2/v3 (and the other pods of ambient-worker2's /24)
DISPATCH = names.OUTBOUND_DISPATCH
POD = names.OUTBOUND_POD


def _missing_runtime_cluster(lis: str, prefix: str, src: str) -> str:
    return f"listener {lis}: envoy.tcp_proxy.cluster {names.per_source(prefix)!r} names missing cluster {prefix + src!r}"


BROKEN_ISTIO_2022 = [
    ("service-chain", lambda r: _drop_chain(r, SERVICE_CHAIN), f"matcher action names missing filter chain {SERVICE_CHAIN!r}"),
    ("blackhole-chain", lambda r: _drop_chain(r, "blackhole outbound"), "matcher action names missing filter chain 'blackhole outbound'"),
    ("fixed-cluster", lambda r: _drop(r, "clusters", "BlackHoleCluster"), "names missing cluster 'BlackHoleCluster'"),
    ("tunnel-cluster", lambda r: _drop(r, "clusters", f"outbound_tunnel_clus_{PRODUCTPAGE}"),
     f"names missing cluster 'outbound_tunnel_clus_{PRODUCTPAGE}'"),
    ("cla", lambda r: _drop(r, "endpoints", SERVICE_CHAIN), f"cluster {SERVICE_CHAIN}: no ClusterLoadAssignment"),
    ("workload-secret", lambda r: _drop(r, "secrets", PRODUCTPAGE), f"missing secret {PRODUCTPAGE!r}"),
    ("rootca", lambda r: _drop(r, "secrets", "ROOTCA"), "missing secret 'ROOTCA'"),
    ("internal-listener", lambda r: _drop(r, "listeners", f"outbound_tunnel_lis_{PRODUCTPAGE}"),
     f"internal address names missing listener 'outbound_tunnel_lis_{PRODUCTPAGE}'"),
]
BROKEN_STOCK = [
    ("source-chain", lambda r: _drop_chain(r, SOURCE_CHAIN),
     f"listener ztunnel_outbound: matcher action names missing filter chain {SOURCE_CHAIN!r}"),
    ("service-chain", lambda r: _drop_chain(r, REVIEWS_PORT, DISPATCH),
     f"listener {DISPATCH}: matcher action names missing filter chain {REVIEWS_PORT!r}"),
    ("pod-range-chain", lambda r: _drop_chain(r, REVIEWS_TABLE, DISPATCH),
     f"listener {DISPATCH}: matcher action names missing filter chain {REVIEWS_TABLE!r}"),
    # the pod tables: a range's cluster, its CLA; its rows lead to stage 3
    ("pod-table-cluster", lambda r: _drop(r, "clusters", REVIEWS_TABLE),
     f"listener {DISPATCH}: tcp_proxy {REVIEWS_TABLE!r} names missing cluster {REVIEWS_TABLE!r}"),
    ("pod-table-cla", lambda r: _drop(r, "endpoints", REVIEWS_TABLE), f"cluster {REVIEWS_TABLE}: no ClusterLoadAssignment"),
    ("pod-passthrough-listener", lambda r: _drop(r, "listeners", names.OUTBOUND_PASSTHROUGH),
     f"endpoints {REVIEWS_TABLE}: internal address names missing listener {names.OUTBOUND_PASSTHROUGH!r}"),
    # stage 3: its chains, its listener
    ("pod-tunnel-chain", lambda r: _drop_chain(r, names.POD_TUNNEL_CHAIN, POD),
     f"listener {POD}: matcher action names missing filter chain {names.POD_TUNNEL_CHAIN!r}"),
    ("pod-local-tunnel-chain", lambda r: _drop_chain(r, names.POD_LOCAL_TUNNEL_CHAIN, POD),
     f"listener {POD}: matcher action names missing filter chain {names.POD_LOCAL_TUNNEL_CHAIN!r}"),
    ("pod-stage-listener", lambda r: _drop(r, "listeners", POD),
     f"endpoints {REVIEWS_TABLE}: internal address names missing listener {POD!r}"),
    ("blackhole-chain", lambda r: _drop_chain(r, "blackhole outbound"), "matcher action names missing filter chain 'blackhole outbound'"),
    ("fixed-cluster", lambda r: _drop(r, "clusters", "BlackHoleCluster"), "names missing cluster 'BlackHoleCluster'"),
    ("dispatch-cluster", lambda r: _drop(r, "clusters", DISPATCH),
     f"listener ztunnel_outbound: tcp_proxy {SOURCE_CHAIN!r} names missing cluster {DISPATCH!r}"),
    # the run-time envoy.tcp_proxy.cluster choices dangle for the source whose tunnel cluster is gone
    ("tunnel-cluster", lambda r: _drop(r, "clusters", names.outbound_tunnel_clus(ident(PRODUCTPAGE))),
     _missing_runtime_cluster(names.OUTBOUND_TUNNEL_LIS, names.OUTBOUND_TUNNEL_CLUS_PREFIX, PRODUCTPAGE)),
    ("pod-tunnel-cluster", lambda r: _drop(r, "clusters", names.outbound_pod_tunnel_clus(ident(PRODUCTPAGE))),
     _missing_runtime_cluster(POD, names.OUTBOUND_POD_TUNNEL_CLUS_PREFIX, PRODUCTPAGE)),
    ("pod-local-tunnel-cluster", lambda r: _drop(r, "clusters", names.outbound_pod_local_tunnel_clus(ident(PRODUCTPAGE))),
     _missing_runtime_cluster(POD, names.OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX, PRODUCTPAGE)),
    ("cla", lambda r: _drop(r, "endpoints", REVIEWS_PORT), f"cluster {REVIEWS_PORT}: no ClusterLoadAssignment"),
    # the SotW stream re-sends a warming cluster's CLA by the cluster's own name
    ("eds-service-name", lambda r: _eds_service_name(r, REVIEWS_PORT, "reviews-endpoints"),
     f"cluster {REVIEWS_PORT}: EDS service_name 'reviews-endpoints' differs from the cluster name"),
    ("workload-secret", lambda r: _drop(r, "secrets", PRODUCTPAGE), f"missing secret {PRODUCTPAGE!r}"),
    ("rootca", lambda r: _drop(r, "secrets", "ROOTCA"), "missing secret 'ROOTCA'"),
    ("tunnel-listener", lambda r: _drop(r, "listeners", names.OUTBOUND_TUNNEL_LIS),
     f"endpoints {REVIEWS_PORT}: internal address names missing listener {names.OUTBOUND_TUNNEL_LIS!r}"),
    ("dispatch-listener", lambda r: _drop(r, "listeners", DISPATCH),
     f"endpoints {DISPATCH}: internal address names missing listener {DISPATCH!r}"),
    # the HBONE chain's RDS route (which carries the pod's L4 policy) and the cluster it names
    ("inbound-route", lambda r: _drop(r, "routes", "inbound_10.244.2.3"),
     "listener ztunnel_inbound: rds names missing route configuration 'inbound_10.244.2.3'"),
    ("inbound-route-cluster", lambda r: _drop(r, "clusters", "virtual_inbound"),
     "listener ztunnel_inbound: route names missing cluster 'virtual_inbound'"),
]
BROKEN = [(Flavor.ISTIO_2022, *case) for case in BROKEN_ISTIO_2022] + [(Flavor.ENVOY, *case) for case in BROKEN_STOCK]


@pytest.mark.parametrize(("flavor", "case", "break_it", "expected"), BROKEN, ids=[f"{f.value}-{c}" for f, c, _, _ in BROKEN])
def test_refcheck_reports_a_broken_set(flavor: Flavor, case: str, break_it: Any, expected: str) -> None:
    res = _bookinfo_w2(flavor)
    assert problems(res) == []
    found = problems(break_it(res))
    assert any(expected in p for p in found), found


def test_refcheck_runtime_cluster_checked_per_source_identity() -> None:
    """Stock: one shared chain names ``<prefix><source id>`` at run time; dropping one local
    identity's tunnel cluster is reported for that identity only, the others still resolve."""
    res = _bookinfo_w2()
    local = sorted(filter_state(ch)[names.SOURCE_IDENTITY_STATE] for ch in listener(res, "ztunnel_outbound").filter_chains
                   if names.SOURCE_IDENTITY_STATE in filter_state(ch))
    assert len(local) >= 2 and PRODUCTPAGE in local
    found = problems(_drop(res, "clusters", names.outbound_tunnel_clus(ident(PRODUCTPAGE))))
    assert found == [_missing_runtime_cluster(names.OUTBOUND_TUNNEL_LIS, names.OUTBOUND_TUNNEL_CLUS_PREFIX, PRODUCTPAGE)]


def test_translate_refuses_to_emit_dangling_references(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(GOLDEN / "bookinfo" / "manifests")
    view = MeshIndex(model).node_view("ambient-worker2")
    monkeypatch.setattr(translate_pkg, "build_fixed_clusters", lambda mesh: [])
    with pytest.raises(TranslationError) as info:
        translate(view, Flavor.ENVOY, certs())
    assert "node ambient-worker2" in str(info.value) and "'BlackHoleCluster'" in str(info.value)
    translate(view, Flavor.ENVOY, certs(), check=False)  # the check is what refused it


# ---- D3: determinism ------------------------------------------------------------------------------


def serialized(res: NodeResources) -> list[tuple[str, bytes]]:
    return [(name, msg.SerializeToString(deterministic=True)) for family in res.named().values() for name, msg in family]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_output_independent_of_input_order(scenario: str) -> None:
    objs = read_objects(GOLDEN / scenario / "manifests")
    reference: dict[tuple[str, Flavor], list[tuple[str, bytes]]] = {}
    for seed in (0, 1, 2):
        shuffled = list(objs)
        random.Random(seed).shuffle(shuffled)
        if seed == 0:
            shuffled.reverse()
        index = MeshIndex(build_model(shuffled))
        for node in index.node_names:
            for flavor in FLAVORS:
                first = serialized(translate(index.node_view(node), flavor, certs()))
                assert serialized(translate(index.node_view(node), flavor, certs())) == first  # twice: same bytes
                ref = reference.setdefault((node, flavor), first)
                assert first == ref, f"{scenario}/{node}/{flavor.value} differs with seed {seed}"
    # ... and equal to the unshuffled pipeline's output
    for (node, flavor), ref in reference.items():
        assert serialized(golden_cluster(scenario, flavor).nodes[node]) == ref


def test_output_independent_of_hash_seed(tmp_path: Path) -> None:
    """Set/dict iteration order must not leak: two processes with different PYTHONHASHSEEDs."""
    outs = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-m", "xdsserver", "generate", "--manifests", str(GOLDEN / "sleep-httpbin" / "manifests"),
             "--node", "ambient-worker", "--flavor", "istio-2022"],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and outs[0]


# ---- D4: IPv6 -------------------------------------------------------------------------------------


def ipv6_docs() -> list[dict[str, Any]]:
    """Single-stack IPv6, spelled non-canonically on purpose."""
    return [
        ns_obj("default"),
        pod_obj("client", ["FD00:10:244:1:0:0:0:4"], "n1", "client"),
        pod_obj("server-1", ["fd00:10:244:2:0::5"], "n2", "server", app="server"),
        pod_obj("server-2", ["fd00:0010:0244:0001::6"], "n1", "server", app="server"),
        svc_obj("server", ["fd00:10:96:0:0:0:0:105"], "server", HTTP),
    ]


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_ipv6(tmp_path: Path, flavor: Flavor) -> None:
    res = build(tmp_path, ipv6_docs(), flavor).nodes["n1"]
    client, s1, s2, vip = "fd00:10:244:1::4", "fd00:10:244:2::5", "fd00:10:244:1::6", "fd00:10:96::105"
    # matcher keys in RFC 5952 text
    srcs = matcher_sources(res)
    assert set(srcs) == {client, s2}
    assert set(srcs[client]) == {client, s1, s2, vip}
    for key in [*srcs, *srcs[client]]:
        assert str(ipaddress.ip_address(key)) == key
    # /128 prefix ranges on both inbound listeners
    for lname in ("ztunnel_inbound", "ztunnel_inbound_plaintext"):
        ranges = {(r.address_prefix, r.prefix_len.value) for ch in listener(res, lname).filter_chains for r in ch.filter_chain_match.prefix_ranges}
        assert ranges == {(client, 128), (s2, 128)}, lname
    # [ip]:port in endpoint_id and tunnel metadata; 15008 across nodes, on the same node 15088 in
    # istio-2022 (stock: 15008 too, looped by the ztunnel pod's pod-CIDR REDIRECT)
    eps = {}
    for _, lbe in lb_endpoints(res):
        md = tunnel_md(lbe)
        eps[lbe.endpoint.address.envoy_internal_address.endpoint_id] = (md["address"], md["destination"])
    local = 15008 if flavor is Flavor.ENVOY else 15088
    assert eps == {f"[{s1}]:8080": (f"[{s1}]:15008", f"[{s1}]:8080"), f"[{s2}]:8080": (f"[{s2}]:{local}", f"[{s2}]:8080")}
    # route guard accepts "[ip]:port" only
    guard = re.compile(guard_regex(res, f"inbound_{s2}"))
    assert guard.fullmatch(f"[{s2}]:8080") and not guard.fullmatch(f"{s2}:8080") and not guard.fullmatch(f"[{client}]:8080")
    # no non-canonical spelling anywhere
    text = dump_json(render(res))
    for spelled in ("FD00", "0:0:0", "0010:", ":0::"):
        assert spelled not in text


def test_dual_stack_pod_inbound_accepts_both_addresses(tmp_path: Path) -> None:
    docs = [ns_obj("default"), pod_obj("ds", ["10.244.1.9", "fd00:10:244:1::9"], "n1", "ds"),
            svc_obj("ds", ["10.96.0.9", "fd00:10:96::9"], "ds", HTTP)]
    res = build(tmp_path, docs).nodes["n1"]
    chain = next(ch for ch in listener(res, "ztunnel_inbound").filter_chains if ch.name == "inbound_10.244.1.9")
    assert {(r.address_prefix, r.prefix_len.value) for r in chain.filter_chain_match.prefix_ranges} == {
        ("10.244.1.9", 32), ("fd00:10:244:1::9", 128)}
    # the service cluster sends CONNECT [fd00:10:244:1::9]:8080 to this chain, so the route must accept it
    destinations = {tunnel_md(lbe)["destination"] for _, lbe in lb_endpoints(res)}
    assert "[fd00:10:244:1::9]:8080" in destinations
    guard = re.compile(guard_regex(res, "inbound_10.244.1.9"))
    assert guard.fullmatch("10.244.1.9:8080")
    assert guard.fullmatch("[fd00:10:244:1::9]:8080")


# ---- D5: UDP/SCTP ports skipped --------------------------------------------------------------------


def test_udp_ports_skipped_on_golden() -> None:
    """sleep-httpbin's helloworld has TCP and UDP on port 5000 (2022 collided them)."""
    for flavor in FLAVORS:
        for node, res in golden_cluster("sleep-httpbin", flavor).nodes.items():
            assert not [c.name for c in res.clusters if "udp-probe" in c.name]
            srcs = matcher_sources(res)
            assert srcs, (flavor, node)
            for dsts in srcs.values():
                ports = dsts["10.96.12.34"]
                if flavor is Flavor.ENVOY:
                    assert ports == {"5000": names.service_port_cluster("http", "helloworld.default.svc.cluster.local")}
                else:
                    assert list(ports) == ["5000"] and "_to_http_helloworld.default.svc" in ports["5000"]


def test_udp_and_sctp_only_service_has_no_matcher_entry(tmp_path: Path) -> None:
    docs = [
        ns_obj("default"),
        pod_obj("client", ["10.0.1.1"], "n1", "client"),
        pod_obj("dns", ["10.0.1.2"], "n1", "dns", port=53),
        svc_obj("dns", ["10.96.0.10"], "dns", [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "sctp", "port": 54, "protocol": "SCTP"}]),
        svc_obj("mixed", ["10.96.0.11"], "dns", [{"name": "dns-udp", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
    ]
    res = build(tmp_path, docs).nodes["n1"]
    dsts = matcher_sources(res)["10.0.1.1"]
    assert "10.96.0.10" not in dsts  # an empty PORT map would be invalid; the VIP is simply not captured
    tcp_cluster = names.service_port_cluster("dns-tcp", "mixed.default.svc.cluster.local")
    assert dsts["10.96.0.11"] == {"53": tcp_cluster}
    assert [c.name for c in res.clusters if c.name.endswith("_outbound_internal")] == [tcp_cluster]
    assert not [c.name for c in res.clusters if "to_dns_" in c.name or "to_sctp_" in c.name or "to_dns-udp_" in c.name]


# ---- D6..D10 on every golden ----------------------------------------------------------------------


def test_endpoint_id_and_weight_on_every_endpoint() -> None:
    internal = 0
    for sc, node, flavor, res in all_golden():
        for name, lbe in lb_endpoints(res):
            assert lbe.load_balancing_weight.value == 1, (sc, node, name)
            addr = lbe.endpoint.address
            if addr.HasField("envoy_internal_address"):
                internal += 1
                md = tunnel_md(lbe)
                assert addr.envoy_internal_address.endpoint_id == md["destination"], (sc, node, name)
                assert md["address"].rsplit(":", 1)[0] == md["destination"].rsplit(":", 1)[0]
                assert json_format.MessageToDict(lbe.metadata.filter_metadata["envoy.transport_socket_match"]) == {"tunnel": "h2"}
    assert internal >= 20


def test_endpoint_ids_distinct_within_a_cluster() -> None:
    for sc, node, flavor, res in all_golden():
        for cla in res.endpoints:
            ids = [lbe.endpoint.address.envoy_internal_address.endpoint_id for g in cla.endpoints for lbe in g.lb_endpoints
                   if lbe.endpoint.address.HasField("envoy_internal_address")]
            assert len(ids) == len(set(ids)), (sc, node, cla.cluster_name)


def test_same_node_endpoints_use_15088_others_15008() -> None:
    # Service endpoints: istio-2022 addresses a same-node pod at 15088 (the 2022 generator's
    # per-node CLA); stock addresses every pod at 15008 (the ztunnel pod's pod-CIDR REDIRECT loops
    # a same-node one), so each service's CLA is the same bytes on every node.
    seen: set[tuple[Flavor, str]] = set()
    pod_routes: set[tuple[Flavor, bool]] = set()
    cla_bytes: dict[tuple[str, str], set[bytes]] = {}
    for sc, node, flavor, res in all_golden():
        e = expect(sc)
        for _, lbe in lb_endpoints(res):
            if not lbe.endpoint.address.HasField("envoy_internal_address"):
                continue
            ip, port = tunnel_md(lbe)["address"].rsplit(":", 1)
            want = "15088" if e.ip_node[ip] == node and flavor is not Flavor.ENVOY else "15008"
            assert port == want, (sc, node, flavor, ip)
            seen.add((flavor, "local" if e.ip_node[ip] == node else "remote"))
        if flavor is Flavor.ENVOY:
            for cla in res.endpoints:
                cla_bytes.setdefault((sc, cla.cluster_name), set()).add(cla.SerializeToString(deterministic=True))
        # pod-IP chains: same-node destinations through the pod-local tunnel cluster (15088 override),
        # the source's own (its client certificate); stock decides same/other node in stage 3 (keys:
        # exactly this node's pod IPs, on_no_match: the other-node chain) and picks the cluster at
        # run time from the source identity
        if flavor is Flavor.ENVOY and e.local_ips.get(node):
            check_pod_stage(res, e.local_ips[node])
        for src, dsts in matcher_sources(res).items():
            for dst, target in dsts.items():
                if isinstance(target, str):
                    local = e.ip_node[dst] == node
                    if flavor is Flavor.ENVOY:
                        assert target == pod_row(e.ip_identity[dst]), (sc, node, src, dst)  # node-independent
                        want_chain = names.POD_LOCAL_TUNNEL_CHAIN if local else names.POD_TUNNEL_CHAIN
                        assert pod_route(res, target, dst).name == want_chain, (sc, node, src, dst)
                    else:
                        prefix = "fc-outbound_pod_local_tunnel_clus_" if local else "fc-outbound_pod_tunnel_clus_"
                        assert target.startswith(prefix), (sc, node, src, dst, target)
                    chosen = chosen_cluster(res, src, pod_route(res, target, dst))
                    own = names.outbound_pod_local_tunnel_clus if local else names.outbound_pod_tunnel_clus
                    assert chosen == own(ident(e.ip_identity[src])), (sc, node, src, dst)
                    lb = cluster(res, chosen).original_dst_lb_config
                    assert lb.upstream_port_override.value == (15088 if local else 15008)
                    pod_routes.add((flavor, local))
    assert seen == {(f, where) for f in FLAVORS for where in ("local", "remote")}
    assert cla_bytes and all(len(v) == 1 for v in cla_bytes.values()), [k for k, v in cla_bytes.items() if len(v) > 1]
    assert pod_routes == {(f, local) for f in FLAVORS for local in (False, True)}


def test_tls_1_3_min_and_max_everywhere() -> None:
    for sc, node, flavor, res in all_golden():
        contexts = list(tls_contexts(res))
        n_ids, n_pods = len(expect(sc).local_ids.get(node, ())), len(expect(sc).local_ips.get(node, ()))
        assert len(contexts) == 3 * n_ids + n_pods, (sc, node)  # tunnel clusters + inbound chains
        for owner, ctx in contexts:
            p = ctx.common_tls_context.tls_params
            assert (p.tls_minimum_protocol_version, p.tls_maximum_protocol_version) == (TLS13, TLS13), (sc, node, owner)
            assert list(ctx.common_tls_context.alpn_protocols) == ["h2"]


def _san_prefixes(ctx: Message, flavor: Flavor) -> list[str]:
    dvc = ctx.common_tls_context.combined_validation_context.default_validation_context
    if flavor is Flavor.ENVOY:
        assert not dvc.match_subject_alt_names  # deprecated field not used on stock Envoy
        return [m.matcher.prefix for m in dvc.match_typed_subject_alt_names if m.san_type == common_pb2.SubjectAltNameMatcher.URI]
    return [m.prefix for m in dvc.match_subject_alt_names]


def test_peer_validation_upstream_and_downstream() -> None:
    """D8/D9: both sides check the peer chain against ROOTCA and a SPIFFE SAN of the trust domain;
    inbound requires a client certificate."""
    for sc, node, flavor, res in all_golden():
        for owner, ctx in tls_contexts(res):
            common = ctx.common_tls_context
            assert common.combined_validation_context.validation_context_sds_secret_config.name == "ROOTCA"
            assert _san_prefixes(ctx, flavor) == [f"spiffe://{TD}/"], (sc, node, owner)
            if isinstance(ctx, tls_pb2.UpstreamTlsContext):  # tunnel clusters present the source identity
                assert [s.name for s in common.tls_certificate_sds_secret_configs] == [source_of(owner)], (sc, node, owner)
            if isinstance(ctx, tls_pb2.DownstreamTlsContext):
                assert ctx.require_client_certificate.value is True, (sc, node, owner)
        # inbound chains present the *destination pod's* identity
        e = expect(sc)
        for ch in listener(res, "ztunnel_inbound").filter_chains[:-1]:
            ctx = unpack(ch.transport_socket.typed_config)
            assert isinstance(ctx, tls_pb2.DownstreamTlsContext)
            ip = ch.name.removeprefix("inbound_")
            assert ctx.common_tls_context.tls_certificate_sds_secret_configs[0].name == e.ip_identity[ip]


def test_upstream_san_pinned_to_expected_server() -> None:
    """D8: service endpoints carry tunnel.identity and the internal listener turns it into
    upstream_subject_alt_names; pod-IP chains set it to the destination pod's identity (stock:
    the stage-2 chain per destination identity, shared ONCE so it reaches stage 3's tunnel
    connection, where nothing overrides it; the shared tunnel listener pins from metadata)."""
    pod_chains = 0
    pinned: set[Flavor] = set()
    for sc, node, flavor, res in all_golden():
        e = expect(sc)
        for _, lbe in lb_endpoints(res):
            if lbe.endpoint.address.HasField("envoy_internal_address"):
                md = tunnel_md(lbe)
                assert md["identity"] == e.ip_identity[md["destination"].rsplit(":", 1)[0]], (sc, node)
        tunnel_listeners = []
        for lis in res.listeners:
            if lis.HasField("internal_listener") and lis.name not in (names.OUTBOUND_DISPATCH, names.OUTBOUND_POD, names.OUTBOUND_PASSTHROUGH):  # stages 2, 3: below
                tunnel_listeners.append(lis.name)
                [chain] = lis.filter_chains
                assert isinstance(filters(chain)[0], set_filter_state_pb2.Config)  # before tcp_proxy connects
                assert filter_state(chain)["envoy.network.upstream_subject_alt_names"] == "%DYNAMIC_METADATA(tunnel:identity)%"
                if flavor is Flavor.ENVOY:
                    # shared by every source: the tunnel cluster (client cert) is the source's, chosen at run time
                    fmt = filter_state(chain)[names.TCP_PROXY_CLUSTER_STATE]
                    for src in e.local_ids[node]:
                        assert resolve_for(fmt, src) == names.outbound_tunnel_clus(ident(src)), (sc, node)
                    assert tcp_proxy(chain).cluster == "BlackHoleCluster"  # only without a source identity
        if flavor is Flavor.ENVOY:
            assert tunnel_listeners == ([names.OUTBOUND_TUNNEL_LIS] if e.local_ids.get(node) else []), (sc, node)
        for src, dsts in matcher_sources(res).items():
            for dst, target in dsts.items():
                if isinstance(target, str):
                    pod_chains += 1
                    if flavor is Flavor.ENVOY:
                        # the pod table's row for the IP names the identity; its cluster passes the
                        # row's tunnel metadata to stage 3, which pins it before connecting the tunnel
                        table, _, spiffe = pod_table_rows(res)[dst]
                        assert target == pod_row(e.ip_identity[dst]) and spiffe == e.ip_identity[dst], (sc, node, dst)
                        socket = unpack(cluster(res, table).transport_socket.typed_config)
                        assert [m.name for m in socket.passthrough_metadata] == [names.TUNNEL_METADATA]
                        assert "envoy.network.upstream_subject_alt_names" not in filter_state(outbound_chain(res, table))
                        stage3 = pod_route(res, target, dst)
                        assert isinstance(filters(stage3)[0], set_filter_state_pb2.Config)  # before tcp_proxy connects
                        assert filter_state(stage3)["envoy.network.upstream_subject_alt_names"] == "%DYNAMIC_METADATA(tunnel:identity)%"
                        assert tcp_proxy(stage3).cluster == "BlackHoleCluster"  # only without a source identity
                    else:
                        chain = outbound_chain(res, target)
                        assert isinstance(filters(chain)[0], set_filter_state_pb2.Config)  # before tcp_proxy connects
                        assert filter_state(chain)["envoy.network.upstream_subject_alt_names"] == e.ip_identity[dst]
                        assert target.endswith(f"_to_{e.ip_identity[dst]}")
                    pinned.add(flavor)
    assert pod_chains >= 20
    assert pinned == set(FLAVORS)


def guard_regex(res: NodeResources, chain_name: str) -> str:
    chain = next(ch for ch in listener(res, "ztunnel_inbound").filter_chains if ch.name == chain_name)
    [hcm] = [f for f in filters(chain) if isinstance(f, hcm_pb2.HttpConnectionManager)]
    rc = hcm.route_config
    if hcm.HasField("rds"):  # stock flavor: the pod's RouteConfiguration comes over RDS
        [rc] = [r for r in res.routes if r.name == hcm.rds.route_config_name]
    [route] = rc.virtual_hosts[0].routes
    assert route.match.HasField("connect_matcher") and route.route.cluster == "virtual_inbound"
    [hdr] = route.match.headers
    assert hdr.name == "x-envoy-original-dst-host"
    return hdr.string_match.safe_regex.regex


def test_destination_header_guard_per_pod() -> None:
    """D10: the CONNECT route of inbound_<ip> only matches x-envoy-original-dst-host = <ip>:<port>."""
    for sc, node, flavor, res in all_golden():
        local = sorted(expect(sc).local_ips.get(node, ()))
        others = sorted(set(expect(sc).ip_node) - {local[0]}) if local else []
        for ip in local:
            guard = re.compile(guard_regex(res, f"inbound_{ip}"))
            assert guard.fullmatch(f"{ip}:9080") and guard.fullmatch(f"{ip}:1")
            for bad in (f"{ip}:", f"{ip}:123456", f"{ip}:80,{ip}:81", f"x{ip}:80", ip.replace(".", "x", 1) + ":80",
                        *[f"{o}:80" for o in others if o != ip]):
                assert not guard.fullmatch(bad) and not guard.search(bad), (sc, node, ip, bad)


# ---- flavors ------------------------------------------------------------------------------------


def _listener_filter_names(lis: listener_pb2.Listener) -> list[str]:
    return [f.name for f in lis.listener_filters]


def test_istio_2022_flavor_mechanisms() -> None:
    for node, res in golden_cluster("bookinfo", Flavor.ISTIO_2022).nodes.items():
        out = listener(res, "ztunnel_outbound")
        ecds = [f for f in out.listener_filters if f.name == "envoy.filters.listener.workload_metadata"]
        assert len(ecds) == 1 and list(ecds[0].config_discovery.type_urls) == [
            "type.googleapis.com/istio.telemetry.workloadmetadata.v1.WorkloadMetadataResources"]
        for lis in res.listeners:
            if lis.HasField("internal_listener"):
                assert _listener_filter_names(lis) == ["set_dst_address"]
                assert lis.use_original_dst.value is False
        sds = [m for m in walk([*res.listeners, *res.clusters]) if isinstance(m, secret_pb2.SdsSecretConfig)]
        assert sds and all(s.sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name == "sds-grpc" for s in sds)
        assert all(s.sds_config.initial_fetch_timeout.ToSeconds() == 0 and s.sds_config.HasField("initial_fetch_timeout")
                   for s in sds if s.name == "ROOTCA")
        for c in res.clusters:
            if c.name.startswith("outbound_tunnel_clus_"):
                assert not c.original_dst_lb_config.HasField("metadata_key")


def test_envoy_flavor_mechanisms() -> None:
    for node, res in golden_cluster("bookinfo", Flavor.ENVOY).nodes.items():
        names_seen = {f.name for lis in res.listeners for f in lis.listener_filters}
        assert "set_dst_address" not in names_seen and "envoy.filters.listener.workload_metadata" not in names_seen
        for lis in res.listeners:
            if lis.HasField("internal_listener"):
                # carry the client IP across the internal listener (stock-envoy.md §5.6); stage 2
                # first reads the pod-table key from the hop's PROXY-protocol header
                first = ["envoy.filters.listener.proxy_protocol"] if lis.name == names.OUTBOUND_DISPATCH else []
                assert _listener_filter_names(lis) == [*first, "envoy.filters.listener.original_dst", "envoy.filters.listener.original_src"]
        sds = [m for m in walk([*res.listeners, *res.clusters]) if isinstance(m, secret_pb2.SdsSecretConfig)]
        assert sds and all(s.sds_config.HasField("ads") for s in sds)
        tunnel = [c for c in res.clusters if c.name.startswith("outbound_tunnel_clus_")]
        assert tunnel
        for c in tunnel:
            key = c.original_dst_lb_config.metadata_key
            assert (key.key, [p.key for p in key.path]) == ("tunnel", ["address"])
        # stage 1 hands the original destination (to stage 2), the client address (to every later
        # internal hop) and the source identity (run-time tunnel cluster choice) on, then goes to stage 2
        Share = value_pb2.FilterStateValue.SharedWithUpstream
        stage1 = [ch for ch in listener(res, "ztunnel_outbound").filter_chains if ch.name not in CATCH_ALL_CHAINS]
        assert len(stage1) == len(expect("bookinfo").local_ids[node])

        def states_then_proxy(ch):
            """(object key -> (format, sharing, factory)) of the chain's set_filter_state, and its tcp_proxy."""
            [sfs, tcp] = filters(ch)
            assert isinstance(sfs, set_filter_state_pb2.Config) and isinstance(tcp, tcp_proxy_pb2.TcpProxy)
            return {v.object_key: (v.format_string.text_format_source.inline_string, Share.Name(v.shared_with_upstream), v.factory_key)
                    for v in sfs.on_new_connection}, tcp

        for ch in stage1:
            got, tcp = states_then_proxy(ch)
            assert got == {
                "envoy.filters.listener.original_dst.local_ip": ("%DOWNSTREAM_LOCAL_ADDRESS%", "ONCE", ""),
                "envoy.filters.listener.original_dst.remote_ip": ("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%:0", "TRANSITIVE", ""),  # no port: pooled HBONE
                names.SOURCE_IDENTITY_STATE: (source_of(ch.name), "TRANSITIVE", "envoy.string"),
                names.DESTINATION_IP_STATE: ("%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "ONCE", "envoy.string"),
            }, ch.name
            assert tcp.cluster == names.OUTBOUND_DISPATCH
        # ... whose cluster is one internal endpoint: the stage-2 listener of the same name, over a
        # PROXY v2 header whose TLV is the destination IP (the pod-table key)
        static = cluster(res, names.OUTBOUND_DISPATCH)
        assert static.type == cluster_pb2.Cluster.STATIC
        [group] = static.load_assignment.endpoints
        [lbe] = group.lb_endpoints
        assert lbe.endpoint.address.envoy_internal_address.server_listener_name == names.OUTBOUND_DISPATCH
        assert static.transport_socket.name == "envoy.transport_sockets.upstream_proxy_protocol"
        pp = unpack(static.transport_socket.typed_config)
        [tlv] = pp.config.added_tlvs
        assert tlv.format_string.text_format_source.inline_string == f"%FILTER_STATE({names.DESTINATION_IP_STATE}:PLAIN)%"
        assert pp.transport_socket.name == "envoy.transport_sockets.internal_upstream"
        [pp_filter] = [unpack(f.typed_config) for f in listener(res, names.OUTBOUND_DISPATCH).listener_filters if f.name.endswith("proxy_protocol")]
        [rule] = pp_filter.rules
        assert (rule.tlv_type, rule.on_tlv_present.metadata_namespace, rule.on_tlv_present.key) == (tlv.type, names.LB_METADATA, "ip")
        # service chains (stage 2) go straight to their EDS cluster of the same name, and log
        # nothing themselves: the listener logs them, once, under a filter that passes exactly them
        stage2 = listener(res, names.OUTBOUND_DISPATCH)
        for ch in stage2.filter_chains:
            if ch.name.endswith("_outbound_internal"):
                assert [type(f) for f in filters(ch)] == [tcp_proxy_pb2.TcpProxy] and tcp_proxy(ch).cluster == ch.name
                assert not tcp_proxy(ch).access_log, ch.name
        [log] = stage2.access_log
        fmt = unpack(log.typed_config).log_format.text_format_source.inline_string
        assert fmt.endswith(" capture outbound (no waypoint proxy)\n")
        assert log.filter.extension_filter.name == "envoy.access_loggers.extension_filters.cel"
        logged = cel_chain_filter(unpack(log.filter.extension_filter.typed_config).expression)
        chain_names = [ch.name for ch in stage2.filter_chains]
        service = {c.name for c in res.clusters if c.HasField("eds_cluster_config") and not c.HasField("lb_subset_config")} & set(chain_names)
        assert service and {c for c in chain_names if logged(c)} == service
        # pod-range chains (stage 2): hand the original destination to the next hop, then go to
        # the range's pod table, whose subset LB picks the row by envoy.lb ip; nothing logged twice
        range_chains = [ch for ch in stage2.filter_chains if ch.name.startswith(names.POD_TABLE_PREFIX)]
        ranges = {ip[: ip.rfind(".") + 1] for ip in expect("bookinfo").ip_identity}
        assert sorted(ch.name for ch in range_chains) == sorted(names.pod_table(r) for r in ranges)
        for ch in range_chains:
            got, tcp = states_then_proxy(ch)
            assert got == {"envoy.filters.listener.original_dst.local_ip": ("%DOWNSTREAM_LOCAL_ADDRESS%", "ONCE", "")}, ch.name
            assert tcp.cluster == ch.name and not tcp.access_log and not tcp.HasField("tunneling_config")
            table = cluster(res, ch.name)
            [selector] = table.lb_subset_config.subset_selectors
            assert list(selector.keys) == ["ip"] and selector.single_host_per_subset
            assert table.lb_subset_config.fallback_policy == cluster_pb2.Cluster.LbSubsetConfig.DEFAULT_SUBSET
            assert json_format.MessageToDict(table.lb_subset_config.default_subset) == {"passthrough": True}
            [cla] = [c for c in res.endpoints if c.cluster_name == ch.name]
            [default] = [lbe for g in cla.endpoints for lbe in g.lb_endpoints
                         if json_format.MessageToDict(lbe.metadata.filter_metadata[names.LB_METADATA]) == {"passthrough": True}]
            assert default.endpoint.address.envoy_internal_address.server_listener_name == names.OUTBOUND_PASSTHROUGH
        # stage 3: HBONE to the original destination through the source's own pod tunnel cluster
        for name, prefix in ((names.POD_TUNNEL_CHAIN, names.OUTBOUND_POD_TUNNEL_CLUS_PREFIX),
                             (names.POD_LOCAL_TUNNEL_CHAIN, names.OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX)):
            [ch] = [c for c in listener(res, names.OUTBOUND_POD).filter_chains if c.name == name]
            [sfs, tcp] = filters(ch)
            assert isinstance(sfs, set_filter_state_pb2.Config) and isinstance(tcp, tcp_proxy_pb2.TcpProxy)
            got = {v.object_key: (v.format_string.text_format_source.inline_string, Share.Name(v.shared_with_upstream))
                   for v in sfs.on_new_connection}
            assert got == {names.TCP_PROXY_CLUSTER_STATE: (names.per_source(prefix), "NONE"),
                           "envoy.network.upstream_subject_alt_names": ("%DYNAMIC_METADATA(tunnel:identity)%", "NONE")}, name
            assert tcp.cluster == "BlackHoleCluster"  # only without a source identity
            assert tcp.tunneling_config.hostname == "%DOWNSTREAM_LOCAL_ADDRESS%"
            [log] = tcp.access_log
            fmt = unpack(log.typed_config).log_format.text_format_source.inline_string
            assert fmt.endswith(" capture outbound pod (no waypoint proxy)\n"), name


def _actions(m: matcher_pb2.Matcher) -> Iterator[matcher_pb2.Matcher.OnMatch]:
    """Every action of a matcher tree (map entries and on_no_match, at any depth)."""
    entries = [*m.matcher_tree.exact_match_map.map.values(), *m.matcher_tree.prefix_match_map.map.values()] + (
        [m.on_no_match] if m.HasField("on_no_match") else [])
    for om in entries:
        if om.HasField("matcher"):
            yield from _actions(om.matcher)
        else:
            yield om


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_matcher_action_names(flavor: Flavor) -> None:
    """Envoy picks a chain by the action's StringValue; the action's own name is a label. Stock:
    one short label (the chain's name twice was 15% of stage 2); istio-2022: the chain's name, as
    the 2022 generator emitted. Either way the StringValue names a chain of the listener."""
    from xdsserver.translate.outbound import CHAIN_ACTION

    res = golden_cluster("bookinfo", flavor).nodes["ambient-worker"]
    seen = 0
    for lis in res.listeners:
        if not lis.HasField("filter_chain_matcher"):
            continue
        chains = {ch.name for ch in lis.filter_chains}
        for om in _actions(lis.filter_chain_matcher):
            target = action_name(om)
            assert target in chains, (lis.name, target)
            assert om.action.name == (CHAIN_ACTION if flavor is Flavor.ENVOY else target), (lis.name, om.action.name)
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize("flavor", FLAVORS, ids=[f.value for f in FLAVORS])
def test_tunnel_clusters_shape(flavor: Flavor) -> None:
    res = golden_cluster("client-server", flavor).nodes["ambient-worker"]
    client = "spiffe://cluster.local/ns/ambient/sa/client"
    for name, port, header in ((f"outbound_tunnel_clus_{client}", None, False),
                               (f"outbound_pod_tunnel_clus_{client}", 15008, False),
                               (f"outbound_pod_local_tunnel_clus_{client}", 15088, True)):
        c = cluster(res, name)
        assert (c.type, c.lb_policy) == (cluster_pb2.Cluster.ORIGINAL_DST, cluster_pb2.Cluster.CLUSTER_PROVIDED)
        lb = c.original_dst_lb_config
        assert (lb.upstream_port_override.value if lb.HasField("upstream_port_override") else None) == port
        assert lb.use_http_header is header
        opts = unpack(c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"])
        assert opts.explicit_http_config.http2_protocol_options.allow_connect is True
        assert c.transport_socket.name == "envoy.transport_sockets.tls"


# ---- outbound policy ----------------------------------------------------------------------------


def test_registry_only_has_no_default_chain(tmp_path: Path) -> None:
    docs = synthetic_docs()
    allow = build(tmp_path / "allow", docs).nodes["n1"]
    assert listener(allow, "ztunnel_outbound").default_filter_chain.name == "PassthroughFilterChain"
    # stock: a known source's unknown destination is decided in stage 2
    assert listener(allow, names.OUTBOUND_DISPATCH).default_filter_chain.name == "PassthroughFilterChain"
    docs.append({"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                 "spec": {"outboundTrafficPolicy": "REGISTRY_ONLY"}})
    for node, res in build(tmp_path / "registry", docs).nodes.items():
        out = listener(res, "ztunnel_outbound")
        assert not out.HasField("default_filter_chain"), node
        stage2 = [lis for lis in res.listeners if lis.name == names.OUTBOUND_DISPATCH]
        assert len(stage2) == (1 if node in ("n1", "n2") else 0), node
        assert not [lis for lis in stage2 if lis.HasField("default_filter_chain")], node
        # stage 3 only sees mesh pod IPs: unchanged by the policy (other node via on_no_match)
        stage3 = [lis for lis in res.listeners if lis.name == names.OUTBOUND_POD]
        assert len(stage3) == len(stage2), node
        for lis in stage3:
            assert action_name(lis.filter_chain_matcher.on_no_match) == names.POD_TUNNEL_CHAIN
        assert problems(res) == []
        # unknown sources still pass through (matcher action), the chain must exist
        assert "PassthroughFilterChain" in {ch.name for ch in out.filter_chains}


def test_connect_timeout_from_mesh_config(tmp_path: Path) -> None:
    docs = synthetic_docs() + [{"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
                                "spec": {"connectTimeout": "2.5s", "trustDomain": "example.org"}}]
    d = tmp_path / "m"
    d.mkdir()
    (d / "o.yaml").write_text(yaml.safe_dump_all(docs))
    res = build_cluster(d, Flavor.ENVOY, ephemeral_certs("example.org")).nodes["n1"]
    for name in ("PassthroughCluster", "PassthroughCluster-tcp", "BlackHoleCluster"):
        assert cluster(res, name).connect_timeout.ToMilliseconds() == 2500
    assert {s.name for s in res.secrets} == {"ROOTCA", "spiffe://example.org/ns/default/sa/sa-a", "spiffe://example.org/ns/default/sa/sa-b"}
    for _, ctx in tls_contexts(res):
        assert _san_prefixes(ctx, Flavor.ENVOY) == ["spiffe://example.org/"]


def test_seed_names_read_like_2022() -> None:
    res = golden_cluster("bookinfo", Flavor.ISTIO_2022).nodes["ambient-worker2"]
    assert SERVICE_CHAIN in {c.name for c in res.clusters}
    assert SERVICE_CHAIN in {ch.name for ch in listener(res, "ztunnel_outbound").filter_chains}
    assert f"outbound_tunnel_lis_{PRODUCTPAGE}" in {lis.name for lis in res.listeners}
    assert [c.name for c in res.clusters][-5:] == ["virtual_inbound", "virtual_inbound_hbone", "PassthroughCluster",
                                                   "PassthroughCluster-tcp", "BlackHoleCluster"]
    assert [lis.name for lis in res.listeners][:3] == ["ztunnel_outbound", "ztunnel_inbound", "ztunnel_inbound_plaintext"]


def test_private_keys_only_in_secrets_and_redacted_in_dumps() -> None:
    for sc, node, flavor, res in all_golden():
        text = dump_json(render(res))
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text
        for s in res.secrets:
            if s.name != "ROOTCA":
                assert "PRIVATE KEY" in s.tls_certificate.private_key.inline_string  # the real key goes to Envoy


def test_hbone_idle_timeout_and_keepalive_come_from_mesh_config():
    """Pooled HBONE (issue 10): idle connections close after MeshConfig's hboneIdleTimeout
    (default 60 s); TCP keepalive notices a peer that vanished without FIN."""
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
    from xdsserver.sources.objects import mesh_from_spec
    from xdsserver.translate.tunnel import build_tunnel_clusters

    src = Identity("cluster.local", "default", "sleep")
    for spec, want in (({}, 60.0), ({"hboneIdleTimeout": "2.5s"}, 2.5)):
        mesh = mesh_from_spec(spec)
        assert mesh.hbone_idle_timeout_s == want
        for c in build_tunnel_clusters(src, mesh, Flavor.ENVOY):
            opts = http_protocol_options_pb2.HttpProtocolOptions()
            c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
            assert opts.common_http_protocol_options.idle_timeout.ToNanoseconds() == int(want * 1e9), c.name
            assert opts.explicit_http_config.http2_protocol_options.allow_connect
            assert c.upstream_connection_options.tcp_keepalive.keepalive_time.value == 60, c.name


def _log_prefixes(res: NodeResources) -> set[str]:
    """Every access-log prefix (the hop's name at the end of the line) on one node."""
    from envoy.extensions.access_loggers.file.v3 import file_pb2
    from xdsserver.translate.blocks import PEER_LOG_SUFFIX

    def prefix(log) -> str:
        f = file_pb2.FileAccessLog()
        log.typed_config.Unpack(f)
        return f.log_format.text_format_source.inline_string.split(PEER_LOG_SUFFIX, 1)[1].strip()

    out = set()
    for lis in res.listeners:
        out |= {prefix(a) for a in lis.access_log}
        for ch in [*lis.filter_chains, lis.default_filter_chain]:
            for f in filters(ch) if ch.filters else []:
                out |= {prefix(a) for a in getattr(f, "access_log", [])}
    return out


def _with_mesh(tmp_path: Path, spec: dict[str, Any]) -> Any:
    d = tmp_path / "manifests"
    import shutil

    shutil.copytree(GOLDEN / "client-server" / "manifests", d)
    (d / "mesh.yaml").write_text(yaml.safe_dump({"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "spec": spec}))
    return build_cluster(d, Flavor.ENVOY, certs())


def test_access_log_edges_drops_only_the_internal_hops(tmp_path):
    """MeshConfig accessLog (issue 10 cost choices): `all` (default) logs every hop, `edges`
    only where a connection enters a ztunnel (capture listener, inbound) and terminal chains."""
    internal = {"capture outbound (no waypoint proxy)", "capture outbound pod (no waypoint proxy)", "outbound tunnel"}
    edges = {"outbound capture listener", "capture inbound listener", "inbound hcm", "passthrough"}
    default = set().union(*(_log_prefixes(r) for r in _with_mesh(tmp_path / "a", {}).nodes.values()))
    assert internal | edges <= default
    trimmed = set().union(*(_log_prefixes(r) for r in _with_mesh(tmp_path / "b", {"accessLog": "edges"}).nodes.values()))
    assert edges <= trimmed and not (internal & trimmed), trimmed


def test_hbone_windows_buffers_and_keepalive_come_from_mesh_config(tmp_path):
    """Unset: the tunnel clusters advertise 2^31-1 (data integrity, issue 10), the inbound HCM
    Envoy's defaults. Set: both HBONE ends carry them."""
    from xdsserver.translate.tunnel import HBONE_WINDOW
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    spec = {"hboneStreamWindowBytes": 1 << 20, "hboneConnectionWindowBytes": 8 << 20, "bufferLimitBytes": 65536, "hboneKeepalive": "0s"}
    for cl, tuned in ((_with_mesh(tmp_path / "a", {}), False), (_with_mesh(tmp_path / "b", spec), True)):
        res = cl.nodes["ambient-worker"]
        tunnels = [c for c in res.clusters if "tunnel_clus_" in c.name]
        assert len(tunnels) == 3 * len({w.identity for w in cl.index.node_view("ambient-worker").local_workloads})
        for c in tunnels:
            opts = http_protocol_options_pb2.HttpProtocolOptions()
            c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(opts)
            h2 = opts.explicit_http_config.http2_protocol_options
            assert h2.allow_connect
            assert (h2.initial_stream_window_size.value, h2.initial_connection_window_size.value) == ((1 << 20, 8 << 20) if tuned else (HBONE_WINDOW,) * 2)
            assert c.per_connection_buffer_limit_bytes.value == (65536 if tuned else 0)
            assert c.HasField("upstream_connection_options") is not tuned  # keepalive 0s = off
        inbound = listener(res, names.ZTUNNEL_INBOUND)
        assert inbound.per_connection_buffer_limit_bytes.value == (65536 if tuned else 0)
        for ch in inbound.filter_chains:
            for f in filters(ch):
                if isinstance(f, hcm_pb2.HttpConnectionManager):
                    h2 = f.http2_protocol_options
                    assert (h2.initial_stream_window_size.value, h2.initial_connection_window_size.value) == ((1 << 20, 8 << 20) if tuned else (0, 0))


def _cla_by_copying(name: str, lis: str, target: Any, node: str) -> bytes:
    """The reference: the CLA as a message built by copying the endpoint messages in."""
    from envoy.config.endpoint.v3 import endpoint_pb2

    from xdsserver.translate import endpoints as eps

    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    cla.endpoints.add().lb_endpoints.extend(eps._lb_endpoint(lis, b, node) for b in target.backends)
    return cla.SerializeToString(deterministic=True)


def test_cla_bytes_joined_from_encoded_endpoints_equal_the_serialized_message() -> None:
    """`endpoints.cla_body` joins pre-encoded endpoints; it must be the message's deterministic
    serialization: for every golden node, a service with no backends, and mesh, plain, local
    and remote backends mixed."""
    from xdsserver.translate import endpoints as eps

    seen = 0
    for sc, node in GOLDEN_NODES:
        cl = golden_cluster(sc, Flavor.ENVOY)
        view = cl.index.node_view(node)
        for t in view.targets:
            name = names.service_port_cluster(t.port.name, t.hostname)
            variants = [t, dataclasses.replace(t, backends=()),
                        dataclasses.replace(t, backends=tuple(dataclasses.replace(b, identity=None) for b in t.backends[:1]) + t.backends)]
            for v in variants:
                body = eps.cla_body(name, names.OUTBOUND_TUNNEL_LIS, v, node)
                assert body == _cla_by_copying(name, names.OUTBOUND_TUNNEL_LIS, v, node)
                assert eps.build_cla(name, names.OUTBOUND_TUNNEL_LIS, v, node).SerializeToString(deterministic=True) == body
                shared = eps.shared_cla(name, names.OUTBOUND_TUNNEL_LIS, v, node)  # per target, patched per node
                assert eps.body_of(shared) == body == shared.SerializeToString(deterministic=True)
                seen += 1
        for cla in cl.nodes[node].endpoints:  # what the translation served: bytes known for each shared CLA
            assert eps.body_of(cla) in (None, cla.SerializeToString(deterministic=True))
    assert seen > 20


def test_pod_table_rows_encode_like_their_messages() -> None:
    """The pod tables' rows are encoded from their strings (~3x faster than copying and serializing
    a message per row); the bytes must be exactly the message's deterministic serialization, for
    any lengths (nested lengths past one varint byte included), and a table's CLA body must
    round-trip through its message unchanged."""
    from envoy.config.endpoint.v3 import endpoint_pb2

    from xdsserver import protowire
    from xdsserver.translate import podtable

    long_id = "spiffe://cluster.local/ns/" + "n" * 150 + "/sa/" + "s" * 90
    for ip, spiffe in [("10.64.1.2", "spiffe://cluster.local/ns/a/sa/b"), ("255.255.255.255", long_id),
                       ("fd00:10:244:1::9", long_id), ("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", ""), ("1.2.3.4", "x")]:
        want = protowire.field(2, podtable.row_message(ip, spiffe).SerializeToString(deterministic=True))
        assert podtable._row_field(ip, spiffe) == want, (ip, len(spiffe))
    rows = tuple((f"10.0.7.{i}", long_id if i % 2 else "spiffe://cluster.local/ns/a/sa/b") for i in range(1, 200))
    for passthrough in (True, False):
        body = podtable.cla_body("pods_10.0.7.0_24", rows, passthrough)
        assert endpoint_pb2.ClusterLoadAssignment.FromString(body).SerializeToString(deterministic=True) == body
