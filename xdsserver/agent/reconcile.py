"""Reconcile, don't replay: read one namespace's state, apply only what differs from its plan part.

A :class:`~xdsserver.redirect.plan.NetnsPlan` (the node's or the ztunnel pod's share of
``build_plan``) is brought about in dependency order — tunnel devices and their addresses,
sysctls, the ipset, iptables chains, ip rules, routes — each step reading the kernel afresh, so a
device recreated for a new ztunnel IP has its routes restored in the same pass.

What is ours (and the only thing ever changed or removed):

- devices named in the plan (``istioin``/``istioout``, ``pistioin``/``pistioout``);
- the ``ztunnel-pods-ips`` set;
- chains the plan names: user chains (``ztunnel-*``) with their one jump from the built-in chain,
  and — inside the ztunnel pod only — the built-in chains the plan fills (its ``mangle
  PREROUTING`` and ``nat OUTPUT``);
- ip rules at the plan's priorities (100-103; 20000/20003/20004 in the pod);
- every route of the plan's tables (100-102; 100 in the pod).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..redirect.commands import device_commands
from ..redirect.plan import IPSET_NAME, Chain, NetnsPlan, TunnelDevice
from . import kernel as K
from .kernel import Runner

IPSET_CREATE = ("ipset", "create", IPSET_NAME, "hash:ip", "family", "inet", "hashsize", "1024", "maxelem", "65536")
IPT_TABLE_ORDER = ("mangle", "nat", "filter", "raw")


@dataclass(frozen=True, slots=True)
class Change:
    """One difference corrected: which object, how, and the command that did it."""

    obj: str  # e.g. "route 100 10.244.1.4", "ipset member 10.244.1.4", "chain mangle/ztunnel-PREROUTING"
    op: str  # add | replace | delete | set
    argv: tuple[str, ...]
    stdin: str | None = None

    def as_log(self) -> dict:
        return {"object": self.obj, "op": self.op, "cmd": list(self.argv)}


@dataclass(slots=True)
class Changes:
    """What one reconcile did, in apply order, plus the steps that failed (retried next pass)."""

    done: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.done)

    def extend(self, other: Changes) -> None:
        self.done += other.done
        self.errors += other.errors


def _apply(run: Runner, changes: Iterable[Change], out: Changes) -> bool:
    """Run each change; a failure is recorded and stops this step (later steps depend on it)."""
    for ch in changes:
        try:
            run(ch.argv, ch.stdin)
        except K.KernelError as exc:
            out.errors.append(f"{ch.obj}: {exc}")
            return False
        out.done.append(ch)
    return True


# -- desired-vs-current, one step each --------------------------------------------------------
def device_changes(devices: tuple[TunnelDevice, ...], links: dict[str, K.Link]) -> list[Change]:
    out: list[Change] = []
    for dev in devices:
        have = links.get(dev.name)
        add, addr, up = (Change(f"device {dev.name}", op, c.argv) for c, op in zip(device_commands(dev), ("add", "add", "set")))
        params_ok = have is not None and have.kind == dev.kind and have.vni == dev.vni and have.remote == dev.remote \
            and (dev.kind != "vxlan" or have.port == dev.port)
        if have is not None and not params_ok:  # wrong parameters (e.g. a new ztunnel IP): recreate
            out.append(Change(f"device {dev.name}", "delete", ("ip", "link", "del", dev.name)))
        if not params_ok:
            out += [add, addr, up]
            continue
        for a in have.ipv4:
            if a != dev.address:
                out.append(Change(f"device {dev.name} address {a}", "delete", ("ip", "addr", "del", a, "dev", dev.name)))
        if dev.address not in have.ipv4:
            out.append(Change(f"device {dev.name} address {dev.address}", "add", addr.argv))
        if not have.up:
            out.append(up)
    return out


def sysctl_changes(sysctls: tuple[tuple[str, str], ...], current: dict[str, str | None]) -> list[Change]:
    return [Change(f"sysctl {k}", "set", ("sysctl", "-qw", f"{k}={v}")) for k, v in sysctls if current.get(k) != v]


def ipset_changes(members: tuple[str, ...], sets: dict[str, frozenset[str]]) -> list[Change]:
    out: list[Change] = []
    have = sets.get(IPSET_NAME)
    if have is None:
        out.append(Change(f"ipset {IPSET_NAME}", "add", IPSET_CREATE))
        have = frozenset()
    want = set(members)
    out += [Change(f"ipset member {ip}", "add", ("ipset", "add", "-exist", IPSET_NAME, ip)) for ip in sorted(want - have, key=_ipkey)]
    out += [Change(f"ipset member {ip}", "delete", ("ipset", "del", "-exist", IPSET_NAME, ip)) for ip in sorted(have - want, key=_ipkey)]
    return out


def _ipkey(ip: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split(".")) if ip.count(".") == 3 else (1 << 30,)


def chain_changes(chains: tuple[Chain, ...], tables: dict[str, K.IptTable]) -> list[Change]:
    """Per table one ``iptables-restore --noflush`` (atomic), listing only chains that differ.

    A differing chain is flushed and refilled (rule order matters; a partial edit could leave a
    half-old chain visible); a missing jump is inserted first in its built-in chain, so our
    nat PREROUTING runs before kube-proxy's DNAT whoever started first."""
    out: list[Change] = []
    for table in sorted({c.table for c in chains}, key=IPT_TABLE_ORDER.index):
        cur = tables[table]
        lines: list[str] = []
        objs: list[str] = []
        for c in (c for c in chains if c.table == table):
            want = tuple(" ".join(r) for r in c.rules)
            if c.hook and c.name not in cur.chains:
                lines.append(f":{c.name} - [0:0]")
                lines += [f"-A {c.name} {r}" for r in want]
                objs.append(f"chain {table}/{c.name}")
            elif cur.rules.get(c.name, ()) != want:
                lines.append(f"-F {c.name}")
                lines += [f"-A {c.name} {r}" for r in want]
                objs.append(f"chain {table}/{c.name}")
            if c.hook and f"-j {c.name}" not in cur.rules.get(c.hook, ()):
                lines.append(f"-I {c.hook} 1 -j {c.name}")
                objs.append(f"jump {table}/{c.hook}->{c.name}")
        if lines:
            text = "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"
            out.append(Change(", ".join(objs), "replace", ("iptables-restore", "--noflush"), text))
    return out


def rule_changes(rules, current: dict[int, list[str]]) -> list[Change]:
    out: list[Change] = []
    for r in rules:
        have = current.get(r.priority, [])
        if have == [r.show()]:
            continue
        out += [Change(f"rule {r.priority}", "delete", ("ip", "rule", "del", "priority", str(r.priority))) for _ in have]
        out.append(Change(f"rule {r.priority}", "add", ("ip", "rule", "add", "priority", str(r.priority), *r.selector, *r.action)))
    return out


def route_changes(routes, tables: dict[int, dict[tuple[str, ...], tuple[str, ...]]]) -> list[Change]:
    out: list[Change] = []
    for table, have in sorted(tables.items()):
        want = {K.route_key(r.spec): r.spec for r in routes if r.table == table}
        for key, spec in want.items():
            if have.get(key) != spec:
                out.append(Change(f"route {table} {' '.join(key)}", "replace" if key in have else "add",
                                  ("ip", "route", "replace", "table", str(table), *spec)))
        for key in sorted(set(have) - set(want)):
            out.append(Change(f"route {table} {' '.join(key)}", "delete", ("ip", "route", "del", "table", str(table), *key)))
    return out


# -- the whole namespace ------------------------------------------------------------------------
def reconcile(part: NetnsPlan, run: Runner) -> Changes:
    """Bring one namespace to ``part``. Steps run in dependency order; a failed step is recorded
    in ``errors`` and the steps after it still run (they are retried, with it, next pass)."""
    out = Changes()
    steps = [
        lambda: device_changes(part.devices, K.read_links(run)),
        lambda: sysctl_changes(part.sysctls, {k: K.read_sysctl(run, k) for k, _ in part.sysctls}),
    ]
    if part.ipset is not None:
        steps.append(lambda: ipset_changes(part.ipset, K.read_ipsets(run)))
    steps += [
        lambda: chain_changes(part.chains, {t: K.read_iptables(run, t) for t in {c.table for c in part.chains}}),
        lambda: rule_changes(part.rules, K.read_rules(run)),
        lambda: route_changes(part.routes, {t: K.read_routes(run, t) for t in sorted({r.table for r in part.routes})}),
    ]
    for step in steps:
        try:
            todo = step()
        except K.KernelError as exc:
            out.errors.append(f"read: {exc}")
            continue
        _apply(run, todo, out)
    return out


def cleanup(part: NetnsPlan, run: Runner) -> Changes:
    """Remove everything of ``part`` (see the module docstring for what is ours), in reverse
    dependency order. Things already gone are skipped; nothing else is touched."""
    out = Changes()
    tables = sorted({r.table for r in part.routes})
    steps = [
        lambda: _cleanup_chains(part.chains, {t: K.read_iptables(run, t) for t in {c.table for c in part.chains}}),
        lambda: [Change(f"rule {p}", "delete", ("ip", "rule", "del", "priority", str(p)))
                 for p, have in sorted(K.read_rules(run).items()) if p in {r.priority for r in part.rules} for _ in have],
        lambda: [Change(f"route {t} {' '.join(k)}", "delete", ("ip", "route", "del", "table", str(t), *k))
                 for t in tables for k in sorted(K.read_routes(run, t))],
        lambda: [Change(f"device {d.name}", "delete", ("ip", "link", "del", d.name))
                 for d in part.devices if d.name in K.read_links(run)],
    ]
    if part.ipset is not None:
        steps.append(lambda: [Change(f"ipset {IPSET_NAME}", "delete", ("ipset", "destroy", IPSET_NAME))]
                     if IPSET_NAME in K.read_ipsets(run) else [])
    for step in steps:
        try:
            _apply(run, step(), out)
        except K.KernelError as exc:
            out.errors.append(f"read: {exc}")
    return out


def _cleanup_chains(chains: tuple[Chain, ...], tables: dict[str, K.IptTable]) -> list[Change]:
    out: list[Change] = []
    for table in sorted(tables, key=IPT_TABLE_ORDER.index):
        cur = tables[table]
        lines: list[str] = []
        for c in (c for c in chains if c.table == table):
            if c.hook:
                lines += [f"-D {c.hook} -j {c.name}" for r in cur.rules.get(c.hook, ()) if r == f"-j {c.name}"]
                if c.name in cur.chains:
                    lines += [f"-F {c.name}", f"-X {c.name}"]
            else:  # a built-in chain of the ztunnel pod: remove exactly our rules
                mine = {" ".join(r) for r in c.rules}
                lines += [f"-D {c.name} {r}" for r in cur.rules.get(c.name, ()) if r in mine]
        if lines:
            out.append(Change(f"chains {table}", "delete", ("iptables-restore", "--noflush"),
                              "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"))
    return out
