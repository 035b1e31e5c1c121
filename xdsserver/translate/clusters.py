"""Service clusters (stock: one per TCP service port; istio-2022: per local identity x port) and the fixed clusters."""

from __future__ import annotations

from functools import lru_cache

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, protocol_pb2
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.metadata.v3 import metadata_pb2

from ..model import MeshConfig
from . import blocks, names

Cluster = cluster_pb2.Cluster


def _raw_buffer() -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer", typed_config=blocks.pack(raw_buffer_pb2.RawBuffer()))


def internal_upstream(*metadata_namespaces: str) -> base_pb2.TransportSocket:
    """Transport to an internal listener, handing it the endpoint's metadata in these namespaces
    (``kind: host``; stock-envoy.md gotcha 4). Shared filter state crosses with the connection."""
    passthrough = [
        internal_upstream_pb2.InternalUpstreamTransport.MetadataValueSource(
            kind=metadata_pb2.MetadataKind(host=metadata_pb2.MetadataKind.Host()), name=ns
        )
        for ns in metadata_namespaces
    ]
    internal = internal_upstream_pb2.InternalUpstreamTransport(passthrough_metadata=passthrough, transport_socket=_raw_buffer())
    return base_pb2.TransportSocket(name="envoy.transport_sockets.internal_upstream", typed_config=blocks.pack(internal))


def internal_upstream_matches() -> list[Cluster.TransportSocketMatch]:
    """Tunnel endpoints go through the internal listener carrying their ``tunnel`` metadata;
    plain endpoints are dialled directly."""
    return [
        Cluster.TransportSocketMatch(
            name=names.INTERNAL_UPSTREAM_MATCH,
            match=blocks.struct({names.TUNNEL_METADATA: blocks.TUNNEL_MATCH_VALUE}),
            transport_socket=internal_upstream(names.TUNNEL_METADATA, "istio"),
        ),
        Cluster.TransportSocketMatch(name=names.PLAIN_MATCH, match=blocks.struct({}), transport_socket=_raw_buffer()),
    ]


_service_clusters: dict[str, Cluster] = {}


def build_service_cluster(name: str) -> Cluster:
    """One message per name, shared by every node (it depends on nothing else): later stages
    (reference check, serialization) then see the same object and do their work once.
    Callers must not mutate the result."""
    c = _service_clusters.get(name)
    if c is None:
        if len(_service_clusters) > 1 << 16:  # bounded: names of removed services go
            _service_clusters.clear()
        c = _service_clusters[name] = Cluster()
        c.CopyFrom(_service_cluster_template())
        c.name = name
    return c


@lru_cache(maxsize=1)
def _service_cluster_template() -> Cluster:
    """Everything but the name (one per service port: thousands per node at scale). Never mutated."""
    return Cluster(
        type=Cluster.EDS,
        eds_cluster_config=Cluster.EdsClusterConfig(eds_config=blocks.ads_source(initial_fetch_timeout_zero=True)),
        transport_socket_matches=internal_upstream_matches(),
    )


def _original_dst(name: str, **lb: object) -> Cluster:
    c = Cluster(name=name, type=Cluster.ORIGINAL_DST, lb_policy=Cluster.CLUSTER_PROVIDED)
    if lb:
        cfg = Cluster.OriginalDstLbConfig(use_http_header=bool(lb.get("use_http_header")))
        if "port" in lb:
            cfg.upstream_port_override.value = int(lb["port"])  # type: ignore[arg-type]
        c.original_dst_lb_config.CopyFrom(cfg)
    return c


def build_fixed_clusters(mesh: MeshConfig) -> list[Cluster]:
    timeout = blocks.seconds(mesh.connect_timeout_s)
    passthrough = _original_dst(names.PASSTHROUGH_CLUSTER)
    passthrough.connect_timeout.CopyFrom(timeout)
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(max_concurrent_streams={"value": 1073741824}),
        )
    )
    passthrough.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].CopyFrom(blocks.pack(opts))
    passthrough_tcp = _original_dst(names.PASSTHROUGH_CLUSTER_TCP)
    passthrough_tcp.connect_timeout.CopyFrom(timeout)
    blackhole = Cluster(name=names.BLACKHOLE_CLUSTER, type=Cluster.STATIC, lb_policy=Cluster.ROUND_ROBIN, connect_timeout=timeout)
    return [
        _original_dst(names.VIRTUAL_INBOUND, use_http_header=True),
        _original_dst(names.VIRTUAL_INBOUND_HBONE, use_http_header=True, port=15008),
        passthrough,
        passthrough_tcp,
        blackhole,
    ]
