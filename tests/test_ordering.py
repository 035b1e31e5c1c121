"""Ordered pushes (issue 14, point 2): a new endpoint reaches a client ztunnel only after the
destination node's ztunnel ACKed the listeners holding the pod's inbound chain and the routes
they name (ordering.py: Envoy warms an updated listener only once its RDS routes came).

The real pipeline (`ControlPlane` on the client-server manifests, edited on disk) and the real
grpc.aio ADS server; the ztunnels are scripted clients (`xdsclient.py`), so the test decides when
the destination ztunnel ACKs. With the barrier disabled the first test fails: the client holds the
new endpoint while the destination has not ACKed; with a barrier on LDS only it fails too (the
endpoint goes out on the LDS ACK, before the destination has the pod's route).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from prometheus_client import CollectorRegistry

from labpods import new_server_pod
from xdsclient import DeltaClient, SotwClient
from xdsserver.app import ControlPlane, ManifestSource
from xdsserver.pipeline import ephemeral_certs
from xdsserver.xds.server import AdsServer, start_server
from xdsserver.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

SCENARIO = Path(__file__).resolve().parent.parent / "golden" / "client-server" / "manifests"
CLIENT_NODE, DEST_NODE, NEW_IP = "ambient-worker", "ambient-worker2", "10.244.2.9"


def endpoint_ips(client: SotwClient) -> set[str]:
    return _ips(client.resources.get(ENDPOINT, {}).values())


def served_ips(cp: ControlPlane, node: str) -> set[str]:
    """The pod addresses in the CLAs the server holds for `node` (what any of its streams can get)."""
    snap = cp.cache.get(node)
    return _ips(snap.get(ENDPOINT, n).body for n in snap.names(ENDPOINT))


async def until(pred, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


def routes(cp: ControlPlane) -> list[str]:
    """Every RouteConfiguration the destination's listeners name (refcheck: no unused ones)."""
    return sorted(cp.cache.get(DEST_NODE).names(ROUTE))


def _name(a) -> str:
    return RouteConfiguration.FromString(a.value).name


def _ips(bodies) -> set[str]:
    out = set()
    for body in bodies:
        cla = ClusterLoadAssignment.FromString(body)
        for g in cla.endpoints:  # HBONE endpoints: the pod address is the internal address's endpoint_id
            out |= {e.endpoint.address.envoy_internal_address.endpoint_id.split(":")[0] for e in g.lb_endpoints}
    return out


async def setup(tmp_path: Path, timeout: float, replace_server: bool = False):
    shutil.copytree(SCENARIO, tmp_path / "m")
    cp = ControlPlane(load_objects=ManifestSource(tmp_path / "m").objects, certs=ephemeral_certs(), registry=CollectorRegistry())
    if replace_server:  # as the bench does (a timing subclass): the barrier must ask the new one
        cp.server = AdsServer(cp.cache, metrics=cp.xds_metrics)
    cp.barrier.timeout = timeout
    assert cp.rebuild()
    server = await start_server(cp.server, address="127.0.0.1:0")
    return cp, server, f"127.0.0.1:{server.xds_port}"


async def client_ztunnel(cp: ControlPlane, target: str) -> SotwClient:
    c = SotwClient(target, CLIENT_NODE, auto_ack=True)
    await c.connect()
    await c.request(CLUSTER, [])
    await c.request(ENDPOINT, sorted(cp.cache.get(CLIENT_NODE).names(ENDPOINT)))
    await c.wait_for(lambda: "10.244.2.5" in endpoint_ips(c))
    return c


async def synced_pair(cp: ControlPlane, target: str, dest: SotwClient) -> SotwClient:
    """The destination ztunnel connected with its LDS and RDS ACKed (the routes its listeners
    name, as Envoy asks), then the client ztunnel; returns the client."""
    await dest.connect()
    await dest.request(LISTENER, [])
    await dest.ack(await dest.recv(LISTENER))
    await dest.request(ROUTE, routes(cp))
    await dest.ack(await dest.recv(ROUTE))
    client = await client_ztunnel(cp, target)
    await until(lambda: cp.server.acked(DEST_NODE) is True)
    return client


async def released_to(cp: ControlPlane, client: SotwClient, ip: str) -> None:
    """The client gets ``ip`` once, released by the destination's ACK (not the timeout)."""
    await client.wait_for(lambda: ip in endpoint_ips(client), timeout=10)
    assert cp.barrier.counts["released"] == 1 and cp.barrier.counts["timeouts"] == 0
    await client.close()


def add_backend(cp: ControlPlane, tmp_path: Path) -> None:
    with open(tmp_path / "m" / "apps.yaml", "a") as f:
        f.write(new_server_pod(DEST_NODE, NEW_IP))
    assert cp.rebuild()


@pytest.mark.parametrize("replace_server", [False, True], ids=["server", "replaced-server"])
async def test_endpoint_waits_for_the_destination_ztunnel_ack(tmp_path, replace_server):
    cp, server, target = await setup(tmp_path, timeout=30.0, replace_server=replace_server)
    dest = SotwClient(target, DEST_NODE)  # ACKs only when the test says so
    try:
        client = await synced_pair(cp, target, dest)

        t0 = time.monotonic()
        add_backend(cp, tmp_path)
        new_lds = await dest.recv(LISTENER)  # the destination gets the inbound chain first
        assert any(NEW_IP.encode() in a.value for a in new_lds.resources)
        assert cp.server.acked(DEST_NODE) is False
        assert NEW_IP not in served_ips(cp, CLIENT_NODE), "the endpoint is served to the client before the destination ACKed"
        assert NEW_IP not in endpoint_ips(client)
        assert cp.barrier.counts["gated"] == 1 and cp.barrier.counts["released"] == 0

        await dest.ack(new_lds)  # Envoy ACKs LDS at once, but the new listener warms until its route came
        await until(lambda: cp.server.acked(DEST_NODE, (LISTENER,)) is True)
        await asyncio.sleep(0.3)  # an observation window for "still not", not synchronization
        assert NEW_IP not in served_ips(cp, CLIENT_NODE), "the endpoint is served on the LDS ACK, before the route"
        assert cp.barrier.counts["released"] == 0

        await dest.request(ROUTE, routes(cp))  # the new chain's route ...
        new_rds = await dest.recv(ROUTE)
        assert f"inbound_{NEW_IP}" in {_name(a) for a in new_rds.resources}
        await dest.ack(new_rds)  # ... ACKed: now the endpoint goes out
        await client.wait_for(lambda: NEW_IP in endpoint_ips(client), timeout=10)
        waited = time.monotonic() - t0
        assert cp.barrier.counts["released"] == 1 and cp.barrier.counts["timeouts"] == 0
        assert waited < cp.barrier.timeout  # released by the ACK, not by the timeout
        print(f"\nendpoint reached the client {waited * 1000:.0f} ms after the change, right after the destination's ACK")
        await client.close()
    finally:
        await dest.close()
        await server.stop(None)


async def test_unconnected_destination_delays_the_endpoint_a_bounded_time(tmp_path):
    cp, server, target = await setup(tmp_path, timeout=0.5)
    try:
        client = await client_ztunnel(cp, target)
        t0 = time.monotonic()
        add_backend(cp, tmp_path)
        await client.wait_for(lambda: NEW_IP in endpoint_ips(client), timeout=10)
        waited = time.monotonic() - t0
        assert waited >= 0.5
        assert cp.barrier.counts["timeouts"] == 1 and cp.barrier.counts["not_connected"] == 1
        await client.close()
    finally:
        await server.stop(None)


async def test_delta_destination_is_held_until_its_rds_ack(tmp_path):
    """The same rule for a delta ADS destination (`DeltaTypeState.holds`)."""
    cp, server, target = await setup(tmp_path, timeout=30.0)
    dest = DeltaClient(target, DEST_NODE)
    try:
        await dest.connect()
        await dest.subscribe(LISTENER)  # wildcard
        await dest.ack(await dest.recv(LISTENER))
        await dest.subscribe(ROUTE, routes(cp))
        await dest.ack(await dest.recv(ROUTE))
        client = await client_ztunnel(cp, target)
        await until(lambda: cp.server.acked(DEST_NODE) is True)

        add_backend(cp, tmp_path)
        await dest.ack(await dest.recv(LISTENER))
        await until(lambda: cp.server.acked(DEST_NODE, (LISTENER,)) is True)
        await asyncio.sleep(0.3)  # an observation window for "still not", not synchronization
        assert NEW_IP not in served_ips(cp, CLIENT_NODE), "the endpoint is served on the LDS ACK, before the route"
        await dest.subscribe(ROUTE, [f"inbound_{NEW_IP}"])
        await dest.ack(await dest.recv(ROUTE))
        await released_to(cp, client, NEW_IP)
    finally:
        await dest.close()
        await server.stop(None)


LONE_IP = "10.244.2.77"  # a mesh pod no Service selects: reachable only by its IP


def add_lone_pod(cp: ControlPlane, tmp_path: Path) -> None:
    pod = new_server_pod(DEST_NODE, LONE_IP).replace("server-f44ffdf6f-new01", "lone-7c9d8f6b5-x1").replace(
        "app: server", "app: lone").replace("d3000000-0000-4000-8000-0000000000aa", "d3000000-0000-4000-8000-0000000000bb")
    with open(tmp_path / "m" / "apps.yaml", "a") as f:
        f.write(pod)
    assert cp.rebuild()


async def test_pod_ip_row_waits_for_the_destination_ztunnel_ack(tmp_path):
    """A pod no Service selects is reached by its IP, through its /24's pod table (EDS): its row
    reaches the client only once the pod's node ACKed the pod's inbound chain (LDS and RDS).
    Fails when new_endpoint_nodes counts service endpoints only (the row goes out at once)."""
    cp, server, target = await setup(tmp_path, timeout=30.0)
    dest = SotwClient(target, DEST_NODE)  # ACKs only when the test says so
    try:
        client = await synced_pair(cp, target, dest)

        add_lone_pod(cp, tmp_path)
        new_lds = await dest.recv(LISTENER)
        assert any(LONE_IP.encode() in a.value for a in new_lds.resources)
        assert LONE_IP not in served_ips(cp, CLIENT_NODE), "the pod-table row is served before the destination ACKed"
        assert cp.barrier.counts["gated"] == 1
        await dest.ack(new_lds)
        await dest.request(ROUTE, routes(cp))
        await dest.ack(await dest.recv(ROUTE))
        await released_to(cp, client, LONE_IP)
    finally:
        await dest.close()
        await server.stop(None)
