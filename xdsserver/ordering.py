"""Ordered pushes (issue 14, point 2): a new endpoint reaches client ztunnels only after the
destination node's ztunnel has ACKed the listeners that carry the pod's inbound chain and the
routes they name.

Why: the client node's EDS and the destination node's LDS used to be pushed in the same round, so
a connection in the first milliseconds could reach a destination ztunnel that had no chain for the
pod yet (reset). Now, when a rebuild makes an address a ready endpoint that was not one before:

1. the destination nodes' snapshots are published in full;
2. every other node is published with its *previous* ClusterLoadAssignments (new CLAs, of new
   clusters, go out at once: nothing could reach them before);
3. once every stream of each destination node holds and has ACKed its current LDS *and* RDS
   (`AdsServer.acked`), or after `timeout` seconds (logged and counted: `timeouts`,
   `not_connected`), the other nodes get their latest snapshot.

Why RDS too: Envoy ACKs an LDS update at once, but the updated listener (an in-place filter-chain
update) only replaces the old one once it has warmed, i.e. once the RouteConfiguration its new
chain names (stock flavor: `inbound_<pod ip>`, over RDS) has arrived; until then the old listener,
without the pod's chain, takes the connections (the lab test showed resets).


Content-blind towards the translator: it only swaps whole EDS resources by name.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping

from .model import Model
from .xds.types import ENDPOINT

log = logging.getLogger(__name__)

ResourceSet = Mapping[str, list]


def new_endpoint_nodes(old: Model | None, new: Model) -> set[str]:
    """Nodes hosting an address that is a ready endpoint in `new` and was none in `old`."""
    if old is None:
        return set()
    before = {e.ip for _, eps in old.endpoints for e in eps if e.ready}
    return {e.node_name for _, eps in new.endpoints for e in eps if e.ready and e.ip not in before and e.node_name}


def with_previous_endpoints(new: ResourceSet, previous: ResourceSet | None) -> ResourceSet:
    """`new` with each CLA that `previous` had replaced by the previous bytes."""
    if previous is None or ENDPOINT not in new:
        return new
    old = dict(previous.get(ENDPOINT, []))
    out = dict(new)
    out[ENDPOINT] = [(n, old.get(n, body)) for n, body in new[ENDPOINT]]
    return out


class EndpointBarrier:
    """Splits a publish into destination-first and held parts, and releases the held part."""

    def __init__(self, dest_acked: Callable[[str], bool | None], *, timeout: float = 5.0, enabled: bool = True) -> None:
        self.dest_acked = dest_acked  # node -> True (all its streams ACKed current LDS+RDS), False, None (no stream)
        self.timeout = timeout
        self.enabled = enabled
        self.counts: collections.Counter[str] = collections.Counter()  # gated, released, timeouts, not_connected
        self._wake = asyncio.Event()
        self.pending: set[asyncio.Task] = set()

    def acked(self) -> None:
        """Called on every ACK: re-check the waiting barriers."""
        self._wake.set()

    def split(
        self, publish: Mapping[str, ResourceSet], previous: Mapping[str, ResourceSet], dest: set[str]
    ) -> tuple[dict[str, ResourceSet], set[str]]:
        """(what to publish now, nodes whose latest snapshot must wait for `dest`)."""
        if not self.enabled or not dest:
            return dict(publish), set()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop to wait in (a synchronous caller): publish at once
            return dict(publish), set()
        now: dict[str, ResourceSet] = {}
        held: set[str] = set()
        for node, res in publish.items():
            if node in dest:
                now[node] = res
                continue
            gated = with_previous_endpoints(res, previous.get(node))
            now[node] = gated
            if gated is not res and gated.get(ENDPOINT) != res.get(ENDPOINT):
                held.add(node)
        if held:
            self.counts["gated"] += 1
        return now, held

    def release_later(self, dest: set[str], held: set[str], publish_latest: Callable[[set[str]], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._release(dest, held, publish_latest), name="endpoint-barrier")
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _release(self, dest: set[str], held: set[str], publish_latest: Callable[[set[str]], None]) -> None:
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            while True:
                states = {n: self.dest_acked(n) for n in dest}
                if all(states.values()):
                    self.counts["released"] += 1
                    log.info("endpoint barrier: %s ACKed the inbound chains after %.0f ms; pushing endpoints to %d node(s)",
                             sorted(dest), (time.monotonic() - started) * 1000, len(held))
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(n for n, s in states.items() if not s)
                    unconnected = sorted(n for n, s in states.items() if s is None)
                    self.counts["timeouts"] += 1
                    if unconnected:
                        self.counts["not_connected"] += 1
                    log.warning("endpoint barrier: no LDS/RDS ACK from %s within %.1f s (not connected: %s); pushing endpoints anyway",
                                missing, self.timeout, unconnected or "none")
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    pass
        finally:
            publish_latest(held)
