"""SDS Secrets: one per node-local identity (named by its SPIFFE ID) plus ``ROOTCA``.

Certificates are handed in by the caller (the CA lives in ``xdsserver.ca``; translate does not
import it), so translation stays a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from ..model import Identity
from . import names


@dataclass(frozen=True, slots=True)
class CertPair:
    cert_chain_pem: str
    private_key_pem: str

    def __repr__(self) -> str:  # never print key material
        return "CertPair(<redacted>)"


class CertProvider(Protocol):
    """What translation needs from a CA: a root bundle and a cert per identity."""

    def root_pem(self) -> str: ...

    def workload(self, identity: Identity) -> CertPair: ...


def build_workload_secret(identity: Identity, cert: CertPair) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=names.workload_secret(identity),
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_string=cert.cert_chain_pem),
            private_key=base_pb2.DataSource(inline_string=cert.private_key_pem),
        ),
    )


def build_root_secret(root_pem: str) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=names.ROOTCA_SECRET,
        validation_context=common_pb2.CertificateValidationContext(trusted_ca=base_pb2.DataSource(inline_string=root_pem)),
    )
