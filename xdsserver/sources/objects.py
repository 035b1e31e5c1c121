"""Raw Kubernetes objects -> :class:`~xdsserver.model.Model`, shared by every source.

Validation happens here, once: each object against the JSON schema of its kind (shipped in
``schemas/``), then the checks no single schema can express (duplicate pod IPs, a named
``targetPort`` that no selected container declares). Every problem becomes one
:class:`InputError` naming file, object and field; with ``strict`` a single error rejects the
whole input, so a bad edit never half-applies (the caller keeps serving the last good model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import marshal
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Callable, Iterable

import jsonschema

from ..model import (
    AccessLogHops,
    ContainerPort,
    Endpoint,
    MeshConfig,
    Model,
    Namespace,
    Node,
    OutboundPolicy,
    Pod,
    Service,
    ServicePort,
    canonical_ip,
)
from ..model.policy import AuthorizationPolicy, PeerAuthentication
from . import SourceObject
from .schemacheck import compile_schema
from .policy import POLICY_KINDS, authorization_policy, peer_authentication

log = logging.getLogger(__name__)

KINDS = ("Namespace", "ServiceAccount", "Node", "Pod", "Service", "EndpointSlice", "MeshConfig")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class InputError:
    origin: str
    ref: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.ref}: {self.field}" if self.field else self.ref
        return f"{self.origin}: {where}: {self.message}"


class InputErrors(Exception):
    """All problems found in one input state; nothing of it was applied."""

    def __init__(self, errors: list[InputError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


@cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    text = resources.files(__package__).joinpath("schemas", f"{kind.lower()}.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@cache
def _certainly_valid(kind: str) -> Callable[[Any], bool]:
    """The compiled yes-or-don't-know check of ``kind``'s schema (schemacheck.py)."""
    v = _validator(kind)
    return compile_schema(v.schema, v.format_checker)[0]


def _field_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validate_object(so: SourceObject) -> list[InputError]:
    """Schema check of one object; unknown kinds are not ours to judge and pass."""
    if not isinstance(so.obj, dict):
        return [InputError(so.origin, "document", "", f"expected a mapping, got {type(so.obj).__name__}")]
    if so.kind not in KINDS:
        return []
    if _certainly_valid(so.kind)(so.obj):  # ~15x cheaper than jsonschema, which judges the rest
        return []
    errors = []
    for err in sorted(_validator(so.kind).iter_errors(so.obj), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "required" and isinstance(err.instance, dict):
            # name the missing field itself, not its parent
            for prop in err.validator_value:
                if prop not in err.instance:
                    errors.append(InputError(so.origin, so.ref, _field_path([*path, prop]), "is required"))
            continue
        errors.append(InputError(so.origin, so.ref, _field_path(path) or "(object)", _short(err)))
    return errors


def _short(err: jsonschema.ValidationError) -> str:
    if err.validator in ("anyOf", "oneOf") and not isinstance(err.instance, (dict, list)):
        return f"{err.instance!r} is not valid here ({err.schema.get('description', 'see schema')})" if "description" in err.schema else f"{err.instance!r} is not a valid value"
    return err.message


# ---------------------------------------------------------------------------------------------
def mesh_from_spec(spec: dict[str, Any]) -> MeshConfig:
    enr = spec.get("enrollment") or {}
    label = enr.get("namespaceLabel") or {}
    base = MeshConfig()
    return MeshConfig(
        trust_domain=spec.get("trustDomain", base.trust_domain),
        cluster_domain=spec.get("clusterDomain", base.cluster_domain),
        enrollment_label=label.get("key", base.enrollment_label),
        enrollment_value=label.get("value", base.enrollment_value),
        connect_timeout_s=float(str(spec.get("connectTimeout", f"{base.connect_timeout_s}s")).rstrip("s")),
        hbone_idle_timeout_s=_seconds(spec.get("hboneIdleTimeout"), base.hbone_idle_timeout_s),
        access_log=AccessLogHops(spec.get("accessLog", base.access_log.value)),
        buffer_limit_bytes=spec.get("bufferLimitBytes", base.buffer_limit_bytes),
        hbone_stream_window_bytes=spec.get("hboneStreamWindowBytes", base.hbone_stream_window_bytes),
        hbone_connection_window_bytes=spec.get("hboneConnectionWindowBytes", base.hbone_connection_window_bytes),
        hbone_keepalive_s=_seconds(spec.get("hboneKeepalive"), base.hbone_keepalive_s),
        outbound_policy=OutboundPolicy(spec.get("outboundTrafficPolicy", base.outbound_policy.value)),
        excluded_namespaces=tuple(enr.get("excludedNamespaces", base.excluded_namespaces)),
        root_namespace=spec.get("rootNamespace", base.root_namespace),
    )


def _seconds(value: Any, default: float) -> float:
    return default if value is None else float(str(value).rstrip("s"))


def validate_mesh_spec(origin: str, spec: Any) -> list[InputError]:
    return validate_object(SourceObject(origin, {"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "spec": spec}))


def _meta(o: dict[str, Any]) -> dict[str, Any]:
    return o.get("metadata") or {}


def _labels(d: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((d or {}).items()))


def _pod(o: dict[str, Any]) -> Pod:
    meta, spec, status = _meta(o), o.get("spec") or {}, o.get("status") or {}
    ips = [canonical_ip(x["ip"]) for x in status.get("podIPs") or []]
    if not ips and status.get("podIP"):
        ips = [canonical_ip(status["podIP"])]
    ready = True
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    ports = []
    for c in spec.get("containers") or []:
        for p in c.get("ports") or []:
            ports.append(ContainerPort(int(p["containerPort"]), p.get("name", ""), p.get("protocol", "TCP")))
    return Pod(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta.get("uid", ""),
        node_name=spec.get("nodeName", ""),
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        ips=tuple(dict.fromkeys(ips)),
        labels=_labels(meta.get("labels")),
        ports=tuple(ports),
        host_network=bool(spec.get("hostNetwork", False)),
        ready=ready,
        phase=status.get("phase", ""),
        creation_timestamp=str(meta.get("creationTimestamp") or ""),
    )


def _service(o: dict[str, Any]) -> Service:
    meta, spec = _meta(o), o.get("spec") or {}
    ips = [x for x in (spec.get("clusterIPs") or [spec.get("clusterIP", "")]) if x and x != "None"]
    ports = []
    for p in spec.get("ports") or []:
        ports.append(
            ServicePort(
                port=int(p["port"]),
                name=p.get("name", ""),
                protocol=p.get("protocol", "TCP"),
                target_port=p.get("targetPort", p["port"]),
                app_protocol=p.get("appProtocol", ""),
            )
        )
    sel = spec.get("selector")
    return Service(
        namespace=meta["namespace"],
        name=meta["name"],
        cluster_ips=tuple(canonical_ip(x) for x in ips),
        ports=tuple(sorted(ports, key=lambda p: (p.port, p.name))),
        selector=_labels(sel) if sel else None,
        type=spec.get("type", "ClusterIP"),
        creation_timestamp=str(meta.get("creationTimestamp") or ""),
    )


def _node(o: dict[str, Any]) -> Node:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    internal = next((a["address"] for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), "")
    return Node(name=_meta(o)["name"], pod_cidr=spec.get("podCIDR", ""), internal_ip=internal)


def _selects(selector: tuple[tuple[str, str], ...], pod: Pod) -> bool:
    labels = pod.label_map
    return all(labels.get(k) == v for k, v in selector)


class ValidationMemo:
    """What the previous build learned per object, so the next one does O(change) work per object.

    Validation and conversion are most of a model build, and almost every object is the same from
    one change to the next:

    * an object whose content is unchanged is not validated again, and its converted ``Pod`` /
      ``Service`` is the very same (frozen) object as last time, so later stages compare by identity.
      The key is a digest of the exact content (``marshal`` format 0: no sharing, so equal content
      gives equal bytes); a source that hands out the very same :class:`SourceObject` for an
      unchanged object (the Kubernetes source's cache, :class:`~xdsserver.sources.manifests.ManifestReader`
      for unchanged files) is not even digested: sources replace objects, they never mutate them;
    * a Service's endpoints are derived again only if the Service or a pod of its namespace changed.

    Only the last build's entries are kept."""

    def __init__(self) -> None:
        self._valid: set[bytes] = set()
        self._next: set[bytes] = set()
        self._pods: dict[bytes, Pod] = {}  # converted pods (frozen), by the same fingerprint
        self._pods_next: dict[bytes, Pod] = {}
        self._services: dict[bytes, Service] = {}
        self._services_next: dict[bytes, Service] = {}
        self._key_of: dict[int, bytes | None] = {}  # id(SourceObject) -> key, this build only
        self._by_object: dict[int, tuple[SourceObject, bytes | None]] = {}  # last build: the very objects
        self._by_object_next: dict[int, tuple[SourceObject, bytes | None]] = {}
        # namespace -> its pods (in build order); service fingerprint -> its derived endpoints and errors
        self._ns_pods: dict[str, tuple[Pod, ...]] = {}
        self._ns_pods_next: dict[str, tuple[Pod, ...]] = {}
        self._endpoints: dict[bytes, tuple[dict[tuple[str, str], list[Endpoint]], list[InputError]]] = {}
        self._endpoints_next: dict[bytes, tuple[dict[tuple[str, str], list[Endpoint]], list[InputError]]] = {}
        self.hits = 0
        self.digests = 0  # objects whose content had to be digested (not the very same object as last time)

    def key(self, so: SourceObject) -> bytes | None:
        prev = self._by_object.get(id(so))
        if prev is not None and prev[0] is so:
            k = prev[1]
        else:
            self.digests += 1
            try:
                k = hashlib.blake2b(marshal.dumps(so.obj, 0), digest_size=16).digest()
            except ValueError:  # a value marshal cannot encode (e.g. a YAML timestamp): just validate
                k = None
        self._by_object_next[id(so)] = (so, k)
        return k

    def validate(self, so: SourceObject) -> list[InputError]:
        k = self._key_of[id(so)] = self.key(so)
        if k is not None and k in self._valid:
            self.hits += 1
            self._next.add(k)
            return []
        errs = validate_object(so)
        if not errs and k is not None:
            self._next.add(k)
        return errs

    def pod(self, so: SourceObject) -> Pod:
        return self._converted(so, self._pods, self._pods_next, _pod)

    def service(self, so: SourceObject) -> Service:
        return self._converted(so, self._services, self._services_next, _service)

    def _converted(self, so: SourceObject, last: dict[bytes, Any], nxt: dict[bytes, Any], convert: Any) -> Any:
        k = self._key_of.get(id(so))
        out = last.get(k) if k is not None else None
        if out is None:
            out = convert(so.obj)
        if k is not None:
            nxt[k] = out
        return out

    def endpoints(self, so: SourceObject, ns_pods: tuple[Pod, ...], derive: Any) -> tuple[dict[tuple[str, str], list[Endpoint]], list[InputError]]:
        """``derive()`` (a Service's endpoints from its selector), unless neither the Service nor
        any pod of its namespace changed since the last build. Callers must not mutate the result."""
        k = self._key_of.get(id(so))
        ns = _meta(so.obj).get("namespace", "")
        last = self._ns_pods.get(ns)
        self._ns_pods_next[ns] = ns_pods
        same_pods = last is ns_pods or (last is not None and len(last) == len(ns_pods) and all(a is b for a, b in zip(last, ns_pods)))
        hit = self._endpoints.get(k) if k is not None and same_pods else None
        if hit is None:
            hit = derive()
        if k is not None:
            self._endpoints_next[k] = hit
        return hit

    def copy(self) -> "ValidationMemo":
        other = ValidationMemo()
        other._valid, other._pods, other._services = set(self._valid), dict(self._pods), dict(self._services)
        other._by_object, other._ns_pods, other._endpoints = dict(self._by_object), dict(self._ns_pods), dict(self._endpoints)
        return other

    def commit(self) -> None:
        self._valid, self._next = self._next, set()
        self._pods, self._pods_next = self._pods_next, {}
        self._services, self._services_next = self._services_next, {}
        self._by_object, self._by_object_next = self._by_object_next, {}
        self._ns_pods, self._ns_pods_next = self._ns_pods_next, {}
        self._endpoints, self._endpoints_next = self._endpoints_next, {}
        self._key_of.clear()


def build_model(objects: Iterable[SourceObject], mesh: MeshConfig | None = None, *, strict: bool = True,
                memo: ValidationMemo | None = None) -> Model:
    """Validate and convert; with ``strict`` raise :class:`InputErrors` listing every problem.

    Without ``strict`` (the Kubernetes source) bad objects are logged and left out, so one
    malformed object cannot stop the rest of the cluster from being served. ``memo`` skips
    validating objects that passed unchanged last time (see :class:`ValidationMemo`).
    """
    model, errors = build_model_lenient(objects, mesh, memo=memo)
    if errors and strict:
        raise InputErrors(errors)
    for e in errors:
        log.error("input rejected: %s", e)
    return model


def build_model_lenient(objects: Iterable[SourceObject], mesh: MeshConfig | None = None, *,
                        memo: ValidationMemo | None = None) -> tuple[Model, list[InputError]]:
    errors: list[InputError] = []
    validate = memo.validate if memo is not None else validate_object
    good: dict[str, list[SourceObject]] = {k: [] for k in KINDS}
    seen: dict[tuple[str, str], str] = {}
    objs = list(objects)
    policies, policy_errors, policy_warnings = _policies(o for o in objs if isinstance(o.obj, dict) and o.kind in POLICY_KINDS)
    errors.extend(policy_errors)
    for so in objs:
        errs = validate(so)
        if errs:
            errors.extend(errs)
            continue
        if so.kind not in KINDS:
            continue
        key = (so.kind, so.ref)
        if key in seen:
            errors.append(InputError(so.origin, so.ref, "metadata.name", f"duplicate object (first defined in {seen[key]})"))
            continue
        seen[key] = so.origin
        good[so.kind].append(so)

    if mesh is None:
        mesh = MeshConfig()
        for so in good["MeshConfig"][:1]:
            mesh = mesh_from_spec(so.obj.get("spec") or {})
        for so in good["MeshConfig"][1:]:
            errors.append(InputError(so.origin, so.ref, "kind", "only one MeshConfig may be given"))

    convert_pod = memo.pod if memo is not None else (lambda so: _pod(so.obj))
    pods: list[tuple[SourceObject, Pod]] = [(so, convert_pod(so)) for so in good["Pod"]]
    # Duplicate pod IPs: two pods cannot own one address (hostNetwork pods share the node's).
    by_ip: dict[str, tuple[SourceObject, Pod]] = {}
    dup_bad: set[int] = set()
    for so, pod in sorted(pods, key=lambda sp: (sp[1].namespace, sp[1].name)):
        if pod.host_network or pod.phase in ("Succeeded", "Failed"):
            continue
        for ip in pod.ips:
            if ip in by_ip:
                first_so, first = by_ip[ip]
                errors.append(InputError(so.origin, so.ref, "status.podIP", f"IP {ip} is already used by Pod {first.key} ({first_so.origin})"))
                dup_bad.add(id(so))
            else:
                by_ip[ip] = (so, pod)
    pods = [sp for sp in pods if id(sp[0]) not in dup_bad]

    convert_service = memo.service if memo is not None else (lambda so: _service(so.obj))
    services: list[tuple[SourceObject, Service]] = []
    for so in good["Service"]:
        port_errors = _service_port_errors(so)
        errors.extend(port_errors)
        if not port_errors:
            services.append((so, convert_service(so)))
    slices_by_svc: dict[str, list[SourceObject]] = {}
    for so in good["EndpointSlice"]:
        addr_errors = _slice_address_errors(so)
        if addr_errors:
            errors.extend(addr_errors)
            continue
        meta = _meta(so.obj)
        svc_name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not svc_name:
            errors.append(InputError(so.origin, so.ref, f"metadata.labels.{SERVICE_NAME_LABEL}", "is required to tie the slice to its Service"))
            continue
        slices_by_svc.setdefault(f"{meta['namespace']}/{svc_name}", []).append(so)

    endpoints: dict[tuple[str, str], list[Endpoint]] = {}
    by_ns: dict[str, list[Pod]] = {}
    for _, p in pods:
        by_ns.setdefault(p.namespace, []).append(p)
    pods_by_ns = {ns: tuple(ps) for ns, ps in by_ns.items()}
    svc_bad: set[int] = set()
    for so, svc in services:
        if svc.key in slices_by_svc:
            for sl in sorted(slices_by_svc[svc.key], key=lambda s: _meta(s.obj)["name"]):
                _endpoints_from_slice(sl, svc, endpoints)
            continue
        if not svc.selector:
            continue
        ns_pods = pods_by_ns.get(svc.namespace, ())
        derived, svc_errors = (memo.endpoints(so, ns_pods, lambda: _selected_endpoints(so, svc, ns_pods)) if memo is not None
                               else _selected_endpoints(so, svc, ns_pods))
        if svc_errors:
            errors.extend(svc_errors)
            svc_bad.add(id(so))
        for k, eps in derived.items():
            endpoints.setdefault(k, []).extend(eps)
    services = [sv for sv in services if id(sv[0]) not in svc_bad]

    model = Model(
        mesh=mesh,
        namespaces=tuple(sorted((Namespace(_meta(s.obj)["name"], _labels(_meta(s.obj).get("labels"))) for s in good["Namespace"]), key=lambda n: n.name)),
        pods=tuple(sorted((p for _, p in pods), key=lambda p: (p.namespace, p.name))),
        services=tuple(sorted((s for _, s in services), key=lambda s: (s.namespace, s.name))),
        service_accounts=tuple(sorted((_meta(s.obj)["namespace"], _meta(s.obj)["name"]) for s in good["ServiceAccount"])),
        nodes=tuple(sorted((_node(s.obj) for s in good["Node"]), key=lambda n: n.name)),
        endpoints=tuple(sorted((k, tuple(sorted(v, key=lambda e: (e.ip, e.port)))) for k, v in endpoints.items())),
        sources=tuple(sorted({so.origin.split("#")[0] for so in objs})),
        authorization_policies=tuple(p for p in policies if isinstance(p, AuthorizationPolicy)),
        peer_authentications=tuple(p for p in policies if isinstance(p, PeerAuthentication)),
        policy_warnings=tuple(policy_warnings),
    )
    for w in policy_warnings:
        log.warning("policy: %s", w)
    if memo is not None:
        memo.commit()
    return model, errors


def _selected_endpoints(so: SourceObject, svc: Service, ns_pods: tuple[Pod, ...]) -> tuple[dict[tuple[str, str], list[Endpoint]], list[InputError]]:
    """A selector Service's endpoints from the pods of its namespace (no EndpointSlice given), and
    the error for a named ``targetPort`` no selected container declares (the Service is then bad)."""
    assert svc.selector
    selected = [p for p in ns_pods if _selects(svc.selector, p)]
    out: dict[tuple[str, str], list[Endpoint]] = {}
    errors: list[InputError] = []
    for i, sp in enumerate(so.obj["spec"].get("ports") or []):
        port = ServicePort(int(sp["port"]), sp.get("name", ""), sp.get("protocol", "TCP"), sp.get("targetPort", sp["port"]))
        if isinstance(port.target_port, str) and selected and not any(p.named_port(port.target_port) for p in selected):
            errors.append(InputError(so.origin, so.ref, f"spec.ports[{i}].targetPort",
                                     f"no container of the {len(selected)} selected pod(s) declares a port named {port.target_port!r}"))
            continue
        eps = out.setdefault((svc.key, port.name), [])
        for p in selected:
            if not p.ip or p.phase in ("Succeeded", "Failed"):
                continue
            if isinstance(port.target_port, str):
                cp = p.named_port(port.target_port)
                if cp is None:
                    continue  # this pod does not serve that port (Kubernetes skips it too)
                num = cp.port
            else:
                num = int(port.target_port)
            for ip in p.ips:
                eps.append(Endpoint(ip, num, p.ready, p.node_name, p.key))
    return out, errors


def _policies(objs: Iterable[SourceObject]) -> tuple[list[AuthorizationPolicy | PeerAuthentication], list[InputError], list[str]]:
    """Both security kinds, sorted by (kind, namespace, name); duplicates are errors."""
    out: dict[tuple[str, str, str], AuthorizationPolicy | PeerAuthentication] = {}
    errors: list[InputError] = []
    warnings: list[str] = []
    for so in objs:
        conv = authorization_policy if so.kind == "AuthorizationPolicy" else peer_authentication
        obj, problems, warns = conv(so)
        errors.extend(InputError(so.origin, so.ref, f, m) for f, m in problems)
        if obj is None:
            continue
        key = (so.kind, obj.namespace, obj.name)
        if key in out:
            errors.append(InputError(so.origin, so.ref, "metadata.name", f"duplicate object (first defined in {out[key].origin})"))
            continue
        out[key] = obj
        warnings.extend(warns)
    return [out[k] for k in sorted(out)], errors, warnings


def _service_port_errors(so: SourceObject) -> list[InputError]:
    """Kubernetes requires every port of a multi-port Service to carry a unique name; without it
    two ports' endpoints would share one (service, port name) key."""
    ports = (so.obj.get("spec") or {}).get("ports") or []
    if len(ports) < 2:
        return []
    errs, seen = [], set()
    for i, p in enumerate(ports):
        name = p.get("name", "")
        if not name:
            errs.append(InputError(so.origin, so.ref, f"spec.ports[{i}].name", "is required when a Service has several ports"))
        elif name in seen:
            errs.append(InputError(so.origin, so.ref, f"spec.ports[{i}].name", f"duplicate port name {name!r}"))
        seen.add(name)
    return errs


def _slice_address_errors(so: SourceObject) -> list[InputError]:
    if so.obj.get("addressType") == "FQDN":
        return []
    errs = []
    for i, ep in enumerate(so.obj.get("endpoints") or []):
        for j, addr in enumerate(ep.get("addresses") or []):
            try:
                canonical_ip(addr)
            except ValueError:
                errs.append(InputError(so.origin, so.ref, f"endpoints[{i}].addresses[{j}]", f"{addr!r} is not an IP address"))
    return errs


def _endpoints_from_slice(sl: SourceObject, svc: Service, out: dict[tuple[str, str], list[Endpoint]]) -> None:
    o = sl.obj
    if o.get("addressType") == "FQDN":
        return
    for port in o.get("ports") or []:
        if "port" not in port:
            continue
        eps = out.setdefault((svc.key, port.get("name", "")), [])
        for ep in o.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False  # nil means ready (EndpointSlice API)
            ref = ep.get("targetRef") or {}
            pod_key = f"{ref.get('namespace', svc.namespace)}/{ref['name']}" if ref.get("kind") == "Pod" and ref.get("name") else ""
            for addr in ep["addresses"]:
                eps.append(Endpoint(canonical_ip(addr), int(port["port"]), ready, ep.get("nodeName", ""), pod_key))

