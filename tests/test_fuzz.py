"""Fuzzed inputs (issue 14, point 3), a bounded run of `bench/fuzz.py`'s campaigns for CI.

`python -m bench.fuzz` runs 10,000 cases of each; here a few hundred (~40 s in all): manifests
through the server's pipeline, xDS requests over real gRPC against `xdsserver serve` serving a real
Envoy, debug HTTP queries. Each asserts its campaign recorded no failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import fuzz  # noqa: E402
from harness import Serve  # noqa: E402


def test_fuzzed_manifests_never_crash_name_their_field_and_change_nothing_served():
    camp = fuzz.run_manifests(40)
    print(f"\nmanifests: {dict(camp.counts)}")
    assert not camp.failures, "\n".join(sorted(set(camp.failures))[:20])
    assert camp.counts["rejected"] > 0 and camp.counts["cases"] == 40


@pytest.mark.envoy
def test_fuzzed_xds_requests_leave_the_envoy_and_the_server_alone(tmp_path):
    camp = fuzz.run_xds(80, tmp_path)
    print(f"\nxds: {dict(camp.counts)}")
    assert not camp.failures, "\n".join(sorted(set(camp.failures))[:20])
    assert camp.counts["streams"] == 80


def test_fuzzed_debug_queries_are_never_5xx(tmp_path):
    serve = Serve(tmp_path, fuzz.SCENARIO).start()
    try:
        camp = fuzz.run_http(300, serve.debug)
    finally:
        serve.stop()
    print(f"\nhttp: {dict(camp.counts)}")
    assert not camp.failures, "\n".join(sorted(set(camp.failures))[:20])


def test_fuzz_finding_bad_service_account_name_is_a_rejection_not_a_crash():
    """Found by the 10,000-case run: `spec.serviceAccountName: "-1"` reached the CA (ValueError)."""
    import copy

    camp = fuzz.ManifestCampaign()
    objs = copy.deepcopy(camp.base)
    pod = next(o for o in objs if o.kind == "Pod" and o.obj["metadata"]["namespace"] != "istio-system")
    pod.obj["spec"]["serviceAccountName"] = "-1"
    camp.run_case("objects", objs)
    camp.close()
    assert not camp.failures, camp.failures
    assert camp.counts["rejected"] == 1
