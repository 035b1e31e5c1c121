"""Pod readiness changes as patches of the last model (issue 13: an endpoint change is O(change)).

The most frequent change in a cluster is a pod becoming ready or unready. A full
:func:`~xdsserver.sources.objects.build_model` walks every object and re-sorts every pod for it;
here the source objects are compared with the last published ones by identity (the sources hand
the very same :class:`SourceObject` for an unchanged object), and when every changed object is a
Pod whose conversion differs from the published pod in ``ready`` alone, the model is patched:
that pod replaced in place, the ``ready`` flag flipped on the endpoints its selector Services
derived from it. An EndpointSlice edited in place (same Service, same ports: how the Kubernetes
endpoint-slice controller reports readiness and scaling) re-derives just that Service's endpoints
from its slices. Anything else (a new, removed or reshaped object, an invalid one, a port that
came or went) returns ``None`` and the caller builds the model in full, which stays the reference
(tests/test_incremental.py compares both after every event).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..model import Endpoint, Model, Pod, Service
from ..model.index import MeshIndex
from . import SourceObject, replaced_positions
from .objects import (SERVICE_NAME_LABEL, ValidationMemo, _endpoints_from_slice, _pod, _selects,
                      _slice_address_errors, validate_object)

MAX_CHANGED = 64  # more changed objects than this: a full build is as cheap


@dataclass(frozen=True)
class ReadinessPatch:
    """The patched model and index, and what later stages need to know about the change."""

    model: Model
    index: MeshIndex
    targets: tuple[int, ...]  # positions in index.targets whose backends changed
    new_ready_nodes: set[str]  # as ordering.new_endpoint_nodes(old model, new model)
    slice_keys: tuple[tuple[str, str], ...] = ()  # endpoint keys re-derived from changed EndpointSlices


class ReadinessPatcher:
    """Holds the last published (objects, model, index) and the lookups a patch needs."""

    def __init__(self) -> None:
        self._objects: list[SourceObject] | None = None
        self._duplicates = False
        self._model: Model | None = None
        self._index: MeshIndex | None = None

    def rebase(self, objects: list[SourceObject], model: Model, index: MeshIndex) -> None:
        """After a full build was published: the new base, and lookups built once (O(objects))."""
        self._objects, self._model, self._index = list(objects), model, index
        refs = [so.ref for so in objects if so.kind in ("Pod", "EndpointSlice")]
        # a duplicated Pod or slice (rejected, lenient sources) would patch the accepted one: no patches then
        self._duplicates = len(refs) != len(set(refs))
        sliced = {_slice_service(so.obj) for so in objects if so.kind == "EndpointSlice" and isinstance(so.obj, dict)}
        # selector Services whose endpoints are derived from pods (a Service with slices is not)
        self._selecting: dict[str, list[Service]] = {}
        for svc in model.services:
            if svc.selector and svc.key not in sliced:
                self._selecting.setdefault(svc.namespace, []).append(svc)
        self._slices: dict[str, list[int]] = {}  # Service key -> positions of its EndpointSlices
        for i, so in enumerate(objects):
            if so.kind == "EndpointSlice" and isinstance(so.obj, dict):
                self._slices.setdefault(_slice_service(so.obj), []).append(i)
        self._services = {svc.key: svc for svc in model.services}
        self._pod_pos = {p.key: i for i, p in enumerate(model.pods)}
        self._ep_pos = {k: i for i, (k, _) in enumerate(model.endpoints)}
        self._svc_keys: dict[str, set[tuple[str, str]]] = {}
        for k in self._ep_pos:
            self._svc_keys.setdefault(k[0], set()).add(k)
        self._ip_keys: dict[str, list[tuple[str, str]]] = {}
        for k, eps in model.endpoints:
            for e in eps:
                self._ip_keys.setdefault(e.ip, []).append(k)
        index.patched(model, {}, {})  # computes the index lookups now, not during the first patch

    def advance(self, objects: list[SourceObject], patch: ReadinessPatch) -> None:
        """After a patch was published: positions are unchanged; new endpoint addresses noted."""
        self._objects, self._model, self._index = list(objects), patch.model, patch.index
        for k in patch.slice_keys:
            for e in patch.model.endpoints[self._ep_pos[k]][1]:
                keys = self._ip_keys.setdefault(e.ip, [])
                if k not in keys:
                    keys.append(k)

    def patch(self, objects: list[SourceObject], memo: ValidationMemo | None = None) -> ReadinessPatch | None:
        old_objs, model, index = self._objects, self._model, self._index
        if old_objs is None or model is None or index is None or self._duplicates:
            return None
        positions = replaced_positions(old_objs, objects, MAX_CHANGED)
        if positions is None:
            return None
        pods: dict[str, Pod] = {}
        sliced: set[str] = set()  # Services whose EndpointSlices changed
        for i in positions:
            if old_objs[i].kind == "EndpointSlice":
                svc = self._same_service_slice(old_objs[i], objects[i], memo)
                if svc is None:
                    return None
                sliced.add(svc)
                continue
            new = self._ready_only(old_objs[i], objects[i], memo)
            if new is None:
                return None
            if new is not model.pods[self._pod_pos[new.key]]:
                pods[new.key] = new
        all_pods = list(model.pods)
        endpoints: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
        all_eps = list(model.endpoints)
        flipped: list[Endpoint] = []
        for key in sorted(sliced):
            derived = self._slice_endpoints(key, objects, memo)
            if derived is None:
                return None
            for k, eps in derived.items():
                j = self._ep_pos[k]
                before = {e.ip for e in all_eps[j][1] if e.ready}
                flipped += [e for e in eps if e.ready and e.ip not in before]
                endpoints[k] = eps
                all_eps[j] = (k, eps)
        for key, pod in pods.items():
            all_pods[self._pod_pos[key]] = pod
            for svc in self._selecting.get(pod.namespace, ()):
                if not _selects(svc.selector, pod):
                    continue
                for port in svc.ports:
                    k = (svc.key, port.name)
                    j = self._ep_pos.get(k)
                    if j is None:
                        continue
                    eps = list(endpoints.get(k, all_eps[j][1]))
                    for n, e in enumerate(eps):
                        if e.pod == key and e.ready != pod.ready:
                            eps[n] = replace(e, ready=pod.ready)
                            if pod.ready:
                                flipped.append(eps[n])
                    endpoints[k] = tuple(eps)
                    all_eps[j] = (k, endpoints[k])
        new_model = replace(model, pods=tuple(all_pods), endpoints=tuple(all_eps))
        new_index, targets = index.patched(new_model, pods, endpoints)
        slice_keys = tuple(k for k in endpoints if k[0] in sliced)
        return ReadinessPatch(new_model, new_index, targets, self._new_ready_nodes(flipped, new_model), slice_keys)

    def _same_service_slice(self, old: SourceObject, new: SourceObject, memo: ValidationMemo | None) -> str | None:
        """The Service key if ``old`` and ``new`` are valid versions of one EndpointSlice of one
        Service the model serves; None for anything else (a full build then)."""
        if new.kind != "EndpointSlice" or old.ref != new.ref or old.origin != new.origin or not isinstance(new.obj, dict):
            return None
        if not (self._valid_slice(old, memo) and self._valid_slice(new, memo)):
            return None
        key = _slice_service(new.obj)
        return key if key == _slice_service(old.obj) and key in self._services else None

    @staticmethod
    def _valid_slice(so: SourceObject, memo: ValidationMemo | None) -> bool:
        """What build_model requires of a slice to use it (schema, addresses, the Service label)."""
        if (memo.validate(so) if memo is not None else validate_object(so)) or _slice_address_errors(so):
            return False
        return bool(((so.obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL))

    def _slice_endpoints(self, key: str, objects: list[SourceObject], memo: ValidationMemo | None) -> dict[tuple[str, str], tuple[Endpoint, ...]] | None:
        """A sliced Service's endpoints from its valid slices, as build_model derives them; None
        if its (service, port) keys differ from the model's (a port came or went: full build)."""
        svc = self._services[key]
        slices = [objects[i] for i in self._slices.get(key, ()) if objects[i].kind == "EndpointSlice" and self._valid_slice(objects[i], memo)]
        out: dict[tuple[str, str], list[Endpoint]] = {}
        for sl in sorted(slices, key=lambda s: s.obj["metadata"]["name"]):
            _endpoints_from_slice(sl, svc, out)
        if set(out) != self._svc_keys.get(key, set()):
            return None
        return {k: tuple(sorted(v, key=lambda e: (e.ip, e.port))) for k, v in out.items()}

    def _ready_only(self, old: SourceObject, new: SourceObject, memo: ValidationMemo | None) -> Pod | None:
        """The converted new pod if ``new`` is ``old`` with another readiness (or the very same
        published pod if nothing the model keeps changed); None for any other change."""
        if old.kind != "Pod" or new.kind != "Pod" or old.origin != new.origin or not isinstance(new.obj, dict) or old.ref != new.ref:
            return None
        assert self._model is not None
        i = self._pod_pos.get(old.ref.removeprefix("Pod "))
        if i is None:  # the old object was not in the model (rejected): its neighbours may change
            return None
        if (memo.validate(new) if memo is not None else validate_object(new)):
            return None
        published = self._model.pods[i]
        try:
            pod = _pod(new.obj)
        except (KeyError, TypeError, ValueError):
            return None
        if pod == published:
            return published
        return pod if replace(published, ready=pod.ready) == pod else None

    def _new_ready_nodes(self, flipped: list[Endpoint], new_model: Model) -> set[str]:
        """Nodes hosting an address that became a ready endpoint and was none before."""
        assert self._model is not None
        old_eps = self._model.endpoints
        out = set()
        for e in flipped:
            if not e.node_name:
                continue
            before = any(x.ip == e.ip and x.ready for k in self._ip_keys.get(e.ip, ()) for x in old_eps[self._ep_pos[k]][1])
            if not before:
                out.add(e.node_name)
        return out


def _slice_service(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{(meta.get('labels') or {}).get(SERVICE_NAME_LABEL, '')}"
