"""Issue 11 in the lab: kubelet-like restarts, and a replaced ztunnel pod.

One lab (seed 003's client-server plus a second meshed pod on the client's node). The lab
restarts a killed process the way kubelet would (its supervisor), so faults are injected by
killing a PID: each test SIGKILLs one process and checks that it comes back with a new PID and
does its job again (a ztunnel Envoy is LIVE and carries a new connection, the control plane
re-syncs both ztunnels, a node agent is /ready). Last, the client node's ztunnel pod is replaced
by one with a new name and IP: the node agent follows it and traffic flows through the new Envoy.
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
from xdsserver.lab.netns import list_netns, netns_pids, run  # noqa: E402
from xdsserver.lab.supervise import backoff  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdssup") + "k"  # never the prefix another lab module uses

from labguard import poll, root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)
from labpods import other_pod  # noqa: E402

SRC, DST = "ambient-worker", "ambient-worker2"
SERVER = ("10.244.2.5", 8080)
CLIENT_IP, OTHER = "10.244.1.4", ("10.244.1.6", 8080)  # OTHER: meshed, on the client's node
OLD_ZT = ("ztunnel-g7mrp", "5c0f1a2e-0000-4000-8000-000000000021", "10.244.1.2")
NEW_ZT = ("ztunnel-n3wpd", "5c0f1a2e-0000-4000-8000-000000000031", "10.244.1.9")
OTHER_POD = other_pod(SRC, OTHER[0])
RESTART_S = 30.0  # bound on each recovery (a restarted Envoy waits for ADS; Envoy's ADS retry backoff)


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("supervise") / "manifests"
    shutil.copytree(ROOT / "golden" / "client-server" / "manifests", dst)
    (dst / "other.yaml").write_text(OTHER_POD)
    lab = Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr))

    def down() -> None:
        procs = list(lab.refresh().values()) if lab.state_file.exists() else list(lab.procs.values())
        lab.down()
        assert owned_netns(PREFIX) == [] and not [p for p in procs if p.alive()], "lab processes left running"

    request.addfinalizer(down)
    lab.up(timeout=90)
    return lab


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


def envoys_in(netns: str) -> list[int]:
    """Envoy processes in a namespace (the node agent's short-lived commands may be there too)."""
    out = []
    for pid in netns_pids(netns):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"/envoy"):
            out.append(pid)
    return out


def synced_nodes(lab: Lab) -> set[str]:
    """Nodes whose every xDS type the control plane sent is ACKed at the version sent."""
    import json

    rows = json.loads(lab.xds_debug("/debug/syncz", timeout=2))
    by_node: dict[str, list[dict]] = {}
    for r in rows:
        by_node.setdefault(r["node"], []).append(r)
    return {n for n, rs in by_node.items()
            if {r["type"] for r in rs} >= {"CDS", "LDS"} and all(r["acked_version"] and r["acked_version"] == r["sent_version"] for r in rs)}


def test_crash_loop_backoff_doubles_up_to_the_cap():
    assert [backoff(n, 0.5, 10.0) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


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
        assert envoys_in(lab.ztunnel_netns(DST)) == [after.pid]
        assert lab.supervised()


class TestZtunnelPodReplaced:
    """Runs last (it changes the lab): the DaemonSet replaced the client node's ztunnel pod."""

    def test_agent_follows_the_new_ztunnel_and_traffic_goes_through_it(self, lab):
        old_zt = lab.topo.pod(lab.topo.node(SRC).ztunnel)
        assert (old_zt.name, old_zt.ip) == (OLD_ZT[0], OLD_ZT[2])
        node_ns = lab.topo.node(SRC).netns
        cluster = lab.manifests / "cluster.yaml"
        text = cluster.read_text()
        for a, b in zip(OLD_ZT, NEW_ZT):
            assert a in text
            text = text.replace(a, b)
        cluster.write_text(text)

        got = lab.sync()
        assert got["ztunnel_replaced"] == [SRC]
        assert f"istio-system/{OLD_ZT[0]}" in got["removed"] and f"istio-system/{NEW_ZT[0]}" in got["added"]
        new_zt = lab.topo.pod(lab.topo.node(SRC).ztunnel)
        assert (new_zt.ip, new_zt.netns != old_zt.netns, new_zt.veth != old_zt.veth) == (NEW_ZT[2], True, True)
        # the old pod is gone: its namespace, its Envoy, and every node rule naming its IP or veth
        assert old_zt.netns not in list_netns()
        ref = lab.refresh()[f"ztunnel:{SRC}"]
        assert ref.alive() and ref.ns == new_zt.netns and envoys_in(new_zt.netns) == [ref.pid]
        node_state = "\n".join(run(node_ns, argv) for argv in (["iptables-save"], ["ip", "rule"], ["ip", "-d", "link"],
                                                                 ["ip", "route", "show", "table", "all"]))
        assert old_zt.veth not in node_state and f"{OLD_ZT[2]}/" not in node_state and f"{OLD_ZT[2]} " not in node_state
        assert f"remote {NEW_ZT[2]} " in run(node_ns, ["ip", "-d", "link", "show", "istioout"])
        assert f"default via {NEW_ZT[2]} dev {new_zt.veth}" in run(node_ns, ["ip", "route", "show", "table", "102"])

        log_at = len(lab.access_log(SRC))
        cross = client_gets_server(lab)  # cross-node, HBONE from the new ztunnel
        assert cross["pod"] == "ambient/server-f44ffdf6f-dqgm2" and cross["peer"].startswith(CLIENT_IP + ":")
        same = request(lab.pod_netns("client-6db7cfc846"), *OTHER, "/", timeout=10)  # same node, both ends on it
        assert same.status == 200 and same.json()["pod"] == "ambient/other-7d9f8c6b5-x2k4p"
        assert same.json()["peer"].startswith(CLIENT_IP + ":")
        served = lambda: lab.access_log(SRC)[log_at:]  # noqa: E731
        poll(lambda: "10.244.2.5:15008" in served() and f"{OTHER[0]}:8080" in served(), 10,
             "both connections in the new ztunnel's access log")
        # a fresh Envoy's counter: the cross-node CONNECT left from the new ztunnel
        assert lab.envoy_stats(SRC, "outbound_pod_tunnel_clus").get(
            "cluster.outbound_pod_tunnel_clus_spiffe_cluster.local/ns/ambient/sa/client.upstream_rq_total", 0) >= 1
