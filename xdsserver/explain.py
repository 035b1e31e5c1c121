"""Explain a connection by walking the *generated config* (not the model), hop by hop.

Source node: ``ztunnel_outbound`` matcher -> filter chain -> cluster; a STATIC cluster whose
endpoint is an internal listener (the stock flavor's ``ztunnel_outbound_dispatch``) is followed
into that listener, whose matcher sees the same original destination -> chain -> cluster ->
endpoints -> internal listener -> tunnel cluster and address. A pod table (an EDS cluster with a
subset selector on ``ip``; stock flavor) is looked up like its subset load balancer does: the
row whose ``envoy.lb`` ip is the destination, else the default subset; the row's endpoint is
the next internal listener and its ``tunnel`` metadata crosses with it. Filter state set on the way is
carried like Envoy carries it, so a cluster chosen at run time (``envoy.tcp_proxy.cluster`` from
the source identity) is resolved to the one the data plane will use. Destination
node (found by searching every node's ``ztunnel_inbound`` for a chain covering the address) ->
inbound chain -> ``virtual_inbound`` -> final destination, with identities at each hop. If a
walk disagrees with what the data plane does, the config is wrong, not the explanation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import wrappers_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from xds.type.matcher.v3 import matcher_pb2

from .explain_policy import Conn as PolicyConn, PolicyVerdict, evaluate as policy_evaluate
from .model import host_port, ports
from .translate import NodeResources, names


@dataclass
class Endpoint:
    endpoint_id: str
    tunnel_address: str = ""
    destination: str = ""
    server_identity: str = ""
    internal_listener: str = ""
    plain: bool = False


@dataclass
class Inbound:
    node: str
    listener: str
    chain: str
    server_identity: str
    client_cert_required: bool
    trusted_peer_prefix: str
    destination_guard: str
    cluster: str
    final_destination: str
    policy: PolicyVerdict | None = None  # L4 authorization on the destination (explain_policy)


@dataclass
class Stage:
    """One listener crossed on the source node: the structured form of ``matched`` + ``hops``
    (what the console draws; the text form is unchanged)."""

    listener: str
    matched: list[str] = field(default_factory=list)  # this listener's matcher trail
    chain: str = ""
    cluster: str = ""
    internal_listener: str = ""  # the next stage ('' on the deciding stage)


@dataclass
class Explanation:
    node: str
    src: str
    dst: str
    verdict: str  # "tunnel" | "direct" | "passthrough" | "blackhole" | "rejected"
    listener: str = names.ZTUNNEL_OUTBOUND
    matched: list[str] = field(default_factory=list)  # matcher path
    hops: list[str] = field(default_factory=list)  # "listener / chain" before the deciding chain
    chain: str = ""
    cluster: str = ""
    client_identity: str = ""
    endpoints: list[Endpoint] = field(default_factory=list)
    tunnel_cluster: str = ""
    tunnel_listener: str = ""
    expected_server_identity: str = ""
    inbound: list[Inbound] = field(default_factory=list)
    reason: str = ""
    stages: list[Stage] = field(default_factory=list)  # capture listener, then each internal stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [f"connection {self.src} -> {self.dst} captured by ztunnel on {self.node} ({self.listener})"]
        for m in self.matched:
            lines.append(f"  matcher: {m}")
        for h in self.hops:
            lines.append(f"  via: {h}")
        if self.chain:
            lines.append(f"  filter chain: {self.chain}")
        if self.cluster:
            lines.append(f"  cluster: {self.cluster}")
        if self.client_identity:
            lines.append(f"  client identity (client cert): {self.client_identity}")
        for ep in self.endpoints:
            if ep.plain:
                lines.append(f"  endpoint {ep.endpoint_id}: plain TCP (not in the mesh)")
            else:
                via = f"via internal listener {ep.internal_listener} -> " if ep.internal_listener else ""
                lines.append(
                    f"  endpoint {ep.endpoint_id}: {via}HBONE to {ep.tunnel_address}"
                    f" (CONNECT {ep.destination}, expected server {ep.server_identity})"
                )
        if self.tunnel_listener:
            lines.append(f"  internal listener: {self.tunnel_listener}")
        if self.tunnel_cluster:
            lines.append(f"  tunnel cluster: {self.tunnel_cluster} (HTTP/2 CONNECT over mTLS 1.3)")
        if self.expected_server_identity and not self.endpoints:
            lines.append(f"  expected server identity: {self.expected_server_identity}")
        for ib in self.inbound:
            lines.append(
                f"  on {ib.node}: {ib.listener} chain {ib.chain} (server cert {ib.server_identity}, client cert required: "
                f"{'yes' if ib.client_cert_required else 'no'}, peers {ib.trusted_peer_prefix}*)"
            )
            lines.append(f"    route guard x-envoy-original-dst-host ~ {ib.destination_guard} -> {ib.cluster} -> {ib.final_destination}")
            if ib.policy is not None:
                lines.append(f"    policy: {'allowed' if ib.policy.allowed else 'denied'} ({ib.policy.decided_by})")
                lines.extend(f"    dry-run: {d}" for d in ib.policy.dry_run)
                lines.extend(f"    audit: {a}" for a in ib.policy.audited)
        lines.append(f"  verdict: {self.verdict}" + (f" ({self.reason})" if self.reason else ""))
        return "\n".join(lines)


def _unpack(any_msg: Any, cls: type) -> Any:
    m = cls()
    any_msg.Unpack(m)
    return m


def _listener(res: NodeResources, name: str) -> listener_pb2.Listener | None:
    return next((lis for lis in res.listeners if lis.name == name), None)


def _cluster(res: NodeResources, name: str) -> cluster_pb2.Cluster | None:
    return next((c for c in res.clusters if c.name == name), None)


def _input_kind(m: matcher_pb2.Matcher) -> str:
    t = m.matcher_tree.input.typed_config
    for cls, kind in (
        (network_inputs_pb2.DestinationPortInput, "port"),
        (network_inputs_pb2.DestinationIPInput, "ip"),
        (network_inputs_pb2.SourceIPInput, "source-ip"),
    ):
        if t.Is(cls.DESCRIPTOR):
            return kind
    return t.type_url


def _eval(m: matcher_pb2.Matcher, values: dict[str, str], trail: list[str]) -> str | None:
    """Evaluate an exact- or prefix-match matcher tree like Envoy: a nested miss does not fall
    back; of several prefixes the longest wins."""
    kind = _input_kind(m)
    key = values[kind]
    entries = m.matcher_tree.exact_match_map.map
    prefixes = [p for p in m.matcher_tree.prefix_match_map.map if key.startswith(p)]
    if key in entries:
        trail.append(f"{kind} {key} matched")
        hit = entries[key]
    elif prefixes:
        longest = max(prefixes, key=len)
        trail.append(f"{kind} {key} matched prefix {longest!r}")
        hit = m.matcher_tree.prefix_match_map.map[longest]
    elif m.HasField("on_no_match"):
        trail.append(f"{kind} {key} not listed -> on_no_match")
        hit = m.on_no_match
    else:
        trail.append(f"{kind} {key} not listed, no on_no_match")
        return None
    if hit.HasField("matcher"):
        return _eval(hit.matcher, values, trail)
    return _unpack(hit.action.typed_config, wrappers_pb2.StringValue).value


def _filters(chain: listener_components_pb2.FilterChain) -> tuple[tcp_proxy_pb2.TcpProxy | None, list[tuple[str, str]]]:
    tcp, states = None, []
    for f in chain.filters:
        if f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
            tcp = _unpack(f.typed_config, tcp_proxy_pb2.TcpProxy)
        elif f.typed_config.Is(set_filter_state_pb2.Config.DESCRIPTOR):
            cfg = _unpack(f.typed_config, set_filter_state_pb2.Config)
            states += [(v.object_key, v.format_string.text_format_source.inline_string) for v in cfg.on_new_connection]
    return tcp, states


def _secret_name(transport_socket: Any, cls: type) -> tuple[str, Any]:
    ctx = _unpack(transport_socket.typed_config, cls)
    common = ctx.common_tls_context
    name = common.tls_certificate_sds_secret_configs[0].name if common.tls_certificate_sds_secret_configs else ""
    return name, ctx


def _in_prefix(ip: str, fcm: listener_components_pb2.FilterChainMatch) -> bool:
    addr = ipaddress.ip_address(ip)
    for r in fcm.prefix_ranges:
        net = ipaddress.ip_network(f"{r.address_prefix}/{r.prefix_len.value if r.HasField('prefix_len') else addr.max_prefixlen}", strict=False)
        if addr in net:
            return True
    return False


def _route_config(res: NodeResources, hcm: Any) -> Any:
    """The HCM's inline route configuration, or the RDS one it names (None if not published)."""
    if not hcm.HasField("rds"):
        return hcm.route_config
    return next((r for r in res.routes if r.name == hcm.rds.route_config_name), None)


def _connect_rbacs(hcm: Any, vhost: Any, route: Any) -> list[http_rbac_pb2.RBAC]:
    """The RBAC each filter applies on this route, as Envoy picks it: the route's (then the
    virtual host's) ``RBACPerRoute``, else the filter's own config; stages without rules (the
    neutral base) are left out."""
    out = []
    for f in hcm.http_filters:
        if not f.name.startswith("envoy.filters.http.rbac"):
            continue
        per = route.typed_per_filter_config.get(f.name) or vhost.typed_per_filter_config.get(f.name)
        cfg = _unpack(per, http_rbac_pb2.RBACPerRoute).rbac if per is not None else _unpack(f.typed_config, http_rbac_pb2.RBAC)
        if cfg.HasField("rules") or cfg.HasField("shadow_rules"):
            out.append(cfg)
    return out


def explain_inbound(nodes: dict[str, NodeResources], dst_ip: str, destination: str, *, src: str = "", principal: str = "") -> Inbound | None:
    for node in sorted(nodes):
        lis = _listener(nodes[node], names.ZTUNNEL_INBOUND)
        if lis is None:
            continue
        for chain in lis.filter_chains:
            if not chain.filter_chain_match.prefix_ranges or not _in_prefix(dst_ip, chain.filter_chain_match):
                continue
            secret, ctx = _secret_name(chain.transport_socket, tls_pb2.DownstreamTlsContext)
            dvc = ctx.common_tls_context.combined_validation_context.default_validation_context
            prefix = dvc.match_typed_subject_alt_names[0].matcher.prefix if dvc.match_typed_subject_alt_names else (
                dvc.match_subject_alt_names[0].prefix if dvc.match_subject_alt_names else "")
            hcm = _unpack(chain.filters[-1].typed_config, hcm_pb2.HttpConnectionManager)
            rc = _route_config(nodes[node], hcm)
            if rc is None:
                continue
            route = rc.virtual_hosts[0].routes[0]
            guard = route.match.headers[0].string_match.safe_regex.regex if route.match.headers else "(any)"
            rbacs = _connect_rbacs(hcm, rc.virtual_hosts[0], route)
            port = int(destination.rpartition(":")[2])
            verdict = policy_evaluate(rbacs, PolicyConn(src, dst_ip, port, principal, destination)) if src else None
            return Inbound(node, lis.name, chain.name, secret, ctx.require_client_certificate.value, prefix, guard, route.route.cluster, destination, verdict)
    return None


def _resolve(value: str, state: dict[str, str], metadata: dict[str, dict[str, str]] | None = None) -> str:
    """Substitute the formatters our run-time choices use (``%FILTER_STATE(key:PLAIN)%``, and
    ``%DYNAMIC_METADATA(ns:key)%`` of metadata an internal hop passed through)."""
    for key, v in state.items():
        value = value.replace(f"%FILTER_STATE({key}:PLAIN)%", v)
    for ns, fields in (metadata or {}).items():
        for key, v in fields.items():
            value = value.replace(f"%DYNAMIC_METADATA({ns}:{key})%", v)
    return value


def _pod_table_row(res: NodeResources, cluster: cluster_pb2.Cluster | None, dst_ip: str) -> tuple[str, dict[str, str], str] | None:
    """A pod table (EDS, subset selector ``ip``) as its subset LB reads it: (the internal
    listener of the row for ``dst_ip``, else of the default subset; that endpoint's ``tunnel``
    metadata; which it was), or None if ``cluster`` is no pod table or nothing matches."""
    if cluster is None or cluster.type != cluster_pb2.Cluster.EDS or not cluster.HasField("lb_subset_config"):
        return None
    cla = next((c for c in res.endpoints if c.cluster_name == cluster.name), None)
    if cla is None:
        return None
    subset = cluster.lb_subset_config
    default = dict(subset.default_subset.fields.items()) if subset.fallback_policy == cluster_pb2.Cluster.LbSubsetConfig.DEFAULT_SUBSET else None
    fallback = None
    for group in cla.endpoints:
        for lbe in group.lb_endpoints:
            lb = lbe.metadata.filter_metadata[names.LB_METADATA].fields
            addr = lbe.endpoint.address.envoy_internal_address
            if "ip" in lb and lb["ip"].string_value == dst_ip:
                tunnel = {k: v.string_value for k, v in lbe.metadata.filter_metadata[names.TUNNEL_METADATA].fields.items()}
                return addr.server_listener_name, tunnel, f"row {dst_ip}"
            if default is not None and fallback is None and default and all(k in lb and lb[k] == v for k, v in default.items()):
                fallback = addr.server_listener_name
    return (fallback, {}, "no row: default subset") if fallback else None


def _internal_target(cluster: cluster_pb2.Cluster | None) -> str:
    """The internal listener a STATIC one-endpoint cluster leads to, else ''."""
    if cluster is None or cluster.type != cluster_pb2.Cluster.STATIC:
        return ""
    for group in cluster.load_assignment.endpoints:
        for lbe in group.lb_endpoints:
            if lbe.endpoint.address.HasField("envoy_internal_address"):
                return lbe.endpoint.address.envoy_internal_address.server_listener_name
    return ""


def _select_chain(lis: listener_pb2.Listener, values: dict[str, str], ex: Explanation) -> listener_components_pb2.FilterChain | None:
    trail: list[str] = []
    chain_name = _eval(lis.filter_chain_matcher, values, trail) if lis.HasField("filter_chain_matcher") else None
    where = f"{lis.name}: " if lis.name != names.ZTUNNEL_OUTBOUND else ""
    ex.matched += [where + t for t in trail]
    chains = {c.name: c for c in lis.filter_chains}
    if chain_name is not None and chain_name in chains:
        return chains[chain_name]
    if not lis.HasField("filter_chain_matcher") and len(lis.filter_chains) == 1 and not lis.filter_chains[0].HasField("filter_chain_match"):
        return lis.filter_chains[0]  # the listener's only chain, matching everything
    if lis.HasField("default_filter_chain"):
        ex.matched.append(where + "-> default_filter_chain")
        return lis.default_filter_chain
    ex.reason = where + "no filter chain matches and the listener has no default chain"
    return None


def explain(nodes: dict[str, NodeResources], node: str, src: str, dst: str) -> Explanation:
    res = nodes[node]
    dst_ip, _, dst_port = dst.rpartition(":")
    dst_ip = dst_ip.strip("[]")
    dst_ip, src = str(ipaddress.ip_address(dst_ip)), str(ipaddress.ip_address(src))
    ex = Explanation(node=node, src=src, dst=host_port(dst_ip, int(dst_port)), verdict="rejected")
    lis = _listener(res, names.ZTUNNEL_OUTBOUND)
    assert lis is not None
    values = {"port": dst_port, "source-ip": src, "ip": dst_ip}
    shared: dict[str, str] = {}  # filter state crossing internal hops (set with shared_with_upstream)
    metadata: dict[str, dict[str, str]] = {}  # endpoint metadata the last internal hop passed through
    for _ in range(4):  # bounded: capture listener + internal stages
        trail_start = len(ex.matched)
        chain = _select_chain(lis, values, ex)
        stage = Stage(lis.name, [m.removeprefix(f"{lis.name}: ") for m in ex.matched[trail_start:]], chain.name if chain else "")
        ex.stages.append(stage)
        if chain is None:
            return ex
        tcp, states = _filters(chain)
        if tcp is None:
            ex.chain, ex.reason = chain.name, "chain has no tcp_proxy"
            return ex
        here = {**shared, **{k: _resolve(v, shared, metadata) for k, v in states}}
        shared.update({k: v for k, v in here.items() if k != names.TCP_PROXY_CLUSTER_STATE})
        cluster_name = here.get(names.TCP_PROXY_CLUSTER_STATE, tcp.cluster)
        target = _cluster(res, cluster_name)
        nxt, via = _internal_target(target), ""
        metadata = {}
        if not nxt and (row := _pod_table_row(res, target, dst_ip)) is not None:
            nxt, tunnel, which = row
            metadata = {names.TUNNEL_METADATA: tunnel} if tunnel else {}
            via = f" (pod table, {which}{', identity ' + tunnel['identity'] if 'identity' in tunnel else ''})"
        elif not nxt and target is not None and target.HasField("lb_subset_config"):
            stage.cluster = cluster_name
            ex.chain, ex.cluster, ex.reason = chain.name, cluster_name, f"pod table {cluster_name} has no row for {dst_ip} and no default subset"
            return ex
        stage.cluster, stage.internal_listener = cluster_name, nxt
        if not nxt:
            break
        ex.hops.append(f"{lis.name} chain {chain.name} -> cluster {cluster_name}{via} -> internal listener {nxt}")
        lis = _listener(res, nxt)
        assert lis is not None, nxt
    ex.chain = chain.name
    ex.cluster = cluster_name
    if cluster_name == names.BLACKHOLE_CLUSTER:
        ex.verdict, ex.reason = "blackhole", "dropped"
        return ex
    if cluster_name in (names.PASSTHROUGH_CLUSTER, names.PASSTHROUGH_CLUSTER_TCP):
        ex.verdict, ex.reason = "passthrough", f"not in the mesh: forwarded in plaintext to {ex.dst} (original destination)"
        return ex
    cluster = _cluster(res, cluster_name)
    assert cluster is not None, cluster_name
    if cluster.type == cluster_pb2.Cluster.EDS:
        cla = next(c for c in res.endpoints if c.cluster_name == cluster.name)
        for group in cla.endpoints:
            for lbe in group.lb_endpoints:
                addr = lbe.endpoint.address
                if addr.HasField("envoy_internal_address"):
                    t = lbe.metadata.filter_metadata[names.TUNNEL_METADATA]
                    ex.endpoints.append(Endpoint(addr.envoy_internal_address.endpoint_id, t["address"], t["destination"],
                                                 t["identity"] if "identity" in t else "", addr.envoy_internal_address.server_listener_name))
                else:
                    sa = addr.socket_address
                    ex.endpoints.append(Endpoint(host_port(sa.address, sa.port_value), plain=True))
        tunnel_lis_names = {e.internal_listener for e in ex.endpoints if not e.plain}
        for tl in sorted(tunnel_lis_names):
            ilis = _listener(res, tl)
            assert ilis is not None
            itcp, istates = _filters(ilis.filter_chains[0])
            chosen = dict(istates).get(names.TCP_PROXY_CLUSTER_STATE)
            ex.tunnel_listener, ex.tunnel_cluster = tl, _resolve(chosen, shared) if chosen else itcp.cluster
            tclus = _cluster(res, ex.tunnel_cluster)
            assert tclus is not None, ex.tunnel_cluster
            ex.client_identity, _ = _secret_name(tclus.transport_socket, tls_pb2.UpstreamTlsContext)
        for ep in ex.endpoints:
            if not ep.plain:
                ib = explain_inbound(nodes, ep.tunnel_address.rpartition(":")[0].strip("[]"), ep.destination, src=src, principal=ex.client_identity)
                if ib:
                    ex.inbound.append(ib)
        ex.verdict = "tunnel" if any(not e.plain for e in ex.endpoints) else ("direct" if ex.endpoints else "rejected")
        if not ex.endpoints:
            ex.reason = "service has no ready endpoints"
        return ex
    # pod-IP chain: ORIGINAL_DST tunnel cluster straight from the capture listener
    lb = cluster.original_dst_lb_config
    port = lb.upstream_port_override.value if lb.HasField("upstream_port_override") else int(dst_port)
    ex.tunnel_cluster = cluster.name
    ex.client_identity, _ = _secret_name(cluster.transport_socket, tls_pb2.UpstreamTlsContext)
    ex.expected_server_identity = here.get("envoy.network.upstream_subject_alt_names", "")
    ep = Endpoint(ex.dst, host_port(dst_ip, port), ex.dst, ex.expected_server_identity)
    ex.endpoints.append(ep)
    ib = explain_inbound(nodes, dst_ip, ex.dst, src=src, principal=ex.client_identity)
    if ib:
        ex.inbound.append(ib)
    ex.verdict = "tunnel"
    if port == ports.HBONE_NODE_LOCAL_PORT:
        ex.reason = f"same node: {port} is redirected to the local ztunnel's {ports.HBONE_PORT}"
    return ex
