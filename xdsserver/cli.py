"""Command line: ``xdsserver <command>``. The forms below are a contract other tooling scripts."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .model import Flavor
from .xds.limits import add_limit_arguments

log = logging.getLogger("xdsserver")


from .bundled import bundled_example, repo_root as _repo_root

__all__ = ["main", "bundled_example"]


def _input_errors(exc: Exception) -> int:
    print(f"error: invalid input\n{exc}", file=sys.stderr)
    return 2


def cmd_generate(args: argparse.Namespace) -> int:
    from .dump import dump_json, render
    from .pipeline import build_cluster

    cluster = build_cluster(args.manifests, Flavor(args.flavor), nodes=[args.node])
    if args.node not in cluster.index.node_names:
        print(f"warning: node {args.node!r} is not named by any Node or Pod in {args.manifests}", file=sys.stderr)
    text = dump_json(render(cluster.nodes[args.node]))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain
    from .pipeline import build_cluster

    cluster = build_cluster(args.manifests, Flavor(args.flavor))
    if args.node not in cluster.nodes:
        print(f"error: unknown node {args.node!r}; known: {', '.join(cluster.nodes)}", file=sys.stderr)
        return 2
    try:
        ex = explain(cluster.nodes, args.node, args.src, args.dst)
    except ValueError as exc:
        print(f"error: --src must be an IP and --dst IP:PORT ([v6]:PORT): {exc}", file=sys.stderr)
        return 2
    print(json.dumps(ex.to_dict(), indent=2) if args.json else ex.text())
    return 0


def cmd_golden(args: argparse.Namespace) -> int:
    from . import golden

    root = Path(args.root)
    report = golden.run(root, update=args.update)
    for path, diff in report.changed.items():
        if args.update:
            print(f"updated {path}")
        else:
            sys.stdout.write(diff or f"--- {path}\n")
    for path in report.orphans:
        print(f"orphan golden (no scenario/node produces it): {path}")
    if args.update:
        print(f"golden: {len(report.changed)} updated, {len(report.orphans)} removed, {report.checked} checked")
        return 0
    if report.clean:
        print(f"golden: {report.checked} dumps match")
        return 0
    print(f"golden: {len(report.changed)} differ, {len(report.orphans)} orphaned (run `xdsserver golden --update` and review the diff)")
    return 1


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import XdsTls, render_bootstrap

    tls = None
    if args.xds_tls_dir:
        d = Path(args.xds_tls_dir)
        tls = XdsTls(str(d / "cert-chain.pem"), str(d / "key.pem"), str(d / "root-cert.pem"), server_san=args.xds_server_san)
    try:
        text = render_bootstrap(
            args.node,
            xds_address=args.xds_address,
            xds_uds=args.xds_uds,
            admin_address=args.admin_address,
            delta=args.delta,
            pod_ip=args.pod_ip,
            pod_name=args.pod_name,
            xds_tls=tls,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run_serve

    return run_serve(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdsserver", description="Control plane for Envoy ambient ztunnels")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="print one node's config as an Envoy /config_dump")
    g.add_argument("--manifests", required=True, type=Path)
    g.add_argument("--node", required=True)
    g.add_argument("--flavor", choices=[f.value for f in Flavor], default=Flavor.ENVOY.value)
    g.add_argument("-o", "--output")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("explain", help="walk the generated config for one connection")
    e.add_argument("--manifests", required=True, type=Path)
    e.add_argument("--node", required=True, help="the source pod's node (whose ztunnel captures it)")
    e.add_argument("--src", required=True, help="source pod IP")
    e.add_argument("--dst", required=True, help="destination IP:PORT ([v6]:PORT)")
    e.add_argument("--flavor", choices=[f.value for f in Flavor], default=Flavor.ENVOY.value)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_explain)

    gl = sub.add_parser("golden", help="check or update the golden config dumps")
    mode = gl.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--update", action="store_true")
    gl.add_argument("--root", default=str(_repo_root() / "golden"))
    gl.set_defaults(func=cmd_golden)

    b = sub.add_parser("bootstrap", help="print the ztunnel Envoy bootstrap YAML")
    b.add_argument("--node", required=True)
    addr = b.add_mutually_exclusive_group()
    addr.add_argument("--xds-address", help="HOST:PORT of xdsserver (default 127.0.0.1:15010)")
    addr.add_argument("--xds-uds", help="Unix socket path of xdsserver")
    b.add_argument("--admin-address", default="127.0.0.1:15000")
    b.add_argument("--delta", action="store_true", help="DELTA_GRPC instead of GRPC (state of the world)")
    b.add_argument("--pod-ip")
    b.add_argument("--pod-name")
    b.add_argument("--xds-tls-dir", help="directory with cert-chain.pem, key.pem, root-cert.pem for mTLS to xdsserver")
    b.add_argument("--xds-server-san", help="identity the xdsserver certificate must carry")
    b.add_argument("-o", "--output")
    b.set_defaults(func=cmd_bootstrap)

    s = sub.add_parser("serve", help="run the control plane (ADS gRPC + debug HTTP)")
    s.add_argument("--manifests", type=Path, help="file or directory of manifests (default: bundled bookinfo)")
    s.add_argument("--source", choices=["manifests", "kubernetes"], default="manifests")
    s.add_argument("--kubeconfig")
    saddr = s.add_mutually_exclusive_group()
    saddr.add_argument("--xds-address", help="HOST:PORT for plaintext gRPC (default 127.0.0.1:15010)")
    saddr.add_argument("--xds-uds", help="Unix socket path for plaintext gRPC")
    s.add_argument("--xds-tls-address", help="HOST:PORT for node-authenticated mTLS gRPC")
    s.add_argument("--debug-address", default="127.0.0.1:15014")
    s.add_argument("--delta-only", action="store_true", help="refuse state-of-the-world streams")
    s.add_argument("--flavor", choices=[f.value for f in Flavor], default=Flavor.ENVOY.value)
    s.add_argument("--ca-dir", type=Path, help="persist the CA root and issued certificates here")
    s.add_argument("--ca-secret-dir", type=Path, help="user-supplied root: root-cert.pem and root-key.pem")
    s.add_argument("--mesh-config", type=Path, help="mesh config YAML (trustDomain, clusterDomain, enrollment, ...)")
    s.add_argument("--debounce-quiet", type=float, default=0.1, help="seconds without changes before a push")
    s.add_argument("--debounce-max", type=float, default=10.0, help="maximum seconds a push may be delayed")
    s.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    add_limit_arguments(s)
    s.add_argument("--endpoint-barrier-timeout", type=float, default=None,
                   help="seconds a new endpoint waits for its node's ztunnel to ACK the inbound chain (default 5; 0: no wait)")
    s.set_defaults(func=cmd_serve)

    _register_optional(sub)
    return p


def _register_optional(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Commands owned by other modules register themselves here (lab, redirect, synth)."""
    for mod in ("xdsserver.lab.cli", "xdsserver.synth", "xdsserver.nodecreds", "xdsserver.agent.cli", "xdsserver.agent.uninstall"):
        try:
            m = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        m.register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .sources.objects import InputErrors

    try:
        return int(args.func(args) or 0)
    except InputErrors as exc:
        return _input_errors(exc)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
