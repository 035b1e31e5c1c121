"""Synthetic clusters: ``xdsserver synth --nodes N --pods P --services S --seed K -o PATH``.

A deterministic generator of realistic manifests for benchmarks and scale tests (issue 6): Nodes
with InternalIP and podCIDR; namespaces, most enrolled in ambient and some not; several service
accounts per namespace; one deployment behind each service (pods selected by labels, named
``targetPort``s resolved through container ports), a few client-only deployments; multi-port
services, a share of them headless; most pods ready; one ``app: ztunnel`` pod per node in
``istio-system``. Same arguments, same seed -> byte-identical files: all randomness comes from one
seeded :class:`random.Random`, and timestamps, UIDs and IPs are derived from it, never from the clock.

``P`` counts application pods; the N ztunnel pods come on top of it.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

ENROLL_LABEL = "istio.io/dataplane-mode"
ENROLL_VALUE = "ambient"
MAX_PODS_PER_NODE = 250  # one /24 podCIDR per node, .1 gateway, .2 ztunnel
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)

try:
    _Dumper: Any = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _Dumper = yaml.SafeDumper

FILES = ("cluster.yaml", "ztunnel.yaml", "services.yaml", "pods.yaml")


@dataclass(frozen=True)
class Shape:
    """Knobs of the generated cluster; the defaults are what the benchmarks use."""

    nodes: int
    pods: int
    services: int
    seed: int = 1
    services_per_namespace: int = 10
    unenrolled_share: float = 0.15  # namespaces without the ambient label
    headless_share: float = 0.1
    not_ready_share: float = 0.05
    opt_out_share: float = 0.02  # pods labelled istio.io/dataplane-mode=none
    client_deployment_share: float = 0.1  # deployments behind no service, per service


class SynthError(ValueError):
    pass


def _ts(seconds: int) -> str:
    return (EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _suffix(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


def node_name(i: int) -> str:
    return f"node-{i:03d}"


def node_cidr(i: int) -> ipaddress.IPv4Network:
    """/24 per node inside 10.64.0.0/10 (room for 16k nodes)."""
    return ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.64.0.0")) + (i << 8), 24))


def service_ip(i: int) -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.96.0.10")) + i))


# Port menus: (name, port, protocol, targetPort or None=named container port of the same name, containerPort)
_PORT_MENU = [
    ("http", 80, "TCP", None, 8080),
    ("grpc", 9090, "TCP", None, 9090),
    ("http-admin", 8081, "TCP", 8081, 8081),
    ("tcp-db", 5432, "TCP", None, 5432),
    ("metrics", 15020, "TCP", 15020, 15020),
    ("dns", 53, "UDP", 5353, 5353),
]


def generate(shape: Shape) -> dict[str, list[dict[str, Any]]]:
    """File name -> Kubernetes objects (API JSON shape), in a fixed order."""
    if shape.nodes < 1 or shape.pods < 0 or shape.services < 0:
        raise SynthError("--nodes must be >= 1, --pods and --services >= 0")
    if shape.pods > shape.nodes * MAX_PODS_PER_NODE:
        raise SynthError(f"{shape.pods} pods do not fit {shape.nodes} nodes (at most {MAX_PODS_PER_NODE} per node, one /24 each)")
    rng = random.Random(shape.seed)
    cluster: list[dict[str, Any]] = []
    ztunnels: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []

    # -- nodes ------------------------------------------------------------------------------------
    for i in range(shape.nodes):
        internal = ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.18.0.2")) + i)
        cluster.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i)}},
            "spec": {"podCIDR": str(node_cidr(i))},
            "status": {"addresses": [{"type": "InternalIP", "address": str(internal)}, {"type": "Hostname", "address": node_name(i)}]},
        })

    # -- namespaces and service accounts ------------------------------------------------------------
    n_ns = max(1, -(-max(shape.services, 1) // shape.services_per_namespace))
    namespaces = [f"ns-{i:03d}" for i in range(n_ns)]
    enrolled = {ns: (i == 0 or rng.random() >= shape.unenrolled_share) for i, ns in enumerate(namespaces)}
    cluster.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}})
    for ns in namespaces:
        labels = {"kubernetes.io/metadata.name": ns}
        if enrolled[ns]:
            labels[ENROLL_LABEL] = ENROLL_VALUE
        cluster.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
    sas: dict[str, list[str]] = {}
    for ns in namespaces:
        sas[ns] = [f"sa-{j}" for j in range(rng.randint(2, 4))]
        for sa in ["default", *sas[ns]]:
            cluster.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    cluster.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ztunnel", "namespace": "istio-system"}})

    # -- ztunnel DaemonSet pods -------------------------------------------------------------------
    for i in range(shape.nodes):
        ip = str(node_cidr(i)[2])
        ztunnels.append(_pod_object(
            name=f"ztunnel-{_suffix(rng, 5)}", ns="istio-system", uid=_uid(rng), node=node_name(i), sa="ztunnel",
            labels={"app": "ztunnel", "ambient-type": "ztunnel"}, ip=ip, ready=True, created=_ts(i),
            containers=[{"name": "istio-proxy", "image": "envoyproxy/envoy:v1.40.0",
                         "ports": [{"name": "hbone", "containerPort": 15008}, {"name": "admin", "containerPort": 15000}]}],
        ))

    # -- deployments: one per service, plus client-only ones ------------------------------------------
    deployments: list[dict[str, Any]] = []
    for i in range(shape.services):
        ns = namespaces[i // shape.services_per_namespace]
        n_ports = rng.choice((1, 1, 2, 2, 3))
        menu = [p for p in _PORT_MENU if p[2] == "TCP"]
        chosen = rng.sample(menu, n_ports)
        if rng.random() < 0.05:
            chosen.append(_PORT_MENU[-1])  # a UDP port: never captured (D5)
        deployments.append({"name": f"svc-{i:04d}", "ns": ns, "sa": rng.choice(sas[ns]), "ports": sorted(chosen, key=lambda p: p[1]),
                            "service": i, "headless": rng.random() < shape.headless_share})
    for k in range(int(shape.services * shape.client_deployment_share)):
        ns = namespaces[rng.randrange(n_ns)]
        deployments.append({"name": f"client-{k:04d}", "ns": ns, "sa": rng.choice(sas[ns]), "ports": [], "service": None, "headless": False})
    if not deployments:
        deployments.append({"name": "client-0000", "ns": namespaces[0], "sa": sas[namespaces[0]][0], "ports": [], "service": None, "headless": False})

    for d in deployments:
        if d["service"] is None:
            continue
        i = d["service"]
        spec: dict[str, Any] = {
            "type": "ClusterIP",
            "selector": {"app": d["name"]},
            "ports": [
                {"name": name, "port": port, "protocol": proto, "targetPort": name if target is None else target}
                for name, port, proto, target, _ in d["ports"]
            ],
        }
        if d["headless"]:
            spec["clusterIP"] = "None"
            spec["clusterIPs"] = ["None"]
        else:
            spec["clusterIP"] = service_ip(i)
            spec["clusterIPs"] = [service_ip(i)]
        services.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": d["name"], "namespace": d["ns"], "uid": _uid(rng), "creationTimestamp": _ts(3600 + i),
                         "labels": {"app": d["name"]}},
            "spec": spec,
        })

    # -- pods: every deployment gets at least one replica (when there are enough pods), the rest by weight
    counts = [0] * len(deployments)
    for j in range(min(shape.pods, len(deployments))):
        counts[j] += 1
    weights = [rng.choice((1, 1, 2, 3, 5)) for _ in deployments]
    for _ in range(shape.pods - sum(counts)):
        counts[rng.choices(range(len(deployments)), weights)[0]] += 1
    # balanced node placement in a shuffled order; addresses .3 upwards in each node's /24
    slots = [i for i in range(shape.nodes)]
    rng.shuffle(slots)
    next_host = [3] * shape.nodes
    serial = 0
    for d, count in zip(deployments, counts):
        rs = _suffix(rng, 9)
        for _ in range(count):
            n = slots[serial % shape.nodes]
            serial += 1
            ip = str(node_cidr(n)[next_host[n]])
            next_host[n] += 1
            labels = {"app": d["name"], "version": "v1", "pod-template-hash": rs}
            if rng.random() < shape.opt_out_share:
                labels[ENROLL_LABEL] = "none"
            containers = [{"name": "app", "image": f"example/{d['name']}:1.0",
                           "ports": [{"name": name, "containerPort": cport, "protocol": proto} for name, _, proto, _, cport in d["ports"]]}]
            pods.append(_pod_object(
                name=f"{d['name']}-{rs}-{_suffix(rng, 5)}", ns=d["ns"], uid=_uid(rng), node=node_name(n), sa=d["sa"],
                labels=labels, ip=ip, ready=rng.random() >= shape.not_ready_share, created=_ts(7200 + serial), containers=containers,
            ))
    return {"cluster.yaml": cluster, "ztunnel.yaml": ztunnels, "services.yaml": services, "pods.yaml": pods}


def _pod_object(*, name: str, ns: str, uid: str, node: str, sa: str, labels: dict[str, str], ip: str, ready: bool,
                created: str, containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels, "creationTimestamp": created},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": containers},
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def render(objects: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys sorted: the same objects always give the same bytes."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=True, default_flow_style=False, explicit_start=True, width=200)


def write(shape: Shape, out: Path) -> list[Path]:
    """Write the manifests into directory ``out`` (created; our files in it are replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, objs in generate(shape).items():
        p = out / fname
        p.write_text(render(objs))
        written.append(p)
    return written


# -- CLI --------------------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    shape = Shape(nodes=args.nodes, pods=args.pods, services=args.services, seed=args.seed)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        print(f"error: {out} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        files = write(shape, out)
    except SynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {out}: {shape.nodes} nodes, {shape.pods} pods (+{shape.nodes} ztunnels), {shape.services} services")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("synth", help="write a deterministic synthetic cluster's manifests (for benchmarks)")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--pods", type=int, required=True, help="application pods (one ztunnel pod per node comes on top)")
    s.add_argument("--services", type=int, required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("-o", "--output", required=True, help="directory to write cluster.yaml, ztunnel.yaml, services.yaml, pods.yaml into")
    s.set_defaults(func=cmd_synth)
