"""Prometheus metrics of the ADS server, named after istiod's where one exists.

Pass a `CollectorRegistry` (tests use a private one; the app passes the global one it exposes).
Counters get prometheus-client's `_total` suffix in the exposition.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connected = Gauge("pilot_xds", "Connected xDS streams (ztunnels).", ["mode"], registry=r)
        self.pushes = Counter("pilot_xds_pushes", "xDS responses sent, by type.", ["type"], registry=r)
        self.push_time = Histogram(
            "pilot_xds_push_time", "Time to build and send one stream's push, by type.", ["type"],
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.convergence = Histogram(
            "pilot_proxy_convergence_time", "Time from a snapshot change to the proxy's ACK.",
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.rejects = Counter("pilot_total_xds_rejects", "NACKs received, by type.", ["type"], registry=r)
        self.config_size = Histogram(
            "pilot_xds_config_size_bytes", "Encoded response size, by type.", ["type"],
            buckets=_SIZE_BUCKETS, registry=r,
        )
        self.expired_nonce = Counter(
            "pilot_xds_expired_nonce", "Requests carrying a stale nonce, by type.", ["type"], registry=r
        )
        self.send_time = Histogram("pilot_xds_send_time", "Time to write one response.", buckets=_TIME_BUCKETS, registry=r)
        self.unknown_type = Counter(
            "xdsserver_xds_unknown_type_requests", "Requests for type URLs this server does not serve.", registry=r
        )
        self.quarantined = Counter(
            "xdsserver_xds_quarantined", "Responses withheld because their content was NACKed.", ["type"], registry=r
        )
