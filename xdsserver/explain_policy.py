"""The destination side's L4 verdict, read from the generated RBAC filters (not from the
model), so ``explain`` shows what the ztunnel will actually do: allowed/denied, the rule
(``ns[<ns>]-policy[<name>]-rule[<i>]``) that decided, and what dry-run (shadow) rules would do."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

from .translate import names


@dataclass
class PolicyVerdict:
    allowed: bool = True
    decided_by: str = ""  # the matching rule, or why (no rule matched / no policy)
    dry_run: list[str] = field(default_factory=list)
    audited: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Conn:
    source_ip: str
    dest_ip: str
    dest_port: int
    principal: str  # full SPIFFE URI, "" on plaintext
    header: str  # x-envoy-original-dst-host on the CONNECT ("" on plaintext)


def _in(c, ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(f"{c.address_prefix}/{c.prefix_len.value}", strict=False)


def _principal(p: rbac_pb2.Principal, c: Conn) -> bool:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return True
    if kind == "and_ids":
        return all(_principal(x, c) for x in p.and_ids.ids)
    if kind == "or_ids":
        return any(_principal(x, c) for x in p.or_ids.ids)
    if kind == "not_id":
        return not _principal(p.not_id, c)
    if kind == "authenticated":
        return bool(c.principal) and re.search(p.authenticated.principal_name.safe_regex.regex, c.principal) is not None
    if kind == "direct_remote_ip":
        return _in(p.direct_remote_ip, c.source_ip)
    raise ValueError(f"explain does not evaluate RBAC principal {kind}")


def _permission(p: rbac_pb2.Permission, c: Conn) -> bool:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return True
    if kind == "and_rules":
        return all(_permission(x, c) for x in p.and_rules.rules)
    if kind == "or_rules":
        return any(_permission(x, c) for x in p.or_rules.rules)
    if kind == "not_rule":
        return not _permission(p.not_rule, c)
    if kind == "destination_port":
        return p.destination_port == c.dest_port
    if kind == "destination_ip":
        return _in(p.destination_ip, c.dest_ip)
    if kind == "header" and p.header.name == names.ORIGINAL_DST_HEADER:
        return re.search(p.header.string_match.safe_regex.regex, c.header) is not None
    raise ValueError(f"explain does not evaluate RBAC permission {kind}")


def _first(rbac: rbac_pb2.RBAC, c: Conn) -> str | None:
    for name in sorted(rbac.policies):  # Envoy evaluates a map; names are unique, any match decides
        pol = rbac.policies[name]
        if any(_permission(x, c) for x in pol.permissions) and any(_principal(x, c) for x in pol.principals):
            return name
    return None


def evaluate(configs: list[http_rbac_pb2.RBAC | net_rbac_pb2.RBAC], c: Conn) -> PolicyVerdict:
    """Filters in order; the first that denies decides, like Envoy's filter chain."""
    v = PolicyVerdict(decided_by="no policy selects the workload" if not configs else "")
    for cfg in configs:
        if cfg.HasField("shadow_rules"):
            hit = _first(cfg.shadow_rules, c)
            deny = cfg.shadow_rules.action == rbac_pb2.RBAC.DENY
            if deny:
                v.dry_run.append(f"{hit}: would deny" if hit else "dry-run DENY: would not deny")
            else:
                v.dry_run.append(f"{hit}: would allow" if hit else "dry-run ALLOW: would deny (no rule matches)")
        if not cfg.HasField("rules") or not v.allowed:
            continue
        hit = _first(cfg.rules, c)
        action = cfg.rules.action
        if action == rbac_pb2.RBAC.LOG:
            if hit:
                v.audited.append(hit)
        elif action == rbac_pb2.RBAC.DENY and hit:
            v.allowed, v.decided_by = False, hit
        elif action == rbac_pb2.RBAC.ALLOW:
            if hit:
                v.decided_by = hit
            else:
                v.allowed, v.decided_by = False, "no ALLOW rule matches"
    if v.allowed and not v.decided_by:
        v.decided_by = "no ALLOW policy selects the workload"
    return v
