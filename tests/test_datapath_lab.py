"""Data path with real packets: pooled HBONE (issue 10) and large transfers.

One lab (seed 003's client-server plus a second mesh identity on the client's node and a short
HBONE idle timeout) shared by every test here. Envoy's own stats and access logs are the evidence:
handshakes and connections per tunnel cluster on the source ztunnel, and on the destination which
HBONE connection (its remote ip:port) carried which client identity.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
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

from xdsserver.lab.lab import Lab, owned_netns  # noqa: E402
from xdsserver.lab.netns import ns_connect  # noqa: E402
from xdsserver.lab.client import request  # noqa: E402
from xdsserver.lab.podserver import pattern  # noqa: E402
from xdsserver.translate.names import pod_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdsdp") + "d"  # never the prefix test_lab.py uses

from labguard import root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)
from labpods import other_pod  # noqa: E402
IDLE_S = int(os.environ.get("XDS_DP_IDLE", "3"))
SRC, DST = "ambient-worker", "ambient-worker2"
CLIENT_IP, OTHER_IP, SERVER = "10.244.1.4", "10.244.1.6", ("10.244.2.5", 8080)
VIP = ("10.96.0.105", 9080)
OTHER_VIP = ("10.96.0.106", 9080)  # a Service whose only backend is on the client's node

EXTRA = other_pod(SRC, OTHER_IP) + f"""---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: ambient}}
spec:
  clusterIP: {OTHER_VIP[0]}
  clusterIPs: [{OTHER_VIP[0]}]
  selector: {{app: other}}
  ports: [{{name: http, port: {OTHER_VIP[1]}, targetPort: 8080}}]
---
apiVersion: xdsserver.io/v1alpha1
kind: MeshConfig
spec:
  hboneIdleTimeout: {IDLE_S}s
"""


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("datapath") / "manifests"
    shutil.copytree(ROOT / "golden" / "client-server" / "manifests", dst)
    (dst / "extra.yaml").write_text(EXTRA.lstrip("\n"))
    lab = Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr))

    def down() -> None:
        procs = list(lab.procs.values())
        lab.down()
        assert owned_netns(PREFIX) == [] and not [p for p in procs if p.alive()]

    request.addfinalizer(down)
    lab.up(timeout=90)
    return lab


def stats(lab: Lab, node: str, needle: str) -> dict[str, int]:
    out = {}
    for line in lab.envoy_admin(node, f"/stats?filter={needle}").splitlines():
        k, _, v = line.rpartition(": ")
        if v.isdigit():
            out[k] = int(v)
    return out


def tunnel_stat(lab: Lab, prefix: str, sa: str, stat: str) -> int:
    key = f"cluster.{prefix}_spiffe_cluster.local/ns/ambient/sa/{sa}.{stat}"
    return stats(lab, SRC, "tunnel_clus").get(key, 0)


def poll(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what}")
        time.sleep(0.1)


def wait_idle_closed(lab: Lab) -> None:
    """Every HBONE connection of the source ztunnel closed by the idle timeout."""
    poll(lambda: sum(v for k, v in stats(lab, SRC, "tunnel_clus").items() if k.endswith(".upstream_cx_active")) == 0,
         IDLE_S * 5 + 10, "idle HBONE connections are closed")


def hbone_conns_by_identity(lab: Lab) -> dict[str, set[str]]:
    """Destination's access log: HBONE connection (remote ip:port) -> client SPIFFE IDs it carried."""
    out: dict[str, set[str]] = {}
    for line in lab.access_log(DST).splitlines():
        try:
            t = shlex.split(line)
        except ValueError:
            continue
        if not line.rstrip().endswith("inbound hcm") or len(t) < 20:
            continue
        peer = next((x.split("=", 1)[1] for x in t if x.startswith("peer=")), "")
        out.setdefault(t[19], set()).add(peer)
    return out


class TestPooledHbone:
    def test_sequential_connections_share_one_hbone_connection(self, lab):
        ns = lab.pod_netns("client-6db7cfc846")
        for prefix, (host, port) in (("outbound_pod_tunnel_clus", SERVER), ("outbound_tunnel_clus", VIP)):
            before = tunnel_stat(lab, prefix, "client", "ssl.handshake")
            cx_before = tunnel_stat(lab, prefix, "client", "upstream_cx_total")
            table = f"cluster.{pod_table(host[: host.rfind('.') + 1])}.upstream_cx_total"
            table_before = stats(lab, SRC, table).get(table, 0)
            rq_before = tunnel_stat(lab, prefix, "client", "upstream_rq_total")
            peers = set()
            for _ in range(50):
                r = request(ns, host, port, "/", timeout=10)
                assert r.status == 200
                peers.add(r.json()["peer"])
            handshakes = tunnel_stat(lab, prefix, "client", "ssl.handshake") - before
            if prefix == "outbound_pod_tunnel_clus":  # a pod IP is looked up in its /24's pod table (EDS), not in LDS
                assert stats(lab, SRC, table).get(table, 0) - table_before >= 50, f"{table}: the pod table served no connection"
            assert handshakes <= 2, f"{prefix}: {handshakes} TLS handshakes for 50 sequential connections"
            assert tunnel_stat(lab, prefix, "client", "upstream_rq_total") >= 50
            # pooled: the CONNECT streams (requests) far outnumber the HBONE connections
            cx = tunnel_stat(lab, prefix, "client", "upstream_cx_total") - cx_before
            rq = tunnel_stat(lab, prefix, "client", "upstream_rq_total") - rq_before
            assert rq >= 50 and cx <= 2, f"{prefix}: {cx} HBONE connections for {rq} CONNECT streams"
            print(f"{prefix}: {cx} HBONE connections, {rq} CONNECT streams, {handshakes} handshakes")
            # the server still sees the client pod (its IP; every connection its own port)
            assert {p.rsplit(":", 1)[0] for p in peers} == {CLIENT_IP} and len(peers) == 50

    def test_identities_never_share_an_hbone_connection(self, lab):
        for pod in ("client-6db7cfc846", "other-7d9f8c6b5"):
            ns = lab.pod_netns(pod)
            with ThreadPoolExecutor(max_workers=4) as pool:  # concurrent: a pool would be tempted to share
                assert all(r.status == 200 for r in pool.map(lambda _: request(ns, *SERVER, "/", timeout=10), range(8)))
        assert tunnel_stat(lab, "outbound_pod_tunnel_clus", "other", "upstream_rq_total") >= 8
        want = {"spiffe://cluster.local/ns/ambient/sa/client", "spiffe://cluster.local/ns/ambient/sa/other"}
        poll(lambda: want <= set().union(*hbone_conns_by_identity(lab).values()), 10, "both identities in the access log")
        conns = hbone_conns_by_identity(lab)
        mixed = {c: ids for c, ids in conns.items() if len(ids) != 1}
        assert not mixed, f"HBONE connections carrying more than one client identity: {mixed}"
        by_ip = {c.rsplit(":", 1)[0] for c in conns}
        assert by_ip >= {CLIENT_IP, OTHER_IP}  # each HBONE connection leaves from its client's pod IP

    def test_idle_hbone_connections_are_closed_after_the_timeout(self, lab):
        ns = lab.pod_netns("client-6db7cfc846")
        assert request(ns, *SERVER, "/", timeout=10).status == 200
        assert tunnel_stat(lab, "outbound_pod_tunnel_clus", "client", "upstream_cx_active") >= 1
        wait_idle_closed(lab)
        poll(lambda: stats(lab, DST, "listener.0.0.0.0_15008.downstream_cx_active").get("listener.0.0.0.0_15008.downstream_cx_active", 0) == 0,
             10, "the destination ztunnel holds no HBONE connection")
        # and a new connection after that opens a fresh one and works
        assert request(ns, *SERVER, "/", timeout=10).status == 200


def download(ns: str, host: str, port: int, n: int, seed: str, read_delay: float = 0.0, *,
             client_closes: bool = False, query: str = "") -> tuple[int, str, str]:
    """GET /bytes/n; returns (body bytes, sha256, how it ended: eof | reset | closed).

    HTTP/1.0 (default): the server closes first, and the body ends at its FIN. ``client_closes``:
    HTTP/1.1 keep-alive, the client reads Content-Length bytes and closes first.
    ``read_delay`` makes a slow reader (a pause per 64 KiB), so the mesh must buffer or push back."""
    s = ns_connect(ns, host, port, 60)
    version = "HTTP/1.1" if client_closes else "HTTP/1.0"
    s.sendall(f"GET /bytes/{n}?seed={seed}{query} {version}\r\nHost: {host}\r\n\r\n".encode())
    head, h, got, end, want = b"", hashlib.sha256(), 0, "eof", None
    try:
        while want is None or got < want:
            c = s.recv(1 << 16)
            if not c:
                break
            if head is not None:
                head += c
                if b"\r\n\r\n" not in head:
                    continue
                hdr, c = head.split(b"\r\n\r\n", 1)
                head = None
                if client_closes:
                    want = next(int(v) for k, _, v in (x.partition(b":") for x in hdr.split(b"\r\n")) if k.lower() == b"content-length")
            h.update(c)
            got += len(c)
            if read_delay:
                time.sleep(read_delay)
        if want is not None and got >= want:
            end = "closed"
    except ConnectionResetError:
        end = "reset"
    finally:
        s.close()
    return got, h.hexdigest(), end


SIZE = 200 * 2**20
SLOW = 0.004  # s per 64 KiB read: ~16 MB/s, far slower than the pod server
PATHS = {"vip": VIP, "pod-ip": SERVER, "same-node-vip": OTHER_VIP, "same-node-pod-ip": (OTHER_IP, 8080)}


@pytest.fixture(scope="module")
def big_digest() -> str:
    return hashlib.sha256(pattern(SIZE, "big")).hexdigest()


class TestLargeTransfers:
    """Every byte arrives, whoever closes first and however fast the reader (issue 10, point 0).

    Before the fix (Envoy's defaults for the tunnel's HTTP/2 windows and RST handling), 8 server-
    closes-first downloads at a time lost the tail of 4 of 8 (fast readers) and 8 of 8 (slow)."""

    @pytest.mark.parametrize("path", list(PATHS))
    def test_one_download(self, lab, path, big_digest):
        got, digest, end = download(lab.pod_netns("client-6db7cfc846"), *PATHS[path], SIZE, "big")
        assert (got, digest, end) == (SIZE, big_digest, "eof")

    @pytest.mark.parametrize("path", list(PATHS))
    def test_eight_at_a_time_fast_and_slow_either_side_closing(self, lab, path, big_digest):
        ns = lab.pod_netns("client-6db7cfc846")
        kinds = [(delay, closes) for delay in (0.0, SLOW) for closes in (False, True) for _ in range(2)]
        with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            results = list(pool.map(lambda k: download(ns, *PATHS[path], SIZE, "big", k[0], client_closes=k[1]), kinds))
        bad = [(k, r[0], r[2]) for k, r in zip(kinds, results) if r[:2] != (SIZE, big_digest)]
        assert not bad, f"{len(bad)} of {len(kinds)} downloads of {SIZE} bytes incomplete ((delay, client_closes), bytes, end): {bad}"


# Open (issue 10, point 0, blocked on stock Envoy 1.40): a server that aborts (RST) mid-answer reaches
# the destination ztunnel as an upstream reset and the client's ztunnel as RST_STREAM(CONNECT_ERROR) on
# the CONNECT stream, but the client sees a clean FIN: Envoy 1.40's tunnelling tcp_proxy treats a
# received ConnectError reset as an ordinary close (envoyproxy/envoy#44150), and no runtime guard or
# listener layout changes that. See README "Known limits".
ABORT_VISIBLE = "RST_STREAM(CONNECT_ERROR) is closed with FIN by Envoy 1.40's tunnelling tcp_proxy (README known limits)"


class TestForcedFailure:
    @pytest.mark.xfail(reason=ABORT_VISIBLE, strict=False)
    @pytest.mark.parametrize("path", ["vip", "pod-ip"])
    def test_server_abort_mid_transfer_reaches_the_client_as_a_reset(self, lab, path):
        got, _, end = download(lab.pod_netns("client-6db7cfc846"), *PATHS[path], 50 * 2**20, "abort", query=f"&abort={20 * 2**20}")
        assert got < 50 * 2**20
        assert end == "reset", f"{got} bytes then a clean end: a cut transfer looked complete"


class TestNodeAgentRestart:
    def test_sigkill_and_restart_of_the_agent_drops_no_byte_and_changes_nothing(self, lab):
        """Issue 11: the agent of the client's node is SIGKILLed and restarted (as kubelet would)
        while a 200 MB download and 20 parallel connections run through that node."""
        import json
        import signal

        ns = lab.pod_netns("client-6db7cfc846")
        big = hashlib.sha256(pattern(SIZE, "agent")).hexdigest()
        small_n = 2 * 2**20
        small = hashlib.sha256(pattern(small_n, "agent")).hexdigest()
        with ThreadPoolExecutor(max_workers=21) as pool:
            futures = [pool.submit(download, ns, *VIP, SIZE, "agent")]
            futures += [pool.submit(download, ns, *(VIP if i % 2 else SERVER), small_n, "agent", 0.002) for i in range(20)]
            time.sleep(0.3)  # not a synchronisation: lets the transfers get going before the kill
            offset = lab.restart_agent(SRC, signal.SIGKILL)
            results = [f.result(timeout=300) for f in futures]
        assert results[0][:2] == (SIZE, big), f"200 MB download: {results[0]}"
        bad = [r for r in results[1:] if r[:2] != (small_n, small)]
        assert not bad, f"{len(bad)} of 20 parallel downloads incomplete: {bad}"
        log = Path(lab.procs[f"agent:{SRC}"].log).read_bytes()[offset:].decode(errors="replace")
        passes = [json.loads(x) for x in log.splitlines() if x.startswith("{") and '"reconcile"' in x]
        assert passes and passes[0]["changes"] == 0 and passes[0]["errors"] == 0, passes[:1]
