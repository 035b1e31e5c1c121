"""``ztunnel_outbound_dispatch`` and ``ztunnel_outbound_pod``: stages 2 and 3 of the stock
flavor's capture path (internal listeners).

Every connection a node-local pod makes reaches stage 2 from its source identity's chain on
``ztunnel_outbound`` (stage 1), with the original destination, the client address and the source
identity in filter state, and the destination IP in the hop's PROXY-protocol header. Stage 2
matches destination IP -> port and is **the same on every node** (built once per model, interned
once by the cache):

* a service port -> its EDS cluster ``to_<port>_<host>_outbound_internal`` (one per service port,
  not per source x service port), whose endpoints go through ``outbound_tunnel_lis``;
* an address in an IPv4 /24 holding mesh pods (a string-prefix key, after the exact VIP keys) ->
  that range's pod table (``podtable.py``): the subset load balancer picks the pod's endpoint,
  stage 3, which pins the pod identity's SPIFFE ID (D8) from the endpoint's metadata;
* anything else -> passthrough (``ALLOW_ANY``) or nothing (``REGISTRY_ONLY``), as before.

Stage 3 is the only per-node part of the pod path: this node's pod IPs -> the same-node chain
(HBONE to 15088), anything else -> the other-node chain (15008). Both name the source's own
pod tunnel cluster through ``envoy.tcp_proxy.cluster``, so the client certificate stays the
source's. Per node: stage 2 = service ports + pod ranges + 1 chains, VIPs + pod ranges keys
(shared); stage 3 = 2 chains, local pod IPs keys. A pod added or removed changes stage 2 only
when its /24 gains its first or loses its last mesh pod.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, proxy_protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.proxy_protocol.v3 import proxy_protocol_pb2 as proxy_protocol_filter_pb2
from envoy.extensions.transport_sockets.proxy_protocol.v3 import upstream_proxy_protocol_pb2
from xds.type.matcher.v3 import matcher_pb2

from ..model import Flavor, MeshConfig, OutboundPolicy, is_ipv6
from ..model.index import NodeView, ServiceTarget
from . import blocks, names
from .clusters import internal_upstream
from .outbound import (POD_HOP_LOG, SERVICE_HOP_LOG, DestinationMap, destination_matcher, passthrough_chain, prefix_matcher,
                       service_chain, to_chain)
from .podtable import TLV_DESTINATION_IP, PodTable, group_of, pod_table

FLAVOR = Flavor.ENVOY  # the 2022 shape has no stage 2
# Stage 2 logs service connections once, at the listener: the same log on each of ~1,600
# service chains was 1.3 MB of every node's 4.1 MB stage 2, re-sent at every change of it. Pod-IP
# connections are logged by stage 3, as before, so the listener's log skips them.
SERVICE_CHAINS_ONLY = (
    f"xds.filter_chain_name.startsWith('{names.SERVICE_PORT_PREFIX}')"
    f" && xds.filter_chain_name.endsWith('{names.SERVICE_PORT_SUFFIX}')"
)


def range_chain(table: str) -> listener_components_pb2.FilterChain:
    """Stage 2, an address in a mesh pod range: its pod table picks the pod (stage 3 by
    ``endpoint_id``, with the identity to pin), or the default subset (passthrough)."""
    return listener_components_pb2.FilterChain(
        name=table,
        filters=[
            blocks.set_filter_states(
                blocks.filter_state_value("envoy.filters.listener.original_dst.local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%", share="ONCE"),
            ),
            blocks.tcp_proxy(table, table, log=None, flavor=FLAVOR),
        ],
    )


def pod_tunnel_chain(*, same_node: bool, log: str | None) -> listener_components_pb2.FilterChain:
    """Stage 3: HBONE to the pod with the source's pod tunnel cluster (its client certificate)."""
    name = names.POD_LOCAL_TUNNEL_CHAIN if same_node else names.POD_TUNNEL_CHAIN
    prefix = names.OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX if same_node else names.OUTBOUND_POD_TUNNEL_CLUS_PREFIX
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_states(
                # D8: the pod table's endpoint named the identity the pod must present
                blocks.filter_state_value("envoy.network.upstream_subject_alt_names", "%DYNAMIC_METADATA(tunnel:identity)%"),
                blocks.filter_state_value(names.TCP_PROXY_CLUSTER_STATE, names.per_source(prefix)),
            ),
            blocks.tcp_proxy(
                name,
                names.BLACKHOLE_CLUSTER,  # only if the source identity is missing
                log=log,
                flavor=FLAVOR,
                tunnel_hostname="%DOWNSTREAM_LOCAL_ADDRESS%",
            ),
        ],
    )


@dataclass(frozen=True)
class _Shared:
    """Stage 2, built once per model (keyed on the index's own tuples) and handed to every node."""

    targets: tuple[ServiceTarget, ...]
    table: PodTable
    table_key: tuple[object, ...]  # what stage 2 read of the table (PodTable.stage2_key)
    mesh: MeshConfig
    listener: listener_pb2.Listener  # never mutated: nodes copy it
    # what a Services patch needs (see _services_patched)
    target_keys: tuple[tuple[object, ...], ...]
    service_chains: int  # the first filter chains: one per distinct service port cluster
    vips: frozenset[str]


_last: list[_Shared] = []  # the latest model's (one entry)
# a change of more service ports than this rebuilds stage 2 (the diff would cost as much)
MAX_PATCHED_TARGETS = 64
patch_stats = {"patched": 0, "built": 0, "kept": 0}  # how stage 2 was made (tests and the benchmark read it)


def plan_dispatch(targets: tuple[ServiceTarget, ...], table: PodTable) -> tuple[dict[str, listener_components_pb2.FilterChain], DestinationMap, dict[str, str]]:
    """Chains (first seen wins), the exact destination map and the /24 prefix map, in the 2022
    generator's precedence: first port wins on a VIP, a pod IP overrides a VIP with the same
    address (it keeps an exact key, to its range's chain, as IPv6 pod IPs do)."""
    chains: dict[str, listener_components_pb2.FilterChain] = {}
    dst_map: DestinationMap = {}
    for t in targets:
        chain = names.service_port_cluster(t.port.name, t.hostname)
        if chain not in chains:
            chains[chain] = service_chain(chain, FLAVOR, log=None)  # logged by the listener: SERVICE_CHAINS_ONLY
        for vip in t.service.cluster_ips:
            entry = dst_map.get(vip)
            if not isinstance(entry, dict):
                entry = dst_map[vip] = {}
            entry.setdefault(str(t.port.port), chain)
    prefixes: dict[str, str] = {}
    for g in table.groups:
        chains[g.name] = range_chain(g.name)
        if g.prefix:
            prefixes[g.prefix] = g.name
    for ip in table.ipv6:
        dst_map[ip] = names.pod_table("")
    for vip in [v for v in dst_map if v in table.ips and not is_ipv6(v)]:
        dst_map[vip] = names.pod_table(group_of(vip))
    return chains, dst_map, prefixes


def _matcher(dst_map: DestinationMap, prefixes: dict[str, str]) -> matcher_pb2.Matcher | None:
    """Exact destination keys first; an address with none falls to the /24 string prefixes
    (``DestinationIPInput`` is text: "10.64.50." covers that /24 and nothing else)."""
    matcher = destination_matcher(dst_map, flavor=FLAVOR)
    if not prefixes:
        return matcher
    ranges = prefix_matcher("ip", {prefix: to_chain(chain, FLAVOR) for prefix, chain in prefixes.items()})
    if matcher is None:
        return ranges
    matcher.on_no_match.matcher.CopyFrom(ranges)
    return matcher


def _target_keys(targets: tuple[ServiceTarget, ...]) -> tuple[tuple[object, ...], ...]:
    """What stage 2 reads of the targets (not their backends, which a new pod changes)."""
    return tuple((t.port.name, t.port.port, t.hostname, t.service.cluster_ips) for t in targets)


def _service_chain_names(targets: tuple[ServiceTarget, ...]) -> list[str]:
    """Stage 2's first filter chains: one per distinct service port cluster, in targets' order."""
    return list(dict.fromkeys(names.service_port_cluster(t.port.name, t.hostname) for t in targets))


def _vips(targets: tuple[ServiceTarget, ...]) -> frozenset[str]:
    return frozenset(vip for t in targets for vip in t.service.cluster_ips)


def proxy_protocol_filter() -> listener_components_pb2.ListenerFilter:
    """Stage 2: the hop's TLV (the destination IP) -> ``envoy.lb`` metadata ``ip``, the pod
    tables' subset key. Runs before original_dst, which then restores the addresses from filter
    state as before (the header's client port is not kept: see CLIENT_IP_ANY_PORT)."""
    rule = proxy_protocol_filter_pb2.ProxyProtocol.Rule(
        tlv_type=TLV_DESTINATION_IP,
        on_tlv_present=proxy_protocol_filter_pb2.ProxyProtocol.KeyValuePair(metadata_namespace=names.LB_METADATA, key="ip"),
    )
    cfg = proxy_protocol_filter_pb2.ProxyProtocol(rules=[rule], stat_prefix="stage2")
    return listener_components_pb2.ListenerFilter(name="envoy.filters.listener.proxy_protocol", typed_config=blocks.pack(cfg))


def _build(view: NodeView, table: PodTable) -> _Shared:
    chains, dst_map, prefixes = plan_dispatch(view.targets, table)
    lis = listener_pb2.Listener(
        name=names.OUTBOUND_DISPATCH,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        access_log=[blocks.access_log(log, FLAVOR, SERVICE_CHAINS_ONLY)] if (log := blocks.hop_log(view.mesh, SERVICE_HOP_LOG)) else [],
        # the pod-table key from the hop's header, then the original destination (matched below)
        # and the client address (kept upstream)
        listener_filters=[proxy_protocol_filter(), blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[*chains.values(), passthrough_chain(FLAVOR)],
    )
    matcher = _matcher(dst_map, prefixes)
    if matcher is not None:
        lis.filter_chain_matcher.CopyFrom(matcher)
    if view.mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
        lis.default_filter_chain.CopyFrom(passthrough_chain(FLAVOR))
    patch_stats["built"] += 1
    return _Shared(view.targets, table, table.stage2_key, view.mesh, lis, _target_keys(view.targets),
                   len(_service_chain_names(view.targets)), _vips(view.targets))


def _collisions(table: PodTable, vips: frozenset[str]) -> frozenset[str]:
    """Pod IPs that are also VIPs (they keep exact keys to their range's chain)."""
    return frozenset(ip for ip in vips if ip in table.ips)


def _services_patched(prev: _Shared, view: NodeView, table: PodTable, keys: tuple[tuple[object, ...], ...]) -> _Shared | None:
    """Stage 2 after Services or ports alone came, went or changed (the same pod ranges): the
    previous message copied, its service chains re-listed in the targets' order (unchanged
    ones copied from it, not rebuilt) and only the VIP keys of the changed targets re-derived.
    None (build in full) if many targets changed or a changed VIP is also a pod IP (precedence)."""
    old_keys, new_keys = set(prev.target_keys), set(keys)
    changed = old_keys ^ new_keys
    if len(changed) > MAX_PATCHED_TARGETS:
        return None
    vips = {vip for k in changed for vip in k[3]}  # type: ignore[attr-defined]
    if any(vip in table.ips or vip in prev.table.ips for vip in vips):
        return None
    lis = listener_pb2.Listener()
    lis.CopyFrom(prev.listener)
    chains = list(prev.listener.filter_chains)
    have = {fc.name: fc for fc in chains[:prev.service_chains]}
    service_names = _service_chain_names(view.targets)
    rest = chains[prev.service_chains:]  # range chains, then passthrough
    del lis.filter_chains[:]
    lis.filter_chains.extend([have[n] if n in have else service_chain(n, FLAVOR, log=None) for n in service_names] + rest)
    entries: dict[str, dict[str, str]] = {vip: {} for vip in vips}
    for t in view.targets:  # as plan_dispatch: the first port wins on a VIP
        for vip in t.service.cluster_ips:
            if vip in entries:
                entries[vip].setdefault(str(t.port.port), names.service_port_cluster(t.port.name, t.hostname))
    dst = lis.filter_chain_matcher.matcher_tree.exact_match_map.map
    for vip in sorted(vips):
        if vip in dst:
            del dst[vip]
        one = destination_matcher({vip: entries[vip]}, flavor=FLAVOR)  # None for an empty PORT map (invalid in Envoy)
        if one is not None:
            dst[vip].CopyFrom(one.matcher_tree.exact_match_map.map[vip])
    if not dst:  # an empty map is invalid in Envoy: _build leaves the exact level out
        return None
    patch_stats["patched"] += 1
    return replace(prev, targets=view.targets, table=table, listener=lis, target_keys=keys,
                   service_chains=len(service_names), vips=_vips(view.targets))


def _shared(view: NodeView) -> listener_pb2.Listener:
    table = pod_table(view.workloads, view.mesh)
    prev = _last[0] if _last else None
    if prev is not None and prev.mesh == view.mesh and prev.table_key == table.stage2_key:
        if prev.targets is view.targets and prev.table is table:
            return prev.listener
        if prev.targets is view.targets or (keys := _target_keys(view.targets)) == prev.target_keys:
            # the same keys and chains (pods moved within their ranges, or services' backends changed)
            if _collisions(table, prev.vips) == _collisions(prev.table, prev.vips):
                patch_stats["kept"] += 1
                _last[:] = [replace(prev, targets=view.targets, table=table)]
                return prev.listener
        elif prev.listener.filter_chain_matcher.matcher_tree.HasField("exact_match_map"):
            shared = _services_patched(prev, view, table, keys)
            if shared is not None:
                _last[:] = [shared]
                return shared.listener
    shared = _build(view, table)
    _last[:] = [shared]
    return shared.listener


def build_dispatch_listener(view: NodeView) -> listener_pb2.Listener:
    """Stage 2: the same message on every node of one model (never mutate it)."""
    return _shared(view)


def build_pod_listener(view: NodeView) -> listener_pb2.Listener:
    """Stage 3: this node's pod IPs go to the same-node chain, the rest to the other-node one."""
    log = blocks.hop_log(view.mesh, POD_HOP_LOG)
    local, remote = pod_tunnel_chain(same_node=True, log=log), pod_tunnel_chain(same_node=False, log=log)
    keys = {ip: local.name for wl in view.local_workloads for ip in wl.pod.ips}
    lis = listener_pb2.Listener(
        name=names.OUTBOUND_POD,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[remote, local],
    )
    matcher = destination_matcher(keys, flavor=FLAVOR)
    if matcher is not None:
        matcher.on_no_match.CopyFrom(to_chain(remote.name, FLAVOR))
        lis.filter_chain_matcher.CopyFrom(matcher)
    else:
        lis.default_filter_chain.CopyFrom(remote)
    return lis


def _proxy_protocol_upstream() -> base_pb2.TransportSocket:
    """Stage 1 -> stage 2: a PROXY v2 header whose TLV carries the destination IP stage 1 shared
    (the pod-table key; podtable.py), over the internal connection. Filter state shared with the
    upstream still crosses (the header is only bytes on the internal stream)."""
    tlv = proxy_protocol_pb2.TlvEntry(type=TLV_DESTINATION_IP)
    tlv.format_string.text_format_source.inline_string = f"%FILTER_STATE({names.DESTINATION_IP_STATE}:PLAIN)%"
    cfg = upstream_proxy_protocol_pb2.ProxyProtocolUpstreamTransport(
        config=proxy_protocol_pb2.ProxyProtocolConfig(version=proxy_protocol_pb2.ProxyProtocolConfig.V2, added_tlvs=[tlv]),
        transport_socket=internal_upstream(),
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.upstream_proxy_protocol", typed_config=blocks.pack(cfg))


def build_stage_clusters() -> list[cluster_pb2.Cluster]:
    """Stage 1 -> stage 2 (a STATIC cluster with one internal endpoint; stage 2 reaches stage 3
    through the pod tables' endpoints)."""
    listener = names.OUTBOUND_DISPATCH
    endpoint = ec.LbEndpoint(
        endpoint=ec.Endpoint(address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name=listener)))
    )
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=listener, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=[endpoint])])
    return [cluster_pb2.Cluster(name=listener, type=cluster_pb2.Cluster.STATIC, load_assignment=cla, transport_socket=_proxy_protocol_upstream())]
