"""Node-bound secrets: node-credentials (TokenReview -> node certificate) and ADS over mTLS.

The Kubernetes API server here is a STAND-IN (tests/kubeapi.py, on its own thread via
tests/kubeapi_thread.py): no real API server can be run in this environment. It serves the real
list/watch and TokenReview HTTP API, and ``xdsserver serve --source kubernetes`` (a subprocess)
talks to it with the official ``kubernetes`` client. Tokens are ones the test registers with the
pod-name/pod-uid/node-name extras that projected (bound) service-account tokens carry.

Covered: a ztunnel obtains its node certificate with the real ``xdsserver node-credentials`` CLI
and a real Envoy connects over mTLS (``xdsserver bootstrap --xds-tls-dir``) and receives exactly
its node's identities; node-credentials refuses other service accounts, other nodes, unbound,
unknown and wrong-audience tokens; the ADS TLS port refuses a stream for another node, no client
certificate, a workload certificate and a foreign CA; ``--renew`` replaces the files atomically.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from harness import Proc, env_without_proxy, free_port, http_get, http_json, poll, section
from kubeapi_thread import ThreadedStandIn, namespace, node, pod, service, service_account, ztunnel_pod
from xdsclient import SotwClient
from xdsserver.ca import CertificateAuthority, node_from_peer_cert, peer_uris
from xdsserver.nodeauth import NodeAuthorizer, NodeCredentials, ServerCertificates, TokenReviewResult, make_authorizer
from xdsserver.nodecreds import fetch
from xdsserver.sources import SourceObject

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TD = "cluster.local"
ZTUNNEL_ID = f"spiffe://{TD}/ns/istio-system/sa/ztunnel"
SERVER_NAME = "xdsserver"
ENV = env_without_proxy()



def sa_id(name: str, ns: str = "default") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


class Cluster:
    """The stand-in cluster, one `xdsserver serve` with TLS, and its ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kube = ThreadedStandIn().start()
        self.uids: dict[str, str] = {}
        self.xds_port, self.tls_port, self.creds_port, self.debug_port = (free_port() for _ in range(4))
        self.proc: Proc | None = None

    def populate(self) -> None:
        k = self.kube
        k.create(namespace("default"))
        k.create(namespace("istio-system", enrolled=False))
        k.create(node("node-a", "172.18.0.2", "10.244.0.0/24"))
        k.create(node("node-b", "172.18.0.3", "10.244.1.0/24"))
        for sa in ("sleep", "httpbin", "reviews"):
            k.create(service_account(sa))
        k.create(service_account("ztunnel", "istio-system"))
        k.create(pod("sleep-0", "10.244.0.5", node_name="node-a", sa="sleep"))
        k.create(pod("reviews-0", "10.244.0.6", node_name="node-a", sa="reviews"))
        k.create(pod("httpbin-0", "10.244.1.5", node_name="node-b", sa="httpbin"))
        k.create(service("httpbin", "10.96.0.10"))
        for name, ip, on in (("ztunnel-a", "10.244.0.2", "node-a"), ("ztunnel-b", "10.244.1.2", "node-b")):
            self.uids[name] = k.create(ztunnel_pod(name, ip, on))["metadata"]["uid"]
        self.uids["sleep-0"] = k.get("Pod", "sleep-0", "default")["metadata"]["uid"]

        def tokens(api: Any) -> None:
            zt = {"namespace": "istio-system", "service_account": "ztunnel", "audiences": ("xdsserver",)}
            api.register_token("tok-a", pod_name="ztunnel-a", pod_uid=self.uids["ztunnel-a"], node_name="node-a", **zt)
            api.register_token("tok-b", pod_name="ztunnel-b", pod_uid=self.uids["ztunnel-b"], node_name="node-b", **zt)
            # older API servers put no node-name extra in the token: the pod's node decides
            api.register_token("tok-a-no-node", pod_name="ztunnel-a", pod_uid=self.uids["ztunnel-a"], **zt)
            api.register_token("tok-unbound", **zt)  # a legacy Secret-based token: no pod binding
            api.register_token("tok-old-pod", pod_name="ztunnel-a", pod_uid="0b5e1e7e-dead-4bad-beef-000000000000",
                               node_name="node-a", **zt)  # from a ztunnel pod that was replaced
            api.register_token("tok-api-audience", namespace="istio-system", service_account="ztunnel",
                               pod_name="ztunnel-a", pod_uid=self.uids["ztunnel-a"], node_name="node-a")
            api.register_token("tok-sleep", namespace="default", service_account="sleep", pod_name="sleep-0",
                               pod_uid=self.uids["sleep-0"], node_name="node-a", audiences=("xdsserver",))

        k.call(tokens)

    def start(self) -> None:
        kubeconfig = self.kube.write_kubeconfig(self.workdir / "kubeconfig")
        argv = [sys.executable, "-m", "xdsserver", "serve", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
                "--xds-address", f"127.0.0.1:{self.xds_port}", "--xds-tls-address", f"127.0.0.1:{self.tls_port}",
                "--node-credentials-address", f"127.0.0.1:{self.creds_port}",
                "--debug-address", f"127.0.0.1:{self.debug_port}", "--ca-dir", str(self.workdir / "ca"),
                "--debounce-quiet", "0.05"]
        self.proc = Proc(argv, self.workdir / "serve.log", env=ENV)
        poll(lambda: http_get(f"{self.debug}/ready")[0] == 200, what="xdsserver /ready", timeout=30)

    @property
    def debug(self) -> str:
        return f"http://127.0.0.1:{self.debug_port}"

    @property
    def root(self) -> Path:
        return self.workdir / "ca" / "root-cert.pem"

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
        self.kube.stop()

    def node_credentials(self, token: str, node_name: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        token_file = self.workdir / f"token-{token}"
        token_file.write_text(token + "\n")
        argv = [sys.executable, "-m", "xdsserver", "node-credentials", "--server", f"127.0.0.1:{self.creds_port}",
                "--server-name", SERVER_NAME, "--token-file", str(token_file), "--node", node_name, "--out", str(out),
                "--ca-file", str(self.root), "--timeout", "10", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=ENV)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("nodeauth"))
    try:
        c.populate()
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def creds_a(cluster: Cluster) -> Path:
    out = cluster.workdir / "creds-a"
    r = cluster.node_credentials("tok-a", "node-a", out)
    assert r.returncode == 0, r.stderr
    return out


def _mtls_channel(cluster: Cluster, creds: Path | None = None, *, key: bytes | None = None,
                  chain: bytes | None = None, root: bytes | None = None) -> grpc.aio.Channel:
    if creds is not None:
        key, chain = (creds / "key.pem").read_bytes(), (creds / "cert-chain.pem").read_bytes()
    tls = grpc.ssl_channel_credentials(root_certificates=root or cluster.root.read_bytes(), private_key=key,
                                       certificate_chain=chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{cluster.tls_port}", tls,
                                   options=[("grpc.ssl_target_name_override", SERVER_NAME)])


# Every identity in the cluster: SDS answers only the requested names it has for the node, so
# asking for all of them shows exactly which keys a node can get.
ALL_SECRETS = ["ROOTCA", *(sa_id(n) for n in ("sleep", "reviews", "httpbin", "ratings", "details")),
               ZTUNNEL_ID]


async def _secrets(channel: grpc.aio.Channel, node_name: str) -> dict[str, Any]:
    """The Secrets node `node_name` is sent over `channel` when it asks for every identity."""
    async with SotwClient("unused", node_name, channel=channel) as c:
        await c.request(SECRET, ALL_SECRETS)
        resp = await c.recv(SECRET, timeout=10)
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    out = {}
    for any_msg in resp.resources:
        s = secret_pb2.Secret()
        any_msg.Unpack(s)
        out[s.name] = s
    return out


async def _refused(channel: grpc.aio.Channel, node_name: str) -> tuple[grpc.StatusCode | None, str]:
    async with SotwClient("unused", node_name, channel=channel) as c:
        try:
            await c.request(SECRET, ALL_SECRETS)
        except grpc.aio.AioRpcError as exc:  # the connection itself failed (TLS handshake)
            return exc.code(), exc.details() or ""
        closed = await c.wait_closed(timeout=10)
        assert not c.received, "a refused stream must not receive anything"
        return closed.code, closed.details or ""


# ---------------------------------------------------------------------------------------------
# node-credentials


def test_node_credentials_cli_writes_node_bound_files(cluster: Cluster, creds_a: Path) -> None:
    names = sorted(os.listdir(creds_a))
    assert names == ["cert-chain.pem", "key.pem", "root-cert.pem"]  # no temporary files left behind
    for n in names:
        assert stat.S_IMODE((creds_a / n).stat().st_mode) == 0o640, n
    chain = (creds_a / "cert-chain.pem").read_bytes()
    assert node_from_peer_cert(chain, trust_domain=TD) == "node-a"
    assert peer_uris(chain) == [ZTUNNEL_ID, f"spiffe://{TD}/k8s-node/node-a"]
    leaf = x509.load_pem_x509_certificate(chain)
    root = x509.load_pem_x509_certificate(cluster.root.read_bytes())
    leaf.verify_directly_issued_by(root)
    assert (creds_a / "root-cert.pem").read_bytes() == cluster.root.read_bytes()
    # The TokenReview went to the API server, for the xdsserver audience.
    reviews = cluster.kube.call(lambda a: list(a.token_reviews))
    assert any(r["spec"]["token"] == "tok-a" and r["spec"]["audiences"] == ["xdsserver"] for r in reviews)


def test_node_credentials_cli_reports_refusal_and_needs_a_trust_anchor(cluster: Cluster) -> None:
    r = cluster.node_credentials("tok-b", "node-a", cluster.workdir / "creds-b-as-a")
    assert r.returncode == 1
    assert "PERMISSION_DENIED" in r.stderr and "bound to node 'node-b'" in r.stderr, r.stderr
    assert not (cluster.workdir / "creds-b-as-a" / "key.pem").exists()
    # Without --ca-file and without an earlier root-cert.pem the token is never sent.
    token_file = cluster.workdir / "token-tok-a"
    before = len(cluster.kube.call(lambda a: a.token_reviews))
    r = subprocess.run([sys.executable, "-m", "xdsserver", "node-credentials", "--server", f"127.0.0.1:{cluster.creds_port}",
                        "--token-file", str(token_file), "--node", "node-a", "--out", str(cluster.workdir / "no-anchor")],
                       capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 2 and "no trust anchor" in r.stderr, r.stderr
    assert len(cluster.kube.call(lambda a: a.token_reviews)) == before


REFUSALS = [
    # (token, node asked for, status, reason fragment)
    ("tok-b", "node-a", grpc.StatusCode.PERMISSION_DENIED, "the token is bound to node 'node-b'"),
    ("tok-a-no-node", "node-b", grpc.StatusCode.PERMISSION_DENIED, "runs on node 'node-a', not on node 'node-b'"),
    ("tok-sleep", "node-a", grpc.StatusCode.PERMISSION_DENIED, "belongs to 'system:serviceaccount:default:sleep'"),
    ("tok-unbound", "node-a", grpc.StatusCode.PERMISSION_DENIED, "not bound to a pod"),
    ("tok-old-pod", "node-a", grpc.StatusCode.PERMISSION_DENIED, "does not exist"),
    ("tok-api-audience", "node-a", grpc.StatusCode.UNAUTHENTICATED, "rejected by TokenReview"),
    ("no-such-token", "node-a", grpc.StatusCode.UNAUTHENTICATED, "rejected by TokenReview"),
    ("", "node-a", grpc.StatusCode.UNAUTHENTICATED, "'token'"),
    ("tok-a", "Node_A", grpc.StatusCode.INVALID_ARGUMENT, "invalid node name"),
]


async def test_node_credentials_refusals(cluster: Cluster) -> None:
    root = cluster.root.read_bytes()

    async def attempt(token: str, node_name: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch(f"127.0.0.1:{cluster.creds_port}", token=token, node=node_name, root_pem=root,
                        server_name=SERVER_NAME)
        return err.value.code(), err.value.details() or ""

    # concurrently: the unknown-pod case waits a few seconds for the source cache
    results = await asyncio.gather(*(attempt(t, n) for t, n, _, _ in REFUSALS))
    for (token, node_name, code, fragment), (got_code, details) in zip(REFUSALS, results, strict=True):
        assert got_code == code and fragment in details, (token, node_name, got_code, details)
    # ... while the right token for the right node works, also as a protobuf Struct request
    from google.protobuf import struct_pb2

    req = struct_pb2.Struct()
    req.update({"token": "tok-b", "node": "node-b"})
    tls = grpc.ssl_channel_credentials(root_certificates=root)
    async with grpc.aio.secure_channel(f"127.0.0.1:{cluster.creds_port}", tls,
                                       options=[("grpc.ssl_target_name_override", SERVER_NAME)]) as ch:
        raw = await ch.unary_unary("/xdsserver.v1.NodeCredentials/Issue")(req.SerializeToString(), timeout=10)
    resp = struct_pb2.Struct.FromString(raw)
    assert node_from_peer_cert(resp["certChain"], trust_domain=TD) == "node-b"


# ---------------------------------------------------------------------------------------------
# ADS over mTLS


async def test_ads_tls_serves_only_the_certificate_node(cluster: Cluster, creds_a: Path, tmp_path: Path) -> None:
    # node A's certificate: node A's config, whose Secrets are exactly its pods' identities
    async with _mtls_channel(cluster, creds_a) as ch:
        secrets_a = await _secrets(ch, "node-a")
    assert sorted(secrets_a) == ["ROOTCA", sa_id("reviews"), sa_id("sleep")]

    # node A's certificate asking for node B's config
    async with _mtls_channel(cluster, creds_a) as ch:
        code, details = await _refused(ch, "node-b")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "bound to node 'node-a'" in details and "'node-b'" in details

    # a workload certificate node A legitimately holds (its sleep pod's) is not a node credential
    sleep = secrets_a[sa_id("sleep")].tls_certificate
    async with _mtls_channel(cluster, key=sleep.private_key.inline_string.encode(),
                             chain=sleep.certificate_chain.inline_string.encode()) as ch:
        code, details = await _refused(ch, "node-a")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not bound to a node" in details

    # no client certificate, or one from another CA: the TLS handshake itself fails
    other = CertificateAuthority.load_or_create(None, trust_domain=TD).issue_node_client("node-a", ZTUNNEL_ID)
    for key, chain in ((None, None), (other.private_key_pem.encode(), other.cert_chain_pem.encode())):
        async with _mtls_channel(cluster, key=key, chain=chain) as ch:
            code, _ = await _refused(ch, "node-a")
        assert code == grpc.StatusCode.UNAVAILABLE
    assert {c["node"] for c in http_json(f"{cluster.debug}/debug/connections")} <= {"node-a"}

    # node B's own credentials: node B's identities only
    creds_b = tmp_path / "creds-b"
    assert cluster.node_credentials("tok-b", "node-b", creds_b).returncode == 0
    async with _mtls_channel(cluster, creds_b) as ch:
        assert sorted(await _secrets(ch, "node-b")) == ["ROOTCA", sa_id("httpbin")]


def test_authorizer_decisions_without_network() -> None:
    ca = CertificateAuthority.load_or_create(None, trust_domain=TD)
    auth = make_authorizer(ca, type("A", (), {"ztunnel_service_account": "istio-system/ztunnel"})())
    assert isinstance(auth, NodeAuthorizer)
    good = ca.issue_node_client("node-a", ZTUNNEL_ID).cert_chain_pem.encode()
    assert auth.check_peer(good, "node-a") is None
    assert auth.check_peer(good, "node-b")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.check_peer(good, "")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.check_peer(None, "node-a")[0] == grpc.StatusCode.UNAUTHENTICATED
    other_sa = ca.issue_node_client("node-a", sa_id("sleep")).cert_chain_pem.encode()
    assert "ztunnel identity" in auth.check_peer(other_sa, "node-a")[1]
    workload = ca.issue_workload(sa_id("sleep")).cert_chain_pem.encode()
    assert "not bound to a node" in auth.check_peer(workload, "node-a")[1]
    foreign = CertificateAuthority.load_or_create(None, trust_domain=TD).issue_node_client("node-a", ZTUNNEL_ID)
    assert "not issued by" in auth.check_peer(foreign.cert_chain_pem.encode(), "node-a")[1]


# ---------------------------------------------------------------------------------------------
# a real Envoy over mTLS


pytest_envoy = pytest.mark.skipif(not shutil.which("envoy"), reason="envoy binary not installed")


@pytest_envoy
@pytest.mark.envoy
def test_envoy_over_mtls_gets_exactly_its_node_identities(cluster: Cluster, creds_a: Path, tmp_path: Path) -> None:
    admin = free_port()
    bootstrap = tmp_path / "bootstrap.yaml"
    subprocess.run([sys.executable, "-m", "xdsserver", "bootstrap", "--node", "node-a",
                    "--xds-address", f"127.0.0.1:{cluster.tls_port}", "--xds-tls-dir", str(creds_a),
                    "--xds-server-san", SERVER_NAME, "--admin-address", f"127.0.0.1:{admin}", "-o", str(bootstrap)],
                   check=True, capture_output=True, env=ENV)
    envoy = Proc([shutil.which("envoy"), "-c", str(bootstrap), "--disable-hot-restart", "-l", "warning",
                  "--concurrency", "1"], tmp_path / "envoy.log")

    def secrets() -> list[str]:
        dump = http_json(f"http://127.0.0.1:{admin}/config_dump?include_eds")
        return sorted(s["name"] for s in section(dump, "secrets"))

    try:
        poll(lambda: secrets() == ["ROOTCA", sa_id("reviews"), sa_id("sleep")], what="node-a secrets over mTLS", timeout=30)
        conns = http_json(f"{cluster.debug}/debug/connections")
        assert [c["node"] for c in conns if c["node_id"].startswith("sidecar~")] == ["node-a"]
        # A new identity on node B does not reach node A; one on node A does.
        cluster.kube.create(service_account("ratings"))
        cluster.kube.create(service_account("details"))
        cluster.kube.create(pod("ratings-0", "10.244.1.7", node_name="node-b", sa="ratings"))
        cluster.kube.create(pod("details-0", "10.244.0.7", node_name="node-a", sa="details"))
        poll(lambda: secrets() == ["ROOTCA", sa_id("details"), sa_id("reviews"), sa_id("sleep")],
             what="details identity on node-a", timeout=20)
        cfg = http_json(f"{cluster.debug}/debug/config_dump?node=node-b")
        node_b = sorted(s["name"] for c in cfg["configs"] if c["@type"].endswith("SecretsConfigDump")
                        for s in c.get("dynamic_active_secrets", []))
        assert node_b == ["ROOTCA", sa_id("httpbin"), sa_id("ratings")]
        assert envoy.alive()
    finally:
        envoy.stop()
        for kind, name in (("Pod", "ratings-0"), ("Pod", "details-0"), ("ServiceAccount", "ratings"),
                           ("ServiceAccount", "details")):
            try:
                cluster.kube.delete(kind, name, "default")
            except KeyError:
                pass


# ---------------------------------------------------------------------------------------------
# --renew


class _Reviewer:
    async def review(self, token: str, audience: str) -> TokenReviewResult:
        return TokenReviewResult(
            authenticated=token == "tok", username="system:serviceaccount:istio-system:ztunnel", audiences=(audience,),
            extra={"authentication.kubernetes.io/pod-name": ["ztunnel-a"],
                   "authentication.kubernetes.io/pod-uid": ["uid-a"],
                   "authentication.kubernetes.io/node-name": ["node-a"]})


async def test_renew_replaces_the_files_at_half_life(tmp_path: Path) -> None:
    """In-process node-credentials service (certificates live 4 s) and the real CLI with --renew."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", trust_domain=TD)
    zt = SourceObject("test#0", {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "ztunnel-a", "namespace": "istio-system", "uid": "uid-a"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "ztunnel"}})
    service_ = NodeCredentials(ca, reviewer=_Reviewer(), objects=lambda: [zt], ztunnel_sa=("istio-system", "ztunnel"),
                               cert_ttl=timedelta(seconds=4))
    server = grpc.aio.server()
    service_.add_to_server(server)
    port = server.add_secure_port("127.0.0.1:0", ServerCertificates(ca, [SERVER_NAME], client_ca=False).credentials())
    await server.start()
    (tmp_path / "token").write_text("tok")
    out = tmp_path / "creds"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xdsserver", "node-credentials", "--server", f"127.0.0.1:{port}", "--server-name",
        SERVER_NAME, "--token-file", str(tmp_path / "token"), "--node", "node-a", "--out", str(out),
        "--ca-file", str(tmp_path / "ca" / "root-cert.pem"), "--renew",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=ENV)

    def serial() -> int | None:
        try:
            return x509.load_pem_x509_certificate((out / "cert-chain.pem").read_bytes()).serial_number
        except (OSError, ValueError):
            return None

    async def apoll(fn: Any, what: str, timeout: float = 15.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if (v := fn()):
                return v
            await asyncio.sleep(0.05)  # polling interval
        raise AssertionError(f"timed out waiting for {what}")

    try:
        first = await apoll(serial, "first certificate")
        second = await apoll(lambda: (s := serial()) not in (None, first) and s, "renewed certificate")
        assert service_.issued >= 2 and second != first
        from cryptography.hazmat.primitives import serialization

        def consistent() -> bool:  # key.pem is renamed in before cert-chain.pem: poll past that instant
            key = serialization.load_pem_private_key((out / "key.pem").read_bytes(), None)
            return x509.load_pem_x509_certificate((out / "cert-chain.pem").read_bytes()).public_key() == key.public_key()

        await apoll(consistent, "key and chain of one certificate")
        leaf = x509.load_pem_x509_certificate((out / "cert-chain.pem").read_bytes())
        assert sorted(os.listdir(out)) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
        assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o640 for n in os.listdir(out))
        assert leaf.not_valid_after_utc - datetime.now(timezone.utc) < timedelta(seconds=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await server.stop(None)
