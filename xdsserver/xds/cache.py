"""Per-node snapshot cache: immutable snapshots of serialized resources, versioned by content.

Like go-control-plane's `SimpleCache`, the cache knows nothing about what the bytes mean. A body is
hashed once; identical resources on many nodes are interned to one `Resource` object, so its bytes,
its `Any` and its pre-encoded wire fields exist once however many ztunnels receive it.

The cache is mutated from the event loop thread; subscriber callbacks run synchronously inside
`set_snapshot(s)` and must only schedule work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from . import wire
from .types import FULL_STATE_TYPES, TYPE_PREFIX, VERSION_MODULUS, ResourceSet, pair_digest, short, version_of_sum

if TYPE_CHECKING:
    from .metrics import XdsMetrics

log = logging.getLogger(__name__)

__all__ = ["Resource", "Snapshot", "SnapshotCache", "SnapshotChange", "UnsafeSnapshot"]


class UnsafeSnapshot(ValueError):
    """A snapshot would wipe a node's listeners or clusters (xds-protocol §8); nothing was changed."""


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Resource:
    """One serialized resource. `version` is a content hash of `body`, stable across restarts."""

    name: str
    type_url: str
    body: bytes = field(repr=False, compare=False)
    version: str
    _any: Any = field(default=None, init=False, repr=False, compare=False)
    _sotw: Any = field(default=None, init=False, repr=False, compare=False)
    _delta: Any = field(default=None, init=False, repr=False, compare=False)
    _pair: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def pair_digest(self) -> int:
        """(name, version) as summed into its type's version, computed once."""
        if self._pair is None:
            object.__setattr__(self, "_pair", pair_digest(self.name, self.version))
        return self._pair

    @property
    def any(self) -> any_pb2.Any:
        """The `Any` wrapping this resource, built once (do not mutate it)."""
        if self._any is None:
            object.__setattr__(self, "_any", any_pb2.Any(type_url=self.type_url, value=self.body))
        return self._any

    @property
    def sotw_pieces(self) -> tuple[bytes, bytes]:
        """This resource's `DiscoveryResponse.resources` entry as (head, body); the head is built
        once, the body is never copied for it (see xds/wire.py)."""
        if self._sotw is None:
            object.__setattr__(self, "_sotw", wire.sotw_resource_head(self.type_url, len(self.body)))
        return self._sotw, self.body

    @property
    def delta_pieces(self) -> tuple[bytes, bytes, bytes]:
        """This resource's `DeltaDiscoveryResponse.resources` entry as (head, body, tail)."""
        if self._delta is None:
            object.__setattr__(self, "_delta", wire.delta_resource_parts(self.type_url, self.name, self.version, len(self.body)))
        head, tail = self._delta
        return head, self.body, tail

    @property
    def sotw_field(self) -> bytes:
        """The encoded `DiscoveryResponse.resources` entry (a copy: responses join the pieces)."""
        return b"".join(self.sotw_pieces)

    @property
    def delta_field(self) -> bytes:
        """The encoded `DeltaDiscoveryResponse.resources` entry (a copy)."""
        return b"".join(self.delta_pieces)


_EMPTY: Mapping[str, Resource] = MappingProxyType({})


class Snapshot:
    """Immutable per-node mapping type_url -> {name: Resource}, names in sorted order."""

    __slots__ = ("_resources", "_versions", "_sums")

    def __init__(self, resources: Mapping[str, Mapping[str, Resource]]):
        self._resources: dict[str, Mapping[str, Resource]] = {
            t: MappingProxyType({n: resources[t][n] for n in sorted(resources[t])}) for t in sorted(resources)
        }
        self._versions: dict[str, str] = {}  # per type, computed when a stream first asks
        self._sums: dict[str, tuple[int, int]] = {}  # per type: (sum of pair digests, count), with the version

    @classmethod
    def patched(cls, old: Snapshot | None, types: Mapping[str, dict[str, Resource]], added: Mapping[str, bool],
                swaps: Mapping[str, list[tuple[Resource | None, Resource | None]]] | None = None) -> Snapshot:
        """``old`` with the given types replaced by these (already patched) dicts; only a type that
        gained names is re-sorted, and unchanged types keep their mappings and versions. ``swaps``
        (type -> [(resource before or None, after or None)]) updates a type's version sum in
        O(change) instead of leaving it to be recomputed over every resource."""
        snap = cls.__new__(cls)
        res = dict(old._resources) if old is not None else {}
        versions = dict(old._versions) if old is not None else {}
        sums = dict(old._sums) if old is not None else {}
        for t, by_name in types.items():
            versions.pop(t, None)
            was = sums.pop(t, None)
            if was is not None and swaps is not None and t in swaps:
                total, count = was
                for before, after in swaps[t]:
                    if before is not None:
                        total, count = total - before.pair_digest, count - 1
                    if after is not None:
                        total, count = total + after.pair_digest, count + 1
                sums[t] = (total % VERSION_MODULUS, count)
            if not by_name:
                res.pop(t, None)
                sums.pop(t, None)
                continue
            res[t] = MappingProxyType(dict(sorted(by_name.items())) if added.get(t) else by_name)
        snap._resources = {t: res[t] for t in sorted(res)}
        snap._versions = versions
        snap._sums = sums
        return snap

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        return self._resources.get(type_url, _EMPTY)

    def get(self, type_url: str, name: str) -> Resource | None:
        return self._resources.get(type_url, _EMPTY).get(name)

    def names(self, type_url: str) -> frozenset[str]:
        return frozenset(self._resources.get(type_url, _EMPTY))

    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._resources)

    def type_version(self, type_url: str) -> str:
        """Version of the whole type: derived from the (name, version) pairs, deterministic."""
        v = self._versions.get(type_url)
        if v is None:
            have = self.resources(type_url)
            if type_url not in self._sums:
                self._sums[type_url] = digest_sum(have)
            v = self._versions[type_url] = version_of_sum(*self._sums[type_url])
        return v

    def __repr__(self) -> str:
        counts = ", ".join(f"{short(t)}={len(r)}" for t, r in self._resources.items())
        return f"Snapshot({counts})"


def digest_sum(resources: Mapping[str, Resource]) -> tuple[int, int]:
    """(sum of pair digests mod 2^128, count): what ``types.version_of_sum`` turns into the
    version of a set of resources, equal to ``types.content_version`` of their pairs."""
    return sum(r.pair_digest for r in resources.values()) % VERSION_MODULUS, len(resources)


@dataclass(frozen=True)
class SnapshotChange:
    """Which names of which types were added, changed or removed for one node."""

    node: str
    added: Mapping[str, frozenset[str]] = field(default_factory=dict)
    changed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    removed: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @property
    def types(self) -> frozenset[str]:
        return frozenset(self.added) | frozenset(self.changed) | frozenset(self.removed)

    def __bool__(self) -> bool:
        return bool(self.types)


def _diff(node: str, old: Snapshot | None, new: Snapshot) -> SnapshotChange:
    added: dict[str, frozenset[str]] = {}
    changed: dict[str, frozenset[str]] = {}
    removed: dict[str, frozenset[str]] = {}
    types = set(new.type_urls()) | (set(old.type_urls()) if old else set())
    for t in sorted(types):
        before = old.resources(t) if old else _EMPTY
        after = new.resources(t)
        if old is not None and old.type_version(t) == new.type_version(t) and len(before) == len(after):
            continue
        a = frozenset(n for n in after if n not in before)
        c = frozenset(n for n, r in after.items() if n in before and before[n].version != r.version)
        r = frozenset(n for n in before if n not in after)
        if a:
            added[t] = a
        if c:
            changed[t] = c
        if r:
            removed[t] = r
    return SnapshotChange(node, added, changed, removed)


def _wipe(node: str, type_url: str, had: int) -> UnsafeSnapshot:
    return UnsafeSnapshot(f"node {node!r}: refusing a snapshot with no {short(type_url)} resources while the node has "
                          f"{had}; that would delete all of its {short(type_url)} config")


ChangeCallback = Callable[[SnapshotChange], None]


class SnapshotCache:
    """Holds the current snapshot per node and tells that node's streams when it changes."""

    def __init__(self, metrics: XdsMetrics | None = None, *, clock: Callable[[], float] = time.monotonic):
        self._metrics = metrics
        self._clock = clock
        self._snapshots: dict[str, Snapshot] = {}
        self._generation: dict[str, int] = {}
        self._changed_at: dict[str, float] = {}
        self._subscribers: dict[str, set[ChangeCallback]] = {}
        self._interned: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = weakref.WeakValueDictionary()
        self._ready = False

    # -- readiness -------------------------------------------------------------------------------
    def mark_ready(self) -> None:
        """The source of truth has synced: streams are accepted from now on (xds-protocol §8)."""
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    # -- reads -----------------------------------------------------------------------------------
    def get(self, node: str) -> Snapshot | None:
        return self._snapshots.get(node)

    def nodes(self) -> list[str]:
        return sorted(self._snapshots)

    def generation(self, node: str) -> int:
        """Counts changes of `node`'s snapshot; 0 before the first one."""
        return self._generation.get(node, 0)

    def changed_at(self, node: str) -> float | None:
        """Clock time of the last change of `node` (for convergence time)."""
        return self._changed_at.get(node)

    def resource_set(self, node: str) -> dict[str, list[tuple[str, bytes]]]:
        """`node`'s served resources as type URL -> [(name, bytes)] (empty for an unknown node)."""
        snap = self._snapshots.get(node)
        if snap is None:
            return {}
        return {t: [(n, r.body) for n, r in snap.resources(t).items()] for t in snap.type_urls()}

    def interned_count(self) -> int:
        """Distinct live resources (for tests and memory accounting)."""
        return len(self._interned)

    # -- writes ----------------------------------------------------------------------------------
    def set_snapshot(self, node: str, resources: ResourceSet, *, allow_empty: bool = False) -> SnapshotChange:
        """Replace `node`'s resources. Raises ValueError / UnsafeSnapshot and changes nothing on bad input."""
        return self.set_snapshots({node: resources}, allow_empty=allow_empty)[node]

    def set_snapshots(self, snaps: Mapping[str, ResourceSet], *, allow_empty: bool = False) -> dict[str, SnapshotChange]:
        """Replace several nodes' resources atomically: all are validated before any is applied."""
        # the same bytes object on many nodes is hashed once; the memo keeps it alive, so ids stay unique
        memo: dict[tuple[str, str, int], tuple[bytes, Resource]] = {}
        built = {node: self._build(node, snaps[node], allow_empty, memo) for node in sorted(snaps)}
        changes: dict[str, SnapshotChange] = {}
        now = self._clock()
        for node, snap in built.items():
            change = _diff(node, self._snapshots.get(node), snap)
            self._snapshots[node] = snap
            changes[node] = change
            if change:
                self._generation[node] = self._generation.get(node, 0) + 1
                self._changed_at[node] = now
        for node, change in changes.items():
            if change:
                self._notify(node, change)
        return changes

    def apply_deltas(self, deltas: Mapping[str, Mapping[str, Mapping[str, bytes | None]]], *,
                     allow_empty: bool = False) -> dict[str, SnapshotChange]:
        """Patch several nodes' snapshots: ``{node: {type URL: {name: bytes, or None to remove}}}``.

        The cost is O(change): only the named resources are hashed and interned, only the types
        named are copied, and what changed is read off the delta instead of diffing snapshots. A
        node without a snapshot starts from empty. Atomic like :meth:`set_snapshots`: every node is
        checked (names, bytes, never wiping LDS/CDS) before any is changed."""
        memo: dict[tuple[str, str, int], tuple[bytes, Resource]] = {}
        staged: dict[str, tuple[Snapshot, SnapshotChange]] = {}
        for node in sorted(deltas):
            if not isinstance(node, str) or not node:
                raise ValueError(f"snapshot node name must be a non-empty string, got {node!r}")
            old = self._snapshots.get(node)
            types: dict[str, dict[str, Resource]] = {}
            swaps: dict[str, list[tuple[Resource | None, Resource | None]]] = {}
            added: dict[str, frozenset[str]] = {}
            changed: dict[str, frozenset[str]] = {}
            removed: dict[str, frozenset[str]] = {}
            for type_url, items in deltas[node].items():
                if not isinstance(type_url, str) or not type_url.startswith(TYPE_PREFIX):
                    raise ValueError(f"node {node!r}: type URL {type_url!r} does not start with {TYPE_PREFIX!r}")
                before = old.resources(type_url) if old is not None else _EMPTY
                by_name = before.copy()  # type: ignore[attr-defined]  # mappingproxy -> dict at C speed (dict() goes key by key)
                a, c, r = [], [], []
                moved: list[tuple[Resource | None, Resource | None]] = []
                for name, body in items.items():
                    if not isinstance(name, str) or not name:
                        raise ValueError(f"node {node!r}, {short(type_url)}: resource name must be a non-empty string, got {name!r}")
                    was = before.get(name)
                    if body is None:
                        if was is not None:
                            del by_name[name]
                            r.append(name)
                            moved.append((was, None))
                        continue
                    if not isinstance(body, bytes):
                        raise ValueError(f"node {node!r}, {short(type_url)} {name!r}: body must be bytes, got {type(body).__name__}")
                    if was is not None and was.body is body:
                        continue
                    res = self._intern_memo(memo, type_url, name, body)
                    if was is None:
                        a.append(name)
                    elif was.version == res.version:
                        continue
                    else:
                        c.append(name)
                    by_name[name] = res
                    moved.append((was, res))
                if not (a or c or r):
                    continue
                if not by_name and before and type_url in FULL_STATE_TYPES and not allow_empty:
                    raise _wipe(node, type_url, len(before))
                types[type_url] = by_name
                swaps[type_url] = moved
                for out, names_ in ((added, a), (changed, c), (removed, r)):
                    if names_:
                        out[type_url] = frozenset(names_)
            change = SnapshotChange(node, added, changed, removed)
            snap = old if not types and old is not None else Snapshot.patched(old, types, {t: True for t in added}, swaps)
            staged[node] = (snap, change)
        now = self._clock()
        for node, (snap, change) in staged.items():
            self._snapshots[node] = snap
            if change:
                self._generation[node] = self._generation.get(node, 0) + 1
                self._changed_at[node] = now
        for node, (_, change) in staged.items():
            if change:
                self._notify(node, change)
        return {node: change for node, (_, change) in staged.items()}

    def remove_node(self, node: str) -> None:
        """Forget `node`: its streams keep their last state and receive no push."""
        self._snapshots.pop(node, None)
        self._changed_at.pop(node, None)

    def _build(
        self, node: str, resources: ResourceSet, allow_empty: bool, memo: dict[tuple[str, str, int], tuple[bytes, Resource]]
    ) -> Snapshot:
        if not isinstance(node, str) or not node:
            raise ValueError(f"snapshot node name must be a non-empty string, got {node!r}")
        typed: dict[str, dict[str, Resource]] = {}
        prev_snap = self._snapshots.get(node)
        for type_url, pairs in resources.items():
            prev = prev_snap.resources(type_url) if prev_snap is not None else {}
            if not isinstance(type_url, str) or not type_url.startswith(TYPE_PREFIX):
                raise ValueError(f"node {node!r}: type URL {type_url!r} does not start with {TYPE_PREFIX!r}")
            by_name: dict[str, Resource] = {}
            for pair in pairs:
                name, body = pair
                if not isinstance(name, str) or not name:
                    raise ValueError(f"node {node!r}, {short(type_url)}: resource name must be a non-empty string, got {name!r}")
                if not isinstance(body, bytes):
                    raise ValueError(f"node {node!r}, {short(type_url)} {name!r}: body must be bytes, got {type(body).__name__}")
                if name in by_name:
                    raise ValueError(f"node {node!r}, {short(type_url)}: duplicate resource name {name!r}")
                was = prev.get(name)
                if was is not None and was.body is body:
                    by_name[name] = was  # the very same bytes as last time: no hashing (O(changed))
                    continue
                res = self._intern_memo(memo, type_url, name, body)
                by_name[name] = res
            if by_name:
                typed[type_url] = by_name
        old = self._snapshots.get(node)
        if old is not None and not allow_empty:
            for t in sorted(FULL_STATE_TYPES):
                if old.resources(t) and not typed.get(t):
                    raise _wipe(node, t, len(old.resources(t)))
        return Snapshot(typed)

    def _intern_memo(self, memo: dict[tuple[str, str, int], tuple[bytes, Resource]], type_url: str, name: str,
                     body: bytes) -> Resource:
        """:meth:`_intern`, hashing a bytes object shared by many nodes once per publish."""
        key = (type_url, name, id(body))
        hit = memo.get(key)
        if hit is not None and hit[0] is body:
            return hit[1]
        res = self._intern(type_url, name, body)
        memo[key] = (body, res)
        return res

    def _intern(self, type_url: str, name: str, body: bytes) -> Resource:
        digest = hashlib.sha256(body).hexdigest()
        key = (type_url, name, digest)
        res = self._interned.get(key)
        if res is None:
            res = Resource(name=name, type_url=type_url, body=body, version=digest[:16])
            self._interned[key] = res
        return res

    # -- change notification ---------------------------------------------------------------------
    def subscribe(self, node: str, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback(change)` whenever `node`'s snapshot changes; returns an unsubscribe function."""
        self._subscribers.setdefault(node, set()).add(callback)

        def unsubscribe() -> None:
            subs = self._subscribers.get(node)
            if subs is not None:
                subs.discard(callback)
                if not subs:
                    del self._subscribers[node]

        return unsubscribe

    def subscriber_count(self, node: str | None = None) -> int:
        if node is not None:
            return len(self._subscribers.get(node, ()))
        return sum(len(s) for s in self._subscribers.values())

    async def wait_change(self, node: str, generation: int, timeout: float | None = None) -> int:
        """Wait until `node`'s generation exceeds `generation`; returns the new generation.

        Raises TimeoutError after `timeout` seconds.
        """
        if self.generation(node) > generation:
            return self.generation(node)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_change: SnapshotChange) -> None:
            if not fut.done():
                fut.set_result(None)

        unsubscribe = self.subscribe(node, wake)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            unsubscribe()
        return self.generation(node)

    def _notify(self, node: str, change: SnapshotChange) -> None:
        for callback in list(self._subscribers.get(node, ())):
            try:
                callback(change)
            except Exception:  # one broken subscriber must not block the others
                log.exception("snapshot subscriber for node %r failed", node)

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes())

    def items(self) -> Iterable[tuple[str, Snapshot]]:
        return [(n, self._snapshots[n]) for n in self.nodes()]
