{{- /* File-based SDS: one secret per file (Envoy rejects two). */ -}}
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: xds-client-cert
    tls_certificate:
      certificate_chain: {filename: /var/run/ztunnel/creds/cert-chain.pem}
      private_key: {filename: /var/run/ztunnel/creds/key.pem}
      watched_directory: {path: /var/run/ztunnel/creds}
