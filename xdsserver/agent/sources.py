"""Where the agent's pods and namespaces come from: the manifest files, or the Kubernetes API.

Both give ``signature()`` (changes whenever the objects may have; ``None`` until the first full
list), ``objects()``, ``wait_synced()`` and ``close()``. The Kubernetes side is the server's
list+watch machinery (:class:`xdsserver.sources.kube.KubeSource`: bookmarks, 410 -> relist
without lost deletes) restricted to the two kinds the plan needs, Pods with
``fieldSelector=spec.nodeName=NODE`` and Namespaces, run on its own event-loop thread.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from pathlib import Path
from typing import Any

from ..sources import SourceObject


class ManifestAgentSource:
    """The manifest files; the signature is stat-only (cheap enough to poll every 0.2 s)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def signature(self) -> Any:
        from ..sources.manifests import signature

        return signature(self.path)

    def objects(self) -> list[SourceObject]:
        from ..sources.manifests import read_objects

        return read_objects(self.path)

    def wait_synced(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        return None


class KubeAgentSource:
    """:class:`KubeSource` for one node's pods and all namespaces, on a private event loop."""

    def __init__(self, node: str, kubeconfig: str | None, *, watch_timeout_s: float = 300) -> None:
        from ..sources import kube

        self._kube = kube
        self._loop = asyncio.new_event_loop()
        self._version = 0
        self._synced = threading.Event()
        self._node = node
        self._kubeconfig = kubeconfig
        self._watch_timeout = watch_timeout_s
        self._src: Any = None
        self._task: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="agent-kube", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)

    async def _start(self) -> None:
        kube = self._kube
        pods = kube.KindSpec("Pod", "v1", "CoreV1Api", "list_pod_for_all_namespaces", True,
                             field_selector=f"spec.nodeName={self._node}")
        self._api = await kube.api_client_from_env(self._kubeconfig)
        self._src = kube.KubeSource(self._api, on_change=self._changed, kinds=(pods, kube.NAMESPACE),
                                    watch_timeout_s=self._watch_timeout)
        self._task = asyncio.get_running_loop().create_task(self._src.run())

    def _changed(self) -> None:
        self._version += 1
        if self._src is not None and self._src.synced.is_set():
            self._synced.set()

    def signature(self) -> Any:
        return self._version if self._synced.is_set() else None

    def objects(self) -> list[SourceObject]:
        # Read the cache on its own loop: the watch tasks mutate it there.
        async def get() -> list[SourceObject]:
            return self._src.objects()

        return asyncio.run_coroutine_threadsafe(get(), self._loop).result(timeout=30)

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def close(self) -> None:
        async def stop() -> None:
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except BaseException:  # noqa: BLE001 - cancelled / already failed
                    pass
            await self._api.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def open_source(args: argparse.Namespace) -> ManifestAgentSource | KubeAgentSource:
    if args.source == "manifests":
        if not args.manifests:
            raise ValueError("--source manifests needs --manifests PATH")
        return ManifestAgentSource(args.manifests)
    return KubeAgentSource(args.node, args.kubeconfig)
