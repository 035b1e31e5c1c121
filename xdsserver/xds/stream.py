"""Per-stream xDS protocol state: subscriptions, nonces, ACK/NACK. Pure, no gRPC.

Each class takes a request (or a new snapshot) and returns the responses to send, so every rule
of docs/xds-protocol.md can be replayed as a request sequence in a unit test (like
go-control-plane's `subscription.go`). State kept per stream and type is small: names, nonces,
versions and references to the shared `Resource` objects last sent — never copies of bodies.

SotW (§2 decision table, §3 wildcard, §4 contents, §5 ordering, §8 resume):
  * stale nonce: names recorded, no response;
  * NACK: recorded, the rejected content version is quarantined on this stream and never sent
    again on it; the next different content is;
  * LDS/CDS full state (wildcard allowed), EDS/SDS partial: only requested names that exist, only
    changed ones after a change, every newly named one when the names change; never empty;
  * EDS answered in full on the first request of a stream and on the first request after any
    CDS response (warming);
  * a first wildcard LDS/CDS request whose version equals the current content version is a
    resumed stream: nothing is sent.
Delta (§6): subscription changes applied even with a stale nonce; every subscribed name answered;
missing names in `removed_resources`; unsubscribe-while-wildcard; `initial_resource_versions`.
Server pushes (`on_snapshot`) return additions/updates in PUSH_ORDER followed by responses whose
only effect is removal, in reverse PUSH_ORDER.

Callers pass `on_request` the snapshot last given to `on_snapshot` (or the stream's initial one):
a newer snapshot must be pushed first, or a request could receive new content for its type ahead
of the types it depends on.
"""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from . import wire
from .cache import Resource, Snapshot, digest_sum
from .types import ENDPOINT, CLUSTER, FULL_STATE_TYPES, PUSH_ORDER, WILDCARD, version_of_sum

__all__ = [
    "DeltaResponse",
    "DeltaStream",
    "DeltaTypeState",
    "NackRecord",
    "NonceSource",
    "RequestOutcome",
    "SotwResponse",
    "SotwStream",
    "SotwTypeState",
]

# Responses are labelled with why they were sent (metrics and tests).
REQUEST, CHANGE, REMOVAL = "request", "change", "removal"

_QUARANTINE = 16  # rejected content versions remembered per stream and type
_INFLIGHT = 32  # delta responses whose ACK/NACK we can still attribute


class NonceSource:
    """Fresh nonces; the prefix makes them unique per server instance, so an old stream's nonce never matches."""

    def __init__(self, prefix: str = ""):
        self._prefix = prefix
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count)}"


@dataclass(frozen=True, slots=True)
class SotwResponse:
    type_url: str
    version_info: str
    nonce: str
    resources: tuple[Resource, ...]
    reason: str = REQUEST

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.resources)

    def encode(self) -> bytes:
        return wire.encode_sotw(self.type_url, self.version_info, self.nonce, itertools.chain.from_iterable(r.sotw_pieces for r in self.resources))

    def to_proto(self) -> discovery_pb2.DiscoveryResponse:
        return discovery_pb2.DiscoveryResponse(
            type_url=self.type_url, version_info=self.version_info, nonce=self.nonce, resources=[r.any for r in self.resources]
        )


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    type_url: str
    system_version_info: str
    nonce: str
    resources: tuple[Resource, ...]
    removed: tuple[str, ...] = ()
    reason: str = REQUEST

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.resources)

    def encode(self) -> bytes:
        return wire.encode_delta(
            self.type_url, self.system_version_info, self.nonce, itertools.chain.from_iterable(r.delta_pieces for r in self.resources),
            self.removed
        )

    def to_proto(self) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=self.type_url,
            system_version_info=self.system_version_info,
            nonce=self.nonce,
            resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.any) for r in self.resources],
            removed_resources=list(self.removed),
        )


@dataclass(frozen=True, slots=True)
class NackRecord:
    """A client's rejection of one response: what it rejected and Envoy's message."""

    type_url: str
    version: str  # the rejected version (SotW version_info / delta system_version_info)
    accepted_version: str  # what the client says it still has (SotW), "" for delta
    nonce: str
    code: int
    message: str
    resources: tuple[str, ...]  # names in the rejected response


@dataclass(slots=True)
class RequestOutcome:
    """What one request meant and what to send back."""

    kind: str  # first | resume | stale | ack | nack | change | unknown
    responses: list = field(default_factory=list)
    acked_nonce: str | None = None
    nack: NackRecord | None = None


def _nack_record(type_url: str, req, version: str, names: Iterable[str]) -> NackRecord:
    ed = req.error_detail
    return NackRecord(
        type_url=type_url,
        version=version,
        accepted_version=getattr(req, "version_info", ""),
        nonce=req.response_nonce,
        code=ed.code,
        message=ed.message,
        resources=tuple(names),
    )


# ---------------------------------------------------------------------------------------------
# SotW
# ---------------------------------------------------------------------------------------------


class _Quiet:
    """Remembers that a type state had nothing to send for a snapshot's resources of its type.

    A snapshot patched for a change keeps the very same mapping for every type the change did not
    touch (``Snapshot.patched``); the answer of ``on_snapshot`` is a function of that mapping and
    of the state's own inputs (``token``: subscription, last send, requests seen, quarantine), so
    when both are the same as the last time nothing was sent, nothing is sent again -- without
    walking, sorting and hashing every resource of the type for each stream on each push."""

    __slots__ = ("have", "token")

    def __init__(self) -> None:
        self.have: Mapping[str, Resource] | None = None
        self.token: tuple[Any, ...] = ()

    def same(self, have: Mapping[str, Resource], token: tuple[Any, ...]) -> bool:
        return self.have is have and self.token == token

    def remember(self, have: Mapping[str, Resource] | None, token: tuple[Any, ...]) -> None:
        self.have, self.token = have, token


def _version_of(resources: Mapping[str, Resource]) -> str:
    """``types.content_version`` of these resources, from each resource's pair digest computed
    once (a subscription that is not the snapshot's whole mapping hashed every pair again on
    every response: ~160k blake2b calls per Service added at 100 nodes, profiled)."""
    return version_of_sum(*digest_sum(resources))


def _subscribed(have: Mapping[str, Resource], names: AbstractSet[str]) -> Mapping[str, Resource]:
    """``have`` restricted to ``names``, in name order; ``have`` itself (a snapshot keeps names
    sorted) when the names cover it -- the usual EDS subscription, every cluster of the node."""
    if len(names) >= len(have) and names.issuperset(have):
        return have
    return {n: have[n] for n in sorted(names) if n in have}


class _TargetMemo:
    """The last subscribed target, kept while the snapshot's resources (by identity) and the
    subscription key are the same: a push and the ACK after it ask for the same target."""

    __slots__ = ("_have", "_key", "_target")

    def __init__(self) -> None:
        self._have: Mapping[str, Resource] | None = None
        self._key: object = None
        self._target: Mapping[str, Resource] = {}

    def get(self, have: Mapping[str, Resource], key: object, names: AbstractSet[str]) -> Mapping[str, Resource]:
        if self._have is not have or self._key != key:
            self._have, self._key, self._target = have, key, _subscribed(have, names)
        return self._target


class SotwTypeState:
    """One type's sub-stream of a SotW ADS stream (xds-protocol §2 decision table)."""

    def __init__(self, type_url: str, nonces: Callable[[], str]):
        self.type_url = type_url
        self.full_state = type_url in FULL_STATE_TYPES
        self._nonces = nonces
        # subscription
        self.ever_named = False
        self.wildcard = False
        self.names: frozenset[str] = frozenset()
        self.requests = 0
        # last response
        self.sent: Mapping[str, Resource] | None = None  # None: nothing sent (or resumed) yet
        self.sent_key: tuple[bool, frozenset[str]] | None = None
        self.sent_nonce: str | None = None
        self.sent_version: str | None = None
        self.sent_names: tuple[str, ...] = ()
        # client state
        self.acked_version: str | None = None
        self.last_nack: NackRecord | None = None
        self.rejected: deque[str] = deque(maxlen=_QUARANTINE)
        # EDS after a CDS response: the CLAs of the clusters that response added or changed are
        # sent again even if unchanged, since Envoy warms those clusters anew (§5); the others
        # keep their endpoints, so sending them too (all 1,600 CLAs on every Service change at
        # 100 nodes) would only cost bytes. A CLA is named like its cluster (refcheck enforces).
        self.force: frozenset[str] = frozenset()
        # CDS: the clusters the last response added or changed (what Envoy warms)
        self.last_changed: frozenset[str] = frozenset()
        self.stats = {"stale": 0, "nack": 0, "quarantined": 0, "unsafe": 0}
        self._quiet = _Quiet()
        # (resources, names, target, its version): the last non-wildcard target, built once
        self._target_memo = _TargetMemo()

    def _token(self) -> tuple[Any, ...]:
        return (self.requests, self.key, self.sent_nonce, self.sent_version, self.force, tuple(self.rejected), tuple(self.stats.values()))

    # -- subscription ----------------------------------------------------------------------------
    @property
    def key(self) -> tuple[bool, frozenset[str]]:
        return (self.wildcard, self.names)

    def _record_names(self, names: Iterable[str]) -> None:
        # interned: every stream of a node names the same ~1,600 CLAs; parsed afresh per request,
        # each stream would hold its own copy of every name (18 MB at 100 SotW streams, tracemalloc)
        names = list(names)
        if names:
            self.ever_named = True
        if not self.full_state:
            fresh = frozenset(names)
            if not self.wildcard and fresh == self.names:
                return  # the usual case: an ACK naming what it named before (1,600 CLAs per EDS ACK)
            self.wildcard, self.names = False, frozenset(sys.intern(n) for n in fresh)
            if self.sent:  # an unsubscribed name must be sent again if it is named again (§3)
                self.sent = {n: r for n, r in self.sent.items() if n in self.names}
            return
        names = [sys.intern(n) for n in names]
        if not self.ever_named:  # legacy wildcard: never named anything
            self.wildcard, self.names = True, frozenset()
        else:
            self.wildcard = WILDCARD in names
            self.names = frozenset(n for n in names if n != WILDCARD)

    def target(self, snap: Snapshot | None) -> Mapping[str, Resource]:
        """The resources this subscription should have, in name order."""
        if snap is None:
            return {}
        have = snap.resources(self.type_url)
        if self.wildcard:
            return have  # "*" plus names: named extras outside the snapshot do not exist
        return self._target_memo.get(have, self.names, self.names)

    def _version(self, snap: Snapshot | None, target: Mapping[str, Resource]) -> str:
        if snap is not None and (self.wildcard or target is snap.resources(self.type_url)):
            return snap.type_version(self.type_url)  # computed once per snapshot and type
        return _version_of(target)

    def holds(self, snap: Snapshot) -> bool:
        """Whether the client subscribes to, was sent and ACKed every resource of this type in
        `snap` (the endpoint barrier's readiness test: a listener warms only once its routes came)."""
        target = self.target(snap)
        if len(target) != len(snap.names(self.type_url)):
            return False
        sent = self.sent or {}
        if any((s := sent.get(n)) is None or s.version != r.version for n, r in target.items()):
            return False
        return self.sent_version is not None and self.acked_version == self.sent_version

    # -- requests --------------------------------------------------------------------------------
    def on_request(self, req: discovery_pb2.DiscoveryRequest, snap: Snapshot | None) -> RequestOutcome:
        first_request = self.requests == 0
        self.requests += 1
        self._record_names(req.resource_names)  # always recorded, even when stale (envoy#10363)
        nonce = req.response_nonce
        if self.sent_nonce is None:
            target = self.target(snap)
            version = self._version(snap, target)
            if (
                first_request
                and self.full_state
                and self.wildcard
                and req.version_info
                and req.version_info == version
            ):  # reconnect with unchanged content: resume, send nothing (§8)
                self._mark_sent(target, version, nonce, ())
                self.acked_version = version
                return RequestOutcome("resume")
            return RequestOutcome("first", self._respond(snap, full=True, reason=REQUEST))
        if nonce != self.sent_nonce:
            self.stats["stale"] += 1
            return RequestOutcome("stale")
        if req.HasField("error_detail"):
            self.stats["nack"] += 1
            nack = _nack_record(self.type_url, req, self.sent_version or "", self.sent_names)
            self.last_nack = nack
            if self.sent_version is not None:
                self.rejected.append(self.sent_version)
            # a subscription change piggybacked on the NACK is answered; the rejected content is not
            return RequestOutcome("nack", self._respond(snap, full=False, reason=REQUEST), nack=nack)
        self.acked_version = req.version_info
        kind = "ack" if self.key == self.sent_key else "change"
        # answers name changes (incl. ones recorded from stale requests) and the post-CDS EDS request;
        # a plain ACK of unchanged content yields nothing
        return RequestOutcome(kind, self._respond(snap, full=False, resend=self.force, reason=REQUEST), acked_nonce=nonce)

    # -- server-side changes ---------------------------------------------------------------------
    def on_snapshot(self, snap: Snapshot) -> tuple[list[SotwResponse], list[SotwResponse]]:
        """Responses for a new snapshot: (additions/updates, removal-only)."""
        if self.requests == 0:
            return [], []
        have = snap.resources(self.type_url)
        if self._quiet.same(have, self._token()):
            return [], []
        main, removal = self._on_snapshot(snap)
        self._quiet.remember(None if main or removal else have, self._token())
        return main, removal

    def _on_snapshot(self, snap: Snapshot) -> tuple[list[SotwResponse], list[SotwResponse]]:
        if self.sent is None:  # asked for names that did not exist yet
            return self._respond(snap, full=True, reason=CHANGE), []
        target = self.target(snap)
        if self.full_state and self.wildcard and not target and self.sent:
            self.stats["unsafe"] += 1  # never wipe a proxy's LDS/CDS by a push (§8)
            return [], []
        removed = [n for n in self.sent if n not in target] if self.full_state else []
        if removed:
            grows = any((s := self.sent.get(n)) is None or s.version != r.version for n, r in target.items())
            if not grows:
                return [], self._respond(snap, full=False, reason=REMOVAL)
            # make-before-break: first the new state plus the old resources still referenced...
            union = dict(target)
            for n in removed:
                union[n] = self.sent[n]
            union = {n: union[n] for n in sorted(union)}
            main = self._emit(union, _version_of(union), CHANGE, union)
            # ...then the removal
            return main, self._respond(snap, full=False, reason=REMOVAL)
        # EDS after a CDS push: the warming clusters' CLAs with whatever else changed (if nothing
        # did and none is subscribed yet, the follow-up request is answered)
        return self._respond(snap, full=False, resend=self.force, resend_with_change=True, reason=CHANGE), []

    # -- building responses ----------------------------------------------------------------------
    def _respond(self, snap: Snapshot | None, *, full: bool, reason: str, resend: AbstractSet[str] = frozenset(),
                 resend_with_change: bool = False) -> list[SotwResponse]:
        """The response for the current subscription, or none.

        full: send every target resource even if unchanged; resend (EDS/SDS): these names too
        (with resend_with_change: only if something else is sent).
        """
        target = self.target(snap)
        version = self._version(snap, target)
        first = self.sent is None
        if self.full_state and self.wildcard and not target and self.sent:
            self.stats["unsafe"] += 1  # never wipe a proxy's LDS/CDS (§8)
            return []
        if self.full_state:
            if not first and not full and self.key == self.sent_key and version == self.sent_version:
                return []
            send: Mapping[str, Resource] = target
        else:
            if full or first:
                send = target
            else:
                sent = self.sent or {}
                send = {n: r for n, r in target.items() if (s := sent.get(n)) is not r and (s is None or s.version != r.version)}
                if resend and (send or not resend_with_change):
                    send = {n: r for n, r in target.items() if n in send or n in resend}
            if not send:  # an empty EDS/SDS response does nothing (and Envoy NACKs an empty SDS)
                return []
        if not first and version in self.rejected:
            self.stats["quarantined"] += 1  # never resend NACKed content (§11.3)
            return []
        return self._emit(send, version, reason, target)

    def _emit(self, send: Mapping[str, Resource], version: str, reason: str, now_held: Mapping[str, Resource]) -> list[SotwResponse]:
        nonce = self._nonces()
        resp = SotwResponse(self.type_url, version, nonce, tuple(send.values()), reason)
        if self.type_url == CLUSTER:
            before = self.sent or {}
            self.last_changed = frozenset(n for n, r in send.items() if (s := before.get(n)) is None or s.version != r.version)
        self._mark_sent(now_held, version, nonce, tuple(send))
        if self.force and self.type_url == ENDPOINT:
            # sent, or not subscribed (a cluster without EDS, or one whose first request will
            # name it: then it is new to this stream and sent anyway)
            self.force = frozenset(n for n in self.force if n in now_held and n not in send)
        return [resp]

    def _mark_sent(self, held: Mapping[str, Resource], version: str, nonce: str, names: tuple[str, ...]) -> None:
        self.sent = held
        self.sent_key = self.key
        self.sent_version = version
        self.sent_nonce = nonce
        self.sent_names = names

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "sent_version": self.sent_version,
            "sent_nonce": self.sent_nonce,
            "acked_version": self.acked_version,
            "last_nack": _nack_dict(self.last_nack),
            "wildcard": self.wildcard,
            "subscribed": len(self.names),
            **self.stats,
        }


class SotwStream:
    """All types of one SotW ADS stream; coordinates ordering and the CDS -> EDS warming rule."""

    def __init__(self, nonces: Callable[[], str], types: Iterable[str] = PUSH_ORDER):
        self._nonces = nonces
        self.types = tuple(types)
        self.states: dict[str, SotwTypeState] = {}

    def on_request(self, req: discovery_pb2.DiscoveryRequest, snap: Snapshot | None) -> RequestOutcome:
        if req.type_url not in self.types:
            return RequestOutcome("unknown")
        st = self.states.get(req.type_url)
        if st is None:
            st = self.states[req.type_url] = SotwTypeState(req.type_url, self._nonces)
        out = st.on_request(req, snap)
        if req.type_url == CLUSTER and out.responses:
            self._cds_sent()
        return out

    def on_snapshot(self, snap: Snapshot) -> list[SotwResponse]:
        main: list[SotwResponse] = []
        removals: list[list[SotwResponse]] = []
        for t in _ordered(self.states):
            m, r = self.states[t].on_snapshot(snap)
            main += m
            removals.append(r)
            if t == CLUSTER and (m or r):
                self._cds_sent()
        for r in reversed(removals):
            main += r
        return main

    def _cds_sent(self) -> None:
        eds, cds = self.states.get(ENDPOINT), self.states.get(CLUSTER)
        if eds is not None and cds is not None and cds.last_changed:
            eds.force = eds.force | cds.last_changed
        if cds is not None:
            cds.last_changed = frozenset()  # consumed (a first CDS names every cluster: not kept per stream)


# ---------------------------------------------------------------------------------------------
# Delta
# ---------------------------------------------------------------------------------------------


class DeltaTypeState:
    """One type's sub-stream of a delta ADS stream (xds-protocol §6)."""

    def __init__(self, type_url: str, nonces: Callable[[], str]):
        self.type_url = type_url
        self.wildcard_ok = type_url in FULL_STATE_TYPES
        self._nonces = nonces
        self.started = False
        self.wildcard = False
        self.names: set[str] = set()
        self.known: dict[str, str] = {}  # name -> version the client holds (as far as we know)
        self.sent_nonce: str | None = None
        self.sent_version: str | None = None
        self.sent_at_nonce: OrderedDict[str, tuple[str, tuple[tuple[str, str], ...]]] = OrderedDict()
        self.acked_version: str | None = None
        self.last_nack: NackRecord | None = None
        self.rejected: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.stats = {"stale": 0, "nack": 0, "quarantined": 0, "unsafe": 0}
        self.requests = 0
        self._quiet = _Quiet()
        self._subscription = 0  # bumped by every request that may change names or wildcard
        self._target_memo = _TargetMemo()

    def _token(self) -> tuple[Any, ...]:
        return (self.requests, self.sent_nonce, len(self.rejected), tuple(self.stats.values()))

    def target(self, snap: Snapshot | None) -> Mapping[str, Resource]:
        if snap is None:
            return {}
        have = snap.resources(self.type_url)
        if self.wildcard:
            return have
        return self._target_memo.get(have, self._subscription, self.names)

    def holds(self, snap: Snapshot) -> bool:
        """Like :meth:`SotwTypeState.holds`: every resource of this type in `snap`, ACKed."""
        target = self.target(snap)
        if len(target) != len(snap.names(self.type_url)):
            return False
        if any(self.known.get(n) != r.version for n, r in target.items()):
            return False
        return self.sent_version is not None and self.acked_version == self.sent_version

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest, snap: Snapshot | None) -> RequestOutcome:
        self.requests += 1
        if not self.started or req.resource_names_subscribe or req.resource_names_unsubscribe:
            self._subscription += 1
        first = not self.started
        if first:
            self.started = True
            self.known = dict(req.initial_resource_versions)
        out = RequestOutcome("first" if first else "change")
        newly_wild = False
        if first and self.wildcard_ok and not req.resource_names_subscribe:
            self.wildcard = newly_wild = True  # legacy wildcard
        nonce = req.response_nonce
        if nonce:
            entry = self.sent_at_nonce.get(nonce)
            if entry is None:
                if not first:
                    self.stats["stale"] += 1
                    out.kind = "stale"
            else:
                while self.sent_at_nonce:  # this and every older response are answered
                    n, _ = self.sent_at_nonce.popitem(last=False)
                    if n == nonce:
                        break
                version, pairs = entry
                if req.HasField("error_detail"):
                    self.stats["nack"] += 1
                    out.kind = "nack"
                    out.nack = self.last_nack = _nack_record(self.type_url, req, version, (n for n, _ in pairs))
                    for pair in pairs:
                        self.rejected[pair] = None
                    while len(self.rejected) > _QUARANTINE * 16:
                        self.rejected.popitem(last=False)
                else:
                    out.kind = "ack"
                    out.acked_nonce = nonce
                    self.acked_version = version

        # subscription changes apply whatever the nonce (§6)
        explicit: dict[str, None] = {}
        rewild: list[str] = []
        for n in req.resource_names_subscribe:
            if n == WILDCARD and self.wildcard_ok:
                newly_wild = newly_wild or not self.wildcard
                self.wildcard = True
            else:
                n = sys.intern(n)  # shared by the streams that name it (see SotwTypeState._record_names)
                self.names.add(n)
                explicit[n] = None
        for n in req.resource_names_unsubscribe:
            if n == WILDCARD and self.wildcard_ok:
                if self.wildcard:
                    self.wildcard = False
                    newly_wild = False
                    for held in [h for h in self.known if h not in self.names]:
                        del self.known[held]  # the client drops what only the wildcard covered
            elif n in self.names:
                self.names.discard(n)
                explicit.pop(n, None)
                if self.wildcard:
                    rewild.append(n)
                else:
                    self.known.pop(n, None)
            # unknown names: ignored silently

        target = self.target(snap)
        send: dict[str, Resource] = {}
        removed: set[str] = set()
        if first and self.type_url == ENDPOINT:
            # A resumed delta stream holds warm clusters: only assignments whose version differs
            # from what the client holds are sent (a fresh client holds nothing: all of them).
            # Warming after a CDS change is covered by the EDS follow-up of every CDS push.
            send.update({n: r for n, r in target.items() if self.known.get(n) != r.version})
        for n in explicit:  # always answered (RemoveThenAdd), unless held at this version on reconnect
            r = target.get(n)
            if r is None:
                removed.add(n)
            elif not (first and self.known.get(n) == r.version):
                send[n] = r
        if newly_wild:
            for n, r in target.items():
                if self.known.get(n) != r.version:
                    send[n] = r
        for n in rewild:  # unsubscribed while wildcard: the wildcard still covers it (§6)
            r = target.get(n)
            if r is None:
                removed.add(n)
            else:
                send[n] = r
        if first:
            removed.update(h for h in self.known if h not in target)
        for n in [n for n, r in send.items() if n not in explicit and (n, r.version) in self.rejected]:
            self.stats["quarantined"] += 1
            del send[n]
        removed.difference_update(send)
        if first or send or removed:
            out.responses = self._emit(snap, send, removed, REQUEST)
        return out

    def on_snapshot(self, snap: Snapshot, *, resend: AbstractSet[str] = frozenset()) -> tuple[list[DeltaResponse], list[DeltaResponse]]:
        """Responses for a new snapshot: (updates, removals). `resend`: these names too, if
        subscribed, even when the client holds their version."""
        if not self.started:
            return [], []
        have = snap.resources(self.type_url)
        if not resend and self._quiet.same(have, self._token()):
            return [], []
        main, gone = self._on_snapshot(snap, resend)
        self._quiet.remember(None if main or gone or resend else have, self._token())
        return main, gone

    def _on_snapshot(self, snap: Snapshot, resend: AbstractSet[str]) -> tuple[list[DeltaResponse], list[DeltaResponse]]:
        target = self.target(snap)
        if self.wildcard_ok and self.wildcard and not target and self.known:
            self.stats["unsafe"] += 1
            return [], []
        send: dict[str, Resource] = {}
        for n, r in target.items():
            if n in resend or self.known.get(n) != r.version:
                if (n, r.version) in self.rejected:
                    self.stats["quarantined"] += 1
                else:
                    send[n] = r
        removed = {n for n in self.known if n not in target}
        main = self._emit(snap, send, set(), CHANGE) if send else []
        gone = self._emit(snap, {}, removed, REMOVAL) if removed else []
        return main, gone

    def _emit(self, snap: Snapshot | None, send: Mapping[str, Resource], removed: set[str], reason: str) -> list[DeltaResponse]:
        nonce = self._nonces()
        version = snap.type_version(self.type_url) if snap is not None else ""
        resources = tuple(send[n] for n in sorted(send))
        resp = DeltaResponse(self.type_url, version, nonce, resources, tuple(sorted(removed)), reason)
        for r in resources:
            self.known[r.name] = r.version
        for n in removed:
            self.known.pop(n, None)
        self.sent_nonce = nonce
        self.sent_version = version
        self.sent_at_nonce[nonce] = (version, tuple((r.name, r.version) for r in resources))
        while len(self.sent_at_nonce) > _INFLIGHT:
            self.sent_at_nonce.popitem(last=False)
        return [resp]

    def status(self) -> dict:
        return {
            "sent_version": self.sent_version,
            "sent_nonce": self.sent_nonce,
            "acked_version": self.acked_version,
            "last_nack": _nack_dict(self.last_nack),
            "wildcard": self.wildcard,
            "subscribed": len(self.names),
            "held": len(self.known),
            **self.stats,
        }


class DeltaStream:
    """All types of one delta ADS stream.

    After a CDS response carrying clusters, the CLAs of exactly those clusters are sent again
    right behind it: Envoy 1.40 (delta) keeps a changed cluster warming until a fresh
    ClusterLoadAssignment arrives, and sends no EDS request of its own since its EDS interest
    did not change (verified: a 15 s initial_fetch_timeout stall otherwise). A cluster the
    response did not carry is not re-warmed and keeps its endpoints. This relies on an EDS
    cluster's service_name being its own name (refcheck enforces it).
    """

    def __init__(self, nonces: Callable[[], str], types: Iterable[str] = PUSH_ORDER):
        self._nonces = nonces
        self.types = tuple(types)
        self.states: dict[str, DeltaTypeState] = {}

    def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest, snap: Snapshot | None) -> RequestOutcome:
        if req.type_url not in self.types:
            return RequestOutcome("unknown")
        st = self.states.get(req.type_url)
        if st is None:
            st = self.states[req.type_url] = DeltaTypeState(req.type_url, self._nonces)
        out = st.on_request(req, snap)
        eds = self.states.get(ENDPOINT)
        if req.type_url == CLUSTER and eds is not None and snap is not None:
            carried = _carried(out.responses)
            if carried:
                m, r = eds.on_snapshot(snap, resend=carried)
                out.responses += m + r
        return out

    def on_snapshot(self, snap: Snapshot) -> list[DeltaResponse]:
        main: list[DeltaResponse] = []
        removals: list[list[DeltaResponse]] = []
        carried: frozenset[str] = frozenset()
        for t in _ordered(self.states):
            m, r = self.states[t].on_snapshot(snap, resend=carried if t == ENDPOINT else frozenset())
            if t == CLUSTER:
                carried = _carried(m)
            main += m
            removals.append(r)
        for r in reversed(removals):
            main += r
        return main


def _carried(responses: Iterable[DeltaResponse]) -> frozenset[str]:
    """Names of the resources these responses carry (not the removed ones)."""
    return frozenset(r.name for resp in responses for r in resp.resources)


def _ordered(types: Iterable[str]) -> list[str]:
    present = set(types)
    return [t for t in PUSH_ORDER if t in present] + sorted(present.difference(PUSH_ORDER))


def _nack_dict(n: NackRecord | None) -> dict | None:
    if n is None:
        return None
    return {"version": n.version, "nonce": n.nonce, "code": n.code, "message": n.message, "resources": list(n.resources)}
