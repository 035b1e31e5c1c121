"""``ztunnel_outbound`` (:15001): the capture listener.

Stock flavor (stage 1 of a linear layout; the README's performance section has the why): the
matcher is port -> source IP only. Each node-local source identity has one chain that records the
original destination, the client address and the source identity in filter state and hands the
connection to the internal listener ``ztunnel_outbound_dispatch`` (stage 2, ``dispatch.py``), where
destination IP -> port picks a chain shared by every source. Config grows with
local pods + services + workloads, not with their product.

istio-2022 flavor: the 2022 shape, ztunnel-config.md §4.1-4.3 with D1-D5/D8: source -> destination
-> port, chains per (source identity x service port) and per (source identity, destination
identity) for pod IPs, so each can pin the expected server SPIFFE ID.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import wrappers_pb2

from xds.core.v3 import extension_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from xds.type.matcher.v3 import matcher_pb2

from ..model import Flavor, Identity, OutboundPolicy, ports
from ..model.index import NodeView, Workload
from . import blocks, names

Matcher = matcher_pb2.Matcher
OnMatch = matcher_pb2.Matcher.OnMatch

CLIENT_IP_ANY_PORT = "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%:0"
ECDS_WORKLOAD_METADATA_TYPE = "type.googleapis.com/istio.telemetry.workloadmetadata.v1.WorkloadMetadataResources"


def _input(kind: str) -> extension_pb2.TypedExtensionConfig:
    msg = {
        "port": network_inputs_pb2.DestinationPortInput(),
        "ip": network_inputs_pb2.DestinationIPInput(),
        "source-ip": network_inputs_pb2.SourceIPInput(),
    }[kind]
    return extension_pb2.TypedExtensionConfig(name=kind, typed_config=blocks.pack(msg))


# Stock flavor: the name of every matcher action. Envoy picks the chain by the action's
# StringValue alone (the extension's name is a label), and repeating the chain's name there was
# 15% of stage 2 (~10,000 pod IPs x ~60 bytes, on every node, at every change of stage 2).
# istio-2022 keeps the 2022 shape (the chain's name).
CHAIN_ACTION = "fc"


def to_chain(name: str, flavor: Flavor = Flavor.ISTIO_2022) -> OnMatch:
    label = CHAIN_ACTION if flavor is Flavor.ENVOY else name
    return OnMatch(action=extension_pb2.TypedExtensionConfig(name=label, typed_config=blocks.pack(wrappers_pb2.StringValue(value=name))))


def _map_matcher(kind: str, entries: dict[str, OnMatch], on_no_match: OnMatch | None = None) -> Matcher:
    m = Matcher(matcher_tree=Matcher.MatcherTree(input=_input(kind)))
    for key in entries:  # insertion order = rule order; proto maps serialize sorted (deterministic)
        m.matcher_tree.exact_match_map.map[key].CopyFrom(entries[key])
    if on_no_match is not None:
        m.on_no_match.CopyFrom(on_no_match)
    return m


def prefix_matcher(kind: str, entries: dict[str, OnMatch]) -> Matcher:
    """A string-prefix map (the longest listed prefix of the input wins; stage 2's pod ranges)."""
    m = Matcher(matcher_tree=Matcher.MatcherTree(input=_input(kind)))
    for key in entries:
        m.matcher_tree.prefix_match_map.map[key].CopyFrom(entries[key])
    return m


DestinationMap = dict[str, "str | dict[str, str]"]  # destination IP -> chain, or port -> chain


@dataclass
class OutboundPlan:
    """The chains and matcher entries for one node, before they become protos."""

    chains: dict[str, listener_components_pb2.FilterChain] = field(default_factory=dict)  # first seen wins
    # source IP -> destination key -> either a chain name or {port: chain name} (istio-2022), or
    # source IP -> chain name (stock flavor, stage 1)
    sources: dict[str, DestinationMap | str] = field(default_factory=dict)



SERVICE_HOP_LOG = "capture outbound (no waypoint proxy)"
POD_HOP_LOG = "capture outbound pod (no waypoint proxy)"


def service_chain(cluster: str, flavor: Flavor, log: str | None = SERVICE_HOP_LOG) -> listener_components_pb2.FilterChain:
    """A service chain, named like its cluster: per service port in stage 2 (stock), per
    (source identity x service port) in istio-2022."""
    return listener_components_pb2.FilterChain(
        name=cluster, filters=[blocks.tcp_proxy(cluster, cluster, log=log, flavor=flavor)]
    )


def pod_chain(cluster: str, dst: Identity, flavor: Flavor) -> listener_components_pb2.FilterChain:
    name = names.pod_chain(cluster, dst)
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_state("envoy.network.upstream_subject_alt_names", dst.spiffe),  # D8
            blocks.tcp_proxy(
                name,
                cluster,
                log=POD_HOP_LOG,
                flavor=flavor,
                tunnel_hostname="%DOWNSTREAM_LOCAL_ADDRESS%",
            ),
        ],
    )


def source_chain(src: Identity) -> listener_components_pb2.FilterChain:
    """Stage 1: remember what stage 2 and the tunnel need, then go to stage 2."""
    name = names.source_chain(src)
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_states(
                # stage 2 matches on the original destination (its original_dst restores it) ...
                blocks.filter_state_value("envoy.filters.listener.original_dst.local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%", share="ONCE"),
                # ... and looks a pod IP up in the pod table by it (the hop's PROXY-protocol TLV; podtable.py)
                blocks.filter_state_value(names.DESTINATION_IP_STATE, "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", share="ONCE",
                                          factory_key="envoy.string"),
                # ... and every later hop leaves with the client's IP (stock-envoy.md §5.6). Port 0,
                # not the client's port: objects shared with upstream are part of Envoy's connection
                # pool key, so ip:port gave every client connection its own HBONE connection
                # (original_src binds the IP only; the server still sees the client pod's IP).
                blocks.filter_state_value("envoy.filters.listener.original_dst.remote_ip", CLIENT_IP_ANY_PORT, share="TRANSITIVE"),
                # which client certificate: names.per_source turns it into the tunnel cluster
                blocks.filter_state_value(names.SOURCE_IDENTITY_STATE, src.spiffe, share="TRANSITIVE", factory_key="envoy.string"),
            ),
            blocks.tcp_proxy(name, names.OUTBOUND_DISPATCH, log=None, flavor=Flavor.ENVOY),
        ],
    )


def plan_sources(view: NodeView) -> OutboundPlan:
    """Stock flavor: local pod IP -> its identity's chain."""
    plan = OutboundPlan()
    for src in view.local_workloads:
        chain = names.source_chain(src.identity)
        plan.chains.setdefault(chain, source_chain(src.identity))
        for ip in src.pod.ips:
            plan.sources[ip] = chain
    return plan


def plan_outbound(view: NodeView, flavor: Flavor) -> OutboundPlan:
    """istio-2022 flavor: the per-source destination maps."""
    plan = OutboundPlan()
    for src in view.local_workloads:
        dst_map: dict[str, str | dict[str, str]] = {}
        for t in view.targets:
            chain = names.service_cluster(src.identity, t.port.name, t.hostname)
            plan.chains.setdefault(chain, service_chain(chain, flavor))
            for vip in t.service.cluster_ips:
                entry = dst_map.get(vip)
                if not isinstance(entry, dict):
                    entry = dst_map[vip] = {}
                entry.setdefault(str(t.port.port), chain)  # TCP/UDP dupes were skipped (D5); first port wins
        for wl in view.workloads:
            cluster = _pod_cluster(src.identity, wl, view.node_name)
            chain = names.pod_chain(cluster, wl.identity)
            plan.chains.setdefault(chain, pod_chain(cluster, wl.identity, flavor))
            for ip in wl.pod.ips:
                dst_map[ip] = chain  # last write wins over a VIP with the same address (2022)
        for ip in src.pod.ips:
            plan.sources[ip] = dst_map
    return plan


def _pod_cluster(src: Identity, dst: Workload, node_name: str) -> str:
    if dst.node_name and dst.node_name == node_name:
        return names.outbound_pod_local_tunnel_clus(src)
    return names.outbound_pod_tunnel_clus(src)


def destination_matcher(dst_map: DestinationMap, actions: dict[str, OnMatch] | None = None, flavor: Flavor = Flavor.ISTIO_2022) -> Matcher | None:
    """destination IP -> chain or (port -> chain); None when nothing is left to match.
    ``actions`` memoizes one action per chain (many keys share a chain; entries are copied)."""
    actions = {} if actions is None else actions

    def action(chain: str) -> OnMatch:
        a = actions.get(chain)
        if a is None:
            a = actions[chain] = to_chain(chain, flavor)
        return a

    dst_entries: dict[str, OnMatch] = {}
    for dst, target in dst_map.items():
        if isinstance(target, str):
            dst_entries[dst] = action(target)
        elif target:  # an empty PORT map is invalid in Envoy (§11): drop the key
            dst_entries[dst] = OnMatch(matcher=_map_matcher("port", {p: action(c) for p, c in target.items()}))
    return _map_matcher("ip", dst_entries) if dst_entries else None


def build_matcher(plan: OutboundPlan, flavor: Flavor) -> Matcher:
    src_entries: dict[str, OnMatch] = {}
    actions: dict[str, OnMatch] = {}
    for src_ip, target in plan.sources.items():
        if isinstance(target, str):
            src_entries[src_ip] = to_chain(target, flavor)
        elif (dst := destination_matcher(target, actions, flavor)) is not None:
            src_entries[src_ip] = OnMatch(matcher=dst)
    passthrough = to_chain(names.PASSTHROUGH_CHAIN, flavor)
    below = OnMatch(matcher=_map_matcher("source-ip", src_entries, passthrough)) if src_entries else passthrough
    return _map_matcher("port", {str(ports.OUTBOUND_CAPTURE_PORT): to_chain(names.BLACKHOLE_OUTBOUND_CHAIN, flavor)}, below)


def passthrough_chain(flavor: Flavor) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(
        name=names.PASSTHROUGH_CHAIN,
        filters=[blocks.tcp_proxy(names.PASSTHROUGH_CLUSTER, names.PASSTHROUGH_CLUSTER, log="passthrough", flavor=flavor)],
    )


def build_ztunnel_outbound(view: NodeView, flavor: Flavor) -> listener_pb2.Listener:
    plan = plan_sources(view) if flavor is Flavor.ENVOY else plan_outbound(view, flavor)
    passthrough = passthrough_chain(flavor)
    blackhole = listener_components_pb2.FilterChain(
        name=names.BLACKHOLE_OUTBOUND_CHAIN,
        # D2: the chain keeps its 2022 name and stat, but points at a cluster that exists
        filters=[blocks.tcp_proxy(names.BLACKHOLE_CLUSTER, names.BLACKHOLE_CLUSTER, log="blackhole outbound", flavor=flavor)],
    )
    lis = listener_pb2.Listener(
        name=names.ZTUNNEL_OUTBOUND,
        address=blocks.socket_address("0.0.0.0", ports.OUTBOUND_CAPTURE_PORT),
        access_log=[blocks.access_log("outbound capture listener", flavor)],
        socket_options=[blocks.socket_mark(ports.OUTBOUND_LISTENER_MARK, "outbound")],
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[*plan.chains.values(), passthrough, blackhole],
        filter_chain_matcher=build_matcher(plan, flavor),
    )
    lis.use_original_dst.value = True
    lis.transparent.value = True
    if flavor is Flavor.ISTIO_2022:
        lis.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.workload_metadata",
                config_discovery=config_source_pb2.ExtensionConfigSource(
                    config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), initial_fetch_timeout=blocks.seconds(30)),
                    type_urls=[ECDS_WORKLOAD_METADATA_TYPE],
                ),
            )
        )
    if view.mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
        lis.default_filter_chain.CopyFrom(passthrough)
    return lis
