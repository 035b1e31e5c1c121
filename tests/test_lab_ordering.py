"""Ordered pushes with real packets (issue 14, point 2; ordering.py): a client pod opens new
connections to a Service back to back while a new backend pod is added on the other node, whose
ztunnel gets its xDS late (server->ztunnel bytes held `DELAY_S` by its relay, `lab.delay_xds`). As in Kubernetes the
pod is created (wired, captured, not Ready) and becomes Ready right after. Required: no connection
fails, the new backend receives connections, every one it receives succeeds (its pod server's
log against the client's answers), and the barrier was released by ACKs, not by its timeout.

It fails with the barrier disabled: ``XDS_ORDLAB_BARRIER_TIMEOUT=0 python -m pytest -q
tests/test_lab_ordering.py`` (the client ztunnel gets the endpoint while the destination ztunnel
has no inbound chain for it yet: the client's connection is closed without an answer), and with
a barrier that waits for the LDS ACK only (the updated listener is still warming, waiting for its
RDS route).
"""

from __future__ import annotations

import http.client
import os
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.envoy,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, iptables, TPROXY)"),
]

from xdsserver.lab.client import request  # noqa: E402
from xdsserver.lab.lab import Lab  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PREFIX = os.environ.get("XDS_LAB_PREFIX", "xdsord") + "o"  # never the prefix another lab module uses
from labguard import lab_up, poll, root_namespace_untouched  # noqa: E402,F401 (root_namespace_untouched: module-scoped autouse guard)
from labpods import NEW_SERVER_POD as NEW_KEY, new_server_pod  # noqa: E402

# 0 disables the barrier (how the test is shown to fail); the default outlasts two held pushes
BARRIER_TIMEOUT = os.environ.get("XDS_ORDLAB_BARRIER_TIMEOUT", "15")
CLIENT, DST = "client-6db7", "ambient-worker2"
VIP, PORT = "10.96.0.105", 9080
NEW_IP = "10.244.2.9"
DELAY_S = 3.0  # how long the destination ztunnel's xDS is held while the pod is added


@dataclass
class Hammer:
    """New connections back to back from one pod to the Service, each `GET /ord-<n>` checked."""

    netns: str
    answers: Counter = field(default_factory=Counter)  # pod -> successful connections
    paths: dict[str, set[str]] = field(default_factory=dict)  # pod -> paths it answered
    failures: list[tuple[int, str]] = field(default_factory=list)
    first: dict[str, int] = field(default_factory=dict)  # pod -> number of its first connection
    marks: dict[str, int] = field(default_factory=dict)  # event -> connections made before it
    made: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hammer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def mark(self, event: str) -> None:
        self.marks[event] = self.made

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 100_000:
            n += 1
            path = f"/ord-{n}"
            try:
                r = request(self.netns, VIP, PORT, path, timeout=3)
                a = r.json() if r.status == 200 else {}
                if a.get("pod", "").startswith("ambient/server-"):
                    self.answers[a["pod"]] += 1
                    self.paths.setdefault(a["pod"], set()).add(path)
                    self.first.setdefault(a["pod"], n)
                else:
                    self.failures.append((n, f"status {r.status}: {r.body[:80]!r}"))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append((n, f"{type(exc).__name__}: {exc}"))
            self.made = n


def logged_paths(lab: Lab, key: str) -> set[str]:
    """Paths of the requests the pod server received (its log: ``request ... path=...``)."""
    return {line.rsplit("path=", 1)[1] for line in lab.pod_log(key).splitlines() if line.startswith("request ") and "path=/ord-" in line}


@pytest.fixture(scope="module")
def lab(request, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ordlab") / "manifests"
    shutil.copytree(ROOT / "golden" / "client-server" / "manifests", dst)
    return lab_up(request, Lab(dst, prefix=PREFIX, log=lambda m: print(m, file=sys.stderr), xds_relay=True,
                                serve_args=("--endpoint-barrier-timeout", BARRIER_TIMEOUT)))


def test_backend_added_while_a_client_hammers_its_service(lab):
    apps = lab.manifests / "apps.yaml"
    original = apps.read_text()
    hammer = Hammer(lab.pod_netns(CLIENT))
    hammer.start()
    try:
        poll(lambda: sum(hammer.answers.values()) >= 20 or hammer.failures, 20, "20 answers before the change")
        assert not hammer.failures, f"failures before the change: {hammer.failures[:5]}"
        lab.delay_xds(DST, DELAY_S)
        hammer.mark("delayed")
        # Like Kubernetes: the pod is created (wired, captured) and becomes Ready right after.
        apps.write_text(original + new_server_pod(DST, NEW_IP, ready=False))
        hammer.mark("created")
        assert lab.sync()["added"] == [NEW_KEY]
        hammer.mark("wired")
        apps.write_text(original + new_server_pod(DST, NEW_IP))
        hammer.mark("ready")
        ready = time.monotonic()
        # the risky window (held pushes) is over after 2 x DELAY_S; then enough hits on the new pod
        poll(lambda: hammer.answers[NEW_KEY] >= 30 and time.monotonic() > ready + 2 * DELAY_S + 1, 30,
             f"30 answers from {NEW_KEY}", step=0.1)
    finally:
        hammer.stop()
        lab.delay_xds(DST, 0)
    received = logged_paths(lab, NEW_KEY)
    barrier = [l.split("endpoint barrier: ", 1)[1] for l in (lab.state_dir / "xdsserver.log").read_text().splitlines()
               if "endpoint barrier: " in l]
    print(f"\n{hammer.made} connections, {len(hammer.failures)} failed, answers {dict(hammer.answers)}, "
          f"new backend received {len(received)}; marks {hammer.marks}, first {hammer.first}, "
          f"failures {dict(Counter(k.split(':')[0] for _, k in hammer.failures))} "
          f"#{hammer.failures[0][0] if hammer.failures else '-'}..#{hammer.failures[-1][0] if hammer.failures else '-'}; barrier {barrier}")
    if float(BARRIER_TIMEOUT) > 0:  # released by the destination's ACKs, not by the timeout
        assert [b for b in barrier if "ACKed" in b] and not [b for b in barrier if "anyway" in b], barrier
    assert not hammer.failures, f"{len(hammer.failures)} of {hammer.made} connections failed, first: {hammer.failures[:5]}"
    assert hammer.answers[NEW_KEY] > 0
    assert received and received <= hammer.paths[NEW_KEY], "the new backend received connections that did not succeed"
