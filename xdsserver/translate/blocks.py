"""Shared building blocks (ztunnel-config.md §3): one parameterised builder per shape.

The 2022 generator kept near-copies of these in every caller; here each shape exists once and
the flavor switch (stock Envoy vs istio-2022) is decided in exactly one place per mechanism.
"""

from __future__ import annotations

from functools import lru_cache

from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
    socket_option_pb2,
    substitution_format_string_pb2,
)
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.common.set_filter_state.v3 import value_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2
from envoy.extensions.filters.network.set_filter_state.v3 import set_filter_state_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2

from ..model import AccessLogHops, Flavor, MeshConfig, ports, prefix_len
from . import names

ISTIO_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% '
    "%RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME% "
)
# Stock flavor appends the peer identities so the HBONE leg's SPIFFE IDs and TLS version are
# observable in access logs (the lab asserts on them); the 2022 format had no such fields.
PEER_LOG_SUFFIX = "peer=%DOWNSTREAM_PEER_URI_SAN% upstream_peer=%UPSTREAM_PEER_URI_SAN% tls=%DOWNSTREAM_TLS_VERSION% "

SOL_SOCKET = 1
SO_MARK = 36
TUNNEL_MATCH_VALUE = "h2"  # 2022 baseline B ("http" from commit 373fc895 on)


def pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def seconds(s: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(s * 1e9))
    return d


def socket_address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


@lru_cache(maxsize=64)
def access_log(prefix: str, flavor: Flavor, when: str | None = None) -> accesslog_pb2.AccessLog:
    """Memoized (thousands of chains share a handful of these); callers copy, never mutate.
    ``when``: a CEL expression the connection must satisfy to be logged (a listener-level log
    that stands in for the same log on many chains)."""
    log = _access_log(prefix, flavor)
    if when is not None:
        log.filter.extension_filter.name = "envoy.access_loggers.extension_filters.cel"
        log.filter.extension_filter.typed_config.Pack(cel_pb2.ExpressionFilter(expression=when))
    return log


def _access_log(prefix: str, flavor: Flavor) -> accesslog_pb2.AccessLog:
    fmt = ISTIO_LOG_FORMAT + (PEER_LOG_SUFFIX if flavor is Flavor.ENVOY else "") + prefix + "\n"
    file_log = file_pb2.FileAccessLog(
        path="/dev/stdout",
        log_format=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=fmt)
        ),
    )
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.file", typed_config=pack(file_log))


def hop_log(mesh: MeshConfig, prefix: str) -> str | None:
    """The access-log prefix of an internal hop (stage 2, stage 3, HBONE origination), or None
    when MeshConfig ``accessLog: edges`` keeps only the lines where a connection enters a ztunnel."""
    return prefix if mesh.access_log is AccessLogHops.ALL else None


def socket_mark(mark: int, direction: str) -> socket_option_pb2.SocketOption:
    return socket_option_pb2.SocketOption(
        description=f"Set socket mark to packets coming back from {direction} listener",
        level=SOL_SOCKET,
        name=SO_MARK,
        int_value=mark,
        state=socket_option_pb2.SocketOption.STATE_PREBIND,
    )


def original_dst_filter() -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.original_dst", typed_config=pack(original_dst_pb2.OriginalDst())
    )


def original_src_filter() -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(
        name="envoy.filters.listener.original_src",
        typed_config=pack(original_src_pb2.OriginalSrc(mark=ports.ORIGINAL_SRC_MARK)),
    )


def tcp_proxy(
    stat: str,
    cluster: str,
    *,
    log: str | None,
    flavor: Flavor,
    tunnel_hostname: str | None = None,
    tunnel_header_value: str | None = None,
) -> listener_components_pb2.Filter:
    tp = tcp_proxy_pb2.TcpProxy(stat_prefix=stat, cluster=cluster)
    if log is not None:
        tp.access_log.append(access_log(log, flavor))
    if tunnel_hostname is not None:
        tp.tunneling_config.hostname = tunnel_hostname
        tp.tunneling_config.headers_to_add.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=names.ORIGINAL_DST_HEADER, value=tunnel_header_value or tunnel_hostname)
            )
        )
    return listener_components_pb2.Filter(name="envoy.filters.network.tcp_proxy", typed_config=pack(tp))


def filter_state_value(object_key: str, value: str, *, share: str = "NONE", factory_key: str = "") -> value_pb2.FilterStateValue:
    """One filter-state entry set from a format string; ``share`` is ONCE (the next internal
    hop) or TRANSITIVE (every hop after); ``factory_key`` for keys Envoy does not know."""
    v = value_pb2.FilterStateValue(
        object_key=object_key,
        format_string=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=value)
        ),
        shared_with_upstream=value_pb2.FilterStateValue.SharedWithUpstream.Value(share),
    )
    if factory_key:
        v.factory_key = factory_key
    return v


def set_filter_states(*values: value_pb2.FilterStateValue) -> listener_components_pb2.Filter:
    cfg = set_filter_state_pb2.Config(on_new_connection=values)
    return listener_components_pb2.Filter(name="envoy.filters.network.set_filter_state", typed_config=pack(cfg))


def set_filter_state(object_key: str, value: str) -> listener_components_pb2.Filter:
    """One ``set_filter_state`` network filter setting ``object_key`` from a format string."""
    return set_filter_states(filter_state_value(object_key, value))


def cidr(ip: str) -> address_pb2.CidrRange:
    return address_pb2.CidrRange(address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=prefix_len(ip)))


# -- config sources ------------------------------------------------------------------------------
def ads_source(*, initial_fetch_timeout_zero: bool = False) -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)
    if initial_fetch_timeout_zero:
        src.initial_fetch_timeout.CopyFrom(seconds(0))
    return src


def sds(name: str, flavor: Flavor) -> secret_pb2.SdsSecretConfig:
    """Secret reference: over ADS on stock Envoy, from the node agent's ``sds-grpc`` in 2022."""
    if flavor is Flavor.ENVOY:
        return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())
    src = config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            set_node_on_first_message_only=True,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[grpc_service_pb2.GrpcService(envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=names.SDS_GRPC_CLUSTER))],
        ),
        resource_api_version=config_source_pb2.V3,
    )
    if name in ("default", names.ROOTCA_SECRET):
        src.initial_fetch_timeout.CopyFrom(seconds(0))
    return secret_pb2.SdsSecretConfig(name=name, sds_config=src)


# -- TLS ----------------------------------------------------------------------------------------
def common_tls(secret: str, mesh: MeshConfig, flavor: Flavor) -> tls_pb2.CommonTlsContext:
    """TLS 1.3 only (D7), ALPN h2, our cert, and peers must chain to ROOTCA with a SPIFFE SAN
    of the trust domain (D8/D9). The exact server identity is narrowed per connection through
    filter state ``envoy.network.upstream_subject_alt_names``."""
    ctx = tls_pb2.CommonTlsContext(
        tls_params=common_pb2.TlsParameters(
            tls_minimum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
            tls_maximum_protocol_version=common_pb2.TlsParameters.TLSv1_3,
        ),
        alpn_protocols=["h2"],
        tls_certificate_sds_secret_configs=[sds(secret, flavor)],
    )
    prefix = f"spiffe://{mesh.trust_domain}/"
    dvc = common_pb2.CertificateValidationContext()
    if flavor is Flavor.ENVOY:
        dvc.match_typed_subject_alt_names.append(
            common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=string_pb2.StringMatcher(prefix=prefix))
        )
    else:
        dvc.match_subject_alt_names.append(string_pb2.StringMatcher(prefix=prefix))
    ctx.combined_validation_context.CopyFrom(
        tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=dvc, validation_context_sds_secret_config=sds(names.ROOTCA_SECRET, flavor)
        )
    )
    return ctx


def upstream_tls(secret: str, mesh: MeshConfig, flavor: Flavor) -> base_pb2.TransportSocket:
    return base_pb2.TransportSocket(
        name="envoy.transport_sockets.tls", typed_config=pack(tls_pb2.UpstreamTlsContext(common_tls_context=common_tls(secret, mesh, flavor)))
    )


def downstream_tls(secret: str, mesh: MeshConfig, flavor: Flavor) -> base_pb2.TransportSocket:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=common_tls(secret, mesh, flavor))
    ctx.require_client_certificate.value = True  # D9
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(ctx))


def hbone_h2_options(mesh: MeshConfig | None, default_window: int | None = None) -> protocol_pb2.Http2ProtocolOptions:
    """HTTP/2 of the HBONE tunnel, both ends: CONNECT, and the receive windows MeshConfig sets
    (else ``default_window``, else Envoy's)."""
    h2 = protocol_pb2.Http2ProtocolOptions(allow_connect=True)
    stream = mesh.hbone_stream_window_bytes if mesh is not None and mesh.hbone_stream_window_bytes is not None else default_window
    conn = mesh.hbone_connection_window_bytes if mesh is not None and mesh.hbone_connection_window_bytes is not None else default_window
    if stream is not None:
        h2.initial_stream_window_size.value = stream
    if conn is not None:
        h2.initial_connection_window_size.value = conn
    return h2


def h2_connect_options(idle_timeout_s: float | None = None, mesh: MeshConfig | None = None,
                       default_window: int | None = None) -> dict[str, any_pb2.Any]:
    """HTTP/2 with CONNECT; ``idle_timeout_s`` closes a pooled connection left without streams."""
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=hbone_h2_options(mesh, default_window))
    )
    if idle_timeout_s is not None:
        opts.common_http_protocol_options.idle_timeout.CopyFrom(seconds(idle_timeout_s))
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(opts)}


def struct(d: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s
