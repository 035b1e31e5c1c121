"""``xdsserver redirect`` and ``xdsserver lab up|down|status|sync|exec`` (registered by cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path


def _manifests(args: argparse.Namespace) -> Path:
    if args.manifests:
        return args.manifests
    from ..bundled import bundled_example

    return bundled_example()


def cmd_redirect(args: argparse.Namespace) -> int:
    from ..redirect import PlanError, build_plan, render_json, render_script
    from ..sources.manifests import load_model

    model = load_model(args.manifests)
    try:
        plan = build_plan(model, args.node, tunnel=args.tunnel, ztunnel_veth=args.ztunnel_veth)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_json(plan) if args.format == "json" else render_script(plan))
    return 0


def _root_required() -> int | None:
    if os.geteuid() != 0:
        print("error: the lab needs root (network namespaces, iptables, TPROXY)", file=sys.stderr)
        return 2
    return None


def cmd_lab_up(args: argparse.Namespace) -> int:
    from .lab import Lab
    from .netns import LabError
    from ..redirect import PlanError

    if (rc := _root_required()) is not None:
        return rc
    lab = Lab(_manifests(args), prefix=args.prefix, state_dir=args.state_dir, tunnel=args.tunnel,
              log=lambda m: print(m, file=sys.stderr), concurrency=args.concurrency, supervise=not args.no_supervise,
              xds_relay=args.xds_relay)
    # Ctrl-C / SIGTERM while building: Lab.up tears down before re-raising.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        lab.up(timeout=args.timeout)
    except (LabError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_summary(lab)
    if args.foreground:
        print("running in the foreground; Ctrl-C tears the lab down", file=sys.stderr)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            lab.down()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _print_summary(lab) -> None:
    topo = lab.topo
    print(f"lab {lab.prefix} is up (state: {lab.state_dir})")
    for node in topo.nodes:
        print(f"  node {node.name}: netns {node.netns}, eth0 {node.ip}, pods {node.pod_cidr}, ztunnel {node.ztunnel}")
    for p in topo.pods:
        tag = "ztunnel" if p.ztunnel else ("ambient" if p.enrolled else "not enrolled")
        ports = ",".join(map(str, p.ports)) or "-"
        print(f"  pod {p.key} {p.ip} on {p.node} ({tag}) ports {ports}: netns {p.netns}")
    client = next((p for p in topo.pods if p.enrolled and not p.ports), None) or next((p for p in topo.pods if p.enrolled), None)
    if client is not None:
        print("try:")
        print(f"  xdsserver lab exec {client.name} -- curl -s http://<service VIP>:<port>/")
        print(f"  ip netns exec {client.netns} curl -s http://<service VIP>:<port>/")


def cmd_lab_down(args: argparse.Namespace) -> int:
    from .lab import cleanup

    if (rc := _root_required()) is not None:
        return rc
    removed = cleanup(args.prefix, args.state_dir, log=lambda m: print(m, file=sys.stderr))
    print(f"lab {args.prefix}: {'removed ' + str(len(removed)) + ' namespaces' if removed else 'nothing to remove'}")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from .lab import Lab
    from .netns import LabError

    try:
        lab = Lab.load(args.prefix, args.state_dir)
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(lab.status(), indent=2, sort_keys=True))
    return 0


def cmd_lab_sync(args: argparse.Namespace) -> int:
    from .lab import Lab
    from .netns import LabError

    try:
        lab = Lab.load(args.prefix, args.state_dir)
        print(json.dumps(lab.sync(), sort_keys=True))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_lab_exec(args: argparse.Namespace) -> int:
    from .lab import Lab
    from .netns import LabError

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("error: give a command after --, e.g. lab exec sleep -- curl -s http://10.96.0.105:8000/", file=sys.stderr)
        return 2
    try:
        lab = Lab.load(args.prefix, args.state_dir)
        ns = lab.pod_netns(args.pod) if not args.node else lab.topo.node(args.pod).netns
    except (LabError, KeyError, StopIteration) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    return 127  # not reached


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    r = sub.add_parser("redirect", help="print a node's traffic redirection plan (ipset, iptables, ip rules/routes, tunnels)")
    r.add_argument("--manifests", required=True, type=Path)
    r.add_argument("--node", required=True)
    r.add_argument("--tunnel", choices=["vxlan", "geneve"], default="vxlan", help="istioin/istioout device type (seeds: geneve)")
    r.add_argument("--ztunnel-veth", help="node-side veth of the ztunnel pod (default: the lab's name for it)")
    r.add_argument("--format", choices=["script", "json"], default="script")
    r.set_defaults(func=cmd_redirect)

    lab = sub.add_parser("lab", help="the manifests' topology in network namespaces with real ztunnel Envoys (root)")
    lsub = lab.add_subparsers(dest="lab_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prefix", default="xds", help="namespace name prefix / lab name (default: xds)")
        p.add_argument("--state-dir", type=Path, help="default: /run/xdsserver-lab/<prefix>")

    up = lsub.add_parser("up", help="build the lab (replacing a stale one) and leave it running")
    up.add_argument("--manifests", type=Path, help="default: the bundled bookinfo example")
    up.add_argument("--tunnel", choices=["vxlan", "geneve"], default="vxlan")
    up.add_argument("--timeout", type=float, default=60.0)
    up.add_argument("--concurrency", type=int, default=1, help="ztunnel Envoy worker threads (--concurrency; default 1)")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C tears down")
    up.add_argument("--no-supervise", action="store_true",
                    help="no supervisor: a killed agent, ztunnel or control plane stays dead (default: restarted, as kubelet would)")
    up.add_argument("--xds-relay", action="store_true",
                    help="each ztunnel's ADS through its own relay (xds-<node>.sock) that Lab.cut_xds/delay_xds can break or slow")
    common(up)
    up.set_defaults(func=cmd_lab_up)

    down = lsub.add_parser("down", help="remove every namespace, process and state file of the lab")
    common(down)
    down.set_defaults(func=cmd_lab_down)

    st = lsub.add_parser("status", help="namespaces, processes and ztunnel readiness as JSON")
    common(st)
    st.set_defaults(func=cmd_lab_status)

    sy = lsub.add_parser("sync", help="apply pod additions/removals and replaced ztunnel pods in the manifests (kubelet/CNI role)")
    common(sy)
    sy.set_defaults(func=cmd_lab_sync)

    ex = lsub.add_parser("exec", help="run a command in a pod's network namespace: lab exec POD -- CMD...")
    ex.add_argument("pod", help="pod name, namespace/name, or a unique prefix (a node name with --node)")
    ex.add_argument("--node", action="store_true", help="POD names a node: run in the node's namespace")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    common(ex)
    ex.set_defaults(func=cmd_lab_exec)
