"""ClusterLoadAssignments for service clusters: internal endpoints carrying tunnel metadata.

Answered from the translation's own (cluster -> target) map, never by parsing names (§6.1).
"""

from __future__ import annotations

from functools import lru_cache

from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2

from ..model import host_port, ports
from ..model.index import Backend, ServiceTarget
from .. import protowire
from . import blocks, names


def per_node(tunnel_listener: str) -> bool:
    """Whether the CLAs behind ``tunnel_listener`` differ by node. Stock flavor: no, every mesh
    endpoint's ``tunnel.address`` is ``pod:15008``, and on the pod's own node the ztunnel pod's
    nat OUTPUT REDIRECT (pod CIDR, dport 15008; ``redirect/plan.py``) loops it to its own
    :15008, so a service's CLA is one message for every node. istio-2022: yes, a same-node
    endpoint carries 15088, as the 2022 generator emitted."""
    return tunnel_listener != names.OUTBOUND_TUNNEL_LIS


def node_variant(tunnel_listener: str, target: ServiceTarget, node_name: str) -> str:
    """The node whose own variant of ``target``'s CLA ``node_name`` gets, or "" for the one
    every node without a backend of it (stock flavor: every node) gets."""
    if per_node(tunnel_listener) and any(b.node_name == node_name for b in target.backends):
        return node_name
    return ""


def _lb_endpoint(tunnel_listener: str, b: Backend, node_name: str) -> ec.LbEndpoint:
    same_node = per_node(tunnel_listener) and bool(b.node_name) and b.node_name == node_name
    return _lb_endpoint_message(tunnel_listener, b, same_node)


def _lb_endpoint_message(tunnel_listener: str, b: Backend, same_node: bool) -> ec.LbEndpoint:
    """The endpoint's message; its encoded form is memoized (:func:`_lb_endpoint_field`). A mesh
    endpoint is a copy of its listener's template with four strings set (building the nested
    address and metadata messages each time was ~40% of the 14k endpoints of a cold 100-node build)."""
    dest = host_port(b.ip, b.port)
    if b.identity is None:  # not in the mesh: plain TCP, matched by tlsMode-disabled
        lbe = ec.LbEndpoint()
        lbe.load_balancing_weight.value = 1  # D6: explicit
        lbe.endpoint.address.CopyFrom(blocks.socket_address(b.ip, b.port))
        return lbe
    lbe = ec.LbEndpoint()
    lbe.CopyFrom(_mesh_template(tunnel_listener))
    lbe.endpoint.address.envoy_internal_address.endpoint_id = dest  # D6: without it EDS collapses hosts sharing the listener (gotcha 3)
    tunnel = lbe.metadata.filter_metadata[names.TUNNEL_METADATA].fields  # field by field: Struct.update is slow Python
    tunnel["address"].string_value = host_port(b.ip, ports.HBONE_NODE_LOCAL_PORT if same_node else ports.HBONE_PORT)
    tunnel["destination"].string_value = dest
    tunnel["identity"].string_value = b.identity.spiffe
    return lbe


@lru_cache(maxsize=64)
def _mesh_template(tunnel_listener: str) -> ec.LbEndpoint:
    """What every mesh endpoint behind ``tunnel_listener`` has in common. Callers copy it."""
    lbe = ec.LbEndpoint()
    lbe.load_balancing_weight.value = 1  # D6: explicit
    lbe.endpoint.address.CopyFrom(address_pb2.Address(envoy_internal_address=address_pb2.EnvoyInternalAddress(server_listener_name=tunnel_listener)))
    meta = lbe.metadata.filter_metadata
    meta[names.TRANSPORT_SOCKET_MATCH].fields[names.TUNNEL_METADATA].string_value = blocks.TUNNEL_MATCH_VALUE
    return lbe


@lru_cache(maxsize=1 << 17)
def _lb_endpoint_field(tunnel_listener: str, b: Backend, same_node: bool) -> bytes:
    """The endpoint as one ``lb_endpoints`` entry of a LocalityLbEndpoints, encoded and memoized
    on its inputs (one backend serves many service ports and is seen by every node): a CLA is
    then a join of these (copying 190k messages into CLAs was ~1.2 s of a 100-node cold build)."""
    return protowire.field(LB_ENDPOINTS, _lb_endpoint_message(tunnel_listener, b, same_node).SerializeToString(deterministic=True))


# ClusterLoadAssignment.cluster_name, .endpoints; LocalityLbEndpoints.lb_endpoints (checked in the tests)
_CLUSTER_NAME, _ENDPOINTS, LB_ENDPOINTS = 1, 2, 2


def cla_body(cluster_name: str, tunnel_listener: str, target: ServiceTarget, node_name: str) -> bytes:
    """The deterministic serialization of :func:`build_cla`'s message, built from the encoded
    endpoints (fields in number order, one locality group, present even when empty)."""
    local = per_node(tunnel_listener)
    pieces = [_lb_endpoint_field(tunnel_listener, b, local and bool(b.node_name) and b.node_name == node_name) for b in target.backends]
    return join_cla(cluster_name, pieces)


def join_cla(cluster_name: str, pieces: list[bytes] | tuple[bytes, ...]) -> bytes:
    """A CLA's deterministic bytes from its encoded ``lb_endpoints`` entries (one locality group,
    present even when empty): service CLAs here, the pod tables' in podtable.py."""
    return (protowire.field(_CLUSTER_NAME, cluster_name.encode()) if cluster_name else b"") + protowire.field(_ENDPOINTS, b"".join(pieces))


def build_cla(cluster_name: str, tunnel_listener: str, target: ServiceTarget, node_name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of ``target`` as seen from ``node_name``; mesh endpoints go through the internal
    listener ``tunnel_listener`` (shared in the stock flavor, the source's own in istio-2022)."""
    return endpoint_pb2.ClusterLoadAssignment.FromString(cla_body(cluster_name, tunnel_listener, target, node_name))


_shared: dict[tuple[str, str, int, str], tuple[ServiceTarget, endpoint_pb2.ClusterLoadAssignment]] = {}
_bodies: dict[int, tuple[endpoint_pb2.ClusterLoadAssignment, bytes]] = {}  # id(shared CLA) -> (CLA, its bytes)
# (listener, id(target)) -> (target, {node: indexes of its backends on that node}, the endpoints
# as seen from a node hosting none of them)
_remote: dict[tuple[str, int], tuple[ServiceTarget, dict[str, tuple[int, ...]], tuple[bytes, ...]]] = {}


def _remote_view(tunnel_listener: str, target: ServiceTarget) -> tuple[dict[str, tuple[int, ...]], tuple[bytes, ...]]:
    """Built once per target, not per node: a node's CLA differs from it only in the endpoints
    on that node."""
    key = (tunnel_listener, id(target))
    hit = _remote.get(key)
    if hit is not None and hit[0] is target:
        return hit[1], hit[2]
    if len(_remote) > 1 << 16:
        _remote.clear()
    on: dict[str, list[int]] = {}
    if per_node(tunnel_listener):
        for i, b in enumerate(target.backends):
            if b.node_name:
                on.setdefault(b.node_name, []).append(i)
    by_node = {n: tuple(ix) for n, ix in on.items()}
    pieces = tuple(_lb_endpoint_field(tunnel_listener, b, False) for b in target.backends)
    _remote[key] = (target, by_node, pieces)
    return by_node, pieces


def shared_cla(cluster_name: str, tunnel_listener: str, target: ServiceTarget, node_name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """:func:`build_cla`, with one message shared by every node where it is the same: in the
    stock flavor every node; in istio-2022 a CLA depends on the node only through which
    backends are on it (15088 instead of 15008), so on most nodes it is identical. Keyed on the
    target object itself (targets are immutable and rebuilt when the model changes). Callers must not mutate the result; :func:`body_of` has
    its bytes."""
    by_node, remote = _remote_view(tunnel_listener, target)
    here = by_node.get(node_name)
    local = node_name if here else ""
    key = (cluster_name, tunnel_listener, id(target), local)
    hit = _shared.get(key)
    if hit is not None and hit[0] is target:
        return hit[1]
    if len(_shared) > 1 << 16:  # bounded: older models' entries go
        _shared.clear()
        _bodies.clear()
    if here:
        pieces = list(remote)
        for i in here:
            pieces[i] = _lb_endpoint_field(tunnel_listener, target.backends[i], True)
        body = join_cla(cluster_name, pieces)
    else:
        body = join_cla(cluster_name, remote)
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(body)
    _shared[key] = (target, cla)
    _bodies[id(cla)] = (cla, body)
    return cla


def body_of(cla: endpoint_pb2.ClusterLoadAssignment) -> bytes | None:
    """The deterministic bytes of a CLA :func:`shared_cla` built (None for any other message)."""
    hit = _bodies.get(id(cla))
    return hit[1] if hit is not None and hit[0] is cla else None


def clear() -> None:
    for memo in (_shared, _bodies, _remote):
        memo.clear()
    _lb_endpoint_field.cache_clear()
