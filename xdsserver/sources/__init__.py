"""Input sources: turn Kubernetes objects (from manifest files or the API) into the model.

Every source produces :class:`SourceObject` values -- a raw Kubernetes object in its API JSON
shape (camelCase, as ``kubectl get -o json`` prints it) plus where it came from -- and hands
them to :func:`xdsserver.sources.objects.build_model`, so validation, enrollment and endpoint
derivation are shared by all sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One raw Kubernetes object and its origin, used in every error message about it."""

    origin: str  # e.g. "golden/bookinfo/manifests/pods.yaml#3" or "kubernetes"
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def ref(self) -> str:
        """``Kind namespace/name`` (or ``Kind name`` for cluster-scoped objects)."""
        meta = self.obj.get("metadata") or {}
        if not isinstance(meta, dict):
            meta = {}
        ns, name = meta.get("namespace"), meta.get("name", "?")
        return f"{self.kind} {ns}/{name}" if ns else f"{self.kind} {name}"
