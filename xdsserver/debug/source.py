"""What the debug server reads from the control plane, as a protocol.

The debug stage depends on this shape, not on the composition root that implements it
(:class:`xdsserver.app.ControlPlane`), so ``app`` may start the debug server without a cycle."""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ..model import Flavor
from ..published import State
from ..xds.cache import SnapshotCache
from ..xds.server import AdsServer


class DebugSource(Protocol):
    state: State
    cache: SnapshotCache
    server: AdsServer
    flavor: Flavor
    registry: CollectorRegistry
    test_hooks: bool

    def versions(self, node: str) -> dict[tuple[str, str], str]: ...

    def inject(self, node: str, type_url: str, resource_json: dict[str, Any]) -> str: ...

    def clear_injected(self) -> None: ...
