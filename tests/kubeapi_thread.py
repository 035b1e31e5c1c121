"""The STAND-IN Kubernetes API server (tests/kubeapi.py) on its own event loop in a thread.

Tests that run ``xdsserver serve`` and Envoy as subprocesses poll with blocking calls; the
stand-in must keep answering list/watch/TokenReview requests meanwhile, so it gets a loop of its
own. Every test control runs *in* that loop (``call``), because the stand-in's watch queues are
asyncio objects; several changes in one ``call`` happen with no event delivered in between.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

try:
    from tests.kubeapi import KubeAPIStandIn
except ImportError:
    from kubeapi import KubeAPIStandIn  # type: ignore[no-redef]

T = TypeVar("T")


class ThreadedStandIn:
    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeapi-standin", daemon=True)
        self.api: KubeAPIStandIn | None = None

    def start(self) -> "ThreadedStandIn":
        self._thread.start()

        async def boot() -> KubeAPIStandIn:
            api = KubeAPIStandIn(**self._kwargs)
            await api.start()
            return api

        self.api = asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """Stop the server and its loop; a second call does nothing (a test may stop it early)."""
        if self._loop.is_closed():
            return
        if self.api is not None:
            asyncio.run_coroutine_threadsafe(self.api.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def call(self, fn: Callable[[KubeAPIStandIn], T], timeout: float = 10.0) -> T:
        """Run ``fn(api)`` in the stand-in's loop and return its result."""
        assert self.api is not None
        api = self.api

        async def run() -> T:
            return fn(api)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=timeout)

    # shortcuts for the common controls
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.call(lambda a: a.create(obj))

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.call(lambda a: a.update(obj))

    def delete(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.call(lambda a: a.delete(kind, name, namespace))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.call(lambda a: a.get(kind, name, namespace))

    def write_kubeconfig(self, path: Path, *, token: str | None = None) -> Path:
        return self.call(lambda a: a.write_kubeconfig(path, token=token))


# ---- realistic objects (as a kubectl apply would create them) -----------------------------


def namespace(name: str, *, enrolled: bool = True) -> dict[str, Any]:
    labels = {"kubernetes.io/metadata.name": name}
    if enrolled:
        labels["istio.io/dataplane-mode"] = "ambient"
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}, "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}}


def node(name: str, ip: str, cidr: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


def service_account(name: str, ns: str = "default") -> dict[str, Any]:
    return {"kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


def pod(name: str, ip: str, *, ns: str = "default", node_name: str, sa: str, app: str | None = None,
        ready: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app or name.rsplit("-", 1)[0], **(labels or {})}},
        "spec": {"nodeName": node_name, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "example/app", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def service(name: str, cluster_ip: str, *, ns: str = "default", port: int = 80, target: int = 8080,
            selector: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "selector": selector or {"app": name},
                 "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": target}]},
    }


def ztunnel_pod(name: str, ip: str, node_name: str) -> dict[str, Any]:
    return pod(name, ip, ns="istio-system", node_name=node_name, sa="ztunnel", app="ztunnel",
               labels={"ambient-type": "ztunnel"})
