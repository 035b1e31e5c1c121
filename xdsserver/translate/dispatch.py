"""``ztunnel_outbound_dispatch`` and ``ztunnel_outbound_pod``: stages 2 and 3 of the stock
flavor's capture path (internal listeners).

Every connection a node-local pod makes reaches stage 2 from its source identity's chain on
``ztunnel_outbound`` (stage 1), with the original destination, the client address and the source
identity in filter state. Stage 2 matches destination IP -> port and is **the same on every
node** (built once per model, interned once by the cache):

* a service port -> its EDS cluster ``to_<port>_<host>_outbound_internal`` (one per service port,
  not per source x service port), whose endpoints go through ``outbound_tunnel_lis``;
* a mesh pod IP -> one chain per destination identity that pins the server's SPIFFE ID (D8) and
  hands the connection to stage 3;
* anything else -> passthrough (``ALLOW_ANY``) or nothing (``REGISTRY_ONLY``), as before.

Stage 3 is the only per-node part of the pod path: this node's pod IPs -> the same-node chain
(HBONE to 15088), anything else -> the other-node chain (15008). Both name the source's own
pod tunnel cluster through ``envoy.tcp_proxy.cluster``, so the client certificate stays the
source's. Per node: stage 2 = service ports + mesh identities + 1 chains, VIPs + pod IPs keys
(shared); stage 3 = 2 chains, local pod IPs keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

from ..model import Flavor, Identity, MeshConfig, OutboundPolicy
from ..model.index import NodeView, ServiceTarget, Workload
from . import blocks, names, refcheck
from .clusters import internal_upstream
from .outbound import POD_HOP_LOG, SERVICE_HOP_LOG, DestinationMap, destination_matcher, passthrough_chain, service_chain, to_chain

FLAVOR = Flavor.ENVOY  # the 2022 shape has no stage 2
# Stage 2 logs service connections once, at the listener: the same log on each of ~1,600
# service chains was 1.3 MB of every node's 4.1 MB stage 2, re-sent at every change of it. Pod-IP
# connections are logged by stage 3, as before, so the listener's log skips them.
SERVICE_CHAINS_ONLY = (
    f"xds.filter_chain_name.startsWith('{names.SERVICE_PORT_PREFIX}')"
    f" && xds.filter_chain_name.endsWith('{names.SERVICE_PORT_SUFFIX}')"
)


def pod_chain(dst: Identity) -> listener_components_pb2.FilterChain:
    """Stage 2, pod IP: expect ``dst``'s certificate on the tunnel; stage 3 picks the port."""
    name = names.dst_pod_chain(dst)
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_states(
                blocks.filter_state_value("envoy.network.upstream_subject_alt_names", dst.spiffe, share="ONCE"),  # D8
                blocks.filter_state_value("envoy.filters.listener.original_dst.local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%", share="ONCE"),
            ),
            blocks.tcp_proxy(name, names.OUTBOUND_POD, log=None, flavor=FLAVOR),
        ],
    )


def pod_tunnel_chain(*, same_node: bool, log: str | None) -> listener_components_pb2.FilterChain:
    """Stage 3: HBONE to the pod with the source's pod tunnel cluster (its client certificate)."""
    name = names.POD_LOCAL_TUNNEL_CHAIN if same_node else names.POD_TUNNEL_CHAIN
    prefix = names.OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX if same_node else names.OUTBOUND_POD_TUNNEL_CLUS_PREFIX
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_states(blocks.filter_state_value(names.TCP_PROXY_CLUSTER_STATE, names.per_source(prefix))),
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
    workloads: tuple[Workload, ...]
    mesh: MeshConfig
    listener: listener_pb2.Listener  # never mutated: nodes copy it
    # what a pod patch needs (see _patched): pod chains' identities in chain order, how many
    # workloads hold each pod IP, the VIPs (a pod IP on a VIP overrides it)
    identities: tuple[Identity, ...]
    target_keys: tuple[tuple[object, ...], ...]
    service_chains: int  # the first filter chains: one per distinct service port cluster
    ip_count: dict[str, int]
    vips: frozenset[str]


_last: list[_Shared] = []  # the latest model's (one entry)
# a change of more workloads (or service ports) than this rebuilds stage 2 (the diff would cost as much)
MAX_PATCHED_WORKLOADS = 64
patch_stats = {"patched": 0, "built": 0}  # how stage 2 was made (tests and the benchmark read it)


def plan_dispatch(targets: tuple[ServiceTarget, ...], workloads: tuple[Workload, ...]) -> tuple[dict[str, listener_components_pb2.FilterChain], DestinationMap]:
    """Chains (first seen wins) and the destination map, in the 2022 generator's order and
    precedence: first port wins on a VIP, a pod IP overrides a VIP with the same address."""
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
    pod_chains: dict[Identity, str] = {}
    for wl in workloads:
        chain = pod_chains.get(wl.identity)
        if chain is None:
            chain = pod_chains[wl.identity] = names.dst_pod_chain(wl.identity)
            chains[chain] = pod_chain(wl.identity)
        for ip in wl.pod.ips:
            dst_map[ip] = chain
    return chains, dst_map


def _identity_order(workloads: tuple[Workload, ...]) -> tuple[Identity, ...]:
    """The pod chains' order in stage 2: identities by first appearance."""
    return tuple(dict.fromkeys(wl.identity for wl in workloads))


def _target_keys(targets: tuple[ServiceTarget, ...]) -> tuple[tuple[object, ...], ...]:
    """What stage 2 reads of the targets (not their backends, which a new pod changes)."""
    return tuple((t.port.name, t.port.port, t.hostname, t.service.cluster_ips) for t in targets)


def _service_chain_names(targets: tuple[ServiceTarget, ...]) -> list[str]:
    """Stage 2's first filter chains: one per distinct service port cluster, in targets' order."""
    return list(dict.fromkeys(names.service_port_cluster(t.port.name, t.hostname) for t in targets))


def _vips(targets: tuple[ServiceTarget, ...]) -> frozenset[str]:
    return frozenset(vip for t in targets for vip in t.service.cluster_ips)


def _build(view: NodeView) -> _Shared:
    chains, dst_map = plan_dispatch(view.targets, view.workloads)
    lis = listener_pb2.Listener(
        name=names.OUTBOUND_DISPATCH,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        access_log=[blocks.access_log(log, FLAVOR, SERVICE_CHAINS_ONLY)] if (log := blocks.hop_log(view.mesh, SERVICE_HOP_LOG)) else [],
        # restore the original destination (matched below) and the client address (kept upstream)
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[*chains.values(), passthrough_chain(FLAVOR)],
    )
    matcher = destination_matcher(dst_map, flavor=FLAVOR)
    if matcher is not None:
        lis.filter_chain_matcher.CopyFrom(matcher)
    if view.mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
        lis.default_filter_chain.CopyFrom(passthrough_chain(FLAVOR))
    ip_count: dict[str, int] = {}
    for wl in view.workloads:
        for ip in wl.pod.ips:
            ip_count[ip] = ip_count.get(ip, 0) + 1
    patch_stats["built"] += 1
    return _Shared(view.targets, view.workloads, view.mesh, lis, _identity_order(view.workloads), _target_keys(view.targets),
                   len(_service_chain_names(view.targets)), ip_count, _vips(view.targets))


def _patched(prev: _Shared, view: NodeView) -> _Shared | None:
    """Stage 2 after pods alone came, went or changed (same services and mesh settings): the
    previous message copied (~3 ms at 10k pods) and only the changed pod IPs' keys set or
    removed, instead of planning and building ~10k keys again (~60 ms). None (build in full)
    whenever the result might differ from :func:`_build`'s: many workloads changed, a pod
    identity came, went or moved in the chains' order, or a changed IP is a VIP or held by
    another workload too (precedence)."""
    if prev.mesh != view.mesh or not prev.listener.HasField("filter_chain_matcher"):
        return None
    if prev.targets is not view.targets:
        keys = _target_keys(view.targets)
        if keys != prev.target_keys:
            return _services_patched(prev, view, keys)
    old_ids = {id(wl) for wl in prev.workloads}
    new_ids = {id(wl) for wl in view.workloads}
    added = [wl for wl in view.workloads if id(wl) not in old_ids]
    removed = [wl for wl in prev.workloads if id(wl) not in new_ids]
    if len(added) + len(removed) > MAX_PATCHED_WORKLOADS:
        return None
    order = _identity_order(view.workloads)
    if order != prev.identities:  # the pod chains themselves would change
        return None
    ip_count = dict(prev.ip_count)
    for wl in removed:
        for ip in wl.pod.ips:
            ip_count[ip] -= 1
            if not ip_count[ip]:
                del ip_count[ip]
    for wl in added:
        for ip in wl.pod.ips:
            ip_count[ip] = ip_count.get(ip, 0) + 1
    touched = {ip for wl in (*added, *removed) for ip in wl.pod.ips}
    if any(ip in prev.vips or prev.ip_count.get(ip, 0) > 1 or ip_count.get(ip, 0) > 1 for ip in touched):
        return None
    lis = listener_pb2.Listener()
    lis.CopyFrom(prev.listener)
    keys = lis.filter_chain_matcher.matcher_tree.exact_match_map.map
    for wl in removed:
        for ip in wl.pod.ips:
            del keys[ip]
    for wl in added:
        action = to_chain(names.dst_pod_chain(wl.identity), FLAVOR)
        for ip in wl.pod.ips:
            keys[ip].CopyFrom(action)
    if not keys:  # an empty map is invalid in Envoy: _build leaves the matcher out
        return None
    refcheck.inherit_listener_facts(lis, prev.listener)  # same chains; every new key names one of them
    patch_stats["patched"] += 1
    return replace(prev, targets=view.targets, workloads=view.workloads, listener=lis, ip_count=ip_count)


def _services_patched(prev: _Shared, view: NodeView, keys: tuple[tuple[object, ...], ...]) -> _Shared | None:
    """Stage 2 after Services or ports alone came, went or changed (the very same workloads):
    the previous message copied, its service chains re-listed in the targets' order (unchanged
    ones copied from it, not rebuilt) and only the VIP keys of the changed targets re-derived.
    None (build in full) if workloads changed too, many targets changed, or a changed VIP is
    also a pod IP (precedence)."""
    if prev.workloads is not view.workloads:
        return None
    old_keys, new_keys = set(prev.target_keys), set(keys)
    changed = old_keys ^ new_keys
    if len(changed) > MAX_PATCHED_WORKLOADS:
        return None
    vips = {vip for k in changed for vip in k[3]}  # type: ignore[attr-defined]
    if any(vip in prev.ip_count for vip in vips):
        return None
    lis = listener_pb2.Listener()
    lis.CopyFrom(prev.listener)
    chains = list(prev.listener.filter_chains)
    have = {fc.name: fc for fc in chains[:prev.service_chains]}
    service_names = _service_chain_names(view.targets)
    rest = chains[prev.service_chains:]  # pod chains, then passthrough
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
    if not dst:
        return None
    patch_stats["patched"] += 1
    return replace(prev, targets=view.targets, listener=lis, target_keys=keys, service_chains=len(service_names),
                   vips=_vips(view.targets))


def _shared(view: NodeView) -> listener_pb2.Listener:
    for s in _last:
        if s.targets is view.targets and s.workloads is view.workloads and s.mesh == view.mesh:
            return s.listener
    shared = (_patched(_last[0], view) if _last else None) or _build(view)
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


def _internal_cluster(listener: str) -> cluster_pb2.Cluster:
    """A STATIC cluster with one internal endpoint: hand the connection (and the filter state
    shared with it) to ``listener``."""
    endpoint = ec.LbEndpoint(
        endpoint=ec.Endpoint(address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name=listener)))
    )
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=listener, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=[endpoint])])
    return cluster_pb2.Cluster(name=listener, type=cluster_pb2.Cluster.STATIC, load_assignment=cla, transport_socket=internal_upstream())


def build_stage_clusters() -> list[cluster_pb2.Cluster]:
    """Stage 1 -> stage 2, stage 2 -> stage 3."""
    return [_internal_cluster(names.OUTBOUND_DISPATCH), _internal_cluster(names.OUTBOUND_POD)]
