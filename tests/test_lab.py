"""End to end: real packets through two Envoy ztunnels configured only by ``xdsserver serve``.

Each scenario brings one lab up once (class fixture), runs its checks, and tears it down. The
lab only creates namespaces named ``xdstest-*``; the module asserts that the root namespace's
links, addresses, rules, routes, iptables and ipsets are identical before and after.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.explain import explain  # noqa: E402
from xdsserver.lab.client import download_sha256, request  # noqa: E402
from xdsserver.lab.lab import Lab, owned_netns  # noqa: E402
from xdsserver.lab.netns import list_netns, run  # noqa: E402
from xdsserver.pipeline import build_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# XDS_LAB_PREFIX lets several developers' labs run side by side on one machine (each its own
# namespaces and state dir); CI uses the default.
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdstest")
from labguard import poll, root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)


def bring_up(request_, scenario: str, tmp_path_factory) -> Lab:
    src = ROOT / "golden" / scenario / "manifests"
    dst = tmp_path_factory.mktemp(scenario) / "manifests"
    shutil.copytree(src, dst)
    lab = Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr))
    request_.addfinalizer(lambda: check_down(lab))
    lab.up(timeout=90)
    return lab


def check_down(lab: Lab) -> None:
    procs = list(lab.procs.values())
    lab.down()
    assert owned_netns(PREFIX) == []
    assert not [p for p in procs if p.alive()], "lab processes left running"
    assert not lab.state_dir.exists()


# -- helpers ---------------------------------------------------------------------------------
def get(lab: Lab, pod: str, host: str, port: int, path: str = "/") -> dict:
    r = request(lab.pod_netns(pod), host, port, path, timeout=10)
    assert r.status == 200, r
    return r.json()


def peer_ip(answer: dict) -> str:
    return answer["peer"].rsplit(":", 1)[0]


def log_lines(lab: Lab, node: str) -> list[list[str]]:
    out = []
    for line in lab.access_log(node).splitlines():
        try:
            out.append(shlex.split(line))
        except ValueError:
            continue
    return out


# Access-log fields (blocks.ISTIO_LOG_FORMAT + PEER_LOG_SUFFIX), after shlex splitting.
F_FLAGS, F_BYTES_SENT, F_AUTHORITY, F_UPSTREAM_HOST, F_UPSTREAM_CLUSTER, F_UP_LOCAL, F_DOWN_LOCAL, F_DOWN_REMOTE = 3, 8, 14, 15, 16, 17, 18, 19


def field(tokens: list[str], name: str) -> str:
    return next((t.split("=", 1)[1] for t in tokens if t.startswith(name + "=")), "")


def prefix_of(tokens: list[str]) -> str:
    i = next(i for i, t in enumerate(tokens) if t.startswith("tls="))
    return " ".join(tokens[i + 1 :])


def wait_for_line(lab: Lab, node: str, pred, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        hits = [t for t in log_lines(lab, node) if len(t) > F_DOWN_REMOTE and pred(t)]
        if hits:
            return hits[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching access log line on {node}:\n" + lab.access_log(node)[-3000:])
        time.sleep(0.05)


def counter(lab: Lab, ns: str, table: str, chain: str, needle: str, want_bytes: bool = False) -> int:
    """Packet (or byte) counter of the first rule in ``chain`` whose ``iptables -S`` form contains ``needle``."""
    out = run(ns, ["iptables", "-t", table, "-S", chain, "-v"])
    for line in out.splitlines():
        if line.startswith("-A ") and needle in line:
            m = re.search(r"-c (\d+) (\d+)", line)
            assert m, line
            return int(m.group(2 if want_bytes else 1))
    raise AssertionError(f"no rule with {needle!r} in {table}/{chain}:\n{out}")


def explain_for(lab: Lab, node: str, src: str, dst: str):
    return explain(build_cluster(lab.manifests).nodes, node, src, dst)


def check_mesh_connection(lab: Lab, client: str, src_node: str, src_ip: str, dst: str, answer: dict) -> None:
    """The lab's observation of one tunnelled connection agrees with `xdsserver explain`."""
    ex = explain_for(lab, src_node, src_ip, dst)
    assert ex.verdict == "tunnel", ex.text()
    served = answer["local"]
    ep = next((e for e in ex.endpoints if e.destination == served), None)
    assert ep is not None, f"{served} is not an endpoint explain lists: {ex.text()}"
    assert peer_ip(answer) == src_ip  # the server sees the client pod, not a ztunnel
    inbound = next(i for i in ex.inbound if i.final_destination == served)
    # Source ztunnel: the HBONE connection went to explain's tunnel address, checking explain's server identity.
    out = wait_for_line(lab, src_node, lambda t: t[F_UPSTREAM_HOST] == ep.tunnel_address
                        and field(t, "upstream_peer") == ep.server_identity and t[F_UP_LOCAL].startswith(src_ip + ":"))
    assert out[F_FLAGS] == "-"
    # Destination ztunnel: HBONE terminated for explain's destination, client identity over TLS 1.3.
    # (waiting for the tunnel address too: an earlier connection to the same pod may have come another way,
    # pod IP by 15088, VIP by 15008, and its line may be the last one until this connection's is written)
    line = wait_for_line(lab, inbound.node, lambda t: prefix_of(t) == "inbound hcm" and t[F_AUTHORITY] == served
                         and t[F_DOWN_REMOTE].startswith(src_ip + ":") and t[F_DOWN_LOCAL] == ep.tunnel_address)
    assert field(line, "peer") == ex.client_identity
    assert field(line, "tls") == "TLSv1.3"
    assert line[F_DOWN_LOCAL] == ep.tunnel_address  # TPROXY (or the 15088 REDIRECT) kept the original destination
    assert line[F_UPSTREAM_HOST] == served


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def client_server_lab(request, tmp_path_factory):
    return bring_up(request, "client-server", tmp_path_factory)


class TestClientServer:
    """Seed 003: client 10.244.1.4 (ambient-worker) -> server 10.244.2.5:8080 (ambient-worker2)."""

    @pytest.fixture
    def lab(self, client_server_lab):
        return client_server_lab

    def test_pod_ip_through_both_ztunnels(self, lab):
        answer = get(lab, "client", "10.244.2.5", 8080)
        assert answer["pod"] == "ambient/server-f44ffdf6f-dqgm2"
        check_mesh_connection(lab, "client", "ambient-worker", "10.244.1.4", "10.244.2.5:8080", answer)

    def test_service_vip(self, lab):
        answer = get(lab, "client", "10.96.0.105", 9080)
        assert answer["local"] == "10.244.2.5:8080"
        check_mesh_connection(lab, "client", "ambient-worker", "10.244.1.4", "10.96.0.105:9080", answer)
        # the ztunnel saw the VIP itself: kube-proxy's DNAT was bypassed for the captured pod
        wait_for_line(lab, "ambient-worker", lambda t: t[F_DOWN_LOCAL] == "10.96.0.105:9080" and t[F_DOWN_REMOTE].startswith("10.244.1.4:"))

    def test_stage2_logs_service_connections_once_and_pod_connections_never(self, lab):
        """Stage 2 logs at its listener, filtered by chain name (a CEL expression Envoy evaluates):
        a VIP connection writes one `capture outbound (no waypoint proxy)` line naming its service
        cluster, a pod-IP connection none there (stage 3 logs it). Each connection is told apart
        by its own response size (BYTES_SENT)."""
        ns = lab.pod_netns("client")
        hop = "capture outbound (no waypoint proxy)"
        sizes = {"pod": 98_765, "vip": 123_457}
        for what, (host, port) in (("pod", ("10.244.2.5", 8080)), ("vip", ("10.96.0.105", 9080))):
            n, got, announced = download_sha256(ns, host, port, f"/bytes/{sizes[what]}?seed=stage2-log")
            assert n == sizes[what] and got == announced

        def lines(prefix: str, size: int) -> list[list[str]]:
            return [t for t in log_lines(lab, "ambient-worker") if len(t) > F_DOWN_REMOTE and prefix_of(t) == prefix
                    and t[F_BYTES_SENT].isdigit() and size <= int(t[F_BYTES_SENT]) < size + 2_000]

        # both connections are closed and logged by stage 3 / stage 2 (polled), then counted
        poll(lambda: lines("capture outbound pod (no waypoint proxy)", sizes["pod"]) and lines(hop, sizes["vip"]), 10,
             "stage 3 logged the pod-IP connection and stage 2 the VIP one")
        [vip] = lines(hop, sizes["vip"])
        assert vip[F_DOWN_LOCAL] == "10.96.0.105:9080" and vip[F_UPSTREAM_CLUSTER].endswith("_outbound_internal"), vip
        assert lines(hop, sizes["pod"]) == []

    def test_hbone_is_tls13_in_stats(self, lab):
        get(lab, "client", "10.244.2.5", 8080)
        for node, scope in (("ambient-worker", "cluster.outbound_pod_tunnel_clus_"), ("ambient-worker2", "listener.0.0.0.0_15008.")):
            stats = dict(l.rsplit(": ", 1) for l in lab.envoy_admin(node, "/stats?filter=ssl").splitlines() if ": " in l)
            mine = {k: int(v) for k, v in stats.items() if k.startswith(scope) and v.isdigit()}
            tls13 = sum(v for k, v in mine.items() if k.endswith("ssl.versions.TLSv1.3"))
            others = sum(v for k, v in mine.items() if ".ssl.versions." in k and not k.endswith("TLSv1.3"))
            assert tls13 > 0 and others == 0, (node, mine)

    def test_only_the_syn_takes_the_tunnels(self, lab):
        node_ns = lab.topo.node("ambient-worker").netns
        zt_ns = lab.ztunnel_netns("ambient-worker")
        veth = [p for p in lab.topo.pods if p.key == lab.topo.node("ambient-worker").ztunnel][0].veth
        server_node_ns = lab.topo.node("ambient-worker2").netns
        before = (
            counter(lab, zt_ns, "mangle", "PREROUTING", "-i pistioout"),
            counter(lab, node_ns, "mangle", "ztunnel-PREROUTING", "--match-set ztunnel-pods-ips src"),
            counter(lab, node_ns, "mangle", "ztunnel-PREROUTING", f"! -i {veth} -m connmark", want_bytes=True),
            counter(lab, server_node_ns, "mangle", "ztunnel-PREROUTING", "-m connmark --mark 0x210/0x210", want_bytes=True),
        )
        k, size = 4, 300_000
        ns = lab.pod_netns("client")
        for i in range(k):
            n, got, announced = download_sha256(ns, "10.244.2.5", 8080, f"/bytes/{size}?seed=syn{i}")
            assert n == size and got == announced
        after = (
            counter(lab, zt_ns, "mangle", "PREROUTING", "-i pistioout"),
            counter(lab, node_ns, "mangle", "ztunnel-PREROUTING", "--match-set ztunnel-pods-ips src"),
            counter(lab, node_ns, "mangle", "ztunnel-PREROUTING", f"! -i {veth} -m connmark", want_bytes=True),
            counter(lab, server_node_ns, "mangle", "ztunnel-PREROUTING", "-m connmark --mark 0x210/0x210", want_bytes=True),
        )
        d = [a - b for a, b in zip(after, before)]
        assert d[0] == k, f"packets decapsulated on pistioout: {d[0]} for {k} connections (only SYNs may cross)"
        assert d[1] == k, f"0x100 capture marks: {d[1]} for {k} connections"
        # the payload rides the connmark path (0x40 -> table 102 -> ztunnel veth) on both nodes:
        # HBONE bytes arriving at the client node, server answers entering the server node
        assert d[2] >= size * k and d[3] >= size * k, d

    def test_passthrough_to_a_pod_outside_the_mesh(self, lab):
        answer = get(lab, "client", "10.244.2.2", 8080)
        assert answer["pod"] == "default/legacy-server-58d6c7b8f-n2kq7"
        assert peer_ip(answer) == "10.244.1.4"
        ex = explain_for(lab, "ambient-worker", "10.244.1.4", "10.244.2.2:8080")
        assert ex.verdict == "passthrough", ex.text()
        line = wait_for_line(lab, "ambient-worker", lambda t: t[F_UPSTREAM_HOST] == "10.244.2.2:8080")
        assert line[F_UPSTREAM_CLUSTER] == ex.cluster

    def test_non_enrolled_pod_is_not_redirected(self, lab):
        node_ns = lab.topo.node("ambient-worker").netns
        assert "10.244.1.5" not in run(node_ns, ["ipset", "list", "ztunnel-pods-ips"])
        zt_ns = lab.ztunnel_netns("ambient-worker")
        before = counter(lab, zt_ns, "mangle", "PREROUTING", "-i pistioout")
        answer = get(lab, "legacy-5b7f8c9d6", "10.96.0.105", 9080)  # kube-proxy DNAT, then inbound capture
        assert answer["local"] == "10.244.2.5:8080" and peer_ip(answer) == "10.244.1.5"
        assert counter(lab, zt_ns, "mangle", "PREROUTING", "-i pistioout") == before
        assert not [t for t in log_lines(lab, "ambient-worker") if len(t) > F_DOWN_REMOTE and t[F_DOWN_REMOTE].startswith("10.244.1.5:")]
        line = wait_for_line(lab, "ambient-worker2", lambda t: t[F_DOWN_REMOTE].startswith("10.244.1.5:"))
        assert prefix_of(line) == "capture inbound listener plaintext"

    def test_20mb_download_and_8mb_upload_intact(self, lab):
        ns = lab.pod_netns("client")
        n, got, announced = download_sha256(ns, "10.96.0.105", 9080, f"/bytes/{20 * 2**20}?seed=big", timeout=60)
        assert n == 20 * 2**20
        assert got == announced == hashlib.sha256(random.Random("big").randbytes(n)).hexdigest()
        body = random.Random("up").randbytes(8 * 2**20)
        r = request(ns, "10.96.0.105", 9080, "/sha256", method="POST", body=body, timeout=60)
        assert r.json() == {"pod": "ambient/server-f44ffdf6f-dqgm2", "sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}

    def test_50_parallel_connections(self, lab):
        ns = lab.pod_netns("client")

        def one(_: int) -> str:
            r = request(ns, "10.96.0.105", 9080, "/", timeout=20)
            assert r.status == 200
            return r.json()["peer"]

        with ThreadPoolExecutor(max_workers=50) as pool:
            peers = list(pool.map(one, range(50)))
        assert len(peers) == 50 and len(set(peers)) == 50
        assert {p.rsplit(":", 1)[0] for p in peers} == {"10.244.1.4"}


@pytest.fixture(scope="class")
def sleep_httpbin_lab(request, tmp_path_factory):
    return bring_up(request, "sleep-httpbin", tmp_path_factory)


class TestSleepHttpbin:
    """Seed 002: sleep 10.244.2.8 (ambient-worker2) -> httpbin VIP 10.96.0.105:8000 -> 10.244.1.7:80."""

    @pytest.fixture
    def lab(self, sleep_httpbin_lab):
        return sleep_httpbin_lab

    def test_sleep_to_httpbin_service(self, lab):
        answer = get(lab, "sleep", "10.96.0.105", 8000)
        assert answer["pod"] == "default/httpbin-65975d4c6f-9xv7n" and answer["local"] == "10.244.1.7:80"
        check_mesh_connection(lab, "sleep", "ambient-worker2", "10.244.2.8", "10.96.0.105:8000", answer)

    def test_legacy_namespace_pod_same_node_is_captured_inbound_only(self, lab):
        answer = get(lab, "curl", "10.96.0.105", 8000)
        assert answer["local"] == "10.244.1.7:80" and peer_ip(answer) == "10.244.1.2"
        line = wait_for_line(lab, "ambient-worker", lambda t: t[F_DOWN_REMOTE].startswith("10.244.1.2:"))
        assert prefix_of(line) == "capture inbound listener plaintext"


@pytest.fixture(scope="class")
def bookinfo_lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("bookinfo") / "manifests"
    shutil.copytree(ROOT / "golden" / "bookinfo" / "manifests", dst)
    cli = [sys.executable, "-m", "xdsserver", "lab"]

    def down() -> None:
        procs = list(Lab.load(PREFIX).procs.values()) if (Lab(prefix=PREFIX).state_file.exists()) else []
        out = subprocess.run([*cli, "down", "--prefix", PREFIX], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert owned_netns(PREFIX) == [] and not [p for p in procs if p.alive()]

    request.addfinalizer(down)
    out = subprocess.run([*cli, "up", "--prefix", PREFIX, "--manifests", str(dst)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ip netns exec" in out.stdout
    return Lab.load(PREFIX)


class TestBookinfo:
    """Seed 001 via the CLI: productpage 10.244.2.3 -> reviews (one pod remote, two on its own node)."""

    @pytest.fixture
    def lab(self, bookinfo_lab):
        return bookinfo_lab

    def test_readme_example_with_curl_and_lab_exec(self, lab):
        if shutil.which("curl") is None:
            pytest.fail("curl missing: run scripts/setup-lab")
        ns = lab.pod_netns("productpage")
        out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "http://10.96.183.192:9080/"],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and '"pod": "default/reviews-' in out.stdout
        out = subprocess.run([sys.executable, "-m", "xdsserver", "lab", "exec", "--prefix", PREFIX, "productpage", "--",
                              "curl", "-s", "-m", "10", "http://10.244.2.23:9080/"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0 and '"peer": "10.244.2.3:' in out.stdout, out.stderr

    def test_server_closing_first_loses_nothing_on_the_service_path(self, lab):
        """HTTP/1.0: the pod server closes first. Through the internal listener, Envoy 1.40 used to
        abort-reset the client before the buffered answer was flushed (flag UR); the ztunnel
        bootstrap disables that runtime guard. 20 calls and one 2 MB body, all complete."""
        ns = lab.pod_netns("productpage")
        failures = []
        for i in range(20):
            out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-0", "-sf", "-m", "10", "http://10.96.183.192:9080/"],
                                 capture_output=True, text=True, timeout=20)
            if out.returncode != 0 or '"pod": "default/reviews-' not in out.stdout:
                failures.append((i, out.returncode))
        assert not failures, f"HTTP/1.0 calls through the VIP failed: {failures}"
        out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-0", "-sf", "-m", "20", "-o", "/dev/null", "-w", "%{size_download}",
                              "http://10.96.183.192:9080/bytes/2000000"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "2000000", (out.returncode, out.stdout, out.stderr)

    def test_same_node_pod_ip(self, lab):
        answer = get(lab, "productpage", "10.244.2.23", 9080)
        assert answer["pod"] == "default/reviews-v2-c9f46564b-vt78n"
        ex = explain_for(lab, "ambient-worker2", "10.244.2.3", "10.244.2.23:9080")
        assert ex.endpoints[0].tunnel_address == "10.244.2.23:15088"
        check_mesh_connection(lab, "productpage", "ambient-worker2", "10.244.2.3", "10.244.2.23:9080", answer)

    def test_service_reaches_every_endpoint_explain_lists(self, lab):
        ex = explain_for(lab, "ambient-worker2", "10.244.2.3", "10.96.183.192:9080")
        want = {e.destination for e in ex.endpoints}
        assert want == {"10.244.1.23:9080", "10.244.2.22:9080", "10.244.2.23:9080"}
        seen: dict[str, dict] = {}
        for _ in range(60):
            a = get(lab, "productpage", "10.96.183.192", 9080)
            seen.setdefault(a["local"], a)
            if set(seen) == want:
                break
        assert set(seen) == want
        for a in seen.values():
            check_mesh_connection(lab, "productpage", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080", a)

    def test_same_node_service_endpoint_is_looped_by_the_pod_cidr_redirect(self, lab):
        # Stock flavor: a service's CLA is the same on every node, so a same-node endpoint is
        # addressed pod:15008 like any other; the ztunnel pod's nat OUTPUT REDIRECT for its own
        # pod CIDR is what brings it back to its :15008 (without it the SYN reaches the pod itself).
        ex = explain_for(lab, "ambient-worker2", "10.244.2.3", "10.96.183.192:9080")
        local = {e.destination: e.tunnel_address for e in ex.endpoints if e.destination.startswith("10.244.2.")}
        assert local == {"10.244.2.22:9080": "10.244.2.22:15008", "10.244.2.23:9080": "10.244.2.23:15008"}, ex.text()
        seen: dict[str, dict] = {}
        for _ in range(60):
            a = get(lab, "productpage", "10.96.183.192", 9080)
            seen.setdefault(a["local"], a)
            if set(local) <= set(seen):
                break
        assert set(local) <= set(seen)
        for dst in local:
            check_mesh_connection(lab, "productpage", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080", seen[dst])
        zt_ns = lab.ztunnel_netns("ambient-worker2")
        assert counter(lab, zt_ns, "nat", "OUTPUT", "-d 10.244.2.0/24 -p tcp -m tcp --dport 15008") > 0

    def test_pod_added_then_removed_at_run_time(self, lab):
        manifests = lab.manifests / "bookinfo.yaml"
        original = manifests.read_text()
        # Like Kubernetes: the pod starts (wired by the node agent) before it becomes Ready (an endpoint).
        manifests.write_text(original + NEW_POD.replace("status: 'True'", "status: 'False'"))
        assert lab.sync()["added"] == ["default/reviews-v4-5c5d7f8b9-zx4qp"]
        # ... and its node's ztunnel has the pod's inbound chain before readiness makes it an
        # endpoint elsewhere (Kubernetes' order; the endpoint barrier, ordering.py, would also hold it).
        deadline = time.monotonic() + 15
        while "inbound_10.244.1.24" not in lab.envoy_admin("ambient-worker", "/config_dump") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "inbound_10.244.1.24" in lab.envoy_admin("ambient-worker", "/config_dump")
        manifests.write_text(original + NEW_POD)
        assert "10.244.1.24" in run(lab.topo.node("ambient-worker").netns, ["ipset", "list", "ztunnel-pods-ips"])
        hit = None
        deadline = time.monotonic() + 15
        while hit is None and time.monotonic() < deadline:
            a = get(lab, "productpage", "10.96.183.192", 9080)
            if a["local"] == "10.244.1.24:9080":
                hit = a
        assert hit is not None, "the new pod never received a connection through its Service"
        check_mesh_connection(lab, "productpage", "ambient-worker2", "10.244.2.3", "10.96.183.192:9080", hit)

        manifests.write_text(original)

        def reviews_hosts() -> set[str]:  # endpoints of the reviews service cluster (EDS) on the client's ztunnel
            lines = lab.envoy_admin("ambient-worker2", "/clusters").splitlines()
            return {l.split("::")[1] for l in lines if "to_http_reviews.default" in l and "::cx_total::" in l}

        def settled() -> bool:
            h = reviews_hosts()
            return len(h) == 3 and not any("10.244.1.24" in x for x in h)

        deadline = time.monotonic() + 15
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        hosts = reviews_hosts()
        assert len(hosts) == 3 and not any("10.244.1.24" in h for h in hosts), hosts
        served_before = lab.pod_log("default/reviews-v4-5c5d7f8b9-zx4qp").count("request ")
        for _ in range(30):  # the pod still runs, but gets no new connections
            assert get(lab, "productpage", "10.96.183.192", 9080)["local"] != "10.244.1.24:9080"
        assert lab.pod_log("default/reviews-v4-5c5d7f8b9-zx4qp").count("request ") == served_before
        assert lab.sync()["removed"] == ["default/reviews-v4-5c5d7f8b9-zx4qp"]
        assert "10.244.1.24" not in run(lab.topo.node("ambient-worker").netns, ["ipset", "list", "ztunnel-pods-ips"])
        assert not [ns for ns in list_netns() if "reviews-v4" in ns]


NEW_POD = """
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v4-5c5d7f8b9-zx4qp
  namespace: default
  uid: b1000000-0000-4000-8000-0000000000f4
  labels:
    app: reviews
    version: v4
  creationTimestamp: '2022-10-02T00:00:00Z'
spec:
  nodeName: ambient-worker
  serviceAccountName: bookinfo-reviews
  containers:
  - name: reviews
    image: example/app
    ports:
    - containerPort: 9080
      protocol: TCP
status:
  phase: Running
  podIP: 10.244.1.24
  podIPs:
  - ip: 10.244.1.24
  conditions:
  - type: Ready
    status: 'True'
"""
