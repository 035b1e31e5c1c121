"""The node redirection plan vs the seed 003 rule dumps (client-server on kind, geneve tunnels).

The dumps are copied from seed 003 (appendices 1-9), with the seed's real veth names passed in
as the ztunnel veth; everything else must come out of the golden client-server manifests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from xdsserver.cli import main
from xdsserver.model import ports as P
from xdsserver.redirect import (
    PlanError,
    build_plan,
    iptables_restore_text,
    netns_commands,
    pod_veth_name,
    render_json,
    render_script,
)
from xdsserver.sources.manifests import load_model

ROOT = Path(__file__).resolve().parent.parent
CLIENT_SERVER = ROOT / "golden" / "client-server" / "manifests"
SLEEP_HTTPBIN = ROOT / "golden" / "sleep-httpbin" / "manifests"
BOOKINFO = ROOT / "golden" / "bookinfo" / "manifests"

# Seed 003, appendix 1 (client node ambient-worker): iptables-save lines, as dumped.
SEED_NODE_IPTABLES = """
-A ztunnel-PREROUTING -i istioin -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioin -j RETURN
-A ztunnel-PREROUTING -i istioout -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -i istioout -j RETURN
-A ztunnel-PREROUTING -p udp -m udp --dport 6081 -j RETURN
-A ztunnel-PREROUTING -m connmark --mark 0x220/0x220 -j MARK --set-xmark 0x200/0x200
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING ! -i {veth} -m connmark --mark 0x210/0x210 -j MARK --set-xmark 0x40/0x40
-A ztunnel-PREROUTING -m mark --mark 0x40/0x40 -j RETURN
-A ztunnel-PREROUTING ! -s {zt}/32 -i {veth} -j MARK --set-xmark 0x210/0x210
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -i {veth} -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -p udp -j MARK --set-xmark 0x220/0x220
-A ztunnel-PREROUTING -m mark --mark 0x200/0x200 -j RETURN
-A ztunnel-PREROUTING -p tcp -m set --match-set ztunnel-pods-ips src -j MARK --set-xmark 0x100/0x100
-A PREROUTING -j ztunnel-PREROUTING
-A POSTROUTING -j ztunnel-POSTROUTING
-A ztunnel-OUTPUT -s {gw}/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark 0x220/0xffffffff
-A OUTPUT -j ztunnel-OUTPUT
-A ztunnel-INPUT -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-INPUT -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
-A INPUT -j ztunnel-INPUT
-A ztunnel-FORWARD -m mark --mark 0x220/0x220 -j CONNMARK --save-mark --nfmask 0x220 --ctmask 0x220
-A ztunnel-FORWARD -m mark --mark 0x210/0x210 -j CONNMARK --save-mark --nfmask 0x210 --ctmask 0x210
-A FORWARD -j ztunnel-FORWARD
"""

# Appendix 4/8 (ztunnel pod iptables).
SEED_ZTUNNEL_IPTABLES = """
-A PREROUTING -i pistioin -p tcp -m tcp --dport 15008 -j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i pistioout -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING -i pistioin -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff
-A PREROUTING ! -d {zt}/32 -i eth0 -p tcp -j MARK --set-xmark 0x4d3/0xfff
"""

SEED_NODE_RULES = """
100:    from all fwmark 0x200/0x200 goto 32766
101:    from all fwmark 0x100/0x100 lookup 101
102:    from all fwmark 0x40/0x40 lookup 102
103:    from all lookup 100
"""

SEED_ZTUNNEL_RULES = """
20000:    from all fwmark 0x400/0xfff lookup 100
20003:    from all fwmark 0x4d3/0xfff lookup 100
"""

# Appendices 3 and 7: tables 100/101/102 per node; appendix 2: the client node's ipset.
SEED = {
    "ambient-worker": {
        "veth": "veth08baa690", "zt": "10.244.1.2", "gw": "10.244.1.1", "ipset": ["10.244.1.4"],
        "tables": {
            100: ["10.244.1.2 dev veth08baa690 scope link", "10.244.1.4 via 192.168.126.2 dev istioin src 10.244.1.1"],
            101: ["default via 192.168.127.2 dev istioout", "10.244.1.2 dev veth08baa690 scope link"],
            102: ["default via 10.244.1.2 dev veth08baa690 onlink", "10.244.1.2 dev veth08baa690 scope link"],
        },
    },
    "ambient-worker2": {
        "veth": "veth07706a33", "zt": "10.244.2.3", "gw": "10.244.2.1", "ipset": ["10.244.2.5"],
        "tables": {
            100: ["10.244.2.3 dev veth07706a33 scope link", "10.244.2.5 via 192.168.126.2 dev istioin src 10.244.2.1"],
            101: ["default via 192.168.127.2 dev istioout", "10.244.2.3 dev veth07706a33 scope link"],
            102: ["default via 10.244.2.3 dev veth07706a33 onlink", "10.244.2.3 dev veth07706a33 scope link"],
        },
    },
}


def _per_chain(lines: list[str]) -> dict[str, list[str]]:
    """Rules grouped by chain in order (iptables-save interleaves chains; order within one matters)."""
    out: dict[str, list[str]] = {}
    for line in lines:
        line = line.strip()
        if line.startswith("-A "):
            chain, rest = line[3:].split(" ", 1)
            out.setdefault(chain, []).append(rest)
    return out


def _restore_rules(text: str, table: str) -> list[str]:
    lines, current = [], None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith("-A "):
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def client_server():
    return load_model(CLIENT_SERVER)


@pytest.mark.parametrize("node", sorted(SEED))
def test_node_mangle_rules_match_seed_003(client_server, node):
    s = SEED[node]
    plan = build_plan(client_server, node, tunnel="geneve", ztunnel_veth=s["veth"])
    got = _per_chain(_restore_rules(iptables_restore_text(plan.node.chains), "mangle"))
    want = _per_chain(SEED_NODE_IPTABLES.format(**s).splitlines())
    assert got == want


@pytest.mark.parametrize("node", sorted(SEED))
def test_node_nat_bypass_rules(client_server, node):
    plan = build_plan(client_server, node, tunnel="geneve", ztunnel_veth=SEED[node]["veth"])
    nat = _restore_rules(iptables_restore_text(plan.node.chains), "nat")
    assert nat == [
        "-A PREROUTING -j ztunnel-PREROUTING",
        "-A POSTROUTING -j ztunnel-POSTROUTING",
        "-A ztunnel-PREROUTING -m mark --mark 0x100/0x100 -j ACCEPT",
        "-A ztunnel-POSTROUTING -m mark --mark 0x100/0x100 -j ACCEPT",
    ]


@pytest.mark.parametrize("node", sorted(SEED))
def test_node_rules_routes_and_ipset_match_seed_003(client_server, node):
    s = SEED[node]
    plan = build_plan(client_server, node, tunnel="geneve", ztunnel_veth=s["veth"])
    assert [r.show() for r in plan.node.rules] == [" ".join(l.split()) for l in SEED_NODE_RULES.strip().splitlines()]
    for table, routes in s["tables"].items():
        assert sorted(r.show() for r in plan.node.routes if r.table == table) == sorted(routes), table
    assert list(plan.node.ipset) == s["ipset"]
    assert plan.net.gateway == s["gw"] and plan.net.ztunnel_ip == s["zt"]


@pytest.mark.parametrize("node", sorted(SEED))
def test_ztunnel_pod_rules_match_seed_003(client_server, node):
    s = SEED[node]
    plan = build_plan(client_server, node, tunnel="geneve", ztunnel_veth=s["veth"])
    text = iptables_restore_text(plan.ztunnel.chains)
    assert _per_chain(_restore_rules(text, "mangle")) == _per_chain(SEED_ZTUNNEL_IPTABLES.format(**s).splitlines())
    # The seed's 15088 loop, plus one beyond it: HBONE to a pod of this node's CIDR (pod:15008, as the
    # stock flavor's node-independent CLAs address every endpoint) loops to this ztunnel's own :15008.
    assert _restore_rules(text, "nat") == ["-A OUTPUT -p tcp -m tcp --dport 15088 -j REDIRECT --to-ports 15008",
                                           f"-A OUTPUT -d {plan.net.pod_cidr} -p tcp -m tcp --dport 15008 -j REDIRECT --to-ports 15008"]
    shown = [r.show() for r in plan.ztunnel.rules]
    # The seed's two rules, plus the lab's same-node loopback rule (documented in plan.py).
    assert shown[:2] == [" ".join(l.split()) for l in SEED_ZTUNNEL_RULES.strip().splitlines()]
    assert shown[2:] == ["20004: from 127.0.0.0/8 lookup 100"]
    assert [r.show() for r in plan.ztunnel.routes] == ["local default dev lo scope host"]


def test_tunnel_devices_geneve_and_vxlan(client_server):
    geneve = build_plan(client_server, "ambient-worker", tunnel="geneve")
    devs = {d.name: d for d in geneve.node.devices + geneve.ztunnel.devices}
    assert (devs["istioin"].vni, devs["istioin"].address, devs["istioin"].remote) == (1000, "192.168.126.1/30", "10.244.1.2")
    assert (devs["istioout"].vni, devs["istioout"].address, devs["istioout"].remote) == (1001, "192.168.127.1/30", "10.244.1.2")
    assert (devs["pistioin"].vni, devs["pistioin"].address, devs["pistioin"].remote) == (1000, "192.168.126.2/30", "10.244.1.1")
    assert (devs["pistioout"].vni, devs["pistioout"].address, devs["pistioout"].remote) == (1001, "192.168.127.2/30", "10.244.1.1")
    adds = [c.argv for c in netns_commands(geneve.node) if c.argv[:3] == ("ip", "link", "add")]
    assert adds[0] == ("ip", "link", "add", "istioin", "type", "geneve", "id", "1000", "remote", "10.244.1.2")

    vxlan = build_plan(client_server, "ambient-worker")
    adds = [c.argv for c in netns_commands(vxlan.node) if c.argv[:3] == ("ip", "link", "add")]
    assert adds[1] == ("ip", "link", "add", "istioout", "type", "vxlan", "id", "1001", "remote", "10.244.1.2", "dstport", str(P.VXLAN_PORT))
    # N5 skips the encapsulated packets of whichever tunnel is in use.
    text = iptables_restore_text(vxlan.node.chains)
    assert f"-A ztunnel-PREROUTING -p udp -m udp --dport {P.VXLAN_PORT} -j RETURN" in text
    assert "6081" not in text


def test_ipset_is_the_xds_enrollment_predicate():
    """The ipset holds exactly the node's enrolled pods: not the ztunnel, not non-enrolled namespaces."""
    model = load_model(SLEEP_HTTPBIN)
    from xdsserver.model.index import MeshIndex

    idx = MeshIndex(model)
    for node in idx.node_names:
        plan = build_plan(model, node, index=idx)
        assert set(plan.node.ipset) == {p.ip for p in idx.enrolled_pods_on(node)}
    worker = build_plan(model, "ambient-worker", index=idx)
    assert "10.244.1.2" not in worker.node.ipset  # legacy/curl: namespace not enrolled
    assert "10.244.1.3" not in worker.node.ipset  # the ztunnel itself
    assert list(worker.node.ipset) == ["10.244.1.5", "10.244.1.6", "10.244.1.7"]  # numeric order
    table100 = [r.show() for r in worker.node.routes if r.table == 100]
    assert [r.split()[0] for r in table100] == ["10.244.1.3", "10.244.1.5", "10.244.1.6", "10.244.1.7"]


def test_bookinfo_same_node_pods_are_captured():
    plan = build_plan(load_model(BOOKINFO), "ambient-worker2")
    assert list(plan.node.ipset) == ["10.244.2.2", "10.244.2.3", "10.244.2.22", "10.244.2.23"]
    assert plan.net.ztunnel_ip == "10.244.2.4"


def test_output_rule_uses_gateway_and_marks_use_shared_constants(client_server):
    plan = build_plan(client_server, "ambient-worker2")
    text = iptables_restore_text(plan.node.chains)
    assert f"-s 10.244.2.1/32 -p tcp -m owner --socket-exists -m set --match-set ztunnel-pods-ips dst -j MARK --set-xmark {hex(P.MARK_NEVER_CAPTURE)}/0xffffffff" in text
    assert f"--tproxy-mark {hex(P.MARK_TPROXY)}/{hex(P.MARK_TPROXY_MASK)}" in iptables_restore_text(plan.ztunnel.chains)
    # original_src's mark must not be the Z4 return mark (data-path.md §8.3)
    assert P.ORIGINAL_SRC_MARK != P.MARK_ZTUNNEL_RETURN


def test_default_veth_name_is_stable_and_valid(client_server):
    plan = build_plan(client_server, "ambient-worker")
    assert plan.net.ztunnel_veth == pod_veth_name(plan.net.ztunnel)
    assert re.fullmatch(r"veth[0-9a-f]{8}", plan.net.ztunnel_veth)
    assert render_script(plan) == render_script(build_plan(client_server, "ambient-worker"))


def test_render_json_is_deterministic_and_complete(client_server):
    plan = build_plan(client_server, "ambient-worker", tunnel="geneve", ztunnel_veth="veth08baa690")
    doc = json.loads(render_json(plan))
    assert doc["host"]["ipset"] == {"name": "ztunnel-pods-ips", "members": ["10.244.1.4"]}
    assert doc["host"]["routes"]["100"] == SEED["ambient-worker"]["tables"][100]
    assert doc["ztunnel_pod"]["ipset"] is None
    assert render_json(plan) == render_json(build_plan(client_server, "ambient-worker", tunnel="geneve", ztunnel_veth="veth08baa690"))


def test_bad_input_names_the_culprit(client_server, tmp_path):
    with pytest.raises(PlanError, match="unknown node 'nope'"):
        build_plan(client_server, "nope")
    with pytest.raises(PlanError, match="tunnel 'gre'"):
        build_plan(client_server, "ambient-worker", tunnel="gre")
    # a node without a ztunnel pod
    text = (CLIENT_SERVER / "cluster.yaml").read_text()
    docs = [d for d in text.split("\n---\n") if "name: ztunnel-g7mrp" not in d]
    (tmp_path / "cluster.yaml").write_text("\n---\n".join(docs))
    (tmp_path / "apps.yaml").write_text((CLIENT_SERVER / "apps.yaml").read_text())
    with pytest.raises(PlanError, match="node 'ambient-worker': no ztunnel pod"):
        build_plan(load_model(tmp_path), "ambient-worker")


def test_cli_redirect(capsys):
    rc = main(["redirect", "--manifests", str(CLIENT_SERVER), "--node", "ambient-worker", "--tunnel", "geneve",
               "--ztunnel-veth", "veth08baa690"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ip rule add priority 103 lookup 100" in out
    assert "add ztunnel-pods-ips 10.244.1.4" in out
    assert "ip route add table 100 10.244.1.4 via 192.168.126.2 dev istioin src 10.244.1.1" in out
    assert "### inside the ztunnel pod istio-system/ztunnel-g7mrp" in out
    rc = main(["redirect", "--manifests", str(CLIENT_SERVER), "--node", "ghost"])
    assert rc == 2 and "unknown node 'ghost'" in capsys.readouterr().err
