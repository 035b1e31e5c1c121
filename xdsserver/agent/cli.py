"""``xdsserver node-agent``: keep one node's pod redirection (ipset + table 100) equal to the plan.

Subset of issue 11 implemented here: ``--source manifests`` only, reconcile every ``--resync``
seconds (re-reading the manifests), one JSON log line per change, bad input logged and the last
applied state kept (the agent does not exit). ``--once`` runs a single reconcile (exit 2 on bad
input) for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("xdsserver.agent")


def reconcile_once(args: argparse.Namespace) -> int:
    """One pass: plan from the manifests, diff against the kernel, apply. Returns changes made."""
    from ..redirect import build_plan
    from ..sources.manifests import load_model
    from .reconcile import netns_runner, reconcile

    plan = build_plan(load_model(args.manifests), args.node, tunnel=args.tunnel, ztunnel_veth=args.ztunnel_veth)
    changes = reconcile(plan, netns_runner(args.netns))
    for argv in changes.commands:
        print(json.dumps({"node": args.node, "change": list(argv)}), flush=True)
    return len(changes)


def cmd_node_agent(args: argparse.Namespace) -> int:
    from ..redirect import PlanError
    from ..sources.objects import InputErrors

    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while True:
        started = time.monotonic()
        try:
            n = reconcile_once(args)
            print(json.dumps({"node": args.node, "reconcile": "done", "changes": n,
                              "seconds": round(time.monotonic() - started, 4)}), flush=True)
        except (PlanError, InputErrors, RuntimeError, OSError) as exc:
            # Keep what is applied; report and retry at the next resync.
            print(json.dumps({"node": args.node, "error": str(exc)}), file=sys.stderr, flush=True)
            if args.once:
                return 2
        if args.once or stop.wait(args.resync):
            return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = sub.add_parser("node-agent", help="keep a node's pod redirection (ipset, table 100) equal to the plan")
    a.add_argument("--node", required=True)
    a.add_argument("--source", choices=["manifests"], default="manifests")
    a.add_argument("--manifests", required=True, type=Path)
    a.add_argument("--netns", help="apply inside this named network namespace (lab); default: the current one")
    a.add_argument("--tunnel", choices=["vxlan", "geneve"], default="vxlan")
    a.add_argument("--ztunnel-veth", help="node-side veth of the ztunnel pod")
    a.add_argument("--resync", type=float, default=30.0, help="seconds between reconciles (drift is restored within this)")
    a.add_argument("--once", action="store_true", help="reconcile once and exit (2 on bad input)")
    a.set_defaults(func=cmd_node_agent)
