"""L4 policy with real packets (issue 12): the `policy` golden scenario in the namespace lab.

client 10.244.1.4 (ambient-worker, sa client) -> server 10.244.2.5 (ambient-worker2, ports 8080
and 9090, VIP 10.96.0.105:9080 -> 8080); legacy 10.244.1.5 (namespace default, not in the mesh:
plaintext to 15006). Policies: ALLOW client principal on 8080, DENY namespace default, dry-run
DENY on 9090, STRICT PeerAuthentication in ambient. Every outcome is checked on the wire (the
pod's answer and the client IP it saw, or a closed connection and no request in the pod's log),
in the destination ztunnel's stats and access log, and against ``explain``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.explain import explain  # noqa: E402
from xdsserver.lab.client import request  # noqa: E402
from xdsserver.lab.lab import Lab, owned_netns  # noqa: E402
from xdsserver.lab.netns import ns_connect  # noqa: E402
from xdsserver.pipeline import build_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "poltest")
CLIENT, SERVER, LEGACY = "10.244.1.4", "10.244.2.5", "10.244.1.5"
SERVER_POD = "ambient/server-f44ffdf6f-dqgm2"
VIP = "10.96.0.105"

from labguard import root_namespace_untouched  # noqa: E402,F401 (module-scoped autouse guard)


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("policy") / "manifests"
    shutil.copytree(ROOT / "golden" / "policy" / "manifests", dst)
    lab = Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr))
    Lab(prefix=PREFIX).down()

    def down() -> None:
        lab.down()
        assert owned_netns(PREFIX) == []

    request.addfinalizer(down)
    lab.up(timeout=120)
    return lab


def call(lab: Lab, pod: str, host: str, port: int, path: str = "/") -> dict | None:
    """The pod's JSON answer, or None when the connection was closed without one."""
    try:
        r = request(lab.pod_netns(pod), host, port, path, timeout=10)
    except TimeoutError:
        raise
    except (ConnectionError, http.client.HTTPException):  # closed or reset without an answer
        return None
    return r.json() if r.status == 200 else None


def stat(lab: Lab, node: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}: (\d+)$", lab.envoy_admin(node, "/stats"), re.M)
    return int(m.group(1)) if m else 0


def poll(pred, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


def policy_of(lab: Lab, node: str, src: str, dst: str):
    ex = explain(build_cluster(lab.manifests).nodes, node, src, dst)
    (ib,) = ex.inbound
    return ib.policy


ALLOW = "http.inbound_hcm.rbac.inbound_policy_allow_.allowed"
DENIED = "http.inbound_hcm.rbac.inbound_policy_allow_.denied"
SHADOW = "http.inbound_hcm.rbac.istio_dry_run_deny_.policy.ns[ambient]-policy[dry-run-deny-admin]-rule[0].shadow_denied"


SAME_NODE_CLIENT = "10.244.2.6"  # client-same-node, sa client, on the server's node
CLIENTS = {"cross-node": ("client-6db7", CLIENT, "ambient-worker"), "same-node": ("client-same-node", SAME_NODE_CLIENT, "ambient-worker2")}


@pytest.mark.parametrize("host,port", [(SERVER, 8080), (VIP, 9080)], ids=["pod-ip", "vip"])
@pytest.mark.parametrize("who", CLIENTS, ids=CLIENTS)
def test_principal_allowed_on_the_application_port(lab, who, host, port):
    pod, ip, node = CLIENTS[who]
    before = stat(lab, "ambient-worker2", ALLOW)
    answer = call(lab, pod, host, port)
    assert answer is not None and answer["local"] == f"{SERVER}:8080"
    assert answer["peer"].rsplit(":", 1)[0] == ip  # client IP kept
    poll(lambda: stat(lab, "ambient-worker2", ALLOW) == before + 1, 10, "allow counted")
    v = policy_of(lab, node, ip, f"{host}:{port}")
    assert v.allowed and v.decided_by == "ns[ambient]-policy[allow-client]-rule[0]"


@pytest.mark.parametrize("host,port", [(SERVER, 9090), (VIP, 9091)], ids=["pod-ip", "vip"])
@pytest.mark.parametrize("who", CLIENTS, ids=CLIENTS)
def test_port_rule_denies_9090_by_pod_ip_and_vip(lab, who, host, port):
    pod, ip, node = CLIENTS[who]
    before = stat(lab, "ambient-worker2", DENIED)
    assert call(lab, pod, host, port, f"/deny-{who}-{port}") is None
    assert f"/deny-{who}-{port}" not in lab.pod_log(SERVER_POD)
    poll(lambda: stat(lab, "ambient-worker2", DENIED) == before + 1, 10, "denial counted")
    assert not policy_of(lab, node, ip, f"{host}:{port}").allowed


def test_other_port_of_the_same_pod_denied_and_dry_run_counts(lab):
    denied, shadow = stat(lab, "ambient-worker2", DENIED), stat(lab, "ambient-worker2", SHADOW)
    assert call(lab, "client-6db7", SERVER, 9090, "/denied-9090") is None
    assert "/denied-9090" not in lab.pod_log(SERVER_POD)  # the pod saw nothing
    poll(lambda: stat(lab, "ambient-worker2", DENIED) == denied + 1, 10, "denial counted")
    poll(lambda: stat(lab, "ambient-worker2", SHADOW) == shadow + 1, 10, "dry-run DENY counted, not enforced")
    poll(lambda: '"10.244.2.5:9090"' in lab.access_log("ambient-worker2") and "403 - rbac_access_denied_matched_policy[none]" in lab.access_log("ambient-worker2"),
         10, "denied CONNECT in the access log")
    v = policy_of(lab, "ambient-worker", CLIENT, f"{SERVER}:9090")
    assert not v.allowed and v.dry_run == ["ns[ambient]-policy[dry-run-deny-admin]-rule[0]: would deny"]


def test_plaintext_client_refused_by_strict(lab):
    before = stat(lab, "ambient-worker2", "inbound_policy_strict_.rbac.denied")
    assert call(lab, "legacy-5b7f", SERVER, 8080, "/plaintext") is None
    assert "/plaintext" not in lab.pod_log(SERVER_POD)
    poll(lambda: stat(lab, "ambient-worker2", "inbound_policy_strict_.rbac.denied") == before + 1, 10, "STRICT denial counted")
    poll(lambda: "rbac_access_denied_matched_policy[ns[ambient]-peerauthentication-strict]" in lab.access_log("ambient-worker2"),
         10, "STRICT denial in the access log with its policy name")


def test_policy_added_and_removed_while_traffic_flows(lab):
    """A namespace DENY overriding the ALLOW takes effect without restarts; removing it restores access."""
    extra = lab.manifests / "zz-deny-ambient.yaml"
    extra.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-ambient, namespace: ambient}\n"
        "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n"
        "  rules: [{from: [{source: {namespaces: [ambient]}}]}]\n"
    )
    try:
        poll(lambda: call(lab, "client-6db7", SERVER, 8080, "/while-denied") is None, what="namespace DENY applied")
        v = policy_of(lab, "ambient-worker", CLIENT, f"{SERVER}:8080")
        assert not v.allowed and v.decided_by == "ns[ambient]-policy[deny-ambient]-rule[0]"
    finally:
        extra.unlink()
    poll(lambda: call(lab, "client-6db7", SERVER, 8080) is not None, what="DENY removed")


def test_plaintext_against_principal_rule_and_ip_blocks(lab):
    """With STRICT lifted for the server (workload-level PERMISSIVE beats namespace STRICT), a
    plaintext client still fails the principal rule; an ipBlocks rule then admits exactly its IP."""
    extra = lab.manifests / "zz-permissive.yaml"
    extra.write_text(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: server-permissive, namespace: ambient}\n"
        "spec: {selector: {matchLabels: {app: server}}, mtls: {mode: PERMISSIVE}}\n"
    )
    try:
        denied = "inbound_policy_allow_.rbac.denied"
        before = stat(lab, "ambient-worker2", denied)
        poll(lambda: call(lab, "legacy-5b7f", SERVER, 8080, "/no-principal") is None and stat(lab, "ambient-worker2", denied) > before,
             what="the ALLOW stage (not STRICT) refuses plaintext: no principal")
        assert "/no-principal" not in lab.pod_log(SERVER_POD)
        extra.write_text(extra.read_text() + (
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-legacy-ip, namespace: ambient}\n"
            "spec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {ipBlocks: [10.244.1.5/32]}}], to: [{operation: {ports: ['8080']}}]}]\n"))
        answers: list[dict] = []
        poll(lambda: bool(a := call(lab, "legacy-5b7f", SERVER, 8080)) and bool(answers.append(a) or True), what="ipBlocks rule admits the plaintext client")
        assert answers[-1]["peer"].rsplit(":", 1)[0] == LEGACY  # client IP kept
        assert call(lab, "client-6db7", SERVER, 9090, "/not-in-block") is None  # 10.244.1.4 is outside the block
        assert "/not-in-block" not in lab.pod_log(SERVER_POD)
        v = policy_of(lab, "ambient-worker", CLIENT, f"{SERVER}:9090")
        assert not v.allowed
    finally:
        extra.unlink()
    poll(lambda: call(lab, "legacy-5b7f", SERVER, 8080, "/strict-again") is None, what="STRICT back")


# Pooled HBONE: a client ztunnel keeps one HBONE connection per destination and carries new client
# connections on it as new CONNECT streams, all on the inbound filter chain the connection was
# accepted on. Replacing that chain on a policy change left the old chain (and the old policy)
# serving new streams for Envoy's 600 s gradual drain. The policy therefore lives in the pod's
# RouteConfiguration (RDS, RBACPerRoute), which applies to the next stream on existing connections;
# the cases below fail when it is put back into the chain.
SERVER_ROUTE_UPDATES = f"http.inbound_hcm.rds.inbound_{SERVER}.update_success"


def pushes(lab: Lab) -> dict[tuple[str, str], str]:
    """The server's own record of what it sent: (node, type) -> nonce of the last response on
    that stream (/debug/syncz); a push to a node changes its nonce, nothing else does."""
    return {(e["node"], e["type"]): e["sent_nonce"] for e in json.loads(lab.xds_debug("/debug/syncz"))}


def settled_pushes(lab: Lab, timeout: float = 20.0) -> dict[tuple[str, str], str]:
    """:func:`pushes` once earlier tests' edits are served: no zz- policy left in the model, every
    stream ACKed what it was sent, and no new response over two reads 0.5 s apart (bounded)."""
    deadline = time.monotonic() + timeout
    last: dict[tuple[str, str], str] = {}
    while time.monotonic() < deadline:
        reg = lab.xds_debug("/debug/registryz")
        sync = json.loads(lab.xds_debug("/debug/syncz"))
        now = {(e["node"], e["type"]): e["sent_nonce"] for e in sync}
        if "zz-" not in reg and all(e["sent_version"] == e["acked_version"] for e in sync) and now == last:
            return now
        last = now
        time.sleep(0.5)
    raise AssertionError("the server kept pushing: earlier policy edits never settled")


def listener_version(lab: Lab, node: str, name: str) -> str:
    """The version Envoy holds for one dynamic listener (it changes only when that listener does)."""
    dump = json.loads(lab.envoy_admin(node, "/config_dump?resource=dynamic_listeners"))
    for item in dump.get("configs", []):
        if item.get("name") == name:
            return item["active_state"]["version_info"]
    raise AssertionError(f"{node}: no listener {name}")


def _edit_policy(path: Path, name: str, edit) -> str:
    """Rewrite one AuthorizationPolicy of a manifest file in place; returns the original text."""
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    for d in docs:
        if d and d.get("kind") == "AuthorizationPolicy" and d["metadata"]["name"] == name:
            edit(d)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return text


def test_default_deny_on_a_serving_pod(lab):
    """allow-client edited into an ALLOW policy without rules (Istio's allow-nothing): the only
    ALLOW selecting the server now matches nothing, so the formerly allowed 8080 is refused on
    the pod IP and the VIP; restoring the rule restores access. Nothing restarts."""
    policies = lab.manifests / "policies.yaml"
    original = _edit_policy(policies, "allow-client", lambda d: d["spec"].pop("rules"))
    try:
        poll(lambda: call(lab, "client-6db7", SERVER, 8080, "/default-deny-probe") is None, what="default-deny applied")
        before = stat(lab, "ambient-worker2", DENIED)
        for host, port in ((SERVER, 8080), (VIP, 9080)):
            path = f"/default-denied-{port}"
            assert call(lab, "client-6db7", host, port, path) is None
            assert path not in lab.pod_log(SERVER_POD)  # the pod saw nothing
            v = policy_of(lab, "ambient-worker", CLIENT, f"{host}:{port}")
            assert not v.allowed, v
        poll(lambda: stat(lab, "ambient-worker2", DENIED) >= before + 2, 10, "both denials counted")
    finally:
        policies.write_text(original)
    poll(lambda: call(lab, "client-6db7", SERVER, 8080) is not None, what="allow-client restored")


def test_allowed_long_connection_survives_an_unrelated_policy_edit(lab):
    """A keep-alive connection the policy allows stays usable while a policy selecting the same
    pod (for other peers) is added: the destination ztunnel takes the pod's new RouteConfiguration
    while its HBONE listener stays as it was (not drained), and the connection keeps answering on
    the same client port, also past the HCM's 5 s drain timeout."""
    conn = http.client.HTTPConnection(SERVER, 8080, timeout=10)
    conn.sock = ns_connect(lab.pod_netns("client-6db7"), SERVER, 8080, 10)

    def ask(path: str) -> dict:
        conn.request("GET", path, headers={"Host": f"{SERVER}:8080"})
        r = conn.getresponse()
        assert r.status == 200
        return json.loads(r.read())

    first = ask("/long-1")
    extra = lab.manifests / "zz-unrelated.yaml"
    updates = stat(lab, "ambient-worker2", SERVER_ROUTE_UPDATES)
    hbone = listener_version(lab, "ambient-worker2", "ztunnel_inbound")
    extra.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-elsewhere, namespace: ambient}\n"
        "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n"
        "  rules: [{from: [{source: {namespaces: [elsewhere]}}]}]\n"
    )
    try:
        poll(lambda: stat(lab, "ambient-worker2", SERVER_ROUTE_UPDATES) > updates, what="the server's ztunnel took the new route")
        assert listener_version(lab, "ambient-worker2", "ztunnel_inbound") == hbone, "the HBONE chain was replaced"
        assert ask("/long-2")["peer"] == first["peer"]  # same connection, same client ip:port
        held = time.monotonic() + 6  # hold past the HCM drain_timeout (5 s) a replaced chain would have
        while time.monotonic() < held:
            time.sleep(0.5)
        assert ask("/long-3")["peer"] == first["peer"]
        assert "/long-3" in lab.pod_log(SERVER_POD)
    finally:
        conn.close()
        extra.unlink()


def test_policy_change_pushes_only_the_selected_pods_nodes(lab):
    """A policy selecting the server (ambient-worker2) pushes that node and nothing to
    ambient-worker; a policy selecting no pod pushes nothing at all (server counters)."""
    nothing = lab.manifests / "zz-selects-nothing.yaml"
    server_only = lab.manifests / "zz-server-only.yaml"
    try:
        before = settled_pushes(lab)
        nothing.write_text(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: selects-nothing, namespace: ambient}\n"
            "spec:\n  selector: {matchLabels: {app: no-such-app}}\n  action: DENY\n  rules: [{}]\n")
        poll(lambda: "selects-nothing" in lab.xds_debug("/debug/registryz"), what="the model loaded the policy")
        assert pushes(lab) == before, "a policy that selects nothing caused a push"
        server_only.write_text(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: server-only, namespace: ambient}\n"
            "spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [elsewhere]}}]}]\n")
        poll(lambda: pushes(lab)[("ambient-worker2", "RDS")] != before[("ambient-worker2", "RDS")], what="the server's node pushed")
        after = pushes(lab)
        assert {k: v for k, v in after.items() if k[0] == "ambient-worker"} == {k: v for k, v in before.items() if k[0] == "ambient-worker"}
    finally:
        nothing.unlink(missing_ok=True)
        server_only.unlink(missing_ok=True)


def test_audit_policy_logs_and_allows(lab):
    """AUDIT changes nothing on the wire: the client still gets the pod's answer; the audit
    stage counts it as logged, and explain lists the auditing rule."""
    extra = lab.manifests / "zz-audit.yaml"
    extra.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit-8080, namespace: ambient}\n"
        "spec:\n  selector: {matchLabels: {app: server}}\n  action: AUDIT\n  rules: [{to: [{operation: {ports: ['8080']}}]}]\n")
    # Envoy has no "logged" counter: a LOG-action match counts as the stage's per-rule "allowed"
    logged = "http.inbound_hcm.rbac.inbound_policy_audit_.policy.ns[ambient]-policy[audit-8080]-rule[0].allowed"
    try:
        poll(lambda: "audit-8080" in lab.xds_debug(f"/debug/config_dump?node=ambient-worker2"), what="audit policy served")
        before = stat(lab, "ambient-worker2", logged)
        answers: list[dict] = []
        poll(lambda: bool(a := call(lab, "client-6db7", SERVER, 8080, "/audited")) and stat(lab, "ambient-worker2", logged) > before
             and not answers.append(a), what="an allowed connection counted by the audit stage")
        assert answers[-1]["peer"].rsplit(":", 1)[0] == CLIENT
        v = policy_of(lab, "ambient-worker", CLIENT, f"{SERVER}:8080")
        assert v.allowed and v.audited == ["ns[ambient]-policy[audit-8080]-rule[0]"], v
    finally:
        extra.unlink()
