"""Manifests -> model: malformed input gives one clear error per problem, good input loads right.

Every negative case asserts the three things an operator needs to find the problem: the file
(with the document number for multi-document files), the object (``Kind ns/name``) and the
field; and that :func:`load_model` raises, so a bad edit never half-applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from xdsserver.model import Identity, OutboundPolicy
from xdsserver.model.index import MeshIndex
from xdsserver.sources import SourceObject
from xdsserver.sources.manifests import load_mesh_config, load_model, read_objects
from xdsserver.sources.objects import InputError, InputErrors, build_model, build_model_lenient

# ---- object builders ---------------------------------------------------------------------------


def namespace(name: str, *, ambient: bool = True) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(
    name: str,
    ip: str | None,
    *,
    ns: str = "default",
    node: str = "node-a",
    labels: dict[str, Any] | None = None,
    ports: list[dict[str, Any]] | None = None,
    sa: str | None = None,
    ready: bool = True,
    ips: list[str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    s: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app", "image": "example/app", "ports": ports or []}], **spec}
    if sa is not None:
        s["serviceAccountName"] = sa
    status: dict[str, Any] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": x} for x in (ips or [ip])]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name} if labels is None else labels},
        "spec": s,
        "status": status,
    }


def service(
    name: str,
    ports: list[dict[str, Any]],
    *,
    ns: str = "default",
    selector: dict[str, str] | None = None,
    cluster_ip: str = "10.96.0.10",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "ClusterIP", "clusterIP": cluster_ip, "ports": ports}
    if selector is not None:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name: str, svc: str, addresses: list[str], port: int, *, ns: str = "default", port_name: str = "http") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}, "nodeName": "node-a"} for a in addresses],
    }


def mesh_config(spec: dict[str, Any], name: str = "mesh") -> dict[str, Any]:
    return {"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "metadata": {"name": name}, "spec": spec}


def write(root: Path, files: dict[str, list[Any]]) -> Path:
    """``{"a.yaml": [doc, ...]}`` -> multi-document YAML files under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for fname, docs in files.items():
        (root / fname).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return root


# ---- malformed input, case by case -------------------------------------------------------------

WEB_PORT = [{"containerPort": 8080, "name": "http"}]


@dataclass
class Bad:
    """One malformed input and the error it must produce."""

    files: dict[str, list[Any]]
    file: str  # file name, with ``#<doc>`` when the file holds several documents
    ref: str  # "Kind ns/name"
    field: str
    says: tuple[str, ...]  # substrings the message must contain
    count: int = 1  # errors expected in total (one per problem)
    also_names: tuple[str, ...] = field(default=())  # e.g. the other pod of a duplicate IP


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    d = obj
    for p in path[:-1]:
        d = d[p]
    del d[path[-1]]
    return obj


def _with(obj: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    d: Any = obj
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    return obj


NS = namespace("default")

BAD_CASES: dict[str, Bad] = {
    "pod-without-containers": Bad(
        {"pods.yaml": [NS, _without(pod("web", "10.244.1.5"), "spec", "containers")]},
        "pods.yaml#2", "Pod default/web", "spec.containers", ("required",),
    ),
    "pod-without-namespace": Bad(
        {"pods.yaml": [_without(pod("web", "10.244.1.5"), "metadata", "namespace")]},
        "pods.yaml", "Pod web", "metadata.namespace", ("required",),
    ),
    "pod-without-spec": Bad(
        {"pods.yaml": [NS, _without(pod("web", "10.244.1.5"), "spec")]},
        "pods.yaml#2", "Pod default/web", "spec", ("required",),
    ),
    "service-port-without-port": Bad(
        {"svc.yaml": [NS, service("web", [{"name": "http", "targetPort": 8080}], selector={"app": "web"})]},
        "svc.yaml#2", "Service default/web", "spec.ports[0].port", ("required",),
    ),
    "containerPort-not-a-number": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.5", ports=[{"containerPort": "eighty", "name": "http"}])]},
        "pods.yaml#2", "Pod default/web", "spec.containers[0].ports[0].containerPort", ("eighty", "integer"),
    ),
    "hostNetwork-not-a-bool": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.5", hostNetwork="yes")]},
        "pods.yaml#2", "Pod default/web", "spec.hostNetwork", ("yes", "boolean"),
    ),
    "label-value-int": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.5", labels={"app": "web", "version": 2})]},
        "pods.yaml#2", "Pod default/web", "metadata.labels.version", ("2", "string"),
    ),
    "label-value-yaml-bool": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.5", labels={"app": "web", "canary": True})]},
        "pods.yaml#2", "Pod default/web", "metadata.labels.canary", ("True", "string"),
    ),
    "service-port-not-a-number": Bad(
        {"svc.yaml": [NS, service("web", [{"name": "http", "port": "80"}], selector={"app": "web"})]},
        "svc.yaml#2", "Service default/web", "spec.ports[0].port", ("'80'", "integer"),
    ),
    "service-port-out-of-range": Bad(
        {"svc.yaml": [NS, service("web", [{"name": "http", "port": 70000}], selector={"app": "web"})]},
        "svc.yaml#2", "Service default/web", "spec.ports[0].port", ("70000", "65535"),
    ),
    "service-type-unknown": Bad(
        {"svc.yaml": [NS, _with(service("web", [{"name": "http", "port": 80}]), "Cluster", "spec", "type")]},
        "svc.yaml#2", "Service default/web", "spec.type", ("Cluster",),
    ),
    "pod-ip-not-an-ip": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.300")]},
        "pods.yaml#2", "Pod default/web", "status.podIP", ("10.244.1.300",),
        count=2,  # podIP and podIPs[0].ip both carry it
    ),
    "pod-ips-entry-not-an-ip": Bad(
        {"pods.yaml": [NS, pod("web", "10.244.1.5", ips=["10.244.1.5", "fd00::zz"])]},
        "pods.yaml#2", "Pod default/web", "status.podIPs[1].ip", ("fd00::zz",),
    ),
    "pod-ip-with-zone": Bad(
        {"pods.yaml": [NS, pod("web", "fe80::1%eth0", ips=["10.244.1.5"])]},
        "pods.yaml#2", "Pod default/web", "status.podIP", ("fe80::1%eth0",),
    ),
    "pod-ip-leading-zero": Bad(
        {"pods.yaml": [NS, pod("web", "010.244.1.5", ips=["10.244.1.5"])]},
        "pods.yaml#2", "Pod default/web", "status.podIP", ("010.244.1.5",),
    ),
    "cluster-ip-not-an-ip": Bad(
        {"svc.yaml": [NS, service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.999")]},
        "svc.yaml#2", "Service default/web", "spec.clusterIP", ("10.96.0.999",),
    ),
    "pod-phase-unknown": Bad(
        {"pods.yaml": [NS, _with(pod("web", "10.244.1.5"), "Runing", "status", "phase")]},
        "pods.yaml#2", "Pod default/web", "status.phase", ("Runing",),
    ),
    "ready-condition-not-true-false": Bad(
        {"pods.yaml": [NS, _with(pod("web", "10.244.1.5"), "yes", "status", "conditions", 0, "status")]},
        "pods.yaml#2", "Pod default/web", "status.conditions[0].status", ("yes",),
    ),
    "targetPort-name-invalid": Bad(
        {"svc.yaml": [NS, service("web", [{"name": "http", "port": 80, "targetPort": "Web_Port"}])]},
        "svc.yaml#2", "Service default/web", "spec.ports[0].targetPort", ("Web_Port",),
    ),
    "targetPort-name-no-container-declares": Bad(
        {
            "pods.yaml": [NS, pod("web-1", "10.244.1.5", labels={"app": "web"}, ports=WEB_PORT)],
            "svc.yaml": [service("web", [{"name": "http", "port": 80, "targetPort": "grpc"}], selector={"app": "web"})],
        },
        "svc.yaml", "Service default/web", "spec.ports[0].targetPort", ("grpc", "no container", "1 selected pod"),
    ),
    "duplicate-pod-ip": Bad(
        {"pods.yaml": [NS, pod("web-1", "10.244.1.5"), pod("web-2", "10.244.1.5")]},
        "pods.yaml#3", "Pod default/web-2", "status.podIP", ("10.244.1.5", "already used"),
        also_names=("Pod default/web-1", "pods.yaml#2"),
    ),
    "duplicate-object-across-files": Bad(
        {"a.yaml": [NS, pod("web", "10.244.1.5")], "b.yaml": [pod("web", "10.244.1.6")]},
        "b.yaml", "Pod default/web", "metadata.name", ("duplicate",),
        also_names=("a.yaml#2",),
    ),
    "endpointslice-without-service-label": Bad(
        {"eps.yaml": [NS, _with(endpoint_slice("web-abc", "web", ["10.244.1.5"], 8080), {}, "metadata", "labels")]},
        "eps.yaml#2", "EndpointSlice default/web-abc", "metadata.labels.kubernetes.io/service-name", ("required",),
    ),
    "document-not-a-mapping": Bad(
        {"pods.yaml": [NS, ["not", "an", "object"]]},
        "pods.yaml#2", "document", "", ("expected a mapping", "list"),
    ),
    "meshconfig-bad-policy": Bad(
        {"mesh.yaml": [mesh_config({"outboundTrafficPolicy": "DENY"})]},
        "mesh.yaml", "MeshConfig mesh", "spec.outboundTrafficPolicy", ("DENY", "REGISTRY_ONLY"),
    ),
    "meshconfig-unknown-field": Bad(
        {"mesh.yaml": [mesh_config({"trustDomian": "example.org"})]},
        "mesh.yaml", "MeshConfig mesh", "spec", ("trustDomian",),
    ),
    "meshconfig-bad-trust-domain": Bad(
        {"mesh.yaml": [mesh_config({"trustDomain": "Example Org"})]},
        "mesh.yaml", "MeshConfig mesh", "spec.trustDomain", ("Example Org",),
    ),
    "meshconfig-bad-timeout": Bad(
        {"mesh.yaml": [mesh_config({"connectTimeout": "10 seconds"})]},
        "mesh.yaml", "MeshConfig mesh", "spec.connectTimeout", ("10 seconds",),
    ),
    "meshconfig-given-twice": Bad(
        {"mesh.yaml": [mesh_config({}, "one"), mesh_config({}, "two")]},
        "mesh.yaml#2", "MeshConfig two", "kind", ("only one MeshConfig",),
    ),
}

# Inputs that were once accepted although wrong (found by this suite, fixed since): kept as cases.
KNOWN_GAPS: dict[str, tuple[Bad, str]] = {
    "endpointslice-address-not-an-ip": (
        Bad(
            {"eps.yaml": [NS, service("web", [{"name": "http", "port": 80}]), endpoint_slice("web-abc", "web", ["10.244.1.999"], 8080)]},
            "eps.yaml#3", "EndpointSlice default/web-abc", "endpoints[0].addresses[0]", ("10.244.1.999",),
        ),
        "sources/objects.py _endpoints_from_slice logs and skips a non-IP address instead of reporting it",
    ),
    "multi-port-service-with-duplicate-port-names": (
        Bad(
            {
                "pods.yaml": [NS, pod("web", "10.244.1.5", ports=[{"containerPort": 8080}, {"containerPort": 8081}])],
                "svc.yaml": [service("web", [{"port": 80, "targetPort": 8080}, {"port": 81, "targetPort": 8081}], selector={"app": "web"})],
            },
            "svc.yaml", "Service default/web", "spec.ports[1].name", ("name",), count=2,  # both ports unnamed
        ),
        "ports of a multi-port Service must have distinct names (Kubernetes rejects it); accepted, the endpoints "
        "of both ports are merged under one (service, port name) key, so port 80 also balances to 8081",
    ),
    "node-internal-ip-not-an-ip": (
        Bad(
            {"nodes.yaml": [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                             "status": {"addresses": [{"type": "InternalIP", "address": "not-an-ip"}]}}]},
            "nodes.yaml", "Node node-a", "status.addresses[0].address", ("not-an-ip",),
        ),
        "node.json accepts any string as InternalIP (the lab builds its topology from it)",
    ),
}


def _check_bad(tmp_path: Path, case: Bad) -> None:
    root = write(tmp_path / "manifests", case.files)
    with pytest.raises(InputErrors) as info:
        load_model(root)
    errors = info.value.errors
    assert len(errors) == case.count, "\n".join(map(str, errors))
    want_origin = str(root / case.file)
    hits = [e for e in errors if e.origin == want_origin and e.ref == case.ref and e.field == case.field]
    assert hits, f"no error for {want_origin} / {case.ref} / {case.field} in:\n{info.value}"
    err = hits[0]
    text = str(err)
    assert text.startswith(want_origin + ": "), text  # file first, as an editor jump target
    assert case.ref in text and case.field in text
    for s in case.says + case.also_names:
        assert s in text, f"{s!r} not in {text!r}"
    # the exception text (what the CLI prints) carries every error verbatim
    assert text in str(info.value)


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_malformed_manifest_is_rejected_with_file_object_field(tmp_path: Path, case: Bad) -> None:
    _check_bad(tmp_path, case)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c) for c, _why in KNOWN_GAPS.values()],
    ids=KNOWN_GAPS.keys(),
)
def test_malformed_manifest_known_gaps(tmp_path: Path, case: Bad) -> None:
    _check_bad(tmp_path, case)


def test_one_error_per_problem_across_files_and_nothing_applied(tmp_path: Path) -> None:
    root = write(
        tmp_path / "m",
        {
            "a.yaml": [NS, pod("ok", "10.244.1.4"), pod("bad-port", "10.244.1.5", ports=[{"containerPort": "http"}])],
            "b.yaml": [pod("bad-net", "10.244.1.6", hostNetwork="true"), service("svc", [{"name": "http"}])],
        },
    )
    with pytest.raises(InputErrors) as info:
        load_model(root)
    got = {(Path(e.origin).name, e.ref, e.field) for e in info.value.errors}
    assert got == {
        ("a.yaml#3", "Pod default/bad-port", "spec.containers[0].ports[0].containerPort"),
        ("b.yaml#1", "Pod default/bad-net", "spec.hostNetwork"),
        ("b.yaml#2", "Service default/svc", "spec.ports[0].port"),
    }
    # The lenient path (Kubernetes source) keeps the good objects and drops only the bad ones;
    # the strict path used for manifests gives no model at all.
    model, errors = build_model_lenient(read_objects(root))
    assert len(errors) == 3
    assert [p.name for p in model.pods] == ["ok"] and model.services == ()
    with pytest.raises(InputErrors):
        build_model(read_objects(root), strict=True)


def test_unparsable_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    root = write(tmp_path / "m", {"good.yaml": [NS, pod("web", "10.244.1.5")]})
    bad = root / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [web\n")
    with pytest.raises(InputErrors) as info:
        read_objects(root)
    [err] = info.value.errors
    assert err.origin == str(bad)
    assert "cannot parse" in err.message and "line" in err.message
    assert "\n" not in str(err)  # one line per problem
    with pytest.raises(InputErrors):
        load_model(root)


def test_missing_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputErrors) as info:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value) and "no such file" in str(info.value)


# ---- standalone mesh config (the chart's ConfigMap) ----------------------------------------------


def test_load_mesh_config_file(tmp_path: Path) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(
        "trustDomain: example.org\nclusterDomain: corp.local\nconnectTimeout: 2.5s\noutboundTrafficPolicy: REGISTRY_ONLY\n"
        "enrollment:\n  namespaceLabel: {key: mesh, value: 'on'}\n  excludedNamespaces: [kube-system]\n"
    )
    mesh = load_mesh_config(f)
    assert (mesh.trust_domain, mesh.cluster_domain, mesh.connect_timeout_s) == ("example.org", "corp.local", 2.5)
    assert mesh.outbound_policy is OutboundPolicy.REGISTRY_ONLY
    assert (mesh.enrollment_label, mesh.enrollment_value, mesh.excluded_namespaces) == ("mesh", "on", ("kube-system",))
    # the wrapped form (kind: MeshConfig) is read the same way
    f.write_text(yaml.safe_dump(mesh_config({"trustDomain": "example.org"})))
    assert load_mesh_config(f).trust_domain == "example.org"


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("trustDomain: example.org\nbogus: 1\n", "spec", "bogus"),
        ("outboundTrafficPolicy: DENY_ALL\n", "spec.outboundTrafficPolicy", "DENY_ALL"),
        ("enrollment:\n  namespaceLabel: {key: mesh}\n", "spec.enrollment.namespaceLabel.value", "required"),
        ("trustDomain: [\n", "", "cannot read"),
    ],
    ids=["unknown-field", "bad-policy", "label-without-value", "unparsable"],
)
def test_load_mesh_config_rejects(tmp_path: Path, text: str, field: str, says: str) -> None:
    f = tmp_path / "mesh.yaml"
    f.write_text(text)
    with pytest.raises(InputErrors) as info:
        load_mesh_config(f)
    [err] = info.value.errors
    assert err.origin == str(f) and err.ref.startswith("MeshConfig") and err.field == field
    assert says in str(err)


# ---- what good input turns into ----------------------------------------------------------------


def _load(tmp_path: Path, files: dict[str, list[Any]]) -> tuple[Any, MeshIndex]:
    model = load_model(write(tmp_path / "m", files))
    return model, MeshIndex(model)


def _target(index: MeshIndex, svc: str, port: int) -> Any:
    return next(t for t in index.targets if t.service.name == svc and t.port.port == port)


def test_named_target_port_resolves_per_pod(tmp_path: Path) -> None:
    model, index = _load(
        tmp_path,
        {
            "a.yaml": [
                NS,
                pod("web-1", "10.244.1.5", labels={"app": "web"}, ports=[{"containerPort": 8080, "name": "http"}]),
                pod("web-2", "10.244.1.6", labels={"app": "web"}, ports=[{"containerPort": 9090, "name": "http"}]),
                # selected but without the named port: skipped, like Kubernetes (not an error)
                pod("web-3", "10.244.1.7", labels={"app": "web"}, ports=[{"containerPort": 7070, "name": "admin"}]),
                service("web", [{"name": "http", "port": 80, "targetPort": "http"}], selector={"app": "web"}),
            ]
        },
    )
    assert [(b.ip, b.port) for b in _target(index, "web", 80).backends] == [("10.244.1.5", 8080), ("10.244.1.6", 9090)]


def test_numeric_and_default_target_port(tmp_path: Path) -> None:
    _, index = _load(
        tmp_path,
        {
            "a.yaml": [
                NS,
                pod("web", "10.244.1.5", ports=WEB_PORT),
                service("web", [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "raw", "port": 81}], selector={"app": "web"}),
            ]
        },
    )
    assert [(b.ip, b.port) for b in _target(index, "web", 80).backends] == [("10.244.1.5", 8080)]
    assert [(b.ip, b.port) for b in _target(index, "web", 81).backends] == [("10.244.1.5", 81)]  # targetPort defaults to port


def test_endpoint_slice_preferred_over_selector(tmp_path: Path) -> None:
    _, index = _load(
        tmp_path,
        {
            "a.yaml": [
                NS,
                pod("web", "10.244.1.5", ports=WEB_PORT),
                pod("other", "10.244.1.9", ports=[{"containerPort": 9999, "name": "http"}]),
                service("web", [{"name": "http", "port": 80, "targetPort": "http"}], selector={"app": "web"}),
                endpoint_slice("web-abcde", "web", ["10.244.1.9"], 9999),
            ]
        },
    )
    backends = _target(index, "web", 80).backends
    assert [(b.ip, b.port) for b in backends] == [("10.244.1.9", 9999)]
    assert backends[0].identity == Identity("cluster.local", "default", "default")  # mapped through the IP index


def test_not_ready_pod_is_no_endpoint_but_still_a_local_source(tmp_path: Path) -> None:
    model, index = _load(
        tmp_path,
        {
            "a.yaml": [
                NS,
                pod("web-1", "10.244.1.5", labels={"app": "web"}, ports=WEB_PORT),
                pod("web-2", "10.244.1.6", labels={"app": "web"}, ports=WEB_PORT, ready=False),
                service("web", [{"name": "http", "port": 80, "targetPort": "http"}], selector={"app": "web"}),
            ]
        },
    )
    # the model keeps both (readiness is decided at EDS time) ...
    eps = dict(model.endpoints)[("default/web", "http")]
    assert {(e.ip, e.ready) for e in eps} == {("10.244.1.5", True), ("10.244.1.6", False)}
    # ... EDS gets only the ready one, while both pods are node-local workloads (sources, inbound chains)
    assert [b.ip for b in _target(index, "web", 80).backends] == ["10.244.1.5"]
    assert [wl.ip for wl in index.node_view("node-a").local_workloads] == ["10.244.1.5", "10.244.1.6"]


def test_service_account_default_fallback(tmp_path: Path) -> None:
    legacy = pod("legacy", "10.244.1.6")
    legacy["spec"]["serviceAccount"] = "old-style"  # deprecated alias, used when serviceAccountName is absent
    model, index = _load(tmp_path, {"a.yaml": [NS, pod("plain", "10.244.1.5"), legacy, pod("named", "10.244.1.7", sa="reviews")]})
    assert {p.name: p.service_account for p in model.pods} == {"plain": "default", "legacy": "old-style", "named": "reviews"}
    assert [wl.identity.spiffe for wl in index.workloads] == [
        "spiffe://cluster.local/ns/default/sa/old-style",
        "spiffe://cluster.local/ns/default/sa/reviews",
        "spiffe://cluster.local/ns/default/sa/default",
    ]


def test_kind_list_and_multi_document_files(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    as_list = {"apiVersion": "v1", "kind": "List", "items": [pod("a", "10.244.1.5"), pod("b", "10.244.1.6")]}
    (root / "list.yaml").write_text(yaml.safe_dump(as_list))
    (root / "multi.yml").write_text("---\n" + yaml.safe_dump(NS) + "---\n---\n" + yaml.safe_dump(pod("c", "10.244.1.7")))
    (root / "one.json").write_text(json.dumps(pod("d", "10.244.1.8")))
    (root / "README.md").write_text("not a manifest")
    objs = read_objects(root)
    assert [(Path(o.origin).name, o.kind) for o in objs] == [
        ("list.yaml items[0]", "Pod"),
        ("list.yaml items[1]", "Pod"),
        ("multi.yml#1", "Namespace"),
        ("multi.yml#3", "Pod"),  # the empty document #2 is skipped but keeps its number
        ("one.json", "Pod"),
    ]
    model = load_model(root)
    assert [p.name for p in model.pods] == ["a", "b", "c", "d"]
    # an error inside a List names the item
    as_list["items"][1]["spec"]["hostNetwork"] = "no"
    (root / "list.yaml").write_text(yaml.safe_dump(as_list))
    with pytest.raises(InputErrors) as info:
        load_model(root)
    [err] = info.value.errors
    assert err.origin == f"{root / 'list.yaml'} items[1]" and err.ref == "Pod default/b" and err.field == "spec.hostNetwork"


def test_enrollment_rules(tmp_path: Path) -> None:
    _, index = _load(
        tmp_path,
        {
            "a.yaml": [
                namespace("default"),
                namespace("legacy", ambient=False),
                namespace("istio-system"),  # labelled, but excluded by the mesh config
                pod("in-mesh", "10.244.1.5"),
                pod("opted-out", "10.244.1.6", labels={"app": "x", "istio.io/dataplane-mode": "none"}),
                pod("host-net", "172.18.0.2", hostNetwork=True),
                pod("host-net-2", "172.18.0.2", hostNetwork=True),  # shares the node IP: not a duplicate
                pod("no-ip", None),
                pod("outside", "10.244.1.7", ns="legacy"),
                pod("opted-in", "10.244.1.8", ns="legacy", labels={"app": "y", "istio.io/dataplane-mode": "ambient"}),
                pod("ztunnel", "10.244.1.2", ns="istio-system"),
            ]
        },
    )
    assert [wl.key for wl in index.workloads] == ["default/in-mesh", "legacy/opted-in"]
    not_enrolled = {p.name for p in index.model.pods if not index.pod_enrolled(p)}
    assert not_enrolled == {"host-net", "host-net-2", "no-ip", "opted-out", "outside", "ztunnel"}


def test_opted_out_and_outside_pods_are_plain_endpoints(tmp_path: Path) -> None:
    _, index = _load(
        tmp_path,
        {
            "a.yaml": [
                NS,
                namespace("legacy", ambient=False),
                pod("web-1", "10.244.1.5", labels={"app": "web"}, ports=WEB_PORT),
                pod("web-2", "10.244.1.6", labels={"app": "web", "istio.io/dataplane-mode": "none"}, ports=WEB_PORT),
                service("web", [{"name": "http", "port": 80, "targetPort": "http"}], selector={"app": "web"}),
            ]
        },
    )
    ids = {b.ip: b.identity for b in _target(index, "web", 80).backends}
    assert ids == {"10.244.1.5": Identity("cluster.local", "default", "default"), "10.244.1.6": None}


def test_mesh_config_object_sets_trust_domain_and_policy(tmp_path: Path) -> None:
    model, index = _load(
        tmp_path,
        {"a.yaml": [mesh_config({"trustDomain": "example.org", "outboundTrafficPolicy": "REGISTRY_ONLY"}), NS, pod("web", "10.244.1.5")]},
    )
    assert model.mesh.outbound_policy is OutboundPolicy.REGISTRY_ONLY
    assert [wl.identity.spiffe for wl in index.workloads] == ["spiffe://example.org/ns/default/sa/default"]


def test_ips_are_canonicalised(tmp_path: Path) -> None:
    model, _ = _load(
        tmp_path,
        {"a.yaml": [NS, pod("v6", "FD00:10:244:1:0:0:0:5"), service("s", [{"name": "http", "port": 80}], cluster_ip="fd00:10:96:0::a")]},
    )
    assert model.pods[0].ips == ("fd00:10:244:1::5",)
    assert model.services[0].cluster_ips == ("fd00:10:96::a",)


def test_source_object_ref_and_error_text() -> None:
    so = SourceObject("x.yaml#2", pod("web", "10.244.1.5"))
    assert so.ref == "Pod default/web"
    assert SourceObject("n.yaml", {"kind": "Node", "metadata": {"name": "n1"}}).ref == "Node n1"
    assert str(InputError("x.yaml#2", "Pod default/web", "spec.hostNetwork", "bad")) == "x.yaml#2: Pod default/web: spec.hostNetwork: bad"


def test_manifest_reader_reparses_only_changed_files(tmp_path: Path) -> None:
    """An edit to one file re-parses that file; the others keep their very same SourceObjects
    (so the model build skips them), and a file that stops parsing is named in the error."""
    from xdsserver.sources.manifests import ManifestReader

    ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n"
    (tmp_path / "a.yaml").write_text(ns.format("a"))
    (tmp_path / "b.yaml").write_text(ns.format("b"))
    reader = ManifestReader(tmp_path)
    first = reader.objects()
    assert [o.obj["metadata"]["name"] for o in first] == ["a", "b"] and reader.parsed == 2
    (tmp_path / "b.yaml").write_text(ns.format("b2"))
    second = reader.objects()
    assert reader.parsed == 3
    assert second[0] is first[0] and second[1].obj["metadata"]["name"] == "b2"
    (tmp_path / "a.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(InputErrors, match=r"a\.yaml: file: cannot parse"):
        reader.objects()
    (tmp_path / "a.yaml").write_text(ns.format("a"))
    (tmp_path / "b.yaml").unlink()
    assert [o.obj["metadata"]["name"] for o in reader.objects()] == ["a"]
