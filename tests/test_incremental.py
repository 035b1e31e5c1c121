"""Incremental translation gives exactly translate()'s bytes, and does only the work a change needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdsserver import synth
from xdsserver.incremental import EDS, LDS, IncrementalTranslator, serialize
from xdsserver.model import Flavor
from xdsserver.model.index import MeshIndex
from xdsserver.pipeline import ephemeral_certs
from xdsserver.sources.manifests import load_model
from xdsserver.translate import names, translate

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import cluster as bc  # noqa: E402

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.fixture(scope="module")
def certs():
    return ephemeral_certs()


@pytest.fixture(scope="module")
def base():
    objs = [o for f in synth.FILES for o in synth.generate(synth.Shape(3, 40, 12, seed=3))[f]]
    return objs, bc.index_of(objs)


def full(index: MeshIndex, certs, flavor: Flavor = Flavor.ENVOY) -> dict:
    return {n: serialize(translate(index.node_view(n), flavor, certs)) for n in index.node_names}


@pytest.mark.parametrize("scenario", sorted(p.parent.name for p in GOLDEN.glob("*/manifests")))
@pytest.mark.parametrize("flavor", list(Flavor))
def test_first_run_equals_translate_on_goldens(scenario: str, flavor: Flavor, certs) -> None:
    index = MeshIndex(load_model(GOLDEN / scenario / "manifests"))
    inc = IncrementalTranslator(flavor, certs)
    assert inc.snapshots(index) == full(index, certs, flavor)
    assert inc.stats.full == list(index.node_names)


@pytest.mark.parametrize(
    ("event", "kind"),
    [("pod_added", "full"), ("endpoint_unready", "patched"), ("service_added", "full"), ("irrelevant_namespace", "untouched")],
)
def test_events_equal_translate_and_do_minimal_work(base, certs, event: str, kind: str) -> None:
    objs, index = base
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    before = inc.snapshots(index)
    new_objs, _ = bc.EVENTS[event](objs, index)
    new_index = bc.index_of(new_objs)
    after = inc.snapshots(new_index)
    assert after == full(new_index, certs)
    stats = inc.stats
    if kind == "untouched":
        assert stats.untouched == list(index.node_names) and not stats.full and not stats.patched
        assert all(after[n] is before[n] for n in after)  # the very same objects: nothing to diff or push
    elif kind == "patched":
        assert not stats.full and stats.patched and stats.clas_built > 0
        for n in stats.patched:  # only endpoints were rebuilt; every other resource is the same bytes object
            for t in after[n]:
                if t != EDS:
                    assert all(a[1] is b[1] for a, b in zip(after[n][t], before[n][t]))
    else:
        assert stats.full
    # and back: reverting restores the original bytes
    assert inc.snapshots(index) == before


def test_failed_translation_keeps_the_memo(base, certs, monkeypatch) -> None:
    objs, index = base
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    before = inc.snapshots(index)
    new_objs, _ = bc.EVENTS["pod_added"](objs, index)
    import xdsserver.incremental as mod

    def boom(*a, **k):
        raise RuntimeError("translation failed")

    monkeypatch.setattr(mod, "translate", boom)
    with pytest.raises(RuntimeError):
        inc.snapshots(bc.index_of(new_objs))
    monkeypatch.undo()
    assert inc.snapshots(index) == before
    assert inc.stats.untouched == list(index.node_names)


def test_pod_added_retranslates_only_its_node(base, certs) -> None:
    """A pod elsewhere changes a node only through stage 2 (one shared message) and the CLAs it
    joins: other nodes are patched, not translated, and the bytes still equal a full translation."""
    objs, index = base
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    before = inc.snapshots(index)
    new_objs, what = bc.EVENTS["pod_added"](objs, index)
    new_index = bc.index_of(new_objs)
    after = inc.snapshots(new_index)
    assert after == full(new_index, certs)
    stats = inc.stats
    old_keys = {wl.key for wl in index.workloads}
    [new_pod] = [wl for wl in new_index.workloads if wl.key not in old_keys]
    assert stats.full == [new_pod.node_name], what
    assert sorted(stats.patched) == sorted(set(new_index.node_names) - set(stats.full))
    stage2 = {id(dict(after[n][LDS])[names.OUTBOUND_DISPATCH]) for n in after}
    assert len(stage2) == 1  # one bytes object on every node
    for n in stats.patched:
        for t in after[n]:
            for (name, a), (_, b) in zip(after[n][t], before[n][t]):
                if not (t == EDS or (t == LDS and name == names.OUTBOUND_DISPATCH)):
                    assert a is b, (n, name)
