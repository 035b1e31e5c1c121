"""``ztunnel_outbound_dispatch``: stage 2 of the stock flavor's capture path (internal listener).

Every connection a node-local pod makes reaches it from its source identity's chain on
``ztunnel_outbound`` (stage 1), with the original destination, the client address and the source
identity in filter state. Here destination IP -> port picks a chain shared by every source:

* a service port -> its EDS cluster ``to_<port>_<host>_outbound_internal`` (one per service port,
  not per source x service port), whose endpoints go through ``outbound_tunnel_lis``;
* a mesh pod IP -> one chain per destination identity and same/other node, which pins the
  server's SPIFFE ID (D8) and names the source's own pod tunnel cluster through
  ``envoy.tcp_proxy.cluster`` (so the client certificate stays the source's);
* anything else -> passthrough (``ALLOW_ANY``) or nothing (``REGISTRY_ONLY``), as before.

Per node: chains = service ports + identities with a mesh pod + identities with a pod on this
node + passthrough; matcher keys = VIPs + pod IPs. All but the last two terms are the same on
every node, so that part is built once per model and copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

from ..model import Flavor, Identity, MeshConfig, OutboundPolicy
from ..model.index import NodeView, ServiceTarget, Workload
from . import blocks, names
from .clusters import internal_upstream
from .outbound import DestinationMap, OnMatch, destination_matcher, passthrough_chain, to_chain

FLAVOR = Flavor.ENVOY  # the 2022 shape has no stage 2


def service_chain(cluster: str) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(
        name=cluster, filters=[blocks.tcp_proxy(cluster, cluster, log="capture outbound (no waypoint proxy)", flavor=FLAVOR)]
    )


def pod_chain(dst: Identity, *, same_node: bool) -> listener_components_pb2.FilterChain:
    name = names.dst_pod_chain(dst, same_node=same_node)
    prefix = names.OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX if same_node else names.OUTBOUND_POD_TUNNEL_CLUS_PREFIX
    return listener_components_pb2.FilterChain(
        name=name,
        filters=[
            blocks.set_filter_states(
                blocks.filter_state_value("envoy.network.upstream_subject_alt_names", dst.spiffe),  # D8
                blocks.filter_state_value(names.TCP_PROXY_CLUSTER_STATE, names.per_source(prefix)),
            ),
            blocks.tcp_proxy(
                name,
                names.BLACKHOLE_CLUSTER,  # only if the source identity is missing
                log="capture outbound pod (no waypoint proxy)",
                flavor=FLAVOR,
                tunnel_hostname="%DOWNSTREAM_LOCAL_ADDRESS%",
            ),
        ],
    )


@dataclass(frozen=True)
class _Shared:
    """The part of stage 2 every node has: service chains and, for every identity with a mesh
    pod, its other-node pod chain, with every VIP and pod IP keyed. Built once per model (keyed
    on the index's own tuples) and copied per node, which then re-keys only its own pods."""

    targets: tuple[ServiceTarget, ...]
    workloads: tuple[Workload, ...]
    mesh: MeshConfig
    listener: listener_pb2.Listener  # never mutated: nodes copy it


_last: list[_Shared] = []  # the latest model's (one entry)


def plan_dispatch(targets: tuple[ServiceTarget, ...], workloads: tuple[Workload, ...]) -> tuple[dict[str, listener_components_pb2.FilterChain], DestinationMap]:
    """Chains (first seen wins) and the destination map seen from a node with no pods, in the
    2022 generator's order and precedence: first port wins on a VIP, a pod IP overrides a VIP
    with the same address."""
    chains: dict[str, listener_components_pb2.FilterChain] = {}
    dst_map: DestinationMap = {}
    for t in targets:
        chain = names.service_port_cluster(t.port.name, t.hostname)
        if chain not in chains:
            chains[chain] = service_chain(chain)
        for vip in t.service.cluster_ips:
            entry = dst_map.get(vip)
            if not isinstance(entry, dict):
                entry = dst_map[vip] = {}
            entry.setdefault(str(t.port.port), chain)
    pod_chains: dict[Identity, str] = {}
    for wl in workloads:
        chain = pod_chains.get(wl.identity)
        if chain is None:
            chain = pod_chains[wl.identity] = names.dst_pod_chain(wl.identity, same_node=False)
            chains[chain] = pod_chain(wl.identity, same_node=False)
        for ip in wl.pod.ips:
            dst_map[ip] = chain
    return chains, dst_map


def _shared(view: NodeView) -> listener_pb2.Listener:
    for s in _last:
        if s.targets is view.targets and s.workloads is view.workloads and s.mesh == view.mesh:
            return s.listener
    chains, dst_map = plan_dispatch(view.targets, view.workloads)
    lis = listener_pb2.Listener(
        name=names.OUTBOUND_DISPATCH,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        # restore the original destination (matched below) and the client address (kept upstream)
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=chains.values(),
    )
    matcher = destination_matcher(dst_map)
    if matcher is not None:
        lis.filter_chain_matcher.CopyFrom(matcher)
    if view.mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
        lis.default_filter_chain.CopyFrom(passthrough_chain(FLAVOR))
    _last[:] = [_Shared(view.targets, view.workloads, view.mesh, lis)]
    return lis


def build_dispatch_listener(view: NodeView) -> listener_pb2.Listener:
    """The shared part, plus this node's own pods re-keyed to same-node chains (15088)."""
    lis = listener_pb2.Listener()
    lis.CopyFrom(_shared(view))
    keys = lis.filter_chain_matcher.matcher_tree.exact_match_map.map
    local: dict[Identity, OnMatch] = {}
    for wl in view.local_workloads:
        action = local.get(wl.identity)
        if action is None:
            chain = pod_chain(wl.identity, same_node=True)
            lis.filter_chains.append(chain)
            action = local[wl.identity] = to_chain(chain.name)
        for ip in wl.pod.ips:
            keys[ip].CopyFrom(action)
    lis.filter_chains.append(passthrough_chain(FLAVOR))
    return lis


def build_dispatch_cluster() -> cluster_pb2.Cluster:
    """Stage 1 -> stage 2: one internal endpoint; filter state crosses with the connection."""
    endpoint = ec.LbEndpoint(
        endpoint=ec.Endpoint(address=address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name=names.OUTBOUND_DISPATCH)))
    )
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=names.OUTBOUND_DISPATCH, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=[endpoint])])
    return cluster_pb2.Cluster(
        name=names.OUTBOUND_DISPATCH,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=cla,
        transport_socket=internal_upstream(),
    )
