"""Input sources: turn Kubernetes objects (from manifest files or the API) into the model.

Every source produces :class:`SourceObject` values -- a raw Kubernetes object in its API JSON
shape (camelCase, as ``kubectl get -o json`` prints it) plus where it came from -- and hands
them to :func:`xdsserver.sources.objects.build_model`, so validation, enrollment and endpoint
derivation are shared by all sources.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SourceObject:
    """One raw Kubernetes object and its origin, used in every error message about it.

    Sources replace a changed object by a new ``SourceObject`` and never mutate ``obj``, so its
    kind and reference are worked out once per object, not once per model build."""

    origin: str  # e.g. "golden/bookinfo/manifests/pods.yaml#3" or "kubernetes"
    obj: dict[str, Any]
    _kind: str | None = field(default=None, init=False, repr=False, compare=False)
    _ref: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        if self._kind is None:
            object.__setattr__(self, "_kind", str(self.obj.get("kind", "")))
        return self._kind  # type: ignore[return-value]

    @property
    def ref(self) -> str:
        """``Kind namespace/name`` (or ``Kind name`` for cluster-scoped objects)."""
        if self._ref is None:
            meta = self.obj.get("metadata") or {}
            if not isinstance(meta, dict):
                meta = {}
            ns, name = meta.get("namespace"), meta.get("name", "?")
            object.__setattr__(self, "_ref", f"{self.kind} {ns}/{name}" if ns else f"{self.kind} {name}")
        return self._ref  # type: ignore[return-value]


def replaced_positions(old: Sequence[Any], new: Sequence[Any], limit: int) -> list[int] | None:
    """Positions where ``new`` holds another object than ``old`` (by identity, compared at C
    speed), or None if the lengths differ or more than ``limit`` differ: a source's change list
    when objects are replaced in place."""
    if len(old) != len(new):
        return None
    differs = list(map(operator.is_not, old, new))
    out: list[int] = []
    at = -1
    while True:
        try:
            at = differs.index(True, at + 1)
        except ValueError:
            return out
        out.append(at)
        if len(out) > limit:
            return None
