"""The lab's xDS stream relay (``Lab(xds_relay=True)``, :mod:`xdsserver.lab.relay`).

Each ztunnel reaches the control plane through its own relay socket. A cut aborts that node's
stream only: its Envoy (same PID) reconnects by itself and still carries traffic, the other
node's stream is untouched. A delay holds the server's bytes for that node only: after a
manifest change the delayed ztunnel accepts the push at least the delay later than the other.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.lab.client import request  # noqa: E402
from xdsserver.lab.lab import Lab  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdsrl") + "r"  # never the prefix another lab module uses

from labguard import lab_up, poll, root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)

SRC, DST = "ambient-worker", "ambient-worker2"
SERVER = ("10.244.2.5", 8080)
DELAY_S = 2.0
XDS_CX = "cluster.xds-grpc.upstream_cx_total"
NEW_SERVICE = """---
apiVersion: v1
kind: Service
metadata: {name: relay-probe, namespace: ambient}
spec:
  clusterIP: 10.96.0.150
  clusterIPs: [10.96.0.150]
  selector: {app: server}
  ports: [{name: http, port: 9080, targetPort: 8080}]
"""


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("relay") / "manifests"
    shutil.copytree(ROOT / "golden" / "client-server" / "manifests", dst)
    return lab_up(request, Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr), xds_relay=True))


def stat(lab: Lab, node: str, name: str) -> int:
    return lab.envoy_stats(node, name).get(name, 0)


def accepted(lab: Lab, node: str) -> int:
    """Every xDS response the node's Envoy accepted so far (all types)."""
    return sum(v for k, v in lab.envoy_stats(node, "update_success").items() if k.endswith(".update_success"))


def test_bootstraps_point_at_the_nodes_relays(lab):
    for node in (SRC, DST):
        assert lab.relay_socket(node) in (lab.state_dir / f"bootstrap-{node}.yaml").read_text()
        assert lab.refresh()[f"relay:{node}"].alive()


def test_a_cut_stream_reconnects_without_restarting_the_envoy(lab):
    pid = lab.refresh()[f"ztunnel:{SRC}"].pid
    before, other = stat(lab, SRC, XDS_CX), stat(lab, DST, XDS_CX)
    assert lab.cut_xds(SRC) >= 1
    poll(lambda: stat(lab, SRC, XDS_CX) > before and stat(lab, SRC, "control_plane.connected_state") == 1, 20,
         "the ztunnel reconnected through its relay")
    assert lab.refresh()[f"ztunnel:{SRC}"].pid == pid
    assert stat(lab, DST, XDS_CX) == other  # the other node's stream was not cut
    r = request(lab.pod_netns("client-6db7cfc846"), *SERVER, "/", timeout=10)
    assert r.status == 200 and r.json()["pod"] == "ambient/server-f44ffdf6f-dqgm2"


def test_a_delayed_node_gets_its_push_late(lab):
    lab.delay_xds(SRC, DELAY_S)
    try:
        base = {n: accepted(lab, n) for n in (SRC, DST)}
        (lab.manifests / "probe.yaml").write_text(NEW_SERVICE)
        t0 = time.monotonic()
        poll(lambda: accepted(lab, DST) > base[DST], 20, "the undelayed ztunnel accepted the push")
        t_dst = time.monotonic() - t0
        assert accepted(lab, SRC) == base[SRC], "the delayed ztunnel got the push as early as the other"
        poll(lambda: accepted(lab, SRC) > base[SRC], 20 + DELAY_S, "the delayed ztunnel accepted the push")
        t_src = time.monotonic() - t0
    finally:
        lab.delay_xds(SRC, 0)
    assert t_src - t_dst >= DELAY_S * 0.75, (t_src, t_dst)
