"""Node authentication: ADS over mTLS bound to one node, and the node-credentials exchange.

Why: a ztunnel receives the private keys of every identity that has pods on its node, so "which
node is this stream for?" is a security decision, not a label to trust. Two gRPC/TLS listeners,
both with a server certificate from the built-in CA (DNS SANs from ``--xds-tls-san``):

* ``--xds-tls-address`` (chart: 15012) serves ADS. A client certificate is **required** at the
  TLS layer and must chain to the CA; the ADS authorize hook then requires the certificate's node
  URI (``spiffe://<td>/k8s-node/<node>``, see ``ca.node_from_peer_cert``) and the ztunnel identity,
  and the node URI must equal the stream's ``NODE_NAME``. Anything else ends the stream with
  PERMISSION_DENIED (no certificate: UNAUTHENTICATED). Workload certificates, which ztunnels hold
  for their pods, chain to the same CA but carry no node URI, so they cannot open a stream.
* ``--node-credentials-address`` (chart: 15013; default: the port after the TLS port) serves
  ``/xdsserver.v1.NodeCredentials/Issue`` with server-authenticated TLS only: the first request of
  a ztunnel has no certificate yet. The caller sends a projected service-account token (audience
  ``xdsserver``) and the node it claims; the token is checked with a TokenReview, must belong to the
  ztunnel ServiceAccount, must be bound to a pod that the source cache knows with that uid, and that
  pod must run on the claimed node. Only then is a node-bound client certificate issued.

Two listeners instead of one because grpc-python cannot *request* a client certificate without
*requiring* it (``ssl_server_credentials(require_client_auth=False)`` maps to "don't request"),
so optional client certificates on one port are not available.

The plaintext ``--xds-address``/``--xds-uds`` listener keeps trusting ``NODE_NAME``: it is for
loopback and Unix-socket use (lab, tests, demos). In production only the TLS ports may be
reachable from other hosts (the chart's ztunnels dial only those).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import grpc
from cryptography import x509
from google.protobuf import json_format, struct_pb2

from .ca import CertificateAuthority, node_from_peer_cert, peer_uris, workload_id
from .ca.authority import issued_by
from .ca.spiffe import validate_node_name
from .nodecreds import AUDIENCE, DEFAULT_NODE_CERT_TTL, DEFAULT_SANS, DEFAULT_ZTUNNEL_SA, ISSUE_METHOD, add_serve_arguments
from .sources import SourceObject
from .xds.server import node_name_of, start_server

log = logging.getLogger(__name__)

SERVICE = ISSUE_METHOD.split("/")[1]  # "xdsserver.v1.NodeCredentials"
POD_WAIT_S = 3.0
"""How long Issue waits for a just-created ztunnel pod to reach the source cache."""

EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"


# ---------------------------------------------------------------------------------------------
# command line


def _split_sa(value: str) -> tuple[str, str]:
    ns, sep, name = (value or "").partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"--ztunnel-service-account {value!r}: expected NAMESPACE/NAME")
    return ns, name


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def node_credentials_address(args: Any) -> str:
    explicit = getattr(args, "node_credentials_address", None)
    if explicit:
        return explicit
    host, port = _host_port(args.xds_tls_address)
    return f"{host}:{port + 1 if port else 0}"


# ---------------------------------------------------------------------------------------------
# server certificate (rotated at half-life without a restart)


class ServerCertificates:
    """The TLS server certificate, re-issued by the CA after half its lifetime.

    `fetch` is grpc's certificate-configuration fetcher: called from a gRPC thread before each
    handshake; it returns None while the current certificate is fine.
    """

    def __init__(self, ca: CertificateAuthority, dns_names: Iterable[str], *, client_ca: bool) -> None:
        self.ca = ca
        self.dns_names = tuple(dns_names)
        self.client_ca = client_ca
        self._lock = threading.Lock()
        self._cert = ca.issue_server(self.dns_names)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        root = self.ca.root_pem.encode() if self.client_ca else None
        pair = (self._cert.private_key_pem.encode(), self._cert.cert_chain_pem.encode())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=root)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            return self._config()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if datetime.now(timezone.utc) < self._cert.renew_at:
                return None
            self._cert = self.ca.issue_server(self.dns_names)
            log.info("re-issued the xDS server certificate (valid until %s)", self._cert.not_after.isoformat())
            return self._config()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=self.client_ca
        )

    @property
    def chain_pem(self) -> str:
        return self._cert.cert_chain_pem


# ---------------------------------------------------------------------------------------------
# ADS authorization


def _is_tls(context: grpc.aio.ServicerContext) -> bool:
    return context.auth_context().get("transport_security_type") == [b"ssl"]


class NodeAuthorizer:
    """ADS authorize hook: on TLS connections the stream's node must be the certificate's node.

    Plaintext connections (loopback / UDS listener) keep the default behaviour: `NODE_NAME`.
    """

    def __init__(self, ca: CertificateAuthority, ztunnel_spiffe: str, issuers_pem: str) -> None:
        self.ca = ca
        self.trust_domain = ca.trust_domain
        self.ztunnel_spiffe = ztunnel_spiffe
        self._issuers = x509.load_pem_x509_certificates(issuers_pem.encode())

    def check_peer(self, peer_pem: bytes | None, claimed: str) -> tuple[grpc.StatusCode, str] | None:
        """None if `peer_pem` may receive node `claimed`'s config, else (status, reason)."""
        if not peer_pem:
            return grpc.StatusCode.UNAUTHENTICATED, "no client certificate: obtain one with `xdsserver node-credentials`"
        try:
            leaf = x509.load_pem_x509_certificate(peer_pem)
        except ValueError:
            return grpc.StatusCode.UNAUTHENTICATED, "the client certificate cannot be parsed"
        if not any(issued_by(leaf, issuer) for issuer in self._issuers):
            return grpc.StatusCode.PERMISSION_DENIED, "the client certificate was not issued by this xdsserver's CA"
        now = datetime.now(timezone.utc)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            return grpc.StatusCode.PERMISSION_DENIED, "the client certificate is expired or not yet valid"
        cert_node = node_from_peer_cert(peer_pem, trust_domain=self.trust_domain)
        if cert_node is None:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is not bound to a node (no single spiffe://{self.trust_domain}/k8s-node/<node> URI)")
        if self.ztunnel_spiffe not in peer_uris(peer_pem):
            return grpc.StatusCode.PERMISSION_DENIED, f"the client certificate does not carry the ztunnel identity {self.ztunnel_spiffe}"
        if not claimed:
            return grpc.StatusCode.PERMISSION_DENIED, "node metadata NODE_NAME is missing"
        if claimed != cert_node:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is bound to node {cert_node!r}, but the stream asks for node {claimed!r}")
        return None

    async def __call__(self, node: Any, context: grpc.aio.ServicerContext) -> str:
        claimed = node_name_of(node)
        if not _is_tls(context):
            if not claimed:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"node {node.id!r}: metadata 'NODE_NAME' is missing or empty")
            return claimed
        pems = context.auth_context().get("x509_pem_cert") or [None]
        refusal = self.check_peer(pems[0], claimed)
        if refusal is not None:
            code, reason = refusal
            log.warning("refused xDS stream from %s (node id %r, NODE_NAME %r): %s", context.peer(), node.id, claimed, reason)
            await context.abort(code, reason)
        return claimed


def _ztunnel_spiffe(ca: CertificateAuthority, args: Any) -> str:
    ns, name = _split_sa(getattr(args, "ztunnel_service_account", None) or DEFAULT_ZTUNNEL_SA)
    return workload_id(ca.trust_domain, ns, name)


def make_authorizer(ca: CertificateAuthority, args: Any) -> NodeAuthorizer:
    """The ADS authorize hook for `serve` (pass it to ControlPlane(authorize=...))."""
    # A leaf is issued by the signing CA: the root itself, or the first certificate after a leaf.
    probe = ca.issue_server(["issuer-probe"])
    tail = probe.cert_chain_pem.split("-----END CERTIFICATE-----\n", 1)[1]
    return NodeAuthorizer(ca, _ztunnel_spiffe(ca, args), ca.root_pem + tail)


# ---------------------------------------------------------------------------------------------
# node credentials


@dataclass(frozen=True)
class TokenReviewResult:
    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)
    error: str = ""


class TokenReviewer(Protocol):
    async def review(self, token: str, audience: str) -> TokenReviewResult: ...


class KubeTokenReviewer:
    """TokenReview through the official client (authentication.k8s.io/v1)."""

    def __init__(self, api: Any, timeout_s: float = 10.0) -> None:
        self.api = api
        self.timeout_s = timeout_s

    async def review(self, token: str, audience: str) -> TokenReviewResult:
        from kubernetes.aio import client as kclient

        body = kclient.V1TokenReview(spec=kclient.V1TokenReviewSpec(token=token, audiences=[audience]))
        resp = await kclient.AuthenticationV1Api(self.api).create_token_review(body, _request_timeout=self.timeout_s)
        st = resp.status
        if st is None:
            return TokenReviewResult(False, error="TokenReview without status")
        user = st.user
        return TokenReviewResult(
            authenticated=bool(st.authenticated),
            username=(user.username or "") if user else "",
            audiences=tuple(st.audiences or ()),
            extra={k: list(v or []) for k, v in ((user.extra or {}) if user else {}).items()},
            error=st.error or "",
        )


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def _one(extra: dict[str, list[str]], key: str) -> str | None:
    values = extra.get(key) or []
    return values[0] if len(values) == 1 and values[0] else None


def _decode_request(data: bytes) -> tuple[dict[str, Any], bool]:
    """(fields, was_json): a JSON object or a serialized google.protobuf.Struct."""
    if data.lstrip().startswith(b"{"):
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("request is not a JSON object")
        return obj, True
    return json_format.MessageToDict(struct_pb2.Struct.FromString(data)), False


def _encode_response(obj: dict[str, Any], as_json: bool) -> bytes:
    if as_json:
        return json.dumps(obj, sort_keys=True).encode()
    s = struct_pb2.Struct()
    s.update(obj)
    return s.SerializeToString(deterministic=True)


class NodeCredentials:
    """`/xdsserver.v1.NodeCredentials/Issue`: a pod-bound ztunnel token in, a node certificate out.

    Request (JSON object or protobuf Struct): ``{"token": "<projected SA token>", "node": "<node>"}``.
    Response (same encoding): ``certChain``, ``privateKey``, ``rootCert`` (PEM), ``notAfter`` (ISO).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        reviewer: TokenReviewer | None,
        objects: Callable[[], Iterable[SourceObject]],
        ztunnel_sa: tuple[str, str],
        audience: str = AUDIENCE,
        cert_ttl: timedelta = timedelta(seconds=DEFAULT_NODE_CERT_TTL),
        pod_wait_s: float = POD_WAIT_S,
    ) -> None:
        self.ca = ca
        self.reviewer = reviewer
        self.objects = objects
        self.sa_ns, self.sa_name = ztunnel_sa
        self.spiffe = workload_id(ca.trust_domain, self.sa_ns, self.sa_name)
        self.audience = audience
        self.cert_ttl = cert_ttl
        self.pod_wait_s = pod_wait_s
        self.issued = 0
        self.refused = 0

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(self.issue)  # bytes in, bytes out
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Issue": handler}),))

    async def issue(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            fields, as_json = _decode_request(request)
        except Exception as exc:  # noqa: BLE001 (any decoding failure is the caller's fault)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is neither a JSON object nor a Struct: {exc}")
        try:
            node, pod = await self.authorize(fields)
        except Refused as r:
            self.refused += 1
            log.warning("node-credentials refused for %s: %s", context.peer(), r.reason)
            await context.abort(r.code, r.reason)
        cert = self.ca.issue_node_client(node, self.spiffe, ttl=self.cert_ttl)
        self.issued += 1
        log.info("issued node certificate for node %r to pod %s (valid until %s)", node, pod, cert.not_after.isoformat())
        return _encode_response({
            "certChain": cert.cert_chain_pem,
            "privateKey": cert.private_key_pem,
            "rootCert": self.ca.root_pem,
            "notAfter": cert.not_after.isoformat(),
        }, as_json)

    async def authorize(self, fields: dict[str, Any]) -> tuple[str, str]:
        """(node, "ns/pod") if the request may have node's certificate; raises Refused."""
        token, node = fields.get("token"), fields.get("node")
        if not isinstance(node, str):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "field 'node' (the node name) is required")
        try:
            validate_node_name(node)
        except ValueError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"field 'node': {exc}") from None
        if not isinstance(token, str) or not token.strip():
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "field 'token' (a projected service-account token) is required")
        if self.reviewer is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "no Kubernetes API configured to review tokens (--source kubernetes or --kubeconfig)")
        try:
            review = await self.reviewer.review(token.strip(), self.audience)
        except Exception as exc:  # noqa: BLE001 (API down, timeout, ...: the caller retries)
            log.error("TokenReview failed: %s", exc)
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"TokenReview failed: {type(exc).__name__}") from None
        if not review.authenticated:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"the token was rejected by TokenReview: {review.error or 'not authenticated'}")
        if self.audience not in review.audiences:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"the token is not valid for audience {self.audience!r}")
        want_user = f"system:serviceaccount:{self.sa_ns}:{self.sa_name}"
        if review.username != want_user:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"the token belongs to {review.username!r}, not to the ztunnel service account {self.sa_ns}/{self.sa_name}")
        pod_name, pod_uid = _one(review.extra, EXTRA_POD_NAME), _one(review.extra, EXTRA_POD_UID)
        if not pod_name or not pod_uid:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          "the token is not bound to a pod (use a projected service-account token of the ztunnel pod)")
        token_node = _one(review.extra, EXTRA_NODE_NAME)
        if token_node is not None and token_node != node:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"the token is bound to node {token_node!r}, but node {node!r} was asked for")
        pod = await self._find_pod(self.sa_ns, pod_name, pod_uid)
        ref = f"{self.sa_ns}/{pod_name}"
        if pod is None:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"the token's pod {ref} (uid {pod_uid}) does not exist")
        spec, status, meta = pod.get("spec") or {}, pod.get("status") or {}, pod.get("metadata") or {}
        on = spec.get("nodeName") or ""
        if on != node:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"the token's pod {ref} runs on node {on or '(unscheduled)'!r}, not on node {node!r}")
        if (spec.get("serviceAccountName") or spec.get("serviceAccount") or "default") != self.sa_name:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref} does not run as service account {self.sa_name!r}")
        if status.get("phase") in ("Succeeded", "Failed") or meta.get("deletionTimestamp"):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"pod {ref} is terminating or terminated")
        return node, ref

    async def _find_pod(self, ns: str, name: str, uid: str) -> dict[str, Any] | None:
        """The pod from the source cache; waits briefly for one just created (watch lag)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pod_wait_s
        for _ in range(int(self.pod_wait_s / 0.1) + 1):
            for so in self.objects():
                if so.kind != "Pod":
                    continue
                meta = so.obj.get("metadata") or {}
                if meta.get("namespace") == ns and meta.get("name") == name and meta.get("uid") == uid:
                    return so.obj
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.1)
        return None


# ---------------------------------------------------------------------------------------------
# wiring


@dataclass
class TlsXds:
    """The two TLS listeners started by :func:`start_tls_xds`."""

    ads_server: grpc.aio.Server
    creds_server: grpc.aio.Server
    ads_port: int
    creds_port: int
    credentials: NodeCredentials
    api: Any = None

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.ads_server.stop(grace)
        await self.creds_server.stop(grace)
        if self.api is not None:
            await self.api.close()


async def start_tls_xds(cp: Any, args: Any, *, reviewer: TokenReviewer | None = None) -> TlsXds:
    """Start ADS over mTLS on `args.xds_tls_address` and node-credentials next to it.

    `cp` is the ControlPlane; its ADS servicer must have been built with `make_authorizer()`.
    Pods are looked up in `cp.load_objects()` (the Kubernetes source's live cache).
    """
    ca: CertificateAuthority = cp.certs.ca
    sans = tuple(getattr(args, "xds_tls_san", None) or DEFAULT_SANS)
    api = None
    if reviewer is None and (getattr(args, "source", "") == "kubernetes" or getattr(args, "kubeconfig", None)):
        from .sources.kube import api_client_from_env

        api = await api_client_from_env(getattr(args, "kubeconfig", None))
        reviewer = KubeTokenReviewer(api)
    creds = NodeCredentials(
        ca, reviewer=reviewer, objects=cp.load_objects,
        ztunnel_sa=_split_sa(getattr(args, "ztunnel_service_account", None) or DEFAULT_ZTUNNEL_SA),
        cert_ttl=timedelta(seconds=float(getattr(args, "node_cert_ttl", None) or DEFAULT_NODE_CERT_TTL)),
    )
    ads = await start_server(cp.server, address=args.xds_tls_address,
                             credentials=ServerCertificates(ca, sans, client_ca=True).credentials())
    creds_server = grpc.aio.server()
    creds.add_to_server(creds_server)
    address = node_credentials_address(args)
    creds_port = creds_server.add_secure_port(address, ServerCertificates(ca, sans, client_ca=False).credentials())
    if not creds_port:
        await ads.stop(None)
        raise OSError(f"cannot bind the node-credentials listener to {address!r}")
    await creds_server.start()
    log.info("xDS over mTLS on port %d, node credentials on port %d (server names %s)", ads.xds_port, creds_port, ", ".join(sans))
    return TlsXds(ads, creds_server, ads.xds_port, creds_port, creds, api)


__all__ = [
    "AUDIENCE",
    "DEFAULT_SANS",
    "DEFAULT_ZTUNNEL_SA",
    "ISSUE_METHOD",
    "SERVICE",
    "KubeTokenReviewer",
    "NodeAuthorizer",
    "NodeCredentials",
    "TlsXds",
    "TokenReviewResult",
    "add_serve_arguments",
    "make_authorizer",
    "node_credentials_address",
    "start_tls_xds",
]
