"""Issued certificates as values, plus the helpers that read peers' certs and keep keys out of logs.

The dataclasses hold PEM text because that is what everyone downstream consumes: `translate/`
puts it inline into `Secret` resources, gRPC takes it as bytes, files are PEM. Their `repr()`
never shows the private key (they end up in logs, tracebacks and debug pages).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from .spiffe import node_from_uri

REDACTED = "[redacted]"
"""What Envoy's admin prints instead of a private key (`{"inline_string": "[redacted]"}`)."""

_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----\n?", re.DOTALL
)


def _renew_at(not_before: datetime, not_after: datetime) -> datetime:
    return not_before + (not_after - not_before) / 2


@dataclass(frozen=True, repr=False, slots=True)
class WorkloadCert:
    """A leaf certificate and its key for one SPIFFE identity.

    `cert_chain_pem` is the leaf followed by any intermediate CAs, never the root: the root
    travels separately as the trust bundle (`ROOTCA`), and with a self-signed CA the chain is just
    the leaf. `uris` lists every URI SAN (`spiffe_id` first; node client certs carry a second).
    """

    spiffe_id: str
    cert_chain_pem: str
    private_key_pem: str
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...] = ()

    @property
    def renew_at(self) -> datetime:
        """Half-life: after this the CA re-issues instead of re-using the cached certificate."""
        return _renew_at(self.not_before, self.not_after)

    @property
    def leaf_pem(self) -> str:
        """The first certificate of the chain."""
        end = "-----END CERTIFICATE-----\n"
        return self.cert_chain_pem[: self.cert_chain_pem.index(end) + len(end)]

    def __repr__(self) -> str:
        return (
            f"WorkloadCert(spiffe_id={self.spiffe_id!r}, not_before={self.not_before.isoformat()}, "
            f"not_after={self.not_after.isoformat()}, private_key_pem={REDACTED!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True, repr=False, slots=True)
class ServerCert:
    """The xDS server's own TLS certificate (DNS/IP SANs, serverAuth)."""

    dns_names: tuple[str, ...]
    ips: tuple[str, ...]
    cert_chain_pem: str
    private_key_pem: str
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...] = ()

    @property
    def renew_at(self) -> datetime:
        return _renew_at(self.not_before, self.not_after)

    def __repr__(self) -> str:
        return (
            f"ServerCert(dns_names={list(self.dns_names)!r}, ips={list(self.ips)!r}, "
            f"not_after={self.not_after.isoformat()}, private_key_pem={REDACTED!r})"
        )

    __str__ = __repr__


def redact_pem(text: str) -> str:
    """Replace every PEM private-key block in `text` by `[redacted]`; certificates stay."""
    return _PRIVATE_KEY_BLOCK.sub(REDACTED, text)


def redact_private_keys(obj: Any) -> Any:
    """A copy of a JSON-like config (e.g. a Secret as a dict) with private keys redacted.

    Any `private_key` field becomes `{"inline_string": "[redacted]"}` like Envoy's admin; PEM
    private keys hidden in other strings are redacted too.
    """
    if isinstance(obj, Mapping):
        return {
            k: ({"inline_string": REDACTED} if k in ("private_key", "privateKey") else redact_private_keys(v))
            for k, v in obj.items()
        }
    if isinstance(obj, str):
        return redact_pem(obj)
    if isinstance(obj, (list, tuple)):
        return [redact_private_keys(v) for v in obj]
    return obj


def load_peer_cert(pem_or_der: str | bytes) -> x509.Certificate:
    """Parse one certificate given as PEM (str or bytes) or DER bytes (first one if several)."""
    if isinstance(pem_or_der, str):
        pem_or_der = pem_or_der.encode()
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificates(pem_or_der)[0]
    return x509.load_der_x509_certificate(pem_or_der)


def cert_uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs of `cert`, in certificate order (empty if there is no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def peer_uris(pem_or_der: str | bytes) -> list[str]:
    """The URI SANs of a peer certificate given as PEM or DER."""
    return cert_uris(load_peer_cert(pem_or_der))


def node_from_peer_cert(pem_or_der: str | bytes, *, trust_domain: str | None = None) -> str | None:
    """The node a ztunnel client certificate is bound to (`spiffe://<td>/k8s-node/<node>`).

    None when the certificate names no node, names several (ambiguous: never guess when deciding
    who may receive private keys), or cannot be parsed. With `trust_domain`, node URIs of other
    trust domains are ignored.
    """
    try:
        uris = peer_uris(pem_or_der)
    except ValueError:
        return None
    nodes = {n for n in (node_from_uri(u, trust_domain=trust_domain) for u in uris) if n is not None}
    return nodes.pop() if len(nodes) == 1 else None


def write_pem_files(
    cert: WorkloadCert | ServerCert,
    directory: Path,
    *,
    cert_name: str = "cert-chain.pem",
    key_name: str = "key.pem",
) -> tuple[Path, Path]:
    """Write `cert` as two PEM files (key mode 0600, atomically) for file-based TLS configs."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / cert_name, directory / key_name
    write_atomic(key_path, cert.private_key_pem, mode=0o600)
    write_atomic(cert_path, cert.cert_chain_pem, mode=0o644)
    return cert_path, key_path


def write_atomic(path: Path, text: str, *, mode: int) -> None:
    """Write `text` to `path` via a temp file + rename; the file never exists with a wider mode."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def pem_certs(certs: Sequence[x509.Certificate]) -> str:
    """Concatenate certificates as PEM text."""
    return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in certs)
