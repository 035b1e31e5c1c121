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
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.explain import explain  # noqa: E402
from xdsserver.lab.client import request  # noqa: E402
from xdsserver.lab.lab import Lab, owned_netns  # noqa: E402
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
