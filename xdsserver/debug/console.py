"""Views for the web console (``/ui/``): plain JSON built from the control plane's published state.

Read-only and key-free by construction: secrets are summarised from their *certificates* (name,
SANs, expiry); no function here reads a private key field. The path view returns the very
``explain`` walk ``/debug/explain`` and ``xdsserver explain --json`` print, plus what the pickers
resolved, so the drawing and the CLI cannot disagree.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING, Any

from cryptography import x509
from google.protobuf import wrappers_pb2

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from xds.type.matcher.v3 import matcher_pb2

from ..explain import _filters, _input_kind, explain
from ..model import Pod, host_port
from ..translate import names
from ..xds.types import short

if TYPE_CHECKING:
    from .source import DebugSource

STALE_AFTER_S = 10.0  # a version sent and not ACKed for this long needs attention
TREE_LIMIT = 300  # matcher entries listed per level (stage 3 has one per local pod IP)
STAGE_ORDER = (names.ZTUNNEL_OUTBOUND, names.OUTBOUND_DISPATCH, names.OUTBOUND_POD)


# -- overview -----------------------------------------------------------------------------------
def overview(cp: "DebugSource") -> dict[str, Any]:
    """Nodes with their ztunnels' sync state, the input state, counts and what needs attention."""
    st, srv = cp.state, cp.server
    idx = st.index
    rows = srv.sync_status()
    conns = {c["stream"]: c for c in srv.connections()}
    active_nacks = {(n["node"], n["type"]): n for n in srv.nacks() if n.get("active")}
    node_names = sorted(set(st.nodes) | (set(idx.node_names) if idx else set()) | {r["node"] for r in rows})
    nodes = [_node_entry(cp, n, [r for r in rows if r["node"] == n], conns, active_nacks) for n in node_names]
    attention: list[dict[str, str]] = []
    if st.last_error:
        attention.append({"severity": "error", "node": "", "text": "input rejected; the last good configuration is served"})
    for n in nodes:
        attention += [{"severity": p["severity"], "node": n["name"], "text": p["text"]} for p in n["problems"]]
    attention.sort(key=lambda a: (a["severity"] != "error", a["node"]))
    enrolled = idx.workloads if idx else ()
    return {
        "server_time": time.time(),
        "input": {
            "generation": st.generation,
            "loaded_at": st.loaded_at or None,
            "last_error": st.last_error,
            "sources": list(st.model.sources) if st.model else [],
            "flavor": cp.flavor.value,
        },
        "counts": {
            "nodes": len(node_names),
            "pods": len(st.model.pods) if st.model else 0,
            "enrolled_pods": len(enrolled),
            "identities": len({wl.identity for wl in enrolled}),
            "services": len(st.model.services) if st.model else 0,
            "connected_ztunnels": len(conns),
        },
        "attention": attention,
        "nodes": nodes,
    }


def _node_entry(cp: "DebugSource", node: str, rows: list[dict[str, Any]], conns: dict[str, dict[str, Any]],
                active_nacks: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    snap = cp.cache.get(node)
    idx = cp.state.index
    local = idx.workloads_by_node.get(node, ()) if idx else ()
    streams: dict[str, dict[str, Any]] = {}
    for r in rows:
        c = conns.get(r["stream"], {})
        s = streams.setdefault(r["stream"], {"stream": r["stream"], "mode": r["mode"], "peer": c.get("peer", ""),
                                             "age": c.get("age"), "types": []})
        s["types"].append({"type": r["type"], "sent_version": r["sent_version"], "acked_version": r["acked_version"],
                           "since_send": r["since_send"], "nack": r["last_nack"],
                           "nack_active": (node, r["type"]) in active_nacks})
    problems: list[dict[str, str]] = []
    for (n, t), rec in sorted(active_nacks.items()):
        if n == node:
            problems.append({"severity": "error", "kind": "nack", "text": f"{t} NACKed version {rec['version']}: {rec['message']}"})
    if snap is not None and not streams:
        problems.append({"severity": "warning", "kind": "absent", "text": "no ztunnel connected"})
    if snap is None and streams:
        problems.append({"severity": "warning", "kind": "unknown", "text": "ztunnel connected for a node without configuration"})
    for s in streams.values():
        for t in s["types"]:
            pending = t["sent_version"] and t["sent_version"] != t["acked_version"] and not t["nack"]
            if pending and (t["since_send"] or 0) > STALE_AFTER_S:
                problems.append({"severity": "warning", "kind": "stale",
                                 "text": f"{t['type']} version {t['sent_version']} sent {t['since_send']:.0f} s ago, not ACKed"})
    kinds = {p["kind"] for p in problems}
    state = ("nack" if "nack" in kinds else "absent" if "absent" in kinds else "stale" if "stale" in kinds
             else "syncing" if any(t["sent_version"] != t["acked_version"] for s in streams.values() for t in s["types"])
             else "ok" if streams else "unknown")
    return {
        "name": node,
        "state": state,
        "problems": problems,
        "pods": len(idx.pods_by_node.get(node, ())) if idx else 0,
        "local_workloads": len(local),
        "identities": len({wl.identity for wl in local}),
        "resources": {short(t): len(snap.resources(t)) for t in snap.type_urls()} if snap else {},
        "serving": {short(t): snap.type_version(t) for t in snap.type_urls()} if snap else {},
        "streams": list(streams.values()),
    }


# -- node page ----------------------------------------------------------------------------------
def node_page(cp: "DebugSource", node: str) -> dict[str, Any]:
    """One node: local pods and identities, resources (names, sizes), capture matcher trees, secrets."""
    idx = cp.state.index
    res = cp.state.nodes[node]
    snap = cp.cache.get(node)
    pods = idx.pods_by_node.get(node, ()) if idx else ()
    local = idx.workloads_by_node.get(node, ()) if idx else ()
    resources = {}
    if snap is not None:
        for t in snap.type_urls():
            resources[short(t)] = [{"name": r.name, "bytes": len(r.body), "version": r.version} for r in snap.resources(t).values()]
    by_name = {lis.name: lis for lis in res.listeners}
    trees = [_listener_tree(by_name[n], res) for n in STAGE_ORDER if n in by_name]
    trees += [_listener_tree(lis, res) for lis in res.listeners if lis.name not in STAGE_ORDER and lis.HasField("filter_chain_matcher")]
    return {
        "name": node,
        "pods": [_pod_summary(cp, p) for p in pods],
        "identities": sorted({wl.identity.spiffe for wl in local}),
        "resources": resources,
        "matchers": trees,
        "secrets": [_secret_summary(s) for s in res.secrets],
    }


def _pod_summary(cp: "DebugSource", p: Pod) -> dict[str, Any]:
    idx = cp.state.index
    assert idx is not None
    enrolled = idx.pod_enrolled(p)
    return {"key": p.key, "node": p.node_name, "ips": list(p.ips), "ready": p.ready, "enrolled": enrolled,
            "identity": idx.identity_of(p).spiffe if enrolled else None, "ports": [c.port for c in p.ports]}


def _listener_tree(lis: listener_pb2.Listener, res: Any) -> dict[str, Any]:
    chains = {c.name: c for c in lis.filter_chains}
    clusters = {c.name: c for c in res.clusters}
    tables = {cla.cluster_name: cla for cla in res.endpoints if cla.cluster_name.startswith(names.POD_TABLE_PREFIX)}

    def leaf(chain_name: str) -> dict[str, Any]:
        chain = chains.get(chain_name)
        out: dict[str, Any] = {"chain": chain_name}
        if chain is None:
            return out
        tcp, states = _filters(chain)
        chosen = dict(states).get(names.TCP_PROXY_CLUSTER_STATE)
        out["cluster"] = chosen or (tcp.cluster if tcp else "")
        target = clusters.get(out["cluster"])
        if target is not None and target.load_assignment.endpoints:
            for lbe in target.load_assignment.endpoints[0].lb_endpoints:
                if lbe.endpoint.address.HasField("envoy_internal_address"):
                    out["next"] = lbe.endpoint.address.envoy_internal_address.server_listener_name
        elif out["cluster"] in tables:  # a pod range: its pod table (EDS) picks the pod, then stage 3
            rows = [lbe for g in tables[out["cluster"]].endpoints for lbe in g.lb_endpoints
                    if "ip" in lbe.metadata.filter_metadata[names.LB_METADATA].fields]
            out["pod_table_rows"] = len(rows)
            out["next"] = names.OUTBOUND_POD
        return out

    def tree(m: matcher_pb2.Matcher) -> dict[str, Any]:
        items = m.matcher_tree.exact_match_map.map
        keys = sorted(items, key=_key_order)
        entries = []
        for k in keys[:TREE_LIMIT]:
            hit = items[k]
            entries.append({"key": k, **({"matcher": tree(hit.matcher)} if hit.HasField("matcher") else leaf(_action(hit)))})
        prefixes = m.matcher_tree.prefix_match_map.map  # stage 2's pod ranges ("10.64.50." -> its pod table)
        for k in sorted(prefixes, key=lambda p: _key_order(p + "0"))[:max(0, TREE_LIMIT - len(entries))]:
            hit = prefixes[k]
            entries.append({"key": k + "*", "prefix": True, **({"matcher": tree(hit.matcher)} if hit.HasField("matcher") else leaf(_action(hit)))})
        out: dict[str, Any] = {"input": _input_kind(m), "entries": entries, "total": len(keys) + len(prefixes)}
        if m.HasField("on_no_match"):
            nm = m.on_no_match
            out["on_no_match"] = {"matcher": tree(nm.matcher)} if nm.HasField("matcher") else leaf(_action(nm))
        return out

    out: dict[str, Any] = {"listener": lis.name, "chains": len(lis.filter_chains),
                           "internal": lis.HasField("internal_listener")}
    if lis.HasField("address") and lis.address.HasField("socket_address"):
        out["address"] = host_port(lis.address.socket_address.address, lis.address.socket_address.port_value)
    if lis.HasField("filter_chain_matcher"):
        out["tree"] = tree(lis.filter_chain_matcher)
    if lis.HasField("default_filter_chain"):
        out["default_chain"] = lis.default_filter_chain.name
    return out


def _action(on_match: matcher_pb2.Matcher.OnMatch) -> str:
    v = wrappers_pb2.StringValue()
    on_match.action.typed_config.Unpack(v)
    return v.value


def _key_order(k: str) -> tuple[int, Any]:
    try:
        return (0, ipaddress.ip_address(k))
    except ValueError:
        return (1, int(k)) if k.isdigit() else (2, k)


def _secret_summary(s: secret_pb2.Secret) -> dict[str, Any]:
    """Name, kind, SANs and validity of a Secret's certificate; never its private key."""
    if s.HasField("tls_certificate"):
        kind, src = "certificate", s.tls_certificate.certificate_chain
    elif s.HasField("validation_context"):
        kind, src = "trust anchor", s.validation_context.trusted_ca
    else:
        return {"name": s.name, "kind": "other"}
    out: dict[str, Any] = {"name": s.name, "kind": kind}
    pem = src.inline_bytes or src.inline_string.encode()
    try:
        cert = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        return out
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out["sans"] = [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        out["sans"] = []
    out["subject"] = cert.subject.rfc4514_string()
    out["not_before"] = cert.not_valid_before_utc.timestamp()
    out["not_after"] = cert.not_valid_after_utc.timestamp()
    return out


# -- path -----------------------------------------------------------------------------------------
def targets(cp: "DebugSource") -> dict[str, Any]:
    """What the path pickers offer: pods (source or destination) and service ports."""
    st = cp.state
    if st.model is None:
        return {"pods": [], "services": []}
    return {
        "pods": [_pod_summary(cp, p) for p in st.model.pods if p.ips],
        "services": [{"key": s.key, "cluster_ips": list(s.cluster_ips), "ports": [{"port": p.port, "name": p.name, "protocol": p.protocol}
                      for p in s.ports]} for s in st.model.services if s.cluster_ips],
    }


class PathError(ValueError):
    """A source or destination the pickers cannot resolve (message names which and why)."""


def resolve_source(cp: "DebugSource", src: str, node: str = "") -> tuple[str, str, Pod | None]:
    """``src`` (pod IP, ``ns/name`` or a unique pod name) -> (node, IP, pod)."""
    pod = _find_pod(cp, src)
    if pod is not None:
        if not pod.node_name:
            raise PathError(f"source pod {pod.key} is not scheduled on a node")
        return node or pod.node_name, pod.ips[0], pod
    try:
        ip = str(ipaddress.ip_address(src))
    except ValueError:
        raise PathError(f"source {src!r}: not a pod (namespace/name) or an IP") from None
    if not node:
        raise PathError(f"source {ip} is not a known pod IP: give the node whose ztunnel captures it")
    return node, ip, None


def resolve_destination(cp: "DebugSource", dst: str) -> tuple[str, dict[str, Any]]:
    """``dst`` (``IP:PORT``, Service ``ns/name:port`` or ``name.ns:port``, pod ``ns/name:port``) -> IP:PORT."""
    target, sep, port_s = dst.strip().rpartition(":")
    if not sep or not target:
        raise PathError(f"destination {dst!r}: expected IP:PORT, namespace/service:PORT or namespace/pod:PORT")
    model = cp.state.model
    assert model is not None
    key = target
    if "/" not in target and "." in target and not _is_ip(target):  # reviews.default[.svc.cluster.local]
        name, _, rest = target.partition(".")
        key = f"{rest.split('.')[0]}/{name}"
    svc = next((s for s in model.services if s.key == key and s.cluster_ips), None)
    if svc is not None:
        port = next((p for p in svc.ports if str(p.port) == port_s or (p.name and p.name == port_s)), None)
        if port is None:
            raise PathError(f"destination {dst!r}: Service {svc.key} has no port {port_s!r} "
                            f"(ports: {', '.join(str(p.port) for p in svc.ports)})")
        return host_port(svc.cluster_ips[0], port.port), {"kind": "service", "key": svc.key, "port": port.port}
    if not port_s.isdigit():
        raise PathError(f"destination {dst!r}: port {port_s!r} must be a number")
    pod = _find_pod(cp, target) if not _is_ip(target) else None
    if pod is not None:
        return host_port(pod.ips[0], int(port_s)), {"kind": "pod", "key": pod.key, "port": int(port_s)}
    if not _is_ip(target):
        raise PathError(f"destination {dst!r}: no Service or pod named {target!r}")
    return host_port(str(ipaddress.ip_address(target.strip("[]"))), int(port_s)), {"kind": "address"}


def path(cp: "DebugSource", src: str, dst: str, node: str = "") -> dict[str, Any]:
    """The explain walk for a picked source and destination, with pod names for the IPs it shows."""
    node, src_ip, pod = resolve_source(cp, src, node)
    if node not in cp.state.nodes:
        raise PathError(f"node {node!r} has no ztunnel configuration (source {src})")
    address, dst_info = resolve_destination(cp, dst)
    ex = explain(cp.state.nodes, node, src_ip, address)  # type: ignore[arg-type]
    idx = cp.state.index
    labels = {}
    if idx is not None and cp.state.model is not None:
        for p in cp.state.model.pods:
            for ip in p.ips:
                labels[ip] = {"pod": p.key, "node": p.node_name, "enrolled": idx.pod_enrolled(p)}
    return {"node": node, "src": {"input": src, "ip": src_ip, "pod": pod.key if pod else None},
            "dst": {"input": dst, "address": address, **dst_info}, "labels": labels, "explain": ex.to_dict()}


def _find_pod(cp: "DebugSource", ref: str) -> Pod | None:
    model = cp.state.model
    if model is None:
        return None
    ref = ref.strip()
    hits = [p for p in model.pods if ref in (p.key, p.name) or ref in p.ips]
    return hits[0] if len(hits) == 1 else None


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s.strip("[]"))
    except ValueError:
        return False
    return True
