"""Incremental translation: recompute only what an input change touches, reuse the rest's bytes.

:func:`xdsserver.translate.translate` is a pure function of one node's view; calling it for every
node on every change costs O(nodes x config size) even when one endpoint flipped to unready. This
layer keeps, per node, the serialized resources of the last translation and the inputs they were
built from, and on the next :class:`~xdsserver.model.index.MeshIndex`:

* **relevance filter** -- a node whose inputs are unchanged is not translated at all and keeps
  the very same :class:`ResourceSet` object (a change no node depends on costs no translation and
  no push);
* **endpoint-only changes** -- when a node's *structure* (its local workloads, the services'
  VIPs/ports) is unchanged, only the ClusterLoadAssignments of targets whose backends changed
  are rebuilt (and, stock flavor, when pods elsewhere came or went, the shared stage-2
  listener, built and serialized once for all nodes); every other resource's bytes are reused. Such a CLA is the same on every
  node that hosts none of the target's backends, so it is built and serialized once per change
  and its bytes are shared across those nodes;
* **service and port changes** (stock flavor) -- a Service or port that came, went or changed
  touches only stage 2 (the shared dispatch listener), the service clusters (a cluster depends on
  its name only: a new one is built once for all nodes) and the CLAs whose target changed, matched
  by cluster name since targets' positions shift; every other resource keeps its bytes;
* **policy changes** (stock flavor) -- the policies selecting a node's pods live in its pods'
  RouteConfigurations (RDS) and the plaintext inbound listener: only those are rebuilt, the
  HBONE chains keep their bytes (so Envoy does not drain them);
* anything else falls back to a full ``translate`` (with its reference check) for that node.

The output is byte-for-byte what ``translate`` + deterministic serialization gives (the tests
compare both after every kind of change), so versions and goldens are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .model import Flavor, Identity
from .model.index import MeshIndex, NodeView, ServiceTarget, Workload
from .translate import CertPair, CertProvider, NodeResources, service_clusters, translate, type_url
from .translate.dispatch import build_dispatch_listener
from .translate.clusters import build_service_cluster
from .translate.endpoints import body_of as service_body_of, cla_body, node_variant
from .translate.podtable import PodTable, body_of as table_body_of, pod_table
from .translate.inbound import build_inbound_routes, build_ztunnel_inbound_plaintext
from .translate.names import OUTBOUND_DISPATCH
from .translate.secrets import build_root_secret, build_workload_secret

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

EDS = type_url(endpoint_pb2.ClusterLoadAssignment())
LDS = type_url(listener_pb2.Listener())
CDS = type_url(cluster_pb2.Cluster())
SDS = type_url(secret_pb2.Secret())
RDS = type_url(route_pb2.RouteConfiguration())

ResourceSet = dict[str, list[tuple[str, bytes]]]


def body_of(cla: Any) -> bytes | None:
    """The bytes a CLA was built from: a service CLA (``shared_cla``) or a pod table's."""
    return service_body_of(cla) or table_body_of(cla)


def serialize(res: NodeResources, shared: dict[int, tuple[Any, bytes]] | None = None) -> ResourceSet:
    """type URL -> [(name, deterministic bytes)] in emission order (what the snapshot cache takes).

    ``shared`` (id(message) -> (message, bytes)) serializes a message several nodes share
    (``shared_cla``, stage 2 of the capture path, service clusters) once and hands every node the
    same bytes."""
    out: ResourceSet = {}
    for url, items in res.named().items():
        if shared is None or url not in (EDS, LDS, CDS):
            if url == EDS:  # shared_cla built them from bytes
                out[url] = [(name, body_of(msg) or msg.SerializeToString(deterministic=True)) for name, msg in items]
            else:
                out[url] = [(name, msg.SerializeToString(deterministic=True)) for name, msg in items]
            continue
        lst = out[url] = []
        for name, msg in items:
            hit = shared.get(id(msg))
            if hit is None or hit[0] is not msg:
                body = body_of(msg) if url == EDS else None  # shared_cla built it from bytes
                hit = shared[id(msg)] = (msg, msg.SerializeToString(deterministic=True) if body is None else body)
            lst.append((name, hit[1]))
    return out


def _shape(t: ServiceTarget) -> tuple[Any, ...]:
    """What of a target the listeners and clusters depend on (everything but its backends)."""
    return (t.service.key, t.service.cluster_ips, t.port, t.hostname)


def _workload_shape(wl: Workload) -> tuple[Any, ...]:
    """What of a workload the listeners depend on (not readiness, labels or phase: those only
    reach the config through endpoints)."""
    return (wl.pod.namespace, wl.pod.name, wl.pod.ips, wl.identity, wl.pod.node_name)


def _policy_shape(view: NodeView) -> tuple[Any, ...]:
    """The L4 policies selecting this node's pods (and the labels that pick them): a policy that
    selects nothing here is not in the view, so it costs this node no translation and no push."""
    if not view.authorization_policies and not view.peer_authentications:
        return ()
    labels = tuple((wl.pod.key, wl.pod.labels) for wl in view.local_workloads)
    return (("policy", view.authorization_policies, view.peer_authentications, labels),)


@dataclass
class _NodeMemo:
    local: tuple[tuple[Any, ...], ...]
    policy: tuple[Any, ...]
    workloads: tuple[tuple[Any, ...], ...]
    shapes: tuple[tuple[Any, ...], ...]
    targets: tuple[ServiceTarget, ...]
    resources: ResourceSet
    cla_targets: dict[str, tuple[str, int]]  # CLA name -> (internal listener, target index), as translate()
    secrets: dict[Identity | None, bytes]
    table: PodTable | None = None  # stock flavor, a node with mesh pods: its groups close CDS and EDS


@dataclass
class RunStats:
    """What the last :meth:`IncrementalTranslator.snapshots` call did, per node."""

    full: list[str] = field(default_factory=list)  # translated from scratch
    patched: dict[str, int] = field(default_factory=dict)  # node -> CLAs rebuilt
    untouched: list[str] = field(default_factory=list)  # inputs unchanged: nothing done
    removed: list[str] = field(default_factory=list)
    clas_built: int = 0  # distinct CLA bodies built (shared across nodes)
    # what changed, per node: {node: {type URL: {name: bytes, or None when removed}}}; a node absent
    # here is unchanged. What the snapshot cache takes (SnapshotCache.apply_deltas), O(change).
    deltas: dict[str, dict[str, dict[str, bytes | None]]] = field(default_factory=dict)

    @property
    def changed_nodes(self) -> list[str]:
        return sorted([*self.full, *self.patched])


class IncrementalTranslator:
    """Per-node memo of the last translation; :meth:`snapshots` returns every node's resources."""

    def __init__(self, flavor: Flavor, certs: CertProvider, *, check: bool = True) -> None:
        self.flavor = flavor
        self.certs = certs
        self.check = check
        self._memo: dict[str, _NodeMemo] = {}
        self._mesh: Any = None
        self._secret_bytes: dict[Identity, tuple[CertPair, bytes]] = {}
        self._root_bytes: tuple[str, bytes] | None = None
        self._shared_bytes: dict[int, tuple[Any, bytes]] = {}  # one snapshots() call: shared messages' bytes
        self._cluster_bytes: dict[str, bytes] = {}  # one snapshots() call: new service clusters' bytes
        self._wl_shapes: dict[int, tuple[Workload, tuple[Any, ...]]] = {}  # id -> (workload, _workload_shape)
        self._last_service_map: tuple[tuple[ServiceTarget, ...], dict[str, tuple[str, int]]] | None = None
        self._stage2: tuple[Any, bytes] | None = None  # (stage 2 listener, its bytes): kept while stage 2 is
        self._table_clusters: dict[str, tuple[Any, bytes]] = {}  # pod table name -> (its cluster, bytes)
        self.stats = RunStats()

    def snapshots(self, index: MeshIndex, nodes: list[str] | None = None) -> dict[str, ResourceSet]:
        """Resources of ``nodes`` (default: every node of the index), recomputing only what changed."""
        wanted = list(index.node_names) if nodes is None else nodes
        stats = RunStats()
        if index.mesh != self._mesh:  # mesh settings touch every resource
            self._memo.clear()
            self._mesh = index.mesh
        known, self._wl_shapes = self._wl_shapes, {}

        def shape_of(wl: Workload) -> tuple[Any, ...]:  # per workload object, kept from the last call
            hit = known.get(id(wl))
            if hit is None or hit[0] is not wl:
                hit = (wl, _workload_shape(wl))
            self._wl_shapes[id(wl)] = hit
            return hit[1]

        workloads = tuple(shape_of(wl) for wl in index.workloads)
        targets = index.targets
        shapes = tuple(_shape(t) for t in targets)
        cla_memo: dict[tuple[str, int, str], bytes] = {}
        out: dict[str, ResourceSet] = {}
        staged: dict[str, _NodeMemo] = {}  # committed only if every node translates (all-or-nothing)
        pairs: dict[Identity, CertPair] = {}  # certificates asked for in this call
        compared: dict[tuple[int, int], bool] = {}  # nodes' memos share their tuples: compare each pair once
        changed_names: dict[tuple[int, int, bool], tuple[str, ...]] = {}  # (old service map, old targets) -> CLAs to rebuild
        # stock flavor: nodes share their service clusters and CLAs (the heads of CDS and EDS), so
        # a head patched on one node is reused by the next with the same old head
        heads: dict[tuple[object, ...], tuple[list, list, dict]] = {}

        def same(old: Any, new: Any) -> bool:
            k = (id(old), id(new))
            if k not in compared:
                compared[k] = old is new or old == new
            return compared[k]

        for node in wanted:
            view = index.node_view(node)
            memo = self._memo.get(node)
            local = tuple(shape_of(wl) for wl in view.local_workloads)
            pol = _policy_shape(view)
            moved = memo is not None and not same(memo.workloads, workloads)  # a pod elsewhere came, went or changed
            reshaped = memo is not None and not same(memo.shapes, shapes)  # a service or port came, went or changed
            repoliced = memo is not None and memo.policy != pol  # the policies selecting this node's pods changed
            if memo is None or memo.local != local or ((reshaped or moved or repoliced) and self.flavor is not Flavor.ENVOY):
                staged[node] = self._full(view, local, pol, workloads, shapes)
                out[node] = staged[node].resources
                stats.full.append(node)
                stats.deltas[node] = resource_delta(memo.resources if memo else None, out[node])
                continue
            new_map = self._service_map(view) if reshaped else memo.cla_targets
            key = (id(memo.cla_targets), id(memo.targets), reshaped)
            if key not in changed_names:
                changed_names[key] = self._changed_names(memo.cla_targets, memo.targets, new_map, targets, reshaped)
            changed = changed_names[key]
            secrets = self._secrets(view.local_identities, pairs)
            if not changed and not moved and not reshaped and not repoliced and secrets == memo.secrets:
                staged[node] = replace(memo, targets=targets, workloads=workloads, shapes=shapes)
                out[node] = memo.resources
                stats.untouched.append(node)
                continue
            res = dict(memo.resources)
            delta: dict[str, dict[str, bytes | None]] = {}
            n = 0
            if (moved or reshaped) and view.local_identities:
                # stock flavor: of everything a node has, only stage 2 depends on other nodes' pods and on services
                stage2 = build_dispatch_listener(view)
                hit = self._stage2_bytes(stage2)
                lds = dict(res[LDS])
                if not same(lds[OUTBOUND_DISPATCH], hit[1]):  # nodes share both bytes objects: one 2 MB compare
                    lds[OUTBOUND_DISPATCH] = hit[1]
                    res[LDS] = list(lds.items())
                    delta[LDS] = {OUTBOUND_DISPATCH: hit[1]}
            if repoliced:  # stock flavor: policy lives in the pods' RDS routes and the plaintext chains only
                self._patch_policy(view, res, delta)
            if reshaped:  # service clusters lead CDS in service-map order; one CLA per service cluster
                old_cds = res[CDS]
                old_head = old_cds[: len(memo.cla_targets)]
                hkey = (CDS, id(memo.cla_targets), id(new_map))
                shared_head = heads.get(hkey)
                if shared_head is None or shared_head[0] != old_head:  # list ==: identical items compare by identity
                    bodies = dict(old_head)
                    cds = {name: self._service_cluster_bytes(name) for name in new_map if name not in bodies}
                    cds.update((name, None) for name in bodies if name not in new_map)
                    shared_head = heads[hkey] = (old_head, [(name, bodies.get(name) or self._service_cluster_bytes(name)) for name in new_map], cds)
                res[CDS] = shared_head[1] + old_cds[len(memo.cla_targets):]
                if shared_head[2]:
                    delta[CDS] = dict(shared_head[2])
            tail = len(memo.table.groups) if memo.table is not None else 0  # the pod tables close EDS
            head = res[EDS][: len(res[EDS]) - tail] if changed or reshaped else []
            hkey = (EDS, id(memo.cla_targets), id(new_map), id(changed))
            shared_head = heads.get(hkey) if self.flavor is Flavor.ENVOY and (changed or reshaped) else None
            if shared_head is not None and shared_head[0] == head:  # stock: the service CLAs are the same on every node
                res[EDS] = shared_head[1] + (memo.resources[EDS][-tail:] if tail else [])
                if shared_head[2]:
                    delta[EDS] = dict(shared_head[2])
                n += len(changed)
            elif changed or reshaped:
                clas = dict(head)
                eds: dict[str, bytes | None] = {}
                for name in changed:
                    lis, i = new_map[name]
                    t = targets[i]
                    host = node_variant(lis, t, node)  # istio-2022: the same-node capture port differs
                    k = (name, i, host)
                    body = cla_memo.get(k)
                    if body is None:
                        body = cla_memo[k] = cla_body(name, lis, t, node)
                        stats.clas_built += 1
                    if clas.get(name) != body:
                        eds[name] = body
                    clas[name] = body
                    n += 1
                if reshaped:
                    for name in [name for name in clas if name not in new_map]:
                        del clas[name]
                        eds[name] = None
                    res[EDS] = [(name, clas[name]) for name in new_map]
                else:
                    res[EDS] = list(clas.items())
                if self.flavor is Flavor.ENVOY:
                    heads[hkey] = (head, list(res[EDS]), dict(eds))
                if tail:
                    res[EDS] += memo.resources[EDS][-tail:]
                if eds:
                    delta[EDS] = eds
            table = memo.table
            if moved and table is not None:
                table = pod_table(view.workloads, view.mesh)
                if table is not memo.table:
                    n += self._patch_tables(memo.table, table, res, delta)  # type: ignore[arg-type]
            if secrets != memo.secrets:  # certificate rotation: same names, new bodies
                res[SDS] = [(name, secrets[ident]) for (name, _), ident in zip(res[SDS], [*view.local_identities, None])]
                old_sds = dict(memo.resources[SDS])
                delta[SDS] = {name: body for name, body in res[SDS] if old_sds.get(name) != body}
            staged[node] = replace(memo, resources=res, targets=targets, workloads=workloads, shapes=shapes, secrets=secrets,
                                   cla_targets=new_map, policy=pol, table=table)
            out[node] = res
            stats.patched[node] = n
            if delta:
                stats.deltas[node] = delta
        self._memo.update(staged)
        if nodes is None:
            for gone in sorted(set(self._memo) - set(wanted)):
                del self._memo[gone]
                stats.removed.append(gone)
        self._shared_bytes.clear()  # the bytes live on in the resource sets
        self._cluster_bytes.clear()
        self.stats = stats
        return out

    def patch_backends(self, index: MeshIndex, previous: MeshIndex, positions: tuple[int, ...]) -> dict[str, ResourceSet] | None:
        """Every node's resources after only the backends of ``index.targets[positions]`` changed
        (``index`` patched from ``previous``, the index of the last :meth:`snapshots` call; nodes,
        workload shapes, services and policies the same): only those targets' CLAs are rebuilt,
        once per body, with no per-node view or shape comparison. None if the memos are not
        those of ``previous`` (the caller then runs :meth:`snapshots`). Certificates are not
        looked at: the caller takes this path only when no rotation is due."""
        old_targets, targets = previous.targets, index.targets
        if set(self._memo) != set(index.node_names) or any(m.targets is not old_targets for m in self._memo.values()):
            return None
        stats = RunStats()
        wanted = set(positions)
        names_of: dict[int, list[tuple[str, str, int]]] = {}  # id(service map) -> [(CLA name, listener, target)]
        pos_of: dict[int, dict[str, int]] = {}  # id(service map) -> CLA name -> position in a node's EDS list
        cla_memo: dict[tuple[str, int, str], bytes] = {}
        staged: dict[str, _NodeMemo] = {}
        out: dict[str, ResourceSet] = {}
        for node, memo in self._memo.items():
            key = id(memo.cla_targets)
            names = names_of.get(key)
            if names is None:
                names = names_of[key] = [(name, lis, i) for name, (lis, i) in memo.cla_targets.items() if i in wanted] if wanted else []
            if not names:
                staged[node] = replace(memo, targets=targets)
                out[node] = memo.resources
                stats.untouched.append(node)
                continue
            eds = list(memo.resources[EDS])
            pos = pos_of.get(key)
            if pos is None:
                pos = pos_of[key] = {name: j for j, (name, _) in enumerate(eds)}
            delta: dict[str, bytes | None] = {}
            for name, lis, i in names:
                t = targets[i]
                host = node_variant(lis, t, node)  # istio-2022: the same-node capture port differs
                body = cla_memo.get((name, i, host))
                if body is None:
                    body = cla_memo[(name, i, host)] = cla_body(name, lis, t, node)
                    stats.clas_built += 1
                j = pos.get(name)
                if j is None or j >= len(eds) or eds[j][0] != name:  # another EDS order on this node
                    j = next((k for k, (n, _) in enumerate(eds) if n == name), -1)
                    if j < 0:
                        return None  # nothing committed yet: the caller translates
                if eds[j][1] != body:
                    eds[j] = (name, body)
                    delta[name] = body
            res = dict(memo.resources)
            res[EDS] = eds
            staged[node] = replace(memo, resources=res, targets=targets)
            out[node] = res
            stats.patched[node] = len(names)
            if delta:
                stats.deltas[node] = {EDS: delta}
        self._memo.update(staged)
        self.stats = stats
        return out

    def fork(self) -> "IncrementalTranslator":
        """A translator that starts from this one's memos (which are never mutated in place), so
        a benchmark can apply several alternative changes to one base state."""
        other = IncrementalTranslator(self.flavor, self.certs, check=self.check)
        other._memo, other._mesh = dict(self._memo), self._mesh
        other._secret_bytes, other._root_bytes = dict(self._secret_bytes), self._root_bytes
        return other

    def forget(self, node: str) -> None:
        self._memo.pop(node, None)

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _changed_names(old_map: dict[str, tuple[str, int]], old_targets: tuple[ServiceTarget, ...],
                       new_map: dict[str, tuple[str, int]], new_targets: tuple[ServiceTarget, ...],
                       reshaped: bool) -> tuple[str, ...]:
        """Service clusters (= CLAs) to rebuild, in service-map order. Same shapes: those whose
        target's backends changed (identical target objects are skipped without comparing).
        Reshaped (services or ports changed): also new names and names now backed by a target of
        another shape, matched by name because targets' positions shift when one comes or goes."""
        if not reshaped:
            idx = {i for i, (a, b) in enumerate(zip(old_targets, new_targets)) if a is not b and a.backends != b.backends}
            return tuple(name for name, (_, i) in new_map.items() if i in idx) if idx else ()
        out = []
        for name, (lis, i) in new_map.items():
            was = old_map.get(name)
            if was is None or was[0] != lis:
                out.append(name)
                continue
            a, b = old_targets[was[1]], new_targets[i]
            if a is not b and (a.backends != b.backends or _shape(a) != _shape(b)):
                out.append(name)
        return tuple(out)

    def _service_map(self, view: NodeView) -> dict[str, tuple[str, int]]:
        """:func:`service_clusters`, one dict for every node it is the same on (stock flavor: all
        nodes with mesh pods), so per-node memos share it and changes are worked out once."""
        if self.flavor is not Flavor.ENVOY or not view.local_identities:
            return service_clusters(view, self.flavor)
        last = self._last_service_map
        if last is None or last[0] is not view.targets:
            last = self._last_service_map = (view.targets, service_clusters(view, self.flavor))
        return last[1]

    def _service_cluster_bytes(self, name: str) -> bytes:
        """A service cluster depends on its name only; built once per name and call, shared by every node."""
        hit = self._cluster_bytes.get(name)
        if hit is None:
            hit = self._cluster_bytes[name] = build_service_cluster(name).SerializeToString(deterministic=True)
        return hit

    def _secrets(self, identities: tuple[Identity, ...], pairs: dict[Identity, CertPair] | None = None) -> dict[Identity | None, bytes]:
        """Workload secrets by identity and the root bundle (key None), in translate()'s order.
        Bytes are reused while an identity's certificate is the same (rotation makes a new one);
        ``pairs`` asks the CA once per identity per call, not once per node."""
        pairs = {} if pairs is None else pairs
        out: dict[Identity | None, bytes] = {}
        for ident in identities:
            pair = pairs.get(ident)
            if pair is None:
                pair = pairs[ident] = self.certs.workload(ident)
            hit = self._secret_bytes.get(ident)
            if hit is None or (hit[0] is not pair and hit[0] != pair):
                hit = self._secret_bytes[ident] = (pair, build_workload_secret(ident, pair).SerializeToString(deterministic=True))
            out[ident] = hit[1]
        root = self.certs.root_pem()
        if self._root_bytes is None or self._root_bytes[0] != root:
            self._root_bytes = (root, build_root_secret(root).SerializeToString(deterministic=True))
        out[None] = self._root_bytes[1]
        return out

    def _patch_policy(self, view: NodeView, res: ResourceSet, delta: dict[str, dict[str, bytes | None]]) -> None:
        """A policy change, stock flavor: rebuild the pods' RouteConfigurations (HBONE: the RBAC
        per route) and the plaintext inbound listener (network RBAC); the HBONE chains, whose
        replacement would drain for minutes, keep their bytes."""
        plain = build_ztunnel_inbound_plaintext(view, self.flavor)
        fresh = {LDS: [(plain.name, plain.SerializeToString(deterministic=True))],
                 RDS: [(r.name, r.SerializeToString(deterministic=True)) for r in build_inbound_routes(view, self.flavor)]}
        for url, items in fresh.items():
            bodies = dict(res[url])
            d = {name: body for name, body in items if bodies.get(name) != body}
            if d:
                bodies.update(d)
                res[url] = list(bodies.items())
                delta[url] = d

    def _patch_tables(self, old: PodTable, new: PodTable, res: ResourceSet, delta: dict[str, dict[str, bytes | None]]) -> int:
        """Swap the pod tables closing CDS and EDS from ``old``'s groups to ``new``'s; the delta
        names only groups whose bytes changed (a group with the same rows is the very same
        object, so most are skipped by identity). Returns how many of its CLAs changed."""
        k, changed = len(old.groups), 0
        for url, fresh in ((CDS, [(g.name, self._table_cluster_bytes(g)) for g in new.groups]),
                           (EDS, [(g.name, g.cla_body) for g in new.groups])):
            items = res[url]
            before = dict(items[len(items) - k:]) if k else {}
            d: dict[str, bytes | None] = {}
            for j, (name, body) in enumerate(fresh):
                was = before.pop(name, None)
                if was is None or (was is not body and was != body):
                    d[name] = body
                elif was is not body:
                    fresh[j] = (name, was)  # equal bytes: keep the object every node already shares
            res[url] = (items[: len(items) - k] if k else list(items)) + fresh
            d.update((name, None) for name in before)
            if d:
                delta.setdefault(url, {}).update(d)
            if url == EDS:
                changed = len(d)
        return changed

    def _stage2_bytes(self, stage2: Any) -> tuple[Any, bytes]:
        """Stage 2's bytes, serialized once while it is the same message (a pod within its /24
        leaves it as it was)."""
        hit = self._stage2
        if hit is None or hit[0] is not stage2:
            hit = self._stage2 = (stage2, stage2.SerializeToString(deterministic=True))
        return hit

    def _table_cluster_bytes(self, g: Any) -> bytes:
        hit = self._table_clusters.get(g.name)
        if hit is None or hit[0] is not g.cluster:
            if len(self._table_clusters) > 1 << 14:
                self._table_clusters.clear()
            hit = self._table_clusters[g.name] = (g.cluster, g.cluster.SerializeToString(deterministic=True))
        return hit[1]

    def _full(self, view: NodeView, local: tuple[tuple[Any, ...], ...], pol: tuple[Any, ...],
              workloads: tuple[tuple[Any, ...], ...], shapes: tuple[tuple[Any, ...], ...]) -> _NodeMemo:
        res = translate(view, self.flavor, self.certs, check=self.check)
        stage2 = next((lis for lis in res.listeners if lis.name == OUTBOUND_DISPATCH), None)
        if stage2 is not None:  # one bytes object for every node, patched or translated
            self._shared_bytes[id(stage2)] = self._stage2_bytes(stage2)
        rs = serialize(res, self._shared_bytes)
        cla_targets = self._service_map(view)
        secrets = {ident: body for ident, (_, body) in zip([*view.local_identities, None], rs[SDS])}
        table = pod_table(view.workloads, view.mesh) if self.flavor is Flavor.ENVOY and view.local_identities else None
        return _NodeMemo(local, pol, workloads, shapes, view.targets, rs, cla_targets, secrets, table)


def resource_delta(old: ResourceSet | None, new: ResourceSet) -> dict[str, dict[str, bytes | None]]:
    """{type URL: {name: new bytes, or None when removed}} from ``old`` to ``new``; a type whose
    list is the very same object is skipped unread (for nodes translated from scratch)."""
    old = old or {}
    out: dict[str, dict[str, bytes | None]] = {}
    for url in sorted({*old, *new}):
        a, b = old.get(url, []), new.get(url, [])
        if a is b:
            continue
        before = dict(a)
        d: dict[str, bytes | None] = {}
        for name, body in b:
            was = before.pop(name, None)
            if was is None or (was is not body and was != body):
                d[name] = body
        d.update((name, None) for name in before)
        if d:
            out[url] = d
    return out


def messages_equal(a: ResourceSet, b: ResourceSet) -> bool:
    """Same types, names, order and bytes (for tests and the benchmark's self-check)."""
    return {k: list(v) for k, v in a.items()} == {k: list(v) for k, v in b.items()}


__all__ = ["IncrementalTranslator", "RunStats", "ResourceSet", "serialize", "messages_equal", "resource_delta"]
