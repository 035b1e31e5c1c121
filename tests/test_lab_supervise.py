"""Issue 11: the lab restarts a killed process the way kubelet would (its supervisor), so faults
are injected by killing a PID. One lab (seed 003's client-server); each test SIGKILLs one process
and checks that it comes back with a new PID and does its job again: a ztunnel Envoy is LIVE and
carries a new connection, the control plane re-syncs both ztunnels, a node agent is /ready.
"""

from __future__ import annotations

import os
import shutil
import signal
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
from xdsserver.lab.lab import AGENT_HEALTH, DEBUG_ADDRESS, Lab, owned_netns  # noqa: E402
from xdsserver.lab.netns import netns_pids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdssup") + "k"  # never the prefix another lab module uses

from labguard import root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)

SRC, DST = "ambient-worker", "ambient-worker2"
SERVER = ("10.244.2.5", 8080)
RESTART_S = 30.0  # bound on each recovery (a restarted Envoy waits for ADS; Envoy's ADS retry backoff)


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("supervise") / "manifests"
    shutil.copytree(ROOT / "golden" / "client-server" / "manifests", dst)
    lab = Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr))

    def down() -> None:
        procs = list(lab.refresh().values()) if lab.state_file.exists() else list(lab.procs.values())
        lab.down()
        assert owned_netns(PREFIX) == [] and not [p for p in procs if p.alive()], "lab processes left running"

    request.addfinalizer(down)
    lab.up(timeout=90)
    return lab


def poll(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(0.1)


def ok(fn) -> bool:
    try:
        return bool(fn())
    except OSError:
        return False


def client_gets_server(lab: Lab) -> dict:
    r = request(lab.pod_netns("client-6db7cfc846"), *SERVER, "/", timeout=10)
    assert r.status == 200, r
    return r.json()


def envoy_live(lab: Lab, node: str) -> bool:
    return ok(lambda: lab.envoy_admin(node, "/ready", timeout=1).strip() == "LIVE")


def synced_nodes(lab: Lab) -> set[str]:
    """Nodes whose every xDS type the control plane sent is ACKed at the version sent."""
    import json

    rows = json.loads(lab.xds_debug("/debug/syncz", timeout=2))
    by_node: dict[str, list[dict]] = {}
    for r in rows:
        by_node.setdefault(r["node"], []).append(r)
    return {n for n, rs in by_node.items()
            if {r["type"] for r in rs} >= {"CDS", "LDS"} and all(r["acked_version"] and r["acked_version"] == r["sent_version"] for r in rs)}


class TestKubeletRestarts:
    def test_sigkilled_ztunnel_comes_back_and_carries_a_new_connection(self, lab):
        name = f"ztunnel:{SRC}"
        assert client_gets_server(lab)["peer"].startswith("10.244.1.4:")
        old = lab.kill(name, signal.SIGKILL)
        new = lab.wait_restarted(name, old, RESTART_S)
        assert new.pid != old.pid and new.argv == old.argv and new.ns == old.ns  # same bootstrap, same pod
        poll(lambda: envoy_live(lab, SRC), RESTART_S, f"restarted {name} /ready LIVE")
        answer = client_gets_server(lab)
        assert answer["pod"] == "ambient/server-f44ffdf6f-dqgm2" and answer["peer"].startswith("10.244.1.4:")
        assert lab.status()["processes"][name]["restarts"] >= 1

    def test_sigkilled_control_plane_comes_back_and_the_ztunnels_resync(self, lab):
        old = lab.kill("xdsserver", signal.SIGKILL)
        lab.wait_restarted("xdsserver", old, RESTART_S)
        poll(lambda: ok(lambda: request(lab.topo.control_netns, *DEBUG_ADDRESS, "/ready", timeout=1).status == 200),
             RESTART_S, "restarted xdsserver /ready")
        poll(lambda: synced_nodes(lab) >= {SRC, DST}, RESTART_S, "both ztunnels re-synced (/debug/syncz)")
        assert client_gets_server(lab)["pod"] == "ambient/server-f44ffdf6f-dqgm2"

    def test_sigkilled_agent_comes_back_ready(self, lab):
        name = f"agent:{DST}"
        old = lab.kill(name, signal.SIGKILL)
        new = lab.wait_restarted(name, old, RESTART_S)
        assert new.ns == lab.topo.node(DST).netns
        netns = lab.topo.node(DST).netns
        poll(lambda: ok(lambda: request(netns, *AGENT_HEALTH, "/ready", timeout=1).status == 200), RESTART_S, f"restarted {name} /ready")
        assert client_gets_server(lab)["pod"] == "ambient/server-f44ffdf6f-dqgm2"

    def test_a_process_the_lab_replaces_is_not_restarted_as_well(self, lab):
        """A stop on purpose (the lab holds the state lock) is not a crash: one Envoy afterwards."""
        before = lab.refresh()[f"ztunnel:{DST}"]
        lab.restart_ztunnels(1)
        after = lab.refresh()[f"ztunnel:{DST}"]
        assert after != before and after.alive() and not before.alive()
        assert lab.restarts.get(f"ztunnel:{DST}", 0) == 0
        assert netns_pids(lab.ztunnel_netns(DST)) == [after.pid]
        assert lab.supervised()
