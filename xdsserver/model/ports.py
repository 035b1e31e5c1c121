"""Ports and socket marks shared by the translator (xDS) and the lab (iptables/ip rules).

One copy, so the values in Envoy's config and in the node redirection rules cannot drift apart
(data-path.md §6; the 2022 generator kept them as literals under a TODO saying they must match).
"""

from __future__ import annotations

OUTBOUND_CAPTURE_PORT = 15001  # ztunnel_outbound: TPROXY target for pod-originated TCP
INBOUND_PLAINTEXT_PORT = 15006  # ztunnel_inbound_plaintext: non-mesh clients into local pods
HBONE_PORT = 15008  # ztunnel_inbound: HTTP/2 CONNECT over mTLS
HBONE_NODE_LOCAL_PORT = 15088  # same-node HBONE target; REDIRECTed to 15008 inside the ztunnel pod
ADMIN_PORT = 15000  # Envoy admin of the ztunnel
XDS_PORT = 15010  # xdsserver gRPC (plaintext)
XDS_TLS_PORT = 15012  # xdsserver gRPC (TLS, node-authenticated)
DEBUG_PORT = 15014  # xdsserver debug HTTP / metrics

# SO_MARK values set by the ztunnel's listeners and original_src (decimal in Envoy config).
OUTBOUND_LISTENER_MARK = 0x401
INBOUND_LISTENER_MARK = 0x402
ORIGINAL_SRC_MARK = 0x4D2  # must differ from the Z4 return mark 0x4d3 (data-path.md §8.3)

# Node and ztunnel-pod packet marks (data-path.md §6).
MARK_CAPTURE_OUTBOUND = 0x100
MARK_SKIP = 0x200
MARK_ZTUNNEL_OWNED = 0x210
MARK_NEVER_CAPTURE = 0x220
MARK_CONNMARK_PATH = 0x40
MARK_TPROXY = 0x400
MARK_TPROXY_MASK = 0xFFF
MARK_ZTUNNEL_RETURN = 0x4D3

# Tunnel devices (data-path.md §3).
INBOUND_TUNNEL_VNI = 1000
OUTBOUND_TUNNEL_VNI = 1001
GENEVE_PORT = 6081
VXLAN_PORT = 4789
