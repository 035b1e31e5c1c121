"""AuthorizationPolicy / PeerAuthentication: validation (errors name file, object, field; the
whole input is rejected) and Istio's verdict semantics (model/policy.py, used by explain)."""

from __future__ import annotations

import copy

import pytest

from xdsserver.model.policy import Action, Connection, applicable, strict_mtls, verdict
from xdsserver.sources import SourceObject
from xdsserver.sources.objects import InputErrors, build_model

ROOT = "istio-system"


def _ap(name: str, spec: dict, ns: str = "default", annotations: dict | None = None, api: str = "security.istio.io/v1") -> dict:
    meta = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def _pa(name: str, mode: str, ns: str = "default", selector: dict | None = None) -> dict:
    spec: dict = {"mtls": {"mode": mode}}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _model(*objs: dict):
    return build_model([SourceObject(f"p.yaml#{i}", o) for i, o in enumerate(objs)])


SERVER = {"app": "server"}


def _verdict(model, conn: Connection, labels=SERVER, ns="default"):
    pols = applicable(model.authorization_policies, ROOT, ns, labels)
    return verdict(pols, conn, strict_mtls=strict_mtls(model.peer_authentications, ROOT, ns, labels))


CLIENT = "cluster.local/ns/default/sa/client"
OTHER = "cluster.local/ns/other/sa/x"


def conn(principal=CLIENT, port=7070, src="10.244.1.5", dst="10.244.2.7") -> Connection:
    return Connection(src, dst, port, principal)


ALLOW_CLIENT = _ap("allow-client", {"selector": {"matchLabels": SERVER}, "action": "ALLOW",
                                    "rules": [{"from": [{"source": {"principals": [CLIENT]}}], "to": [{"operation": {"ports": ["7070"]}}]}]})


def test_allow_by_principal_and_port():
    m = _model(ALLOW_CLIENT)
    assert _verdict(m, conn()).allowed and _verdict(m, conn()).decided_by == "ns[default]-policy[allow-client]-rule[0]"
    assert not _verdict(m, conn(port=9090)).allowed  # port rule is the application port
    assert not _verdict(m, conn(principal=OTHER)).allowed
    assert not _verdict(m, conn(principal="")).allowed  # plaintext: no principal, rule cannot match
    assert _verdict(m, conn(), labels={"app": "unselected"}).allowed  # selects nothing else


def test_deny_namespace_overrides_allow_and_wildcards():
    deny = _ap("deny-other", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["oth*"]}}]}]})
    allow_all = _ap("allow-all", {"rules": [{}]})
    m = _model(deny, allow_all)
    v = _verdict(m, conn(principal=OTHER))
    assert not v.allowed and v.decided_by == "ns[default]-policy[deny-other]-rule[0]"
    assert _verdict(m, conn()).allowed


def test_default_deny_ipblocks_root_namespace_and_suffix():
    m = _model(_ap("deny-all", {}, ns=ROOT))  # ALLOW with no rules, mesh-wide
    assert not _verdict(m, conn()).allowed
    m = _model(_ap("ips", {"rules": [{"from": [{"source": {"ipBlocks": ["10.244.1.0/24"], "notIpBlocks": ["10.244.1.9"]}}]}]}))
    assert _verdict(m, conn()).allowed and not _verdict(m, conn(src="10.244.3.5")).allowed
    assert not _verdict(m, conn(src="10.244.1.9")).allowed
    m = _model(_ap("suffix", {"rules": [{"from": [{"source": {"principals": ["*/sa/client"]}}], "when": [{"key": "destination.port", "notValues": ["9090"]}]}]}))
    assert _verdict(m, conn()).allowed and not _verdict(m, conn(port=9090)).allowed


def test_dry_run_and_audit_change_nothing():
    m = _model(_ap("dry", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}),
               _ap("audit", {"action": "AUDIT", "rules": [{}]}))
    v = _verdict(m, conn())
    assert v.allowed and v.dry_run == ("ns[default]-policy[dry]-rule[0]: would deny",) and v.audited == ("ns[default]-policy[audit]-rule[0]",)


def test_l7_fails_closed_with_warning():
    allow = _ap("l7-allow", {"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["7070"]}}]}]})
    deny = _ap("l7-deny", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"], "ports": ["9090"]}}]}]}, ns="other")
    m = _model(allow, deny)
    assert not _verdict(m, conn()).allowed  # ALLOW rule needing L7 never matches
    assert not _verdict(m, conn(port=9090), ns="other").allowed  # DENY enforced without its L7 part
    assert _verdict(m, conn(port=7070), ns="other").allowed
    assert any("ns[default]-policy[l7-allow]-rule[0]" in w and "methods" in w for w in m.policy_warnings)
    assert any("l7-deny" in w and "denies more" in w for w in m.policy_warnings)


def test_target_ref_not_enforced():
    m = _model(_ap("wp", {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}]}))
    assert _verdict(m, conn()).allowed and any("not enforced by ztunnels" in w for w in m.policy_warnings)


def test_peer_authentication_strict_and_specificity():
    m = _model(_pa("mesh", "STRICT", ns=ROOT), _pa("permissive", "PERMISSIVE", selector={"app": "legacy"}))
    assert not _verdict(m, conn(principal="")).allowed
    assert _verdict(m, conn(principal=""), labels={"app": "legacy"}).allowed
    assert _verdict(m, conn()).allowed
    m = _model(_pa("off", "DISABLE"))
    assert _verdict(m, conn(principal="")).allowed and any("DISABLE ignored" in w for w in m.policy_warnings)


BAD = [
    (lambda o: o["spec"].update(action="MAYBE"), "spec.action", "not one of ALLOW, DENY, AUDIT"),
    (lambda o: o["spec"].update(action="CUSTOM"), "spec.action", "CUSTOM"),
    (lambda o: o["spec"]["rules"][0]["from"][0]["source"].update(ipBlocks=["10.0.0.0/33"]), "spec.rules[0].from[0].source.ipBlocks[0]", "not an IP address or CIDR"),
    (lambda o: o["spec"]["rules"][0]["to"][0]["operation"].update(ports=["70000"]), "spec.rules[0].to[0].operation.ports[0]", "not a port"),
    (lambda o: o["spec"]["rules"][0]["to"][0]["operation"].update(ports=[7070]), "spec.rules[0].to[0].operation.ports", "list of non-empty strings"),
    (lambda o: o["spec"].update(rules={"from": []}), "spec.rules", "must be a list"),
    (lambda o: o["spec"]["rules"][0].update(when=[{"key": "bogus.key", "values": ["x"]}]), "spec.rules[0].when[0].key", "unknown condition key"),
    (lambda o: o.update(apiVersion="security.istio.io/v2"), "apiVersion", "is not one of"),
    (lambda o: o["metadata"].update(annotations={"istio.io/dry-run": "yes"}), "metadata.annotations.istio.io/dry-run", "must be"),
]


@pytest.mark.parametrize("mutate,field,message", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_invalid_policy_rejects_whole_input(mutate, field, message):
    bad = copy.deepcopy(ALLOW_CLIENT)
    mutate(bad)
    with pytest.raises(InputErrors) as ei:
        _model(_pa("strict", "STRICT"), bad)
    (err,) = ei.value.errors
    assert str(err).startswith("p.yaml#1: AuthorizationPolicy default/allow-client: " + field + ": ") and message in str(err)


def test_invalid_peer_authentication_mode():
    with pytest.raises(InputErrors, match=r"p.yaml#0: PeerAuthentication default/x: spec.mtls.mode: 'SOMETIMES'"):
        _model(_pa("x", "SOMETIMES"))


def test_action_enum_roundtrip():
    assert _model(ALLOW_CLIENT).authorization_policies[0].action is Action.ALLOW


# -- incremental: a policy change translates (and pushes) only the nodes whose pods it selects --
def test_policy_change_translates_only_selected_nodes():
    from pathlib import Path

    from xdsserver.incremental import IncrementalTranslator, serialize
    from xdsserver.model import Flavor
    from xdsserver.model.index import MeshIndex
    from xdsserver.pipeline import ephemeral_certs
    from xdsserver.sources.manifests import read_objects
    from xdsserver.translate import translate

    base = list(read_objects(Path(__file__).resolve().parent.parent / "golden" / "client-server" / "manifests"))
    certs = ephemeral_certs()
    from xdsserver.sources.objects import ValidationMemo

    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    memo = ValidationMemo()  # as the server builds: unchanged objects, previous index (pods are the same objects)
    last = [MeshIndex(build_model(base, memo=memo))]
    inc.snapshots(last[0])

    def step(*extra: dict) -> tuple[list[str], list[str]]:
        objs = [*base, *(SourceObject(f"x#{i}", o) for i, o in enumerate(extra))]
        index = last[0] = MeshIndex(build_model(objs, memo=memo), previous=last[0])
        out = inc.snapshots(index)
        fresh = MeshIndex(build_model(objs))  # the reference: nothing carried over
        assert out == {n: serialize(translate(fresh.node_view(n), Flavor.ENVOY, certs)) for n in fresh.node_names}
        return inc.stats.changed_nodes, inc.stats.untouched

    server_only = _ap("s", {"selector": {"matchLabels": {"app": "server"}}, "rules": [{}]}, ns="ambient")
    assert step(server_only) == (["ambient-worker2"], ["ambient-worker"])  # server runs on worker2
    assert step(server_only, _ap("nobody", {"selector": {"matchLabels": {"app": "none"}}}, ns="ambient"))[0] == []
    assert step()[0] == ["ambient-worker2"]  # removed: only that node again
    assert step(_pa("strict", "STRICT", ns="ambient"))[0] == ["ambient-worker", "ambient-worker2"]



def test_policy_change_patches_only_routes_and_plaintext_listener():
    """Stock flavor: the HBONE chain never changes with policy (a replaced chain drains for
    minutes and pooled HBONE connections keep its old policy); a policy change patches the pod's
    RouteConfiguration (RBACPerRoute) and the plaintext listener (network RBAC), nothing else,
    byte-equal to a full translation."""
    from pathlib import Path

    from xdsserver.incremental import LDS, RDS, IncrementalTranslator, serialize
    from xdsserver.model import Flavor
    from xdsserver.model.index import MeshIndex
    from xdsserver.pipeline import ephemeral_certs
    from xdsserver.sources.manifests import read_objects
    from xdsserver.translate import translate

    base = list(read_objects(Path(__file__).resolve().parent.parent / "golden" / "client-server" / "manifests"))
    certs = ephemeral_certs()
    inc = IncrementalTranslator(Flavor.ENVOY, certs)
    before = inc.snapshots(MeshIndex(build_model(base)))["ambient-worker2"]
    deny = _ap("d", {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                     "rules": [{"from": [{"source": {"namespaces": ["elsewhere"]}}]}]}, ns="ambient")
    index = MeshIndex(build_model([*base, SourceObject("x#0", deny)]))
    after = inc.snapshots(index)["ambient-worker2"]
    assert after == serialize(translate(index.node_view("ambient-worker2"), Flavor.ENVOY, certs))
    assert "ambient-worker2" in inc.stats.patched and inc.stats.full == []
    delta = inc.stats.deltas["ambient-worker2"]
    assert set(delta) == {RDS, LDS} and list(delta[LDS]) == ["ztunnel_inbound_plaintext"]
    assert list(delta[RDS]) == ["inbound_10.244.2.5"] and b"ns[ambient]-policy[d]-rule[0]" in delta[RDS]["inbound_10.244.2.5"]
    assert dict(after[LDS])["ztunnel_inbound"] == dict(before[LDS])["ztunnel_inbound"]

BAD_YAML = {
    "unknown-action": "action: MAYBE\n  rules: [{}]",
    "malformed-cidr": "rules: [{from: [{source: {ipBlocks: [10.1.2.300/24]}}]}]",
    "port-out-of-range": "rules: [{to: [{operation: {ports: ['0']}}]}]",
    "custom": "action: CUSTOM\n  provider: {name: ext}",
    "wrong-type": "rules: [{from: [{source: {principals: cluster.local/ns/a/sa/b}}]}]",
}


@pytest.mark.parametrize("body", BAD_YAML.values(), ids=BAD_YAML.keys())
def test_invalid_policy_keeps_the_served_config(tmp_path, body):
    """The control plane itself: a bad policy file is reported and no node's snapshot changes."""
    import shutil
    from pathlib import Path

    from prometheus_client import CollectorRegistry

    from xdsserver.app import ControlPlane, ManifestSource
    from xdsserver.pipeline import ephemeral_certs

    shutil.copytree(Path(__file__).resolve().parent.parent / "golden" / "policy" / "manifests", tmp_path / "m")
    cp = ControlPlane(load_objects=ManifestSource(tmp_path / "m").objects, certs=ephemeral_certs(), registry=CollectorRegistry())
    assert cp.rebuild()
    before = {n: cp.cache.get(n) for n in cp.cache.nodes()}
    (tmp_path / "m" / "zz-bad.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: ambient}\nspec:\n  " + body + "\n")
    assert cp.rebuild() is False
    assert "zz-bad.yaml" in cp.state.last_error and "AuthorizationPolicy ambient/bad: spec." in cp.state.last_error
    assert {n: cp.cache.get(n) for n in cp.cache.nodes()} == before
