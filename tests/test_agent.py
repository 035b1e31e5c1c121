"""Node agent core: reconcile computes only the difference, and applies it to a real kernel.

The netns test creates one namespace ``$XDS_AGENT_TEST_PREFIX-node`` (default ``agtt``; never
``xdstest``) with a veth ``istioin`` device, and runs the reconcile there with real ipset and
ip route: first run installs, second run changes nothing, a member and a route deleted by hand
are restored, a pod removed from the plan leaves both; the `node-agent --once` command is
idempotent and changes nothing on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from xdsserver.agent import KernelState, desired_state, diff, reconcile
from xdsserver.agent.reconcile import netns_runner, parse_ipset_members, parse_pod_routes, read_state
from xdsserver.cli import main
from xdsserver.redirect import IPSET_NAME, build_plan
from xdsserver.sources.manifests import load_model

CLIENT_SERVER = Path(__file__).resolve().parent.parent / "golden" / "client-server" / "manifests"
NODE = "ambient-worker"
PREFIX = os.environ.get("XDS_AGENT_TEST_PREFIX", "agtt")


@pytest.fixture(scope="module")
def plan():
    return build_plan(load_model(CLIENT_SERVER), NODE)


def test_diff_of_equal_states_is_empty(plan):
    want = desired_state(plan)
    assert want.members and want.routes
    assert len(diff(want, want)) == 0


def test_diff_adds_missing_and_removes_extra_only(plan):
    want = desired_state(plan)
    ip = sorted(want.members)[0]
    current = KernelState(want.members - {ip} | {"10.244.1.250"},
                          {**{d: s for d, s in want.routes.items() if d != ip},
                           "10.244.1.250": ("10.244.1.250", "via", "192.168.126.2", "dev", "istioin")})
    cmds = diff(current, want).commands
    assert cmds == [
        ("ipset", "add", "-exist", IPSET_NAME, ip),
        ("ip", "route", "replace", "table", "100", *want.routes[ip]),
        ("ip", "route", "del", "table", "100", "10.244.1.250"),
        ("ipset", "del", "-exist", IPSET_NAME, "10.244.1.250"),
    ]


def test_parsers_ignore_what_is_not_ours():
    assert parse_ipset_members("Name: x\nMembers:\n10.0.0.1\n10.0.0.2\n") == {"10.0.0.1", "10.0.0.2"}
    routes = parse_pod_routes("10.244.1.2 dev veth1 scope link\n10.244.1.4 via 192.168.126.2 dev istioin src 10.244.1.1\n")
    assert list(routes) == ["10.244.1.4"]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def node_ns(plan):
    """A namespace with what the rest of the plan provides: istioin (a veth here), the gateway, the ipset."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    ns = f"{PREFIX}-node"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    _sh("ip", "netns", "add", ns)
    try:
        run = netns_runner(ns)
        run(("ip", "link", "add", "istioin", "type", "veth", "peer", "name", "istioin-peer"))
        run(("ip", "link", "set", "istioin-peer", "up"))
        run(("ip", "addr", "add", "192.168.126.1/30", "dev", "istioin"))
        run(("ip", "addr", "add", f"{plan.net.gateway}/32", "dev", "lo"))
        run(("ip", "link", "set", "istioin", "up"))
        run(("ip", "link", "set", "lo", "up"))
        run(("ipset", "create", IPSET_NAME, "hash:ip"))
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.mark.netns
def test_reconcile_on_a_real_kernel(plan, node_ns):
    run = netns_runner(node_ns)
    want = desired_state(plan)
    first = reconcile(plan, run)
    assert len(first) == 2 * len(want.members)
    assert read_state(run) == want
    assert len(reconcile(plan, run)) == 0, "restart on a set-up node must change nothing"
    ip = sorted(want.members)[0]
    run(("ipset", "del", IPSET_NAME, ip))
    run(("ip", "route", "del", "table", "100", ip))
    assert len(reconcile(plan, run)) == 2
    assert read_state(run) == want
    # A pod gone from the plan leaves ipset and table 100; nothing else is touched.
    fewer = dataclasses.replace(plan, node=dataclasses.replace(
        plan.node, ipset=tuple(m for m in plan.node.ipset if m != ip),
        routes=tuple(r for r in plan.node.routes if r.spec[0] != ip)))
    assert len(reconcile(fewer, run)) == 2
    state = read_state(run)
    assert ip not in state.members and ip not in state.routes
    assert state.members == want.members - {ip}


def _agent(node_ns: str, capsys, node: str = NODE) -> tuple[int, list[dict], str]:
    rc = main(["node-agent", "--node", node, "--manifests", str(CLIENT_SERVER), "--netns", node_ns, "--once"])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.netns
def test_node_agent_command_is_idempotent_and_keeps_state_on_bad_input(plan, node_ns, capsys):
    rc, lines, _ = _agent(node_ns, capsys)
    assert rc == 0 and lines[-1]["changes"] == 2 * len(plan.captured)
    assert sum("change" in line for line in lines) == lines[-1]["changes"]  # one log line per change
    rc, lines, _ = _agent(node_ns, capsys)
    assert rc == 0 and lines == [lines[-1]] and lines[-1]["changes"] == 0
    before = read_state(netns_runner(node_ns))
    rc, lines, err = _agent(node_ns, capsys, node="no-such-node")
    assert rc == 2 and "no-such-node" in err and not lines
    assert read_state(netns_runner(node_ns)) == before == desired_state(plan)
