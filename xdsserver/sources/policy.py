"""``AuthorizationPolicy`` and ``PeerAuthentication`` (security.istio.io v1/v1beta1) -> model.

Checked field by field in code (not only a JSON schema) so every error names the exact field
(``spec.rules[0].from[1].source.ipBlocks[2]``) and every L7-only attribute becomes a warning
naming policy and rule. Errors reject the object; warnings keep it (fail closed, Istio's ztunnel).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..model.policy import Action, AuthorizationPolicy, Match, MtlsMode, PeerAuthentication, Rule
from . import SourceObject

POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

SOURCE_L4 = {"principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks"}
SOURCE_L7 = {"requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
OPERATION_L4 = {"ports", "notPorts"}
OPERATION_L7 = {"hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"}
WHEN_L4 = {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
IP_ATTRS = {"ipBlocks", "source.ip", "destination.ip"}

Problem = tuple[str, str]  # (field, message)


def _strings(v: Any, field: str, errs: list[Problem]) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        errs.append((field, f"must be a list of non-empty strings, got {v!r}"))
        return ()
    return tuple(v)


def _check_values(attr: str, values: tuple[str, ...], field: str, errs: list[Problem]) -> None:
    for i, v in enumerate(values):
        if attr in IP_ATTRS:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                errs.append((f"{field}[{i}]", f"{v!r} is not an IP address or CIDR"))
        elif attr in ("ports", "destination.port"):
            if not v.isdigit() or not 0 < int(v) < 65536:
                errs.append((f"{field}[{i}]", f"{v!r} is not a port in 1..65535"))
        elif v.count("*") > 1 or ("*" in v and not (v.startswith("*") or v.endswith("*"))):
            errs.append((f"{field}[{i}]", f"{v!r}: '*' is allowed only alone, as a prefix or as a suffix"))


def _pairs(d: Any, field: str, l4: set[str], l7: set[str], errs: list[Problem], l7_seen: list[str]) -> tuple[tuple[str, Match], ...]:
    """One ``source`` or ``operation`` object -> ANDed (attribute, Match)."""
    if not isinstance(d, dict):
        errs.append((field, f"must be an object, got {type(d).__name__}"))
        return ()
    out: dict[str, Match] = {}
    for key in sorted(d):
        f = f"{field}.{key}"
        if key in l7:
            l7_seen.append(f)
            continue
        if key not in l4:
            errs.append((f, "unknown field"))
            continue
        positive = key[3].lower() + key[4:] if key.startswith("not") else key
        vals = _strings(d[key], f, errs)
        _check_values(positive, vals, f, errs)
        m = out.get(positive, Match())
        out[positive] = Match(m.values + vals, m.not_values) if positive == key else Match(m.values, m.not_values + vals)
    return tuple(sorted(out.items()))


def _rule(r: Any, field: str, errs: list[Problem]) -> Rule:
    if not isinstance(r, dict):
        errs.append((field, f"must be an object, got {type(r).__name__}"))
        return Rule()
    l7: list[str] = []
    sources, operations, conds = [], [], []
    for key in sorted(r):
        if key not in ("from", "to", "when"):
            errs.append((f"{field}.{key}", "unknown field"))
    for j, fr in enumerate(_list(r.get("from"), f"{field}.from", errs)):
        if not isinstance(fr, dict) or set(fr) != {"source"}:
            errs.append((f"{field}.from[{j}]", "must be {source: {...}}"))
            continue
        sources.append(_pairs(fr["source"], f"{field}.from[{j}].source", SOURCE_L4, SOURCE_L7, errs, l7))
    for j, to in enumerate(_list(r.get("to"), f"{field}.to", errs)):
        if not isinstance(to, dict) or set(to) != {"operation"}:
            errs.append((f"{field}.to[{j}]", "must be {operation: {...}}"))
            continue
        operations.append(_pairs(to["operation"], f"{field}.to[{j}].operation", OPERATION_L4, OPERATION_L7, errs, l7))
    for j, c in enumerate(_list(r.get("when"), f"{field}.when", errs)):
        f = f"{field}.when[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("key"), str):
            errs.append((f"{f}.key", "is required (a string)"))
            continue
        if set(c) - {"key", "values", "notValues"}:
            errs.append((f, f"unknown field(s) {sorted(set(c) - {'key', 'values', 'notValues'})}"))
            continue
        key = c["key"]
        if key not in WHEN_L4:
            if key.startswith(("request.", "experimental.")) or key in ("remote.ip", "connection.sni"):
                l7.append(f"{f}.key={key}")
                continue
            errs.append((f"{f}.key", f"unknown condition key {key!r}"))
            continue
        vals = _strings(c.get("values", []), f"{f}.values", errs) if "values" in c else ()
        nots = _strings(c.get("notValues", []), f"{f}.notValues", errs) if "notValues" in c else ()
        if not vals and not nots:
            errs.append((f, "needs values or notValues"))
        _check_values(key, vals, f"{f}.values", errs)
        _check_values(key, nots, f"{f}.notValues", errs)
        conds.append((key, Match(vals, nots)))
    return Rule(tuple(sources), tuple(operations), tuple(conds), tuple(l7))


def _list(v: Any, field: str, errs: list[Problem]) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        errs.append((field, f"must be a list, got {type(v).__name__}"))
        return []
    return v


def _meta(so: SourceObject, errs: list[Problem]) -> tuple[str, str, dict[str, Any]]:
    meta = so.obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not isinstance(meta.get("namespace"), str):
        errs.append(("metadata", "name and namespace are required strings"))
        return "", "", {}
    if so.obj.get("apiVersion") not in API_VERSIONS:
        errs.append(("apiVersion", f"{so.obj.get('apiVersion')!r} is not one of {', '.join(API_VERSIONS)}"))
    return meta["namespace"], meta["name"], meta


def _selector(spec: dict[str, Any], errs: list[Problem]) -> tuple[tuple[str, str], ...] | None:
    sel = spec.get("selector")
    if sel is None:
        return None
    if not isinstance(sel, dict) or set(sel) - {"matchLabels"}:
        errs.append(("spec.selector", "only matchLabels is supported"))
        return None
    ml = sel.get("matchLabels") or {}
    if not isinstance(ml, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ml.items()):
        errs.append(("spec.selector.matchLabels", "must map strings to strings"))
        return None
    return tuple(sorted(ml.items()))


def authorization_policy(so: SourceObject) -> tuple[AuthorizationPolicy | None, list[Problem], list[str]]:
    """(policy or None, errors, warnings)."""
    errs: list[Problem] = []
    ns, name, meta = _meta(so, errs)
    spec = so.obj.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        return None, errs + [("spec", "must be an object")], []
    for key in sorted(set(spec) - {"selector", "targetRef", "targetRefs", "action", "rules", "provider"}):
        errs.append((f"spec.{key}", "unknown field"))
    action_s = spec.get("action", "ALLOW")
    if action_s == "CUSTOM":
        errs.append(("spec.action", "CUSTOM (external authorization) is not supported by xdsserver"))
    elif action_s not in ("ALLOW", "DENY", "AUDIT"):
        errs.append(("spec.action", f"{action_s!r} is not one of ALLOW, DENY, AUDIT"))
    selector = _selector(spec, errs)
    rules = tuple(_rule(r, f"spec.rules[{i}]", errs) for i, r in enumerate(_list(spec.get("rules"), "spec.rules", errs)))
    ann = meta.get("annotations") or {}
    dry = ann.get(DRY_RUN_ANNOTATION)
    if dry is not None and dry not in ("true", "false"):
        errs.append((f"metadata.annotations.{DRY_RUN_ANNOTATION}", f"must be \"true\" or \"false\", got {dry!r}"))
    if errs:
        return None, errs, []
    pol = AuthorizationPolicy(ns, name, Action(action_s), selector, rules, dry == "true",
                              bool(spec.get("targetRef") or spec.get("targetRefs")), so.origin)
    warnings = []
    if pol.target_ref:
        warnings.append(f"{so.origin}: AuthorizationPolicy {pol.key}: spec.targetRef(s): for waypoints, not enforced by ztunnels")
    for i, r in enumerate(rules):
        if r.l7_only:
            effect = "this rule never matches (fail closed)" if pol.action is not Action.DENY else "enforced without them (denies more)"
            warnings.append(f"{so.origin}: AuthorizationPolicy {pol.key}: {pol.rule_name(i)}: L7-only {', '.join(r.l7_only)}: {effect}")
    return pol, [], warnings


def peer_authentication(so: SourceObject) -> tuple[PeerAuthentication | None, list[Problem], list[str]]:
    errs: list[Problem] = []
    ns, name, _ = _meta(so, errs)
    spec = so.obj.get("spec") or {}
    if not isinstance(spec, dict):
        return None, errs + [("spec", "must be an object")], []
    for key in sorted(set(spec) - {"selector", "mtls", "portLevelMtls"}):
        errs.append((f"spec.{key}", "unknown field"))
    selector = _selector(spec, errs)
    mtls = spec.get("mtls") or {}
    mode_s = mtls.get("mode", "UNSET") if isinstance(mtls, dict) else None
    if mode_s not in ("UNSET", "STRICT", "PERMISSIVE", "DISABLE"):
        errs.append(("spec.mtls.mode", f"{mode_s!r} is not one of UNSET, STRICT, PERMISSIVE, DISABLE"))
    if errs:
        return None, errs, []
    pa = PeerAuthentication(ns, name, selector, MtlsMode(mode_s), so.origin)
    warnings = []
    if pa.mode is MtlsMode.DISABLE:
        warnings.append(f"{so.origin}: PeerAuthentication {ns}/{name}: spec.mtls.mode: DISABLE ignored (HBONE is always mTLS)")
    if "portLevelMtls" in spec:
        warnings.append(f"{so.origin}: PeerAuthentication {ns}/{name}: spec.portLevelMtls: not supported by ztunnels, ignored")
    return pa, [], warnings
