"""Node redirection plan (istio-cni's role): ipset, iptables, policy routing, tunnel devices.

``build_plan(model, node)`` -> :class:`RedirectPlan` (pure data); ``netns_commands`` /
``render_script`` / ``render_json`` turn it into commands or text.
"""

from .commands import Command, iptables_restore_text, ipset_restore_text, netns_commands, plan_to_dict, render_json, render_script
from .plan import IPSET_NAME, NodeNet, PlanError, RedirectPlan, build_plan, captured_pods, node_net, pod_veth_name, ztunnel_pod

__all__ = [
    "IPSET_NAME",
    "Command",
    "NodeNet",
    "PlanError",
    "RedirectPlan",
    "build_plan",
    "captured_pods",
    "iptables_restore_text",
    "ipset_restore_text",
    "netns_commands",
    "node_net",
    "plan_to_dict",
    "pod_veth_name",
    "render_json",
    "render_script",
    "ztunnel_pod",
]
