"""The ztunnel Envoy bootstrap: node identity, ADS wiring and the `xds-grpc` cluster.

The text lives in `templates/bootstrap.yaml` so that the Helm chart renders the same document;
this module fills its scalar placeholders and applies the structural variants (UDS address, TLS).
Inputs are validated here because a bad bootstrap only shows up as an Envoy that never connects.
"""

from __future__ import annotations

import ipaddress
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BOOTSTRAP_TEMPLATE = "bootstrap.yaml"
XDS_CLUSTER = "xds-grpc"
DEFAULT_XDS_ADDRESS = "127.0.0.1:15010"
DEFAULT_ADMIN_ADDRESS = "127.0.0.1:15000"
DEFAULT_POD_IP = "127.0.0.1"

_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_LABEL_RE = re.compile(rf"^{_DNS_LABEL}$")
_DNS_SUBDOMAIN_RE = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
                          r"(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$")
_CLUSTER_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")


@dataclass(frozen=True, slots=True)
class XdsTls:
    """mTLS from the ztunnel to xdsserver, with certificates read from files.

    Files, not SDS: `xds-grpc` is a static cluster, and a static cluster using SDS-over-ADS
    crashes Envoy (stock-envoy.md gotcha 12). Static file certificates are read once at startup;
    rotating them needs an Envoy restart.

    `server_san` is the name the xDS server certificate must carry: a `spiffe://` URI, an IP or a
    DNS name (the SAN type is inferred). Default: the host of the xDS address; required with a
    UDS address. Without it, any certificate of the mesh CA could impersonate the server.
    `sni` defaults to `server_san` when that is a DNS name.
    """

    cert_chain: str
    private_key: str
    ca_bundle: str
    server_san: str | None = None
    sni: str | None = None


def templates_dir() -> Path:
    """The templates directory: `xdsserver/templates/` in a wheel, `<repo>/templates/` in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / BOOTSTRAP_TEMPLATE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no templates directory with {BOOTSTRAP_TEMPLATE} next to {package} "
        "(expected xdsserver/templates/ in a wheel or templates/ in the source checkout)"
    )


def parse_host_port(value: str, *, what: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split `HOST:PORT` / `[IPv6]:PORT`; ValueError naming `what` if malformed."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", value)
    if m:
        host, port_text = m.group(1), m.group(2)
        if not _is_ip(host) or ":" not in host:
            raise ValueError(f"{what} {value!r}: only IPv6 addresses go in brackets")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
            raise ValueError(f"{what} {value!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
        if ":" in host:
            raise ValueError(f"{what} {value!r}: write an IPv6 address in brackets, e.g. [::1]:15010")
        if not _is_ip(host) and not _HOSTNAME_RE.match(host):
            raise ValueError(f"{what} {value!r}: {host!r} is neither an IP address nor a host name")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"{what} {value!r}: port {port} out of range")
    return host, port


def build_bootstrap(
    node: str,
    *,
    xds_address: str | None = None,
    xds_uds: str | None = None,
    admin_address: str = DEFAULT_ADMIN_ADDRESS,
    delta: bool = False,
    cluster_id: str = "Kubernetes",
    pod_ip: str | None = None,
    pod_name: str | None = None,
    pod_namespace: str = "istio-system",
    xds_tls: XdsTls | None = None,
) -> dict[str, Any]:
    """The bootstrap as a plain dict (see `render_bootstrap`)."""
    _check(isinstance(node, str) and _DNS_SUBDOMAIN_RE.match(node) and len(node) <= 253,
           f"node {node!r}: expected a Kubernetes node name (lowercase DNS subdomain)")
    if xds_address is not None and xds_uds is not None:
        raise ValueError("give either an xDS address (HOST:PORT) or an xDS UDS path, not both")
    _check(_DNS_LABEL_RE.match(pod_namespace or ""), f"pod namespace {pod_namespace!r}: expected a DNS label")
    if pod_name is None:
        pod_name = f"ztunnel-{node.replace('.', '-')}"
    _check(_DNS_SUBDOMAIN_RE.match(pod_name or "") and len(pod_name) <= 253,
           f"pod name {pod_name!r}: expected a DNS subdomain name")
    pod_ip = DEFAULT_POD_IP if pod_ip is None else pod_ip
    _check(_is_ip(pod_ip), f"pod IP {pod_ip!r}: expected an IPv4 or IPv6 address")
    _check(isinstance(cluster_id, str) and _CLUSTER_ID_RE.match(cluster_id),
           f"cluster id {cluster_id!r}: expected letters, digits, '.', '-', '_'")

    admin_host, admin_port = parse_host_port(admin_address, what="admin address", allow_port_zero=True)
    _check(_is_ip(admin_host), f"admin address {admin_address!r}: the admin listener needs an IP, not a host name")

    if xds_uds is not None:
        _check(isinstance(xds_uds, str) and (xds_uds.startswith("/") or xds_uds.startswith("@"))
               and len(xds_uds) > 1 and "\0" not in xds_uds,
               f"xDS UDS path {xds_uds!r}: expected an absolute path (or @name for an abstract socket)")
        xds_host, xds_port = parse_host_port(DEFAULT_XDS_ADDRESS, what="xDS address")
    else:
        xds_host, xds_port = parse_host_port(xds_address or DEFAULT_XDS_ADDRESS, what="xDS address")

    values = {
        "node_id": f"sidecar~{pod_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local",
        "node_name": node,
        "cluster_id": cluster_id,
        "admin_host": admin_host,
        "admin_port": admin_port,
        "api_type": "DELTA_GRPC" if delta else "GRPC",
        "xds_cluster_type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
        "xds_host": xds_host,
        "xds_port": xds_port,
    }
    doc = _load_template(values)
    cluster = _xds_cluster(doc)
    if xds_uds is not None:
        cluster["type"] = "STATIC"
        cluster.pop("upstream_connection_options", None)  # TCP keepalive does not apply to a pipe
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"pipe": {"path": xds_uds}}
    if xds_tls is not None:
        cluster["transport_socket"] = _tls_transport_socket(xds_tls, None if xds_uds else xds_host)
    return doc


def render_bootstrap(
    node: str,
    *,
    xds_address: str | None = None,
    xds_uds: str | None = None,
    admin_address: str = DEFAULT_ADMIN_ADDRESS,
    delta: bool = False,
    cluster_id: str = "Kubernetes",
    pod_ip: str | None = None,
    pod_name: str | None = None,
    pod_namespace: str = "istio-system",
    xds_tls: XdsTls | None = None,
) -> str:
    """The ztunnel Envoy bootstrap for `node` as YAML text.

    xDS server: `xds_address` (`HOST:PORT`, `[IPv6]:PORT`; default 127.0.0.1:15010) or
    `xds_uds` (a Unix socket path), optionally with file-based mTLS (`xds_tls`). `delta`
    selects DELTA_GRPC instead of GRPC. Node id `sidecar~<pod_ip>~<pod_name>.<ns>~<ns>.svc.cluster.local`
    with pod IP 127.0.0.1 and pod name `ztunnel-<node>` unless given. Raises ValueError on bad input.
    """
    doc = build_bootstrap(
        node, xds_address=xds_address, xds_uds=xds_uds, admin_address=admin_address, delta=delta,
        cluster_id=cluster_id, pod_ip=pod_ip, pod_name=pod_name, pod_namespace=pod_namespace,
        xds_tls=xds_tls,
    )
    header = f"# ztunnel Envoy bootstrap for node {node}, rendered by xdsserver from {BOOTSTRAP_TEMPLATE}\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)


def _load_template(values: dict[str, str | int]) -> dict[str, Any]:
    text = (templates_dir() / BOOTSTRAP_TEMPLATE).read_text(encoding="utf-8")
    # JSON strings are valid YAML double-quoted scalars: no value can break the document.
    quoted = {k: (str(v) if isinstance(v, int) else json.dumps(v)) for k, v in values.items()}
    try:
        doc = yaml.safe_load(string.Template(text).substitute(quoted))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{BOOTSTRAP_TEMPLATE}: bad placeholder {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{BOOTSTRAP_TEMPLATE}: not a YAML mapping")
    return doc


def _xds_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    for cluster in doc.get("static_resources", {}).get("clusters", []):
        if cluster.get("name") == XDS_CLUSTER:
            return cluster
    raise ValueError(f"{BOOTSTRAP_TEMPLATE}: no static cluster named {XDS_CLUSTER!r}")


def _tls_transport_socket(tls: XdsTls, xds_host: str | None) -> dict[str, Any]:
    for field in ("cert_chain", "private_key", "ca_bundle"):
        path = getattr(tls, field)
        _check(isinstance(path, str) and path and "\0" not in path, f"xds TLS {field}: expected a file path, got {path!r}")
    server_san = tls.server_san if tls.server_san is not None else xds_host
    if not server_san:
        raise ValueError("xds TLS over a UDS address needs server_san (the name in the xDS server certificate)")
    if server_san.startswith("spiffe://") or "://" in server_san:
        san_type = "URI"
    elif _is_ip(server_san):
        san_type = "IP_ADDRESS"
    else:
        _check(_HOSTNAME_RE.match(server_san), f"xds TLS server_san {server_san!r}: not a URI, IP or DNS name")
        san_type = "DNS"
    sni = tls.sni if tls.sni is not None else (server_san if san_type == "DNS" else None)
    context: dict[str, Any] = {
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {"certificate_chain": {"filename": tls.cert_chain}, "private_key": {"filename": tls.private_key}}
            ],
            "validation_context": {
                "trusted_ca": {"filename": tls.ca_bundle},
                "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": server_san}}],
            },
        },
    }
    if sni:
        context = {"sni": sni, **context}
    return {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": _TLS_TYPE, **context}}


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check(ok: object, message: str) -> None:
    if not ok:
        raise ValueError(message)


__all__ = [
    "DEFAULT_ADMIN_ADDRESS",
    "DEFAULT_POD_IP",
    "DEFAULT_XDS_ADDRESS",
    "XdsTls",
    "build_bootstrap",
    "parse_host_port",
    "render_bootstrap",
    "templates_dir",
]
