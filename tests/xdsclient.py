"""Scripted ADS clients (SotW and delta) for conformance tests and the load harness.

They speak real gRPC, record everything they receive, and either step exactly as a test scripts
them or ACK like Envoy (`auto_ack=True`: ACK every response with the current names, NACK when
`nack_if(response)` returns a message).

`sync()` is an exact barrier without sleeping: it sends a request for the test-only PROBE type
that the server must answer, and waits for that answer. The server handles a stream's messages in
order, so every response caused by earlier requests has been received when it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

PROBE = "type.googleapis.com/xdsserver.test.Probe"
PROBE_RESOURCES = (("probe-0", b"\x08\x00"), ("probe-1", b"\x08\x01"))

DEFAULT_TIMEOUT = 5.0


def make_node(node_name: str | None, node_id: str | None = None) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id or f"ztunnel~{node_name}", cluster="ztunnel")
    if node_name is not None:
        node.metadata.CopyFrom(struct_pb2.Struct(fields={"NODE_NAME": struct_pb2.Value(string_value=node_name)}))
    return node


class StreamClosed(Exception):
    """The server ended the stream; `code` and `details` say how."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class _AdsClient:
    _method: str

    def __init__(
        self,
        target: str,
        node_name: str | None,
        *,
        node_id: str | None = None,
        auto_ack: bool = False,
        nack_if: Callable[[object], str | None] | None = None,
        channel: grpc.aio.Channel | None = None,
        node: base_pb2.Node | None = None,
    ):
        self.target = target
        self.node = node if node is not None else make_node(node_name, node_id)
        self.auto_ack = auto_ack
        self.nack_if = nack_if
        self._own_channel = channel is None
        self._channel = channel
        self._call = None
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._sent_node = False
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.received: list = []  # every response, in order (probe answers included)
        self.sent: list = []  # every request, in order
        self.nonces: dict[str, str] = {}  # type -> nonce of the latest response
        self.closed: StreamClosed | None = None
        self._closed_event = asyncio.Event()
        self._got = asyncio.Event()  # set on every response (and on close), for wait_for
        self._probe_count = 0

    # -- lifecycle -------------------------------------------------------------------------------
    async def connect(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
            )
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = getattr(stub, self._method)()
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self._own_channel and self._channel is not None:
            await self._channel.close()

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _read(self) -> None:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                self.received.append(resp)
                self.nonces[resp.type_url] = resp.nonce
                self._apply(resp)
                self.inbox.put_nowait(resp)
                self._got.set()
                if self.auto_ack and resp.type_url != PROBE:
                    msg = self.nack_if(resp) if self.nack_if else None
                    await self._auto_reply(resp, msg)
        except grpc.aio.AioRpcError as e:
            self.closed = StreamClosed(e.code(), e.details())
        except asyncio.CancelledError:
            raise
        finally:
            if self.closed is None:
                try:
                    code, details = await asyncio.wait_for(self._call.code(), 1), await asyncio.wait_for(self._call.details(), 1)
                except Exception:
                    code, details = None, None
                self.closed = StreamClosed(code, details)
            self._closed_event.set()
            self._got.set()

    async def send_raw(self, req) -> None:
        """Write `req` as is (the client still adds its node to the stream's first request)."""
        await self._write(req)

    async def _write(self, req) -> None:
        if not self._sent_node:
            if not req.HasField("node"):
                req.node.CopyFrom(self.node)
            self._sent_node = True
        self.sent.append(req)
        async with self._lock:
            try:
                await self._call.write(req)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                # The server already ended the stream (e.g. refused it before reading this
                # request); the reader records how, for wait_closed()/recv() to report.
                if self._reader is not None:
                    await asyncio.wait([self._reader], timeout=DEFAULT_TIMEOUT)

    # -- reading ---------------------------------------------------------------------------------
    async def recv(self, type_url: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        """The next unread response (of `type_url` if given; others before it are dropped from the inbox)."""
        async with asyncio.timeout(timeout):
            while True:
                if self.inbox.empty() and self.closed is not None:
                    raise self.closed
                getter = asyncio.ensure_future(self.inbox.get())
                closer = asyncio.ensure_future(self._closed_event.wait())
                done, _ = await asyncio.wait({getter, closer}, return_when=asyncio.FIRST_COMPLETED)
                closer.cancel()
                if getter not in done:
                    getter.cancel()
                    continue
                resp = getter.result()
                if resp.type_url == PROBE:
                    continue
                if type_url is None or resp.type_url == type_url:
                    return resp

    def drain(self) -> list:
        """Every unread non-probe response, in order."""
        out = []
        while not self.inbox.empty():
            resp = self.inbox.get_nowait()
            if resp.type_url != PROBE:
                out.append(resp)
        return out

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> StreamClosed:
        await asyncio.wait_for(self._closed_event.wait(), timeout)
        assert self.closed is not None
        return self.closed

    async def sync(self, timeout: float = DEFAULT_TIMEOUT) -> list:
        """Barrier: returns every non-probe response received since the last read, in order."""
        self._probe_count += 1
        await self._send_probe(self._probe_count)
        out = []
        async with asyncio.timeout(timeout):
            while True:
                if self.inbox.empty() and self.closed is not None:
                    raise self.closed
                resp = await self.inbox.get()
                if resp.type_url == PROBE:
                    if self._probe_matches(resp):
                        return out
                    continue
                out.append(resp)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until `predicate()` holds over the recorded state, re-checking on every response."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.closed is not None:
                    raise self.closed
                self._got.clear()
                await self._got.wait()

    def _apply(self, resp) -> None:  # overridden
        pass

    async def _auto_reply(self, resp, nack_message: str | None) -> None:  # overridden
        raise NotImplementedError

    async def _send_probe(self, n: int) -> None:  # overridden
        raise NotImplementedError

    def _probe_matches(self, resp) -> bool:
        return True

    def count(self, type_url: str | None = None) -> int:
        """Responses received (probe answers excluded)."""
        return sum(1 for r in self.received if r.type_url != PROBE and (type_url is None or r.type_url == type_url))


class SotwClient(_AdsClient):
    """SotW ADS client. `names[type]` is what it subscribes to; `versions[type]` what it accepted."""

    _method = "StreamAggregatedResources"

    def __init__(self, *args, versions: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.names: dict[str, list[str]] = {}
        self.versions: dict[str, str] = dict(versions or {})  # last accepted version per type
        self.resources: dict[str, dict[str, bytes]] = {}  # what it holds, per type

    async def request(
        self,
        type_url: str,
        names: Iterable[str] | None = None,
        *,
        version: str | None = None,
        nonce: str | None = None,
        error: str | None = None,
    ) -> None:
        """Send a request; defaults: the current names, accepted version and latest nonce of the type."""
        if names is not None:
            self.names[type_url] = list(names)
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=self.names.get(type_url, []),
            version_info=self.versions.get(type_url, "") if version is None else version,
            response_nonce=self.nonces.get(type_url, "") if nonce is None else nonce,
        )
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=error))
        await self._write(req)

    async def ack(self, resp: discovery_pb2.DiscoveryResponse) -> None:
        self.versions[resp.type_url] = resp.version_info
        await self.request(resp.type_url, nonce=resp.nonce, version=resp.version_info)

    async def nack(self, resp: discovery_pb2.DiscoveryResponse, message: str = "rejected by test") -> None:
        await self.request(resp.type_url, nonce=resp.nonce, error=message)

    def _apply(self, resp) -> None:
        from xdsserver.xds.types import FULL_STATE_TYPES

        held = self.resources.setdefault(resp.type_url, {})
        if resp.type_url in FULL_STATE_TYPES:
            held.clear()
        for a in resp.resources:
            held[_name_of(a)] = a.value

    async def _auto_reply(self, resp, nack_message: str | None) -> None:
        if nack_message is None:
            await self.ack(resp)
        else:
            await self.nack(resp, nack_message)

    async def _send_probe(self, n: int) -> None:
        # alternating names: each change newly names an existing probe resource, so it is answered
        await self.request(PROBE, [PROBE_RESOURCES[n % 2][0]])

    def _probe_matches(self, resp) -> bool:
        return resp.nonce == self.nonces.get(PROBE) and len(resp.resources) == 1


class DeltaClient(_AdsClient):
    """Delta ADS client. `held[type]` maps name -> version of what it holds."""

    _method = "DeltaAggregatedResources"

    def __init__(self, *args, initial_versions: Mapping[str, Mapping[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: dict[str, dict[str, str]] = {t: dict(v) for t, v in (initial_versions or {}).items()}
        self.bodies: dict[str, dict[str, bytes]] = {}
        self._started: set[str] = set()

    async def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        error: str | None = None,
        initial_versions: Mapping[str, str] | None = None,
    ) -> None:
        """Send a request. The first one per type carries `initial_resource_versions` (held versions)."""
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
        )
        if type_url not in self._started:
            self._started.add(type_url)
            init = initial_versions if initial_versions is not None else self.held.get(type_url, {})
            req.initial_resource_versions.update(dict(init))
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=error))
        await self._write(req)

    async def subscribe(self, type_url: str, names: Iterable[str] = ()) -> None:
        await self.request(type_url, subscribe=names)

    async def unsubscribe(self, type_url: str, names: Iterable[str]) -> None:
        await self.request(type_url, unsubscribe=names)

    async def ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.request(resp.type_url, nonce=resp.nonce)

    async def nack(self, resp: discovery_pb2.DeltaDiscoveryResponse, message: str = "rejected by test") -> None:
        await self.request(resp.type_url, nonce=resp.nonce, error=message)

    def _apply(self, resp) -> None:
        held = self.held.setdefault(resp.type_url, {})
        bodies = self.bodies.setdefault(resp.type_url, {})
        for r in resp.resources:
            held[r.name] = r.version
            bodies[r.name] = r.resource.value
        for n in resp.removed_resources:
            held.pop(n, None)
            bodies.pop(n, None)

    async def _auto_reply(self, resp, nack_message: str | None) -> None:
        if nack_message is None:
            await self.ack(resp)
        else:
            await self.nack(resp, nack_message)

    async def _send_probe(self, n: int) -> None:
        await self.request(PROBE, subscribe=[PROBE_RESOURCES[0][0]])  # a subscribed name is always answered

    def _probe_matches(self, resp) -> bool:
        return resp.nonce == self.nonces.get(PROBE)


def _name_of(a) -> str:
    """Name of a SotW resource: field 1 of Listener/Cluster/Secret, `cluster_name` (1) of a CLA."""
    from google.protobuf.internal.decoder import _DecodeVarint

    data = a.value
    pos = 0
    while pos < len(data):
        key, pos = _DecodeVarint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, pos = _DecodeVarint(data, pos)
            if number == 1:
                return data[pos : pos + length].decode()
            pos += length
        elif wire_type == 0:
            _, pos = _DecodeVarint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            break
    return ""
