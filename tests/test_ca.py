"""The built-in CA: root persistence, workload certificates, caching/rotation, peer node binding."""

from __future__ import annotations

import shutil
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xdsserver.ca import (
    BACKDATE,
    REDACTED,
    CertificateAuthority,
    node_from_peer_cert,
    node_uri,
    parse_workload_id,
    peer_uris,
    redact_pem,
    redact_private_keys,
    workload_id,
    write_pem_files,
)

TD = "cluster.local"
ID = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
ZTUNNEL_ID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def leaf(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem.encode())[0]


def root_of(ca: CertificateAuthority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.root_pem.encode())


# ------------------------------------------------------------------ root


def test_root_persisted_with_private_key_mode_0600_and_reloaded(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", clock=FakeClock())
    cert_file, key_file = tmp_path / "ca" / "root-cert.pem", tmp_path / "ca" / "root-key.pem"
    assert cert_file.read_text() == ca.root_pem
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in key_file.read_text()

    again = CertificateAuthority.load_or_create(tmp_path / "ca", clock=FakeClock())
    assert again.root_pem == ca.root_pem
    assert again.root_fingerprint == ca.root_fingerprint
    # a certificate issued after the reload still chains to the persisted root
    leaf(again.issue_workload(ID).cert_chain_pem).verify_directly_issued_by(root_of(ca))


def test_root_is_a_ca_for_the_trust_domain() -> None:
    ca = CertificateAuthority.load_or_create(None, trust_domain="example.org", clock=FakeClock())
    root = root_of(ca)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "example.org"
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    root.verify_directly_issued_by(root)


def test_in_memory_ca_gets_a_new_root_each_time() -> None:
    a = CertificateAuthority.load_or_create(None)
    b = CertificateAuthority.load_or_create(None)
    assert a.root_pem != b.root_pem


def test_partial_root_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "root-key.pem").unlink()
    before = (tmp_path / "root-cert.pem").read_bytes()
    with pytest.raises(ValueError, match="found root-cert.pem but not root-key.pem"):
        CertificateAuthority.load_or_create(tmp_path)
    assert (tmp_path / "root-cert.pem").read_bytes() == before
    assert not (tmp_path / "root-key.pem").exists()


def test_corrupt_root_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "root-cert.pem").write_text("not a certificate\n")
    (tmp_path / "root-key.pem").write_text("not a key\n")
    with pytest.raises(ValueError, match="root-cert.pem"):
        CertificateAuthority.load_or_create(tmp_path)
    assert (tmp_path / "root-cert.pem").read_text() == "not a certificate\n"


def test_bad_trust_domain() -> None:
    with pytest.raises(ValueError, match="invalid trust domain"):
        CertificateAuthority.load_or_create(None, trust_domain="spiffe://cluster.local")


# ------------------------------------------------------------------ workload certificates


def test_workload_cert_shape() -> None:
    clock = FakeClock()
    ca = CertificateAuthority.load_or_create(None, clock=clock)
    wc = ca.issue_workload(ID)
    assert wc.spiffe_id == ID and wc.uris == (ID,)
    certs = x509.load_pem_x509_certificates(wc.cert_chain_pem.encode())
    assert len(certs) == 1, "self-signed CA: the chain is the leaf only (root goes to ROOTCA)"
    cert = certs[0]
    cert.verify_directly_issued_by(root_of(ca))
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # 24 h lifetime, backdated a few minutes
    assert cert.not_valid_before_utc == wc.not_before
    assert cert.not_valid_after_utc == wc.not_after == T0 + timedelta(hours=24)
    assert T0 - timedelta(minutes=10) <= wc.not_before < T0
    # the key belongs to the certificate
    key = serialization.load_pem_private_key(wc.private_key_pem.encode(), None)
    assert key.public_key() == cert.public_key()


def test_workload_ttl_is_configurable() -> None:
    ca = CertificateAuthority.load_or_create(None, clock=FakeClock(), workload_ttl=timedelta(hours=2))
    assert ca.issue_workload(ID).not_after == T0 + timedelta(hours=2)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("cluster.local/ns/default/sa/x", "expected 'spiffe://"),
        ("spiffe://cluster.local/ns/default", "expected 'spiffe://"),
        ("spiffe://cluster.local/ns/default/sa/x/extra", "expected 'spiffe://"),
        ("spiffe://cluster.local/sa/x/ns/default", "expected 'spiffe://"),
        ("spiffe://Cluster.Local/ns/default/sa/x", "invalid trust domain"),
        ("spiffe://cluster.local/ns/De_fault/sa/x", "namespace 'De_fault'"),
        ("spiffe://cluster.local/ns/default/sa/", "service account ''"),
        ("spiffe://other.domain/ns/default/sa/x", "trust domain 'other.domain'"),
    ],
)
def test_bad_spiffe_id_is_rejected(bad: str, message: str) -> None:
    ca = CertificateAuthority.load_or_create(None)
    with pytest.raises(ValueError, match=message):
        ca.issue_workload(bad)
    assert ca.identities() == []


def test_spiffe_helpers() -> None:
    assert workload_id(TD, "default", "sa.with.dots") == "spiffe://cluster.local/ns/default/sa/sa.with.dots"
    parsed = parse_workload_id(ID)
    assert (parsed.trust_domain, parsed.namespace, parsed.service_account) == (
        TD, "default", "bookinfo-productpage",
    )
    assert str(parsed) == ID
    assert node_uri(TD, "worker-1.example") == "spiffe://cluster.local/k8s-node/worker-1.example"
    with pytest.raises(ValueError, match="invalid node name"):
        node_uri(TD, "Worker_1")


def test_repr_and_str_never_show_the_private_key() -> None:
    ca = CertificateAuthority.load_or_create(None)
    for cert in (
        ca.issue_workload(ID),
        ca.issue_server(["xds.example"], ["127.0.0.1"]),
        ca.issue_node_client("n1", ZTUNNEL_ID),
    ):
        body = cert.private_key_pem.splitlines()[1]
        for text in (repr(cert), str(cert), f"{cert}", repr([cert])):
            assert "PRIVATE KEY" not in text and body not in text
            assert REDACTED in text
    assert "PRIVATE" not in repr(ca)


# ------------------------------------------------------------------ cache and rotation


def test_cache_reuses_until_the_epoch_ends_then_reissues() -> None:
    clock = FakeClock()
    ca = CertificateAuthority.load_or_create(None, clock=clock)
    first = ca.issue_workload(ID)
    assert ca.issue_workload(ID) is first
    assert ca.next_rotation() == first.renew_at
    assert first.renew_at == first.not_before + (first.not_after - first.not_before) / 2

    clock.now = first.renew_at - timedelta(seconds=1)
    assert ca.rotate_due() == []
    assert ca.issue_workload(ID) is first

    clock.now = first.renew_at
    assert ca.rotate_due() == [ID]
    assert ca.rotate_due(T0) == []  # explicit `now` wins over the clock
    second = ca.issue_workload(ID)
    assert second.cert_chain_pem != first.cert_chain_pem
    assert second.private_key_pem != first.private_key_pem
    # epochs are back to back: the next certificate starts where the previous one's half-life is
    assert second.not_before == first.renew_at - BACKDATE
    assert second.not_after == first.renew_at + timedelta(hours=24) + BACKDATE
    assert ca.rotate_due() == []
    assert ca.issue_workload(ID) is second


def test_clock_going_back_an_epoch_reissues() -> None:
    clock = FakeClock()
    ca = CertificateAuthority.load_or_create(None, clock=clock)
    first = ca.issue_workload(ID)
    clock.now = T0 - timedelta(hours=13)
    assert ca.rotate_due() == [ID]
    assert ca.issue_workload(ID) != first


def test_restart_and_replicas_issue_byte_identical_certificates(tmp_path: Path) -> None:
    """Replicas sharing a root agree on every Secret (issue 13): derived keys, serials, validity and
    a deterministic signature; a restart likewise changes nothing, and no key is written to disk."""
    clock = FakeClock()
    ca = CertificateAuthority.load_or_create(tmp_path, clock=clock)
    ids = [workload_id(TD, "default", f"sa-{i}") for i in range(3)]
    issued = {i: ca.issue_workload(i) for i in ids}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root-cert.pem", "root-key.pem"]

    clock.now = T0 + timedelta(hours=3)  # another replica, or a restart a few hours later
    replica = CertificateAuthority.load_or_create(tmp_path, clock=clock)
    for i in ids:
        again = replica.issue_workload(i)
        assert again == issued[i], "replicas and restarts must not change certificates (Secret versions)"
    assert len({c.private_key_pem for c in issued.values()}) == 3, "one key per identity"
    assert len({leaf(c.cert_chain_pem).serial_number for c in issued.values()}) == 3

    clock.now = T0 + timedelta(hours=13)
    assert replica.rotate_due() == sorted(ids)
    # the next epoch: new keys, still the same on every replica
    nxt = replica.issue_workload(ids[0])
    assert nxt != issued[ids[0]]
    assert CertificateAuthority.load_or_create(tmp_path, clock=clock).issue_workload(ids[0]) == nxt


def test_another_root_derives_other_keys(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path / "a", clock=FakeClock())
    b = CertificateAuthority.load_or_create(tmp_path / "b", clock=FakeClock())
    wa, wb = a.issue_workload(ID), b.issue_workload(ID)
    assert wa.private_key_pem != wb.private_key_pem
    leaf(wb.cert_chain_pem).verify_directly_issued_by(root_of(b))


def test_discard_forgets() -> None:
    ca = CertificateAuthority.load_or_create(None)
    ca.issue_workload(ID)
    ca.discard(ID)
    ca.discard(ID)  # idempotent
    assert ca.cached(ID) is None and ca.identities() == []


# ------------------------------------------------------------------ user-supplied CA


def _make_ca(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(T0 + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_from_pem_self_signed_root(tmp_path: Path) -> None:
    root, key = _make_ca("user root")
    ca = CertificateAuthority.from_pem(_pem(root), _key(key), clock=FakeClock())
    assert ca.root_pem == _pem(root)
    wc = ca.issue_workload(ID)
    leaf(wc.cert_chain_pem).verify_directly_issued_by(root)
    again = CertificateAuthority.from_pem(_pem(root), _key(key), clock=FakeClock())
    assert again.issue_workload(ID) == wc, "replicas given the same signing CA agree"


def test_from_pem_intermediate_puts_it_in_the_chain() -> None:
    root, root_key = _make_ca("user root")
    inter, inter_key = _make_ca("user intermediate", (root, root_key))
    ca = CertificateAuthority.from_pem(_pem(inter), _key(inter_key), root_pem=_pem(root), clock=FakeClock())
    assert ca.root_pem == _pem(root)
    chain = x509.load_pem_x509_certificates(ca.issue_workload(ID).cert_chain_pem.encode())
    assert [c.subject for c in chain[1:]] == [inter.subject]
    chain[0].verify_directly_issued_by(inter)
    # the same, with the root appended to the CA bundle instead of root_pem
    bundled = CertificateAuthority.from_pem(_pem(inter) + _pem(root), _key(inter_key), clock=FakeClock())
    assert bundled.root_pem == _pem(root)


@pytest.mark.parametrize("case", ["key mismatch", "not a ca", "no root", "wrong root", "expired", "garbage"])
def test_from_pem_rejects_bad_input(case: str) -> None:
    root, key = _make_ca("user root")
    other, other_key = _make_ca("other root")
    inter, inter_key = _make_ca("inter", (root, key))
    args: dict = {"clock": FakeClock()}
    if case == "key mismatch":
        cert_pem, key_pem, match = _pem(root), _key(other_key), "does not match"
    elif case == "not a ca":
        ca = CertificateAuthority.load_or_create(None, clock=FakeClock())
        wc = ca.issue_workload(ID)
        cert_pem, key_pem, match = wc.cert_chain_pem, wc.private_key_pem, "not a CA"
    elif case == "no root":
        cert_pem, key_pem, match = _pem(inter), _key(inter_key), "no self-signed root"
    elif case == "wrong root":
        cert_pem, key_pem, match = _pem(inter), _key(inter_key), "is not signed by"
        args["root_pem"] = _pem(other)
    elif case == "expired":
        cert_pem, key_pem, match = _pem(root), _key(key), "not valid now"
        args["clock"] = FakeClock(T0 + timedelta(days=400))
    else:
        cert_pem, key_pem, match = "garbage", _key(key), "no valid PEM certificate"
    with pytest.raises(ValueError, match=match):
        CertificateAuthority.from_pem(cert_pem, key_pem, **args)


# ------------------------------------------------------------------ server / node client certs


def test_server_cert_sans_and_eku() -> None:
    ca = CertificateAuthority.load_or_create(None, clock=FakeClock())
    sc = ca.issue_server(["xdsserver.istio-system.svc"], ["127.0.0.1", "::1"])
    cert = leaf(sc.cert_chain_pem)
    cert.verify_directly_issued_by(root_of(ca))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xdsserver.istio-system.svc"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    with pytest.raises(ValueError, match="invalid IP address"):
        ca.issue_server([], ["300.1.1.1"])
    with pytest.raises(ValueError, match="invalid DNS name"):
        ca.issue_server(["bad_name"])
    with pytest.raises(ValueError, match="at least one"):
        ca.issue_server([])


def test_node_client_cert_binds_the_node() -> None:
    ca = CertificateAuthority.load_or_create(None, clock=FakeClock())
    nc = ca.issue_node_client("worker-1", ZTUNNEL_ID)
    assert nc.spiffe_id == ZTUNNEL_ID
    assert nc.uris == (ZTUNNEL_ID, "spiffe://cluster.local/k8s-node/worker-1")
    cert = leaf(nc.cert_chain_pem)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert node_from_peer_cert(nc.cert_chain_pem) == "worker-1"
    assert node_from_peer_cert(nc.cert_chain_pem.encode()) == "worker-1"
    assert node_from_peer_cert(cert.public_bytes(serialization.Encoding.DER)) == "worker-1"
    assert node_from_peer_cert(nc.cert_chain_pem, trust_domain=TD) == "worker-1"
    assert node_from_peer_cert(nc.cert_chain_pem, trust_domain="other.domain") is None
    assert peer_uris(nc.cert_chain_pem) == list(nc.uris)
    # workload certs and garbage name no node; two nodes are ambiguous
    assert node_from_peer_cert(ca.issue_workload(ID).cert_chain_pem) is None
    assert node_from_peer_cert(b"\x30\x03garbage") is None
    two = ca.issue_client([node_uri(TD, "a"), node_uri(TD, "b")])
    assert node_from_peer_cert(two.cert_chain_pem) is None
    with pytest.raises(ValueError, match="trust domain"):
        ca.issue_client(["spiffe://other.domain/k8s-node/a"])
    with pytest.raises(ValueError, match="invalid node name"):
        ca.issue_node_client("Bad_Node", ZTUNNEL_ID)
    with pytest.raises(ValueError, match="trust domain"):
        ca.issue_node_client("n", "spiffe://other.domain/ns/istio-system/sa/ztunnel")


# ------------------------------------------------------------------ redaction


def test_redaction() -> None:
    ca = CertificateAuthority.load_or_create(None)
    wc = ca.issue_workload(ID)
    text = f"chain:\n{wc.cert_chain_pem}key:\n{wc.private_key_pem}end"
    red = redact_pem(text)
    assert "PRIVATE KEY" not in red and wc.cert_chain_pem in red and REDACTED in red
    rsa_block = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"
    assert redact_pem(rsa_block) == REDACTED

    secret = {
        "name": ID,
        "tls_certificate": {
            "certificate_chain": {"inline_string": wc.cert_chain_pem},
            "private_key": {"inline_string": wc.private_key_pem},
        },
        "other": [wc.private_key_pem, 3],
    }
    out = redact_private_keys(secret)
    assert out["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}
    assert out["tls_certificate"]["certificate_chain"]["inline_string"] == wc.cert_chain_pem
    assert out["other"] == [REDACTED, 3]
    assert secret["tls_certificate"]["private_key"]["inline_string"] == wc.private_key_pem  # input untouched


# ------------------------------------------------------------------ a real TLS handshake


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_name: str) -> dict:
    """One mutual-TLS handshake over loopback; returns what each side saw of its peer."""
    result: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    result["server_saw"] = tls.getpeercert()
                    tls.sendall(b"ok")
            except Exception as exc:  # reported through `result`
                result["server_error"] = exc

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                result["client_saw"] = tls.getpeercert()
                result["data"] = tls.recv(2)
        t.join(10)
        assert not t.is_alive()
    return result


def _ctx(side: int, ca: CertificateAuthority, cert, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    cert_file, key_file = write_pem_files(cert, tmp)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(cadata=ca.root_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_real_mtls_handshake_server_cert_and_node_client(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(None)
    server = _ctx(ssl.PROTOCOL_TLS_SERVER, ca, ca.issue_server(["xds.test"], ["127.0.0.1"]), tmp_path / "s")
    client = _ctx(ssl.PROTOCOL_TLS_CLIENT, ca, ca.issue_node_client("worker-1", ZTUNNEL_ID), tmp_path / "c")
    assert stat.S_IMODE((tmp_path / "c" / "key.pem").stat().st_mode) == 0o600
    result = _handshake(server, client, "xds.test")
    assert "server_error" not in result, result.get("server_error")
    assert result["data"] == b"ok"
    assert ("URI", "spiffe://cluster.local/k8s-node/worker-1") in result["server_saw"]["subjectAltName"]


def test_real_mtls_handshake_workload_cert_is_client_and_server(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(None)
    wc = ca.issue_workload(ID)
    server = _ctx(ssl.PROTOCOL_TLS_SERVER, ca, wc, tmp_path / "s")
    client = _ctx(ssl.PROTOCOL_TLS_CLIENT, ca, ca.issue_workload(ZTUNNEL_ID), tmp_path / "c")
    client.check_hostname = False  # SPIFFE peers are checked by URI SAN, not host name
    result = _handshake(server, client, "ignored")
    assert "server_error" not in result, result.get("server_error")
    assert result["client_saw"]["subjectAltName"] == (("URI", ID),)
    assert result["server_saw"]["subjectAltName"] == (("URI", ZTUNNEL_ID),)


def test_foreign_ca_is_rejected_in_a_real_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(None)
    foreign = CertificateAuthority.load_or_create(None)
    server = _ctx(ssl.PROTOCOL_TLS_SERVER, ca, ca.issue_server(["xds.test"]), tmp_path / "s")
    client = _ctx(ssl.PROTOCOL_TLS_CLIENT, foreign, foreign.issue_node_client("w", ZTUNNEL_ID), tmp_path / "c")
    with pytest.raises(ssl.SSLError):
        _handshake(server, client, "xds.test")


def test_rsa_signing_ca_is_deterministic_too() -> None:
    """PKCS#1 v1.5 signatures are deterministic; replicas on an RSA signing CA agree as well."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    root = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(T0 - timedelta(days=1)).not_valid_after(T0 + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    a = CertificateAuthority.from_pem(_pem(root), key_pem, clock=FakeClock())
    b = CertificateAuthority.from_pem(_pem(root), key_pem, clock=FakeClock())
    wa = a.issue_workload(ID)
    assert wa == b.issue_workload(ID)
    leaf(wa.cert_chain_pem).verify_directly_issued_by(root)
