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

Per node: chains = service ports + distinct (destination identity, same node?) pairs (at most
2 x identities) + passthrough; matcher keys = VIPs + pod IPs.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

from ..model import Flavor, Identity, OutboundPolicy
from ..model.index import NodeView
from . import blocks, names
from .clusters import internal_upstream
from .outbound import DestinationMap, destination_matcher, passthrough_chain

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


def plan_dispatch(view: NodeView) -> tuple[dict[str, listener_components_pb2.FilterChain], DestinationMap]:
    """Chains (first seen wins) and the destination map, in the 2022 generator's order and with
    its precedence: first port wins on a VIP, a pod IP overrides a VIP with the same address."""
    chains: dict[str, listener_components_pb2.FilterChain] = {}
    dst_map: DestinationMap = {}
    for t in view.targets:
        chain = names.service_port_cluster(t.port.name, t.hostname)
        if chain not in chains:
            chains[chain] = service_chain(chain)
        for vip in t.service.cluster_ips:
            entry = dst_map.get(vip)
            if not isinstance(entry, dict):
                entry = dst_map[vip] = {}
            entry.setdefault(str(t.port.port), chain)
    pod_chains: dict[tuple[Identity, bool], str] = {}
    for wl in view.workloads:
        key = (wl.identity, bool(wl.node_name) and wl.node_name == view.node_name)
        chain = pod_chains.get(key)
        if chain is None:
            chain = pod_chains[key] = names.dst_pod_chain(key[0], same_node=key[1])
            if chain not in chains:
                chains[chain] = pod_chain(key[0], same_node=key[1])
        for ip in wl.pod.ips:
            dst_map[ip] = chain
    return chains, dst_map


def build_dispatch_listener(view: NodeView) -> listener_pb2.Listener:
    chains, dst_map = plan_dispatch(view)
    passthrough = passthrough_chain(FLAVOR)
    lis = listener_pb2.Listener(
        name=names.OUTBOUND_DISPATCH,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        # restore the original destination (matched below) and the client address (kept upstream)
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[*chains.values(), passthrough],
    )
    matcher = destination_matcher(dst_map)
    if matcher is not None:
        lis.filter_chain_matcher.CopyFrom(matcher)
    if view.mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
        lis.default_filter_chain.CopyFrom(passthrough)
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
