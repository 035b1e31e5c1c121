"""Pre-send reference check (ztunnel-config.md D2): every name a resource points at resolves.

Envoy's validate mode does not catch a matcher action naming a missing chain (gotcha 25), and a
cluster without its CLA or secret only shows up as warming forever, so we check before publishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from google.protobuf import any_pb2, symbol_database, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from xds.type.matcher.v3 import matcher_pb2

_db = symbol_database.Default()


class DanglingReference(ValueError):
    """A resource references something the same snapshot does not contain."""


def _unpack(a: any_pb2.Any) -> Message | None:
    try:
        msg = _db.GetSymbol(a.TypeName())()
    except KeyError:
        return None  # an istio-proxy-only type (2022 flavor): nothing of ours inside
    a.Unpack(msg)
    return msg


def walk(msg: Message) -> Iterator[Message]:
    """Every message reachable from ``msg``, looking inside ``Any``."""
    stack = [msg]
    while stack:
        m = stack.pop()
        yield m
        for fd, value in m.ListFields():
            if fd.message_type is None:
                continue
            if fd.message_type.GetOptions().map_entry:
                vals = value.values()
                if fd.message_type.fields_by_name["value"].message_type is None:
                    continue
            elif fd.is_repeated:
                vals = value
            else:
                vals = [value]
            for v in vals:
                if isinstance(v, any_pb2.Any):
                    inner = _unpack(v)
                    if inner is not None:
                        stack.append(inner)
                else:
                    stack.append(v)


def _matcher_actions(m: matcher_pb2.Matcher) -> Iterator[str]:
    for node in walk(m):
        if isinstance(node, wrappers_pb2.StringValue):
            yield node.value


def check(
    listeners: Iterable[listener_pb2.Listener],
    clusters: Iterable[cluster_pb2.Cluster],
    endpoint_names: Iterable[str],
    secret_names: Iterable[str],
) -> list[str]:
    """Return one message per dangling reference (empty list: consistent)."""
    listeners, clusters = list(listeners), list(clusters)
    cluster_names = {c.name for c in clusters}
    listener_names = {lis.name for lis in listeners}
    cla_names, secrets = set(endpoint_names), set(secret_names)
    problems: list[str] = []
    for lis in listeners:
        chains = {fc.name for fc in lis.filter_chains}  # a set: one lookup per matcher action
        if lis.HasField("filter_chain_matcher"):
            for action in _matcher_actions(lis.filter_chain_matcher):
                if action not in chains:
                    problems.append(f"listener {lis.name}: matcher action names missing filter chain {action!r}")
        for node in walk(lis):
            if isinstance(node, tcp_proxy_pb2.TcpProxy) and node.cluster not in cluster_names:
                problems.append(f"listener {lis.name}: tcp_proxy {node.stat_prefix!r} names missing cluster {node.cluster!r}")
            elif isinstance(node, route_components_pb2.RouteAction) and node.cluster not in cluster_names:
                problems.append(f"listener {lis.name}: route names missing cluster {node.cluster!r}")
            elif isinstance(node, secret_pb2.SdsSecretConfig) and node.name not in secrets:
                problems.append(f"listener {lis.name}: missing secret {node.name!r}")
    for c in clusters:
        if c.type == cluster_pb2.Cluster.EDS and (c.eds_cluster_config.service_name or c.name) not in cla_names:
            problems.append(f"cluster {c.name}: no ClusterLoadAssignment")
        for node in walk(c):
            if isinstance(node, secret_pb2.SdsSecretConfig) and node.name not in secrets:
                problems.append(f"cluster {c.name}: missing secret {node.name!r}")
    return problems


def check_endpoints(claims: Iterable[Message], listener_names: set[str]) -> list[str]:
    problems = []
    for cla in claims:
        for node in walk(cla):
            if isinstance(node, address_pb2.EnvoyInternalAddress) and node.server_listener_name not in listener_names:
                problems.append(f"endpoints {cla.cluster_name}: internal address names missing listener {node.server_listener_name!r}")  # type: ignore[attr-defined]
    return problems
