"""Simulated ztunnels in a separate process (so the server's RSS is the server's alone).

``python -m bench.clients TARGET node:mode ...`` connects one scripted ADS client per argument
(``mode`` = ``sotw`` or ``delta``), subscribes like Envoy (wildcard CDS and LDS; EDS for the EDS
clusters, SDS for the secrets the clusters need, re-subscribed on every CDS change), ACKs every
response, prints ``ready`` once every client holds listeners, clusters, endpoints and secrets, and
exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from xdsclient import DeltaClient, SotwClient  # noqa: E402  (the conformance suite's clients)

from xdsserver.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET  # noqa: E402

TUNNEL_PREFIX = "outbound_tunnel_clus_"


class _Discard(list):
    """`received` that keeps nothing: a ztunnel does not keep old responses."""

    def append(self, _item: object) -> None:
        pass


_eds_of_body: dict[bytes, bool] = {}  # cluster body -> whether it is an EDS cluster (bodies repeat across clients)


def _is_eds(body: bytes) -> bool:
    """Memoized by body like :func:`_routes`: every SotW CDS response lists all ~1,900 clusters of
    a 100-node bench, and parsing each of them again in every one of the 100 simulated ztunnels
    (all in one process on the server's two cores) was simulator work counted in the ACK time."""
    hit = _eds_of_body.get(body)
    if hit is None:
        if len(_eds_of_body) > 1 << 16:
            _eds_of_body.clear()
        hit = _eds_of_body[body] = cluster_pb2.Cluster.FromString(body).type == cluster_pb2.Cluster.EDS
    return hit


def _wanted(bodies: dict[str, bytes]) -> tuple[list[str], list[str]]:
    """EDS names (clusters of type EDS) and SDS names (tunnel clusters' identities + ROOTCA)."""
    eds, sds = [], ["ROOTCA"]
    for name, body in bodies.items():
        if name.startswith(TUNNEL_PREFIX):
            sds.append(name[len(TUNNEL_PREFIX):])
        elif _is_eds(body):
            eds.append(name)
    return sorted(eds), sorted(sds)


_HCM = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_routes_of_body: dict[bytes, tuple[str, ...]] = {}  # listener body -> RDS names (bodies repeat across clients)


def _routes(bodies: dict[str, bytes]) -> list[str]:
    """The RouteConfigurations the listeners name (HCM ``rds``), as Envoy asks for them: the
    endpoint barrier (ordering.py) waits for the destination's RDS ACK, so a client that never
    subscribed would hold every new endpoint for the barrier's timeout."""
    out: set[str] = set()
    for body in bodies.values():
        hit = _routes_of_body.get(body)
        if hit is None:
            names = []
            if b"HttpConnectionManager" in body:  # stage 2 and the capture listener have none
                lis = listener_pb2.Listener.FromString(body)
                for fc in [*lis.filter_chains, lis.default_filter_chain]:
                    for f in fc.filters:
                        if f.typed_config.type_url == _HCM:
                            hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                            if hcm.HasField("rds"):
                                names.append(hcm.rds.route_config_name)
            if len(_routes_of_body) > 4096:
                _routes_of_body.clear()
            hit = _routes_of_body[body] = tuple(names)
        out.update(hit)
    return sorted(out)


class EnvoyLikeSotw(SotwClient):
    async def _auto_reply(self, resp, nack_message):
        await super()._auto_reply(resp, nack_message)
        if resp.type_url == LISTENER:
            routes = _routes(self.resources.get(LISTENER, {}))
            if routes != self.names.get(ROUTE, []) and (routes or ROUTE in self.names):
                await self.request(ROUTE, routes)
        if resp.type_url == CLUSTER:
            eds, sds = _wanted(self.resources.get(CLUSTER, {}))
            if eds != self.names.get(ENDPOINT):
                await self.request(ENDPOINT, eds)
            if sds != self.names.get(SECRET):
                await self.request(SECRET, sds)


class EnvoyLikeDelta(DeltaClient):
    async def _auto_reply(self, resp, nack_message):
        await super()._auto_reply(resp, nack_message)
        wanted: list[tuple[str, list[str]]] = []
        if resp.type_url == LISTENER:
            wanted.append((ROUTE, _routes(self.bodies.get(LISTENER, {}))))
        if resp.type_url == CLUSTER:
            eds, sds = _wanted(self.bodies.get(CLUSTER, {}))
            wanted += [(ENDPOINT, eds), (SECRET, sds)]
        for t, want in wanted:
            have = self.subscribed.setdefault(t, set())
            add, drop = sorted(set(want) - have), sorted(have - set(want))
            if add or drop:
                have.update(add)
                have.difference_update(drop)
                await self.request(t, subscribe=add, unsubscribe=drop)


def _holds_all(c) -> bool:
    if isinstance(c, SotwClient):
        return all(c.resources.get(t) for t in (LISTENER, CLUSTER, ENDPOINT, SECRET))
    return all(c.held.get(t) for t in (LISTENER, CLUSTER, ENDPOINT, SECRET))


async def main(target: str, specs: list[str]) -> int:
    channel_opts = [("grpc.max_receive_message_length", 1 << 30)]
    import grpc

    clients = []
    for spec in specs:
        node, _, mode = spec.partition(":")
        ch = grpc.aio.insecure_channel(target, options=channel_opts)
        cls = EnvoyLikeDelta if mode == "delta" else EnvoyLikeSotw
        c = cls(target, node, node_id=f"sidecar~{node}~{len(clients)}", auto_ack=True, channel=ch)
        c.received = _Discard()
        c.inbox.put_nowait = lambda _r: None  # type: ignore[method-assign]
        c.subscribed = {}
        clients.append((c, ch))
    for c, _ in clients:
        await c.connect()
        if isinstance(c, SotwClient):
            await c.request(CLUSTER, [])
            await c.request(LISTENER, [])
        else:
            await c.request(CLUSTER)
            await c.request(LISTENER)
    async with asyncio.timeout(300):
        while not all(_holds_all(c) for c, _ in clients):
            for c, _ in clients:
                if c.closed is not None:
                    print(f"error {c.node.id}: {c.closed}", flush=True)
                    return 1
            await asyncio.sleep(0.05)  # polling period (bounded by the timeout above)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for c, ch in clients:
        await c.close()
        await ch.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2:])))
