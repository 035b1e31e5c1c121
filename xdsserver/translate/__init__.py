"""Translation: NodeView (+ flavor, certificates) -> one ztunnel's Envoy resources.

A thin orchestrator over one builder module per resource family (style.md §1); a pure
function, so every node's config can be computed, diffed and tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from ..model import Flavor, OutboundPolicy
from ..model.index import NodeView
from . import blocks, dispatch, endpoints, names, podtable, refcheck
from .clusters import build_fixed_clusters, build_service_cluster
from .dispatch import build_dispatch_listener, build_pod_listener, build_stage_clusters
from .endpoints import shared_cla
from .inbound import build_inbound_routes, build_ztunnel_inbound, build_ztunnel_inbound_plaintext
from .outbound import build_ztunnel_outbound
from .secrets import CertPair, CertProvider, build_root_secret, build_workload_secret
from .tunnel import TUNNEL_HOP_LOG, build_outbound_tunnel_lis, build_tunnel_clusters

__all__ = ["NodeResources", "translate", "clear_memos", "service_clusters", "CertPair", "CertProvider", "TranslationError", "type_url"]


class TranslationError(ValueError):
    pass


def type_url(msg: Message) -> str:
    return "type.googleapis.com/" + msg.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class NodeResources:
    """One ztunnel's resources, each family in emission order."""

    node: str
    flavor: Flavor
    listeners: tuple[listener_pb2.Listener, ...]
    clusters: tuple[cluster_pb2.Cluster, ...]
    endpoints: tuple[endpoint_pb2.ClusterLoadAssignment, ...]
    secrets: tuple[secret_pb2.Secret, ...]
    routes: tuple[route_pb2.RouteConfiguration, ...] = ()  # stock flavor only (RDS)

    def named(self) -> dict[str, list[tuple[str, Message]]]:
        """type URL -> (name, message) in emission order (RDS only in the stock flavor)."""
        out = {
            type_url(listener_pb2.Listener()): [(r.name, r) for r in self.listeners],
            type_url(cluster_pb2.Cluster()): [(r.name, r) for r in self.clusters],
            type_url(endpoint_pb2.ClusterLoadAssignment()): [(r.cluster_name, r) for r in self.endpoints],
            type_url(secret_pb2.Secret()): [(r.name, r) for r in self.secrets],
        }
        if self.flavor is Flavor.ENVOY:
            out[type_url(route_pb2.RouteConfiguration())] = [(r.name, r) for r in self.routes]
        return out


def service_clusters(view: NodeView, flavor: Flavor) -> dict[str, tuple[str, int]]:
    """Service cluster (= CLA) name -> (internal listener of its mesh endpoints, index into
    ``view.targets``), in emission order, first seen wins. Stock: one per service port;
    istio-2022: one per node-local identity x service port (D1)."""
    out: dict[str, tuple[str, int]] = {}
    if flavor is Flavor.ENVOY:
        if view.local_identities:  # nothing on this node can use them otherwise
            for i, t in enumerate(view.targets):
                out.setdefault(names.service_port_cluster(t.port.name, t.hostname), (names.OUTBOUND_TUNNEL_LIS, i))
        return out
    for ident in view.local_identities:
        lis = names.outbound_tunnel_lis(ident)
        for i, t in enumerate(view.targets):
            out.setdefault(names.service_cluster(ident, t.port.name, t.hostname), (lis, i))
    return out


def clear_memos() -> None:
    """Forget what translation shares across nodes and calls (stage 2, CLAs, endpoints, service
    and tunnel clusters, reference-check facts). Only for measuring cold costs: the memos are keyed on their
    inputs and never go stale."""
    dispatch._last.clear()
    from . import clusters as cluster_builders, tunnel as tunnel_builders  # names shadowed below

    cluster_builders._service_clusters.clear()
    tunnel_builders._tunnel_memo.clear()
    refcheck.clear_memos()
    endpoints.clear()
    podtable.clear()


def translate(view: NodeView, flavor: Flavor, certs: CertProvider, *, check: bool = True) -> NodeResources:
    mesh = view.mesh
    listeners = [
        build_ztunnel_outbound(view, flavor),
        build_ztunnel_inbound(view, flavor),
        build_ztunnel_inbound_plaintext(view, flavor),
    ]
    if flavor is Flavor.ENVOY:
        if view.local_identities:
            listeners += [build_dispatch_listener(view), build_pod_listener(view),
                          build_outbound_tunnel_lis(None, flavor, log=blocks.hop_log(mesh, TUNNEL_HOP_LOG))]
            if mesh.outbound_policy is OutboundPolicy.ALLOW_ANY:
                listeners.append(podtable.passthrough_listener())
    else:
        listeners += [build_outbound_tunnel_lis(ident, flavor) for ident in view.local_identities]

    service = service_clusters(view, flavor)
    clusters = [build_service_cluster(name) for name in service]
    tunnel = [build_tunnel_clusters(ident, mesh, flavor) for ident in view.local_identities]
    for i in range(3):  # 2022 order: all outbound_tunnel_clus, then pod, then pod-local
        clusters += [group[i] for group in tunnel]
    if flavor is Flavor.ENVOY and view.local_identities:
        clusters += build_stage_clusters()
    clusters += build_fixed_clusters(mesh)

    endpoints = [shared_cla(name, lis, view.targets[i], view.node_name) for name, (lis, i) in service.items()]
    if flavor is Flavor.ENVOY and view.local_identities:  # the pod tables close CDS and EDS (incremental.py patches them there)
        table = podtable.pod_table(view.workloads, mesh)
        clusters += [g.cluster for g in table.groups]
        endpoints += [g.cla for g in table.groups]
    secrets = [build_workload_secret(ident, certs.workload(ident)) for ident in view.local_identities]
    secrets.append(build_root_secret(certs.root_pem()))

    routes = build_inbound_routes(view, flavor)
    res = NodeResources(view.node_name, flavor, tuple(listeners), tuple(clusters), tuple(endpoints), tuple(secrets), tuple(routes))
    if check:
        problems = refcheck.check(res.listeners, res.clusters, (c.cluster_name for c in res.endpoints), (s.name for s in res.secrets),
                                  routes=res.routes)
        problems += refcheck.check_endpoints(res.endpoints, {lis.name for lis in res.listeners})
        if problems:
            raise TranslationError(f"node {view.node_name}: " + "; ".join(problems))
    return res
