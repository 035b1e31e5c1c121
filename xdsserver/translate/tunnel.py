"""HBONE origination: the internal listener behind service clusters and the tunnel clusters.

Stock flavor: one ``outbound_tunnel_lis`` shared by every source identity; it picks the source's
``outbound_tunnel_clus_<id>`` (and with it the client certificate) from the identity that
``ztunnel_outbound`` put in filter state. istio-2022: one ``outbound_tunnel_lis_<id>`` per
node-local identity, as the 2022 generator emitted. The tunnel clusters stay per identity in both.

One builder for the three ORIGINAL_DST tunnel clusters (the 2022 code had three copies that
differed only in name and ``original_dst_lb_config``; style.md §4).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.type.metadata.v3 import metadata_pb2
from xds.type.v3 import typed_struct_pb2

from ..model import Flavor, Identity, MeshConfig, ports
from . import blocks, names

_DEST = "%DYNAMIC_METADATA(tunnel:destination)%"
# TCP keepalive on HBONE: first probe after MeshConfig hboneKeepalive (60 s) idle, then 3 x 10 s
HBONE_KEEPALIVE_INTERVAL_S, HBONE_KEEPALIVE_PROBES = 10, 3
TUNNEL_HOP_LOG = "outbound tunnel"
_DEST_2022_HEADER = '%DYNAMIC_METADATA(["tunnel", "destination"])%'


def build_outbound_tunnel_lis(src: Identity | None, flavor: Flavor, log: str | None = TUNNEL_HOP_LOG) -> listener_pb2.Listener:
    """``src=None``: the stock flavor's shared listener; else istio-2022's per-identity one."""
    name = names.OUTBOUND_TUNNEL_LIS if src is None else names.outbound_tunnel_lis(src)
    lis = listener_pb2.Listener(name=name, internal_listener=listener_pb2.Listener.InternalListenerConfig())
    if flavor is Flavor.ENVOY:
        # stock-envoy.md §5.6: restore the client address stage 1 put in filter state, then spoof it.
        lis.listener_filters.extend([blocks.original_dst_filter(), blocks.original_src_filter()])
    else:
        lis.use_original_dst.value = False
        lis.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name="set_dst_address",
                typed_config=blocks.pack(typed_struct_pb2.TypedStruct(type_url="type.googleapis.com/istio.set_internal_dst_address.v1.Config")),
            )
        )
    # D8: the endpoint names the server identity it expects; pin the TLS peer to it.
    states = [blocks.filter_state_value("envoy.network.upstream_subject_alt_names", "%DYNAMIC_METADATA(tunnel:identity)%")]
    if src is None:
        states.append(blocks.filter_state_value(names.TCP_PROXY_CLUSTER_STATE, names.per_source(names.OUTBOUND_TUNNEL_CLUS_PREFIX)))
        cluster = names.BLACKHOLE_CLUSTER  # only if the source identity is missing
    else:
        cluster = names.outbound_tunnel_clus(src)
    lis.filter_chains.append(
        listener_components_pb2.FilterChain(
            filters=[
                blocks.set_filter_states(*states),
                blocks.tcp_proxy(
                    name,
                    cluster,
                    log=log,
                    flavor=flavor,
                    tunnel_hostname=_DEST,
                    tunnel_header_value=_DEST if flavor is Flavor.ENVOY else _DEST_2022_HEADER,
                ),
            ]
        )
    )
    return lis


# HBONE receive windows (stream and connection), the most HTTP/2 allows. A destination ztunnel
# ends a server-closes-first stream with RST_STREAM right after its last DATA, and Envoy 1.40 drops
# DATA still queued behind a closed window when it sends that reset (envoyproxy/envoy#29489): the
# client's tail is lost unless the window can hold what a backed-up reader has not yet read when the
# server closes. Measured in the lab: Envoy's default windows cut 8 of 8 slow and 4 of 8 fast 200 MiB
# downloads; these cut none. Memory cost: that unread remainder is buffered by the client's ztunnel
# (up to 2 GiB per stream; README "Known limits").
HBONE_WINDOW = 2**31 - 1


def _tunnel_cluster(name: str, src: Identity, mesh: MeshConfig, flavor: Flavor, lb: cluster_pb2.Cluster.OriginalDstLbConfig) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=blocks.seconds(2),
        cleanup_interval=blocks.seconds(60),
        original_dst_lb_config=lb,
        transport_socket=blocks.upstream_tls(names.workload_secret(src), mesh, flavor),
    )
    if flavor is Flavor.ENVOY:
        # pooled HBONE: idle connections close (MeshConfig hboneIdleTimeout); a peer that vanished
        # without FIN is noticed by TCP keepalive instead of holding a pooled connection forever
        opts = blocks.h2_connect_options(mesh.hbone_idle_timeout_s, mesh, default_window=HBONE_WINDOW)
        if mesh.hbone_keepalive_s > 0:
            c.upstream_connection_options.tcp_keepalive.keepalive_time.value = round(mesh.hbone_keepalive_s)
            c.upstream_connection_options.tcp_keepalive.keepalive_interval.value = HBONE_KEEPALIVE_INTERVAL_S
            c.upstream_connection_options.tcp_keepalive.keepalive_probes.value = HBONE_KEEPALIVE_PROBES
        if mesh.buffer_limit_bytes is not None:
            c.per_connection_buffer_limit_bytes.value = mesh.buffer_limit_bytes
    else:
        opts = blocks.h2_connect_options()
    for k, v in opts.items():
        c.typed_extension_protocol_options[k].CopyFrom(v)
    return c


_tunnel_memo: dict[tuple[Identity, MeshConfig, Flavor], tuple[cluster_pb2.Cluster, ...]] = {}


def build_tunnel_clusters(src: Identity, mesh: MeshConfig, flavor: Flavor) -> list[cluster_pb2.Cluster]:
    """The three HBONE clusters of source identity ``src`` (service, pod, same-node pod). A pure
    function of its arguments, so every node with pods of ``src`` gets the very same messages:
    built, reference-checked and serialized once (an identity has pods on many nodes). Callers
    must not mutate them."""
    key = (src, mesh, flavor)
    hit = _tunnel_memo.get(key)
    if hit is None:
        if len(_tunnel_memo) > 1 << 14:  # bounded: removed identities and old mesh settings go
            _tunnel_memo.clear()
        hit = _tunnel_memo[key] = tuple(_build_tunnel_clusters(src, mesh, flavor))
    return list(hit)


def _build_tunnel_clusters(src: Identity, mesh: MeshConfig, flavor: Flavor) -> list[cluster_pb2.Cluster]:
    Lb = cluster_pb2.Cluster.OriginalDstLbConfig
    service_lb = Lb()
    if flavor is Flavor.ENVOY:
        # replaces istio-proxy's set_dst_address: the host comes from the endpoint's tunnel.address
        service_lb.metadata_key.CopyFrom(
            metadata_pb2.MetadataKey(key=names.TUNNEL_METADATA, path=[metadata_pb2.MetadataKey.PathSegment(key="address")])
        )
    pod_lb = Lb()
    pod_lb.upstream_port_override.value = ports.HBONE_PORT
    local_lb = Lb(use_http_header=True)
    local_lb.upstream_port_override.value = ports.HBONE_NODE_LOCAL_PORT
    return [
        _tunnel_cluster(names.outbound_tunnel_clus(src), src, mesh, flavor, service_lb),
        _tunnel_cluster(names.outbound_pod_tunnel_clus(src), src, mesh, flavor, pod_lb),
        _tunnel_cluster(names.outbound_pod_local_tunnel_clus(src), src, mesh, flavor, local_lb),
    ]
