"""Reconcile, don't replay: read the ipset members and table-100 pod routes, apply only the diff.

Why only these two: they are the part of the plan that changes when pods come and go (a pod
added -> ipset add + its table-100 route; removed -> both deleted). Everything else in the plan
is fixed per ztunnel pod. Nothing that is not ours is touched: only members of ``IPSET_NAME``
and table-100 routes via the ``istioin`` device are considered.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..redirect.plan import IPSET_NAME, NODE_INBOUND_DEV, TABLE_INBOUND, RedirectPlan

Runner = Callable[[Sequence[str]], str]


@dataclass(frozen=True, slots=True)
class KernelState:
    """The pod-dependent part of a node's state: ipset members and table-100 pod routes by dest."""

    members: frozenset[str]
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class Changes:
    """What one reconcile did (or would do), as argv lists in apply order."""

    commands: list[tuple[str, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.commands)


def desired_state(plan: RedirectPlan) -> KernelState:
    routes = {r.spec[0]: r.spec for r in plan.node.routes
              if r.table == TABLE_INBOUND and NODE_INBOUND_DEV in r.spec}
    return KernelState(frozenset(plan.node.ipset or ()), routes)


def parse_ipset_members(text: str) -> frozenset[str]:
    """Members from ``ipset list NAME`` output (lines after ``Members:``)."""
    lines = text.splitlines()
    try:
        start = lines.index("Members:") + 1
    except ValueError:
        return frozenset()
    return frozenset(line.split()[0] for line in lines[start:] if line.strip())


def parse_pod_routes(text: str) -> dict[str, tuple[str, ...]]:
    """``ip route show table 100`` -> {dest: tokens} for routes through ``istioin`` only."""
    out: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        tokens = tuple(line.split())
        if tokens and NODE_INBOUND_DEV in tokens:
            out[tokens[0]] = tokens
    return out


def diff(current: KernelState, desired: KernelState) -> Changes:
    """Commands turning ``current`` into ``desired``; empty when they are equal."""
    ch = Changes()
    for ip in sorted(desired.members - current.members):
        ch.commands.append(("ipset", "add", "-exist", IPSET_NAME, ip))
    for dest, spec in sorted(desired.routes.items()):
        if current.routes.get(dest) != spec:
            ch.commands.append(("ip", "route", "replace", "table", str(TABLE_INBOUND), *spec))
    for dest in sorted(set(current.routes) - set(desired.routes)):
        ch.commands.append(("ip", "route", "del", "table", str(TABLE_INBOUND), dest))
    for ip in sorted(current.members - desired.members):
        ch.commands.append(("ipset", "del", "-exist", IPSET_NAME, ip))
    return ch


def netns_runner(netns: str | None) -> Runner:
    """Run argv (in ``netns`` via ``ip netns exec`` when given); raise with stderr on failure."""
    prefix = ("ip", "netns", "exec", netns) if netns else ()

    def run(argv: Sequence[str]) -> str:
        p = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    return run


def read_state(run: Runner) -> KernelState:
    members = parse_ipset_members(run(("ipset", "list", IPSET_NAME)))
    try:
        text = run(("ip", "route", "show", "table", str(TABLE_INBOUND)))
    except RuntimeError as exc:  # a table without routes does not exist for the kernel: empty
        if "table does not exist" not in str(exc):
            raise
        text = ""
    routes = parse_pod_routes(text)
    return KernelState(members, routes)


def reconcile(plan: RedirectPlan, run: Runner) -> Changes:
    """Read, diff, apply. Returns what was changed (empty on a node already in the plan's state)."""
    changes = diff(read_state(run), desired_state(plan))
    for argv in changes.commands:
        run(argv)
    return changes
