"""ClusterLoadAssignments for service clusters: internal endpoints carrying tunnel metadata.

Answered from the translation's own (cluster -> target) map, never by parsing names (§6.1).
"""

from __future__ import annotations

from functools import lru_cache

from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2

from ..model import host_port, ports
from ..model.index import Backend, ServiceTarget
from . import blocks, names


def _lb_endpoint(tunnel_listener: str, b: Backend, node_name: str) -> ec.LbEndpoint:
    same_node = bool(b.node_name) and b.node_name == node_name
    return _lb_endpoint_memo(tunnel_listener, b, same_node)


@lru_cache(maxsize=1 << 17)
def _lb_endpoint_memo(tunnel_listener: str, b: Backend, same_node: bool) -> ec.LbEndpoint:
    """Memoized on its inputs: one backend serves many service ports and is seen by every node,
    and this message is most of a node's EDS build. Never mutated (callers copy it)."""
    lbe = ec.LbEndpoint()
    lbe.load_balancing_weight.value = 1  # D6: explicit
    dest = host_port(b.ip, b.port)
    if b.identity is None:  # not in the mesh: plain TCP, matched by tlsMode-disabled
        lbe.endpoint.address.CopyFrom(blocks.socket_address(b.ip, b.port))
        return lbe
    capture = ports.HBONE_NODE_LOCAL_PORT if same_node else ports.HBONE_PORT
    lbe.endpoint.address.CopyFrom(
        address_pb2.Address(
            envoy_internal_address=address_pb2.EnvoyInternalAddress(
                server_listener_name=tunnel_listener,
                endpoint_id=dest,  # D6: without it EDS collapses hosts sharing the listener (gotcha 3)
            )
        )
    )
    meta = lbe.metadata.filter_metadata
    tunnel = meta[names.TUNNEL_METADATA].fields  # built field by field: Struct.update is slow Python
    tunnel["address"].string_value = host_port(b.ip, capture)
    tunnel["destination"].string_value = dest
    tunnel["identity"].string_value = b.identity.spiffe
    meta[names.TRANSPORT_SOCKET_MATCH].fields[names.TUNNEL_METADATA].string_value = blocks.TUNNEL_MATCH_VALUE
    return lbe


def build_cla(cluster_name: str, tunnel_listener: str, target: ServiceTarget, node_name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of ``target`` as seen from ``node_name``; mesh endpoints go through the internal
    listener ``tunnel_listener`` (shared in the stock flavor, the source's own in istio-2022)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    cla.endpoints.add().lb_endpoints.extend(_lb_endpoint(tunnel_listener, b, node_name) for b in target.backends)
    return cla


_shared: dict[tuple[str, str, int, str], tuple[ServiceTarget, endpoint_pb2.ClusterLoadAssignment]] = {}


def shared_cla(cluster_name: str, tunnel_listener: str, target: ServiceTarget, node_name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """:func:`build_cla`, with one message shared by every node where it is the same: a CLA
    depends on the node only through which backends are on it (15088 instead of 15008), so on
    most nodes it is identical. Keyed on the target object itself (targets are immutable and
    rebuilt when the model changes). Callers must not mutate the result."""
    local = node_name if any(b.node_name == node_name for b in target.backends) else ""
    key = (cluster_name, tunnel_listener, id(target), local)
    hit = _shared.get(key)
    if hit is not None and hit[0] is target:
        return hit[1]
    if len(_shared) > 1 << 16:  # bounded: older models' entries go
        _shared.clear()
    cla = build_cla(cluster_name, tunnel_listener, target, node_name)
    _shared[key] = (target, cla)
    return cla
