"""Protocol facts as data: type URLs, ADS push order, which types are full state.

Kept free of gRPC and of Envoy config messages: the xds layer is content-blind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

TYPE_PREFIX = "type.googleapis.com/"

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make-before-break: clusters, their endpoints and the secrets they reference exist before a
# listener points at them. Route configurations follow the listeners that name them (Envoy asks
# for an RDS name only once a listener's HCM carries it). Responses that only remove things go
# after all of these, in reverse.
PUSH_ORDER = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)

SHORT = {LISTENER: "LDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS", ROUTE: "RDS"}

# SotW responses of these types carry the full set (a missing name is deleted); they are also the
# only types with wildcard ("*") subscriptions.
FULL_STATE_TYPES = frozenset({LISTENER, CLUSTER})

WILDCARD = "*"

# type_url -> (name, serialized body) pairs: what the application hands to the cache per node.
ResourceSet = Mapping[str, Iterable[tuple[str, bytes]]]


def short(type_url: str) -> str:
    """Short label for logs and metrics ("CDS"), or the message name for other types."""
    return SHORT.get(type_url) or type_url.rsplit(".", 1)[-1]


VERSION_MODULUS = 1 << 128


def pair_digest(name: str, version: str) -> int:
    """One (name, resource version) pair as a 128-bit number, summed into a type's version."""
    return int.from_bytes(hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=16).digest(), "big")


def version_of_sum(total: int, count: int) -> str:
    """The version text of a set whose pair digests sum to ``total`` (mod 2^128)."""
    return hashlib.sha256(f"{count}:{total % VERSION_MODULUS:032x}".encode()).hexdigest()[:16]


def content_version(pairs: Iterable[tuple[str, str]]) -> str:
    """Deterministic version of a set of (name, resource version) pairs.

    Derived from content only, so it is stable across restarts and replicas (xds-protocol §8).
    Order-free by construction (a sum of per-pair digests), so a snapshot patched for a change
    updates its type versions in O(change) (``Snapshot.patched``) to exactly this value.
    """
    total = count = 0
    for name, version in pairs:
        total += pair_digest(name, version)
        count += 1
    return version_of_sum(total, count)
