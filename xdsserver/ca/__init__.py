"""Built-in certificate authority: SPIFFE workload certificates, the trust bundle, and the xDS
server / ztunnel client certificates that authenticate the ADS connection.

Depends on `cryptography` only; no other xdsserver package imports are allowed here (layering).
"""

from .authority import (
    BACKDATE,
    DEFAULT_ROOT_TTL,
    DEFAULT_SERVICE_TTL,
    DEFAULT_WORKLOAD_TTL,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    CertificateAuthority,
    Clock,
)
from .certs import (
    REDACTED,
    ServerCert,
    WorkloadCert,
    node_from_peer_cert,
    peer_uris,
    redact_pem,
    redact_private_keys,
    write_pem_files,
)
from .spiffe import SpiffeId, node_uri, parse_workload_id, workload_id

__all__ = [
    "BACKDATE",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SERVICE_TTL",
    "DEFAULT_WORKLOAD_TTL",
    "REDACTED",
    "ROOT_CERT_FILE",
    "ROOT_KEY_FILE",
    "CertificateAuthority",
    "Clock",
    "ServerCert",
    "SpiffeId",
    "WorkloadCert",
    "node_from_peer_cert",
    "node_uri",
    "parse_workload_id",
    "peer_uris",
    "redact_pem",
    "redact_private_keys",
    "workload_id",
    "write_pem_files",
]
