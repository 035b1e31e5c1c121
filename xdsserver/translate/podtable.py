"""The pod table (stock flavor): which mesh pod a pod-IP connection reaches, kept in EDS, not LDS.

Why: stage 2 (``ztunnel_outbound_dispatch``) is the same listener on every node. With one key
per mesh pod IP it was 2.18 MB at 100 nodes / 10k pods, and a pod added anywhere re-sent it to
every node (232 MB; issue 13). Now stage 2 holds one string-prefix key per IPv4 /24 with mesh
pods ("10.64.50."), and that key's chain hands the connection to the /24's cluster, whose CLA
lists one endpoint per pod IP. A pod added changes that one CLA (~100 endpoints).

How Envoy finds the endpoint (stock parts, probed in ``tests/test_pod_table_probe.py``):

1. stage 1 shares the destination IP (:data:`names.DESTINATION_IP_STATE`) with its upstream; the
   stage 1 -> stage 2 hop's transport socket is ``upstream_proxy_protocol`` (v2) around
   ``internal_upstream`` and adds it as TLV :data:`TLV_DESTINATION_IP`;
2. stage 2's ``proxy_protocol`` listener filter writes that TLV to ``envoy.lb`` metadata ``ip``;
3. ``tcp_proxy`` to the /24 cluster merges ``envoy.lb`` into its metadata match, and the subset
   load balancer (selector ``ip``, one host per subset) picks the endpoint with that IP: an
   internal address to stage 3 (``endpoint_id`` = the IP) whose ``tunnel.identity`` metadata,
   passed through, is the SAN stage 3 pins (D8). An IP of the range with no mesh pod takes the
   default subset: one endpoint to :data:`names.OUTBOUND_PASSTHROUGH` (``ALLOW_ANY``), or none
   (``REGISTRY_ONLY``: the connection is refused, as stage 2 refused it before).

IPv6 pod IPs keep exact keys in stage 2 (a string prefix of RFC 5952 text is not an address
range) and share one table, ``pods_ipv6``.

Everything here depends on the workloads' (IP, identity) pairs and the outbound policy only, so
one :class:`PodTable` serves every node; a group whose entries did not change keeps its very
same messages and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2

from .. import protowire
from ..model import Flavor, MeshConfig, OutboundPolicy, is_ipv6
from ..model.index import Workload
from . import blocks, names
from .clusters import internal_upstream
from .endpoints import LB_ENDPOINTS, join_cla
from .outbound import passthrough_chain

TLV_DESTINATION_IP = 0xE0  # PROXY protocol v2 TLV (0xE0-0xEF are for applications)
PASSTHROUGH_KEY = "passthrough"  # envoy.lb metadata of the default subset's endpoint

Cluster = cluster_pb2.Cluster


def group_of(ip: str) -> str:
    """The stage-2 key of ``ip``'s table: its /24 as a string prefix ("10.64.50."), or "" (IPv6)."""
    return "" if is_ipv6(ip) else ip[: ip.rfind(".") + 1]


@dataclass(frozen=True, slots=True)
class Group:
    """One table: its name (cluster, CLA and stage-2 chain), key, (IP, SPIFFE ID) rows, messages."""

    name: str
    prefix: str  # "" for the IPv6 table
    rows: tuple[tuple[str, str], ...]  # sorted by IP text
    cluster: Cluster  # never mutated: shared by every node and every table with this name
    cla: endpoint_pb2.ClusterLoadAssignment  # never mutated; body_of has its bytes
    cla_body: bytes


@dataclass(frozen=True, slots=True)
class PodTable:
    workloads: tuple[Workload, ...]
    passthrough: bool
    groups: tuple[Group, ...]  # IPv4 /24s in address order, then the IPv6 table
    ips: frozenset[str]  # every mesh pod IP (stage 2: a pod IP on a VIP keeps an exact key)
    ipv6: tuple[str, ...]  # sorted: stage 2's exact keys for them

    @property
    def stage2_key(self) -> tuple[object, ...]:
        """What stage 2 reads of the table: which chains and keys, not which pods."""
        return (tuple(g.prefix for g in self.groups), self.ipv6)


def _group_order(prefix: str) -> tuple[int, ...]:
    return tuple(int(x) for x in prefix.split(".")[:3]) if prefix else (1 << 9,)


def _build_cluster(name: str, passthrough: bool) -> Cluster:
    """A /24's cluster; depends only on its arguments, so one message for every node. Never mutated."""
    subset = Cluster.LbSubsetConfig(
        subset_selectors=[Cluster.LbSubsetConfig.LbSubsetSelector(keys=["ip"], single_host_per_subset=True)],
    )
    if passthrough:
        subset.fallback_policy = Cluster.LbSubsetConfig.DEFAULT_SUBSET
        subset.default_subset.CopyFrom(blocks.struct({PASSTHROUGH_KEY: True}))
    else:
        subset.fallback_policy = Cluster.LbSubsetConfig.NO_FALLBACK
    return Cluster(
        name=name,
        type=Cluster.EDS,
        eds_cluster_config=Cluster.EdsClusterConfig(eds_config=blocks.ads_source(initial_fetch_timeout_zero=True)),
        lb_subset_config=subset,
        # the endpoint's tunnel metadata (the identity stage 3 pins) crosses to stage 3
        transport_socket=internal_upstream(names.TUNNEL_METADATA),
    )


_cluster_memo: dict[tuple[str, bool], Cluster] = {}


def _cluster(name: str, passthrough: bool) -> Cluster:
    key = (name, passthrough)
    c = _cluster_memo.get(key)
    if c is None:
        if len(_cluster_memo) > 1 << 14:  # bounded: ranges that emptied go
            _cluster_memo.clear()
        c = _cluster_memo[key] = _build_cluster(name, passthrough)
    return c


def _endpoint(listener: str, endpoint_id: str) -> ec.LbEndpoint:
    lbe = ec.LbEndpoint()
    lbe.load_balancing_weight.value = 1  # D6: explicit
    addr = lbe.endpoint.address.envoy_internal_address
    addr.server_listener_name = listener
    addr.endpoint_id = endpoint_id  # one host per IP (hosts sharing the listener would collapse otherwise)
    return lbe


# A row is encoded from its three strings, in the field order deterministic serialization uses
# (LbEndpoint: endpoint 1, metadata 3, load_balancing_weight 4; map keys sorted: "envoy.lb" <
# "tunnel"). Copying a template message and serializing each of ~10k rows was ~40 ms of a cold
# build; ``tests/test_translate.py`` checks these bytes against the message's serialization.
_F = protowire.field
_WEIGHT_1 = _F(4, b"\x08\x01")  # UInt32Value{value: 1} (D6: explicit)
_LISTENER = _F(1, names.OUTBOUND_POD.encode())


def _struct_entry(namespace: str, key: str, value: str) -> bytes:
    """One ``filter_metadata`` map entry: namespace -> Struct{key: string value}."""
    return _F(1, _F(1, namespace.encode()) + _F(2, _F(1, _F(1, key.encode()) + _F(2, _F(3, value.encode())))))


@lru_cache(maxsize=1 << 12)
def _identity_entry(spiffe: str) -> bytes:
    return _struct_entry(names.TUNNEL_METADATA, "identity", spiffe)


@lru_cache(maxsize=64)
def _ip_prefixes(n: int) -> tuple[bytes, bytes]:
    """The bytes before the IP in the endpoint and in the ``envoy.lb`` entry, for an IP of ``n``
    bytes (every nested length follows from it)."""
    ip = b"\0" * n
    endpoint = _F(1, _F(1, _F(3, _LISTENER + _F(2, ip))))
    lb = _struct_entry(names.LB_METADATA, "ip", ip.decode())
    return endpoint[:-n], lb[:-n]


@lru_cache(maxsize=1 << 17)
def _row_field(ip: str, spiffe: str) -> bytes:
    """One pod's endpoint as an encoded ``lb_endpoints`` entry (memoized: a pod added rebuilds
    its /24's CLA from the other rows' bytes): an internal address to stage 3 whose
    ``endpoint_id`` is the IP, ``envoy.lb.ip`` (the subset key) and ``tunnel.identity``."""
    raw = ip.encode()
    endpoint, lb = _ip_prefixes(len(raw))
    lb_entry = lb + raw
    metadata = _F(3, lb_entry + _identity_entry(spiffe))
    return _F(LB_ENDPOINTS, endpoint + raw + metadata + _WEIGHT_1)


def row_message(ip: str, spiffe: str) -> ec.LbEndpoint:
    """The row as a message (what :func:`_row_field` encodes; for the tests)."""
    lbe = _endpoint(names.OUTBOUND_POD, ip)
    meta = lbe.metadata.filter_metadata
    meta[names.LB_METADATA].fields["ip"].string_value = ip
    meta[names.TUNNEL_METADATA].fields["identity"].string_value = spiffe
    return lbe


@lru_cache(maxsize=1)
def _passthrough_field() -> bytes:
    lbe = _endpoint(names.OUTBOUND_PASSTHROUGH, PASSTHROUGH_KEY)
    lbe.metadata.filter_metadata[names.LB_METADATA].fields[PASSTHROUGH_KEY].bool_value = True
    return _F(LB_ENDPOINTS, lbe.SerializeToString(deterministic=True))


def cla_body(name: str, rows: tuple[tuple[str, str], ...], passthrough: bool) -> bytes:
    pieces = [_row_field(ip, spiffe) for ip, spiffe in rows]
    if passthrough:
        pieces.append(_passthrough_field())
    return join_cla(name, pieces)


def _group(name: str, prefix: str, rows: tuple[tuple[str, str], ...], passthrough: bool) -> Group:
    body = cla_body(name, rows, passthrough)
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(body)
    return Group(name, prefix, rows, _cluster(name, passthrough), cla, body)


_last: list[PodTable] = []  # the latest workloads' (one entry): its groups are reused by the next


def pod_table(workloads: tuple[Workload, ...], mesh: MeshConfig) -> PodTable:
    """The table of ``workloads`` (the index's tuple: nodes share it), built once per tuple; a
    group whose rows did not change is carried over from the previous table."""
    passthrough = mesh.outbound_policy is OutboundPolicy.ALLOW_ANY
    prev = _last[0] if _last else None
    if prev is not None and prev.workloads is workloads and prev.passthrough == passthrough:
        return prev
    by_ip: dict[str, str] = {}
    for wl in workloads:  # a later workload with the same IP wins (as the pod-IP keys did)
        for ip in wl.pod.ips:
            by_ip[ip] = wl.identity.spiffe
    grouped: dict[str, list[tuple[str, str]]] = {}
    for ip in sorted(by_ip):
        grouped.setdefault(group_of(ip), []).append((ip, by_ip[ip]))
    old = {g.name: g for g in prev.groups} if prev is not None and prev.passthrough == passthrough else {}
    groups = []
    for prefix in sorted(grouped, key=_group_order):
        name, rows = names.pod_table(prefix), tuple(grouped[prefix])
        hit = old.get(name)
        groups.append(hit if hit is not None and hit.rows == rows else _group(name, prefix, rows, passthrough))
    table = PodTable(workloads, passthrough, tuple(groups), frozenset(by_ip), tuple(ip for ip, _ in grouped.get("", ())))
    _last[:] = [table]
    _bodies.clear()  # the latest table's groups only: older groups' messages are not kept alive
    _bodies.update((id(g.cla), (g.cla, g.cla_body)) for g in groups)
    return table


_bodies: dict[int, tuple[endpoint_pb2.ClusterLoadAssignment, bytes]] = {}  # id(group CLA) -> (CLA, its bytes)


def body_of(cla: endpoint_pb2.ClusterLoadAssignment) -> bytes | None:
    """The bytes of a pod table's CLA of the latest table (None for any other message)."""
    hit = _bodies.get(id(cla))
    return hit[1] if hit is not None and hit[0] is cla else None


@lru_cache(maxsize=1)
def passthrough_listener() -> listener_pb2.Listener:
    """The default subset's endpoint: an address of a mesh pod range with no mesh pod, forwarded
    in plaintext to its original destination, from the client's IP (as stage 2's passthrough
    chain does). One message for every node (serialized once per call); never mutated."""
    return listener_pb2.Listener(
        name=names.OUTBOUND_PASSTHROUGH,
        internal_listener=listener_pb2.Listener.InternalListenerConfig(),
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        filter_chains=[passthrough_chain(Flavor.ENVOY)],
    )


def clear() -> None:
    _last.clear()
    _bodies.clear()
    _cluster_memo.clear()
    _row_field.cache_clear()
    _identity_entry.cache_clear()
    _ip_prefixes.cache_clear()
