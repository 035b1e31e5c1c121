"""Indexes over a :class:`Model` and the per-node view the translator reads.

The index answers the lookups the 2022 generator did by scanning (style.md §5.4 smell 1):
workloads by node, by identity and by IP, endpoints by service port. It also fixes every order
once (ztunnel-config.md D3), so translation is a pure function of (NodeView, flavor, certs).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache

from . import Endpoint, Identity, MeshConfig, Model, Pod, Service, ServicePort
from .policy import AuthorizationPolicy, PeerAuthentication, applicable, selects

POD_OPT_OUT_VALUE = "none"


@dataclass(frozen=True, slots=True)
class Workload:
    """An enrolled (ambient) pod: a source of captured traffic and an HBONE destination."""

    pod: Pod
    identity: Identity

    @property
    def ip(self) -> str:
        return self.pod.ip

    @property
    def node_name(self) -> str:
        return self.pod.node_name

    @property
    def key(self) -> str:
        return self.pod.key


@dataclass(frozen=True, slots=True)
class Backend:
    """A ready endpoint of one service port, with the mesh identity behind its IP (if any)."""

    ip: str
    port: int
    node_name: str
    identity: Identity | None  # None: not in the mesh -> plain TCP, no tunnel
    pod: str = ""


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """One TCP port of one service with a VIP: a matcher entry and a cluster per local identity."""

    service: Service
    port: ServicePort
    hostname: str
    backends: tuple[Backend, ...]  # sorted by (ip, port)


@dataclass(frozen=True, slots=True)
class NodeView:
    """Everything one ztunnel may see, sorted once (style.md §5.2)."""

    node_name: str
    mesh: MeshConfig
    local_workloads: tuple[Workload, ...]  # enrolled pods on this node, by namespace/name
    local_identities: tuple[Identity, ...]  # identities of local workloads, sorted
    workloads: tuple[Workload, ...]  # every enrolled pod cluster-wide (pod-IP destinations)
    targets: tuple[ServiceTarget, ...]  # services by (creation, name.namespace), ports by (port, name)
    # L4 policy, only what selects a local workload (model/policy.py); empty: no RBAC emitted
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()


def service_sort_key(svc: Service) -> tuple[str, str]:
    """2022 order: creation time, then ``name.namespace`` (ztunnel-config.md §2)."""
    return (svc.creation_timestamp, f"{svc.name}.{svc.namespace}")


def workload_sort_key(wl: Workload) -> tuple[str, str]:
    return (wl.pod.namespace, wl.pod.name)


class MeshIndex:
    """Lookups over one immutable model; cheap to build, shared by every node's translation.

    ``previous`` (the index of the last good model) lets unchanged parts be the very same
    objects: a workload whose pod is the same object, a service target whose service, endpoints
    and backends' workloads are the same. Later stages then see what changed by identity
    (``is``) instead of comparing everything, so an endpoint change costs O(change) there."""

    def __init__(self, model: Model, previous: MeshIndex | None = None) -> None:
        self.model = model
        self.mesh = model.mesh
        self._ns_labels = {ns.name: dict(ns.labels) for ns in model.namespaces}
        self._previous = previous if previous is not None and previous.mesh == model.mesh and previous._ns_labels == self._ns_labels else None
        self._view_facts: dict[str, _ViewFacts] = {}
        self._previous_facts: dict[str, _ViewFacts] = {}
        if self._previous is not None:  # reuse now, then let the old index go (no chain of indexes)
            self.workloads, self.targets  # noqa: B018 (cached properties)
            if _same_policies(previous.model, model):
                self._previous_facts = previous._view_facts
            self._previous = None

    # cached lookups a patched index carries over (computed on the base index first)
    _LOOKUPS = ("workloads", "_workload_of_pod", "workloads_by_node", "workload_by_ip", "pods_by_node", "node_names",
                "endpoints", "targets", "_target_of", "_target_pos", "_workload_pos")

    def patched(self, model: Model, pods: Mapping[str, Pod], endpoints: Mapping[tuple[str, str], tuple[Endpoint, ...]]) -> tuple[MeshIndex, tuple[int, ...]]:
        """This index after pods changed only in readiness (``pods``: key -> new pod, same
        position, labels, IPs and node) and the endpoint lists ``endpoints`` were replaced: the
        new index and the positions in :attr:`targets` whose backends changed.

        O(change) but for C-level copies of the lookups (the old index stays valid): no pod
        is re-sorted, no enrollment re-evaluated, only the named service ports' backends rebuilt."""
        for name in self._LOOKUPS:
            getattr(self, name)
        new = MeshIndex.__new__(MeshIndex)
        new.model, new.mesh, new._ns_labels, new._previous = model, self.mesh, self._ns_labels, None
        new._view_facts, new._previous_facts = {}, self._view_facts if _same_policies(self.model, model) else {}
        d = new.__dict__
        for name in self._LOOKUPS:
            d[name] = self.__dict__[name]
        workloads, of_pod, by_ip = list(self.workloads), dict(self._workload_of_pod), dict(self.workload_by_ip)
        by_node, pods_by_node = dict(self.workloads_by_node), dict(self.pods_by_node)
        for key, pod in pods.items():
            i = self._workload_pos.get(key)
            node_pods = list(pods_by_node[pod.node_name])
            node_pods[next(j for j, p in enumerate(node_pods) if p.key == key)] = pod
            pods_by_node[pod.node_name] = tuple(node_pods)
            if i is None:
                continue  # not enrolled (enrollment does not depend on readiness)
            old = workloads[i]
            wl = workloads[i] = Workload(pod, old.identity)
            del of_pod[id(old.pod)]
            of_pod[id(pod)] = wl
            by_ip.update((ip, wl) for ip in pod.ips)
            local = list(by_node[pod.node_name])
            local[local.index(old)] = wl
            by_node[pod.node_name] = tuple(local)
        d.update(workloads=tuple(workloads), _workload_of_pod=of_pod, workload_by_ip=by_ip, workloads_by_node=by_node,
                 pods_by_node=pods_by_node)
        eps = d["endpoints"] = dict(self.endpoints)
        eps.update(endpoints)
        targets, target_of, changed = list(self.targets), dict(self._target_of), []
        for key in sorted(endpoints):
            i = self._target_pos.get(key)
            if i is None:
                continue  # no VIP or not TCP: no target
            was = targets[i]
            backends = new._backends(was.service, was.port)
            if backends != was.backends:
                targets[i] = target_of[key] = ServiceTarget(was.service, was.port, was.hostname, backends)
                changed.append(i)
        if changed:
            d.update(targets=tuple(targets), _target_of=target_of)
        return new, tuple(sorted(changed))

    # -- enrollment -------------------------------------------------------------------------
    def namespace_enrolled(self, namespace: str) -> bool:
        if namespace in self.mesh.excluded_namespaces:
            return False
        labels = self._ns_labels.get(namespace, {})
        return labels.get(self.mesh.enrollment_label) == self.mesh.enrollment_value

    def pod_enrolled(self, pod: Pod) -> bool:
        """Same predicate for xDS and for the node's ipset, so capture and config agree."""
        if not pod.ip or pod.host_network or pod.phase not in ("Running", ""):
            return False
        if pod.namespace in self.mesh.excluded_namespaces:
            return False
        value = pod.label_map.get(self.mesh.enrollment_label)
        if value == POD_OPT_OUT_VALUE:
            return False
        if value == self.mesh.enrollment_value:
            return True
        return self.namespace_enrolled(pod.namespace)

    def identity_of(self, pod: Pod) -> Identity:
        return Identity(self.mesh.trust_domain, pod.namespace, pod.service_account)

    # -- indexes ----------------------------------------------------------------------------
    @cached_property
    def workloads(self) -> tuple[Workload, ...]:
        prev = self._previous._workload_of_pod if self._previous is not None else {}
        wls = []
        for p in self.model.pods:
            hit = prev.get(id(p))
            if hit is not None and hit.pod is p:
                wls.append(hit)  # same pod object, same mesh and namespaces: same enrollment and identity
            elif self.pod_enrolled(p):
                wls.append(Workload(p, self.identity_of(p)))
        out = tuple(sorted(wls, key=workload_sort_key))
        if self._previous is not None and len(out) == len(self._previous.workloads) and all(
                a is b for a, b in zip(out, self._previous.workloads)):
            return self._previous.workloads  # nothing changed: the very same tuple
        return out

    @cached_property
    def _workload_pos(self) -> dict[str, int]:
        return {wl.key: i for i, wl in enumerate(self.workloads)}

    @cached_property
    def _target_pos(self) -> dict[tuple[str, str], int]:
        return {(t.service.key, t.port.name): i for i, t in enumerate(self.targets)}

    @cached_property
    def _workload_of_pod(self) -> dict[int, Workload]:
        return {id(wl.pod): wl for wl in self.workloads}

    @cached_property
    def workloads_by_node(self) -> dict[str, tuple[Workload, ...]]:
        out: dict[str, list[Workload]] = {}
        for wl in self.workloads:
            out.setdefault(wl.node_name, []).append(wl)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def workload_by_ip(self) -> dict[str, Workload]:
        out: dict[str, Workload] = {}
        for wl in self.workloads:
            for ip in wl.pod.ips:
                out[ip] = wl
        return out

    @cached_property
    def pods_by_node(self) -> dict[str, tuple[Pod, ...]]:
        out: dict[str, list[Pod]] = {}
        for p in self.model.pods:
            out.setdefault(p.node_name, []).append(p)
        return {k: tuple(sorted(v, key=lambda p: (p.namespace, p.name))) for k, v in out.items()}

    @cached_property
    def node_names(self) -> tuple[str, ...]:
        """Nodes from Node objects and from pods' ``spec.nodeName`` (Node objects are optional)."""
        names = {n.name for n in self.model.nodes} | {p.node_name for p in self.model.pods if p.node_name}
        return tuple(sorted(names))

    @cached_property
    def endpoints(self) -> dict[tuple[str, str], tuple[Endpoint, ...]]:
        return dict(self.model.endpoints)

    @cached_property
    def targets(self) -> tuple[ServiceTarget, ...]:
        prev = self._previous
        reuse = prev._target_of if prev is not None else {}
        out: list[ServiceTarget] = []
        for svc in sorted(self.model.services, key=service_sort_key):
            if svc.headless or svc.type == "ExternalName":
                continue  # no VIP: clients reach pods by IP (pod-IP keys), no 0.0.0.0 key (§12 cleanups)
            for port in svc.ports:
                if not port.is_tcp:
                    continue  # D5: UDP/SCTP are never captured (node rule N13)
                was = reuse.get((svc.key, port.name))
                if was is not None and prev is not None and was.service is svc and self._same_backends(prev, svc, port):
                    out.append(was)
                    continue
                out.append(ServiceTarget(svc, port, svc.hostname(self.mesh.cluster_domain), self._backends(svc, port)))
        if prev is not None and len(out) == len(prev.targets) and all(a is b for a, b in zip(out, prev.targets)):
            return prev.targets  # nothing changed: the very same tuple
        return tuple(out)

    @cached_property
    def _target_of(self) -> dict[tuple[str, str], ServiceTarget]:
        return {(t.service.key, t.port.name): t for t in self.targets}

    def _same_backends(self, prev: MeshIndex, svc: Service, port: ServicePort) -> bool:
        """The endpoints of (svc, port) and the workloads behind their IPs are what ``prev`` had."""
        key = (svc.key, port.name)
        eps, was = self.endpoints.get(key, ()), prev.endpoints.get(key, ())
        if eps != was:
            return False
        now, before = self.workload_by_ip, prev.workload_by_ip
        return all(now.get(ep.ip) is before.get(ep.ip) for ep in eps)

    def _backends(self, svc: Service, port: ServicePort) -> tuple[Backend, ...]:
        eps = self.endpoints.get((svc.key, port.name), ())
        seen: dict[tuple[str, int], Backend] = {}
        for ep in eps:
            if not ep.ready:
                continue
            wl = self.workload_by_ip.get(ep.ip)
            node = wl.node_name if wl else ep.node_name
            seen[(ep.ip, ep.port)] = Backend(ep.ip, ep.port, node, wl.identity if wl else None, ep.pod)
        return tuple(seen[k] for k in sorted(seen, key=lambda k: (_ip_sort(k[0]), k[1])))

    # -- views ------------------------------------------------------------------------------
    def node_view(self, node_name: str) -> NodeView:
        local = self.workloads_by_node.get(node_name, ())
        facts = self._view_facts.get(node_name)
        if facts is None or facts[0] is not local:
            facts = self._view_facts[node_name] = self._facts(node_name, local)
        return NodeView(
            node_name=node_name,
            mesh=self.mesh,
            local_workloads=local,
            local_identities=facts[1],
            workloads=self.workloads,
            targets=self.targets,
            authorization_policies=facts[2],
            peer_authentications=facts[3],
        )

    def _facts(self, node_name: str, local: tuple[Workload, ...]) -> _ViewFacts:
        """A node's identities and the policies selecting its pods. Taken from the previous
        index when the node's workloads are the very same objects and no policy changed (a pod
        added elsewhere touches every node's view, not its local part: ~0.3 ms a node)."""
        old = self._previous_facts.get(node_name)
        if old is not None and len(old[0]) == len(local) and all(a is b for a, b in zip(old[0], local)):
            return (local, *old[1:])
        return (
            local,
            tuple(sorted({wl.identity for wl in local})),
            self.local_policies(local),
            tuple(
                pa for pa in self.model.peer_authentications
                if any(pa.namespace in (wl.pod.namespace, self.mesh.root_namespace) and selects(pa.selector, wl.pod.label_map) for wl in local)
            ),
        )

    def local_policies(self, local: tuple[Workload, ...]) -> tuple[AuthorizationPolicy, ...]:
        """The policies that select at least one of these workloads (a policy selecting nothing
        here changes nothing here: incremental pushes follow from this)."""
        root = self.mesh.root_namespace
        chosen = {p.key: p for wl in local for p in applicable(self.model.authorization_policies, root, wl.pod.namespace, wl.pod.label_map)}
        return tuple(chosen[k] for k in sorted(chosen))

    def enrolled_pods_on(self, node_name: str) -> tuple[Pod, ...]:
        return tuple(wl.pod for wl in self.workloads_by_node.get(node_name, ()))


# node -> (its workloads, identities, authorization policies, peer authentications selecting them)
_ViewFacts = tuple


def _same_policies(a: Model, b: Model) -> bool:
    return a.authorization_policies == b.authorization_policies and a.peer_authentications == b.peer_authentications


@lru_cache(maxsize=1 << 17)
def _ip_sort(ip: str) -> tuple[int, int]:
    """Numeric address order (string order would put 10.244.1.23 before 10.244.1.3)."""
    a = ipaddress.ip_address(ip)
    return (a.version, int(a))
