"""Content-blind xDS layer: per-node snapshot cache, per-stream protocol state, grpc.aio ADS server.

Sees only discovery messages and serialized resource bytes; what the bytes mean is `translate`'s
business (docs/style.md §2: go-control-plane's cache/server split).
"""

from .cache import Resource, Snapshot, SnapshotCache, SnapshotChange, UnsafeSnapshot
from .metrics import XdsMetrics
from .server import AdsServer, node_name_of, start_server
from .types import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, PUSH_ORDER, ROUTE, SECRET, SHORT, ResourceSet

__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "FULL_STATE_TYPES",
    "LISTENER",
    "PUSH_ORDER",
    "ROUTE",
    "SECRET",
    "SHORT",
    "AdsServer",
    "Resource",
    "ResourceSet",
    "Snapshot",
    "SnapshotCache",
    "SnapshotChange",
    "UnsafeSnapshot",
    "XdsMetrics",
    "node_name_of",
    "start_server",
]
