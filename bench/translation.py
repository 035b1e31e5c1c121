"""Translation benchmarks: one node, all nodes, incremental events, bytes vs the 2022 layout."""

from __future__ import annotations

import gc
import time
from typing import Any

from xdsserver.incremental import IncrementalTranslator, ResourceSet, serialize
from xdsserver.model import Flavor, Identity
from xdsserver.model.index import MeshIndex, NodeView
from xdsserver.translate import clear_memos, names, refcheck, service_clusters, translate
from xdsserver.translate.clusters import build_service_cluster
from xdsserver.translate.endpoints import cla_body
from xdsserver.translate.tunnel import build_outbound_tunnel_lis
from xdsserver.xds.cache import SnapshotCache, SnapshotChange
from xdsserver.xds.types import CLUSTER, ENDPOINT, LISTENER, short

from . import cluster as bc

FLAVOR = Flavor.ENVOY


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def type_bytes(rs: ResourceSet) -> dict[str, dict[str, int]]:
    return {short(t): {"count": len(items), "bytes": sum(len(b) for _, b in items)} for t, items in rs.items()}


def pick_node(index: MeshIndex) -> str:
    """The node with the median number of local workloads (a typical node, not the lightest)."""
    by = sorted(index.node_names, key=lambda n: (len(index.workloads_by_node.get(n, ())), n))
    return by[len(by) // 2]


def one_node(index: MeshIndex, node: str, certs: Any) -> dict[str, Any]:
    """Full translation of one node, cold (translation memos cleared, so this node also builds
    what all nodes share): build, reference check and serialization timed separately. Then
    ``warm_ms``: the same for another node, which reuses stage 2 and the shared CLAs (the cost
    of each further node). Certificates are issued before the clock starts (CA work, cached)."""
    view = index.node_view(node)
    for ident in view.local_identities:
        certs.workload(ident)
    clear_memos()
    gc.collect()
    # the collector is off while the server builds (app.PublishedStateGc.building); left on
    # here, a full collection of the 100-node index fell into one run's window or another's
    gc.disable()
    try:
        return _one_node_timed(index, node, view, certs)
    finally:
        gc.enable()


def _one_node_timed(index: MeshIndex, node: str, view: NodeView, certs: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = translate(view, FLAVOR, certs, check=False)
    t1 = time.perf_counter()
    problems = refcheck.check(res.listeners, res.clusters, (c.cluster_name for c in res.endpoints), (s.name for s in res.secrets), routes=res.routes)
    problems += refcheck.check_endpoints(res.endpoints, {lis.name for lis in res.listeners})
    t2 = time.perf_counter()
    rs = serialize(res)
    t3 = time.perf_counter()
    assert not problems, problems
    del res
    other = next(n for n in index.node_names if n != node)
    for ident in index.node_view(other).local_identities:
        certs.workload(ident)
    t4 = time.perf_counter()
    serialize(translate(index.node_view(other), FLAVOR, certs))
    warm = time.perf_counter() - t4
    return {
        "node": node,
        "warm_node": other,
        "warm_ms": _ms(warm),
        "local_workloads": len(view.local_workloads),
        "local_identities": len(view.local_identities),
        "build_ms": _ms(t1 - t0),
        "refcheck_ms": _ms(t2 - t1),
        "serialize_ms": _ms(t3 - t2),
        "total_ms": _ms(t3 - t0),
        "resources": type_bytes(rs),
        "bytes": sum(len(b) for items in rs.values() for _, b in items),
        "_rs": rs,
    }


def all_nodes(index: MeshIndex, certs: Any) -> dict[str, Any]:
    """Every node from scratch, as the server's first load does (``IncrementalTranslator`` with
    an empty memo: translate + reference check + serialization; what nodes share, stage 2 and
    most CLAs, is built and serialized once). Translation memos are cleared first (cold)."""
    clear_memos()
    nodes = list(index.node_names)
    t0 = time.perf_counter()
    snaps = IncrementalTranslator(FLAVOR, certs).snapshots(index)
    elapsed = time.perf_counter() - t0
    total = sum(len(b) for rs in snaps.values() for items in rs.values() for _, b in items)
    distinct = len({id(b) for rs in snaps.values() for items in rs.values() for _, b in items})
    return {"nodes": len(nodes), "translated": len(nodes), "projected": False, "total_ms": _ms(elapsed),
            "bytes_all_nodes": total, "distinct_bodies": distinct}


# -- which resources an event may change ------------------------------------------------------------
def _wl_shapes(index: MeshIndex, node: str | None = None) -> tuple[Any, ...]:
    wls = index.workloads if node is None else index.workloads_by_node.get(node, ())
    return tuple((w.pod.key, w.pod.ips, w.identity, w.node_name) for w in wls)


def _target_shapes(index: MeshIndex) -> tuple[Any, ...]:
    return tuple((t.service.key, t.service.cluster_ips, t.port, t.hostname) for t in index.targets)


def unexplained(old: MeshIndex, new: MeshIndex, node: str, change: SnapshotChange) -> list[str]:
    """Changed resources (same name, new bytes) that no input of theirs explains; must be empty.

    Added/removed names are structural (a new identity, service or pod) and always explained.
    """
    out = []
    global_shape = _wl_shapes(old) != _wl_shapes(new) or _target_shapes(old) != _target_shapes(new)
    local_shape = _wl_shapes(old, node) != _wl_shapes(new, node)
    view = new.node_view(node)
    old_backends = {(t.service.key, t.port.name): t.backends for t in old.targets}
    cla_ok = {name for name, (_, i) in service_clusters(view, FLAVOR).items()
              if old_backends.get((view.targets[i].service.key, view.targets[i].port.name)) != view.targets[i].backends}
    # a pod table changes with the (IP, identity) rows of its /24: pods anywhere
    rows = lambda ix: {(ip, w.identity) for w in ix.workloads for ip in w.pod.ips}  # noqa: E731
    changed_rows = rows(old) ^ rows(new)
    cla_ok |= {names.pod_table(ip[: ip.rfind(".") + 1] if ":" not in ip else "") for ip, _ in changed_rows}
    for t, names_ in change.changed.items():
        for name in sorted(names_):
            if t == LISTENER:  # stages 1 and 3 hold local pod IPs; stage 2 every destination
                ok = (name in (names.ZTUNNEL_OUTBOUND, names.OUTBOUND_POD) and local_shape) or (
                    name == names.OUTBOUND_DISPATCH and global_shape) or (
                    name in (names.ZTUNNEL_INBOUND, names.ZTUNNEL_INBOUND_PLAINTEXT) and local_shape)
            elif t == ENDPOINT:
                ok = name in cla_ok
            else:  # clusters and secrets depend only on names, mesh and certificates
                ok = False
            if not ok:
                out.append(f"{short(t)} {name}")
    return out


def _summarize(change: SnapshotChange) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("added", "changed", "removed"):
        m = getattr(change, kind)
        if m:
            out[kind] = {short(t): len(v) for t, v in sorted(m.items())}
    if change.changed.get(LISTENER):
        out["listeners_changed"] = sorted(change.changed[LISTENER])[:5]
    return out


def incremental(objs: list[dict[str, Any]], index: MeshIndex, certs: Any, sample: int | None,
                oracle_refcheck_ms: float | None = None) -> dict[str, Any]:
    """Each event against the base state: rebuild cost, incremental compute, and per-node diffs.

    ``full_ms``: what ControlPlane.rebuild does today (translate every node); ``incremental_ms``:
    :class:`xdsserver.incremental.IncrementalTranslator` (relevance filter + CLA patching). Both
    are checked to give identical bytes. With ``sample`` only that many nodes are translated.
    With ``oracle_refcheck_ms`` the full re-translation runs without its reference check and that
    per-node check time (measured once by :func:`one_node`) is added instead (large scale)."""
    nodes = list(index.node_names)
    if sample is not None:
        first = pick_node(index)
        nodes = [first] + [n for n in nodes if n != first][: sample - 1]
    # the server's state after the base was loaded: per-object memo, the source's objects, last index
    warm, feed = bc.ValidationMemo(), bc.ObjectFeed()
    index = bc.index_of(objs, warm, feed=feed)
    inc = IncrementalTranslator(FLAVOR, certs)
    base = inc.snapshots(index, nodes)
    out: dict[str, Any] = {"nodes_measured": len(nodes), "projected": len(nodes) < len(index.node_names), "events": {}}
    factor = len(index.node_names) / len(nodes)
    for name, event in bc.EVENTS.items():
        new_objs, what = event(objs, index)
        memo, events_feed = warm.copy(), feed.copy()
        t0 = time.perf_counter()
        new_index = bc.index_of(new_objs, memo, feed=events_feed, previous=index)
        t_model = time.perf_counter() - t0
        # incremental, from the base memo (a fresh copy of the memo per event)
        inc_e = inc.fork()
        t0 = time.perf_counter()
        snaps = inc_e.snapshots(new_index, nodes)
        t_inc = time.perf_counter() - t0
        stats = inc_e.stats
        # full re-translation (today's ControlPlane.rebuild), for the comparison and as the oracle
        t0 = time.perf_counter()
        check = oracle_refcheck_ms is None
        full = {n: serialize(translate(new_index.node_view(n), FLAVOR, certs, check=check)) for n in nodes}
        t_full = time.perf_counter() - t0 + (0 if check else oracle_refcheck_ms / 1000 * len(nodes))
        identical = all(_same(full[n], snaps[n]) for n in nodes)
        cache = SnapshotCache()
        cache.set_snapshots(base)
        changes = cache.set_snapshots(snaps)
        per_node = {n: _summarize(c) for n, c in changes.items() if c}
        bad = {n: u for n, c in changes.items() if (u := unexplained(index, new_index, n, c))}
        out["events"][name] = {
            "what": what,
            "model_rebuild_ms": _ms(t_model),
            "full_ms": _ms(t_full * factor),
            "incremental_ms": _ms(t_inc * factor),
            "incremental_measured_ms": _ms(t_inc),
            "nodes_translated_full": len(stats.full),
            "nodes_patched": len(stats.patched),
            "nodes_untouched": len(stats.untouched),
            "clas_built": stats.clas_built,
            "identical_to_full": identical,
            "nodes_changed": len(per_node),
            "changes": per_node,
            "only_affected": not bad,
            "unexplained": bad,
        }
        del full, snaps
    return out


def _same(a: ResourceSet, b: ResourceSet) -> bool:
    return {k: list(v) for k, v in a.items()} == {k: list(v) for k, v in b.items()}


# -- bytes vs the 2022 layout -------------------------------------------------------------------------
LEGACY = Flavor.ISTIO_2022  # the 2022 generator's shape: identity x service cross products


def _identity_extra(view: NodeView, ident: Identity) -> int:
    """What 2022 adds on this node for a non-local identity: its internal listener, one service
    cluster per TCP service port and that cluster's CLA (ztunnel-config.md §10: LDS 3 + I,
    CDS I*P + 3*I_local + 5, EDS I*P)."""
    n = len(build_outbound_tunnel_lis(ident, LEGACY).SerializeToString(deterministic=True))
    seen = set()
    for t in view.targets:
        name = names.service_cluster(ident, t.port.name, t.hostname)
        if name in seen:
            continue
        seen.add(name)
        n += len(build_service_cluster(name).SerializeToString(deterministic=True))
        n += len(cla_body(name, names.outbound_tunnel_lis(ident), t, view.node_name))
    return n


def layout_2022(index: MeshIndex, node: str, ours: ResourceSet, sample: int | None, certs: Any = None) -> dict[str, Any]:
    """Bytes of this node's config vs what the 2022 generator would send it, in the same run.

    Method: 2022 = this node translated in the ``istio-2022`` flavor (the 2022 shape: per source
    identity x service port chains, clusters and CLAs, per (source, destination) pod chains), plus
    for every identity that is *not* node-local the internal listener, service clusters and CLAs
    2022 also emitted (D1 undone). SDS is excluded on both sides (2022 fetched certificates from the
    node agent). With ``sample`` the per-identity extra is measured on that many non-local
    identities (evenly spread) and scaled to all of them (sizes differ only by the length of the
    identity string)."""
    view = index.node_view(node)
    local = set(view.local_identities)
    others = sorted({w.identity for w in index.workloads} - local)
    picked = others if sample is None or sample >= len(others) else [others[i * len(others) // sample] for i in range(sample)]
    t0 = time.perf_counter()
    legacy = translate(view, LEGACY, certs, check=False)
    legacy_local = sum(len(m.SerializeToString(deterministic=True)) for group in (legacy.listeners, legacy.clusters, legacy.endpoints) for m in group)
    del legacy
    extra = sum(_identity_extra(view, i) for i in picked)
    extra_all = int(extra * len(others) / len(picked)) if picked else 0
    ours_b = sum(len(b) for t in (LISTENER, CLUSTER, ENDPOINT) for _, b in ours.get(t, []))
    total_2022 = legacy_local + extra_all
    return {
        "node": node,
        "identities_cluster_wide": len(others) + len(local),
        "identities_local": len(local),
        "identities_measured": len(picked),
        "projected": len(picked) < len(others),
        "ours_bytes": ours_b,
        "bytes_2022_local_identities": legacy_local,
        "bytes_2022": total_2022,
        "ratio": round(ours_b / total_2022, 4) if total_2022 else None,
        "outbound_listener_bytes": len(next(b for n, b in ours[LISTENER] if n == names.ZTUNNEL_OUTBOUND)),
        "dispatch_listener_bytes": len(next((b for n, b in ours[LISTENER] if n == names.OUTBOUND_DISPATCH), b"")),
        "ms": _ms(time.perf_counter() - t0),
    }
