"""Read a network namespace's redirection-relevant kernel state, through one command runner.

Every read goes through a :data:`Runner` (argv -> stdout, raising :class:`KernelError`), so the
agent reads and writes the node's namespace and the ztunnel pod's the same way (``ip netns exec``
for a named namespace, nothing for the agent's own). Parsers normalise whitespace and drop the
flags the kernel adds on its own (``linkdown``), so "equal" means "what the plan asked for".
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Runner = Callable[..., str]  # run(argv, stdin=None) -> stdout

ROUTE_TYPES = frozenset({"local", "broadcast", "unreachable", "prohibit", "blackhole", "throw", "multicast", "anycast", "nat", "unicast"})
ROUTE_NOISE = frozenset({"linkdown", "dead", "offload", "trap", "rt_offload", "rt_trap"})


class KernelError(RuntimeError):
    """A command failed; the message names the namespace and the command."""


def netns_runner(netns: str | None, label: str | None = None) -> Runner:
    """Run argv in the named namespace ``netns`` (``ip netns exec``), or in the caller's own."""
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    where = label or netns or "self"

    def run(argv: Sequence[str], stdin: str | None = None) -> str:
        try:
            p = subprocess.run([*prefix, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelError(f"[{where}] {' '.join(argv)}: {exc}") from exc
        if p.returncode != 0:
            raise KernelError(f"[{where}] {' '.join(argv)}: exit {p.returncode}: {(p.stderr or p.stdout).strip()}")
        return p.stdout

    return run


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    kind: str
    up: bool
    vni: int | None
    remote: str | None
    port: int | None
    ipv4: tuple[str, ...]  # "a.b.c.d/len"
    link_netnsid: int | None


def read_links(run: Runner) -> dict[str, Link]:
    """Every link with kind, admin state, tunnel parameters and IPv4 addresses."""
    links = json.loads(run(("ip", "-d", "-j", "link", "show")) or "[]")
    addrs = {a["ifname"]: a for a in json.loads(run(("ip", "-j", "addr", "show")) or "[]")}
    out: dict[str, Link] = {}
    for ln in links:
        name = ln["ifname"]
        info = ln.get("linkinfo") or {}
        data = info.get("info_data") or {}
        v4 = tuple(f"{a['local']}/{a['prefixlen']}" for a in addrs.get(name, {}).get("addr_info", []) if a.get("family") == "inet")
        out[name] = Link(name, info.get("info_kind", ""), "UP" in ln.get("flags", ()), data.get("id"), data.get("remote"),
                         data.get("port"), v4, ln.get("link_netnsid"))
    return out


def read_sysctl(run: Runner, key: str) -> str | None:
    """The value, or None when the key does not exist (e.g. a veth that is gone)."""
    try:
        return run(("sysctl", "-n", key)).strip()
    except KernelError as exc:
        if "cannot stat" in str(exc) or "No such file" in str(exc):
            return None
        raise


def read_ipsets(run: Runner) -> dict[str, frozenset[str]]:
    """Set name -> members, from ``ipset list``."""
    out: dict[str, frozenset[str]] = {}
    name, members, in_members = None, [], False
    for line in run(("ipset", "list")).splitlines() + ["Name: "]:
        if line.startswith("Name: "):
            if name is not None:
                out[name] = frozenset(members)
            name, members, in_members = line[6:].strip() or None, [], False
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            members.append(line.split()[0])
    return out


@dataclass(frozen=True, slots=True)
class IptTable:
    """One iptables table as ``iptables-save -t`` shows it: declared chains and their rules."""

    exists: bool
    chains: frozenset[str]
    rules: dict[str, tuple[str, ...]]  # chain -> rule specs (without "-A CHAIN "), in order


def parse_iptables_save(text: str) -> IptTable:
    chains: set[str] = set()
    rules: dict[str, list[str]] = {}
    exists = False
    for line in text.splitlines():
        if line.startswith("*"):
            exists = True
        elif line.startswith(":"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, *spec = line.split()
            rules.setdefault(chain, []).append(" ".join(spec))
    return IptTable(exists, frozenset(chains), {c: tuple(r) for c, r in rules.items()})


def read_iptables(run: Runner, table: str) -> IptTable:
    return parse_iptables_save(run(("iptables-save", "-t", table)))


def parse_rules(text: str) -> dict[int, list[str]]:
    """``ip rule show`` -> priority -> ["PRIO: from ... action", ...] (whitespace normalised)."""
    out: dict[int, list[str]] = {}
    for line in text.splitlines():
        prio, sep, rest = line.partition(":")
        if sep and prio.strip().isdigit():
            out.setdefault(int(prio), []).append(f"{int(prio)}: {' '.join(rest.split())}")
    return out


def read_rules(run: Runner) -> dict[int, list[str]]:
    return parse_rules(run(("ip", "rule", "show")))


def route_key(tokens: Sequence[str]) -> tuple[str, ...]:
    """The part of a route that names it within a table: destination (with a non-unicast type)."""
    if tokens and tokens[0] in ROUTE_TYPES and len(tokens) > 1:
        return tuple(tokens[:2])
    return tuple(tokens[:1])


def parse_routes(text: str) -> dict[tuple[str, ...], tuple[str, ...]]:
    out: dict[tuple[str, ...], tuple[str, ...]] = {}
    for line in text.splitlines():
        tokens = tuple(t for t in line.split() if t not in ROUTE_NOISE)
        if tokens:
            out[route_key(tokens)] = tokens
    return out


def read_routes(run: Runner, table: int) -> dict[tuple[str, ...], tuple[str, ...]]:
    try:
        return parse_routes(run(("ip", "route", "show", "table", str(table))))
    except KernelError as exc:  # a table without routes does not exist for the kernel: empty
        if "does not exist" in str(exc):
            return {}
        raise


def host_route_dev(run: Runner, ip: str) -> str | None:
    """The device of the main-table host route to ``ip`` (how the CNI wired the pod), if any."""
    for line in run(("ip", "-o", "route", "show", "table", "main", "exact", f"{ip}/32")).splitlines():
        tokens = line.split()
        if "dev" in tokens:
            return tokens[tokens.index("dev") + 1]
    return None


def netns_name_of_id(run: Runner, nsid: int) -> str | None:
    """Name (under /run/netns) of the peer namespace with id ``nsid`` as seen from this one."""
    for entry in json.loads(run(("ip", "-j", "netns", "list-id")) or "[]"):
        if entry.get("nsid") == nsid and entry.get("name"):
            return entry["name"]
    return None
