"""``xdsserver node-agent-uninstall``: the chart's pre-delete hook, making ``helm uninstall`` leave
every node clean.

It annotates each agent pod with ``xdsserver.io/node-agent-cleanup="true"``; kubelet refreshes the
agent's downward-API annotations file, the agent removes everything it installed and turns
``/ready`` off; this command returns once every agent pod is not ready (or gone), so Helm deletes
the DaemonSet only after the nodes are clean. Exit 1 when the timeout passes first (Helm then
reports the hook failure instead of silently leaving state behind).
"""

from __future__ import annotations

import argparse
import json
import time

from .cli import CLEANUP_ANNOTATION


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or [])) if pod.status else False


def annotate_and_wait(core, namespace: str, selector: str, timeout: float, poll: float = 1.0) -> list[str]:
    """Annotate the agent pods, wait until none is ready. Returns the pods still ready at the deadline."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    for p in pods:
        core.patch_namespaced_pod(p.metadata.name, namespace, {"metadata": {"annotations": {CLEANUP_ANNOTATION: "true"}}},
                                  _content_type="application/merge-patch+json")
        print(json.dumps({"pod": f"{namespace}/{p.metadata.name}", "node": p.spec.node_name, "annotated": CLEANUP_ANNOTATION}), flush=True)
    deadline = time.monotonic() + timeout
    while True:
        waiting = sorted(p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items if _ready(p))
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(poll)


def cmd_node_agent_uninstall(args: argparse.Namespace) -> int:
    from kubernetes import client, config

    if args.kubeconfig:
        config.load_kube_config(config_file=args.kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    with client.ApiClient() as api:
        left = annotate_and_wait(client.CoreV1Api(api), args.namespace, args.selector, args.timeout, args.poll)
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
