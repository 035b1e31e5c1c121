"""The node redirection plan: what the node agent (istio-cni's role) sets up on one node.

Built from the same :class:`MeshIndex` as the xDS side, so the ipset of captured pods and the
ztunnel's node-local workload set come from one enrollment predicate (data-path.md §9). The plan
is plain data (rules as token tuples); :mod:`.commands` turns it into the exact commands that
``xdsserver redirect`` prints and the lab runs. Rule order and values follow data-path.md §4-§5
and the seed 003 dumps; marks and ports come from :mod:`xdsserver.model.ports`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from ..model import Model, Pod
from ..model import ports as P
from ..model.index import MeshIndex

IPSET_NAME = "ztunnel-pods-ips"
ZTUNNEL_APP_LABEL = ("app", "ztunnel")
TUNNEL_KINDS = ("vxlan", "geneve")

NODE_INBOUND_DEV = "istioin"
NODE_OUTBOUND_DEV = "istioout"
ZT_INBOUND_DEV = "pistioin"
ZT_OUTBOUND_DEV = "pistioout"
NODE_INBOUND_ADDR = "192.168.126.1/30"
NODE_OUTBOUND_ADDR = "192.168.127.1/30"
ZT_INBOUND_ADDR = "192.168.126.2/30"
ZT_OUTBOUND_ADDR = "192.168.127.2/30"

# Routing tables (node: 100 inbound/istioin, 101 outbound/istioout, 102 connmark path; ztunnel: 100 local).
TABLE_INBOUND, TABLE_OUTBOUND, TABLE_CONNMARK = 100, 101, 102
ZT_TABLE_LOCAL = 100
ZT_LOOPBACK_RULE = 20004


class PlanError(ValueError):
    """The model cannot be turned into a plan for this node (message names node/pod/field)."""


def hexmark(value: int) -> str:
    return hex(value)


def mm(value: int, mask: int | None = None) -> str:
    """``value/mask`` as iptables and ip-rule print it (mask defaults to the value: OR the bits)."""
    return f"{hex(value)}/{hex(value if mask is None else mask)}"


def pod_veth_name(pod: Pod) -> str:
    """Node-side veth name of a pod: ``veth`` + 8 hex digits, like kindnet/ptp (stable per pod)."""
    seed = pod.uid or pod.key
    return "veth" + hashlib.sha256(seed.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class NodeNet:
    """Addressing of one node the plan needs: pod CIDR, pod gateway, ztunnel pod and its veth."""

    node: str
    pod_cidr: str
    gateway: str  # first host of the pod CIDR (kindnet/ptp: 10.244.X.1 on every node-side veth)
    ztunnel: Pod
    ztunnel_veth: str

    @property
    def ztunnel_ip(self) -> str:
        return self.ztunnel.ip


def ztunnel_pod(index: MeshIndex, node: str) -> Pod:
    """The pod labelled ``app: ztunnel`` on ``node`` (exactly one, with an IPv4 address)."""
    found = [p for p in index.pods_by_node.get(node, ()) if dict(p.labels).get(ZTUNNEL_APP_LABEL[0]) == ZTUNNEL_APP_LABEL[1]]
    if not found:
        raise PlanError(f"node {node!r}: no ztunnel pod (a Pod with label app=ztunnel and spec.nodeName={node})")
    if len(found) > 1:
        raise PlanError(f"node {node!r}: {len(found)} ztunnel pods ({', '.join(p.key for p in found)}); expected one")
    zt = found[0]
    if not zt.ip or ":" in zt.ip:
        raise PlanError(f"pod {zt.key}: ztunnel needs an IPv4 status.podIP, got {zt.ip!r}")
    if zt.host_network:
        raise PlanError(f"pod {zt.key}: ztunnel must not use hostNetwork (the plan needs its own veth)")
    return zt


def node_pod_cidr(model: Model, index: MeshIndex, node: str) -> str:
    """``spec.podCIDR`` of the Node, else the /24 around the node's pods (all must agree)."""
    for n in model.nodes:
        if n.name == node and n.pod_cidr:
            try:
                net = ipaddress.ip_network(n.pod_cidr, strict=True)
            except ValueError as exc:
                raise PlanError(f"Node {node}: spec.podCIDR {n.pod_cidr!r}: {exc}") from None
            if net.version != 4:
                raise PlanError(f"Node {node}: spec.podCIDR {n.pod_cidr!r}: only IPv4 pod CIDRs are supported")
            return str(net)
    nets = {str(ipaddress.ip_network(f"{p.ip}/24", strict=False)) for p in index.pods_by_node.get(node, ())
            if p.ip and not p.host_network and ":" not in p.ip}
    if len(nets) != 1:
        raise PlanError(f"node {node!r}: no Node spec.podCIDR and the pod IPs span {sorted(nets) or 'no'} /24s; add a Node object")
    return nets.pop()


def node_net(model: Model, index: MeshIndex, node: str, ztunnel_veth: str | None = None) -> NodeNet:
    cidr = node_pod_cidr(model, index, node)
    zt = ztunnel_pod(index, node)
    net = ipaddress.ip_network(cidr)
    if ipaddress.ip_address(zt.ip) not in net:
        raise PlanError(f"pod {zt.key}: IP {zt.ip} is outside node {node}'s pod CIDR {cidr}")
    return NodeNet(node, cidr, str(net.network_address + 1), zt, ztunnel_veth or pod_veth_name(zt))


@dataclass(frozen=True, slots=True)
class TunnelDevice:
    name: str
    kind: str  # "vxlan" | "geneve"
    vni: int
    address: str  # CIDR on the device
    remote: str

    @property
    def port(self) -> int:
        return P.VXLAN_PORT if self.kind == "vxlan" else P.GENEVE_PORT


@dataclass(frozen=True, slots=True)
class IpRule:
    priority: int
    selector: tuple[str, ...]  # e.g. ("fwmark", "0x200/0x200"); empty = "from all"
    action: tuple[str, ...]  # ("goto", "32766") | ("lookup", "101")

    def show(self) -> str:
        """As ``ip rule show`` prints it."""
        sel = list(self.selector) if self.selector[:1] == ("from",) else ["from", "all", *self.selector]
        return " ".join([f"{self.priority}:", *sel, *self.action])


@dataclass(frozen=True, slots=True)
class Route:
    table: int
    spec: tuple[str, ...]  # ("10.244.1.4", "via", "192.168.126.2", "dev", "istioin", "src", "10.244.1.1")

    def show(self) -> str:
        return " ".join(self.spec)


@dataclass(frozen=True, slots=True)
class Chain:
    table: str  # iptables table
    name: str
    hook: str | None  # built-in chain that jumps here (appended), None for a built-in chain itself
    rules: tuple[tuple[str, ...], ...]  # rule specs without "-A CHAIN"


@dataclass(frozen=True, slots=True)
class NetnsPlan:
    """One network namespace's share of the plan (the node's or the ztunnel pod's)."""

    sysctls: tuple[tuple[str, str], ...]
    devices: tuple[TunnelDevice, ...]
    ipset: tuple[str, ...] | None  # members of IPSET_NAME; None: no ipset in this namespace
    chains: tuple[Chain, ...]
    rules: tuple[IpRule, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RedirectPlan:
    net: NodeNet
    tunnel: str
    captured: tuple[Pod, ...]  # enrolled pods on the node (ipset + table 100), sorted by IP
    node: NetnsPlan
    ztunnel: NetnsPlan


def _ip_key(ip: str) -> int:
    return int(ipaddress.ip_address(ip))


def captured_pods(index: MeshIndex, node: str) -> tuple[Pod, ...]:
    """Enrolled pods on the node with an IPv4 address: exactly the xDS side's local workloads."""
    pods = [p for p in index.enrolled_pods_on(node) if ":" not in p.ip]
    return tuple(sorted(pods, key=lambda p: _ip_key(p.ip)))


def node_chains(net: NodeNet, tunnel: str) -> tuple[Chain, ...]:
    zt, veth, gw = net.ztunnel_ip, net.ztunnel_veth, net.gateway
    skip, owned, never = P.MARK_SKIP, P.MARK_ZTUNNEL_OWNED, P.MARK_NEVER_CAPTURE
    path, capture = P.MARK_CONNMARK_PATH, P.MARK_CAPTURE_OUTBOUND
    tport = str(P.VXLAN_PORT if tunnel == "vxlan" else P.GENEVE_PORT)

    def mark(v: int) -> tuple[str, ...]:
        return ("-j", "MARK", "--set-xmark", mm(v))

    def has(v: int) -> tuple[str, ...]:
        return ("-m", "mark", "--mark", mm(v))

    ret = ("-j", "RETURN")
    prerouting = (
        ("-i", NODE_INBOUND_DEV, *mark(skip)),  # N1
        ("-i", NODE_INBOUND_DEV, *ret),  # N2
        ("-i", NODE_OUTBOUND_DEV, *mark(skip)),  # N3
        ("-i", NODE_OUTBOUND_DEV, *ret),  # N4
        ("-p", "udp", "-m", "udp", "--dport", tport, *ret),  # N5 the encapsulated tunnel packets
        ("-m", "connmark", "--mark", mm(never), *mark(skip)),  # N6
        (*has(skip), *ret),  # N7
        ("!", "-i", veth, "-m", "connmark", "--mark", mm(owned), *mark(path)),  # N8
        (*has(path), *ret),  # N9
        ("!", "-s", f"{zt}/32", "-i", veth, *mark(owned)),  # N10
        (*has(skip), *ret),  # N11
        ("-i", veth, *mark(never)),  # N12
        ("-p", "udp", *mark(never)),  # N13
        (*has(skip), *ret),  # N14
        ("-p", "tcp", "-m", "set", "--match-set", IPSET_NAME, "src", *mark(capture)),  # N15
    )

    def save(v: int) -> tuple[str, ...]:
        return (*has(v), "-j", "CONNMARK", "--save-mark", "--nfmask", hex(v), "--ctmask", hex(v))

    saves = (save(never), save(owned))
    output = (("-s", f"{gw}/32", "-p", "tcp", "-m", "owner", "--socket-exists", "-m", "set", "--match-set", IPSET_NAME,
               "dst", "-j", "MARK", "--set-xmark", f"{hex(never)}/0xffffffff"),)
    nat_accept = ((*has(capture), "-j", "ACCEPT"),)
    return (
        Chain("mangle", "ztunnel-PREROUTING", "PREROUTING", prerouting),
        Chain("mangle", "ztunnel-INPUT", "INPUT", saves),
        Chain("mangle", "ztunnel-FORWARD", "FORWARD", saves),
        Chain("mangle", "ztunnel-OUTPUT", "OUTPUT", output),
        Chain("mangle", "ztunnel-POSTROUTING", "POSTROUTING", ()),
        Chain("nat", "ztunnel-PREROUTING", "PREROUTING", nat_accept),  # before KUBE-SERVICES: no DNAT
        Chain("nat", "ztunnel-POSTROUTING", "POSTROUTING", nat_accept),  # no masquerade
    )


def node_routing(net: NodeNet, captured: tuple[Pod, ...]) -> tuple[tuple[IpRule, ...], tuple[Route, ...]]:
    zt, veth, gw = net.ztunnel_ip, net.ztunnel_veth, net.gateway
    rules = (
        IpRule(100, ("fwmark", mm(P.MARK_SKIP)), ("goto", "32766")),
        IpRule(101, ("fwmark", mm(P.MARK_CAPTURE_OUTBOUND)), ("lookup", str(TABLE_OUTBOUND))),
        IpRule(102, ("fwmark", mm(P.MARK_CONNMARK_PATH)), ("lookup", str(TABLE_CONNMARK))),
        IpRule(103, (), ("lookup", str(TABLE_INBOUND))),
    )
    zt_link = (zt, "dev", veth, "scope", "link")
    in_via = ZT_INBOUND_ADDR.split("/")[0]
    routes = [Route(TABLE_INBOUND, zt_link)]
    routes += [Route(TABLE_INBOUND, (p.ip, "via", in_via, "dev", NODE_INBOUND_DEV, "src", gw)) for p in captured]
    routes += [
        Route(TABLE_OUTBOUND, ("default", "via", ZT_OUTBOUND_ADDR.split("/")[0], "dev", NODE_OUTBOUND_DEV)),
        Route(TABLE_OUTBOUND, zt_link),
        Route(TABLE_CONNMARK, ("default", "via", zt, "dev", veth, "onlink")),
        Route(TABLE_CONNMARK, zt_link),
    ]
    return rules, tuple(routes)


def ztunnel_chains(net: NodeNet) -> tuple[Chain, ...]:
    tproxy_mark = mm(P.MARK_TPROXY, P.MARK_TPROXY_MASK)

    def tproxy(port: int) -> tuple[str, ...]:
        return ("-j", "TPROXY", "--on-port", str(port), "--on-ip", "127.0.0.1", "--tproxy-mark", tproxy_mark)

    prerouting = (
        ("-i", ZT_INBOUND_DEV, "-p", "tcp", "-m", "tcp", "--dport", str(P.HBONE_PORT), *tproxy(P.HBONE_PORT)),  # Z1
        ("-i", ZT_OUTBOUND_DEV, "-p", "tcp", *tproxy(P.OUTBOUND_CAPTURE_PORT)),  # Z2
        ("-i", ZT_INBOUND_DEV, "-p", "tcp", *tproxy(P.INBOUND_PLAINTEXT_PORT)),  # Z3
        ("!", "-d", f"{net.ztunnel_ip}/32", "-i", "eth0", "-p", "tcp",
         "-j", "MARK", "--set-xmark", mm(P.MARK_ZTUNNEL_RETURN, P.MARK_TPROXY_MASK)),  # Z4
    )
    nat_output = (
        ("-p", "tcp", "-m", "tcp", "--dport", str(P.HBONE_NODE_LOCAL_PORT), "-j", "REDIRECT", "--to-ports", str(P.HBONE_PORT)),
        # Not in the seeds: HBONE to a pod on this node, addressed like any other (pod:15008),
        # loops to this ztunnel's own :15008 as 15088 does. With it a service's endpoints are the
        # same bytes on every node (stock flavor; translate/endpoints.py): one CLA per service
        # port instead of one per node hosting a backend. Locally originated packets only; HBONE
        # arriving from other nodes comes in on pistioin (Z1).
        ("-d", net.pod_cidr, "-p", "tcp", "-m", "tcp", "--dport", str(P.HBONE_PORT), "-j", "REDIRECT", "--to-ports", str(P.HBONE_PORT)),
    )
    return (
        Chain("mangle", "PREROUTING", None, prerouting),
        Chain("nat", "OUTPUT", None, nat_output),
    )


def ztunnel_routing() -> tuple[tuple[IpRule, ...], tuple[Route, ...]]:
    rules = (
        IpRule(20000, ("fwmark", mm(P.MARK_TPROXY, P.MARK_TPROXY_MASK)), ("lookup", str(ZT_TABLE_LOCAL))),
        IpRule(20003, ("fwmark", mm(P.MARK_ZTUNNEL_RETURN, P.MARK_TPROXY_MASK)), ("lookup", str(ZT_TABLE_LOCAL))),
        # Same-node HBONE: the nat OUTPUT REDIRECT makes :15008 answer from 127.0.0.1 to the spoofed
        # client pod IP; without this the SYN-ACK has no valid route (loopback source on eth0:
        # IpOutNoRoutes) and the tunnel times out (UF,URX). Not in the seeds; found in the lab.
        IpRule(ZT_LOOPBACK_RULE, ("from", "127.0.0.0/8"), ("lookup", str(ZT_TABLE_LOCAL))),
    )
    return rules, (Route(ZT_TABLE_LOCAL, ("local", "default", "dev", "lo", "scope", "host")),)


def build_plan(model: Model, node: str, *, tunnel: str = "vxlan", ztunnel_veth: str | None = None,
               index: MeshIndex | None = None) -> RedirectPlan:
    """The whole plan for ``node``. Raises :class:`PlanError` naming the node/pod/field at fault."""
    if tunnel not in TUNNEL_KINDS:
        raise PlanError(f"tunnel {tunnel!r}: expected one of {', '.join(TUNNEL_KINDS)}")
    index = index or MeshIndex(model)
    if node not in index.node_names:
        raise PlanError(f"unknown node {node!r}; known: {', '.join(index.node_names) or '(none)'}")
    net = node_net(model, index, node, ztunnel_veth)
    captured = captured_pods(index, node)
    cidr = ipaddress.ip_network(net.pod_cidr)
    for p in captured:
        if ipaddress.ip_address(p.ip) not in cidr:
            raise PlanError(f"pod {p.key}: IP {p.ip} is outside node {node}'s pod CIDR {net.pod_cidr}")
    n_rules, n_routes = node_routing(net, captured)
    z_rules, z_routes = ztunnel_routing()
    node_plan = NetnsPlan(
        sysctls=(
            ("net.ipv4.conf.all.rp_filter", "0"),
            (f"net.ipv4.conf.{net.ztunnel_veth}.rp_filter", "0"),
            (f"net.ipv4.conf.{net.ztunnel_veth}.accept_local", "1"),
        ),
        devices=(
            TunnelDevice(NODE_INBOUND_DEV, tunnel, P.INBOUND_TUNNEL_VNI, NODE_INBOUND_ADDR, net.ztunnel_ip),
            TunnelDevice(NODE_OUTBOUND_DEV, tunnel, P.OUTBOUND_TUNNEL_VNI, NODE_OUTBOUND_ADDR, net.ztunnel_ip),
        ),
        ipset=tuple(p.ip for p in captured),
        chains=node_chains(net, tunnel),
        rules=n_rules,
        routes=n_routes,
    )
    zt_plan = NetnsPlan(
        sysctls=(
            ("net.ipv4.conf.all.rp_filter", "0"),
            (f"net.ipv4.conf.{ZT_INBOUND_DEV}.rp_filter", "0"),
            (f"net.ipv4.conf.{ZT_OUTBOUND_DEV}.rp_filter", "0"),
        ),
        devices=(
            TunnelDevice(ZT_INBOUND_DEV, tunnel, P.INBOUND_TUNNEL_VNI, ZT_INBOUND_ADDR, net.gateway),
            TunnelDevice(ZT_OUTBOUND_DEV, tunnel, P.OUTBOUND_TUNNEL_VNI, ZT_OUTBOUND_ADDR, net.gateway),
        ),
        ipset=None,
        chains=ztunnel_chains(net),
        rules=z_rules,
        routes=z_routes,
    )
    return RedirectPlan(net, tunnel, captured, node_plan, zt_plan)
