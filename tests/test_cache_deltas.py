"""The snapshot cache takes per-node deltas: same snapshots and changes as whole resource sets, O(change)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xdsserver import synth
from xdsserver.incremental import IncrementalTranslator
from xdsserver.model import Flavor
from xdsserver.pipeline import ephemeral_certs
from xdsserver.xds.cache import SnapshotCache, UnsafeSnapshot
from xdsserver.xds.types import CLUSTER, ENDPOINT, LISTENER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cluster as bc  # noqa: E402
from test_incremental import EVENT_SEQUENCE  # noqa: E402

NODE = "node-a"


def served(cache: SnapshotCache) -> dict:
    """Everything a stream can see: per node and type, the version of the type and every (name, version)."""
    return {n: {t: (s.type_version(t), [(name, r.version) for name, r in s.resources(t).items()]) for t in s.type_urls()}
            for n, s in cache.items()}


def test_deltas_give_the_same_snapshots_and_changes_as_full_sets() -> None:
    certs = ephemeral_certs()
    objs = [o for f in synth.FILES for o in synth.generate(synth.Shape(3, 40, 12, seed=3))[f]]
    index = bc.index_of(objs)
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    whole, patched = SnapshotCache(), SnapshotCache()
    steps = [lambda o, i: o, *EVENT_SEQUENCE]
    for k, step in enumerate(steps):
        objs = step(objs, index)
        index = bc.index_of(objs)
        snaps = inc.snapshots(index)
        a = whole.set_snapshots(snaps)
        b = patched.apply_deltas(inc.stats.deltas)
        assert served(patched) == served(whole), f"step {k}"
        assert {n: c for n, c in a.items() if c} == {n: c for n, c in b.items() if c}, f"step {k}"
        assert set(inc.stats.deltas) == {n for n, c in a.items() if c}, f"step {k}: a delta for an unchanged node"


def test_a_delta_costs_what_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = SnapshotCache()
    cache.apply_deltas({NODE: {LISTENER: {"l": b"L"}, CLUSTER: {f"c{i}": b"C%d" % i for i in range(500)},
                               ENDPOINT: {f"c{i}": b"E%d" % i for i in range(500)}}})
    before = cache.get(NODE)
    interned: list[str] = []
    real = cache._intern
    monkeypatch.setattr(cache, "_intern", lambda t, n, b: interned.append(n) or real(t, n, b))
    [change] = cache.apply_deltas({NODE: {ENDPOINT: {"c7": b"new", "c8": None, "zz": b"added"}}}).values()
    assert interned == ["c7", "zz"]  # nothing else hashed
    assert change.changed == {ENDPOINT: {"c7"}} and change.removed == {ENDPOINT: {"c8"}} and change.added == {ENDPOINT: {"zz"}}
    after = cache.get(NODE)
    assert after.resources(CLUSTER) is before.resources(CLUSTER)  # untouched types are not copied
    assert list(after.resources(ENDPOINT)) == sorted(after.resources(ENDPOINT))  # names stay sorted
    assert cache.generation(NODE) == 2
    assert not cache.apply_deltas({NODE: {ENDPOINT: {"c7": b"new"}}})[NODE]  # same content: no change, no push
    assert cache.generation(NODE) == 2


def test_a_delta_that_would_wipe_listeners_is_refused_for_every_node() -> None:
    cache = SnapshotCache()
    cache.apply_deltas({NODE: {LISTENER: {"l": b"L"}}, "node-b": {LISTENER: {"l": b"L"}}})
    with pytest.raises(UnsafeSnapshot, match="node-b"):
        cache.apply_deltas({NODE: {LISTENER: {"l": b"L2"}}, "node-b": {LISTENER: {"l": None}}})
    assert cache.get(NODE).get(LISTENER, "l").body == b"L"  # atomic: node-a not changed either
    with pytest.raises(ValueError, match="body must be bytes"):
        cache.apply_deltas({NODE: {LISTENER: {"l": "text"}}})  # type: ignore[dict-item]
