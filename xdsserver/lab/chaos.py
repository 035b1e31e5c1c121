"""Chaos with traffic in the lab (issue 14, point 1): faults while transfers and new connections
run, shared by ``tests/test_lab_chaos.py`` (short) and ``python -m bench chaos`` (the issue's
numbers).

Layout (:func:`write_manifests`): nodes n1..n3, on each a meshed client ``cN`` and server
``sN`` (with a Service VIP). Node n3's ztunnel Envoy is the one killed, so paths are split into
those that never touch n3 (must not lose a byte or a connection) and those through n3 (their
breakage is measured). The fault sequence (:func:`run_faults`): control plane SIGTERM, n1's xDS
stream flapped through the relay, control plane SIGTERM, n2's node agent killed, control plane
SIGKILL, n3's ztunnel Envoy SIGKILLed. Transfers are paced so each spans all of it.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .client import download_close_first, request
from .lab import DEBUG_ADDRESS, Lab
from .netns import LabError
from .podserver import pattern

NODES = ("n1", "n2", "n3")
RESTARTED = "n3"  # its ztunnel Envoy is killed
FLAPPED = "n1"  # its xDS stream is cut
AGENT = "n2"  # its node agent is killed
SEED = "chaos"


@dataclass(frozen=True)
class Path_:
    name: str
    client: str  # pod key
    host: str
    port: int
    pod: str  # the pod expected to answer
    nodes: tuple[str, ...]  # ztunnel nodes on the path

    @property
    def via_restarted(self) -> bool:
        return RESTARTED in self.nodes


def _server(n: int) -> tuple[str, int]:
    return f"10.244.{n}.11", 8080


def _vip(n: int) -> tuple[str, int]:
    return f"10.96.0.{10 + n}", 80


def paths() -> list[Path_]:
    """Cross-node paths on pod IPs and VIPs; the first four never touch the restarted node."""
    out = []
    for c, s, kind in ((1, 2, "pod"), (1, 2, "vip"), (2, 1, "pod"), (2, 1, "vip"), (3, 1, "pod"), (1, 3, "vip"), (2, 3, "pod")):
        host, port = _server(s) if kind == "pod" else _vip(s)
        out.append(Path_(f"c{c}->s{s}:{kind}", f"mesh/c{c}", host, port, f"mesh/s{s}", (f"n{c}", f"n{s}")))
    return out


def _pod(name: str, node: int, ip: str, uid: int, sa: str, ns: str, port: int | None) -> str:
    ports = f"\n    ports: [{{containerPort: {port}, name: http, protocol: TCP}}]" if port else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  uid: c0000000-0000-4000-8000-{uid:012d}
  labels: {{app: {name}}}
  creationTimestamp: '2026-01-01T00:00:00Z'
spec:
  nodeName: n{node}
  serviceAccountName: {sa}
  containers:
  - name: app
    image: example/app{ports}
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: 'True'}}]
"""


def write_manifests(dst: Path) -> Path:
    """The chaos cluster: 3 nodes, enrolled namespace ``mesh``, client + server + VIP per node."""
    docs = ["""apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: ztunnel, namespace: istio-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: mesh}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: mesh}
"""]
    for n in range(1, len(NODES) + 1):
        docs.append(f"""---
apiVersion: v1
kind: Node
metadata: {{name: n{n}}}
spec: {{podCIDR: 10.244.{n}.0/24}}
status:
  addresses: [{{type: InternalIP, address: 172.18.0.{n + 1}}}, {{type: Hostname, address: n{n}}}]
""")
        docs.append(_pod(f"ztunnel-n{n}", n, f"10.244.{n}.2", 10 * n, "ztunnel", "istio-system", None).replace(
            "labels: {app: ztunnel-n%d}" % n, "labels: {app: ztunnel, ambient-type: ztunnel}"))
        docs.append(_pod(f"c{n}", n, f"10.244.{n}.10", 10 * n + 1, "client", "mesh", None))
        docs.append(_pod(f"s{n}", n, _server(n)[0], 10 * n + 2, "server", "mesh", 8080))
        vip = _vip(n)[0]
        docs.append(f"""---
apiVersion: v1
kind: Service
metadata: {{name: s{n}, namespace: mesh, creationTimestamp: '2026-01-01T00:00:00Z'}}
spec:
  type: ClusterIP
  clusterIP: {vip}
  clusterIPs: [{vip}]
  selector: {{app: s{n}}}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
""")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "chaos.yaml").write_text("".join(docs))
    return dst


# -- traffic ---------------------------------------------------------------------------------
@dataclass
class Transfer:
    path: Path_
    size: int
    started: float = 0.0
    ended: float = 0.0
    got: int = 0
    ok: bool = False
    error: str = ""


@dataclass
class Attempt:
    path: Path_
    started: float
    ok: bool
    error: str = ""


class Traffic:
    """Long paced transfers plus a steady rate of new connections, over :func:`paths`."""

    def __init__(self, lab: Lab, *, transfers: int, size: int, rate: float, pace_s: float) -> None:
        self.lab, self.size, self.rate, self.pace_s = lab, size, rate, pace_s
        ps = paths()
        self.transfers = [Transfer(ps[i % len(ps)], size) for i in range(transfers)]
        self.expected = hashlib.sha256(pattern(size, SEED)).hexdigest()
        self.attempts: list[Attempt] = []
        self.release = threading.Event()  # set once the faults are over: readers go full speed
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        for t in self.transfers:
            self._threads.append(threading.Thread(target=self._transfer, args=(t,), daemon=True))
        self._threads.append(threading.Thread(target=self._connections, daemon=True))
        for th in self._threads:
            th.start()
        # bounded: every transfer has its response headers before the first fault
        deadline = time.monotonic() + 60
        while not all(t.got > 0 or t.error for t in self.transfers):
            if time.monotonic() > deadline:
                raise LabError("transfers did not start within 60 s")
            time.sleep(0.05)

    def finish(self, timeout: float, connections_until: float = 0.0) -> None:
        """Release the readers and wait (bounded) for them; new connections go on at least until
        ``connections_until`` (monotonic), so the restarted ztunnel's first seconds are measured."""
        self.release.set()
        deadline = time.monotonic() + timeout
        for th in self._threads[:-1]:
            th.join(max(0.0, deadline - time.monotonic()))
        self.stop.wait(max(0.0, min(connections_until, deadline) - time.monotonic()))
        self.stop.set()
        self._threads[-1].join(10)
        for t in self.transfers:
            if not t.ended:
                t.error = t.error or f"not finished within {timeout}s"

    def _transfer(self, t: Transfer) -> None:
        """HTTP/1.0 GET /bytes/N, read at most size*(elapsed/pace_s) (never the last 10%) until released."""

        def pace(got: int) -> None:
            t.got = max(got, 1)  # the response started
            while not self.release.is_set() and got >= min(t.size * 0.9, t.size * (time.monotonic() - t.started) / self.pace_s):
                self.release.wait(0.05)

        t.started = time.monotonic()
        try:
            body, sha, end = download_close_first(self.lab.pod_netns(t.path.client), t.path.host, t.path.port, t.size, SEED,
                                                  timeout=30, pace=pace)
            t.ok = body == t.size and sha == self.expected and end == "eof"
            t.error = "" if t.ok else f"{end} after {body} of {t.size} bytes" if body != t.size or end != "eof" else "sha256 mismatch"
        except OSError as exc:
            t.error = f"{type(exc).__name__}: {exc}"
        finally:
            t.ended = time.monotonic()

    def _connections(self) -> None:
        """About ``rate`` new connections per second, round-robin over the paths."""
        ps, i = paths(), 0
        workers: list[threading.Thread] = []
        next_at = time.monotonic()
        while not self.stop.is_set():
            p = ps[i % len(ps)]
            i += 1
            th = threading.Thread(target=self._connect, args=(p,), daemon=True)
            th.start()
            workers.append(th)
            workers = [w for w in workers if w.is_alive()]
            next_at += 1.0 / self.rate
            self.stop.wait(max(0.0, next_at - time.monotonic()))
        for w in workers:
            w.join(10)

    def _connect(self, p: Path_) -> None:
        t0 = time.monotonic()
        try:
            r = request(self.lab.pod_netns(p.client), p.host, p.port, "/", timeout=5)
            got = r.json().get("pod") if r.status == 200 else None
            a = Attempt(p, t0, got == p.pod, "" if got == p.pod else f"status {r.status} pod {got}")
        except (OSError, ValueError) as exc:
            a = Attempt(p, t0, False, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.attempts.append(a)


# -- config watch ----------------------------------------------------------------------------
LISTENERS, CLUSTERS = "listener_manager.total_listeners_active", "cluster_manager.active_clusters"


class ConfigWatch:
    """Polls every ztunnel's listener and cluster gauges (admin) in one thread; records the minimum
    seen per node, apart from the window in which the lab restarts that node's Envoy on purpose."""

    def __init__(self, lab: Lab, period: float = 0.1) -> None:
        self.lab, self.period = lab, period
        self.baseline = {n: self._gauges(n) for n in NODES}
        self.minimum = dict(self.baseline)
        self.samples = 0
        self.errors: dict[str, int] = {n: 0 for n in NODES}
        self.paused: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _gauges(self, node: str) -> tuple[int, int]:
        st = self.lab.envoy_stats(node, "active")
        return st.get(LISTENERS, 0), st.get(CLUSTERS, 0)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for n in NODES:
                if n in self.paused:
                    continue
                try:
                    g = self._gauges(n)
                except OSError:
                    self.errors[n] += 1
                    continue
                if n in self.paused:
                    continue
                self.minimum[n] = (min(self.minimum[n][0], g[0]), min(self.minimum[n][1], g[1]))
                self.samples += 1

    def __enter__(self) -> ConfigWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def drops(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        return {n: (self.baseline[n], self.minimum[n]) for n in NODES
                if self.minimum[n][0] < self.baseline[n][0] or self.minimum[n][1] < self.baseline[n][1]}


# -- faults ----------------------------------------------------------------------------------
def _poll(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Bounded poll; returns the monotonic time at which ``pred`` first held."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return time.monotonic()
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout}s: {what}")
        time.sleep(0.05)


def synced(lab: Lab) -> bool:
    """Every node's stream has CDS and LDS, each ACKed at the version sent."""
    rows = json.loads(request(lab.topo.control_netns, *DEBUG_ADDRESS, "/debug/syncz", timeout=2).body)
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["node"], []).append(r)
    return all({r["type"] for r in by.get(n, [])} >= {"CDS", "LDS"}
               and all(r["acked_version"] and r["acked_version"] == r["sent_version"] for r in by[n]) for n in NODES)


def stale_versions(lab: Lab) -> list[str]:
    """Where an Envoy's config_dump (CDS/LDS version and names) differs from what the server holds."""
    rows = json.loads(lab.xds_debug("/debug/syncz"))
    out = []
    for n in NODES:
        dump = json.loads(lab.envoy_admin(n, "/config_dump?resource=dynamic_active_clusters"))
        got_c = sorted(c["cluster"]["name"] for c in dump.get("configs", []))
        dump = json.loads(lab.envoy_admin(n, "/config_dump?resource=dynamic_listeners"))
        got_l = sorted(l["name"] for l in dump.get("configs", []) if "active_state" in l)
        env = json.loads(lab.envoy_admin(n, "/config_dump"))
        versions = {}
        for cfg in env.get("configs", []):
            kind = cfg.get("@type", "").rsplit(".", 1)[-1]
            if kind in ("ClustersConfigDump", "ListenersConfigDump"):
                versions["CDS" if kind.startswith("Clusters") else "LDS"] = cfg.get("version_info", "")
        server = json.loads(lab.xds_debug(f"/debug/config_dump?node={n}"))
        want_c, want_l = _server_names(server)
        if set(versions) != {"CDS", "LDS"} or not want_c or not want_l:  # fail closed: nothing compared is not a pass
            out.append(f"{n}: nothing to compare (Envoy versions {versions}, server {len(want_c)} clusters, {len(want_l)} listeners)")
        for r in rows:
            if r["node"] == n and r["type"] in versions:
                if not (r["sent_version"] == r["acked_version"] == versions[r["type"]]):
                    out.append(f"{n} {r['type']}: server sent {r['sent_version']} acked {r['acked_version']}, Envoy {versions[r['type']]}")
        if want_c and got_c != want_c:
            out.append(f"{n} clusters: Envoy {len(got_c)} vs server {len(want_c)}")
        if want_l and got_l != want_l:
            out.append(f"{n} listeners: Envoy {len(got_l)} vs server {len(want_l)}")
    return out


def _server_names(dump: dict) -> tuple[list[str], list[str]]:
    clusters, listeners = [], []
    for cfg in dump.get("configs", []):
        kind = cfg.get("@type", "").rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            clusters = sorted(c["cluster"]["name"] for c in cfg.get("dynamic_active_clusters", []))
        elif kind == "ListenersConfigDump":
            listeners = sorted(l["name"] for l in cfg.get("dynamic_listeners", []))
    return clusters, listeners


@dataclass
class FaultLog:
    events: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    killed_at: float = 0.0  # the restarted ztunnel's SIGKILL
    ready_at: float = 0.0  # ... and its new Envoy's /ready LIVE
    cuts: int = 0

    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))


def restart_control_plane(lab: Lab, sig: int, log: FaultLog, timeout: float = 60) -> None:
    old = lab.kill("xdsserver", sig)
    lab.wait_restarted("xdsserver", old, timeout)
    _poll(lambda: synced(lab), timeout, "every ztunnel re-synced after the control plane restart")
    log.note(f"control plane {signal.Signals(sig).name}: restarted, all synced")


def flap(lab: Lab, node: str, times: int, log: FaultLog, timeout: float = 30) -> None:
    cx = "cluster.xds-grpc.upstream_cx_total"
    for i in range(times):
        before = lab.envoy_stats(node, cx).get(cx, 0)
        log.cuts += lab.cut_xds(node)
        _poll(lambda: lab.envoy_stats(node, cx).get(cx, 0) > before and synced(lab), timeout,
              f"{node} reconnected and re-synced after cut {i + 1}")
    log.note(f"{node} xDS stream cut {times}x ({log.cuts} connections), reconnected each time")


def run_faults(lab: Lab, watch: ConfigWatch, log: FaultLog, flaps: int = 10) -> None:
    log.started = time.monotonic()
    restart_control_plane(lab, signal.SIGTERM, log)
    flap(lab, FLAPPED, flaps, log)
    restart_control_plane(lab, signal.SIGTERM, log)
    lab.restart_agent(AGENT)
    log.note(f"node agent on {AGENT} SIGKILLed, restarted, /ready")
    restart_control_plane(lab, signal.SIGKILL, log)
    name = f"ztunnel:{RESTARTED}"
    watch.paused.add(RESTARTED)
    log.killed_at = time.monotonic()
    old = lab.kill(name, signal.SIGKILL)
    lab.wait_restarted(name, old, 30)
    log.ready_at = _poll(lambda: lab.envoy_admin(RESTARTED, "/ready", timeout=1).strip() == "LIVE", 30, f"{name} LIVE again")
    watch.paused.discard(RESTARTED)
    log.note(f"ztunnel Envoy on {RESTARTED} SIGKILLed, LIVE again after {log.ready_at - log.killed_at:.2f}s")
    _poll(lambda: synced(lab), 30, "every ztunnel synced at the end")
    log.ended = time.monotonic()


# -- the whole run ---------------------------------------------------------------------------
@dataclass
class Result:
    transfers: int
    size: int
    transfers_failed_safe: list[str]
    transfers_broken_restarted: int
    transfers_via_restarted: int
    transfers_spanning: int
    attempts: int
    attempts_failed_safe: list[str]
    attempts_via_restarted: int
    attempts_failed_restarted_window: int
    attempts_failed_restarted_outside: int
    first_ok_after_ready_s: float | None
    config_drops: dict
    watch_samples: int
    watch_errors: dict
    stale: list[str]
    cuts: int
    restarts: dict
    fault_s: float
    events: list[str]

    def lines(self) -> list[str]:
        return [
            f"transfers: {self.transfers} x {self.size / 2**20:.0f} MiB, {self.transfers_spanning} spanning every fault; "
            f"failed or corrupted on paths not through {RESTARTED}: {len(self.transfers_failed_safe)}; "
            f"broken through {RESTARTED}'s restarted ztunnel: {self.transfers_broken_restarted} of {self.transfers_via_restarted}",
            f"new connections: {self.attempts}; failed on paths not through {RESTARTED}: {len(self.attempts_failed_safe)}; "
            f"through {RESTARTED}: {self.attempts_via_restarted}, failed between its kill and Ready+2s: "
            f"{self.attempts_failed_restarted_window}, failed at other times: {self.attempts_failed_restarted_outside}; "
            f"first success after Ready: {self.first_ok_after_ready_s if self.first_ok_after_ready_s is None else round(self.first_ok_after_ready_s, 2)} s",
            f"listener/cluster count drops: {len(self.config_drops)} {self.config_drops or ''} ({self.watch_samples} admin samples, "
            f"unreachable: {self.watch_errors})",
            f"ztunnels not on the server's versions afterwards: {len(self.stale)} {self.stale or ''}",
            f"faults took {self.fault_s:.1f}s; xDS connections cut: {self.cuts}; supervisor restarts: {self.restarts}",
        ] + [f"  {e}" for e in self.events]


def run(lab: Lab, *, transfers: int, size: int, rate: float = 20.0, pace_s: float = 60.0, flaps: int = 10) -> Result:
    """Start the traffic, run the faults, finish the traffic, and count (nothing asserted here)."""
    traffic = Traffic(lab, transfers=transfers, size=size, rate=rate, pace_s=pace_s)
    log = FaultLog()
    with ConfigWatch(lab) as watch:
        traffic.start()
        try:
            run_faults(lab, watch, log, flaps)
        finally:
            traffic.finish(timeout=max(120.0, size * transfers / 20e6), connections_until=log.ready_at + 4.0)
    t_end = max(log.ended, log.ready_at)
    safe_t = [t for t in traffic.transfers if not t.path.via_restarted]
    via_t = [t for t in traffic.transfers if t.path.via_restarted]
    safe_a = [a for a in traffic.attempts if not a.path.via_restarted]
    via_a = [a for a in traffic.attempts if a.path.via_restarted]
    ok_after = [a.started - log.ready_at for a in via_a if a.ok and a.started >= log.ready_at]
    return Result(
        transfers=len(traffic.transfers), size=size,
        transfers_failed_safe=[f"{t.path.name}: {t.error}" for t in safe_t if not t.ok],
        transfers_broken_restarted=sum(not t.ok for t in via_t), transfers_via_restarted=len(via_t),
        transfers_spanning=sum(t.started < log.started and t.ended > (log.killed_at if t.path.via_restarted else t_end)
                               for t in traffic.transfers),
        attempts=len(traffic.attempts),
        attempts_failed_safe=[f"{a.path.name} at {a.started - log.started:+.2f}s: {a.error}" for a in safe_a if not a.ok],
        attempts_via_restarted=len(via_a),
        attempts_failed_restarted_window=sum(not a.ok and log.killed_at - 5 <= a.started < log.ready_at + 2 for a in via_a),
        attempts_failed_restarted_outside=sum(not a.ok and not log.killed_at - 5 <= a.started < log.ready_at + 2 for a in via_a),
        first_ok_after_ready_s=min(ok_after) if ok_after else None,
        config_drops={n: {"baseline": b, "min": m} for n, (b, m) in watch.drops().items()},
        watch_samples=watch.samples, watch_errors=dict(watch.errors),
        stale=stale_versions(lab), cuts=log.cuts, restarts=dict(lab.refresh() and lab.restarts),
        fault_s=log.ended - log.started, events=[f"{t - log.started:+7.2f}s {w}" for t, w in log.events],
    )
