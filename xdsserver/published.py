"""What the control plane has published: the last good inputs and outputs, swapped as a whole.

The composition root (:mod:`xdsserver.app`) writes it; the debug server and ``explain`` read it.
It lives below both so neither has to import the other."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

from .incremental import ResourceSet
from .model import Flavor, Model
from .model.index import MeshIndex
from .translate import NodeResources, type_url

__all__ = ["LazyNodes", "State"]


class LazyNodes(Mapping[str, NodeResources]):
    """Each node's published resources as messages, parsed from the bytes on first use.

    The pipeline keeps only serialized resources (built once, shared across nodes); the debug
    endpoints and ``explain`` want messages, and only for the nodes someone asks about."""

    def __init__(self, snaps: Mapping[str, ResourceSet], flavor: Flavor) -> None:
        self._snaps, self._flavor = snaps, flavor
        self._parsed: dict[str, NodeResources] = {}

    def __getitem__(self, node: str) -> NodeResources:
        if node not in self._parsed:
            rs = self._snaps[node]  # KeyError for unknown nodes, as a Mapping should

            def parse(cls: type[Message]) -> tuple[Any, ...]:
                return tuple(cls.FromString(body) for _, body in rs.get(type_url(cls()), []))

            self._parsed[node] = NodeResources(node, self._flavor, parse(Listener), parse(Cluster),
                                               parse(ClusterLoadAssignment), parse(Secret), parse(RouteConfiguration))
        return self._parsed[node]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snaps)

    def __len__(self) -> int:
        return len(self._snaps)


@dataclass
class State:
    """The last good inputs and outputs, swapped as a whole."""

    model: Model | None = None
    index: MeshIndex | None = None
    nodes: Mapping[str, NodeResources] = field(default_factory=dict)
    loaded_at: float = 0.0
    generation: int = 0
    last_error: str = ""
