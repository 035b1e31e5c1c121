"""Envoy RBAC from the L4 policies selecting one workload (model/policy.py), per inbound chain.

Istio's order is kept by filter order: STRICT (plaintext only) -> DENY -> ALLOW -> AUDIT (LOG).
Policy names are Istio's (``ns[<ns>]-policy[<name>]-rule[<i>]``) so stats, the access log's
``%CONNECTION_TERMINATION_DETAILS%`` and ``explain`` all name the same rule. Dry-run policies
become shadow rules (counted, never enforced).

Where each attribute is read:

* plaintext (15006): ``envoy.filters.network.rbac`` on the chain; the listener restored the
  original destination, so ``destination_port`` is the pod's port; no principal.
* HBONE (15008): ``envoy.filters.http.rbac`` on the CONNECT (before the router, so a denied
  CONNECT never opens a connection to the pod): the principal is the client certificate
  (``authenticated``, the TLS connection's peer), source and destination IPs are the
  connection's, and the application port is read from the CONNECT's destination header
  (``x-envoy-original-dst-host`` = ``<pod ip>:<port>``, already pinned to this pod by D10), since
  the connection's own port is 15008.
"""

from __future__ import annotations

import re
from typing import Callable

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2

from ..model.index import NodeView, Workload
from ..model.policy import Action, AuthorizationPolicy, Match, Rule, applicable, strict_mtls
from . import blocks, names

RBAC = rbac_pb2.RBAC
STAT_PREFIX = "inbound_policy_"  # network: inbound_policy_rbac.denied / .shadow_denied
DRY_RUN_ALLOW_STAT = "istio_dry_run_allow_"
DRY_RUN_DENY_STAT = "istio_dry_run_deny_"

PermissionFor = Callable[[str, str], rbac_pb2.Permission]  # (attribute, value) -> permission


def _regex(r: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=r))


def _glob_regex(pattern: str, segment: str = ".*") -> str:
    if pattern == "*":
        return segment.replace("*", "+") if segment.endswith("*") else ".+"
    if pattern.endswith("*"):
        return re.escape(pattern[:-1]) + segment
    if pattern.startswith("*"):
        return segment + re.escape(pattern[1:])
    return re.escape(pattern)


def _principal_one(attr: str, value: str) -> rbac_pb2.Principal:
    if attr in ("principals", "source.principal"):
        m = _regex("^spiffe://" + _glob_regex(value) + "$")
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=m))
    if attr in ("namespaces", "source.namespace"):
        m = _regex("^spiffe://[^/]+/ns/" + _glob_regex(value, "[^/]*") + "/sa/[^/]+$")
        return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=m))
    if attr in ("ipBlocks", "source.ip"):
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    raise KeyError(attr)


def _cidr(value: str):
    ip, _, plen = value.partition("/")
    c = blocks.cidr(ip)
    if plen:
        c.prefix_len.value = int(plen)
    return c


def network_permission(attr: str, value: str) -> rbac_pb2.Permission:
    if attr in ("ports", "destination.port"):
        return rbac_pb2.Permission(destination_port=int(value))
    return rbac_pb2.Permission(destination_ip=_cidr(value))


def connect_permission(attr: str, value: str) -> rbac_pb2.Permission:
    """On the CONNECT: the port from the destination header, the IP from the connection."""
    if attr in ("ports", "destination.port"):
        return rbac_pb2.Permission(header=route_components_pb2.HeaderMatcher(
            name=names.ORIGINAL_DST_HEADER, string_match=_regex(f"^.*:{int(value)}$")))
    return rbac_pb2.Permission(destination_ip=_cidr(value))


SOURCE_ATTRS = {"principals", "source.principal", "namespaces", "source.namespace", "ipBlocks", "source.ip"}


def _principal(attr: str, m: Match) -> rbac_pb2.Principal:
    parts = []
    if m.values:
        parts.append(rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=[_principal_one(attr, v) for v in m.values])))
    for v in m.not_values:
        parts.append(rbac_pb2.Principal(not_id=_principal_one(attr, v)))
    return parts[0] if len(parts) == 1 else rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=parts))


def _permission(attr: str, m: Match, perm: PermissionFor) -> rbac_pb2.Permission:
    parts = []
    if m.values:
        parts.append(rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=[perm(attr, v) for v in m.values])))
    for v in m.not_values:
        parts.append(rbac_pb2.Permission(not_rule=perm(attr, v)))
    return parts[0] if len(parts) == 1 else rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=parts))


def _and_principals(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if not ids:
        return rbac_pb2.Principal(any=True)
    return ids[0] if len(ids) == 1 else rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


def _and_permissions(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if not rules:
        return rbac_pb2.Permission(any=True)
    return rules[0] if len(rules) == 1 else rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules))


def rule_policy(rule: Rule, perm: PermissionFor) -> rbac_pb2.Policy:
    """from[] ORed (each source ANDed), to[] ORed (each operation ANDed), when[] ANDed."""
    principals: list[rbac_pb2.Principal] = []
    permissions: list[rbac_pb2.Permission] = []
    if rule.sources:
        alts = [_and_principals([_principal(a, m) for a, m in src]) for src in rule.sources]
        principals.append(alts[0] if len(alts) == 1 else rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=alts)))
    if rule.operations:
        alts_p = [_and_permissions([_permission(a, m, perm) for a, m in op]) for op in rule.operations]
        permissions.append(alts_p[0] if len(alts_p) == 1 else rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=alts_p)))
    for a, m in rule.conditions:
        if a in SOURCE_ATTRS:
            principals.append(_principal(a, m))
        else:
            permissions.append(_permission(a, m, perm))
    return rbac_pb2.Policy(permissions=[_and_permissions(permissions)], principals=[_and_principals(principals)])


def _rules(action: RBAC.Action.ValueType, policies: list[AuthorizationPolicy], perm: PermissionFor) -> RBAC:
    """One RBAC for one action; ALLOW/AUDIT rules needing L7 attributes are left out (fail closed)."""
    rbac = RBAC(action=action)
    for p in policies:
        for i, r in enumerate(p.rules):
            if r.l7_only and p.action is not Action.DENY:
                continue
            rbac.policies[p.rule_name(i)].CopyFrom(rule_policy(r, perm))
    return rbac


Stage = tuple[str, RBAC | None, RBAC | None]  # (name, enforced rules, shadow rules)


def stages(policies: list[AuthorizationPolicy], perm: PermissionFor, *, strict: str = "") -> list[Stage]:
    """The RBAC stages for one workload, in Istio's order; none when nothing selects it."""
    out: list[Stage] = []
    if strict:
        deny = RBAC(action=RBAC.DENY)
        deny.policies[strict].CopyFrom(rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[rbac_pb2.Principal(any=True)]))
        out.append(("strict", deny, None))
    for action, rb_action, tag in ((Action.DENY, RBAC.DENY, "deny"), (Action.ALLOW, RBAC.ALLOW, "allow"), (Action.AUDIT, RBAC.LOG, "audit")):
        group = [p for p in policies if p.action is action]
        enforced = [p for p in group if not p.dry_run]
        dry = [p for p in group if p.dry_run]
        if not group:
            continue
        out.append((tag, _rules(rb_action, enforced, perm) if enforced else None, _rules(rb_action, dry, perm) if dry else None))
    return out


def workload_policies(view: NodeView, wl: Workload) -> list[AuthorizationPolicy]:
    return applicable(view.authorization_policies, view.mesh.root_namespace, wl.pod.namespace, wl.pod.label_map)


def _strict_name(view: NodeView, wl: Workload) -> str:
    if not strict_mtls(view.peer_authentications, view.mesh.root_namespace, wl.pod.namespace, wl.pod.label_map):
        return ""
    return f"ns[{wl.pod.namespace}]-peerauthentication-strict"


def network_filters(view: NodeView, wl: Workload) -> list[listener_components_pb2.Filter]:
    """Plaintext chain: STRICT refuses everything, then the policies (no principal here)."""
    out = []
    for tag, rules, shadow in stages(workload_policies(view, wl), network_permission, strict=_strict_name(view, wl)):
        cfg = net_rbac_pb2.RBAC(stat_prefix=f"{STAT_PREFIX}{tag}_")
        if rules is not None:
            cfg.rules.CopyFrom(rules)
        if shadow is not None:
            cfg.shadow_rules.CopyFrom(shadow)
            cfg.shadow_rules_stat_prefix = DRY_RUN_ALLOW_STAT if tag == "allow" else DRY_RUN_DENY_STAT
        out.append(listener_components_pb2.Filter(name="envoy.filters.network.rbac", typed_config=blocks.pack(cfg)))
    return out


HTTP_STAGES = ("deny", "allow", "audit")


def _http_rbac(tag: str) -> http_rbac_pb2.RBAC:
    """A stage's stat prefixes, without rules: the filter's neutral base (no rules = no enforcement)."""
    return http_rbac_pb2.RBAC(rules_stat_prefix=f"{STAT_PREFIX}{tag}_", track_per_rule_stats=True,
                              shadow_rules_stat_prefix=DRY_RUN_ALLOW_STAT if tag == "allow" else DRY_RUN_DENY_STAT)


def http_filter_name(tag: str) -> str:
    return f"envoy.filters.http.rbac.{tag}"


def _connect_stages(view: NodeView, wl: Workload) -> list[tuple[str, http_rbac_pb2.RBAC]]:
    out = []
    for tag, rules, shadow in stages(workload_policies(view, wl), connect_permission):
        cfg = _http_rbac(tag)
        if rules is not None:
            cfg.rules.CopyFrom(rules)
        if shadow is not None:
            cfg.shadow_rules.CopyFrom(shadow)
        else:
            cfg.ClearField("shadow_rules_stat_prefix")
        out.append((tag, cfg))
    return out


def http_filters(view: NodeView, wl: Workload) -> list[hcm_pb2.HttpFilter]:
    """HBONE CONNECT, istio-2022 flavor: the stages as HTTP RBAC filters placed before the router."""
    return [hcm_pb2.HttpFilter(name=http_filter_name(tag), typed_config=blocks.pack(cfg)) for tag, cfg in _connect_stages(view, wl)]


def base_http_filters() -> list[hcm_pb2.HttpFilter]:
    """HBONE CONNECT, stock flavor: every stage's filter, always, with a neutral base (Envoy takes
    the stats' prefixes from here, the rules from the route's ``RBACPerRoute``). The chain
    then never changes with policy (a new chain would drain the old one for minutes, and pooled
    HBONE connections keep using it); the rules travel in the pod's RouteConfiguration (RDS),
    which applies to the next CONNECT on existing connections."""
    out = []
    for tag in HTTP_STAGES:
        out.append(hcm_pb2.HttpFilter(name=http_filter_name(tag), typed_config=blocks.pack(_http_rbac(tag))))
    return out


def per_route_rbac(view: NodeView, wl: Workload) -> dict[str, any_pb2.Any]:
    """``typed_per_filter_config`` of the pod's CONNECT route: the stages that have rules; a
    stage without an entry keeps the neutral base."""
    return {http_filter_name(tag): blocks.pack(http_rbac_pb2.RBACPerRoute(rbac=cfg)) for tag, cfg in _connect_stages(view, wl)}
