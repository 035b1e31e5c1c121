"""L4 security policy: AuthorizationPolicy and PeerAuthentication, and Istio's verdict on one
connection (CUSTOM n/a, then DENY, then ALLOW; AUDIT only logs).

Pure data and a pure evaluator (standard library only): the translator turns the same rules
into Envoy RBAC, and ``explain`` calls :func:`verdict` so both read one definition.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


@dataclass(frozen=True, slots=True)
class Match:
    """One attribute: the value must be in ``values`` (if given) and not in ``not_values``."""

    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``rules[]`` entry, L4 attributes only. Within a ``from``/``to`` entry and across
    conditions: AND; across ``from`` entries or ``to`` entries: OR (Istio)."""

    sources: tuple[tuple[tuple[str, Match], ...], ...] = ()  # from[]: (attribute, Match) ANDed
    operations: tuple[tuple[tuple[str, Match], ...], ...] = ()  # to[]
    conditions: tuple[tuple[str, Match], ...] = ()  # when[]
    l7_only: tuple[str, ...] = ()  # L7 attributes this rule named (cannot be enforced at L4)


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: Action
    selector: tuple[tuple[str, str], ...] | None  # None: every workload in scope
    rules: tuple[Rule, ...]
    dry_run: bool = False
    target_ref: bool = False  # for waypoints: never enforced by a ztunnel
    origin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rule_name(self, i: int) -> str:
        """Istio's RBAC policy name, shown in stats, access logs and ``explain``."""
        return f"ns[{self.namespace}]-policy[{self.name}]-rule[{i}]"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...] | None
    mode: MtlsMode
    origin: str = ""


@dataclass(frozen=True, slots=True)
class Connection:
    """What the destination ztunnel knows about one inbound connection."""

    source_ip: str
    dest_ip: str
    dest_port: int  # the application port (inside the CONNECT on HBONE)
    principal: str = ""  # SPIFFE ID without ``spiffe://``; empty on the plaintext path

    @property
    def source_namespace(self) -> str:
        parts = self.principal.split("/")
        return parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    decided_by: str  # rule name, or a reason ("no ALLOW policy", "STRICT", ...)
    dry_run: tuple[str, ...] = ()  # what dry-run policies would have done, one line each
    audited: tuple[str, ...] = ()


def selects(selector: tuple[tuple[str, str], ...] | None, labels: dict[str, str]) -> bool:
    return selector is None or all(labels.get(k) == v for k, v in selector)


def in_scope(policy_ns: str, root_ns: str, workload_ns: str) -> bool:
    return policy_ns == workload_ns or policy_ns == root_ns


def _glob(pattern: str, value: str) -> bool:
    """Istio string match: exact, ``*``, ``prefix*`` or ``*suffix``."""
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _ip_in(block: str, ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(block, strict=False)
    except ValueError:
        return False


def _value(attr: str, conn: Connection) -> str | None:
    """The connection's value of an L4 attribute; None when it has none (plaintext principal)."""
    if attr in ("principals", "source.principal"):
        return conn.principal or None
    if attr in ("namespaces", "source.namespace"):
        return conn.source_namespace or None
    if attr in ("ipBlocks", "source.ip"):
        return conn.source_ip
    if attr == "destination.ip":
        return conn.dest_ip
    if attr in ("ports", "destination.port"):
        return str(conn.dest_port)
    raise KeyError(attr)


def _matches_one(attr: str, pattern: str, value: str) -> bool:
    if attr in ("ipBlocks", "source.ip", "destination.ip"):
        return _ip_in(pattern, value)
    if attr in ("ports", "destination.port"):
        return pattern == value
    return _glob(pattern, value)


def attr_matches(attr: str, m: Match, conn: Connection) -> bool:
    value = _value(attr, conn)
    if value is None:  # e.g. no principal on plaintext: a rule that needs one does not match
        return False
    if m.values and not any(_matches_one(attr, p, value) for p in m.values):
        return False
    return not any(_matches_one(attr, p, value) for p in m.not_values)


def _all(items: tuple[tuple[str, Match], ...], conn: Connection) -> bool:
    return all(attr_matches(a, m, conn) for a, m in items)


def rule_matches(rule: Rule, conn: Connection, action: Action) -> bool:
    """L7 parts fail closed: an ALLOW/AUDIT rule needing them never matches, a DENY rule is
    evaluated without them (it denies more)."""
    if rule.l7_only and action is not Action.DENY:
        return False
    if rule.sources and not any(_all(s, conn) for s in rule.sources):
        return False
    if rule.operations and not any(_all(o, conn) for o in rule.operations):
        return False
    return _all(rule.conditions, conn)


def first_match(policy: AuthorizationPolicy, conn: Connection) -> int | None:
    for i, r in enumerate(policy.rules):
        if rule_matches(r, conn, policy.action):
            return i
    return None


def applicable(policies: tuple[AuthorizationPolicy, ...], root_ns: str, namespace: str, labels: dict[str, str]) -> list[AuthorizationPolicy]:
    """The policies a ztunnel enforces for one workload (targetRef ones are the waypoint's)."""
    return [p for p in policies if not p.target_ref and in_scope(p.namespace, root_ns, namespace) and selects(p.selector, labels)]


def verdict(policies: list[AuthorizationPolicy], conn: Connection, *, strict_mtls: bool = False) -> Verdict:
    """Istio's order: STRICT refuses plaintext, then DENY, then ALLOW; dry-run and AUDIT only report."""
    if strict_mtls and not conn.principal:
        return Verdict(False, "PeerAuthentication STRICT: plaintext refused")
    dry: list[str] = []
    audited: list[str] = []
    decided: Verdict | None = None
    for action in (Action.DENY, Action.ALLOW):
        group = [p for p in policies if p.action is action]
        enforced = [p for p in group if not p.dry_run]
        for p in group:
            if not p.dry_run:
                continue
            i = first_match(p, conn)
            if action is Action.DENY:
                dry.append(f"{p.rule_name(i)}: would deny" if i is not None else f"{p.key}: would not deny")
            else:
                dry.append(f"{p.rule_name(i)}: would allow" if i is not None else f"{p.key}: would deny (no rule matches)")
        if decided is not None:
            continue
        if action is Action.DENY:
            for p in enforced:
                i = first_match(p, conn)
                if i is not None:
                    decided = Verdict(False, p.rule_name(i))
                    break
        elif enforced:
            for p in enforced:
                i = first_match(p, conn)
                if i is not None:
                    decided = Verdict(True, p.rule_name(i))
                    break
            else:
                decided = Verdict(False, "no rule of the ALLOW policies " + ", ".join(p.key for p in enforced) + " matches")
    for p in policies:
        if p.action is Action.AUDIT:
            i = first_match(p, conn)
            if i is not None:
                audited.append(p.rule_name(i))
    if decided is None:
        decided = Verdict(True, "no ALLOW policy selects the workload")
    return Verdict(decided.allowed, decided.decided_by, tuple(dry), tuple(audited))


def strict_mtls(peer_auths: tuple[PeerAuthentication, ...], root_ns: str, namespace: str, labels: dict[str, str]) -> bool:
    """Most specific wins: workload selector, then namespace-wide, then mesh-wide (root ns)."""
    ranked = []
    for pa in peer_auths:
        if pa.mode in (MtlsMode.UNSET, MtlsMode.DISABLE) or not in_scope(pa.namespace, root_ns, namespace):
            continue
        if pa.selector is not None and not selects(pa.selector, labels):
            continue
        rank = 0 if pa.selector is not None and pa.namespace == namespace else (1 if pa.namespace == namespace else 2)
        ranked.append((rank, pa.namespace, pa.name, pa.mode))
    return bool(ranked) and min(ranked)[3] is MtlsMode.STRICT
