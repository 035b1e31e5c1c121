"""One node's agent pass: source objects -> screened model -> plan -> reconcile both namespaces.

The plan is ``build_plan`` (the same code and enrollment predicate as ``xdsserver redirect``);
this module only adds what a plan cannot know: the ztunnel pod's node-side veth and network
namespace, found from the kernel (the main-table host route the CNI installed for the ztunnel
pod IP names the veth; the veth's peer namespace id names the pod's namespace), and the
per-object screening that keeps one bad pod from blocking the rest of the node.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..model import Model
from ..model.index import MeshIndex
from ..redirect import PlanError, RedirectPlan, build_plan
from ..redirect.plan import node_pod_cidr, ztunnel_pod
from ..sources import SourceObject
from ..sources.objects import build_model_lenient
from . import kernel as K
from .reconcile import Change, Changes, cleanup, reconcile


@dataclass(frozen=True, slots=True)
class Ztunnel:
    """Where the node's ztunnel pod is right now (from the model and the kernel)."""

    pod: str
    ip: str
    veth: str
    netns: str  # name under /run/netns


@dataclass(slots=True)
class PassResult:
    changes: list[tuple[str, Change]] = field(default_factory=list)  # (netns role, change)
    errors: list[str] = field(default_factory=list)  # plan and kernel errors (retried), each naming its object
    warnings: list[str] = field(default_factory=list)  # objects left out of the plan, each named
    plan: RedirectPlan | None = None
    seconds: float = 0.0


def screen_model(objects: Sequence[SourceObject], node: str) -> tuple[Model, list[str]]:
    """The model with every bad object left out, and one message per bad object.

    Duplicate pod IPs and invalid objects are dropped by the shared builder; here also pods on
    this node whose IP lies outside the node's pod CIDR (the plan refuses them)."""
    model, errs = build_model_lenient(objects)
    errors = [str(e) for e in errs]
    index = MeshIndex(model)
    try:
        cidr = ipaddress.ip_network(node_pod_cidr(model, index, node))
    except PlanError:
        return model, errors  # build_plan reports it
    keep = []
    for p in model.pods:
        if p.node_name == node and p.ip and not p.host_network and ":" not in p.ip and ipaddress.ip_address(p.ip) not in cidr:
            errors.append(f"Pod {p.key}: status.podIP {p.ip} is outside node {node}'s pod CIDR {cidr}; not captured")
            continue
        keep.append(p)
    if len(keep) != len(model.pods):
        model = dataclasses.replace(model, pods=tuple(keep))
    return model, errors


def find_ztunnel(model: Model, node: str, node_run: K.Runner, *, veth: str | None = None, netns: str | None = None) -> Ztunnel:
    """The ztunnel pod of ``node`` and its veth/namespace; :class:`PlanError` naming what is missing."""
    zt = ztunnel_pod(MeshIndex(model), node)
    if veth is None:
        veth = K.host_route_dev(node_run, zt.ip)
        if veth is None:
            raise PlanError(f"pod {zt.key}: no host route to its IP {zt.ip} in the node's main table (not wired by the CNI yet?)")
    if netns is None:
        link = K.read_links(node_run).get(veth)
        if link is None or link.link_netnsid is None:
            raise PlanError(f"pod {zt.key}: veth {veth} has no peer in another network namespace")
        netns = K.netns_name_of_id(node_run, link.link_netnsid)
        if netns is None:
            raise PlanError(f"pod {zt.key}: the namespace of veth {veth}'s peer (nsid {link.link_netnsid}) has no name under /run/netns")
    return Ztunnel(zt.key, zt.ip, veth, netns)


class NodeAgent:
    """Keeps one node equal to its plan. ``run_pass`` is safe to call any number of times."""

    def __init__(self, node: str, node_run: K.Runner, *, tunnel: str = "vxlan", ztunnel_veth: str | None = None,
                 ztunnel_netns: str | None = None,
                 ztunnel_runner: Callable[[str], K.Runner] = K.netns_runner) -> None:
        self.node = node
        self.node_run = node_run
        self.tunnel = tunnel
        self.ztunnel_veth = ztunnel_veth
        self.ztunnel_netns = ztunnel_netns
        self.ztunnel_runner = ztunnel_runner
        self.last_plan: RedirectPlan | None = None
        self.last_ztunnel: Ztunnel | None = None

    def plan_for(self, objects: Sequence[SourceObject]) -> tuple[RedirectPlan, Ztunnel, list[str]]:
        model, errors = screen_model(objects, self.node)
        zt = find_ztunnel(model, self.node, self.node_run, veth=self.ztunnel_veth, netns=self.ztunnel_netns)
        plan = build_plan(model, self.node, tunnel=self.tunnel, ztunnel_veth=zt.veth)
        return plan, zt, errors

    def run_pass(self, objects: Sequence[SourceObject]) -> PassResult:
        """Plan, then reconcile the node and the ztunnel pod. A plan error (no ztunnel pod, bad
        node) changes nothing: the last applied state stays, the error is returned."""
        started = time.monotonic()
        res = PassResult()
        try:
            plan, zt, res.warnings = self.plan_for(objects)
        except (PlanError, K.KernelError) as exc:
            res.errors.append(str(exc))
            res.seconds = time.monotonic() - started
            return res
        res.plan = plan
        for role, part, run in (("node", plan.node, self.node_run), ("ztunnel", plan.ztunnel, self.ztunnel_runner(zt.netns))):
            ch = reconcile(part, run)
            res.changes += [(role, c) for c in ch.done]
            res.errors += ch.errors
        self.last_plan, self.last_ztunnel = plan, zt
        res.seconds = time.monotonic() - started
        return res

    def cleanup(self, objects: Sequence[SourceObject]) -> Changes:
        """Remove everything the plan installs, in both namespaces (the pod's only if found)."""
        out = Changes()
        plan, zt, _ = self.plan_for(objects)
        out.extend(cleanup(plan.ztunnel, self.ztunnel_runner(zt.netns)))
        out.extend(cleanup(plan.node, self.node_run))
        return out
