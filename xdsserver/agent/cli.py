"""``xdsserver node-agent``: keep one node's kernel state equal to its redirection plan.

The loop: whenever the source changed (manifests: stat signature polled every 0.2 s;
Kubernetes: the informer's change callback), every ``--resync`` seconds (drift), and after a
failed step (bounded backoff), run one pass — plan, then reconcile the node namespace and the
ztunnel pod's. Each change is one JSON line on stdout (``{"node", "netns", "object", "op", "cmd",
"drift"}``), each pass ends with ``{"reconcile": "done", "changes": N, "errors": M, ...}``;
errors are JSON lines on stderr naming the object. The agent never exits on bad input.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from .health import AgentMetrics, serve
from .kernel import KernelError, netns_runner, read_sysctl
from .node import NodeAgent
from .sources import open_source

DEFAULT_STATE_DIR = Path("/run/xdsserver-node-agent")
POLL_S = 0.2
CLEANUP_ANNOTATION = "xdsserver.io/node-agent-cleanup"


def cleanup_requested(path: Path | None) -> bool:
    """The pod's annotations (a downward-API file, updated by kubelet) ask for removal:
    the chart's pre-delete hook sets ``xdsserver.io/node-agent-cleanup="true"`` on every agent pod."""
    if path is None:
        return False
    try:
        text = path.read_text()
    except OSError:
        return False
    return f'{CLEANUP_ANNOTATION}="true"' in text.splitlines()


def _out(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def _err(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), file=sys.stderr, flush=True)


class StateFile:
    """What the node looked like before the agent first ran (sysctl values), for ``--cleanup``."""

    def __init__(self, state_dir: Path, node: str) -> None:
        self.path = state_dir / f"{node}.json"

    def record_once(self, run, keys: list[str]) -> None:
        if self.path.exists():
            return
        before = {k: v for k in keys if (v := read_sysctl(run, k)) is not None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sysctls": before}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def sysctls(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text()).get("sysctls", {})
        except (OSError, ValueError):
            return {}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def cmd_node_agent(args: argparse.Namespace) -> int:
    node_run = netns_runner(args.netns, label=args.netns or "node")
    agent = NodeAgent(args.node, node_run, tunnel=args.tunnel, ztunnel_veth=args.ztunnel_veth, ztunnel_netns=args.ztunnel_netns)
    metrics = AgentMetrics()
    state = StateFile(args.state_dir, args.node)
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    srv = None
    if args.health_address:
        host, _, port = args.health_address.rpartition(":")
        srv = serve(metrics, host or "0.0.0.0", int(port), stale_after=max(10.0, 3 * args.resync))
    try:
        source = open_source(args)
    except (OSError, ValueError) as exc:
        _err({"node": args.node, "error": f"source: {exc}"})
        return 2
    try:
        if args.cleanup:
            return _cleanup(args, agent, source, state, node_run)
        rc = _loop(args, agent, source, state, metrics, stop)
        if rc == CLEANUP_RC:  # uninstall: remove everything, then report not-ready (the hook's signal), idle
            rc = _cleanup(args, agent, source, state, node_run)
            while rc != 0 and not stop.wait(1.0):  # a failed removal is retried; not-ready means "clean"
                metrics.beat()
                rc = _cleanup(args, agent, source, state, node_run)
            metrics.is_ready = False
            metrics.ready.set(0)
            _out({"node": args.node, "idle": "cleaned up on request; waiting to be stopped"})
            while not stop.wait(POLL_S):
                metrics.beat()
        return rc
    finally:
        source.close()
        if srv is not None:
            srv.shutdown()


CLEANUP_RC = -1


def _loop(args, agent: NodeAgent, source, state: StateFile, metrics: AgentMetrics, stop: threading.Event) -> int:
    clean_plan = None  # plan of the last pass without kernel errors: a change under the same plan is drift
    last_sig: object = object()
    next_resync = 0.0
    retry_at: float | None = None
    backoff = 0.5
    if args.once and not source.wait_synced(args.sync_timeout):
        _err({"node": args.node, "error": f"source {args.source}: not synced within {args.sync_timeout} s"})
        return 2
    for _turn in range(1 << 62):  # until stopped; each turn is bounded by POLL_S or a pass
        metrics.beat()
        if cleanup_requested(args.cleanup_when_annotated):
            return CLEANUP_RC
        now = time.monotonic()
        sig = source.signature()  # None: the source has not listed everything yet
        if sig is None or not (sig != last_sig or now >= next_resync or (retry_at is not None and now >= retry_at)):
            if stop.wait(POLL_S):
                return 0
            continue
        last_sig, next_resync = sig, now + args.resync
        ok = _one_pass(args, agent, source, state, metrics, clean_plan)
        if ok is not None:
            clean_plan, retry_at, backoff = ok, None, 0.5
        else:
            clean_plan, retry_at = None, time.monotonic() + backoff
            backoff = min(args.resync, backoff * 2)
        if args.once:
            return 0 if ok is not None else 2
        if stop.is_set():
            return 0
    return 0


def _one_pass(args, agent: NodeAgent, source, state: StateFile, metrics: AgentMetrics, clean_plan):
    """Run one pass, log and count it. Returns the plan when the pass had no errors, else None."""
    try:
        objects = source.objects()
    except Exception as exc:  # noqa: BLE001 - unparsable manifests etc.: keep the applied state
        metrics.errors.labels("input").inc()
        _err({"node": args.node, "error": f"source: {exc}"})
        return None
    if agent.last_plan is None:
        try:
            plan, _, _ = agent.plan_for(objects)
            state.record_once(agent.node_run, [k for k, _ in plan.node.sysctls])
        except Exception:  # noqa: BLE001 - reported by run_pass below
            pass
    res = agent.run_pass(objects)
    drift = res.plan is not None and res.plan == clean_plan
    for role, ch in res.changes:
        _out({"node": args.node, "netns": role, **ch.as_log(), "drift": drift})
        metrics.changes.labels(role, ch.op).inc()
        if drift:
            metrics.drift.inc()
    for w in res.warnings:
        metrics.errors.labels("input").inc()
        _err({"node": args.node, "error": w})
    for e in res.errors:
        metrics.errors.labels("kernel" if res.plan is not None else "plan").inc()
        _err({"node": args.node, "error": e})
    metrics.reconciles.inc()
    metrics.reconcile_seconds.observe(res.seconds)
    metrics.last_changes.set(len(res.changes))
    if res.plan is not None:
        metrics.pods_captured.set(len(res.plan.captured))
    _out({"node": args.node, "reconcile": "done", "changes": len(res.changes), "errors": len(res.errors),
          "warnings": len(res.warnings), "seconds": round(res.seconds, 4)})
    if res.plan is None or res.errors:
        return None
    metrics.is_ready = True
    metrics.ready.set(1)
    return res.plan


def _cleanup(args, agent: NodeAgent, source, state: StateFile, node_run) -> int:
    if not source.wait_synced(args.sync_timeout):
        _err({"node": args.node, "error": "source: not synced; nothing removed"})
        return 2
    try:
        done = agent.cleanup(source.objects())
    except Exception as exc:  # noqa: BLE001 - report and fail: nothing half-known is removed
        _err({"node": args.node, "error": f"cleanup: {exc}"})
        return 2
    for ch in done.done:
        _out({"node": args.node, "cleanup": True, **ch.as_log()})
    errors = list(done.errors)
    for key, value in sorted(state.sysctls().items()):
        try:
            if read_sysctl(node_run, key) not in (None, value):
                node_run(("sysctl", "-qw", f"{key}={value}"))
                _out({"node": args.node, "cleanup": True, "object": f"sysctl {key}", "op": "set", "cmd": ["sysctl", "-qw", f"{key}={value}"]})
        except KernelError as exc:
            errors.append(str(exc))
    for e in errors:
        _err({"node": args.node, "error": e})
    if not errors:
        state.remove()
    _out({"node": args.node, "cleanup": "done", "changes": len(done), "errors": len(errors)})
    return 0 if not errors else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("node-agent", help="keep a node's traffic redirection (ipset, iptables, rules, routes, tunnels) equal to the plan")
    a.add_argument("--node", required=True)
    a.add_argument("--source", choices=["manifests", "kubernetes"], default="manifests")
    a.add_argument("--manifests", type=Path, help="with --source manifests: file or directory")
    a.add_argument("--kubeconfig", help="with --source kubernetes: default in-cluster, then $KUBECONFIG")
    a.add_argument("--netns", help="work on this named network namespace (lab/tests); default: the agent's own")
    a.add_argument("--ztunnel-netns", help="name of the ztunnel pod's namespace (default: found from its veth's peer)")
    a.add_argument("--ztunnel-veth", help="node-side veth of the ztunnel pod (default: from the host route to its IP)")
    a.add_argument("--tunnel", choices=["vxlan", "geneve"], default="vxlan")
    a.add_argument("--resync", type=float, default=30.0, help="seconds between full reconciles (drift is restored within this)")
    a.add_argument("--health-address", help="HOST:PORT for /healthz, /ready, /metrics")
    a.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="where the pre-agent sysctl values are kept for --cleanup")
    a.add_argument("--sync-timeout", type=float, default=30.0, help="seconds to wait for the first Kubernetes list (--once, --cleanup)")
    a.add_argument("--cleanup-when-annotated", type=Path, metavar="FILE",
                   help=f"downward-API annotations file: when it shows {CLEANUP_ANNOTATION}=\"true\", remove everything, "
                        "turn /ready off and idle (the chart's uninstall path)")
    a.add_argument("--once", action="store_true", help="reconcile once and exit (2 on any error)")
    a.add_argument("--cleanup", action="store_true", help="remove everything the agent installs on this node, then exit")
    a.set_defaults(func=cmd_node_agent)
