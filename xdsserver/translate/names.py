"""Every name the translator emits, built here and nowhere else (never parsed back).

Names are the 2022 generator's verbatim (ztunnel-config.md §9) so dumps stay comparable with
the seeds. ``<id>`` below is the SPIFFE identity ``spiffe://<td>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

from ..model import Identity

ZTUNNEL_OUTBOUND = "ztunnel_outbound"
ZTUNNEL_INBOUND = "ztunnel_inbound"
ZTUNNEL_INBOUND_PLAINTEXT = "ztunnel_inbound_plaintext"

PASSTHROUGH_CHAIN = "PassthroughFilterChain"
BLACKHOLE_OUTBOUND_CHAIN = "blackhole outbound"
BLACKHOLE_INBOUND_CHAIN = "blackhole inbound"
BLACKHOLE_INBOUND_PLAINTEXT_CHAIN = "blackhole inbound plaintext"

VIRTUAL_INBOUND = "virtual_inbound"
VIRTUAL_INBOUND_HBONE = "virtual_inbound_hbone"
VIRTUAL_INBOUND_PLAINTEXT_STAT = "virtual_inbound_plaintext"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
PASSTHROUGH_CLUSTER_TCP = "PassthroughCluster-tcp"
BLACKHOLE_CLUSTER = "BlackHoleCluster"

INBOUND_HCM_STAT = "inbound_hcm"
LOCAL_ROUTE = "local_route"
LOCAL_SERVICE = "local_service"

ROOTCA_SECRET = "ROOTCA"
SDS_GRPC_CLUSTER = "sds-grpc"  # istio-2022 flavor: the local istio-agent's SDS
XDS_GRPC_CLUSTER = "xds-grpc"

# stock flavor's linear layout (README "Performance"): stage 2 of the capture path, shared by
# every source identity, and the one HBONE-originating internal listener behind service clusters
OUTBOUND_DISPATCH = "ztunnel_outbound_dispatch"  # internal listener + the STATIC cluster reaching it
OUTBOUND_POD = "ztunnel_outbound_pod"  # stage 3 for pod IPs: same node (15088) or not (15008)
OUTBOUND_TUNNEL_LIS = "outbound_tunnel_lis"
# stock flavor: a pod-table entry with no pod (a non-mesh address in a mesh pod range) goes here
OUTBOUND_PASSTHROUGH = "ztunnel_outbound_passthrough"
DESTINATION_IP_STATE = "io.xdsserver.destination_ip"  # stage 1 -> stage 2: the pod-table key
LB_METADATA = "envoy.lb"  # the subset load balancer's endpoint metadata namespace
POD_TABLE_PREFIX = "pods_"
# filter state carrying the source's SPIFFE ID from stage 1 through every internal hop
SOURCE_IDENTITY_STATE = "io.xdsserver.source_identity"
TCP_PROXY_CLUSTER_STATE = "envoy.tcp_proxy.cluster"

TUNNEL_METADATA = "tunnel"  # endpoint metadata namespace passed through the internal listener
ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
INTERNAL_UPSTREAM_MATCH = "internal_upstream"
PLAIN_MATCH = "tlsMode-disabled"


def service_cluster(src: Identity, port_name: str, hostname: str) -> str:
    """``<id>_to_<port>_<hostname>_outbound_internal``: service chain = cluster = CLA name."""
    return f"{src.spiffe}_to_{port_name}_{hostname}_outbound_internal"


SERVICE_PORT_PREFIX, SERVICE_PORT_SUFFIX = "to_", "_outbound_internal"


def service_port_cluster(port_name: str, hostname: str) -> str:
    """Stock flavor: ``to_<port>_<hostname>_outbound_internal``, one per service port, shared by
    every source identity (the 2022 name without its ``<id>_`` prefix)."""
    return f"{SERVICE_PORT_PREFIX}{port_name}_{hostname}{SERVICE_PORT_SUFFIX}"


def source_chain(src: Identity) -> str:
    """Stock flavor, stage 1: the ``ztunnel_outbound`` chain of every local pod of ``src``."""
    return f"outbound_from_{src.spiffe}"


def pod_table(group: str) -> str:
    """Stock flavor: the pod table (cluster, CLA and stage-2 chain) of one pod range: an IPv4
    /24 given as its string prefix ("10.64.50." -> ``pods_10.64.50.0_24``), or "" for every
    IPv6 pod (``pods_ipv6``)."""
    return f"{POD_TABLE_PREFIX}{group}0_24" if group else f"{POD_TABLE_PREFIX}ipv6"


POD_TUNNEL_CHAIN = "fc-outbound_pod_tunnel"  # stage 3: the pod is on another node
POD_LOCAL_TUNNEL_CHAIN = "fc-outbound_pod_local_tunnel"  # stage 3: the pod is on this node


def per_source(prefix: str) -> str:
    """Format string naming ``<prefix><source SPIFFE ID>`` at run time (``envoy.tcp_proxy.cluster``),
    from the identity stage 1 put in filter state: one chain serves every source identity."""
    return f"{prefix}%FILTER_STATE({SOURCE_IDENTITY_STATE}:PLAIN)%"


OUTBOUND_TUNNEL_CLUS_PREFIX = "outbound_tunnel_clus_"
OUTBOUND_POD_TUNNEL_CLUS_PREFIX = "outbound_pod_tunnel_clus_"
OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX = "outbound_pod_local_tunnel_clus_"


def outbound_tunnel_lis(src: Identity) -> str:
    return f"outbound_tunnel_lis_{src.spiffe}"


def outbound_tunnel_clus(src: Identity) -> str:
    return OUTBOUND_TUNNEL_CLUS_PREFIX + src.spiffe


def outbound_pod_tunnel_clus(src: Identity) -> str:
    return OUTBOUND_POD_TUNNEL_CLUS_PREFIX + src.spiffe


def outbound_pod_local_tunnel_clus(src: Identity) -> str:
    return OUTBOUND_POD_LOCAL_TUNNEL_CLUS_PREFIX + src.spiffe


def pod_chain(cluster: str, dst: Identity) -> str:
    """Pod-IP chain: 2022's ``fc-<cluster>``, split per destination identity (D8)."""
    return f"fc-{cluster}_to_{dst.spiffe}"


def inbound_chain(pod_ip: str) -> str:
    return f"inbound_{pod_ip}"


def inbound_route(pod_ip: str) -> str:
    """The RouteConfiguration (RDS) of a pod's HBONE chain: its CONNECT route and its L4 policy."""
    return f"inbound_{pod_ip}"


def workload_secret(identity: Identity) -> str:
    return identity.spiffe
