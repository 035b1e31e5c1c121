"""The model: plain, frozen, sorted data that every later stage reads.

Sources build a :class:`Model` from Kubernetes objects; :mod:`xdsserver.model.index` derives the
per-node :class:`NodeView` the translator consumes. Nothing here knows about Envoy or YAML
(style.md §5.1: model imports only the standard library).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policy import AuthorizationPolicy, PeerAuthentication


class Flavor(enum.Enum):
    """Which Envoy build the config targets."""

    ENVOY = "envoy"  # stock Envoy >= 1.40 (default)
    ISTIO_2022 = "istio-2022"  # the seeds' exact shape (istio-proxy only extensions)


class OutboundPolicy(enum.Enum):
    ALLOW_ANY = "ALLOW_ANY"
    REGISTRY_ONLY = "REGISTRY_ONLY"


class AccessLogHops(enum.Enum):
    """Which hops of a connection write an access-log line (MeshConfig ``accessLog``)."""

    ALL = "all"      # every hop: capture listener, stage 2, HBONE origination, inbound (and terminal chains)
    EDGES = "edges"  # only where a connection enters a ztunnel: capture listener, inbound, passthrough/blackhole


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    """A SPIFFE identity: one Kubernetes service account in one trust domain."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def spiffe(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.spiffe


@dataclass(frozen=True, slots=True)
class ContainerPort:
    port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    uid: str
    node_name: str
    service_account: str
    ips: tuple[str, ...]  # canonical text, primary first
    labels: tuple[tuple[str, str], ...]
    ports: tuple[ContainerPort, ...]
    host_network: bool = False
    ready: bool = True
    phase: str = "Running"
    creation_timestamp: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return self.ips[0] if self.ips else ""

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def named_port(self, name: str) -> ContainerPort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    target_port: int | str = 0  # a number, or the name of a container port
    app_protocol: str = ""

    @property
    def is_tcp(self) -> bool:
        return self.protocol.upper() == "TCP"


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # empty for headless / ExternalName
    ports: tuple[ServicePort, ...]  # sorted by (port, name)
    selector: tuple[tuple[str, str], ...] | None  # None: no selector (endpoints managed elsewhere)
    type: str = "ClusterIP"
    creation_timestamp: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self) -> bool:
        return not self.cluster_ips

    def hostname(self, cluster_domain: str) -> str:
        return f"{self.name}.{self.namespace}.svc.{cluster_domain}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address behind one service port, with the numeric target port already resolved."""

    ip: str
    port: int
    ready: bool = True
    node_name: str = ""
    pod: str = ""  # "namespace/name" of the backing pod, when known


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    pod_cidr: str = ""
    internal_ip: str = ""


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MeshConfig:
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    enrollment_label: str = "istio.io/dataplane-mode"
    enrollment_value: str = "ambient"
    connect_timeout_s: float = 10.0
    # An HBONE (mTLS HTTP/2) connection with no CONNECT stream is closed after this long: long
    # enough that a client's next connection reuses it (no handshake), short enough that idle
    # sockets are bounded by recently active (source identity, source IP, destination) triples.
    hbone_idle_timeout_s: float = 60.0
    # Per-connection and per-byte cost (README "Data-path cost choices", measured with
    # `python -m bench datapath`). None = Envoy's default (1 MiB buffers, 256 MiB HTTP/2 windows).
    access_log: AccessLogHops = AccessLogHops.ALL
    buffer_limit_bytes: int | None = None  # per_connection_buffer_limit_bytes at both HBONE ends
    hbone_stream_window_bytes: int | None = None  # HTTP/2 initial stream window of the tunnel
    hbone_connection_window_bytes: int | None = None  # HTTP/2 initial connection window of the tunnel
    hbone_keepalive_s: float = 60.0  # TCP keepalive on HBONE connections: first probe after this idle time; 0 = off
    outbound_policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    # Namespaces never enrolled even if labelled (istio-cni / auto-labeller exclusions).
    excluded_namespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease", "istio-system")
    root_namespace: str = "istio-system"  # policies here apply mesh-wide (Istio's rootNamespace)


@dataclass(frozen=True, slots=True)
class Model:
    """Everything loaded from one source state, validated and sorted."""

    mesh: MeshConfig
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()  # (namespace, name)
    nodes: tuple[Node, ...] = ()
    # Endpoints per (service key, service port name), from EndpointSlices when a service has any,
    # otherwise derived from the selector; ready and not-ready both kept (readiness decides EDS).
    endpoints: tuple[tuple[tuple[str, str], tuple[Endpoint, ...]], ...] = ()
    sources: tuple[str, ...] = field(default=())  # where it was loaded from (for debug output)
    # L4 security policy (model/policy.py), sorted by (namespace, name); warnings name policy and rule
    authorization_policies: tuple["AuthorizationPolicy", ...] = ()
    peer_authentications: tuple["PeerAuthentication", ...] = ()
    policy_warnings: tuple[str, ...] = ()


def canonical_ip(text: str) -> str:
    """RFC 5952 text for IPv6, dotted quad for IPv4 (ztunnel-config.md D4)."""
    return str(ipaddress.ip_address(text))


def is_ipv6(ip: str) -> bool:
    return ":" in ip


def host_port(ip: str, port: int) -> str:
    """``ip:port``, with brackets for IPv6 (endpoint_id, tunnel metadata, CONNECT authority)."""
    return f"[{ip}]:{port}" if is_ipv6(ip) else f"{ip}:{port}"


def prefix_len(ip: str) -> int:
    return 128 if is_ipv6(ip) else 32
