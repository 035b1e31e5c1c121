"""``xdsserver node-agent-uninstall``: the chart's pre-delete hook, making ``helm uninstall`` leave
every node clean.

It annotates each agent pod with ``xdsserver.io/node-agent-cleanup="true"``; kubelet refreshes the
agent's downward-API annotations file, the agent removes everything it installed and turns
``/ready`` off; this command returns once every agent pod is not ready (or gone), so Helm deletes
the DaemonSet only after the nodes are clean. Exit 1 when the timeout passes first (Helm then
reports the hook failure instead of silently leaving state behind). The API calls live in
:mod:`xdsserver.sources.kube` (the one module that talks to the API server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from .cli import CLEANUP_ANNOTATION


async def annotate_and_wait(namespace: str, selector: str, timeout: float, poll: float, kubeconfig: str | None) -> list[str]:
    """Annotate the agent pods, wait until none is ready. Returns the pods still ready at the deadline."""
    from ..sources import kube

    api = await kube.api_client_from_env(kubeconfig)
    try:
        for name, node in await kube.annotate_pods(api, namespace, selector, {CLEANUP_ANNOTATION: "true"}):
            print(json.dumps({"pod": f"{namespace}/{name}", "node": node, "annotated": CLEANUP_ANNOTATION}), flush=True)
        deadline = time.monotonic() + timeout
        while True:
            waiting = await kube.ready_pods(api, namespace, selector)
            if not waiting or time.monotonic() >= deadline:
                return waiting
            await asyncio.sleep(poll)
    finally:
        await api.close()


def cmd_node_agent_uninstall(args: argparse.Namespace) -> int:
    left = asyncio.run(annotate_and_wait(args.namespace, args.selector, args.timeout, args.poll, args.kubeconfig))
    if left:
        print(json.dumps({"error": f"node agents still ready after {args.timeout} s (state not removed yet): {', '.join(left)}"}), flush=True)
        return 1
    print(json.dumps({"uninstall": "done"}), flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    u = sub.add_parser("node-agent-uninstall", help="chart pre-delete hook: ask every node agent to remove its state, wait")
    u.add_argument("--namespace", required=True)
    u.add_argument("--selector", required=True, help="label selector of the agent pods")
    u.add_argument("--timeout", type=float, default=120.0)
    u.add_argument("--poll", type=float, default=1.0)
    u.add_argument("--kubeconfig")
    u.set_defaults(func=cmd_node_agent_uninstall)
