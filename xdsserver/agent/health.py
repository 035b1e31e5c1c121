"""The agent's metrics and its ``/healthz``, ``/ready``, ``/metrics`` endpoint (own registry).

``/healthz`` answers 200 while the reconcile loop is alive (it stamps a heartbeat every loop
turn; a stuck loop turns it 503), ``/ready`` 200 once a first reconcile finished without error
(kubelet then counts the node as redirected), ``/metrics`` is Prometheus text.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconcile_seconds = Histogram("xdsserver_agent_reconcile_seconds", "Duration of one reconcile pass", registry=r,
                                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
        self.reconciles = Counter("xdsserver_agent_reconciles_total", "Reconcile passes", registry=r)
        self.pods_captured = Gauge("xdsserver_agent_pods_captured", "Pods in the node's ztunnel-pods-ips plan", registry=r)
        self.changes = Counter("xdsserver_agent_changes_total", "Kernel objects changed", ["netns", "op"], registry=r)
        self.last_changes = Gauge("xdsserver_agent_last_reconcile_changes", "Changes made by the latest pass", registry=r)
        self.drift = Counter("xdsserver_agent_drift_corrections_total",
                             "Changes that restored state altered outside the agent (plan unchanged since a clean pass)", registry=r)
        self.errors = Counter("xdsserver_agent_errors_total", "Failed steps and rejected inputs", ["kind"], registry=r)
        self.ready = Gauge("xdsserver_agent_ready", "1 once a first reconcile finished without error", registry=r)
        self.heartbeat = time.monotonic()
        self.is_ready = False

    def beat(self) -> None:
        self.heartbeat = time.monotonic()


def serve(metrics: AgentMetrics, host: str, port: int, stale_after: float) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (``.server_address``, ``.shutdown()``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok = time.monotonic() - metrics.heartbeat < stale_after
                self._send(200 if ok else 503, b"ok\n" if ok else b"reconcile loop stalled\n")
            elif path == "/ready":
                self._send(200 if metrics.is_ready else 503, b"ready\n" if metrics.is_ready else b"first reconcile not done\n")
            elif path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="agent-health", daemon=True).start()
    return srv
