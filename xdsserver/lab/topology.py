"""The lab topology the manifests describe: a fabric, one namespace per node, one per pod.

Node addresses and pod CIDRs come from the Node objects when given (kind: ``172.18.0.X/16``,
``10.244.N.0/24``); otherwise they are assigned. Namespace and interface names are derived
from the lab prefix and the pod/node names, so a later ``down`` finds everything by prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from ..model import Model, Pod
from ..model.index import MeshIndex
from ..redirect.plan import PlanError, node_net, pod_veth_name

FABRIC_NET = ipaddress.ip_network("172.18.0.0/16")


@dataclass(frozen=True, slots=True)
class LabPod:
    key: str  # namespace/name
    name: str
    ip: str
    node: str
    netns: str
    veth: str  # node-side veth
    ports: tuple[int, ...]  # declared TCP container ports (the pod server listens there)
    ztunnel: bool
    enrolled: bool


@dataclass(frozen=True, slots=True)
class LabNode:
    name: str
    netns: str
    ip: str  # eth0 on the fabric
    fabric_link: str  # fabric-side veth name
    pod_cidr: str
    gateway: str
    ztunnel: str  # key of the ztunnel pod


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    fabric_netns: str
    control_netns: str
    fabric_gateway: str
    fabric_prefixlen: int
    nodes: tuple[LabNode, ...]
    pods: tuple[LabPod, ...]

    def node(self, name: str) -> LabNode:
        return next(n for n in self.nodes if n.name == name)

    def pod(self, key: str) -> LabPod:
        return next(p for p in self.pods if p.key == key)

    def find_pod(self, query: str) -> LabPod:
        """A pod by ``ns/name``, name, or a unique prefix of either."""
        for attr in ("key", "name"):
            exact = [p for p in self.pods if getattr(p, attr) == query]
            if len(exact) == 1:
                return exact[0]
        hits = [p for p in self.pods if p.key.startswith(query) or p.name.startswith(query)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise KeyError(f"no pod matches {query!r}; pods: {', '.join(p.key for p in self.pods)}")
        raise KeyError(f"{query!r} is ambiguous: {', '.join(p.key for p in hits)}")


def _short(text: str, limit: int) -> str:
    """Namespace names are file names; keep them readable but bounded."""
    if len(text) <= limit:
        return text
    return text[: limit - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def pod_netns(prefix: str, pod: Pod) -> str:
    return _short(f"{prefix}-pod-{pod.namespace}-{pod.name}", 200)


def build_topology(model: Model, prefix: str, index: MeshIndex | None = None) -> Topology:
    """Raises :class:`PlanError` naming the node/pod when the manifests cannot be laid out."""
    index = index or MeshIndex(model)
    node_objs = {n.name: n for n in model.nodes}
    names = list(index.node_names)
    if not names:
        raise PlanError("the manifests name no node (no Node objects and no pod with spec.nodeName)")
    given = {}
    for name in names:
        ip = node_objs[name].internal_ip if name in node_objs else ""
        if ip:
            addr = ipaddress.ip_address(ip)
            if addr not in FABRIC_NET:
                raise PlanError(f"Node {name}: InternalIP {ip} is outside the lab fabric {FABRIC_NET}")
            given[name] = ip
    used = set(given.values())
    gateway = next(str(h) for h in FABRIC_NET.hosts() if str(h) not in used)
    free = (str(h) for h in FABRIC_NET.hosts() if str(h) not in used and str(h) != gateway)
    nodes: list[LabNode] = []
    for i, name in enumerate(names):
        ip = given.get(name) or next(free)
        net = node_net(model, index, name)
        nodes.append(LabNode(name, _short(f"{prefix}-node-{name}", 200), ip, f"fab{i}", net.pod_cidr, net.gateway, net.ztunnel.key))
    cidrs = [ipaddress.ip_network(n.pod_cidr) for n in nodes]
    for a in range(len(cidrs)):
        for b in range(a + 1, len(cidrs)):
            if cidrs[a].overlaps(cidrs[b]):
                raise PlanError(f"nodes {nodes[a].name} and {nodes[b].name}: pod CIDRs {cidrs[a]} and {cidrs[b]} overlap")
    enrolled = {wl.pod.key for wl in index.workloads}
    by_node = {n.name: n for n in nodes}
    pods: list[LabPod] = []
    seen_ips: dict[str, str] = {}
    for p in sorted(model.pods, key=lambda p: (p.namespace, p.name)):
        if p.host_network or not p.ip or not p.node_name or ":" in p.ip:
            continue  # host-network pods live in the node namespace; IPv6-only pods are not laid out
        node = by_node[p.node_name]
        if ipaddress.ip_address(p.ip) not in ipaddress.ip_network(node.pod_cidr):
            raise PlanError(f"pod {p.key}: IP {p.ip} is outside node {node.name}'s pod CIDR {node.pod_cidr}")
        if p.ip in seen_ips:
            raise PlanError(f"pods {seen_ips[p.ip]} and {p.key} share IP {p.ip}")
        seen_ips[p.ip] = p.key
        ports = tuple(sorted({cp.port for cp in p.ports if cp.protocol.upper() == "TCP"}))
        pods.append(LabPod(p.key, p.name, p.ip, p.node_name, pod_netns(prefix, p), pod_veth_name(p), ports,
                           p.key == node.ztunnel, p.key in enrolled))
    return Topology(prefix, f"{prefix}-fabric", f"{prefix}-cp", gateway, FABRIC_NET.prefixlen, tuple(nodes), tuple(pods))
