"""Chaos with traffic (issue 14, point 1), the CI-sized run of :mod:`xdsserver.lab.chaos`.

A 3-node lab with per-node xDS relays. While paced sha256-checked transfers and ~20 new
connections/s run on pod IPs and VIPs, the control plane is restarted 3x (SIGTERM, SIGTERM,
SIGKILL), n1's xDS stream is cut 10x, n2's node agent and n3's ztunnel Envoy are SIGKILLed.
Paths not through n3 must lose nothing; through n3, new connections work within 2 s of its new
Envoy being Ready; no ztunnel's listener/cluster gauge drops; at the end every ztunnel is on the
server's versions. ``python -m bench chaos`` is the long version (issue's numbers).
"""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.lab import chaos  # noqa: E402
from xdsserver.lab.lab import Lab  # noqa: E402

PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdsch") + "c"  # never the prefix another lab module uses

from labguard import lab_up, root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)

TRANSFERS, SIZE = int(os.environ.get("XDS_CHAOS_TRANSFERS", "7")), int(os.environ.get("XDS_CHAOS_MB", "8")) << 20


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = chaos.write_manifests(tmp_path_factory.mktemp("chaos") / "manifests")
    return lab_up(request, Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr), xds_relay=True))


def test_faults_with_traffic_lose_nothing_outside_the_restarted_ztunnel(lab):
    r = chaos.run(lab, transfers=TRANSFERS, size=SIZE, rate=20.0, pace_s=30.0, flaps=10)
    print("\n".join(r.lines()))
    assert r.transfers_failed_safe == []
    assert r.attempts_failed_safe == []
    assert r.transfers_spanning == r.transfers, "every transfer must span the whole fault sequence"
    assert r.attempts >= 20 * r.fault_s * 0.5, "the new-connection load did not run"
    assert r.attempts_failed_restarted_outside == 0
    assert r.first_ok_after_ready_s is not None and r.first_ok_after_ready_s <= 2.0
    assert r.config_drops == {}
    assert r.watch_samples > 0
    assert r.stale == []
    assert r.cuts >= 10
    assert r.restarts.get("xdsserver", 0) == 3 and r.restarts.get("ztunnel:n3", 0) == 1
