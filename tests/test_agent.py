"""Node agent: reconcile the whole plan on a real kernel, follow a replaced ztunnel, clean up.

The netns tests build a small node the way kubelet + CNI would (``$XDS_AGENT_TEST_PREFIX``,
default ``agtt``): a node namespace with kubelet's canary chains and a kube-proxy hook, and a
ztunnel pod namespace wired by a veth whose name the agent must find from the kernel (the host
route), not guess. Then the agent — the real ``xdsserver node-agent`` command — installs the
plan in both namespaces, is idempotent, restores drift, follows a new ztunnel pod, survives bad
input, serves /healthz /ready /metrics, and ``--cleanup`` leaves the node byte-for-byte as before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from xdsserver.agent.kernel import parse_iptables_save, parse_routes, parse_rules, read_ipsets, read_links, read_routes, read_rules
from xdsserver.agent.kernel import netns_runner
from xdsserver.agent.reconcile import chain_changes, ipset_changes, route_changes
from xdsserver.redirect import IPSET_NAME, build_plan, iptables_restore_text
from xdsserver.sources.manifests import load_model

CLIENT_SERVER = Path(__file__).resolve().parent.parent / "golden" / "client-server" / "manifests"
NODE = "ambient-worker"
PREFIX = os.environ.get("XDS_AGENT_TEST_PREFIX", "agtt")
ZT_VETH = "vethzt0001"  # deliberately not the plan's default name: the agent must find it


@pytest.fixture(scope="module")
def plan():
    return build_plan(load_model(CLIENT_SERVER), NODE)


# -- pure: the differences computed from parsed kernel output -----------------------------------
def test_route_diff_replaces_wrong_adds_missing_deletes_extra(plan):
    have = parse_routes("10.244.1.2 dev vethold scope link linkdown\n10.244.1.99 via 192.168.126.2 dev istioin\n")
    cmds = [c.argv for c in route_changes(plan.node.routes, {100: have})]
    assert ("ip", "route", "replace", "table", "100", "10.244.1.2", "dev", plan.net.ztunnel_veth, "scope", "link") in cmds
    assert ("ip", "route", "replace", "table", "100", "10.244.1.4", "via", "192.168.126.2", "dev", "istioin", "src", "10.244.1.1") in cmds
    assert cmds[-1] == ("ip", "route", "del", "table", "100", "10.244.1.99")
    want = parse_routes("\n".join(r.show() for r in plan.node.routes if r.table == 100))
    assert route_changes(plan.node.routes, {100: want}) == []


def test_chain_diff_touches_only_differing_chains_and_keeps_others(plan):
    mine = parse_iptables_save(iptables_restore_text(plan.node.chains).split("*nat")[0] + "COMMIT\n")
    assert chain_changes(tuple(c for c in plan.node.chains if c.table == "mangle"), {"mangle": mine}) == []
    rules = dict(mine.rules)
    rules["ztunnel-OUTPUT"] = ()
    rules["PREROUTING"] = ("-j KUBE-OTHER",)  # our jump gone, someone else's rule stays
    ch = chain_changes(tuple(c for c in plan.node.chains if c.table == "mangle"),
                       {"mangle": type(mine)(True, mine.chains, rules)})
    assert len(ch) == 1
    lines = ch[0].stdin.splitlines()
    assert "-F ztunnel-OUTPUT" in lines and "-I PREROUTING 1 -j ztunnel-PREROUTING" in lines
    assert not any("KUBE-OTHER" in line or "-F ztunnel-INPUT" in line for line in lines)


def test_ipset_and_rule_parsers():
    assert ipset_changes(("10.0.0.1",), {}) [0].argv[:3] == ("ipset", "create", IPSET_NAME)
    assert [c.op for c in ipset_changes(("10.0.0.1",), {IPSET_NAME: frozenset({"10.0.0.2"})})] == ["add", "delete"]
    assert parse_rules("0:\tfrom all lookup local\n100:\tfrom all fwmark 0x200/0x200 goto 32766\n")[100] == \
        ["100: from all fwmark 0x200/0x200 goto 32766"]


# -- a node on a real kernel ----------------------------------------------------------------------
def _sh(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=stdin, timeout=30).stdout


KUBELET_IPTABLES = """*mangle
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
COMMIT
*filter
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
"""


def wire_pod(node_ns: str, pod_ns: str, ip: str, veth: str, gateway: str = "10.244.1.1") -> None:
    """What the CNI (ptp) does for one pod: a veth pair, the pod's address and routes, the host route."""
    subprocess.run(["ip", "netns", "del", pod_ns], capture_output=True, timeout=30)
    _sh("ip", "netns", "add", pod_ns)
    _sh("ip", "-n", pod_ns, "-batch", "-", stdin="\n".join([
        "link set lo up", f"link add eth0 type veth peer name {veth} netns {node_ns}",
        f"addr add {ip}/24 dev eth0 noprefixroute", "link set eth0 up",
        f"route add {gateway} dev eth0 scope link src {ip}", f"route add default via {gateway} dev eth0 src {ip}"]) + "\n")
    _sh("ip", "-n", node_ns, "-batch", "-", stdin="\n".join([
        f"addr add {gateway}/32 dev {veth}", f"link set {veth} up", f"route add {ip} dev {veth} scope host"]) + "\n")


class FakeNode:
    def __init__(self, tmp: Path) -> None:
        self.node, self.zt, self.zt2 = f"{PREFIX}-node", f"{PREFIX}-zt", f"{PREFIX}-zt2"
        self.manifests = tmp / "manifests"
        shutil.copytree(CLIENT_SERVER, self.manifests)
        self.state_dir = tmp / "state"
        self.run = netns_runner(self.node)

    def up(self) -> None:
        self.down()
        _sh("ip", "netns", "add", self.node)
        _sh("ip", "-n", self.node, "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", self.node, "iptables-restore", "--noflush", stdin=KUBELET_IPTABLES)
        wire_pod(self.node, self.zt, "10.244.1.2", ZT_VETH)

    def down(self) -> None:
        for ns in (self.node, self.zt, self.zt2):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def agent(self, *extra: str, check: bool = True) -> tuple[int, list[dict], list[dict]]:
        p = subprocess.run([sys.executable, "-m", "xdsserver", "node-agent", "--node", NODE, "--manifests", str(self.manifests),
                            "--netns", self.node, "--state-dir", str(self.state_dir), "--once", *extra],
                           capture_output=True, text=True, timeout=120)
        out = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
        err = [json.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
        if check:
            assert p.returncode == 0, p.stderr
        return p.returncode, out, err

    def edit(self, fn) -> None:
        """Rewrite the manifest documents through ``fn(doc) -> doc | [docs] | None`` (None drops it)."""
        for f in sorted(self.manifests.glob("*.yaml")):
            docs = []
            for d in yaml.safe_load_all(f.read_text()):
                r = fn(d) if d is not None else None
                docs += r if isinstance(r, list) else ([r] if r is not None else [])
            f.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def snapshot(ns: str) -> dict[str, str]:
    """Links, addresses, rules, every route table, iptables and ipsets, without counters/ages."""
    run = netns_runner(ns)
    # IPv6 DAD on a new device changes its addresses and routes by itself a moment later: let it finish.
    _poll(lambda: "tentative" not in run(("ip", "addr", "show")), 10, f"DAD done in {ns}")
    ipt = "\n".join(line for line in run(("iptables-save",)).splitlines() if not line.startswith("#"))
    return {
        "links": run(("ip", "-d", "link", "show")),
        "addrs": run(("ip", "addr", "show")),
        "rules": run(("ip", "rule", "show")),
        "routes": run(("ip", "route", "show", "table", "all")),
        "iptables": ipt,
        "ipset": run(("ipset", "list")),
    }


@pytest.fixture
def fake(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    f = FakeNode(tmp_path)
    f.up()
    try:
        yield f
    finally:
        f.down()


def _ztunnel_state(ns: str) -> tuple:
    run = netns_runner(ns)
    ipt = {t: parse_iptables_save(run(("iptables-save", "-t", t))).rules for t in ("mangle", "nat")}
    return ipt["mangle"].get("PREROUTING", ()), ipt["nat"].get("OUTPUT", ()), read_rules(run), read_routes(run, 100)


@pytest.mark.netns
def test_agent_installs_whole_plan_is_idempotent_and_restores_drift(fake, plan):
    rc, out, err = fake.agent()
    assert out[-1]["changes"] > 20 and out[-1]["errors"] == 0, err
    assert sum("object" in o for o in out) == out[-1]["changes"]  # one log line per change
    run = fake.run
    links = read_links(run)
    assert links["istioin"].remote == "10.244.1.2" and links["istioin"].ipv4 == ("192.168.126.1/30",) and links["istioin"].up
    assert read_ipsets(run)[IPSET_NAME] == {"10.244.1.4"}
    rules = read_rules(run)
    assert [rules[p] for p in (100, 103)] == [["100: from all fwmark 0x200/0x200 goto 32766"], ["103: from all lookup 100"]]
    assert read_routes(run, 102)[("default",)] == ("default", "via", "10.244.1.2", "dev", ZT_VETH, "onlink")
    nat = parse_iptables_save(run(("iptables-save", "-t", "nat"))).rules
    assert nat["PREROUTING"][0] == "-j ztunnel-PREROUTING" and "-j KUBE-SERVICES" in nat["PREROUTING"]
    pre, out_nat, zrules, zroutes = _ztunnel_state(fake.zt)
    assert len(pre) == 4 and "TPROXY" in pre[0] and "--to-ports 15008" in out_nat[0]
    assert sorted(p for p in zrules if 20000 <= p < 30000) == [20000, 20003, 20004]
    assert zroutes == {("local", "default"): ("local", "default", "dev", "lo", "scope", "host")}

    rc, out, _ = fake.agent()
    assert out == [out[-1]] and out[-1]["changes"] == 0, "a second run on a set-up node must change nothing"

    # Drift, by hand: a member, a table-100 route, a rule, a chain's rules, a jump, the pod's TPROXY rule.
    run(("ipset", "del", IPSET_NAME, "10.244.1.4"))
    run(("ip", "route", "del", "table", "100", "10.244.1.4"))
    run(("ip", "rule", "del", "priority", "101"))
    run(("iptables", "-t", "mangle", "-F", "ztunnel-PREROUTING"))
    run(("iptables", "-t", "nat", "-D", "PREROUTING", "-j", "ztunnel-PREROUTING"))
    netns_runner(fake.zt)(("iptables", "-t", "mangle", "-D", "PREROUTING", "1"))
    before = snapshot(fake.node)
    rc, out, _ = fake.agent()
    fixed = {o["object"] for o in out if "object" in o}
    assert {"ipset member 10.244.1.4", "route 100 10.244.1.4", "rule 101"} <= fixed
    assert any("mangle/ztunnel-PREROUTING" in o for o in fixed) and any("jump nat/PREROUTING" in o for o in fixed)
    assert any(o["netns"] == "ztunnel" and "mangle/PREROUTING" in o["object"] for o in out if "object" in o)
    assert snapshot(fake.node) != before
    assert fake.agent()[1][-1]["changes"] == 0


@pytest.mark.netns
def test_cleanup_leaves_the_node_exactly_as_before(fake):
    before_node, before_zt = snapshot(fake.node), snapshot(fake.zt)
    fake.agent()
    assert snapshot(fake.node) != before_node
    rc, out, err = fake.agent("--cleanup")
    assert out[-1]["cleanup"] == "done" and out[-1]["errors"] == 0, err
    after_node, after_zt = snapshot(fake.node), snapshot(fake.zt)
    for key in before_node:
        assert after_node[key] == before_node[key], f"node {key} differs after cleanup"
        if key != "iptables":
            assert after_zt[key] == before_zt[key], f"ztunnel pod {key} differs after cleanup"
    # The pod had no iptables tables at all; iptables-nft cannot delete a table (no nft here), so
    # they stay, empty. The node (kubelet/kube-proxy made its tables) is exact, above.
    assert "-A " not in after_zt["iptables"]
    assert not (fake.state_dir / f"{NODE}.json").exists()


def client_copies(*copies: tuple[str, str]):
    """An ``edit`` function adding copies of the enrolled client pod under new names and IPs."""
    def fn(doc):
        if doc.get("kind") != "Pod" or doc["metadata"]["name"] != "client-6db7cfc846-bwj8r":
            return doc
        out = [doc]
        for name, ip in copies:
            new = json.loads(json.dumps(doc))
            new["metadata"]["name"], new["metadata"]["uid"] = name, f"{name}-uid"
            new["status"]["podIP"], new["status"]["podIPs"] = ip, [{"ip": ip}]
            out.append(new)
        return out
    return fn


def _set_pod_ip(name: str, ip: str):
    def fn(doc):
        if doc.get("kind") == "Pod" and doc["metadata"]["name"] == name:
            doc["status"]["podIP"] = ip
            doc["status"]["podIPs"] = [{"ip": ip}]
        return doc
    return fn


@pytest.mark.netns
def test_agent_follows_a_replaced_ztunnel_pod(fake):
    fake.agent()
    # The ztunnel pod is replaced: new IP, new veth, new namespace; the old one is gone.
    subprocess.run(["ip", "netns", "del", fake.zt], capture_output=True, timeout=30)
    wire_pod(fake.node, fake.zt2, "10.244.1.9", "vethzt0002")
    fake.edit(_set_pod_ip("ztunnel-g7mrp", "10.244.1.9"))
    rc, out, err = fake.agent()
    assert out[-1]["errors"] == 0, err
    links = read_links(fake.run)
    assert links["istioin"].remote == links["istioout"].remote == "10.244.1.9"
    assert read_routes(fake.run, 102)[("default",)] == ("default", "via", "10.244.1.9", "dev", "vethzt0002", "onlink")
    assert ("10.244.1.4",) in read_routes(fake.run, 100)  # pod routes restored over the new device
    pre = parse_iptables_save(fake.run(("iptables-save", "-t", "mangle"))).rules["ztunnel-PREROUTING"]
    assert "! -s 10.244.1.9/32 -i vethzt0002 -j MARK --set-xmark 0x210/0x210" in pre
    assert not any("vethzt0001" in r or "10.244.1.2/" in r for r in pre)
    zpre, *_ = _ztunnel_state(fake.zt2)
    assert len(zpre) == 4 and "! -d 10.244.1.9/32" in zpre[3]
    assert fake.agent()[1][-1]["changes"] == 0


@pytest.mark.netns
def test_bad_input_names_the_object_and_keeps_the_rest(fake):
    fake.agent()
    state = snapshot(fake.node)

    fake.edit(client_copies(("client-twin", "10.244.1.4"), ("client-outside", "10.244.7.7")))
    rc, out, err = fake.agent()
    msgs = " | ".join(e["error"] for e in err)
    assert "client-twin" in msgs and "10.244.1.4" in msgs, msgs
    assert "ambient/client-outside" in msgs and "10.244.7.7" in msgs, msgs
    assert out[-1]["changes"] == 0 and snapshot(fake.node) == state  # the rest of the plan stays applied
    # No ztunnel pod on the node: named, nothing removed, exit 2 only because of --once.
    fake.edit(lambda d: None if d.get("kind") == "Pod" and d["metadata"]["name"] == "ztunnel-g7mrp" else d)
    rc, out, err = fake.agent(check=False)
    assert rc == 2 and "no ztunnel pod" in err[0]["error"] and out[-1]["changes"] == 0
    assert snapshot(fake.node) == state


def _http(ns: str, port: int, path: str) -> tuple[int, str]:
    from xdsserver.lab.client import request

    r = request(ns, "127.0.0.1", port, path, timeout=2)
    return r.status, r.body.decode()


def _poll(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = fn()
            if got:
                return got
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.mark.netns
def test_long_running_agent_health_metrics_and_drift_within_resync(fake):
    """The agent as a daemon inside the node namespace (as the DaemonSet/lab run it)."""
    log = fake.state_dir.parent / "agent.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["ip", "netns", "exec", fake.node, sys.executable, "-m", "xdsserver", "node-agent", "--node", NODE,
                                 "--manifests", str(fake.manifests), "--state-dir", str(fake.state_dir), "--resync", "1",
                                 "--health-address", "127.0.0.1:15021"], stdout=fh, stderr=subprocess.STDOUT)
    try:
        _poll(lambda: _http(fake.node, 15021, "/ready")[0] == 200, 30, "agent /ready")
        assert _http(fake.node, 15021, "/healthz")[0] == 200
        m = _http(fake.node, 15021, "/metrics")[1]
        assert _metric(m, "xdsserver_agent_pods_captured") == 1 and _metric(m, "xdsserver_agent_drift_corrections_total") == 0
        fake.run(("ipset", "del", IPSET_NAME, "10.244.1.4"))
        fake.run(("ip", "route", "del", "table", "100", "10.244.1.4"))
        _poll(lambda: _metric(_http(fake.node, 15021, "/metrics")[1], "xdsserver_agent_drift_corrections_total") >= 2, 10,
              "drift restored and counted")
        assert "10.244.1.4" in read_ipsets(fake.run)[IPSET_NAME] and ("10.244.1.4",) in read_routes(fake.run, 100)
        # A pod added to the manifests reaches the ipset and table 100 (change noticed, not the resync).
        wire_pod(fake.node, f"{PREFIX}-zt2", "10.244.1.7", "vethnew0001")

        fake.edit(client_copies(("client-two", "10.244.1.7")))
        _poll(lambda: "10.244.1.7" in read_ipsets(fake.run)[IPSET_NAME] and ("10.244.1.7",) in read_routes(fake.run, 100), 10,
              "new pod captured")
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    drift = [x for x in lines if x.get("drift")]
    assert {x["object"] for x in drift} >= {"ipset member 10.244.1.4", "route 100 10.244.1.4"}
    assert not any(x.get("drift") and "10.244.1.7" in x.get("object", "") for x in lines)  # a plan change is not drift


# -- --source kubernetes against the stand-in API server (tests/kubeapi.py) ------------------------
@pytest.fixture
def kube():
    from kubeapi_thread import ThreadedStandIn

    k = ThreadedStandIn().start()
    try:
        yield k
    finally:
        k.stop()


@pytest.mark.netns
def test_kubernetes_source_follows_its_node_only_across_a_forced_410(fake, kube, tmp_path):
    """The agent runs in the test's namespace here (``--netns``): the stand-in listens on its loopback."""
    from kubeapi_thread import namespace, pod

    for ns, enrolled in (("ambient", True), ("default", False), ("istio-system", False)):
        kube.create(namespace(ns, enrolled=enrolled))
    kube.create(pod("ztunnel-abcde", "10.244.1.2", ns="istio-system", node_name=NODE, sa="ztunnel", app="ztunnel"))
    kube.create(pod("client-0", "10.244.1.4", ns="ambient", node_name=NODE, sa="client"))
    kube.create(pod("server-0", "10.244.2.5", ns="ambient", node_name="ambient-worker2", sa="server"))
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    log = tmp_path / "agent.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "xdsserver", "node-agent", "--node", NODE, "--source", "kubernetes",
                                 "--kubeconfig", str(kubeconfig), "--netns", fake.node, "--state-dir", str(fake.state_dir),
                                 "--resync", "30"], stdout=fh, stderr=subprocess.STDOUT)

    def members() -> frozenset[str]:
        return read_ipsets(fake.run).get(IPSET_NAME, frozenset())

    try:
        _poll(lambda: members() == {"10.244.1.4"}, 30, "first reconcile from the API")
        lists = kube.call(lambda a: a.list_requests("Pod"))
        assert lists and all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}" for r in lists)
        kube.create(pod("client-1", "10.244.1.7", ns="ambient", node_name=NODE, sa="client"))
        kube.create(pod("server-1", "10.244.2.9", ns="ambient", node_name="ambient-worker2", sa="server"))
        _poll(lambda: members() == {"10.244.1.4", "10.244.1.7"} and ("10.244.1.7",) in read_routes(fake.run, 100), 10,
              "pod created on this node: member and route")
        kube.create(pod("plain-0", "10.244.1.8", ns="default", node_name=NODE, sa="default"))
        kube.update(namespace("default", enrolled=True))
        _poll(lambda: "10.244.1.8" in members(), 10, "namespace label enrolled the pod")
        # A delete while the watches are down, then history compacted: 410 -> relist, delete not lost.
        kube.call(lambda a: (a.drop_watches(), a.delete("Pod", "client-1", "ambient"), a.compact()))
        _poll(lambda: "10.244.1.7" not in members() and ("10.244.1.7",) not in read_routes(fake.run, 100), 20,
              "pod deleted in the 410 gap removed")
        assert kube.call(lambda a: a.gone_sent) >= 1
        assert "10.244.2.9" not in members() and "10.244.2.5" not in members()
        # The API server goes away: the agent keeps running and keeps the applied plan.
        kube.stop()
        _poll(lambda: "failed" in log.read_text(), 20, "unreachable API server reported")
        assert proc.poll() is None and members() == {"10.244.1.4", "10.244.1.8"}
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.netns
def test_uninstall_annotation_makes_the_running_agent_clean_up_and_turn_unready(fake):
    """The chart's uninstall path, on the agent side: kubelet's downward-API annotations file
    gains the cleanup annotation; the agent removes everything, /ready turns 503, it stays up."""
    before = snapshot(fake.node)
    annotations = fake.state_dir.parent / "podinfo-annotations"
    annotations.write_text('kubectl.kubernetes.io/default-container="node-agent"\n')
    log = fake.state_dir.parent / "agent.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["ip", "netns", "exec", fake.node, sys.executable, "-m", "xdsserver", "node-agent", "--node", NODE,
                                 "--manifests", str(fake.manifests), "--state-dir", str(fake.state_dir), "--resync", "1",
                                 "--health-address", "127.0.0.1:15021", "--cleanup-when-annotated", str(annotations)],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        _poll(lambda: _http(fake.node, 15021, "/ready")[0] == 200, 30, "agent /ready")
        assert snapshot(fake.node) != before
        annotations.write_text('kubectl.kubernetes.io/default-container="node-agent"\nxdsserver.io/node-agent-cleanup="true"\n')
        _poll(lambda: _http(fake.node, 15021, "/ready")[0] == 503, 10, "agent not ready after cleanup")
        assert snapshot(fake.node) == before
        time.sleep(1.5)  # not a synchronisation: a resync period passes, and nothing comes back
        assert snapshot(fake.node) == before and proc.poll() is None
        assert _http(fake.node, 15021, "/healthz")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_uninstall_hook_annotates_agent_pods_and_waits_until_none_is_ready(kube, tmp_path):
    from kubeapi_thread import pod

    labels = {"app.kubernetes.io/component": "node-agent", "app.kubernetes.io/name": "node-agent"}
    for i in (1, 2):
        kube.create(pod(f"node-agent-{i}", f"172.18.0.{i + 1}", ns="istio-system", node_name=f"n{i}", sa="node-agent", labels=labels))
    kube.create(pod("other-0", "10.244.1.9", ns="istio-system", node_name="n1", sa="x"))
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    cmd = [sys.executable, "-m", "xdsserver", "node-agent-uninstall", "--namespace", "istio-system", "--kubeconfig", str(kubeconfig),
           "--selector", "app.kubernetes.io/component=node-agent,app.kubernetes.io/name=node-agent", "--poll", "0.1"]
    # Nobody turns unready: the hook fails at its deadline instead of pretending.
    p = subprocess.run([*cmd, "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "node-agent-1, node-agent-2" in p.stdout
    ann = lambda name: (kube.get("Pod", name, "istio-system")["metadata"].get("annotations") or {})  # noqa: E731
    assert ann("node-agent-1") == ann("node-agent-2") == {"xdsserver.io/node-agent-cleanup": "true"}
    assert ann("other-0") == {}
    proc = subprocess.Popen([*cmd, "--timeout", "30"], stdout=subprocess.PIPE, text=True)
    try:
        for i in (1, 2):  # kubelet, after each agent's /ready turned 503
            obj = kube.get("Pod", f"node-agent-{i}", "istio-system")
            obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
            kube.update(obj)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0 and '"uninstall": "done"' in out
