{{- /*
Envoy bootstrap of the ztunnel (Helm twin of the repo's templates/bootstrap.yaml).
Pod-specific parts are NOT in this file: the DaemonSet passes node.id with --service-node and
merges metadata NODE_NAME/NAME/NAMESPACE/INSTANCE_IPS with --config-yaml; kubelet expands
$(VAR) from the downward API, so no init container has to rewrite the file.
*/ -}}
{{- $host := include "xdsserver.serviceHost" . -}}
node:
  cluster: istio-proxy
  metadata:
    GENERATOR: ztunnel-envoy
    AMBIENT_TYPE: ztunnel
    CLUSTER_ID: {{ .Values.ztunnel.clusterId | quote }}
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: 15000}
bootstrap_extensions:
  # Mandatory for the internal listeners; cannot be delivered over xDS.
  - name: envoy.bootstrap.internal_listener
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
layered_runtime:
  layers:
  - name: ztunnel
    static_layer:
      # Envoy 1.40 treats the close of an internal-listener connection as an upstream reset and
      # abort-resets the client, dropping buffered response bytes (flag UR); see templates/bootstrap.yaml.
      envoy.reloadable_features.propagate_upstream_rst_through_tunneled_tcp_proxy: false
      # Keep what a server-closes-first CONNECT stream delivered before its RST_STREAM(NO_ERROR).
      envoy.reloadable_features.http_preserve_rst_no_error: true
  - name: admin
    admin_layer: {}
dynamic_resources:
  ads_config:
    api_type: {{ .Values.ztunnel.xdsApiType }}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
      - envoy_grpc: {cluster_name: xds-grpc}
  # Wait for the first LDS/CDS however long it takes (default 15 s, then Envoy goes LIVE
  # without config): the readiness probe then means "has its config from xdsserver".
  lds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 0s}
  cds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 0s}
static_resources:
  listeners:
    # Admin stays on loopback; kubelet probes (and Prometheus) reach only these two paths.
    # Like every listener it is bound once Envoy is initialised (first LDS/CDS applied).
    - name: ztunnel_status
      address:
        socket_address: {address: 0.0.0.0, port_value: 15021}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ztunnel_status
                route_config:
                  name: ztunnel_status
                  virtual_hosts:
                    - name: ztunnel_status
                      domains: ["*"]
                      routes:
                        - match: {path: /healthz/ready}
                          route: {cluster: ztunnel_admin, prefix_rewrite: /ready}
                        - match: {path: /stats/prometheus}
                          route: {cluster: ztunnel_admin}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: ztunnel_admin
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: ztunnel_admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: 127.0.0.1, port_value: 15000}
    # The only xDS cluster. Static clusters must not use SDS-over-ADS (Envoy segfaults), so the
    # node credentials come from files through file-based SDS, which re-reads them when the
    # node-credentials sidecar renames new ones into the watched directory.
    - name: xds-grpc
      type: STRICT_DNS
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      upstream_connection_options:
        # Notice a silently dead xdsserver without HTTP/2 pings, which gRPC servers answer with
        # GOAWAY "too_many_pings" on an idle stream.
        tcp_keepalive: {keepalive_time: 300}
      load_assignment:
        cluster_name: xds-grpc
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {address: {{ $host }}, port_value: 15012}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {{ $host }}
          common_tls_context:
            tls_params: {tls_minimum_protocol_version: TLSv1_2, tls_maximum_protocol_version: TLSv1_3}
            alpn_protocols: [h2]
            tls_certificate_sds_secret_configs:
              - name: xds-client-cert
                sds_config:
                  path_config_source: {path: /etc/ztunnel/sds-xds-client-cert.yaml}
                  resource_api_version: V3
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                  - san_type: DNS
                    matcher: {exact: {{ $host }}}
              validation_context_sds_secret_config:
                name: xds-root-ca
                sds_config:
                  path_config_source: {path: /etc/ztunnel/sds-xds-root-ca.yaml}
                  resource_api_version: V3
