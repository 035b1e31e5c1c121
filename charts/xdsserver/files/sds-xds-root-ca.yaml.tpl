{{- /* File-based SDS: one secret per file (Envoy rejects two). */ -}}
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: xds-root-ca
    validation_context:
      trusted_ca: {filename: /var/run/ztunnel/creds/root-cert.pem}
      watched_directory: {path: /var/run/ztunnel/creds}
