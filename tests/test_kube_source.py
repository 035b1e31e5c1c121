"""KubeSource against a STAND-IN API server (tests/kubeapi.py).

No real Kubernetes API server can be run here, so every test below talks to the stand-in
API server: an aiohttp app on 127.0.0.1 that serves the real list/watch HTTP protocol. The
source uses the real ``kubernetes`` asyncio client, configured from a kubeconfig, to drive it.
Waiting is by polling with a bounded timeout, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.aio import client as kclient

try:  # tests/ may or may not be a package, depending on what else lives there
    from tests.kubeapi import KubeAPIStandIn
except ImportError:
    from kubeapi import KubeAPIStandIn  # type: ignore[no-redef]
from xdsserver.sources import SourceObject
from xdsserver.sources.kube import DEFAULT_KINDS, NODE, POD, KubeSource, api_client_from_env
from xdsserver.sources.objects import build_model

LOGGER = "xdsserver.sources.kube"


# ---- a stub for sources.objects.validate_object ------------------------------------------


@dataclass(frozen=True)
class StubError:
    origin: str
    ref: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.ref}: {self.field}: {self.message}"


def stub_validate(so: SourceObject) -> list[StubError]:
    """Stand-in for the real validator: a Pod's status.podIP must be an IP address."""
    errors = []
    if so.kind == "Pod":
        ip = (so.obj.get("status") or {}).get("podIP")
        if ip is not None:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                errors.append(StubError(so.origin, so.ref, "status.podIP", f"{ip!r} is not an IP address"))
    return errors


# ---- realistic objects --------------------------------------------------------------------


def namespace(name: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def node(name: str, ip: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}


def service_account(name: str, ns: str = "default") -> dict[str, Any]:
    return {"kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}


def pod(name: str, ip: str, ns: str = "default", node_name: str = "node-1", sa: str = "sleep") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name.split("-")[0]}},
        "spec": {"nodeName": node_name, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "busybox", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "hostIP": "172.18.0.2", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def service(name: str, cluster_ip: str, ns: str = "default") -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]},
    }


def endpoint_slice(svc: str, pod_name: str, ip: str, ns: str = "default") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": f"{svc}-abcde", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-1",
                       "targetRef": {"kind": "Pod", "name": pod_name, "namespace": ns}}],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }


def populate(server: KubeAPIStandIn) -> None:
    server.create(namespace("default"))
    server.create(node("node-1", "172.18.0.2"))
    server.create(node("node-2", "172.18.0.3"))
    server.create(service_account("sleep"))
    server.create(service_account("httpbin"))
    server.create(service("httpbin", "10.96.0.10"))
    server.create(endpoint_slice("httpbin", "httpbin-0", "10.244.0.7"))
    for i, name in enumerate(("sleep-0", "httpbin-0", "sleep-1", "sleep-2", "sleep-3")):
        server.create(pod(name, f"10.244.0.{5 + i}"))


# ---- fixtures and helpers -----------------------------------------------------------------


async def eventually(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``pred`` until true; fail after ``timeout`` seconds (bounded in time and count)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    for _ in range(int(timeout / 0.005) + 1):
        if pred():
            return
        if loop.time() > end:
            break
        await asyncio.sleep(0.005)
    assert pred(), f"timed out after {timeout}s waiting for: {what}"


@pytest.fixture
async def server() -> AsyncIterator[KubeAPIStandIn]:
    async with KubeAPIStandIn() as s:  # the stand-in API server
        yield s


@pytest.fixture
async def api(server: KubeAPIStandIn, tmp_path: Path) -> AsyncIterator[kclient.ApiClient]:
    client = await api_client_from_env(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    yield client
    await client.close()


@pytest.fixture
async def start(api: kclient.ApiClient) -> AsyncIterator[Callable[..., Any]]:
    tasks: list[asyncio.Task[None]] = []

    async def _start(client: kclient.ApiClient | None = None, *, wait_synced: bool = True, **kw: Any) -> KubeSource:
        kw.setdefault("validate", stub_validate)
        kw.setdefault("on_change", lambda: None)
        kw.setdefault("backoff", (0.01, 0.1))
        kw.setdefault("watch_timeout_s", 30)
        src = KubeSource(client or api, **kw)
        tasks.append(asyncio.create_task(src.run()))
        if wait_synced:
            await asyncio.wait_for(src.synced.wait(), 5)
        return src

    yield _start
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


def cached(src: KubeSource, kind: str) -> dict[str, dict[str, Any]]:
    return {so.obj["metadata"]["name"]: so.obj for so in src.objects() if so.kind == kind}


# ---- tests --------------------------------------------------------------------------------


async def test_initial_sync_through_real_client(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server: the initial list of every kind fills the cache, then synced is set."""
    populate(server)
    calls: list[int] = []
    box: list[KubeSource] = []  # on_change may run before start() returns
    src = await start(on_change=lambda: calls.append(len(box[0].objects()) if box else -1), page_size=2)
    box.append(src)

    assert src.synced.is_set()
    expected = server.all()  # stored objects, with kind/apiVersion as a watch would send them
    got = src.objects()
    by_key = sorted(expected, key=lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]))
    assert [so.obj for so in got] == by_key  # exact API JSON, deterministic order
    assert len(got) == 12
    origins = [so.origin for so in got]
    assert "kubernetes:Pod/default/sleep-0" in origins
    assert "kubernetes:Node/node-1" in origins
    assert "kubernetes:EndpointSlice/default/httpbin-abcde" in origins
    assert all(so.obj["apiVersion"] == "discovery.k8s.io/v1" for so in got if so.kind == "EndpointSlice")
    await eventually(lambda: len(calls) == 1, "one on_change call after sync")
    assert calls in ([12], [-1])

    # Paging was used (5 pods, 2 per page), and each watch starts at its list's resourceVersion
    # with bookmarks and a server-side timeout.
    pod_lists = server.list_requests("Pod")
    assert [r.query.get("limit") for r in pod_lists] == ["2", "2", "2"]
    assert sum("continue" in r.query for r in pod_lists) == 2
    await eventually(lambda: len(server.watch_requests("Pod")) == 1, "pod watch opened")
    w = server.watch_requests("Pod")[0].query
    assert w["resourceVersion"] == src.stats["resource_versions"]["Pod"]
    assert (w["allowWatchBookmarks"], w["timeoutSeconds"]) == ("true", "30")
    assert src.stats["lists"] == len(DEFAULT_KINDS) and src.stats["relists"] == 0


async def test_events_update_cache_and_coalesce_on_change(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server: ADDED/MODIFIED/DELETED are reflected; on_change calls are coalesced."""
    populate(server)
    gate = asyncio.Event()
    calls: list[int] = []
    box: list[KubeSource] = []  # on_change may run before start() returns

    async def on_change() -> None:
        await eventually(lambda: bool(box), "start() returned")
        calls.append(len(cached(box[0], "Pod")))
        await gate.wait()

    src = await start(on_change=on_change)
    box.append(src)
    await eventually(lambda: calls == [5], "the sync call, now blocked in on_change")

    for i in range(5):  # five changes while on_change is busy -> exactly one more call
        server.create(pod(f"new-{i}", f"10.244.1.{i}"))
    await eventually(lambda: len(cached(src, "Pod")) == 10, "five new pods cached")
    gate.set()
    await eventually(lambda: len(calls) == 2, "one coalesced call")

    changed = pod("new-0", "10.244.1.100")
    server.update(changed)
    await eventually(lambda: cached(src, "Pod")["new-0"]["status"]["podIP"] == "10.244.1.100", "update seen")
    server.delete("Pod", "sleep-0", "default")
    await eventually(lambda: "sleep-0" not in cached(src, "Pod"), "delete seen")
    await eventually(lambda: calls[-1] == 9, "on_change after the delete")

    assert calls[:2] == [5, 10]
    assert cached(src, "Pod")["new-0"] == server.get("Pod", "new-0", "default")
    ev = src.stats["events"]
    assert (ev["ADDED"], ev["MODIFIED"], ev["DELETED"]) == (5, 1, 1)


@pytest.mark.parametrize("mode", ["abort", "end"])
async def test_dropped_watch_resumes_from_last_rv(server: KubeAPIStandIn, start: Any, mode: str) -> None:
    """Stand-in API server: a watch dropped mid-stream is re-opened from the last resourceVersion;
    changes made while it was down arrive once, and nothing is relisted."""
    populate(server)
    src = await start()
    server.create(pod("before", "10.244.2.1"))
    await eventually(lambda: "before" in cached(src, "Pod"), "pod created before the drop")
    await eventually(lambda: server.open_watches() == len(DEFAULT_KINDS), "all watches open")
    rv_before = src.stats["resource_versions"]["Pod"]
    assert rv_before == server.get("Pod", "before", "default")["metadata"]["resourceVersion"]
    n_watches = len(server.watch_requests("Pod"))
    events_before = dict(src.stats["events"])

    # Drop, then change things before the client can reconnect (no await in between).
    assert server.drop_watches(mode) == len(DEFAULT_KINDS)
    server.create(pod("gap-a", "10.244.2.2"))
    server.create(pod("gap-b", "10.244.2.3"))
    server.update(pod("sleep-1", "10.244.2.4"))
    server.delete("Pod", "sleep-2", "default")

    def settled() -> bool:
        pods = cached(src, "Pod")
        return ("gap-a" in pods and "gap-b" in pods and "sleep-2" not in pods
                and pods["sleep-1"]["status"]["podIP"] == "10.244.2.4")

    await eventually(settled, "changes from the gap")
    rewatch = server.watch_requests("Pod")[n_watches]
    assert rewatch.query["resourceVersion"] == rv_before
    assert src.stats["relists"] == 0 and server.gone_sent == 0
    assert len(server.list_requests("Pod")) == 1  # only the initial list
    ev = src.stats["events"]
    assert ev["ADDED"] - events_before["ADDED"] == 2
    assert ev["MODIFIED"] - events_before["MODIFIED"] == 1
    assert ev["DELETED"] - events_before["DELETED"] == 1
    await eventually(lambda: server.open_watches() == len(DEFAULT_KINDS), "every kind watching again")
    assert src.stats["watch_restarts"] == len(DEFAULT_KINDS)
    assert [so.obj for so in src.objects() if so.kind == "Pod"] == server.all("Pod")


@pytest.mark.parametrize("gone_as", ["event", "http"])
async def test_gone_relists_and_drops_objects_deleted_in_gap(
    server: KubeAPIStandIn, start: Any, gone_as: str
) -> None:
    """Stand-in API server: a watch from a compacted resourceVersion gets 410 Gone (``event``: the
    real server's ERROR event in a 200 stream; ``http``: an HTTP 410); the source relists and the
    object deleted during the gap disappears although no DELETED event was ever sent for it."""
    server.gone_as = gone_as
    populate(server)
    src = await start(kinds=(POD,))
    await eventually(lambda: server.open_watches("Pod") == 1, "pod watch open")

    server.drop_watches("abort")
    server.delete("Pod", "sleep-3", "default")
    server.create(pod("gap", "10.244.3.1"))
    server.update(pod("sleep-1", "10.244.3.2"))
    server.compact()

    await eventually(lambda: src.stats["relists"] == 1, "relist after 410")
    await eventually(lambda: server.open_watches("Pod") == 1, "watch re-opened after relist")
    pods = cached(src, "Pod")
    assert "sleep-3" not in pods
    assert pods["gap"] == server.get("Pod", "gap", "default")
    assert pods["sleep-1"]["status"]["podIP"] == "10.244.3.2"
    assert [so.obj for so in src.objects()] == server.all("Pod")
    assert server.gone_sent == 1
    assert src.stats["events"]["DELETED"] == 0
    assert src.stats["events"]["ERROR"] == (1 if gone_as == "event" else 0)
    assert src.stats["relist_deletes"] == 1
    assert src.stats["resource_versions"]["Pod"] == str(server.rv)
    assert server.watch_requests("Pod")[-1].query["resourceVersion"] == str(server.rv)


async def test_bookmark_advances_resource_version(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server: a BOOKMARK moves the remembered resourceVersion forward, so a re-watch
    after compaction needs no relist; without the bookmark the same situation forces one."""
    populate(server)
    src = await start(kinds=(POD, NODE))
    await eventually(lambda: server.open_watches() == 2, "watches open")
    list_rv = src.stats["resource_versions"]["Pod"]
    for i in range(3):  # advance the global resourceVersion with events the pod watch never sees
        server.create(node(f"extra-{i}", f"172.18.1.{i}"))
    await eventually(lambda: src.stats["resource_versions"]["Node"] == str(server.rv), "node events")
    assert src.stats["resource_versions"]["Pod"] == list_rv != str(server.rv)

    assert server.send_bookmark() == 2
    await eventually(lambda: src.stats["resource_versions"]["Pod"] == str(server.rv), "bookmark applied")
    assert src.stats["events"]["BOOKMARK"] == 2

    n = len(server.watch_requests("Pod"))
    server.compact()
    server.drop_watches("abort")
    await eventually(lambda: len(server.watch_requests("Pod")) == n + 1 and server.open_watches() == 2,
                     "watches re-opened")
    assert server.watch_requests("Pod")[n].query["resourceVersion"] == str(server.rv)
    assert src.stats["relists"] == 0 and server.gone_sent == 0

    # Control: the same thing without a bookmark makes the pod watch relist.
    server.create(node("one-more", "172.18.2.1"))
    await eventually(lambda: src.stats["resource_versions"]["Node"] == str(server.rv), "node event")
    server.compact()
    server.drop_watches("abort")
    await eventually(lambda: src.stats["relists"] == 1, "pod relist without bookmark")
    assert server.gone_sent == 1


async def test_malformed_object_is_skipped_and_logged(
    server: KubeAPIStandIn, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Stand-in API server: malformed objects are logged (kind/ns/name and field) and skipped; a
    previously good version is kept; later objects keep flowing."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    populate(server)
    server.inject_malformed("Pod", pod("listed-bad", "not-an-ip"))  # malformed in the initial list
    src = await start()
    assert "listed-bad" not in cached(src, "Pod")
    assert src.stats["skipped_malformed"] == 1
    assert "Pod default/listed-bad: field status.podIP" in caplog.text

    good = cached(src, "Pod")["sleep-1"]
    bad = pod("sleep-1", "999.1.1.1")
    bad.update(kind="Pod", apiVersion="v1")
    server.inject_malformed("Pod", bad)  # a bad new version of a good object
    server.inject_malformed("Pod", {"kind": "Pod", "apiVersion": "v1", "metadata": "not-a-mapping"})
    server.inject_malformed("Pod", {"kind": "Pod", "apiVersion": "v1", "metadata": {"namespace": "default"}})
    server.create(pod("after", "10.244.4.1"))
    await eventually(lambda: "after" in cached(src, "Pod"), "a good pod after the bad ones")

    assert cached(src, "Pod")["sleep-1"] == good  # the last good version is kept
    assert src.stats["skipped_malformed"] == 4
    assert "Pod default/sleep-1: field status.podIP: '999.1.1.1' is not an IP address; keeping the previous" \
        in caplog.text
    assert "field metadata.name" in caplog.text

    server.update(pod("sleep-1", "10.244.4.2"))  # a good version replaces it again
    await eventually(lambda: cached(src, "Pod")["sleep-1"]["status"]["podIP"] == "10.244.4.2", "fixed pod")


async def test_silent_watch_is_recycled(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server: a watch that never ends (the server ignores timeoutSeconds) is given up
    shortly after timeoutSeconds and re-opened from the last resourceVersion."""
    server.hang_watches = True
    src = await start(kinds=(POD,), watch_timeout_s=1)
    await eventually(lambda: len(server.watch_requests("Pod")) >= 2, "watch recycled", timeout=8)
    assert src.stats["watch_errors"] >= 1
    second = server.watch_requests("Pod")[1]
    assert second.query["resourceVersion"] == src.stats["resource_versions"]["Pod"]
    server.create(pod("late", "10.244.5.1"))
    await eventually(lambda: "late" in cached(src, "Pod"), "events still flow")


async def test_unauthorized_client_keeps_retrying_and_never_syncs(
    server: KubeAPIStandIn, start: Any, tmp_path: Path
) -> None:
    """Stand-in API server: with a wrong token every list is a 401; the source retries with backoff
    and does not report synced."""
    bad = await api_client_from_env(str(server.write_kubeconfig(tmp_path / "bad", token="wrong")))
    try:
        src = await start(bad, wait_synced=False, kinds=(POD,))
        await eventually(lambda: len(server.list_requests("Pod")) >= 3, "retried lists")
        assert not src.synced.is_set()
        assert src.stats["list_errors"] >= 2 and src.objects() == []
    finally:
        await bad.close()


async def test_token_review(server: KubeAPIStandIn, api: kclient.ApiClient) -> None:
    """Stand-in API server: TokenReview answers with pod/node-bound claims for registered tokens."""
    server.register_token("tok-1", namespace="default", service_account="sleep", pod_name="sleep-0",
                          pod_uid="uid-1", node_name="node-1", audiences=("istio-ca",))
    auth = kclient.AuthenticationV1Api(api)
    body = kclient.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                 spec=kclient.V1TokenReviewSpec(token="tok-1", audiences=["istio-ca"]))
    review = await auth.create_token_review(body=body)
    assert review.status.authenticated is True
    assert review.status.user.username == "system:serviceaccount:default:sleep"
    assert review.status.user.extra == {
        "authentication.kubernetes.io/pod-name": ["sleep-0"],
        "authentication.kubernetes.io/pod-uid": ["uid-1"],
        "authentication.kubernetes.io/node-name": ["node-1"],
    }
    assert review.status.audiences == ["istio-ca"]

    for token, audiences in (("unknown", ["istio-ca"]), ("tok-1", ["other"])):
        body.spec = kclient.V1TokenReviewSpec(token=token, audiences=audiences)
        review = await auth.create_token_review(body=body)
        assert not review.status.authenticated and review.status.error
    assert len(server.token_reviews) == 3


async def test_default_validator(server: KubeAPIStandIn, start: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Stand-in API server, with the real ``sources.objects.validate_object`` as the default:
    well-formed objects pass, a bad field is named in the log and the object skipped."""
    pytest.importorskip("xdsserver.sources.objects")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    populate(server)
    src = await start(validate=None)
    assert src.stats["skipped_malformed"] == 0
    assert len(src.objects()) == 12
    server.inject_malformed("Pod", {**pod("bad-ip", "not-an-ip"), "apiVersion": "v1"})
    server.create(pod("good", "10.244.6.1"))
    await eventually(lambda: "good" in cached(src, "Pod"), "good pod after the bad one")
    assert "bad-ip" not in cached(src, "Pod")
    assert src.stats["skipped_malformed"] == 1
    assert "Pod default/bad-ip: field status.podIP" in caplog.text


async def test_security_kinds_listed_and_watched(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server (no real one here): AuthorizationPolicy and PeerAuthentication are
    listed and watched like every other kind and reach the model (issue 12)."""
    populate(server)
    ap = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
          "metadata": {"name": "deny-all", "namespace": "default"}, "spec": {}}
    server.create(ap)
    src = await start()
    assert "deny-all" in cached(src, "AuthorizationPolicy")
    server.create({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                   "metadata": {"name": "strict", "namespace": "default"}, "spec": {"mtls": {"mode": "STRICT"}}})
    await eventually(lambda: "strict" in cached(src, "PeerAuthentication"), "PeerAuthentication watched")
    model = build_model(src.objects())
    assert [p.key for p in model.authorization_policies] == ["default/deny-all"]
    assert [p.name for p in model.peer_authentications] == ["strict"]
    server.delete("AuthorizationPolicy", "deny-all", "default")
    await eventually(lambda: "deny-all" not in cached(src, "AuthorizationPolicy"), "deletion watched")


async def test_security_kinds_created_as_v1beta1_reach_the_model(server: KubeAPIStandIn, start: Any) -> None:
    """Stand-in API server: a v1beta1 object of a CRD stored at v1 is served at v1 (conversion
    by apiVersion), so the v1 watch sees objects applied with either version (issue 12)."""
    populate(server)
    src = await start()
    server.create({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "old-style", "namespace": "default"}, "spec": {"action": "DENY", "rules": [{}]}})
    await eventually(lambda: "old-style" in cached(src, "AuthorizationPolicy"), "v1beta1-created policy watched")
    assert cached(src, "AuthorizationPolicy")["old-style"]["apiVersion"] == "security.istio.io/v1"
    assert [p.key for p in build_model(src.objects()).authorization_policies] == ["default/old-style"]


async def test_security_kinds_watched_at_v1beta1_when_v1_is_not_served(start: Any, tmp_path: Path) -> None:
    """Stand-in API server of a cluster whose Istio CRDs predate v1 (Istio < 1.22): the v1 list
    is a 404, the source switches to v1beta1 once and lists, watches and deletes there."""
    only_beta = {k: ("security.istio.io/v1beta1",) for k in ("AuthorizationPolicy", "PeerAuthentication")}
    async with KubeAPIStandIn(served=only_beta) as old:
        populate(old)
        old.create({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
                    "metadata": {"name": "strict", "namespace": "default"}, "spec": {"mtls": {"mode": "STRICT"}}})
        client = await api_client_from_env(str(old.write_kubeconfig(tmp_path / "kubeconfig-old")))
        try:
            src = await start(client)
            assert src.stats["api_versions"] == {k: "security.istio.io/v1beta1" for k in only_beta}
            assert cached(src, "PeerAuthentication")["strict"]["apiVersion"] == "security.istio.io/v1beta1"
            old.create({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "deny-all", "namespace": "default"}, "spec": {"action": "DENY", "rules": [{}]}})
            await eventually(lambda: "deny-all" in cached(src, "AuthorizationPolicy"), "v1beta1 watch event")
            model = build_model(src.objects())
            assert [p.key for p in model.authorization_policies] == ["default/deny-all"]
            assert [p.name for p in model.peer_authentications] == ["strict"]
            old.delete("AuthorizationPolicy", "deny-all", "default")
            await eventually(lambda: "deny-all" not in cached(src, "AuthorizationPolicy"), "v1beta1 deletion watched")
            watched = [r.path for r in old.requests if r.is_watch and r.path.endswith("/authorizationpolicies")]
            assert watched and all("/security.istio.io/v1beta1/" in p for p in watched), watched
            assert src.stats["list_errors"] == 0
        finally:
            await client.close()
