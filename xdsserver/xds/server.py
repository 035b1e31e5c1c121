"""grpc.aio ADS servicer (SotW and delta): a thin reader task and push loop per stream.

All protocol decisions are made by the pure state machines in `stream.py`; this module only
identifies the node, feeds requests and snapshot changes to them in arrival order, writes the
responses they return, and keeps status, NACK records, counters and metrics.

Register with `start_server(...)` or `AdsServer.add_to_server(server)`: responses are then written
as pre-encoded bytes. The generated `add_AggregatedDiscoveryServiceServicer_to_server` also works,
through a slower path that re-parses each response into a message.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from .cache import Snapshot, SnapshotCache, SnapshotChange
from .limits import Limits, flag_of
from .metrics import XdsMetrics
from .stream import (
    CHANGE,
    REMOVAL,
    DeltaResponse,
    DeltaStream,
    NackRecord,
    NonceSource,
    RequestOutcome,
    SotwResponse,
    SotwStream,
)
from .types import LISTENER, PUSH_ORDER, ROUTE, short

log = logging.getLogger(__name__)

__all__ = ["AdsServer", "NODE_NAME_KEY", "node_name_of", "start_server"]

NODE_NAME_KEY = "NODE_NAME"
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"

_CHANGED = object()
_EOF = object()

Authorize = Callable[[base_pb2.Node, grpc.aio.ServicerContext], "str | None | Awaitable[str | None]"]


def node_name_of(node: base_pb2.Node) -> str:
    """The ztunnel's Kubernetes node name from `node.metadata["NODE_NAME"]`, or ""."""
    if not node.HasField("metadata"):
        return ""
    value = node.metadata.fields.get(NODE_NAME_KEY)
    return value.string_value if value is not None else ""


def _node_key(node: base_pb2.Node) -> tuple[str, str]:
    return (node.id, node_name_of(node))


@dataclass(eq=False)
class _Conn:
    id: int
    node: str
    node_id: str
    node_key: tuple[str, str]
    mode: str
    peer: str
    machine: SotwStream | DeltaStream
    snapshot: Snapshot | None
    opened: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    change_pending: bool = False
    last_send: dict[str, float] = field(default_factory=dict)
    pending_ack: dict[str, tuple[str, float]] = field(default_factory=dict)  # type -> (nonce, change time)
    unknown_logged: set[str] = field(default_factory=set)
    task: asyncio.Task | None = None  # the gRPC handler task, cancelled to shed the stream
    slots: asyncio.Semaphore | None = None  # pending-request slots (backpressure on the reader)
    sends: int = 0  # responses handed to gRPC on this stream
    max_queued: int = 0  # high-water mark of requests read but not yet handled
    shed: bool = False
    closed: bool = False
    pushing: bool = False  # between taking a new snapshot and having handed every response to gRPC
    release: Callable[[], None] = lambda: None  # drops the cache subscription and the reader


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """Aggregated Discovery Service over a `SnapshotCache`.

    `authorize(node, context) -> node_name` may raise or abort (e.g. PERMISSION_DENIED) and may be
    async; by default the node name is trusted from `node.metadata["NODE_NAME"]`.
    """

    def __init__(
        self,
        cache: SnapshotCache,
        *,
        metrics: XdsMetrics | None = None,
        authorize: Authorize | None = None,
        delta_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
        types: tuple[str, ...] = PUSH_ORDER,
        limits: Limits | None = None,
    ):
        self.cache = cache
        self.limits = limits or Limits()
        self.metrics = metrics
        self._authorize = authorize
        self.delta_only = delta_only
        self._clock = clock
        self.types = types
        self._nonces = NonceSource(secrets.token_hex(3) + "-")
        self._ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}
        self._nacks: dict[tuple[str, str], dict[str, Any]] = {}
        self._raw = False  # True once registered through add_to_server (bytes serializer)
        # responses sent, by (short type, reason: request | change | removal)
        self.counters: collections.Counter[tuple[str, str]] = collections.Counter()
        # protocol events: stale_nonce, nack, ack, unknown_type, resume, streams_opened, streams_refused,
        # and per limit: refused_streams_per_node, refused_resource_names, streams_shed
        self.events: collections.Counter[str] = collections.Counter()
        # streams shed because the client stopped reading (latest 64): stream, node, sends, blocked
        self.shed_streams: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)
        self.ack_listeners: list[Callable[[], None]] = []  # called after every ACK (ordering.py)
        # resources carried by those responses, by (short type, mode): resume must add none
        self.resources_sent: collections.Counter[tuple[str, str]] = collections.Counter()

    # -- registration ----------------------------------------------------------------------------
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register both ADS RPCs, writing responses as pre-encoded bytes."""
        self._raw = True
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=_decoder(discovery_pb2.DiscoveryRequest),
                response_serializer=_as_bytes,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=_decoder(discovery_pb2.DeltaDiscoveryRequest),
                response_serializer=_as_bytes,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    # -- RPCs ------------------------------------------------------------------------------------
    async def StreamAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for out in self._serve(request_iterator, context, "sotw"):
            yield out if self._raw else discovery_pb2.DiscoveryResponse.FromString(out)

    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 (gRPC name)
        async for out in self._serve(request_iterator, context, "delta"):
            yield out if self._raw else discovery_pb2.DeltaDiscoveryResponse.FromString(out)

    # -- the stream loop -------------------------------------------------------------------------
    async def _serve(self, request_iterator, context, mode: str):
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        if isinstance(first, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(first))
        # Refusals come after the first request is read: a status sent while the client is still
        # writing races its write, and gRPC core may then report INTERNAL instead of our status.
        if mode == "sotw" and self.delta_only:
            self.events["streams_refused"] += 1
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server serves delta xDS only (DeltaAggregatedResources)")
        if not self.cache.ready:
            self.events["streams_refused"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "xDS server not ready: configuration source not loaded yet")
        node = await self._identify(first, context)
        await self._admit(node, first, context)
        snap = self.cache.get(node)
        machine = SotwStream(self._nonces, self.types) if mode == "sotw" else DeltaStream(self._nonces, self.types)
        conn = _Conn(
            id=next(self._ids), node=node, node_id=first.node.id, node_key=_node_key(first.node), mode=mode,
            peer=context.peer() or "", machine=machine, snapshot=snap, opened=self._clock(),
            task=asyncio.current_task(), slots=asyncio.Semaphore(self.limits.max_pending_requests),
        )
        self._conns[conn.id] = conn
        self.events["streams_opened"] += 1
        if self.metrics:
            self.metrics.connected.labels(mode).inc()
        log.info("xDS %s stream %d opened: node %r (id %r) from %s", mode, conn.id, node, conn.node_id, conn.peer)
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def changed() -> None:
            if not conn.change_pending:
                conn.change_pending = True
                conn.queue.put_nowait(_CHANGED)

        def on_change(_change: SnapshotChange) -> None:
            if threading.get_ident() == loop_thread:
                changed()
            else:
                loop.call_soon_threadsafe(changed)

        unsubscribe = self.cache.subscribe(node, on_change)
        reader = asyncio.create_task(self._read(requests, conn), name=f"xds-reader-{conn.id}")
        conn.release = lambda: (unsubscribe(), reader.cancel()) and None
        try:
            item: Any = first
            while item is not _EOF:
                if item is _CHANGED or conn.change_pending:
                    # a pending change is pushed (in push order) before any later request is answered,
                    # so a request never gets new content ahead of the types it depends on
                    conn.change_pending = False
                    snap = self.cache.get(node)
                    if snap is not None and snap is not conn.snapshot:  # removed node: keep last state, no push
                        conn.snapshot = snap
                        started = self._clock()
                        conn.pushing = True
                        for resp in machine.on_snapshot(snap):
                            async for out in self._send(conn, resp):
                                yield out
                        conn.pushing = False
                        if self.metrics:
                            self.metrics.push_time.labels("all").observe(self._clock() - started)
                if item is not _CHANGED:
                    if item is not first:
                        conn.slots.release()  # type: ignore[union-attr]
                    await self._check(item, conn, context)
                    outcome = machine.on_request(item, conn.snapshot)
                    self._account(conn, item, outcome)
                    await self._check_subscriptions(item.type_url, conn, context)
                    for resp in outcome.responses:
                        async for out in self._send(conn, resp):
                            yield out
                item = await conn.queue.get()
        finally:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        """Forget a stream (idempotent: its handler's `finally` and the shedder both call it)."""
        if conn.closed:
            return
        conn.closed = True
        conn.release()
        self._conns.pop(conn.id, None)
        if self.metrics:
            self.metrics.connected.labels(conn.mode).dec()
        log.info("xDS %s stream %d closed: node %r%s", conn.mode, conn.id, conn.node, " (shed)" if conn.shed else "")

    @staticmethod
    async def _read(requests, conn: _Conn) -> None:
        """Move requests to the stream's queue, at most `max_pending_requests` ahead of the loop.

        When the slots are used up this stops reading, so gRPC stops granting the client HTTP/2
        window: a client that writes without end is slowed down, not buffered.
        """
        queue, slots = conn.queue, conn.slots
        assert slots is not None
        try:
            while True:
                await slots.acquire()
                try:
                    req = await requests.__anext__()
                except StopAsyncIteration:
                    break
                queue.put_nowait(req)
                conn.max_queued = max(conn.max_queued, queue.qsize())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client went away; the loop ends on _EOF
            log.debug("xDS stream read ended: %r", e)
        finally:
            queue.put_nowait(_EOF)

    async def _admit(self, node: str, first, context) -> None:
        """Refuse a stream beyond the per-node limit (RESOURCE_EXHAUSTED, naming limit and flag)."""
        limit = self.limits.max_streams_per_node
        held = sum(1 for c in self._conns.values() if c.node == node)
        if held >= limit:
            self.events["streams_refused"] += 1
            self.events["refused_streams_per_node"] += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {node!r} (id {first.node.id!r}) already has {held} ADS streams open; "
                f"limit {limit} ({flag_of('max_streams_per_node')})",
            )

    async def _identify(self, first, context) -> str:
        if not first.HasField("node"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first request of an ADS stream must carry `node`")
        node_id = first.node.id
        if self._authorize is not None:
            name = self._authorize(first.node, context)
            if inspect.isawaitable(name):
                name = await name
            if not name:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id!r} is not authorized")
        else:
            name = node_name_of(first.node)
            if not name:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {node_id!r}: metadata {NODE_NAME_KEY!r} is missing or empty; cannot tell which node's config to serve",
                )
        if self.cache.get(name) is None:
            self.events["streams_refused"] += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {name!r} (id {node_id!r}) is unknown to this server")
        return name

    async def _check(self, req, conn: _Conn, context) -> None:
        if isinstance(req, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream {conn.id} (node {conn.node!r}): {req}")
        count = _name_count(req)
        if count > self.limits.max_resource_names:
            await self._refuse_names(conn, context, f"request for {req.type_url!r} names {count} resources", req.type_url)
        if not req.type_url:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"stream {conn.id} (node {conn.node!r}): request without type_url (required on ADS)"
            )
        if req.HasField("node") and _node_key(req.node) != conn.node_key:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream {conn.id}: node changed mid-stream from {conn.node_key!r} to {_node_key(req.node)!r}",
            )

    async def _check_subscriptions(self, type_url: str, conn: _Conn, context) -> None:
        """Delta subscriptions accumulate over requests: bound what one type may hold."""
        st = conn.machine.states.get(type_url)
        if st is not None and len(st.names) > self.limits.max_resource_names:
            await self._refuse_names(conn, context, f"stream subscribes to {len(st.names)} {type_url!r} resources", type_url)

    async def _refuse_names(self, conn: _Conn, context, what: str, type_url: str) -> None:
        self.events["refused_resource_names"] += 1
        log.warning("xDS stream %d (node %r): %s; refused", conn.id, conn.node, what)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"stream {conn.id} (node {conn.node!r}): {what}; limit {self.limits.max_resource_names} "
            f"({flag_of('max_resource_names')})",
        )

    def _shed(self, conn: _Conn, since: float) -> None:
        """The client has not taken a response for `send_timeout`: stop serving the stream.

        grpc.aio cannot end a call with a blocked write (abort would queue its status behind the
        write), so the handler task is cancelled: the stream's state, subscription and per-node
        slot are released now; gRPC closes the call itself when the client reads, goes away, or
        its connection reaches `max_connection_age` (+ grace).
        """
        if conn.closed:
            return
        conn.shed = True
        self.events["streams_shed"] += 1
        log.warning(
            "xDS %s stream %d (node %r, %s): a response write blocked for %.1f s (limit %s s, %s); stream shed",
            conn.mode, conn.id, conn.node, conn.peer, self._clock() - since, self.limits.send_timeout,
            flag_of("send_timeout"),
        )
        self.shed_streams.append(
            {"stream": conn.id, "node": conn.node, "mode": conn.mode, "sends": conn.sends,
             "blocked": round(self._clock() - since, 3)}
        )
        self._close(conn)
        if conn.task is not None:
            conn.task.cancel()

    def _account(self, conn: _Conn, req, outcome: RequestOutcome) -> None:
        t = req.type_url
        label = short(t).lower()
        kind = outcome.kind
        if kind == "unknown":
            self.events["unknown_type"] += 1
            if self.metrics:
                self.metrics.unknown_type.inc()
            if t not in conn.unknown_logged and len(conn.unknown_logged) < 16:
                conn.unknown_logged.add(t)
                log.warning("xDS stream %d (node %r): ignoring request for unserved type %r", conn.id, conn.node, t)
            return
        if kind in ("stale",):
            self.events["stale_nonce"] += 1
            if self.metrics:
                self.metrics.expired_nonce.labels(label).inc()
        if kind == "resume":
            self.events["resume"] += 1
        if outcome.nack is not None:
            self._record_nack(conn, outcome.nack)
        if outcome.acked_nonce is not None:
            self.events["ack"] += 1
            for listener in self.ack_listeners:
                listener()
            rec = self._nacks.get((conn.node, t))
            if rec is not None and rec["nonce"] != outcome.acked_nonce:  # a later response was accepted
                rec["active"] = False
            pending = conn.pending_ack.get(t)
            if pending is not None and pending[0] == outcome.acked_nonce:
                del conn.pending_ack[t]
                if self.metrics:
                    self.metrics.convergence.observe(max(0.0, self._clock() - pending[1]))

    def _record_nack(self, conn: _Conn, nack: NackRecord) -> None:
        self.events["nack"] += 1
        if self.metrics:
            self.metrics.rejects.labels(short(nack.type_url).lower()).inc()
        key = (conn.node, nack.type_url)
        prev = self._nacks.get(key)
        self._nacks[key] = {
            "node": conn.node,
            "type": short(nack.type_url),
            "type_url": nack.type_url,
            "stream": conn.id,
            "version": nack.version,
            "nonce": nack.nonce,
            "accepted_version": nack.accepted_version,
            "code": nack.code,
            "message": nack.message,
            "resources": list(nack.resources),
            "count": (prev["count"] + 1) if prev else 1,
            "active": True,
        }
        log.warning(
            "xDS NACK from node %r for %s version %s: %s", conn.node, short(nack.type_url), nack.version, nack.message
        )

    async def _send(self, conn: _Conn, resp: SotwResponse | DeltaResponse):
        t = resp.type_url
        label = short(t).lower()
        data = resp.encode()
        now = self._clock()
        self.counters[(short(t), resp.reason)] += 1
        self.resources_sent[(short(t), conn.mode)] += len(resp.names)
        conn.last_send[t] = now
        if resp.reason in (CHANGE, REMOVAL):
            changed_at = self.cache.changed_at(conn.node)
            if changed_at is not None:
                conn.pending_ack[t] = (resp.nonce, changed_at)
        if self.metrics:
            self.metrics.pushes.labels(label).inc()
            self.metrics.config_size.labels(label).observe(len(data))
        conn.sends += 1
        timer = None
        if self.limits.send_timeout is not None:
            timer = asyncio.get_running_loop().call_later(self.limits.send_timeout, self._shed, conn, now)
        try:
            yield data  # gRPC writes it before resuming us: this blocks while the client does not read
        finally:
            if timer is not None:
                timer.cancel()
        if self.metrics:
            self.metrics.send_time.observe(self._clock() - now)

    # -- introspection ---------------------------------------------------------------------------
    def acked(self, node: str, types: tuple[str, ...] = (LISTENER, ROUTE)) -> bool | None:
        """Whether every stream of `node` subscribes to, holds and has ACKed every resource of
        `types` in the node's current snapshot (None: no stream). The endpoint barrier's readiness
        test (ordering.py): Envoy ACKs an LDS update before the new listener has warmed, and it
        warms only once the RouteConfigurations it names (RDS) have arrived."""
        snap = self.cache.get(node)
        conns = [c for c in self._conns.values() if c.node == node]
        if not conns:
            return None
        for c in conns:
            if snap is None or c.pushing or c.change_pending or c.snapshot is not snap:
                return False
            for t in types:
                st = c.machine.states.get(t)
                if snap.names(t) and (st is None or not st.holds(snap)):
                    return False
        return True

    def sync_status(self) -> list[dict]:
        """Per connected stream and type: versions, nonces, ACK/NACK state, age of the last send."""
        now = self._clock()
        out = []
        for cid in sorted(self._conns):
            conn = self._conns[cid]
            for t in _ordered(conn.machine.states):
                st = conn.machine.states[t]
                last = conn.last_send.get(t)
                out.append(
                    {
                        "node": conn.node,
                        "node_id": conn.node_id,
                        "stream": conn.id,
                        "mode": conn.mode,
                        "type": short(t),
                        "type_url": t,
                        "since_send": None if last is None else round(now - last, 3),
                        **st.status(),
                    }
                )
        return out

    def nacks(self) -> list[dict]:
        """Recorded NACKs, the latest per node and type; `active` until a later ACK of that type."""
        return [dict(self._nacks[k]) for k in sorted(self._nacks)]

    def connections(self) -> list[dict]:
        now = self._clock()
        return [
            {
                "stream": c.id, "node": c.node, "node_id": c.node_id, "mode": c.mode, "peer": c.peer,
                "age": round(now - c.opened, 3), "sends": c.sends, "max_queued": c.max_queued,
            }
            for c in (self._conns[i] for i in sorted(self._conns))
        ]

    def pushes(self, type_short: str | None = None, reason: str | None = None) -> int:
        """Responses sent, filtered by short type ("EDS") and/or reason ("request", "change", "removal")."""
        return sum(
            n for (t, r), n in self.counters.items() if (type_short is None or t == type_short) and (reason is None or r == reason)
        )


def _ordered(types) -> list[str]:
    present = set(types)
    return [t for t in PUSH_ORDER if t in present] + sorted(present.difference(PUSH_ORDER))


class Undecodable:
    """A request whose bytes are not a valid message: answered with INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, kind: str, error: Exception):
        self.kind, self.error = kind, error

    def __str__(self) -> str:
        return f"request is not a valid {self.kind}: {self.error}"


def _decoder(message_type) -> Callable[[bytes], Any]:
    """A request deserializer that does not raise: gRPC would end the stream with UNKNOWN and
    log a traceback for every malformed message."""
    from google.protobuf.message import DecodeError

    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_type.DESCRIPTOR.name, exc)

    return decode


def _name_count(req) -> int:
    if isinstance(req, discovery_pb2.DeltaDiscoveryRequest):
        return len(req.resource_names_subscribe) + len(req.resource_names_unsubscribe) + len(req.initial_resource_versions)
    return len(req.resource_names)


def _as_bytes(msg) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


async def start_server(
    servicer: AdsServer,
    *,
    address: str | None = None,
    uds: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    options: tuple[tuple[str, Any], ...] = (),
) -> grpc.aio.Server:
    """Start a grpc.aio server for `servicer` on a TCP `address` ("127.0.0.1:0") and/or a unix socket.

    The bound TCP port is available as `server.xds_port` (useful with port 0). The servicer's
    `Limits` set the transport bounds (request size, concurrent streams, connection age).
    """
    if not address and not uds:
        raise ValueError("start_server needs an address or a uds path")
    limits = servicer.limits
    server = grpc.aio.server(options=[*limits.grpc_options(), *options], maximum_concurrent_rpcs=limits.max_streams)
    servicer.add_to_server(server)
    port = None
    if address:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if not port:
            raise OSError(f"cannot bind xDS server to {address!r}")
    if uds:
        target = f"unix:{uds}"
        ok = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
        if not ok:
            raise OSError(f"cannot bind xDS server to unix socket {uds!r}")
    await server.start()
    server.xds_port = port  # type: ignore[attr-defined]
    return server
