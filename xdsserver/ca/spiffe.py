"""SPIFFE identities handled by the CA: workload IDs and the node URI of ztunnel client certs.

Only the Kubernetes form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` is issued to workloads: a
certificate names exactly the identity Envoy puts in `tunnel.identity` and the SPIFFE validator
checks, so anything else is rejected up front instead of producing an unusable certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
NODE_PATH = "k8s-node"

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a bare SPIFFE trust domain (no scheme, lowercase)."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.match(trust_domain):
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: expected lowercase letters, digits, '.', '-', '_' "
            "without a 'spiffe://' prefix (e.g. 'cluster.local')"
        )
    return trust_domain


def validate_node_name(node_name: str) -> str:
    """Return `node_name` if it is a valid Kubernetes node name (DNS subdomain, <= 253 chars)."""
    if (
        not isinstance(node_name, str)
        or len(node_name) > 253
        or not _DNS_SUBDOMAIN_RE.match(node_name)
    ):
        raise ValueError(
            f"invalid node name {node_name!r}: expected a DNS subdomain name "
            "(lowercase letters, digits, '-', '.'; at most 253 characters)"
        )
    return node_name


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed workload identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def workload_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """Build and validate the SPIFFE ID of a Kubernetes service account."""
    return parse_workload_id(f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").uri


def parse_workload_id(uri: str, *, trust_domain: str | None = None) -> SpiffeId:
    """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; with `trust_domain`, also require that domain."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise ValueError(
            f"invalid SPIFFE ID {uri!r}: expected 'spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>'"
        )
    td, _, path = uri[len(SCHEME) :].partition("/")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise ValueError(
            f"invalid SPIFFE ID {uri!r}: expected 'spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>'"
        )
    try:
        validate_trust_domain(td)
    except ValueError as exc:
        raise ValueError(f"invalid SPIFFE ID {uri!r}: {exc}") from None
    namespace, service_account = parts[1], parts[3]
    if not _DNS_LABEL_RE.match(namespace):
        raise ValueError(
            f"invalid SPIFFE ID {uri!r}: namespace {namespace!r} is not a DNS label"
        )
    if len(service_account) > 253 or not _DNS_SUBDOMAIN_RE.match(service_account):
        raise ValueError(
            f"invalid SPIFFE ID {uri!r}: service account {service_account!r} is not a DNS subdomain name"
        )
    if trust_domain is not None and td != trust_domain:
        raise ValueError(
            f"SPIFFE ID {uri!r} belongs to trust domain {td!r}, but this CA issues only for {trust_domain!r}"
        )
    return SpiffeId(td, namespace, service_account)


def node_uri(trust_domain: str, node_name: str) -> str:
    """The URI SAN that binds a ztunnel client certificate to a node: `spiffe://<td>/k8s-node/<node>`."""
    return f"{SCHEME}{validate_trust_domain(trust_domain)}/{NODE_PATH}/{validate_node_name(node_name)}"


def node_from_uri(uri: str, *, trust_domain: str | None = None) -> str | None:
    """The node name in a `spiffe://<td>/k8s-node/<node>` URI, or None if `uri` is not one."""
    if not uri.startswith(SCHEME):
        return None
    td, _, path = uri[len(SCHEME) :].partition("/")
    kind, _, name = path.partition("/")
    if kind != NODE_PATH or (trust_domain is not None and td != trust_domain):
        return None
    try:
        validate_trust_domain(td)
        return validate_node_name(name)
    except ValueError:
        return None
