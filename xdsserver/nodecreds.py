"""``xdsserver node-credentials``: obtain (and with ``--renew`` keep renewing) a ztunnel's node
certificate from xdsserver's node-credentials service.

It runs next to Envoy in the ztunnel pod (chart: an init container, then a sidecar with
``--renew``). It presents the pod's projected service-account token and its node name; xdsserver
answers with a client certificate bound to that node. Files in ``--out``:
``key.pem``, ``cert-chain.pem``, ``root-cert.pem``, mode 0640 (Envoy reads them through the group
bit), each written to a temporary file and renamed into place, the key before the chain, so
Envoy's watched-directory SDS never reads a half-written file.

Trust on first contact comes from ``--ca-file`` (the mesh root certificate, public; the chart
mounts it from a ConfigMap, never from the CA Secret). Without it, ``<out>/root-cert.pem`` from an
earlier run is used; with neither the command refuses to send the token anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# cli.py imports this module for every command: only the standard library at module level.

ISSUE_METHOD = "/xdsserver.v1.NodeCredentials/Issue"
AUDIENCE = "xdsserver"
DEFAULT_SANS = ("xdsserver", "xdsserver.istio-system.svc")
DEFAULT_ZTUNNEL_SA = "istio-system/ztunnel"
DEFAULT_NODE_CERT_TTL = 24 * 3600.0

FILE_MODE = 0o640
KEY_FILE, CHAIN_FILE, ROOT_FILE = "key.pem", "cert-chain.pem", "root-cert.pem"
REFUSALS = ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT")  # grpc.StatusCode names
RENEW_BACKOFF = (1.0, 60.0)  # renewal retries: first delay, cap
FETCH_BACKOFF = (0.2, 5.0)  # first fetch retries (server not up yet)
MIN_RENEW_WAIT = 1.0


class ConfigError(Exception):
    """Bad local setup (no trust anchor, unreadable token): retrying cannot help."""


@dataclass(frozen=True)
class Issued:
    cert_chain_pem: str
    private_key_pem: str
    root_pem: str
    not_after: datetime
    received: datetime

    @property
    def renew_at(self) -> datetime:
        """Half of the remaining lifetime, counted from when we received it (not from the
        back-dated notBefore)."""
        return self.received + (self.not_after - self.received) / 2


# ---------------------------------------------------------------------------------------------
# one exchange


def _trust_anchor(ca_file: Path | None, out: Path) -> bytes:
    from cryptography import x509

    for path in (ca_file, out / ROOT_FILE):
        if path is None:
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            if path == ca_file:
                raise ConfigError(f"--ca-file {path}: {exc.strerror}") from None
            continue
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ConfigError(f"{path}: not a PEM certificate") from None
        return data
    raise ConfigError(
        f"no trust anchor for the xdsserver certificate: pass --ca-file (the mesh root certificate) "
        f"or provide {out / ROOT_FILE}; refusing to send the token to an unauthenticated server"
    )


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"--token-file {path} is empty")
    return token


async def fetch(server: str, *, token: str, node: str, root_pem: bytes, server_name: str | None,
                timeout: float = 15.0) -> Issued:
    """One Issue call. Raises grpc.aio.AioRpcError on refusal or transport failure."""
    import grpc
    from cryptography import x509

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
    async with grpc.aio.secure_channel(server, creds, options=options) as channel:
        call = channel.unary_unary(ISSUE_METHOD)
        raw = await call(json.dumps({"node": node, "token": token}).encode(), timeout=timeout)
    received = datetime.now(timezone.utc)
    body = json.loads(raw)
    chain, key, root = body["certChain"], body["privateKey"], body["rootCert"]
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    return Issued(chain, key, root, leaf.not_valid_after_utc, received)


# ---------------------------------------------------------------------------------------------
# files


def _write(path: Path, text: str) -> bool:
    """Atomically replace `path` (tmp + fsync + rename); False if it already had this content."""
    from .ca.certs import write_atomic

    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_atomic(path, text, mode=FILE_MODE)
    return True


def write_credentials(out: Path, issued: Issued) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / KEY_FILE, issued.private_key_pem)  # key first: a new chain never meets an old key
    _write(out / CHAIN_FILE, issued.cert_chain_pem)
    _write(out / ROOT_FILE, issued.root_pem)


def current_renew_at(out: Path, node: str) -> datetime | None:
    """When the certificate already in `out` is due (None: missing, unusable or another node's)."""
    from cryptography import x509

    from .ca import node_from_peer_cert

    path = out / CHAIN_FILE
    try:
        data = path.read_bytes()
        if not (out / KEY_FILE).is_file():
            return None
        leaf = x509.load_pem_x509_certificates(data)[0]
        received = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except (OSError, ValueError, IndexError):
        return None
    if node_from_peer_cert(data) != node:
        return None
    not_after = leaf.not_valid_after_utc
    if not_after <= received:
        return received
    return received + (not_after - received) / 2


# ---------------------------------------------------------------------------------------------
# modes


async def obtain(args: argparse.Namespace, *, deadline: float | None, backoff: tuple[float, float]) -> Issued:
    """Fetch until success; refusals end at once when `deadline` is set (one-shot mode)."""
    import grpc

    delay = backoff[0]
    attempt = 0
    while True:
        attempt += 1
        try:
            root = _trust_anchor(args.ca_file, args.out)
            token = _read_token(args.token_file)
            host = args.server.rpartition(":")[0].strip("[]")
            return await fetch(args.server, token=token, node=args.node, root_pem=root,
                               server_name=args.server_name or host)
        except ConfigError as exc:
            if deadline is not None:
                raise
            err = str(exc)
            log.error("node-credentials: %s", err)
        except grpc.aio.AioRpcError as exc:
            err = f"{exc.code().name}: {exc.details()}"
            if deadline is not None and exc.code().name in REFUSALS:
                raise
            log.warning("node-credentials: attempt %d failed: %s", attempt, err)
        if deadline is not None and time.monotonic() + delay > deadline:
            raise TimeoutError(f"gave up after {attempt} attempts; last error: {err}")
        await asyncio.sleep(delay)  # retry backoff
        delay = min(backoff[1], delay * 2)


async def run(args: argparse.Namespace) -> int:
    if not args.renew:
        issued = await obtain(args, deadline=time.monotonic() + args.timeout, backoff=FETCH_BACKOFF)
        write_credentials(args.out, issued)
        log.info("node-credentials: wrote %s for node %s (valid until %s)", args.out, args.node, issued.not_after.isoformat())
        return 0
    renew_at = current_renew_at(args.out, args.node)
    while True:
        if renew_at is not None:
            wait = max(MIN_RENEW_WAIT, (renew_at - datetime.now(timezone.utc)).total_seconds())
            log.info("node-credentials: next renewal in %.0f s", wait)
            await asyncio.sleep(wait)  # the renewal schedule, not synchronisation
        issued = await obtain(args, deadline=None, backoff=RENEW_BACKOFF)
        write_credentials(args.out, issued)
        log.info("node-credentials: renewed %s (valid until %s)", args.out, issued.not_after.isoformat())
        renew_at = issued.renew_at


def cmd_node_credentials(args: argparse.Namespace) -> int:
    import grpc

    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"error: refused by {args.server}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def register(sub: Any) -> None:
    """Add `node-credentials` (and the node-authentication flags of `serve`)."""
    p = sub.add_parser("node-credentials", help="obtain/renew a ztunnel's node certificate from xdsserver")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="xdsserver's node-credentials listener")
    p.add_argument("--token-file", required=True, type=Path, help="projected service-account token (audience xdsserver)")
    p.add_argument("--node", required=True, help="this node's name (downward API spec.nodeName)")
    p.add_argument("--out", required=True, type=Path, help="directory for cert-chain.pem, key.pem, root-cert.pem")
    p.add_argument("--ca-file", type=Path, help="mesh root certificate that the server certificate must chain to")
    p.add_argument("--server-name", help="name the server certificate must carry (default: host of --server)")
    p.add_argument("--renew", action="store_true", help="keep running; renew at half-life, retrying with backoff")
    p.add_argument("--timeout", type=float, default=60.0, help="one-shot mode: give up after this many seconds")
    p.set_defaults(func=cmd_node_credentials)
    serve = getattr(sub, "choices", {}).get("serve")
    if serve is not None:
        add_serve_arguments(serve)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The node-authentication flags of `serve` (used by xdsserver.nodeauth); flags the parser
    already has are left alone."""
    have = set(parser._option_string_actions)  # noqa: SLF001 (argparse has no public lookup)

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            parser.add_argument(flag, **kw)

    add("--xds-tls-san", action="append", metavar="DNS",
        help=f"DNS name in the xDS server certificate; repeatable (default: {', '.join(DEFAULT_SANS)})")
    add("--node-credentials-address", metavar="HOST:PORT",
        help="TLS listener of the node-credentials service (default: host of --xds-tls-address, next port)")
    add("--ztunnel-service-account", default=DEFAULT_ZTUNNEL_SA, metavar="NS/NAME",
        help=f"ServiceAccount whose pod-bound tokens may obtain node certificates (default {DEFAULT_ZTUNNEL_SA})")
    add("--node-cert-ttl", type=float, default=DEFAULT_NODE_CERT_TTL, metavar="SECONDS",
        help="lifetime of issued node client certificates (default 86400)")
