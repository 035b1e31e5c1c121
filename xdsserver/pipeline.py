"""Manifests -> model -> per-node resources, for the one-shot commands (generate, golden, explain).

The running server composes the same stages in :mod:`xdsserver.app`; this module is the
synchronous, whole-cluster version of that pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .model import Flavor, Identity, Model
from .model.index import MeshIndex
from .sources.manifests import load_model
from .translate import CertPair, NodeResources, translate


class CaCerts:
    """Adapts the built-in CA to the translator's :class:`CertProvider` protocol."""

    def __init__(self, ca: object) -> None:
        self.ca = ca
        # the same CertPair object while the CA hands out the same certificate, so the
        # translator's per-node secret check is an identity test, not a PEM comparison
        self._pairs: dict[str, tuple[object, CertPair]] = {}

    def root_pem(self) -> str:
        return self.ca.root_pem  # type: ignore[attr-defined]

    def workload(self, identity: Identity) -> CertPair:
        w = self.ca.issue_workload(identity.spiffe)  # type: ignore[attr-defined]
        hit = self._pairs.get(identity.spiffe)
        if hit is None or hit[0] is not w:
            hit = self._pairs[identity.spiffe] = (w, CertPair(w.cert_chain_pem, w.private_key_pem))
        return hit[1]


def ephemeral_certs(trust_domain: str = "cluster.local", ca_dir: Path | None = None) -> CaCerts:
    from .ca import CertificateAuthority

    return CaCerts(CertificateAuthority.load_or_create(ca_dir, trust_domain=trust_domain))


@dataclass
class Cluster:
    """One loaded input and the resources of every node it names."""

    model: Model
    index: MeshIndex
    flavor: Flavor
    nodes: dict[str, NodeResources]


def build_cluster(manifests: Path | str, flavor: Flavor = Flavor.ENVOY, certs: CaCerts | None = None, nodes: list[str] | None = None) -> Cluster:
    model = load_model(manifests)
    index = MeshIndex(model)
    certs = certs or ephemeral_certs(model.mesh.trust_domain)
    wanted = nodes if nodes is not None else list(index.node_names)
    return Cluster(model, index, flavor, {n: translate(index.node_view(n), flavor, certs) for n in wanted})
