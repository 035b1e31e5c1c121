"""Fuzzed inputs (issue 14, point 3): manifests, xDS requests and debug HTTP queries.

`python -m bench.fuzz [--cases N]` (or `bash scripts/fuzz`) runs N cases of each campaign (default
10,000) and prints the counts; `tests/test_fuzz.py` runs a bounded number of the same cases in CI.
Cases are drawn by hypothesis from PyPI (no shrinking database is written).

- manifests: the client-server scenario's objects, mutated (fields deleted, retyped, set to odd
  values, unknown fields, duplicated objects, broken YAML). Each state goes through the
  server's pipeline (`ControlPlane.rebuild`). Properties: no exception escapes; every rejection
  names file, object and field; a rejected state changes no served version.
- xdsrequests: random `DiscoveryRequest`/`DeltaDiscoveryRequest`s (served and unknown types, huge
  and odd names, stale/forged nonces, NACKs, other nodes, unknown fields, undecodable bytes),
  on interleaved streams over real gRPC against `xdsserver serve`, which also serves a real Envoy.
  Properties: the server stays up and answers a fresh stream; the Envoy's config and its ACK
  state in `/debug/syncz` are unchanged; the server logs no traceback.
- http: malformed debug HTTP queries (random paths, keys, values, encodings). Property: the
  status is never 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import http.client
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "golden" / "client-server" / "manifests"

# -- manifests ------------------------------------------------------------------------------------

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=40), st.sampled_from(["", "*", "0", "-1", "65536", "10.0.0.300", "::1", "a" * 300, "ÿ\x00"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a parsed object (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _set(obj: Any, path: tuple, op: str, value: Any) -> Any:
    if not path:
        return value if op == "replace" else obj
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "unknown" and isinstance(parent[last], dict):
        parent[last]["fuzzUnknownField"] = value
    else:
        parent[last] = value
    return obj


@st.composite
def mutated_objects(draw, base: list) -> tuple[str, list]:
    """("objects", mutated object list) or ("yaml", broken YAML text)."""
    objs = copy.deepcopy(base)
    if draw(st.integers(0, 9)) == 0:
        text = yaml.safe_dump_all([o.obj for o in objs], sort_keys=False)
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 40))
        junk = draw(st.text(alphabet=":-[]{}&*!|>'\"%@`#\t\n x", max_size=8))
        return "yaml", text[:at] + junk + text[at + cut:]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(objs) - 1))
        so = objs[i]
        if draw(st.integers(0, 14)) == 0:  # duplicate an object
            objs.append(type(so)(so.origin + "-dup", copy.deepcopy(so.obj)))
            continue
        path = draw(st.sampled_from(_paths(so.obj)[1:] or [()]))
        op = draw(st.sampled_from(["delete", "replace", "replace", "unknown"]))
        new = _set(so.obj, path, op, draw(ODD_VALUES))
        objs[i] = type(so)(so.origin, new if isinstance(new, dict) else so.obj)
    return "objects", objs


class ManifestCampaign:
    """The server's own pipeline, fed mutated states; restores the good state after each."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        from xdsserver.app import ControlPlane
        from xdsserver.pipeline import ephemeral_certs
        from xdsserver.sources.manifests import read_objects

        self.base = read_objects(SCENARIO)
        self.current = self.base
        self.cp = ControlPlane(load_objects=lambda: self.current, certs=ephemeral_certs(), registry=CollectorRegistry())
        assert self.cp.rebuild(), "the base scenario must load"
        self.good = self.versions()
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="xds-fuzz-"))

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def versions(self) -> dict[str, dict[str, str]]:
        return {n: {t: s.type_version(t) for t in s.type_urls()} for n, s in self.cp.cache.items()}

    def run_case(self, kind: str, payload: Any) -> None:
        from xdsserver.sources.manifests import read_objects
        from xdsserver.sources.objects import InputErrors, build_model

        self.counts["cases"] += 1
        try:
            if kind == "yaml":
                f = self.tmp / "fuzz.yaml"
                f.write_text(payload)
                objs = read_objects(f)
            else:
                objs = payload
            errors = None
            try:
                build_model(objs, self.cp.mesh, strict=True)
            except InputErrors as exc:
                errors = exc.errors
            if errors is not None:
                self.counts["rejected"] += 1
                for e in errors:
                    if not e.origin or not e.ref or (not e.field and e.ref not in ("file",) and "duplicate" not in e.message):
                        self.failures.append(f"rejection does not name file/object/field: {e!r}")
            self.current = objs
            accepted = self.cp.rebuild()
            if errors is not None and accepted:
                self.failures.append(f"build_model rejected but the server accepted: {errors[0]}")
            if not accepted:
                if errors is None:
                    self.counts["rejected_later"] += 1  # translation / safety checks
                if self.versions() != self.good:
                    self.failures.append(f"a rejected state changed what is served ({errors[0] if errors else 'rebuild'})")
            else:
                self.counts["accepted"] += 1
        except InputErrors as exc:  # unparsable YAML: rejected before the pipeline, nothing changes
            self.counts["rejected"] += 1
            for e in exc.errors:
                if not e.origin:
                    self.failures.append(f"rejection does not name the file: {e!r}")
        except Exception as exc:  # a crash: the property under test
            self.failures.append(f"{type(exc).__name__}: {exc} (case {kind})")
        finally:
            self.current = self.base
            if self.versions() != self.good and (not self.cp.rebuild() or self.versions() != self.good):
                self.failures.append("the good state no longer loads to the same versions")


def run_manifests(cases: int, seed: int | None = None) -> ManifestCampaign:
    import logging

    logging.getLogger("xdsserver").setLevel(logging.CRITICAL)  # every rejection is logged: thousands
    camp = ManifestCampaign()

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is not None)
    @given(mutated_objects(camp.base))
    def case(drawn):
        camp.run_case(*drawn)

    try:
        case()
    finally:
        camp.close()
    return camp


# -- xDS requests ---------------------------------------------------------------------------------

TYPES = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
]
NAME = st.one_of(st.text(max_size=30), st.sampled_from(["*", "", "ROOTCA", "default", "\x00", "a" * 5000]))


@st.composite
def xds_request(draw, node: str, nonces: list[str]) -> tuple[str, bytes]:
    """(mode, serialized request); may carry unknown fields or be undecodable."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import struct_pb2

    mode = draw(st.sampled_from(["sotw", "delta"]))
    type_url = draw(st.one_of(st.sampled_from(TYPES), st.text(max_size=20), st.just("type.googleapis.com/x.Y")))
    names = draw(st.lists(NAME, max_size=draw(st.sampled_from([3, 3, 3, 300]))))
    nonce = draw(st.one_of(st.sampled_from(nonces or [""]), st.text(max_size=10)))
    if mode == "sotw":
        req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce,
                                             version_info=draw(st.text(max_size=10)))
    else:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names, response_nonce=nonce,
                                                  resource_names_unsubscribe=draw(st.lists(NAME, max_size=3)))
        for n in draw(st.lists(NAME, max_size=3)):
            req.initial_resource_versions[n] = draw(st.text(max_size=8))
    if draw(st.booleans()):
        req.error_detail.code = draw(st.integers(0, 20))
        req.error_detail.message = draw(st.text(max_size=30))
    who = draw(st.sampled_from(["same", "same", "other", "unknown", "none", "empty"]))
    if who != "none":
        name = {"same": node, "other": "ambient-worker2", "unknown": draw(st.text(max_size=10)), "empty": ""}[who]
        req.node.CopyFrom(base_pb2.Node(id=f"fuzz~{name}", cluster="fuzz"))
        if draw(st.booleans()) or who != "empty":
            req.node.metadata.CopyFrom(struct_pb2.Struct(fields={"NODE_NAME": struct_pb2.Value(string_value=name)}))
    data = req.SerializeToString()
    tail = draw(st.sampled_from(["", "", "", "unknown", "garbage"]))
    if tail == "unknown":  # field 999, length-delimited: an unknown field proto3 must keep and ignore
        data += b"\xba\x3e" + bytes([5]) + b"hello"
    elif tail == "garbage":
        data += draw(st.binary(min_size=1, max_size=16))
    return mode, data


class XdsCampaign:
    """`xdsserver serve` (client-server) with one real Envoy; fuzzed streams next to it."""

    def __init__(self, workdir: Path) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from harness import Envoy, Serve, poll

        self.poll = poll
        self.node = "ambient-worker"
        self.serve = Serve(workdir, SCENARIO).start()
        self.envoy = Envoy(workdir, self.node, self.serve.xds_port)
        self.target = f"127.0.0.1:{self.serve.xds_port}"
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.details: collections.Counter[str] = collections.Counter()
        self.loop = asyncio.new_event_loop()  # one loop for every case: grpc.aio channels are bound to it
        try:
            poll(lambda: self._envoy_acked(), what="the Envoy ACKs every type", timeout=60)
            self.before = self.envoy_state()
        except BaseException:
            self.stop()
            raise

    def _envoy_acked(self) -> bool:
        rows = [r for r in self.serve.get("/debug/syncz") if r["node"] == self.node and not r["node_id"].startswith("fuzz~")]
        return len(rows) >= 4 and all(r.get("acked_version") and r.get("acked_version") == r.get("sent_version") for r in rows)

    def envoy_state(self) -> dict[str, Any]:
        """The Envoy's config (version per resource, from its own admin) and its ACK state on the server."""
        dump = self.envoy.config_dump()
        versions = []
        for cfg in dump["configs"]:
            for k, v in cfg.items():
                if k.startswith("dynamic_") and isinstance(v, list):
                    versions += sorted((k, str(x.get("version_info", "")), str(x.get("name", x.get("endpoint_config", {}).get("cluster_name", "")))) for x in v)
        sync = sorted(
            (r["type"], r.get("acked_version"), r.get("sent_version"), str(r.get("nack")))
            for r in self.serve.get("/debug/syncz") if not r["node_id"].startswith("fuzz~")
        )
        return {"config": versions, "sync": sync}

    async def run_stream(self, requests: list[tuple[str, bytes]]) -> None:
        import grpc

        self.counts["streams"] += 1
        async with grpc.aio.insecure_channel(self.target) as ch:
            calls = {
                m: ch.stream_stream(f"/envoy.service.discovery.v3.AggregatedDiscoveryService/{meth}",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)()
                for m, meth in (("sotw", "StreamAggregatedResources"), ("delta", "DeltaAggregatedResources"))
            }
            used = set()
            for mode, data in requests:  # interleaved on two streams of one connection
                used.add(mode)
                self.counts["requests"] += 1
                try:
                    await asyncio.wait_for(calls[mode].write(data), 2)
                except Exception:
                    self.counts["write_refused"] += 1
            for mode in used:
                try:
                    resp = await asyncio.wait_for(calls[mode].read(), 0.1)
                    self.counts["answered" if resp is not grpc.aio.EOF else "eof"] += 1
                except asyncio.TimeoutError:
                    self.counts["no_answer"] += 1  # e.g. unknown type or stale nonce: ignored
                except grpc.aio.AioRpcError as e:
                    self.counts[f"status_{e.code().name}"] += 1
                    self.details[f"{e.code().name}: {(e.details() or '')[:60]}"] += 1
                    if e.code() in (grpc.StatusCode.UNKNOWN,):
                        self.failures.append(f"server failed a stream with {e.code().name}: {e.details()}")
            for c in calls.values():
                c.cancel()

    def still_answers(self) -> bool:
        from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
        import grpc

        from xdsclient import make_node  # type: ignore[import-not-found]

        async def probe() -> bool:
            async with grpc.aio.insecure_channel(self.target) as ch:
                call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
                await call.write(discovery_pb2.DiscoveryRequest(node=make_node(self.node, "fuzz~probe"), type_url=TYPES[0]))
                resp = await asyncio.wait_for(call.read(), 5)
                call.cancel()
                return len(resp.resources) > 0

        return self.loop.run_until_complete(probe())

    def check(self) -> None:
        if not self.serve.proc.alive():
            self.failures.append("xdsserver exited")
            return
        if not self.still_answers():
            self.failures.append("a fresh stream got no clusters")
        if self.envoy_state() != self.before:
            self.failures.append(f"the Envoy's config or ACK state changed: {self.before} -> {self.envoy_state()}")
        log = self.serve.proc.output()
        for bad in ("Traceback", "Unexpected", "Exception not handled"):
            if bad in log:
                line = next(ln for ln in log.splitlines() if bad in ln)
                self.failures.append(f"server log: {line[:200]}")

    def stop(self) -> None:
        self.envoy.stop()
        self.serve.stop()
        self.loop.close()


def run_xds(cases: int, workdir: Path, seed: int | None = None) -> XdsCampaign:
    camp = XdsCampaign(workdir)
    try:
        nonces = ["", "0", "1", "2"]

        @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=seed is not None)
        @given(st.lists(xds_request(camp.node, nonces), min_size=1, max_size=5))
        def case(reqs):
            camp.loop.run_until_complete(camp.run_stream(reqs))

        case()
        try:
            camp.check()
        except AssertionError as exc:
            camp.failures.append(str(exc))
    finally:
        camp.stop()
    return camp


# -- debug HTTP -----------------------------------------------------------------------------------

PATHS = ["/ready", "/healthz", "/metrics", "/debug/config_dump", "/debug/syncz", "/debug/nackz", "/debug/connections",
         "/debug/nodes", "/debug/pushz", "/debug/registryz", "/debug/explain", "/ui/", "/ui/api/overview",
         "/ui/api/node", "/ui/api/targets", "/ui/api/path", "/ui/app.js", "/debug/test/inject"]
KEYS = ["node", "src", "dst", "format", "type", "reason", "name", "limit", "x"]


@st.composite
def http_query(draw) -> str:
    path = draw(st.one_of(st.sampled_from(PATHS), st.text(alphabet="/abcdeui.%?&=~", max_size=20).map(lambda s: "/" + s)))
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=5)),
                                    st.one_of(st.text(max_size=30), st.sampled_from(["ambient-worker", "ambient-worker2", "10.244.1.5", "10.244.2.5:8080", "10.0.0.1:99999", "[::1]:80", "1.2.3.4", "1.2.3.4:", "10.244.1.5:0",
                                                                                     "text", "json", "a" * 3000, "%zz", ":"]))),
                          max_size=4))
    if draw(st.integers(0, 2)) == 0:  # the parameters a handler needs, so its parsing is reached
        value = st.one_of(st.text(max_size=12), st.sampled_from(["ambient-worker", "10.244.1.5", "10.244.2.5:8080", "1.2.3.4:", ":80"]))
        pairs = [("node", draw(value)), ("src", draw(value)), ("dst", draw(value)), *pairs]
    query = "&".join(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}" for k, v in pairs)
    if draw(st.integers(0, 5)) == 0:
        query += draw(st.sampled_from(["&&", "=", "%", "%%", "&=&", "node", "%C0%AF"]))
    return path + ("?" + query if query else "")


class HttpCampaign:
    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def run_case(self, target: str) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.endheaders()
            resp = conn.getresponse()
            resp.read()
            self.counts[f"{resp.status // 100}xx"] += 1
            if resp.status >= 500:
                self.failures.append(f"GET {target[:120]} -> {resp.status}")
        except (http.client.InvalidURL, UnicodeEncodeError):
            self.counts["not_sendable"] += 1  # the client library refuses it: no request was made
        finally:
            conn.close()


def run_http(cases: int, base: str, seed: int | None = None) -> HttpCampaign:
    camp = HttpCampaign(base)

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=seed is not None)
    @given(http_query())
    def case(target):
        camp.run_case(target)

    case()
    return camp


# -- script ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="cases per campaign (default 10,000)")
    p.add_argument("--only", choices=["manifests", "xds", "http"], action="append")
    args = p.parse_args(argv)
    only = args.only or ["manifests", "xds", "http"]
    failed = 0
    print(f"fuzz: {args.cases} cases per campaign ({', '.join(only)})")
    with tempfile.TemporaryDirectory(prefix="xds-fuzz-") as tmp:
        if "manifests" in only:
            t0 = time.monotonic()
            m = run_manifests(args.cases)
            failed += _print("manifests", m.counts, m.failures, time.monotonic() - t0)
        if "xds" in only or "http" in only:
            t0 = time.monotonic()
            x = run_xds(args.cases if "xds" in only else 0, Path(tmp)) if "xds" in only else None
            if x is not None:
                failed += _print("xds requests", x.counts, x.failures, time.monotonic() - t0)
        if "http" in only:
            sys.path.insert(0, str(REPO / "tests"))
            from harness import Serve

            serve = Serve(Path(tmp), SCENARIO).start()
            try:
                t0 = time.monotonic()
                h = run_http(args.cases, serve.debug)
                failed += _print("debug HTTP", h.counts, h.failures, time.monotonic() - t0)
            finally:
                serve.stop()
    print("fuzz: " + ("all properties held" if not failed else f"{failed} failure(s)"))
    return 1 if failed else 0


def _print(name: str, counts: collections.Counter, failures: list[str], seconds: float) -> int:
    body = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{name}: {body} ({seconds:.0f} s); failures {len(failures)}")
    for f in sorted(set(failures))[:20]:
        print(f"  FAIL {f}")
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
