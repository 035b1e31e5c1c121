"""Synthetic clusters in memory and the change events the benchmarks apply to them."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

from xdsserver import synth
from xdsserver.model.index import MeshIndex
from xdsserver.sources import SourceObject, replaced_positions
from xdsserver.sources.objects import ValidationMemo, build_model


@dataclass(frozen=True)
class Scale:
    name: str
    nodes: int
    pods: int
    services: int
    seed: int = 1
    # bounded work where a full measurement is infeasible (documented in the output as "projected")
    sample_nodes: int | None = None  # translate only this many nodes and project to all
    load_m: tuple[int, ...] = (10, 100)
    load_repeats: int = 2
    run_load: bool = True
    identity_sample: int | None = None  # 2022-layout bytes: per-identity sample (None: every identity)
    # load-harness pipelines: "incremental" is what the server runs; "today" (every node translated
    # on every change) is the baseline for comparison, too slow to repeat at large scale
    load_pipelines: tuple[str, ...] = ("today", "incremental")


SCALES = {
    "small": Scale("small", 10, 300, 100),
    "large": Scale("large", 100, 10_000, 1_000, identity_sample=4, load_pipelines=("incremental",)),
}


def objects_for(scale: Scale) -> list[dict[str, Any]]:
    files = synth.generate(synth.Shape(scale.nodes, scale.pods, scale.services, scale.seed))
    return [o for name in synth.FILES for o in files[name]]


def index_of(objs: list[dict[str, Any]], memo: ValidationMemo | None = None, *, feed: "ObjectFeed | None" = None,
             previous: MeshIndex | None = None) -> MeshIndex:
    """Model + index, with the lookups translation needs computed here (they are model work).
    With ``feed``, ``memo`` and ``previous`` this is the server's per-event model work."""
    sos = feed(objs) if feed is not None else [SourceObject("synth", o) for o in objs]
    index = MeshIndex(build_model(sos, memo=memo), previous)
    index.targets, index.workloads_by_node  # noqa: B018 (cached properties)
    return index


class ObjectFeed:
    """Objects as a source hands them to the pipeline: the very same :class:`SourceObject` for an
    object that did not change (as the Kubernetes source's cache does), a new one for a new or
    replaced object. Events below replace changed objects and share the rest."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[dict[str, Any], SourceObject]] = {}
        self._list: tuple[list[dict[str, Any]], list[SourceObject]] | None = None

    def __call__(self, objs: list[dict[str, Any]]) -> list[SourceObject]:
        positions = replaced_positions(self._list[0], objs, 64) if self._list is not None else None
        if positions is not None and self._list is not None:
            # objects replaced in place (as watch events do): new SourceObjects for those only
            out = list(self._list[1])
            for i in positions:
                hit = self._last.get(id(objs[i]))
                out[i] = hit[1] if hit is not None and hit[0] is objs[i] else SourceObject("synth", objs[i])
                self._last[id(objs[i])] = (objs[i], out[i])
            self._list = (list(objs), out)
            return out
        out = self._full(objs)
        self._list = (list(objs), out)
        return out

    def _full(self, objs: list[dict[str, Any]]) -> list[SourceObject]:
        nxt: dict[int, tuple[dict[str, Any], SourceObject]] = {}
        out = []
        for o in objs:
            hit = self._last.get(id(o))
            so = hit[1] if hit is not None and hit[0] is o else SourceObject("synth", o)
            nxt[id(o)] = (o, so)
            out.append(so)
        self._last = nxt
        return out

    def copy(self) -> "ObjectFeed":
        other = ObjectFeed()
        other._last = dict(self._last)
        other._list = self._list
        return other


# -- events: each returns (new objects, a description) and leaves the input untouched: changed
# objects are replaced by changed copies, unchanged ones are shared (per-object events) ------------
def _pods(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "Pod" and o["metadata"]["namespace"] != "istio-system"]


def _first_served_pod(objs: list[dict[str, Any]], index: MeshIndex) -> dict[str, Any]:
    """A ready, enrolled pod behind a service with a VIP (its endpoint shows up in EDS)."""
    served = {b.pod for t in index.targets for b in t.backends if b.identity is not None}
    for o in _pods(objs):
        if f"{o['metadata']['namespace']}/{o['metadata']['name']}" in served:
            return o
    raise RuntimeError("synthetic cluster has no served pod")


def pod_added(objs: list[dict[str, Any]], index: MeshIndex) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    new = list(objs)
    tmpl = copy.deepcopy(_first_served_pod(new, index))
    node = tmpl["spec"]["nodeName"]
    used = {o["status"]["podIP"] for o in new if o["kind"] == "Pod"}
    net = synth.node_cidr(int(node.split("-")[1]))
    ip = next(str(a) for a in list(net.hosts())[::-1] if str(a) not in used)
    tmpl["metadata"]["name"] += "-bench"
    tmpl["metadata"]["uid"] = "00000000-0000-4000-8000-0000000be0c1"
    tmpl["status"]["podIP"] = ip
    tmpl["status"]["podIPs"] = [{"ip": ip}]
    new.append(tmpl)
    return new, {"pod": f"{tmpl['metadata']['namespace']}/{tmpl['metadata']['name']}", "node": node, "ip": ip,
                 "app": tmpl["metadata"]["labels"]["app"]}


def endpoint_unready(objs: list[dict[str, Any]], index: MeshIndex) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    new = list(objs)
    was = _first_served_pod(new, index)
    pod = copy.deepcopy(was)
    new[next(i for i, o in enumerate(new) if o is was)] = pod
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    return new, {"pod": f"{pod['metadata']['namespace']}/{pod['metadata']['name']}", "node": pod["spec"]["nodeName"],
                 "ip": pod["status"]["podIP"], "app": pod["metadata"]["labels"]["app"]}


def service_added(objs: list[dict[str, Any]], index: MeshIndex) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    new = list(objs)
    svc = next(o for o in new if o["kind"] == "Service" and o["spec"].get("clusterIP") not in (None, "None"))
    added = copy.deepcopy(svc)
    added["metadata"]["name"] = "bench-added"
    added["metadata"]["uid"] = "00000000-0000-4000-8000-000000000add"
    added["metadata"]["creationTimestamp"] = "2030-01-01T00:00:00Z"
    ip = synth.service_ip(60000)
    added["spec"]["clusterIP"], added["spec"]["clusterIPs"] = ip, [ip]
    new.append(added)
    return new, {"service": f"{added['metadata']['namespace']}/bench-added", "selector": added["spec"]["selector"], "vip": ip}


def irrelevant_change(objs: list[dict[str, Any]], index: MeshIndex) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A pod in a namespace not enrolled in ambient, selected by no service: no ztunnel depends on it."""
    new = list(objs)
    enrolled = {ns for ns in {o["metadata"]["namespace"] for o in new if o["kind"] == "Pod"} if index.namespace_enrolled(ns)}
    ns_objs = [o for o in new if o["kind"] == "Namespace" and o["metadata"]["name"] not in enrolled
               and o["metadata"]["name"] not in index.mesh.excluded_namespaces]
    ns = ns_objs[0]["metadata"]["name"] if ns_objs else "bench-unenrolled"
    if not ns_objs:
        new.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    node = synth.node_name(0)
    used = {o["status"]["podIP"] for o in new if o["kind"] == "Pod"}
    ip = next(str(a) for a in list(synth.node_cidr(0).hosts())[::-1] if str(a) not in used)
    new.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bench-batch-job", "namespace": ns, "labels": {"app": "bench-batch-job"}},
        "spec": {"nodeName": node, "containers": [{"name": "job", "image": "example/job"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
    })
    return new, {"pod": f"{ns}/bench-batch-job", "namespace": ns, "enrolled": False}


EVENTS = {
    "pod_added": pod_added,
    "endpoint_unready": endpoint_unready,
    "service_added": service_added,
    "irrelevant_namespace": irrelevant_change,
}


def random_node(index: MeshIndex, seed: int) -> str:
    return random.Random(seed).choice(index.node_names)
