"""Render resources in the exact shape of Envoy's admin ``/config_dump`` (``envoy.admin.v3.ConfigDump``).

Used for goldens (normalized: no versions or timestamps, certificate bodies summarised, private
keys redacted the way Envoy's admin does) and for ``/debug/config_dump``; the same
:func:`normalize` is applied to a real Envoy's dump, so a diff between the two is meaningful.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterable

from google.protobuf import json_format
from google.protobuf.message import Message

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2 as shared
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from .translate import NodeResources
from .translate.blocks import pack

REDACTED = "[redacted]"  # what Envoy's admin prints for fields marked sensitive
SECTIONS = {
    "type.googleapis.com/envoy.admin.v3.ClustersConfigDump": ("dynamic_active_clusters", "cluster"),
    "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump": ("dynamic_endpoint_configs", "endpoint_config"),
    "type.googleapis.com/envoy.admin.v3.ListenersConfigDump": ("dynamic_listeners", "active_state"),
    "type.googleapis.com/envoy.admin.v3.RoutesConfigDump": ("dynamic_route_configs", "route_config"),
    "type.googleapis.com/envoy.admin.v3.SecretsConfigDump": ("dynamic_active_secrets", "secret"),
}
ROUTES_DUMP = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"


def _redact_secret(s: secret_pb2.Secret) -> secret_pb2.Secret:
    s = copy.deepcopy(s)
    if s.HasField("tls_certificate") and s.tls_certificate.HasField("private_key"):
        s.tls_certificate.private_key.Clear()
        s.tls_certificate.private_key.inline_string = REDACTED
    return s


def build_config_dump(res: NodeResources, versions: dict[tuple[str, str], str] | None = None) -> config_dump_pb2.ConfigDump:
    """``versions``: optional (type_url, name) -> version, shown as ``version_info``."""
    versions = versions or {}
    named = res.named()
    urls = list(named)

    def ver(i: int, name: str) -> str:
        return versions.get((urls[i], name), "")

    clusters = shared.ClustersConfigDump(
        dynamic_active_clusters=[
            shared.ClustersConfigDump.DynamicCluster(version_info=ver(1, c.name), cluster=pack(c)) for c in res.clusters
        ]
    )
    endpoints = shared.EndpointsConfigDump(
        dynamic_endpoint_configs=[
            shared.EndpointsConfigDump.DynamicEndpointConfig(version_info=ver(2, e.cluster_name), endpoint_config=pack(e))
            for e in res.endpoints
        ]
    )
    listeners = shared.ListenersConfigDump(
        dynamic_listeners=[
            shared.ListenersConfigDump.DynamicListener(
                name=lis.name,
                active_state=shared.ListenersConfigDump.DynamicListenerState(version_info=ver(0, lis.name), listener=pack(lis)),
            )
            for lis in res.listeners
        ]
    )
    secrets = config_dump_pb2.SecretsConfigDump(
        dynamic_active_secrets=[
            config_dump_pb2.SecretsConfigDump.DynamicSecret(name=s.name, version_info=ver(3, s.name), secret=pack(_redact_secret(s)))
            for s in res.secrets
        ]
    )
    routes = shared.RoutesConfigDump(
        dynamic_route_configs=[
            shared.RoutesConfigDump.DynamicRouteConfig(version_info=ver(4, r.name), route_config=pack(r)) for r in res.routes
        ]
    )
    return config_dump_pb2.ConfigDump(configs=[pack(clusters), pack(endpoints), pack(listeners), pack(routes), pack(secrets)])


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def dump_json(d: Any) -> str:
    """Byte-stable JSON for goldens."""
    return json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- normalization ------------------------------------------------------------------------------
def _summarise_pem(pem: str) -> str:
    """Replace certificate bodies (random per CA) by what matters: subject alternative names."""
    if "-----BEGIN" not in pem:
        return pem  # already summarised (normalize is idempotent)
    try:
        from cryptography import x509

        sans: list[str] = []
        certs = x509.load_pem_x509_certificates(pem.encode())
        for cert in certs:
            try:
                ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                sans.extend(str(u) for u in ext.get_values_for_type(x509.UniformResourceIdentifier))
            except x509.ExtensionNotFound:
                pass
        kind = "certificate chain" if sans else "trust bundle"
        return f"[{kind}: {len(certs)} cert(s){': ' + ' '.join(sans) if sans else ''}]"
    except Exception:  # not PEM (a test stub): keep it recognisable but stable
        return "[certificate]"


def _normalize_secret(secret: dict[str, Any]) -> None:
    tc = secret.get("tls_certificate")
    if tc:
        if "certificate_chain" in tc:
            tc["certificate_chain"] = {"inline_string": _summarise_pem(tc["certificate_chain"].get("inline_string", ""))}
        if "private_key" in tc:
            tc["private_key"] = {"inline_string": REDACTED}
    vc = secret.get("validation_context")
    if vc and "trusted_ca" in vc:
        vc["trusted_ca"] = {"inline_string": _summarise_pem(vc["trusted_ca"].get("inline_string", ""))}


def normalize(dump: dict[str, Any], *, sort: bool = False) -> dict[str, Any]:
    """Keep the xDS sections (routes only when there are RDS routes); drop fields Envoy adds (versions, timestamps); summarise certs.

    ``sort`` orders entries by name, for comparing with a real Envoy (whose admin orders them by
    its own maps, not by arrival).
    """
    out = []
    eds_clusters = {
        item["cluster"].get("eds_cluster_config", {}).get("service_name") or item["cluster"].get("name")
        for cfg in dump.get("configs", [])
        if cfg.get("@type") == "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
        for item in cfg.get("dynamic_active_clusters", [])
        if item.get("cluster", {}).get("type") == "EDS"
    }
    for cfg in dump.get("configs", []):
        t = cfg.get("@type")
        if t not in SECTIONS:
            continue
        key, inner = SECTIONS[t]
        items = []
        for item in cfg.get(key, []):
            item = copy.deepcopy(item)
            item.pop("version_info", None)
            item.pop("last_updated", None)
            if isinstance(item.get(inner), dict):
                item[inner].pop("version_info", None)
                item[inner].pop("last_updated", None)
            if inner == "secret":
                _normalize_secret(item["secret"])
            if inner == "endpoint_config":
                # Envoy lists an assignment for every cluster (static ones too) and fills in the
                # default policy; only EDS answers are ours.
                cla = item.get(inner, {})
                if cla.get("cluster_name") not in eds_clusters:
                    continue
                if cla.get("policy") == {"overprovisioning_factor": 140}:
                    cla.pop("policy")
                for group in cla.get("endpoints", []):
                    if group.get("locality") == {}:
                        group.pop("locality")
                    if group.get("load_balancing_weight") in (0, None):
                        group.pop("load_balancing_weight", None)
                    for lbe in group.get("lb_endpoints", []):  # runtime health state Envoy reports
                        if lbe.get("health_status") == "HEALTHY":
                            lbe.pop("health_status")
                        if lbe.get("endpoint", {}).get("health_check_config") == {}:
                            lbe["endpoint"].pop("health_check_config")
            items.append(item)
        if sort:
            items.sort(key=_entry_name)
        if t == ROUTES_DUMP and not items:
            continue  # istio-2022 flavor: routes are inline, no RDS
        out.append({"@type": t, key: items})
    return {"configs": out}


def _entry_name(item: dict[str, Any]) -> str:
    for path in (("name",), ("cluster", "name"), ("endpoint_config", "cluster_name"), ("route_config", "name")):
        v: Any = item
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, str):
            return v
    return ""


def render(res: NodeResources) -> dict[str, Any]:
    """The normalized dump of one node (golden content)."""
    return normalize(to_dict(build_config_dump(res)))


def names_in(dump: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for cfg in dump.get("configs", []):
        key, _ = SECTIONS.get(cfg.get("@type"), (None, None))
        if key:
            for item in cfg.get(key, []):
                yield cfg["@type"], _entry_name(item)
