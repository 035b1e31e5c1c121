"""Ordered pushes (issue 14, point 2): a new endpoint reaches client ztunnels only after the
destination node's ztunnel has ACKed the listeners that carry the pod's inbound chain and the
routes they name.

Why: the client node's EDS and the destination node's LDS used to be pushed in the same round, so
a connection in the first milliseconds could reach a destination ztunnel that had no chain for the
pod yet (reset). Now, when a rebuild makes an address a ready endpoint that was not one before:

1. the destination nodes' changes are published in full;
2. every other node's change is published without the ClusterLoadAssignments it already has
   (they keep their previous bytes; new CLAs, of new clusters, go out at once: nothing could
   reach them before);
3. once every stream of each destination node holds and has ACKed its current LDS *and* RDS
   (`AdsServer.acked`), or after `timeout` seconds (logged and counted: `timeouts`,
   `not_connected`), the other nodes get the latest bytes of the CLAs held back.

Why RDS too: Envoy ACKs an LDS update at once, but the updated listener (an in-place filter-chain
update) only replaces the old one once it has warmed, i.e. once the RouteConfiguration its new
chain names (stock flavor: `inbound_<pod ip>`, over RDS) has arrived; until then the old listener,
without the pod's chain, takes the connections (the lab test showed resets).

Content-blind towards the translator: it only holds whole EDS resources by name, and works on
the per-node deltas the cache takes, so its cost is the change's, not every node's resources.
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

def new_endpoint_nodes(old: Model | None, new: Model) -> set[str]:
    """Nodes hosting an address that is a ready endpoint in `new` and was none in `old`, or a
    pod IP that `old` did not have: a pod IP is a row of its /24's pod table (an EDS resource,
    translate/podtable.py), so it is held like a service endpoint until the pod's node ACKed the
    pod's inbound chain. O(endpoints + pods); only the full rebuild path calls it."""
    if old is None:
        return set()
    before = {e.ip for _, eps in old.endpoints for e in eps if e.ready}
    nodes = {e.node_name for _, eps in new.endpoints for e in eps if e.ready and e.ip not in before and e.node_name}
    if old.pods is not new.pods:
        known = {ip for p in old.pods for ip in p.ips}
        nodes |= {p.node_name for p in new.pods if p.node_name and not p.host_network and any(ip not in known for ip in p.ips)}
    return nodes


Deltas = Mapping[str, Mapping[str, Mapping[str, object]]]  # node -> type URL -> name -> bytes or None


def hold_endpoints(deltas: Deltas, served: Callable[[str], Mapping[str, object]], dest: set[str]) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """(deltas to publish now, node -> CLA names held back): every node outside `dest` keeps the
    CLAs it is served (`served(node)`: its CLAs by name) until the release; CLAs it does not have
    yet, of new clusters, and removals go out at once. O(change): only the delta's names are read."""
    now: dict[str, dict] = {}
    held: dict[str, set[str]] = {}
    for node, delta in deltas.items():
        eds = delta.get(ENDPOINT)
        if node in dest or not eds:
            now[node] = dict(delta)
            continue
        have = served(node)
        keep = {name for name, body in eds.items() if body is not None and name in have}
        if not keep:
            now[node] = dict(delta)
            continue
        held[node] = keep
        out = {t: d for t, d in delta.items() if t != ENDPOINT}
        rest = {name: body for name, body in eds.items() if name not in keep}
        if rest:
            out[ENDPOINT] = rest
        now[node] = out
    return now, held


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

    def split(self, deltas: Deltas, served: Callable[[str], Mapping[str, object]], dest: set[str]) -> tuple[dict[str, dict], dict[str, set[str]]]:
        """:func:`hold_endpoints` when the barrier is on and a loop can wait for the release."""
        if not self.enabled or not dest:
            return {n: dict(d) for n, d in deltas.items()}, {}
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop to wait in (a synchronous caller): publish at once
            return {n: dict(d) for n, d in deltas.items()}, {}
        now, held = hold_endpoints(deltas, served, dest)
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
