"""Incremental translation gives exactly translate()'s bytes, and does only the work a change needs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from xdsserver import synth
from xdsserver.incremental import CDS, EDS, LDS, IncrementalTranslator, serialize
from xdsserver.model import Flavor
from xdsserver.model.index import MeshIndex
from xdsserver.pipeline import ephemeral_certs
from xdsserver.sources.manifests import load_model
from xdsserver.translate import dispatch, names, translate

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
    """The reference: translate() with stage 2 built from scratch, not the incremental side's
    (possibly patched) message for the same index."""
    dispatch._last.clear()
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
    [("pod_added", "full"), ("endpoint_unready", "patched"), ("service_added", "reshaped"), ("irrelevant_namespace", "untouched")],
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
    elif kind == "reshaped":  # services changed: patched, never translated (details: the test below)
        assert not stats.full and sorted(stats.patched) == list(new_index.node_names)
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
    """A pod elsewhere changes a node only through the CLAs it joins (its /24's pod table among
    them); stage 2 keeps its very bytes (one object on every node): other nodes are patched, not
    translated, and the bytes still equal a full translation."""
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
    assert len({id(dict(before[n][LDS])[names.OUTBOUND_DISPATCH]) for n in before} | stage2) == 1, "a pod in a known /24 leaves stage 2 as it was"
    table = names.pod_table(new_pod.pod.ip[: new_pod.pod.ip.rfind(".") + 1])
    for n in stats.patched:
        if not new_index.node_view(n).local_identities:
            continue
        assert table in stats.deltas[n][EDS], n
        assert set(stats.deltas[n]) == {EDS}, (n, stats.deltas[n].keys())
        for t in after[n]:
            for (name, a), (_, b) in zip(after[n][t], before[n][t]):
                if t != EDS:
                    assert a is b, (n, name)


# -- services and ports: only stage 2, the service clusters and their CLAs change -------------------
def _replace(objs: list[dict], match, change) -> list[dict]:
    """Per-object event: the first object ``match`` picks is replaced by a changed copy; the
    other objects are shared, as a source's cache hands them out."""
    i = next(i for i, o in enumerate(objs) if match(o))
    new = list(objs)
    new[i] = copy.deepcopy(objs[i])
    change(new[i])
    return new


def _svc(name: str):
    return lambda o: o["kind"] == "Service" and o["metadata"]["name"] == name


def service_removed(objs: list[dict]) -> list[dict]:
    return [o for o in objs if not _svc("svc-0001")(o)]


def port_added(objs: list[dict]) -> list[dict]:
    return _replace(objs, _svc("svc-0002"), lambda o: o["spec"]["ports"].append(
        {"name": "metrics", "port": 9999, "protocol": "TCP", "targetPort": 9999}))


def port_removed(objs: list[dict]) -> list[dict]:
    return _replace(objs, lambda o: o["kind"] == "Service" and len(o["spec"]["ports"]) > 1, lambda o: o["spec"]["ports"].pop(0))


def port_renumbered(objs: list[dict]) -> list[dict]:
    return _replace(objs, _svc("svc-0003"), lambda o: o["spec"]["ports"][0].update(port=18080))


def namespace_unenrolled(objs: list[dict]) -> list[dict]:
    return _replace(objs, lambda o: o["kind"] == "Namespace" and o["metadata"]["name"] == "ns-001",
                    lambda o: o["metadata"]["labels"].pop("istio.io/dataplane-mode"))


def pod_identity_changed(objs: list[dict], index: MeshIndex) -> list[dict]:
    """A served pod now runs as another service account: same endpoint, another backend identity."""
    served = {b.pod for t in index.targets for b in t.backends if b.identity is not None}
    return _replace(objs, lambda o: o["kind"] == "Pod" and f"{o['metadata']['namespace']}/{o['metadata']['name']}" in served,
                    lambda o: o["spec"].update(serviceAccountName="renamed"))


# every kind of event, to apply one after another (each step: objects, index -> new objects)
EVENT_SEQUENCE = [
    lambda o, i: bc.EVENTS["pod_added"](o, i)[0],
    lambda o, i: bc.EVENTS["endpoint_unready"](o, i)[0],
    lambda o, i: bc.EVENTS["service_added"](o, i)[0],
    lambda o, i: port_added(o),
    lambda o, i: port_renumbered(o),
    lambda o, i: service_removed(o),
    lambda o, i: port_removed(o),
    lambda o, i: bc.EVENTS["irrelevant_namespace"](o, i)[0],
    lambda o, i: namespace_unenrolled(o),
    pod_identity_changed,
]

SERVICE_EVENTS = {"service_removed": service_removed, "port_added": port_added, "port_removed": port_removed,
                  "port_renumbered": port_renumbered}


@pytest.mark.parametrize("event", sorted(SERVICE_EVENTS))
def test_service_and_port_changes_patch_only_stage2_clusters_and_clas(base, certs, event: str) -> None:
    objs, index = base
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    before = inc.snapshots(index)
    new_index = bc.index_of(SERVICE_EVENTS[event](objs))
    assert new_index.targets != index.targets, "the event must change the service ports"
    after = inc.snapshots(new_index)
    assert after == full(new_index, certs)
    assert not inc.stats.full and sorted(inc.stats.patched) == list(new_index.node_names)
    for n in after:
        for t in after[n]:
            old = dict(before[n][t])
            for name, body in after[n][t]:
                if t in (EDS, CDS) or name == names.OUTBOUND_DISPATCH:
                    continue
                assert body is old[name], (n, name)  # untouched resources keep their very bytes objects
        changed = {(t, name) for t in after[n] for name, body in after[n][t] if dict(before[n][t]).get(name) != body}
        changed |= {(t, name) for t in before[n] for name, _ in before[n][t] if name not in dict(after[n][t])}
        assert changed and all(t in (EDS, CDS) or name == names.OUTBOUND_DISPATCH for t, name in changed), changed
        assert len({name for t, name in changed if t == CDS}) <= 2  # one service cluster (two if renamed)
    assert inc.snapshots(index) == before  # and back


def test_every_event_in_sequence_equals_full_translation(base, certs) -> None:
    """Events applied one after another (not each from the base): after every one, incremental ==
    full translation byte for byte, whatever path (untouched, patched, full) each node took."""
    objs, index = base
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    inc.snapshots(index)
    steps = EVENT_SEQUENCE
    for k, step in enumerate(steps):
        objs = step(objs, index)
        index = bc.index_of(objs)
        assert inc.snapshots(index) == full(index, certs), f"step {k}"


# -- the model stage: per-object work, unchanged objects stay the very same objects ----------------
def test_model_and_index_reuse_what_did_not_change(base) -> None:
    """With the server's per-object memo, the source's unchanged objects and the previous index,
    each event in sequence gives the same model and index as building from scratch; only changed
    objects are digested, and unchanged service targets are the very same objects."""
    from xdsserver.sources.objects import ValidationMemo

    objs, _ = base
    memo, feed = ValidationMemo(), bc.ObjectFeed()
    index = bc.index_of(objs, memo, feed=feed)
    for k, step in enumerate(EVENT_SEQUENCE):
        new_objs = step(objs, index)
        changed = sum(1 for o in new_objs if not any(o is p for p in objs))
        digests = memo.digests
        new_index = bc.index_of(new_objs, memo, feed=feed, previous=index)
        fresh = bc.index_of(new_objs)
        assert new_index.model == fresh.model, f"step {k}"
        assert new_index.workloads == fresh.workloads and new_index.targets == fresh.targets, f"step {k}"
        index.node_view(index.node_names[0])  # views computed on the old index are carried over
        assert all(new_index.node_view(n) == fresh.node_view(n) for n in fresh.node_names), f"step {k}"
        assert memo.digests - digests == changed, f"step {k}: unchanged objects were digested again"
        if k == 1:  # endpoint_unready: one pod's readiness -> only its services' targets are new objects
            old = {(t.service.key, t.port.name): t for t in index.targets}
            rebuilt = [t for t in new_index.targets if old.get((t.service.key, t.port.name)) is not t]
            assert rebuilt and all(t.backends != old[(t.service.key, t.port.name)].backends for t in rebuilt)
        objs, index = new_objs, new_index


# -- stage 2 patched for pods and services (translate/dispatch.py _patched) --------------------------------------
def _pod_removed(objs: list[dict], index: MeshIndex) -> list[dict]:
    served = {b.pod for t in index.targets for b in t.backends if b.identity is not None}
    gone = next(o for o in objs if o["kind"] == "Pod" and f"{o['metadata']['namespace']}/{o['metadata']['name']}" in served)
    return [o for o in objs if o is not gone]


def _pod_readdressed(objs: list[dict], index: MeshIndex) -> list[dict]:
    used = {o["status"]["podIP"] for o in objs if o["kind"] == "Pod"}
    ip = next(str(a) for a in list(synth.node_cidr(1).hosts())[::-1] if str(a) not in used)
    wl = index.workloads[len(index.workloads) // 2]
    return _replace(objs, lambda o: o["kind"] == "Pod" and o["metadata"]["name"] == wl.pod.name and o["metadata"]["namespace"] == wl.pod.namespace,
                    lambda o: o["status"].update(podIP=ip, podIPs=[{"ip": ip}]))


def _pod_on_a_vip(objs: list[dict], index: MeshIndex) -> list[dict]:
    """A new pod whose IP is a Service VIP: precedence (pod IP over VIP) makes stage 2 build in full."""
    new, _ = bc.EVENTS["pod_added"](objs, index)
    vip = index.targets[0].service.cluster_ips[0]
    new[-1] = copy.deepcopy(new[-1])
    new[-1]["status"].update(podIP=vip, podIPs=[{"ip": vip}])
    return new


def _vip_on_a_pod(objs: list[dict], index: MeshIndex) -> list[dict]:
    """A new Service whose VIP is a pod's IP: precedence (pod IP over VIP) makes stage 2 build in full."""
    new, _ = bc.EVENTS["service_added"](objs, index)
    ip = index.workloads[0].pod.ip
    new[-1] = copy.deepcopy(new[-1])
    new[-1]["metadata"]["name"] = "on-a-pod"
    new[-1]["spec"].update(clusterIP=ip, clusterIPs=[ip])
    return new


def _pod_in_a_new_range(objs: list[dict], index: MeshIndex) -> list[dict]:
    """A pod in a /24 with no mesh pod yet: a new pod table, so stage 2 gains its prefix key."""
    new, _ = bc.EVENTS["pod_added"](objs, index)
    new[-1] = copy.deepcopy(new[-1])
    new[-1]["metadata"].update(name="in-a-new-range", uid="00000000-0000-4000-8000-00000000fe01")
    new[-1]["status"].update(podIP="10.250.7.9", podIPs=[{"ip": "10.250.7.9"}])
    return new


def _new_range_emptied(objs: list[dict], index: MeshIndex) -> list[dict]:
    """The last mesh pod of a /24 goes: its pod table and its stage-2 prefix key go with it."""
    return [o for o in objs if not (o["kind"] == "Pod" and o["metadata"]["name"] == "in-a-new-range")]


def _many_pods(objs: list[dict], index: MeshIndex) -> list[dict]:
    new = list(objs)
    for k in range(65):
        new, _ = bc.EVENTS["pod_added"](new, index)
        new[-1]["metadata"]["name"] += f"-{k}"
        new[-1]["metadata"]["uid"] = f"00000000-0000-4000-8000-{k:012d}"
    return new


# (event, how stage 2 was made: kept as it was, patched from the previous one, or built)
POD_STEPS = [
    (lambda o, i: bc.EVENTS["pod_added"](o, i)[0], "kept"),  # pods within known /24s: only pod tables change
    (_pod_removed, "kept"),
    (_pod_readdressed, "kept"),
    (lambda o, i: bc.EVENTS["endpoint_unready"](o, i)[0], None),  # readiness: stage 2 does not change at all
    (pod_identity_changed, "kept"),  # a new identity is a pod-table row, not a stage-2 chain
    (_pod_on_a_vip, "built"),  # a pod IP on a VIP takes the VIP's exact key
    (_many_pods, "kept"),
    (_pod_in_a_new_range, "built"),
    (_pod_removed, "kept"),
    (_new_range_emptied, "built"),
    (lambda o, i: bc.EVENTS["service_added"](o, i)[0], "patched"),  # services alone: their chains and VIP keys
    (lambda o, i: port_added(o), "patched"),
    (lambda o, i: port_renumbered(o), "patched"),
    (lambda o, i: service_removed(o), "patched"),
    (lambda o, i: port_removed(o), "patched"),
    (_vip_on_a_pod, "built"),
]


def test_pod_and_service_changes_patch_stage2_and_equal_a_fresh_build(base, certs) -> None:
    """As the server runs it (per-object memo, previous index): pods, or Services and ports, that
    came, went or changed patch the previous stage 2 message; whatever the path, the bytes equal stage 2 built from
    scratch, and every node equals a full translation."""
    from xdsserver.sources.objects import ValidationMemo

    objs, _ = base
    memo, feed = ValidationMemo(), bc.ObjectFeed()
    index = bc.index_of(objs, memo, feed=feed)
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    inc.snapshots(index)
    node = next(n for n in index.node_names if index.node_view(n).local_identities)
    for k, (step, patched) in enumerate(POD_STEPS):
        objs = step(objs, index)
        index = bc.index_of(objs, memo, feed=feed, previous=index)
        counts = dict(dispatch.patch_stats)
        after = inc.snapshots(index)
        made = {key: dispatch.patch_stats[key] - counts[key] for key in counts}
        incremental = dict(after[node][LDS])[names.OUTBOUND_DISPATCH]
        if patched is not None:
            assert made == {"kept": 0, "patched": 0, "built": 0, patched: 1}, f"step {k}: {made}"
        assert after == full(index, certs), f"step {k}"
        assert incremental == dict(after[node][LDS])[names.OUTBOUND_DISPATCH]
        dispatch._last.clear()
        fresh = dispatch.build_dispatch_listener(index.node_view(node)).SerializeToString(deterministic=True)
        assert incremental == fresh, f"step {k}"


# -- the server's rebuild: a readiness change patches model, index and CLAs (sources/pod_status.py) --
def _served(objs: list[dict], index: MeshIndex, n: int) -> list[str]:
    """Keys of the first ``n`` pods behind a service with a VIP (their endpoints reach EDS)."""
    served = {b.pod for t in index.targets for b in t.backends if b.identity is not None}
    served |= {ep.pod for _, eps in index.model.endpoints for ep in eps if not ep.ready}
    keys = [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in objs if o["kind"] == "Pod"]
    return [k for k in keys if k in served][:n]


def _set_ready(keys: list[str], ready: bool, labels: dict | None = None):
    def step(objs: list[dict], index: MeshIndex) -> list[dict]:
        def change(o: dict) -> None:
            o["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
            o["metadata"]["labels"].update(labels or {})
        out = list(objs)
        for k in keys:
            out = _replace(out, lambda o: o["kind"] == "Pod" and f"{o['metadata']['namespace']}/{o['metadata']['name']}" == k, change)
        return out
    return step


def _slice_for_pod(key: str):
    """An EndpointSlice for the first service selecting pod ``key``: that service's endpoints no
    longer come from pod readiness, so a readiness flip must leave them as the slice says."""
    def step(objs: list[dict], index: MeshIndex) -> list[dict]:
        (svc, port), eps = next((k, eps) for k, eps in index.model.endpoints if any(e.pod == key for e in eps))
        ns, name = svc.split("/")
        ready = [{"addresses": [e.ip], "conditions": {"ready": True}, "nodeName": e.node_name,
                  "targetRef": {"kind": "Pod", "namespace": ns, "name": e.pod.split("/")[1]}} for e in eps]
        return [*objs, {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": f"{name}-slice", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                        "addressType": "IPv4", "ports": [{"name": port, "port": eps[0].port, "protocol": "TCP"}],
                        "endpoints": ready}]
    return step


def _edit_slice(change):
    """The EndpointSlice edited in place, as the endpoint-slice controller updates it."""
    return lambda objs, index: _replace(objs, lambda o: o["kind"] == "EndpointSlice", change)


def _slice_ready(ready: bool):
    def change(sl: dict) -> None:
        sl["endpoints"][0]["conditions"]["ready"] = ready
    return _edit_slice(change)


def _slice_address(sl: dict) -> None:
    node = sl["endpoints"][0]["nodeName"]
    sl["endpoints"].append({"addresses": ["10.99.0.7"], "conditions": {"ready": True}, "nodeName": node})


def _slice_port_renamed(sl: dict) -> None:
    sl["ports"][0]["name"] = "renamed"


def test_server_rebuild_patches_readiness_and_equals_full_translation(base, certs) -> None:
    """The ControlPlane's rebuild, events in sequence: readiness-only changes take the patch path
    (no model build, no per-node translation), everything else the full one; after each, the
    model, the index and every node's resources equal a build and translation from scratch, byte
    for byte, and the nodes the endpoint barrier waits for are new_endpoint_nodes'."""
    from prometheus_client import CollectorRegistry

    from xdsserver.app import ControlPlane
    from xdsserver.ordering import new_endpoint_nodes

    objs, index = base
    a, b, c, d = _served(objs, index, 4)
    state = {"objs": objs}
    feed = bc.ObjectFeed()
    cp = ControlPlane(load_objects=lambda: feed(state["objs"]), certs=certs, registry=CollectorRegistry())
    assert cp.rebuild() and cp.last_path == "full"
    steps = [
        ("one unready", _set_ready([a], False), "readiness patch"),
        ("ready again", _set_ready([a], True), "readiness patch"),
        ("three at once", _set_ready([a, b, c], False), "readiness patch"),
        ("pod added", lambda o, i: bc.EVENTS["pod_added"](o, i)[0], "full"),
        ("after a full build", _set_ready([b, c], True), "readiness patch"),
        ("readiness and a label", _set_ready([d], False, {"extra": "x"}), "full"),
        ("service added", lambda o, i: bc.EVENTS["service_added"](o, i)[0], "full"),
        ("slice added", _slice_for_pod(d), "full"),
        ("pod behind the slice", _set_ready([d, a], True), "readiness patch"),
        ("pod behind the slice unready", _set_ready([d], False), "readiness patch"),
        ("slice endpoint unready", _slice_ready(False), "readiness patch"),
        ("slice address added", _edit_slice(_slice_address), "readiness patch"),
        ("slice endpoint ready and a pod unready", lambda o, i: _set_ready([b], False)(_slice_ready(True)(o, i), i), "readiness patch"),
        ("slice port renamed", _edit_slice(_slice_port_renamed), "full"),
        ("unchanged content, new objects", lambda o, i: [copy.deepcopy(x) if x["kind"] == "Pod" and x is o[-3] else x for x in o], "readiness patch"),
    ]
    for label, step, path in steps:
        before = cp.state.model
        state["objs"] = step(state["objs"], cp.state.index)
        patch = cp.readiness.patch(cp.load_objects())
        assert cp.rebuild(), label
        assert cp.last_path == path, label
        fresh = bc.index_of(state["objs"])
        assert cp.state.model == fresh.model, label
        assert cp.state.index.workloads == fresh.workloads and cp.state.index.targets == fresh.targets, label
        assert dict(cp.state.index.endpoints) == dict(fresh.endpoints), label
        assert cp.snaps == full(fresh, certs), label
        assert {n: {t: dict(v) for t, v in cp.cache.resource_set(n).items()} for n in cp.snaps} == \
            {n: {t: dict(v) for t, v in rs.items()} for n, rs in cp.snaps.items()}, label
        if patch is not None:
            assert patch.new_ready_nodes == new_endpoint_nodes(before, fresh.model), label


def test_server_rebuild_with_a_duplicated_pod_takes_the_full_path(base, certs) -> None:
    """Lenient source: of two objects with one name the first is served and the second rejected;
    a readiness change of the rejected copy must not patch the served pod."""
    from prometheus_client import CollectorRegistry

    from xdsserver.app import ControlPlane

    objs, index = base
    (key,) = _served(objs, index, 1)
    first = next(o for o in objs if o["kind"] == "Pod" and f"{o['metadata']['namespace']}/{o['metadata']['name']}" == key)
    state = {"objs": [*objs, copy.deepcopy(first)]}
    feed = bc.ObjectFeed()
    cp = ControlPlane(load_objects=lambda: feed(state["objs"]), certs=certs, registry=CollectorRegistry(), strict=False)
    assert cp.rebuild()
    dup = copy.deepcopy(first)
    dup["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    state["objs"] = [*state["objs"][:-1], dup]
    assert cp.rebuild() and cp.last_path == "full"
    served = next(p for p in cp.state.model.pods if p.key == key)
    assert served.ready, "the rejected duplicate's readiness reached the served pod"
