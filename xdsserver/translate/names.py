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

TUNNEL_METADATA = "tunnel"  # endpoint metadata namespace passed through the internal listener
ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
INTERNAL_UPSTREAM_MATCH = "internal_upstream"
PLAIN_MATCH = "tlsMode-disabled"


def service_cluster(src: Identity, port_name: str, hostname: str) -> str:
    """``<id>_to_<port>_<hostname>_outbound_internal``: service chain = cluster = CLA name."""
    return f"{src.spiffe}_to_{port_name}_{hostname}_outbound_internal"


def outbound_tunnel_lis(src: Identity) -> str:
    return f"outbound_tunnel_lis_{src.spiffe}"


def outbound_tunnel_clus(src: Identity) -> str:
    return f"outbound_tunnel_clus_{src.spiffe}"


def outbound_pod_tunnel_clus(src: Identity) -> str:
    return f"outbound_pod_tunnel_clus_{src.spiffe}"


def outbound_pod_local_tunnel_clus(src: Identity) -> str:
    return f"outbound_pod_local_tunnel_clus_{src.spiffe}"


def pod_chain(cluster: str, dst: Identity) -> str:
    """Pod-IP chain: 2022's ``fc-<cluster>``, split per destination identity (D8)."""
    return f"fc-{cluster}_to_{dst.spiffe}"


def inbound_chain(pod_ip: str) -> str:
    return f"inbound_{pod_ip}"


def workload_secret(identity: Identity) -> str:
    return identity.spiffe
