"""``ztunnel_inbound`` (:15008, HBONE termination) and ``ztunnel_inbound_plaintext`` (:15006).

One chain per node-local pod keyed by its IP. The CONNECT route only accepts a destination
header naming that same pod (D10), so a peer cannot use one pod's chain to reach another address.
"""

from __future__ import annotations

import re

from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from ..model import Flavor, MeshConfig, is_ipv6, ports
from ..model.index import NodeView, Workload
from . import blocks, names, policy

HCM = hcm_pb2.HttpConnectionManager
HCM_RDS = hcm_pb2.Rds


def _host_pattern(ip: str) -> str:
    return f"\\[{re.escape(ip)}\\]" if is_ipv6(ip) else re.escape(ip)


def destination_guard(ips: tuple[str, ...]) -> route_components_pb2.HeaderMatcher:
    """``x-envoy-original-dst-host`` must be exactly ``<ip>:<port>`` for one of the pod's own
    addresses (a repeated header, joined with commas, fails the anchored regex too)."""
    hosts = [_host_pattern(ip) for ip in ips]
    host = hosts[0] if len(hosts) == 1 else "(" + "|".join(hosts) + ")"
    return route_components_pb2.HeaderMatcher(
        name=names.ORIGINAL_DST_HEADER,
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=f"^{host}:[0-9]{{1,5}}$")),
    )


def _connect_route_config(view: NodeView, wl: Workload, flavor: Flavor) -> route_pb2.RouteConfiguration:
    """The CONNECT route to this pod; stock flavor: with the pod's L4 policy as ``RBACPerRoute``."""
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(
            connect_matcher=route_components_pb2.RouteMatch.ConnectMatcher(), headers=[destination_guard(wl.pod.ips)]
        ),
        route=route_components_pb2.RouteAction(
            cluster=names.VIRTUAL_INBOUND,
            upgrade_configs=[route_components_pb2.RouteAction.UpgradeConfig(upgrade_type="CONNECT", connect_config=route_components_pb2.RouteAction.UpgradeConfig.ConnectConfig())],
        ),
    )
    if flavor is Flavor.ENVOY:
        for name, cfg in policy.per_route_rbac(view, wl).items():
            route.typed_per_filter_config[name].CopyFrom(cfg)
    name = names.inbound_route(wl.ip) if flavor is Flavor.ENVOY else names.LOCAL_ROUTE
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[route_components_pb2.VirtualHost(name=names.LOCAL_SERVICE, domains=["*"], routes=[route])]
    )


def _connect_hcm(view: NodeView, wl: Workload, flavor: Flavor) -> listener_components_pb2.Filter:
    """Stock flavor: the route (and the policy in it) comes over RDS, so a policy change leaves the
    filter chain as it is; istio-2022: inline route and inline RBAC filters, as that shape had."""
    router = hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=blocks.pack(router_pb2.Router()))
    hcm = HCM(
        stat_prefix=names.INBOUND_HCM_STAT,
        codec_type=HCM.HTTP2 if flavor is Flavor.ENVOY else HCM.AUTO,
        access_log=[blocks.access_log("inbound hcm", flavor)],
        http2_protocol_options=blocks.hbone_h2_options(view.mesh if flavor is Flavor.ENVOY else None),
        upgrade_configs=[HCM.UpgradeConfig(upgrade_type="CONNECT")],
    )
    if flavor is Flavor.ENVOY:
        hcm.rds.CopyFrom(HCM_RDS(config_source=blocks.ads_source(), route_config_name=names.inbound_route(wl.ip)))
        hcm.http_filters.extend([*policy.base_http_filters(), router])
    else:
        hcm.route_config.CopyFrom(_connect_route_config(view, wl, flavor))
        hcm.http_filters.extend([*policy.http_filters(view, wl), router])
    return listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=blocks.pack(hcm))


def build_inbound_routes(view: NodeView, flavor: Flavor) -> list[route_pb2.RouteConfiguration]:
    """Stock flavor: one RouteConfiguration per node-local pod (its HBONE chain's RDS)."""
    if flavor is not Flavor.ENVOY:
        return []
    return [_connect_route_config(view, wl, flavor) for wl in view.local_workloads]


def _capture_listener(name: str, port: int, log: str, flavor: Flavor) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(
        name=name,
        address=blocks.socket_address("0.0.0.0", port),  # 0.0.0.0: the same-node 15088 REDIRECT lands here
        listener_filters=[blocks.original_dst_filter(), blocks.original_src_filter()],
        access_log=[blocks.access_log(log, flavor)],
        socket_options=[blocks.socket_mark(ports.INBOUND_LISTENER_MARK, "inbound")],
    )
    lis.use_original_dst.value = True
    lis.transparent.value = True
    return lis


def _match(wl: Workload) -> listener_components_pb2.FilterChainMatch:
    return listener_components_pb2.FilterChainMatch(prefix_ranges=[blocks.cidr(ip) for ip in wl.pod.ips])


def build_ztunnel_inbound(view: NodeView, flavor: Flavor) -> listener_pb2.Listener:
    lis = _capture_listener(names.ZTUNNEL_INBOUND, ports.HBONE_PORT, "capture inbound listener", flavor)
    mesh: MeshConfig = view.mesh
    if flavor is Flavor.ENVOY and mesh.buffer_limit_bytes is not None:
        lis.per_connection_buffer_limit_bytes.value = mesh.buffer_limit_bytes
    for wl in view.local_workloads:
        lis.filter_chains.append(
            listener_components_pb2.FilterChain(
                name=names.inbound_chain(wl.ip),
                filter_chain_match=_match(wl),
                transport_socket=blocks.downstream_tls(names.workload_secret(wl.identity), mesh, flavor),
                filters=[_connect_hcm(view, wl, flavor)],
            )
        )
    lis.filter_chains.append(
        listener_components_pb2.FilterChain(
            name=names.BLACKHOLE_INBOUND_CHAIN,
            filters=[blocks.tcp_proxy(names.BLACKHOLE_CLUSTER, names.BLACKHOLE_CLUSTER, log="blackhole inbound", flavor=flavor)],
        )
    )
    return lis


def build_ztunnel_inbound_plaintext(view: NodeView, flavor: Flavor) -> listener_pb2.Listener:
    lis = _capture_listener(names.ZTUNNEL_INBOUND_PLAINTEXT, ports.INBOUND_PLAINTEXT_PORT, "capture inbound listener plaintext", flavor)
    for wl in view.local_workloads:
        lis.filter_chains.append(
            listener_components_pb2.FilterChain(
                name=names.inbound_chain(wl.ip),
                filter_chain_match=_match(wl),
                filters=[*policy.network_filters(view, wl),
                         blocks.tcp_proxy(names.VIRTUAL_INBOUND_PLAINTEXT_STAT, names.VIRTUAL_INBOUND, log=None, flavor=flavor)],
            )
        )
    lis.filter_chains.append(
        listener_components_pb2.FilterChain(
            name=names.BLACKHOLE_INBOUND_PLAINTEXT_CHAIN,
            filters=[blocks.tcp_proxy(names.BLACKHOLE_CLUSTER, names.BLACKHOLE_CLUSTER, log="blackhole inbound plaintext", flavor=flavor)],
        )
    )
    return lis
