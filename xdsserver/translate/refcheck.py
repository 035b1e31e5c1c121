"""Pre-send reference check (ztunnel-config.md D2): every name a resource points at resolves.

Envoy's validate mode does not catch a matcher action naming a missing chain (gotcha 25), and a
cluster without its CLA or secret only shows up as warming forever, so we check before publishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from google.protobuf import any_pb2, symbol_database, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from xds.type.matcher.v3 import matcher_pb2

from . import names

_STRING_VALUE_URL = "type.googleapis.com/" + wrappers_pb2.StringValue.DESCRIPTOR.full_name
_SOURCE = f"%FILTER_STATE({names.SOURCE_IDENTITY_STATE}:PLAIN)%"

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
    """Every action name of a matcher tree (or list), by direct recursion over its own fields."""
    stack = [m]
    decoded: dict[bytes, str] = {}  # many keys share one action
    while stack:
        node = stack.pop()
        ons: list[matcher_pb2.Matcher.OnMatch] = []
        if node.HasField("matcher_tree"):
            tree = node.matcher_tree
            if tree.HasField("exact_match_map"):
                ons.extend(tree.exact_match_map.map.values())
            if tree.HasField("prefix_match_map"):
                ons.extend(tree.prefix_match_map.map.values())
        elif node.HasField("matcher_list"):
            ons.extend(fm.on_match for fm in node.matcher_list.matchers)
        if node.HasField("on_no_match"):
            ons.append(node.on_no_match)
        for on in ons:
            if on.HasField("matcher"):
                stack.append(on.matcher)
            elif on.HasField("action") and on.action.typed_config.type_url == _STRING_VALUE_URL:
                raw = on.action.typed_config.value
                name = decoded.get(raw)
                if name is None:
                    name = decoded[raw] = wrappers_pb2.StringValue.FromString(raw).value
                yield name


_actions_seen: dict[int, tuple[listener_pb2.Listener, frozenset[str]]] = {}
_missing_seen: dict[int, tuple[listener_pb2.Listener, tuple[str, ...]]] = {}


def _missing_chains(lis: listener_pb2.Listener) -> tuple[str, ...]:
    """Matcher actions naming no filter chain of ``lis``, remembered per message object (stage
    2's ~1,900 chain names were read again for every node)."""
    hit = _missing_seen.get(id(lis))
    if hit is not None and hit[0] is lis:
        return hit[1]
    chains = {fc.name for fc in lis.filter_chains}  # a set: one lookup per matcher action
    out = tuple(sorted(a for a in _actions_of(lis) if a not in chains))
    if len(_missing_seen) > 1 << 10:
        _missing_seen.clear()
    _missing_seen[id(lis)] = (lis, out)
    return out


def _actions_of(lis: listener_pb2.Listener) -> frozenset[str]:
    """The distinct matcher actions of a listener, remembered per message object: stage 2 is one
    message shared by every node (messages are never mutated once built)."""
    hit = _actions_seen.get(id(lis))
    if hit is not None and hit[0] is lis:
        return hit[1]
    out = frozenset(_matcher_actions(lis.filter_chain_matcher))
    if len(_actions_seen) > 1 << 10:
        _actions_seen.clear()
    _actions_seen[id(lis)] = (lis, out)
    return out


def _sds_names(ts: Any) -> Iterator[str]:
    """Secret names a TLS transport socket references (both directions, every SDS slot)."""
    cfg = ts.typed_config
    if cfg.Is(tls_pb2.UpstreamTlsContext.DESCRIPTOR):
        common = tls_pb2.UpstreamTlsContext.FromString(cfg.value).common_tls_context
    elif cfg.Is(tls_pb2.DownstreamTlsContext.DESCRIPTOR):
        common = tls_pb2.DownstreamTlsContext.FromString(cfg.value).common_tls_context
    else:
        return
    for ref in common.tls_certificate_sds_secret_configs:
        yield ref.name
    if common.HasField("validation_context_sds_secret_config"):
        yield common.validation_context_sds_secret_config.name
    if common.HasField("combined_validation_context"):
        yield common.combined_validation_context.validation_context_sds_secret_config.name


# What a listener or cluster references, read once per message object: stage 2 and the service
# clusters are the very same messages on every node (never mutated once built), and parsing their
# tcp_proxy and transport-socket configs again for each node was most of a warm node's check
# (~30 of ~80 ms at 100 nodes / 10,000 pods). Each node then only looks names up in its own sets.
_LisRef = tuple  # ("secret", name) | ("cluster", stat_prefix, name) | ("rds", name) | ("route", cluster)
_lis_refs: dict[int, tuple[listener_pb2.Listener, tuple[_LisRef, ...], tuple[str, ...], tuple[str, ...]]] = {}
_cluster_refs: dict[int, tuple[cluster_pb2.Cluster, str | None, tuple[str, ...]]] = {}
_MEMO_LIMIT = 1 << 15


def clear_memos() -> None:
    _lis_refs.clear()
    _cluster_refs.clear()
    _actions_seen.clear()
    _missing_seen.clear()
    _seen.clear()


def _listener_refs(lis: listener_pb2.Listener) -> tuple[tuple[_LisRef, ...], tuple[str, ...], tuple[str, ...]]:
    """(references in chain order, source identities set, envoy.tcp_proxy.cluster formats)."""
    hit = _lis_refs.get(id(lis))
    if hit is not None and hit[0] is lis:
        return hit[1], hit[2], hit[3]
    refs: list[_LisRef] = []
    sources: list[str] = []
    dynamic: list[str] = []
    all_chains = list(lis.filter_chains) + ([lis.default_filter_chain] if lis.HasField("default_filter_chain") else [])
    for fc in all_chains:
        if fc.HasField("transport_socket"):
            refs += [("secret", n) for n in _sds_names(fc.transport_socket)]
        for f in fc.filters:
            cfg = f.typed_config
            if cfg.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                tp = tcp_proxy_pb2.TcpProxy.FromString(cfg.value)
                targets = [tp.cluster] if tp.cluster else [w.name for w in tp.weighted_clusters.clusters]
                refs += [("cluster", tp.stat_prefix, c) for c in targets]
            elif cfg.Is(set_filter_state_pb2.Config.DESCRIPTOR):
                for v in set_filter_state_pb2.Config.FromString(cfg.value).on_new_connection:
                    value = v.format_string.text_format_source.inline_string
                    if v.object_key == names.SOURCE_IDENTITY_STATE:
                        sources.append(value)
                    elif v.object_key == names.TCP_PROXY_CLUSTER_STATE:
                        dynamic.append(value)
            elif cfg.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager.FromString(cfg.value)
                if hcm.HasField("rds"):
                    refs.append(("rds", hcm.rds.route_config_name))
                else:
                    refs += [("route", c) for c in _route_clusters(hcm.route_config)]
    out = (tuple(refs), tuple(sources), tuple(dynamic))
    if len(_lis_refs) > _MEMO_LIMIT:
        _lis_refs.clear()
    _lis_refs[id(lis)] = (lis, *out)
    return out


def _route_clusters(rc: route_pb2.RouteConfiguration) -> list[str]:
    return [route.route.cluster for vh in rc.virtual_hosts for route in vh.routes if route.HasField("route") and route.route.cluster]


def _refs_of_cluster(c: cluster_pb2.Cluster) -> tuple[str | None, tuple[str, ...]]:
    """(the CLA name an EDS cluster needs, or None; secret names its transport sockets use)."""
    hit = _cluster_refs.get(id(c))
    if hit is not None and hit[0] is c:
        return hit[1], hit[2]
    eds = (c.eds_cluster_config.service_name or c.name) if c.type == cluster_pb2.Cluster.EDS else None
    sockets = ([c.transport_socket] if c.HasField("transport_socket") else []) + [m.transport_socket for m in c.transport_socket_matches]
    secrets = tuple(n for ts in sockets for n in _sds_names(ts))
    if len(_cluster_refs) > _MEMO_LIMIT:
        _cluster_refs.clear()
    _cluster_refs[id(c)] = (c, eds, secrets)
    return eds, secrets


def check(
    listeners: Iterable[listener_pb2.Listener],
    clusters: Iterable[cluster_pb2.Cluster],
    endpoint_names: Iterable[str],
    secret_names: Iterable[str],
    *,
    routes: Iterable[route_pb2.RouteConfiguration] = (),
) -> list[str]:
    """Return one message per dangling reference (empty list: consistent).

    Looks only where references live (matcher actions, tcp_proxy and route clusters, TLS secret
    slots, EDS names) instead of walking every field: the walk was most of translation time."""
    listeners, clusters = list(listeners), list(clusters)
    cluster_names = {c.name for c in clusters}
    cla_names, secrets = set(endpoint_names), set(secret_names)
    problems: list[str] = []
    route_configs = {r.name: r for r in routes}
    used_routes: set[str] = set()
    sources: set[str] = set()  # source identities stage 1 can put in filter state
    dynamic: list[tuple[str, str]] = []  # (listener, envoy.tcp_proxy.cluster format)
    for lis in listeners:
        if lis.HasField("filter_chain_matcher"):
            problems += [f"listener {lis.name}: matcher action names missing filter chain {a!r}" for a in _missing_chains(lis)]
        refs, lis_sources, lis_dynamic = _listener_refs(lis)
        sources.update(lis_sources)
        dynamic += [(lis.name, fmt) for fmt in lis_dynamic]
        for ref in refs:
            kind = ref[0]
            if kind == "cluster":
                if ref[2] not in cluster_names:
                    problems.append(f"listener {lis.name}: tcp_proxy {ref[1]!r} names missing cluster {ref[2]!r}")
            elif kind == "secret":
                if ref[1] not in secrets:
                    problems.append(f"listener {lis.name}: missing secret {ref[1]!r}")
            elif kind == "rds":
                used_routes.add(ref[1])
                if ref[1] not in route_configs:
                    problems.append(f"listener {lis.name}: rds names missing route configuration {ref[1]!r}")
                    continue
                problems += [f"listener {lis.name}: route names missing cluster {c!r}"
                             for c in _route_clusters(route_configs[ref[1]]) if c not in cluster_names]
            elif ref[1] not in cluster_names:  # "route": an inline route configuration's cluster
                problems.append(f"listener {lis.name}: route names missing cluster {ref[1]!r}")
    problems += [f"route configuration {n!r}: no listener uses it" for n in sorted(set(route_configs) - used_routes)]
    # a cluster chosen at run time must exist for every source identity that can reach the chain
    if any(_SOURCE in fmt for _, fmt in dynamic) and not sources:
        problems.append(f"envoy.tcp_proxy.cluster depends on {names.SOURCE_IDENTITY_STATE}, which no chain sets")
    for lis_name, fmt in dict.fromkeys(dynamic):
        for src in sorted(sources) if _SOURCE in fmt else [""]:
            name = fmt.replace(_SOURCE, src)
            if name not in cluster_names:
                problems.append(f"listener {lis_name}: envoy.tcp_proxy.cluster {fmt!r} names missing cluster {name!r}")
    listener_names = {lis.name for lis in listeners}
    problems += check_endpoints((c.load_assignment for c in clusters if c.HasField("load_assignment")), listener_names)
    for c in clusters:
        eds, used = _refs_of_cluster(c)
        if eds is not None and eds not in cla_names:
            problems.append(f"cluster {c.name}: no ClusterLoadAssignment")
        if eds is not None and eds != c.name:
            # the SotW stream re-sends a warming cluster's CLA by the cluster's name (xds/stream.py)
            problems.append(f"cluster {c.name}: EDS service_name {eds!r} differs from the cluster name")
        problems += [f"cluster {c.name}: missing secret {n!r}" for n in used if n not in secrets]
    return problems


def check_endpoints(claims: Iterable[endpoint_pb2.ClusterLoadAssignment], listener_names: set[str]) -> list[str]:
    problems = []
    for cla in claims:
        for lis in _internal_listeners(cla):
            if lis not in listener_names:
                problems.append(f"endpoints {cla.cluster_name}: internal address names missing listener {lis!r}")
    return problems


_seen: dict[int, tuple[endpoint_pb2.ClusterLoadAssignment, tuple[str, ...]]] = {}


def _internal_listeners(cla: endpoint_pb2.ClusterLoadAssignment) -> tuple[str, ...]:
    """Internal listeners a CLA's endpoints name, in order (with repeats). Remembered per message
    object: one shared CLA is checked for every node (messages are never mutated once built)."""
    hit = _seen.get(id(cla))
    if hit is not None and hit[0] is cla:
        return hit[1]
    out = tuple(
        lbe.endpoint.address.envoy_internal_address.server_listener_name
        for group in cla.endpoints
        for lbe in group.lb_endpoints
        if lbe.endpoint.address.HasField("envoy_internal_address")
    )
    if len(_seen) > 1 << 16:
        _seen.clear()
    _seen[id(cla)] = (cla, out)
    return out
