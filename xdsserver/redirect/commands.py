"""Plan -> commands. One list of commands is both what ``xdsserver redirect`` prints and what the
lab executes (inside the right namespace), so the printed plan is the tested one.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from .plan import IPSET_NAME, Chain, NetnsPlan, RedirectPlan, TunnelDevice


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    stdin: str | None = None
    comment: str = ""


def iptables_restore_text(chains: tuple[Chain, ...]) -> str:
    """``iptables-restore --noflush`` input: declares (and so flushes) the plan's own chains,
    hooks them into the built-in chains and appends their rules, table by table."""
    out: list[str] = []
    for table in sorted({c.table for c in chains}, key=("mangle", "nat", "filter", "raw").index):
        mine = [c for c in chains if c.table == table]
        out.append(f"*{table}")
        out += [f":{c.name} - [0:0]" for c in mine if c.hook]
        out += [f"-A {c.hook} -j {c.name}" for c in mine if c.hook]
        for c in mine:
            out += [f"-A {c.name} {' '.join(r)}" for r in c.rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def ipset_restore_text(members: tuple[str, ...], name: str = IPSET_NAME) -> str:
    lines = [f"create {name} hash:ip family inet hashsize 1024 maxelem 65536"]
    lines += [f"add {name} {ip}" for ip in members]
    return "\n".join(lines) + "\n"


def device_commands(dev: TunnelDevice) -> list[Command]:
    if dev.kind == "vxlan":
        add = ("ip", "link", "add", dev.name, "type", "vxlan", "id", str(dev.vni), "remote", dev.remote, "dstport", str(dev.port))
    else:
        add = ("ip", "link", "add", dev.name, "type", "geneve", "id", str(dev.vni), "remote", dev.remote)
    return [
        Command(add, comment=f"{dev.kind} VNI {dev.vni} to {dev.remote}:{dev.port}"),
        Command(("ip", "addr", "add", dev.address, "dev", dev.name)),
        Command(("ip", "link", "set", dev.name, "up")),
    ]


def netns_commands(plan: NetnsPlan) -> list[Command]:
    """Order: devices (sysctls name them), sysctls, ipset (iptables references it), iptables,
    then rules and routes (routes name the devices)."""
    cmds: list[Command] = []
    for dev in plan.devices:
        cmds += device_commands(dev)
    cmds += [Command(("sysctl", "-qw", f"{k}={v}")) for k, v in plan.sysctls]
    if plan.ipset is not None:
        cmds.append(Command(("ipset", "restore", "-exist"), ipset_restore_text(plan.ipset), comment=f"{IPSET_NAME}: captured pods"))
    cmds.append(Command(("iptables-restore", "--noflush"), iptables_restore_text(plan.chains)))
    cmds += [Command(("ip", "rule", "add", "priority", str(r.priority), *r.selector, *r.action)) for r in plan.rules]
    cmds += [Command(("ip", "route", "add", "table", str(r.table), *r.spec)) for r in plan.routes]
    return cmds


def render_script(plan: RedirectPlan) -> str:
    """A readable, runnable shell rendering: the node part in the node's network namespace,
    the ztunnel part inside the ztunnel pod's (run it with ``ip netns exec``/``nsenter``)."""
    net = plan.net
    lines = [
        f"# xdsserver redirect plan for node {net.node}",
        f"# ztunnel pod {net.ztunnel.key} {net.ztunnel_ip} (node-side veth {net.ztunnel_veth}), "
        f"pod CIDR {net.pod_cidr}, pod gateway {net.gateway}, tunnels: {plan.tunnel}",
        f"# captured pods ({len(plan.captured)}): " + (", ".join(f"{p.key} {p.ip}" for p in plan.captured) or "none"),
        "",
        "### node network namespace",
    ]
    lines += _script(netns_commands(plan.node))
    lines += ["", f"### inside the ztunnel pod {net.ztunnel.key}"]
    lines += _script(netns_commands(plan.ztunnel))
    return "\n".join(lines) + "\n"


def _script(cmds: list[Command]) -> list[str]:
    out: list[str] = []
    for c in cmds:
        if c.comment:
            out.append(f"# {c.comment}")
        line = shlex.join(c.argv)
        if c.stdin is None:
            out.append(line)
        else:
            out += [f"{line} <<'EOF'", c.stdin.rstrip("\n"), "EOF"]
    return out


def plan_to_dict(plan: RedirectPlan) -> dict:
    def part(p: NetnsPlan) -> dict:
        return {
            "sysctls": [f"{k}={v}" for k, v in p.sysctls],
            "devices": [
                {"name": d.name, "kind": d.kind, "vni": d.vni, "address": d.address, "remote": d.remote, "port": d.port}
                for d in p.devices
            ],
            "ipset": None if p.ipset is None else {"name": IPSET_NAME, "members": list(p.ipset)},
            "iptables_restore": iptables_restore_text(p.chains),
            "ip_rules": [r.show() for r in p.rules],
            "routes": {str(t): [r.show() for r in p.routes if r.table == t] for t in sorted({r.table for r in p.routes})},
        }

    net = plan.net
    return {
        "node": net.node,
        "pod_cidr": net.pod_cidr,
        "gateway": net.gateway,
        "ztunnel": {"pod": net.ztunnel.key, "ip": net.ztunnel_ip, "veth": net.ztunnel_veth},
        "tunnel": plan.tunnel,
        "captured": [{"pod": p.key, "ip": p.ip} for p in plan.captured],
        "host": part(plan.node),
        "ztunnel_pod": part(plan.ztunnel),
    }


def render_json(plan: RedirectPlan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"
