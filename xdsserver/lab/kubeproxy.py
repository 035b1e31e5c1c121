"""A kube-proxy stand-in for the lab nodes: ClusterIP DNAT in nat ``KUBE-SERVICES``.

Hooked into nat PREROUTING *after* ``ztunnel-PREROUTING`` (whose ACCEPT of ``0x100`` keeps
captured traffic un-DNATed, data-path.md §8.5) and into nat OUTPUT. Only non-captured clients
(pods outside the mesh, the node itself) are DNATed, exactly as on a real node.
"""

from __future__ import annotations

import hashlib

from ..model.index import MeshIndex

HOOK_TEXT = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n"


def _chain(svc_key: str, port: int) -> str:
    return "KUBE-SVC-" + hashlib.sha256(f"{svc_key}:{port}".encode()).hexdigest()[:16].upper()


def rules_text(index: MeshIndex, previous_chains: tuple[str, ...] = ()) -> tuple[str, tuple[str, ...]]:
    """``iptables-restore --noflush`` input (re)filling KUBE-SERVICES and its per-port chains.

    Declared chains are flushed by iptables-restore, so re-applying replaces the old rules;
    chains of services that disappeared (``previous_chains``) are flushed and deleted."""
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    body: list[str] = []
    chains: list[str] = []
    for t in index.targets:
        for vip in t.service.cluster_ips:
            if ":" in vip:
                continue
            chain = _chain(f"{t.service.key}/{vip}", t.port.port)
            chains.append(chain)
            body.append(f"-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport {t.port.port} -j {chain}")
            n = len(t.backends)
            for i, b in enumerate(t.backends):
                prob = "" if i == n - 1 else f"-m statistic --mode random --probability {1 / (n - i):.5f} "
                body.append(f"-A {chain} -p tcp {prob}-j DNAT --to-destination {b.ip}:{b.port}")
    gone = [c for c in previous_chains if c not in chains]
    lines += [f":{c} - [0:0]" for c in chains + gone]
    lines += body
    lines += [f"-X {c}" for c in gone]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n", tuple(chains)
