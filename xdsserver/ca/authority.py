"""The built-in CA: a root (or a user-supplied signing CA) that issues SPIFFE workload certificates.

Workload certificates are a pure function of (signing key, SPIFFE ID, rotation epoch): the key
pair is derived from the signing key with HKDF, the serial from the identity and epoch, validity
from the epoch, and the signature is deterministic (RFC 6979 for ECDSA, PKCS#1 v1.5 for RSA).
The reason is the xDS server: resource versions are content hashes, so two replicas on the same
root, or one replica after a restart, must produce the same `Secret` bytes, or every ztunnel that
reconnects elsewhere would get new keys although nothing changed. No private key is written to
disk. Epochs are half a certificate lifetime long and counted from the signing certificate's
`not_before` (shared by every replica); a certificate is re-issued when its epoch ends
(`rotate_due()` / `next_rotation()` let the server drive that from a timer). The README's threat
model has the trade-off.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certs import ServerCert, WorkloadCert, cert_uris, pem_certs, write_atomic
from .spiffe import SCHEME, node_uri, parse_workload_id, validate_node_name, validate_trust_domain

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
DEFAULT_SERVICE_TTL = timedelta(days=30)
"""Lifetime of the xDS server certificate and of node client certificates (not cached)."""
DEFAULT_ROOT_TTL = timedelta(days=3650)
BACKDATE = timedelta(minutes=5)
"""`not_before` lies this far in the past so peers with a slightly slow clock accept new certs
(workload certificates: this far before their epoch starts; they also end this far after
`epoch start + ttl`, so the half-life falls exactly on the next epoch)."""
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_KDF_SALT = b"xdsserver/workload-cert/v1"

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _key_pem(key: SigningKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``cert`` (no chain building, no time checks)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


class CertificateAuthority:
    """Issues SPIFFE certificates; build it with `load_or_create()` or `from_pem()`.

    `intermediates` are the certificates sent after each leaf (the signing CA and its chain when
    the signing CA is not the root itself; empty for a self-signed root).

    Thread-safe: every issuing and cache operation holds one lock (issuing an ECDSA P-256 leaf
    takes about a millisecond).
    """

    def __init__(
        self,
        *,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        intermediates: Sequence[x509.Certificate],
        root_cert: x509.Certificate,
        trust_domain: str,
        clock: Clock | None,
        workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    ) -> None:
        if workload_ttl <= timedelta(0):
            raise ValueError(f"workload_ttl must be positive, got {workload_ttl}")
        self._signing_cert = signing_cert
        self._signing_key = signing_key
        self._intermediates_pem = pem_certs(intermediates)
        self._root_cert = root_cert
        self._root_pem = pem_certs([root_cert])
        self._trust_domain = validate_trust_domain(trust_domain)
        self._clock = clock or _utc_now
        self._workload_ttl = workload_ttl
        self._epoch_len = workload_ttl / 2
        self._anchor = signing_cert.not_valid_before_utc
        # the secret every derived workload key comes from: only holders of the signing key know it
        self._kdf_key = hashlib.sha256(
            signing_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        ).digest()
        self._lock = threading.RLock()
        self._cache: dict[str, tuple[int, WorkloadCert]] = {}  # SPIFFE ID -> (epoch, certificate)

    # ------------------------------------------------------------------ construction

    @classmethod
    def load_or_create(
        cls,
        directory: Path | str | None,
        *,
        trust_domain: str = "cluster.local",
        clock: Clock | None = None,
        workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
    ) -> CertificateAuthority:
        """Load the self-signed root from `directory`, or generate and persist one there.

        Files: `root-cert.pem` and `root-key.pem` (mode 0600); workload certificates are derived,
        never stored. `directory=None` keeps the root in memory (a new root per process).
        """
        validate_trust_domain(trust_domain)
        now = _aware((clock or _utc_now)())
        if directory is None:
            cert, key = _new_root(trust_domain, now, root_ttl)
            return cls(
                signing_cert=cert, signing_key=key, intermediates=(), root_cert=cert,
                trust_domain=trust_domain, clock=clock, workload_ttl=workload_ttl,
            )
        directory = Path(directory)
        cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
        if cert_path.exists() and key_path.exists():
            mode = stat.S_IMODE(key_path.stat().st_mode)
            if mode & 0o077:
                log.warning("CA key %s is accessible by group/others (mode %o); expected 0600", key_path, mode)
            signing_cert, signing_key, intermediates, root = _parse_signing(
                cert_path.read_bytes(), key_path.read_bytes(), None,
                cert_source=str(cert_path), key_source=str(key_path), now=now,
            )
            log.info("loaded CA root from %s", cert_path)
        elif cert_path.exists() or key_path.exists():
            present, missing = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            raise ValueError(
                f"CA directory {directory}: found {present.name} but not {missing.name}; "
                "refusing to generate a new root over a partial one (restore or remove the file)"
            )
        else:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            signing_cert, signing_key = _new_root(trust_domain, now, root_ttl)
            intermediates, root = [], signing_cert
            write_atomic(key_path, _key_pem(signing_key), mode=0o600)
            write_atomic(cert_path, pem_certs([signing_cert]), mode=0o644)
            log.info("generated a new CA root in %s", cert_path)
        return cls(
            signing_cert=signing_cert, signing_key=signing_key, intermediates=intermediates,
            root_cert=root, trust_domain=trust_domain, clock=clock, workload_ttl=workload_ttl,
        )

    @classmethod
    def from_pem(
        cls,
        cert_pem: str | bytes,
        key_pem: str | bytes,
        *,
        root_pem: str | bytes | None = None,
        trust_domain: str = "cluster.local",
        clock: Clock | None = None,
        workload_ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    ) -> CertificateAuthority:
        """A user-supplied signing CA (e.g. from a Kubernetes Secret).

        `cert_pem` is the signing CA certificate, optionally followed by its intermediates (and
        the root). Without `root_pem` the last certificate of `cert_pem` must be self-signed and
        is the trust anchor. Replicas given the same signing CA issue identical workload
        certificates.
        """
        validate_trust_domain(trust_domain)
        now = _aware((clock or _utc_now)())
        signing_cert, signing_key, intermediates, root = _parse_signing(
            _bytes(cert_pem), _bytes(key_pem), None if root_pem is None else _bytes(root_pem),
            cert_source="CA certificate", key_source="CA key", now=now,
        )
        return cls(
            signing_cert=signing_cert, signing_key=signing_key, intermediates=intermediates,
            root_cert=root, trust_domain=trust_domain, clock=clock, workload_ttl=workload_ttl,
        )

    # ------------------------------------------------------------------ properties

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def root_pem(self) -> str:
        """The trust bundle (the root certificate) as PEM; goes into the `ROOTCA` secret."""
        return self._root_pem

    @property
    def root_fingerprint(self) -> str:
        """SHA-256 of the root certificate (DER), hex; for logs and debug pages."""
        return self._root_cert.fingerprint(hashes.SHA256()).hex()

    @property
    def workload_ttl(self) -> timedelta:
        return self._workload_ttl

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self._trust_domain!r}, "
            f"root_sha256={self.root_fingerprint[:16]}...)"
        )

    # ------------------------------------------------------------------ workload certificates

    def issue_workload(self, spiffe_id: str) -> WorkloadCert:
        """The certificate of `spiffe_id` for the current epoch (the same bytes on every replica).

        Raises ValueError for a malformed SPIFFE ID or one outside this CA's trust domain.
        """
        parse_workload_id(spiffe_id, trust_domain=self._trust_domain)
        with self._lock:
            epoch = self._epoch(self._now())
            cached = self._cache.get(spiffe_id)
            if cached is not None and cached[0] == epoch:
                return cached[1]
            cert = self._derive_workload(spiffe_id, epoch)
            self._cache[spiffe_id] = (epoch, cert)
            log.debug("issued workload certificate %s, epoch %d (renew at %s)", spiffe_id, epoch, cert.renew_at.isoformat())
            return cert

    def cached(self, spiffe_id: str) -> WorkloadCert | None:
        """The cached certificate for `spiffe_id` (possibly due), without issuing."""
        with self._lock:
            entry = self._cache.get(spiffe_id)
            return None if entry is None else entry[1]

    def identities(self) -> list[str]:
        """SPIFFE IDs with a cached certificate, sorted."""
        with self._lock:
            return sorted(self._cache)

    def rotate_due(self, now: datetime | None = None) -> list[str]:
        """Sorted SPIFFE IDs whose cached certificate belongs to another epoch than `now`'s.

        Nothing is re-issued here: the server calls `issue_workload()` for the IDs it still
        serves (and `discard()` for the others), then pushes the changed Secrets.
        """
        epoch = self._epoch(self._now() if now is None else _aware(now))
        with self._lock:
            return sorted(i for i, (e, _) in self._cache.items() if e != epoch)

    def next_rotation(self) -> datetime | None:
        """When the earliest cached certificate's epoch ends: when to run `rotate_due()` next."""
        with self._lock:
            epochs = [e for e, _ in self._cache.values()]
        return None if not epochs else self._epoch_start(min(epochs) + 1)

    def discard(self, spiffe_id: str) -> None:
        """Forget the cached certificate of an identity no longer served."""
        with self._lock:
            self._cache.pop(spiffe_id, None)

    # ------------------------------------------------------------------ other certificates

    def issue_server(
        self,
        dns_names: Iterable[str],
        ips: Iterable[str] = (),
        *,
        spiffe_id: str | None = None,
        ttl: timedelta = DEFAULT_SERVICE_TTL,
    ) -> ServerCert:
        """The xDS server's TLS certificate: DNS/IP SANs (+ optional SPIFFE URI), serverAuth."""
        dns = [_check_dns_name(d) for d in dns_names]
        ip_list = [_check_ip(i) for i in ips]
        uris = [] if spiffe_id is None else [self._check_uri(spiffe_id)]
        if not dns and not ip_list and not uris:
            raise ValueError("a server certificate needs at least one DNS name, IP or SPIFFE ID")
        with self._lock:
            cert = self._issue(uris, dns, ip_list, [ExtendedKeyUsageOID.SERVER_AUTH], ttl, self._now())
        return ServerCert(
            dns_names=tuple(dns), ips=tuple(str(i) for i in ip_list),
            cert_chain_pem=cert.cert_chain_pem, private_key_pem=cert.private_key_pem,
            not_before=cert.not_before, not_after=cert.not_after, uris=tuple(uris),
        )

    def issue_client(self, uris: str | Sequence[str], *, ttl: timedelta = DEFAULT_SERVICE_TTL) -> WorkloadCert:
        """A clientAuth-only certificate with the given `spiffe://<td>/...` URI SANs (not cached)."""
        uri_list = [uris] if isinstance(uris, str) else list(uris)
        if not uri_list:
            raise ValueError("a client certificate needs at least one URI")
        checked = [self._check_uri(u) for u in uri_list]
        with self._lock:
            return self._issue(checked, [], [], [ExtendedKeyUsageOID.CLIENT_AUTH], ttl, self._now())

    def issue_node_client(
        self, node_name: str, spiffe_id: str, *, ttl: timedelta = DEFAULT_SERVICE_TTL
    ) -> WorkloadCert:
        """A ztunnel's xDS client certificate, bound to its node.

        URI SANs: `spiffe_id` (e.g. `spiffe://<td>/ns/istio-system/sa/ztunnel`) and
        `spiffe://<td>/k8s-node/<node_name>`; `node_from_peer_cert()` reads the latter back.
        """
        parse_workload_id(spiffe_id, trust_domain=self._trust_domain)
        return self.issue_client([spiffe_id, node_uri(self._trust_domain, node_name)], ttl=ttl)

    # ------------------------------------------------------------------ internals

    def _now(self) -> datetime:
        return _aware(self._clock())

    def _check_uri(self, uri: str) -> str:
        prefix = f"{SCHEME}{self._trust_domain}/"
        if not isinstance(uri, str) or not uri.startswith(prefix) or len(uri) == len(prefix):
            raise ValueError(f"URI SAN {uri!r} must start with {prefix!r} (this CA's trust domain)")
        return uri

    def _epoch(self, now: datetime) -> int:
        return (now - self._anchor) // self._epoch_len

    def _epoch_start(self, epoch: int) -> datetime:
        return self._anchor + epoch * self._epoch_len

    def _derive_workload(self, spiffe_id: str, epoch: int) -> WorkloadCert:
        """Key, serial and validity from (signing key, identity, epoch); a deterministic signature."""
        info = f"{spiffe_id}\n{epoch}".encode()
        okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=_KDF_SALT, info=b"key\n" + info).derive(self._kdf_key)
        key = ec.derive_private_key(int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())
        serial = int.from_bytes(hmac.digest(self._kdf_key, b"serial\n" + info, "sha256")[:19], "big") | 1
        start = self._epoch_start(epoch)
        return self._issue(
            [spiffe_id], [], [], [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            self._workload_ttl, start, key=key, serial=serial, not_after=start + self._workload_ttl + BACKDATE,
        )

    def _issue(
        self,
        uris: Sequence[str],
        dns: Sequence[str],
        ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
        ekus: Sequence[x509.ObjectIdentifier],
        ttl: timedelta,
        now: datetime,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        serial: int | None = None,
        not_after: datetime | None = None,
    ) -> WorkloadCert:
        """Sign a leaf; with `key`/`serial`/`not_after` given (workloads) the result is deterministic."""
        if ttl <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {ttl}")
        deterministic = key is not None
        key = key or ec.generate_private_key(ec.SECP256R1())
        not_before = (now - BACKDATE).replace(microsecond=0)
        not_after = min((not_after or now + ttl).replace(microsecond=0), self._signing_cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(i) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
            # the subject is empty, so RFC 5280 requires the SAN extension to be critical
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(_aki(self._signing_cert), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(self._signing_key, hashes.SHA256(), ecdsa_deterministic=deterministic if isinstance(self._signing_key, ec.EllipticCurvePrivateKey) else None)
        )
        return self._workload_cert(cert, _key_pem(key))

    def _workload_cert(self, leaf: x509.Certificate, key_pem: str) -> WorkloadCert:
        uris = cert_uris(leaf)
        return WorkloadCert(
            spiffe_id=uris[0] if uris else "",
            cert_chain_pem=pem_certs([leaf]) + self._intermediates_pem,
            private_key_pem=key_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            uris=tuple(uris),
        )


def _bytes(pem: str | bytes) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


def _check_dns_name(name: str) -> str:
    bare = name[2:] if name.startswith("*.") else name
    try:
        validate_node_name(bare)  # same syntax: a DNS subdomain name
    except ValueError:
        raise ValueError(f"invalid DNS name {name!r} for a server certificate") from None
    return name


def _check_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"invalid IP address {ip!r} for a server certificate") from None


def _new_root(trust_domain: str, now: datetime, ttl: timedelta) -> tuple[x509.Certificate, SigningKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, "xdsserver root CA"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before((now - BACKDATE).replace(microsecond=0))
        .not_valid_after((now + ttl).replace(microsecond=0))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _parse_signing(
    cert_pem: bytes,
    key_pem: bytes,
    root_pem: bytes | None,
    *,
    cert_source: str,
    key_source: str,
    now: datetime,
) -> tuple[x509.Certificate, SigningKey, list[x509.Certificate], x509.Certificate]:
    """Parse and check a signing CA: (signing cert, key, certs sent after the leaf, root)."""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ValueError(f"{cert_source}: no valid PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{key_source}: unsupported key type {type(key).__name__}; use ECDSA or RSA")
    signing, chain = certs[0], certs[1:]
    if _spki(key.public_key()) != _spki(signing.public_key()):
        raise ValueError(f"{key_source} does not match the first certificate of {cert_source}")
    if not _is_ca(signing):
        raise ValueError(f"{cert_source}: the first certificate is not a CA (basicConstraints CA:TRUE missing)")
    if root_pem is not None:
        try:
            root = x509.load_pem_x509_certificates(root_pem)[0]
        except ValueError as exc:
            raise ValueError(f"root certificate: no valid PEM certificate ({exc})") from None
        if chain and chain[-1] == root:
            chain = chain[:-1]
    elif chain:
        root, chain = chain[-1], chain[:-1]
    else:
        root = signing
    path = [signing, *chain] if root == signing else [signing, *chain, root]
    for child, parent in zip(path, path[1:]):
        if not issued_by(child, parent):
            raise ValueError(
                f"{cert_source}: certificate {child.subject.rfc4514_string()!r} is not signed by "
                f"{parent.subject.rfc4514_string()!r}"
            )
    if not issued_by(root, root):
        raise ValueError(
            f"{cert_source}: no self-signed root; pass the trust anchor as root_pem "
            f"(last certificate is {root.subject.rfc4514_string()!r})"
        )
    for c in path:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ValueError(
                f"{cert_source}: certificate {c.subject.rfc4514_string()!r} is not valid now "
                f"(valid {c.not_valid_before_utc.isoformat()} .. {c.not_valid_after_utc.isoformat()})"
            )
    # what follows the leaf in a chain: the signing CA and its intermediates, never the root
    return signing, key, ([] if root == signing else [signing, *chain]), root


__all__ = [
    "BACKDATE",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SERVICE_TTL",
    "DEFAULT_WORKLOAD_TTL",
    "ROOT_CERT_FILE",
    "ROOT_KEY_FILE",
    "CertificateAuthority",
    "Clock",
]
