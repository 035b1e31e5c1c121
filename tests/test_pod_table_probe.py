"""Probe: stock Envoy 1.40 can look a destination IP up in an EDS resource, not in LDS.

Why this exists: a pod added anywhere changes stage 2 (`ztunnel_outbound_dispatch`, 2.18 MB at
100 nodes / 10k pods), so every node is sent a new 2 MB listener (issue 13: pod added and Service
added stay missed, bound by bytes). The way out is a pod table outside LDS, sharded so that a pod
added changes one small ClusterLoadAssignment. Earlier sessions believed stock Envoy offered no
way to select an endpoint by the connection's destination IP. It does, with parts that are all
stock and all real here:

1. a hop's upstream transport socket is ``upstream_proxy_protocol`` (v2) around
   ``internal_upstream``, and adds a TLV whose value is a format string over filter state the
   previous listener shared with the upstream (the destination IP);
2. the internal listener's ``proxy_protocol`` listener filter writes that TLV to the dynamic
   metadata namespace ``envoy.lb`` (and restores the original addresses from the header);
3. ``tcp_proxy`` merges ``envoy.lb`` dynamic metadata into its metadata match, and the cluster's
   subset load balancer (selector ``ip``) picks the endpoint with that IP; an IP with no endpoint
   falls back to a default subset (passthrough), so non-mesh pods in the same range keep working.

The tests run in a real Envoy on loopback addresses only (127.0.0.1-4, 127.0.1.1; no namespace,
no root-namespace change), with the pod table as a file-based EDS resource. The first asserts
the lookup itself: each destination IP reaches its own endpoint, an unknown IP the default,
filter state shared with the upstream survives the hop, and adding an endpoint (a pod) re-routes
that IP with **no listener modified**. The second makes the endpoints what the generator would
emit, an internal address to a stage-3 listener with ``tunnel`` host metadata passed through,
where ``envoy.network.upstream_subject_alt_names`` is set from ``tunnel.identity`` and mTLS (TLS
1.3, certificates from our CA) goes to ``tunnel.address``: a server presenting another identity
than its table entry says is refused. The third checks the stage-2 keys the design needs: an
exact map of VIPs whose ``on_no_match`` is a ``prefix_match_map`` of /24 string prefixes
("10.64.50."), with no ``IPMatcher`` (so none of its work-in-progress warnings). The generator
does not use this layout yet; the README's "what is still missed" says where each piece would
go and what adopting it involves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Envoy, Proc, free_port, http_get, poll

pytestmark = [pytest.mark.envoy, pytest.mark.skipif(shutil.which("envoy") is None, reason="no envoy binary")]

TLV_DST = 0xE0
ANY = "type.googleapis.com/"


def _fs(key: str, fmt: str, share: str) -> dict[str, Any]:
    return {"object_key": key, "factory_key": "envoy.string", "shared_with_upstream": share,
            "format_string": {"text_format_source": {"inline_string": fmt}}}


def _front(ip: str, port: int) -> dict[str, Any]:
    """Stands in for stage 2: records the destination IP and a source identity, then hops."""
    return {"name": f"front_{ip}", "address": {"socket_address": {"address": ip, "port_value": port}},
            "filter_chains": [{"filters": [
                {"name": "envoy.filters.network.set_filter_state",
                 "typed_config": {"@type": ANY + "envoy.extensions.filters.network.set_filter_state.v3.Config",
                                  "on_new_connection": [
                                      _fs("io.probe.dst", "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "ONCE"),
                                      _fs("io.probe.source_identity", "spiffe://probe/ns/a/sa/client", "TRANSITIVE")]}},
                {"name": "envoy.filters.network.tcp_proxy",
                 "typed_config": {"@type": ANY + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                  "stat_prefix": "front", "cluster": "to_lookup"}}]}]}


def _bootstrap(work: Path, admin: int, front: int) -> dict[str, Any]:
    lookup = {
        "name": "lookup", "internal_listener": {},
        "listener_filters": [{"name": "envoy.filters.listener.proxy_protocol", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
            "rules": [{"tlv_type": TLV_DST, "on_tlv_present": {"metadata_namespace": "envoy.lb", "key": "ip"}}]}}],
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "lookup", "cluster": "pods",
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": ANY + "envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": str(work / "lookup.log"),
                "log_format": {"json_format": {"ip": "%DYNAMIC_METADATA(envoy.lb:ip)%", "upstream": "%UPSTREAM_HOST%",
                                               "local": "%DOWNSTREAM_LOCAL_ADDRESS%",
                                               "source_identity": "%FILTER_STATE(io.probe.source_identity:PLAIN)%"}}}}]}}]}],
    }
    to_lookup = {
        "name": "to_lookup", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "to_lookup", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "lookup"}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.upstream_proxy_protocol", "typed_config": {
            "@type": ANY + "envoy.extensions.transport_sockets.proxy_protocol.v3.ProxyProtocolUpstreamTransport",
            "config": {"version": "V2", "added_tlvs": [
                {"type": TLV_DST, "format_string": {"text_format_source": {"inline_string": "%FILTER_STATE(io.probe.dst:PLAIN)%"}}}]},
            "transport_socket": {"name": "envoy.transport_sockets.internal_upstream", "typed_config": {
                "@type": ANY + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                    "@type": ANY + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}}},
    }
    pods = {
        "name": "pods", "connect_timeout": "1s", "type": "EDS",
        "eds_cluster_config": {"eds_config": {"path_config_source": {
            "path": str(work / "eds" / "pods.json"), "watched_directory": {"path": str(work / "eds")}}}},
        "lb_subset_config": {"fallback_policy": "DEFAULT_SUBSET", "default_subset": {"passthrough": True},
                             "subset_selectors": [{"keys": ["ip"]}]},
    }
    return {"node": {"id": "probe", "cluster": "probe"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": {
                "@type": ANY + "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"}}],
            "static_resources": {"listeners": [_front(f"127.0.0.{i}", front) for i in (1, 2, 3)] + [lookup],
                                 "clusters": [to_lookup, pods]}}


def _write_table(work: Path, rows: list[tuple[dict[str, Any], int]]) -> None:
    """The pod table as one CLA: each endpoint keyed by ``envoy.lb`` metadata; replaced atomically."""
    cla = {"version_info": str(len(rows)), "resources": [{
        "@type": ANY + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": "pods",
        "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}},
             "metadata": {"filter_metadata": {"envoy.lb": md}}} for md, port in rows]}]}]}
    tmp = work / "eds" / ".pods.json.tmp"
    tmp.write_text(json.dumps(cla))
    os.replace(tmp, work / "eds" / "pods.json")


class _Backends:
    """Loopback TCP servers that answer with their own name, so the test sees who was reached.
    They speak first and the client never sends a byte (``_reach``): the hop's PROXY header is
    written when the internal connection is made, not with the client's first data, so
    server-first protocols (SMTP, MySQL, SSH) pass the stage 1 -> stage 2 hop."""

    def __init__(self, names: list[str]) -> None:
        self.ports: dict[str, int] = {}
        self._socks: list[socket.socket] = []
        for name in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            self.ports[name] = s.getsockname()[1]
            self._socks.append(s)
            threading.Thread(target=self._serve, args=(s, name.encode()), daemon=True).start()

    @staticmethod
    def _serve(s: socket.socket, name: bytes) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            with c:
                c.sendall(name)

    def close(self) -> None:
        for s in self._socks:
            s.close()


def _reach(ip: str, port: int) -> bytes:
    with socket.create_connection((ip, port), timeout=3) as s:
        return s.recv(64)


def _stat(admin: int, name: str) -> int:
    _, body = http_get(f"http://127.0.0.1:{admin}/stats?filter=^{name}$")
    for line in body.splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    raise AssertionError(f"no stat {name}: {body!r}")


def _start_envoy(work: Path, bootstrap: dict[str, Any], admin: int) -> Proc:
    """A real Envoy on ``bootstrap``, ready (access logs flushed every 100 ms); the caller stops it."""
    cfg = work / "envoy.json"
    cfg.write_text(json.dumps(bootstrap))
    envoy = Proc([shutil.which("envoy") or "envoy", "-c", str(cfg), "--base-id", str(next(Envoy.base_ids)),
                  "--disable-hot-restart", "-l", "warning", "--concurrency", "1", "--file-flush-interval-msec", "100"],
                 work / "envoy.log")
    try:
        poll(lambda: not envoy.alive() or http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, what="envoy ready", timeout=20)
        assert envoy.alive(), envoy.output()[-2000:]
    except BaseException:
        envoy.stop()
        raise
    return envoy


def test_destination_ip_selects_an_eds_endpoint_through_a_proxy_protocol_hop(tmp_path: Path) -> None:
    backends = _Backends(["pod-a", "pod-b", "pod-c", "passthrough"])
    (tmp_path / "eds").mkdir()
    _write_table(tmp_path, [({"ip": "127.0.0.1"}, backends.ports["pod-a"]),
                            ({"ip": "127.0.0.2"}, backends.ports["pod-b"]),
                            ({"passthrough": True}, backends.ports["passthrough"])])
    admin, front = free_port(), free_port()
    envoy = _start_envoy(tmp_path, _bootstrap(tmp_path, admin, front), admin)
    try:
        assert _reach("127.0.0.1", front) == b"pod-a"
        assert _reach("127.0.0.2", front) == b"pod-b"
        assert _reach("127.0.0.3", front) == b"passthrough", "an IP with no endpoint must fall back, not pick a pod"
        modified = _stat(admin, "listener_manager.listener_modified")
        updates = _stat(admin, "cluster.pods.update_success")

        # A pod with 127.0.0.3 is added: only the table changes.
        _write_table(tmp_path, [({"ip": "127.0.0.1"}, backends.ports["pod-a"]),
                                ({"ip": "127.0.0.2"}, backends.ports["pod-b"]),
                                ({"ip": "127.0.0.3"}, backends.ports["pod-c"]),
                                ({"passthrough": True}, backends.ports["passthrough"])])
        poll(lambda: _stat(admin, "cluster.pods.update_success") > updates, what="pods table reloaded", timeout=10)
        assert _reach("127.0.0.3", front) == b"pod-c"
        assert _reach("127.0.0.1", front) == b"pod-a"
        assert _stat(admin, "listener_manager.listener_modified") == modified, "a pod added must not touch LDS"

        log = tmp_path / "lookup.log"
        lines = poll(lambda: (lambda ls: ls if len(ls) >= 5 else None)(
            [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []),
            what="lookup access log", timeout=10)
        # lines are written as connections close, in any order: compared as a multiset
        assert sorted((ln["ip"], ln["local"]) for ln in lines) == sorted((f"127.0.0.{i}", f"127.0.0.{i}:{front}") for i in (1, 2, 3, 3, 1)), \
            "the TLV carries each connection's destination IP and the PROXY header restores it on the internal listener"
        assert {ln["source_identity"] for ln in lines} == {"spiffe://probe/ns/a/sa/client"}, \
            "filter state shared with the upstream (the source identity) must survive the proxy-protocol socket"
    finally:
        envoy.stop()
        backends.close()


# -- the whole pod-IP leg: the lookup's endpoint is stage 3, which pins the server's SAN ------------
TD = "cluster.local"
SPIFFE = {name: f"spiffe://{TD}/ns/probe/sa/{name}" for name in ("client", "a", "b", "c")}


def _tls_server(cert_pem: str, key_pem: str, name: bytes, work: Path) -> socket.socket:
    """A loopback TLS 1.3 server presenting one workload certificate; answers with its name."""
    import ssl

    (work / f"{name.decode()}.crt").write_text(cert_pem)
    (work / f"{name.decode()}.key").write_text(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(work / f"{name.decode()}.crt", work / f"{name.decode()}.key")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)

    def serve() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(c, server_side=True) as t:
                    t.sendall(name)
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate: what the SAN test wants

    threading.Thread(target=serve, daemon=True).start()
    return s


def _full_path_bootstrap(work: Path, admin: int, front: int, passthrough_port: int, client: Any, root_pem: str) -> dict[str, Any]:
    """The lookup of the first test, whose endpoints are stage 3 (an internal listener, one
    endpoint per pod IP, host metadata ``tunnel``), as the generator would emit it; stage 3 sets
    ``envoy.network.upstream_subject_alt_names`` from ``%DYNAMIC_METADATA(tunnel:identity)%`` and
    opens mTLS (the source's certificate) to ``tunnel.address``."""
    cfg = _bootstrap(work, admin, front)
    raw = {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {"@type": ANY + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}
    pods = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "pods")
    pods["transport_socket"] = {"name": "envoy.transport_sockets.internal_upstream", "typed_config": {
        "@type": ANY + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "passthrough_metadata": [{"kind": {"host": {}}, "name": "tunnel"}], "transport_socket": raw}}
    stage3 = {"name": "stage3", "internal_listener": {}, "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.set_filter_state", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.network.set_filter_state.v3.Config",
            "on_new_connection": [{"object_key": "envoy.network.upstream_subject_alt_names",
                                   "format_string": {"text_format_source": {"inline_string": "%DYNAMIC_METADATA(tunnel:identity)%"}}}]}},
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "stage3", "cluster": "tunnel_out"}}]}]}
    passthrough = {"name": "passthrough", "internal_listener": {}, "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "passthrough", "cluster": "outside"}}]}]}
    tunnel_out = {
        "name": "tunnel_out", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "1s",
        "original_dst_lb_config": {"metadata_key": {"key": "tunnel", "path": [{"key": "address"}]}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": ANY + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
                "tls_certificates": [{"certificate_chain": {"inline_string": client.cert_chain_pem},
                                      "private_key": {"inline_string": client.private_key_pem}}],
                "validation_context": {"trusted_ca": {"inline_string": root_pem}, "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TD}/"}}]}}}}}
    outside = {"name": "outside", "connect_timeout": "1s", "load_assignment": {"cluster_name": "outside", "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": passthrough_port}}}}]}]}}
    cfg["static_resources"]["listeners"] += [stage3, passthrough]
    cfg["static_resources"]["clusters"] += [tunnel_out, outside]
    return cfg


def _write_stage3_table(work: Path, rows: list[tuple[str, str, int]]) -> None:
    """Pod IP -> (stage 3 endpoint, expected identity, HBONE address); plus the default subset."""
    lbes = [{"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "stage3", "endpoint_id": ip}}},
             "metadata": {"filter_metadata": {"envoy.lb": {"ip": ip},
                                              "tunnel": {"identity": identity, "address": f"127.0.0.1:{port}"}}}}
            for ip, identity, port in rows]
    lbes.append({"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "passthrough", "endpoint_id": "passthrough"}}},
                 "metadata": {"filter_metadata": {"envoy.lb": {"passthrough": True}}}})
    cla = {"version_info": str(len(rows)), "resources": [{
        "@type": ANY + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": "pods",
        "endpoints": [{"lb_endpoints": lbes}]}]}
    tmp = work / "eds" / ".pods.json.tmp"
    tmp.write_text(json.dumps(cla))
    os.replace(tmp, work / "eds" / "pods.json")


def _reach_or_closed(ip: str, port: int) -> bytes:
    with socket.create_connection((ip, port), timeout=3) as s:
        try:
            return s.recv(64)
        except ConnectionResetError:
            return b""


def test_pod_table_endpoint_is_stage3_which_pins_the_servers_identity(tmp_path: Path) -> None:
    from xdsserver.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(None, trust_domain=TD)
    certs = {n: ca.issue_workload(uri) for n, uri in SPIFFE.items()}
    servers = {n: _tls_server(certs[n].cert_chain_pem, certs[n].private_key_pem, f"pod-{n}".encode(), tmp_path) for n in ("a", "b")}
    port = {n: s.getsockname()[1] for n, s in servers.items()}
    outside = _Backends(["outside"])
    (tmp_path / "eds").mkdir()
    # 127.0.0.3 claims identity c but its HBONE address is b's server: the SAN pin must refuse it
    _write_stage3_table(tmp_path, [("127.0.0.1", SPIFFE["a"], port["a"]), ("127.0.0.2", SPIFFE["b"], port["b"])])
    admin, front = free_port(), free_port()
    envoy = _start_envoy(tmp_path, _full_path_bootstrap(tmp_path, admin, front, outside.ports["outside"], certs["client"], ca.root_pem), admin)
    try:
        assert _reach("127.0.0.1", front) == b"pod-a"
        assert _reach("127.0.0.2", front) == b"pod-b"
        assert _reach("127.0.0.3", front) == b"outside", "an IP outside the table goes to the passthrough listener"
        assert _stat(admin, "cluster.tunnel_out.ssl.fail_verify_san") == 0

        updates = _stat(admin, "cluster.pods.update_success")
        _write_stage3_table(tmp_path, [("127.0.0.1", SPIFFE["a"], port["a"]), ("127.0.0.2", SPIFFE["b"], port["b"]),
                                       ("127.0.0.3", SPIFFE["c"], port["b"])])
        poll(lambda: _stat(admin, "cluster.pods.update_success") > updates, what="pods table reloaded", timeout=10)
        assert _reach_or_closed("127.0.0.3", front) == b"", "a server presenting another identity must be refused"
        poll(lambda: _stat(admin, "cluster.tunnel_out.ssl.fail_verify_san") >= 1, what="SAN refusal counted", timeout=10)
        assert _reach("127.0.0.2", front) == b"pod-b", "the per-connection SAN comes from the endpoint, not a shared setting"
    finally:
        envoy.stop()
        for srv in servers.values():
            srv.close()
        outside.close()


# -- stage 2's keys: VIPs exactly, pod ranges by string prefix -------------------------------------
def _action(chain: str) -> dict[str, Any]:
    return {"action": {"name": "fc", "typed_config": {"@type": ANY + "google.protobuf.StringValue", "value": chain}}}


def _keyed_listener(ip: str, port: int) -> dict[str, Any]:
    """The stage-2 matcher the design needs: an exact map of VIPs whose ``on_no_match`` is a
    ``prefix_match_map`` of /24 string prefixes; an IP in neither takes the default chain."""
    ip_input = {"name": "ip", "typed_config": {"@type": ANY + "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput"}}

    def chain(name: str) -> dict[str, Any]:
        return {"name": name, "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": ANY + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": name, "cluster": name}}]}

    return {"name": f"keyed_{ip}", "address": {"socket_address": {"address": ip, "port_value": port}},
            "filter_chains": [chain("vip"), chain("pods")], "default_filter_chain": chain("elsewhere"),
            "filter_chain_matcher": {"matcher_tree": {"input": ip_input, "exact_match_map": {"map": {"127.0.0.4": _action("vip")}}},
                                     "on_no_match": {"matcher": {"matcher_tree": {"input": ip_input, "prefix_match_map": {
                                         "map": {"127.0.0.": _action("pods")}}}}}}}


def test_stage2_keys_vips_exactly_and_pod_ranges_by_string_prefix(tmp_path: Path) -> None:
    backends = _Backends(["vip", "pods", "elsewhere"])
    admin, port = free_port(), free_port()
    clusters = [{"name": n, "connect_timeout": "1s", "load_assignment": {"cluster_name": n, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}]}]}} for n, p in backends.ports.items()]
    cfg = {"node": {"id": "probe", "cluster": "probe"},
           "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
           "static_resources": {"listeners": [_keyed_listener(ip, port) for ip in ("127.0.0.1", "127.0.0.4", "127.0.1.1")],
                                "clusters": clusters}}
    envoy = _start_envoy(tmp_path, cfg, admin)
    try:
        assert _reach("127.0.0.4", port) == b"vip", "an exact VIP key wins over the range it lies in"
        assert _reach("127.0.0.1", port) == b"pods", "an IP with no exact key falls to the /24 prefix map"
        assert _reach("127.0.1.1", port) == b"elsewhere", "an IP in neither takes the default chain"
        assert "work-in-progress" not in envoy.output() and "IPMatcher" not in envoy.output()
    finally:
        envoy.stop()
        backends.close()
