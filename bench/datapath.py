"""``python -m bench datapath`` (root): the data path against the plain network, side by side.

One run builds one namespace lab (``bench/manifests/datapath.yaml``: two nodes, an enrolled
namespace ``mesh`` and a plain one, issue 10's layout) and measures plain and mesh paths
*interleaved* in the same run, so that the ratios survive a noisy, shared machine: the latency
loop makes one connection per path per round (rotating the order), iperf3 alternates paths run
by run. Prints every target of issue 10 with met/missed, writes ``bench/results/datapath.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from xdsserver.lab.client import download_close_first
from xdsserver.lab.lab import Lab
from xdsserver.lab.netns import ProcRef, ns_connect, spawn, stop
from xdsserver.lab.podserver import pattern

from . import costs, probes
from .probes import Target

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests" / "datapath.yaml"
RESULTS = HERE / "results"
IPERF_PORT = 5201

# (client pod, server address) of every path; pod keys are namespace/name in the manifests
PATHS: dict[str, tuple[str, str, int]] = {
    "plain_pod": ("plain/pclient", "10.244.2.20", 8080),     # (a) plain pod IP, cross-node
    "plain_vip": ("plain/pclient", "10.96.0.60", 80),        # (b) plain VIP through kube-proxy
    "mesh_pod": ("mesh/client", "10.244.2.10", 8080),        # (c) mesh pod IP, cross-node
    "mesh_vip": ("mesh/client", "10.96.0.50", 80),           # (d) mesh VIP, cross-node backend
    "mesh_local": ("mesh/client", "10.244.1.11", 8080),      # (e) mesh pod IP, same node
}
# which source-ztunnel tunnel cluster (family) carries each mesh path
TUNNEL_FAMILY = {"mesh_pod": "outbound_pod_tunnel_clus", "mesh_vip": "outbound_tunnel_clus", "mesh_local": "outbound_pod_local_tunnel_clus"}
IPERF = {"plain": ("plain/pclient", "plain/pserver", "10.244.2.20"), "mesh": ("mesh/client", "mesh/server", "10.244.2.10")}
SRC_NODE, DST_NODE = "n1", "n2"
_TUNNEL_STAT = re.compile(r"^cluster\.(outbound_(?:pod_(?:local_)?)?tunnel_clus)_(.+)\.(upstream_cx_total|upstream_cx_active|ssl\.handshake)$")


# -- Envoy stats -----------------------------------------------------------------------------
def tunnel_stats(lab: Lab) -> dict[str, dict[str, int]]:
    """Source ztunnel: {tunnel cluster family: {stat: summed over source identities}}."""
    out: dict[str, dict[str, int]] = {}
    for k, v in lab.envoy_stats(SRC_NODE, "tunnel_clus").items():
        m = _TUNNEL_STAT.match(k)
        if m:
            fam = out.setdefault(m.group(1), {})
            fam[m.group(3)] = fam.get(m.group(3), 0) + v
    return out


def hbone_open(lab: Lab) -> dict[str, int]:
    """HBONE connections open now: originated by the source ztunnel, terminated on each node."""
    src = sum(f.get("upstream_cx_active", 0) for f in tunnel_stats(lab).values())
    key = "listener.0.0.0.0_15008.downstream_cx_active"
    return {"source_ztunnel": src, **{f"terminated_{n}": lab.envoy_stats(n, key).get(key, 0) for n in (SRC_NODE, DST_NODE)}}


def poll(pred, timeout: float, step: float = 0.25) -> float | None:
    """Seconds until ``pred()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 2)
        time.sleep(step)
    return None


# -- the run ---------------------------------------------------------------------------------
def mesh_config_doc(idle_s: float, extra: dict[str, Any]) -> str:
    spec = {"hboneIdleTimeout": f"{idle_s:g}s", **extra}
    return yaml.safe_dump({"apiVersion": "xdsserver.io/v1alpha1", "kind": "MeshConfig", "spec": spec}, sort_keys=True)


def targets(lab: Lab) -> dict[str, Target]:
    return {name: Target(name, lab.pod_netns(pod), host, port) for name, (pod, host, port) in PATHS.items()}


def measure(lab: Lab, args: argparse.Namespace, log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ts = targets(lab)

    log(f"latency: {args.connections} sequential connect->request->close per path, interleaved")
    before = tunnel_stats(lab)
    before_term = lab.envoy_stats(DST_NODE, "listener.0.0.0.0_15008.ssl.handshake")
    out["latency"] = probes.latency_interleaved(list(ts.values()), args.connections)
    after = tunnel_stats(lab)
    after_term = lab.envoy_stats(DST_NODE, "listener.0.0.0.0_15008.ssl.handshake")
    per = {}
    for path, fam in TUNNEL_FAMILY.items():
        n = out["latency"][path]["n"] + out["latency"][path]["failures"]
        d = {s: after.get(fam, {}).get(s, 0) - before.get(fam, {}).get(s, 0) for s in ("ssl.handshake", "upstream_cx_total")}
        per[path] = {"client_connections": n, "tls_handshakes": d["ssl.handshake"], "hbone_connections_opened": d["upstream_cx_total"],
                     "tls_handshakes_per_1000": round(d["ssl.handshake"] * 1000 / max(n, 1), 2),
                     "hbone_opened_per_1000": round(d["upstream_cx_total"] * 1000 / max(n, 1), 2)}
    out["hbone"] = {"per_path": per, "destination_handshakes": sum(after_term.values()) - sum(before_term.values())}
    for name, r in out["latency"].items():
        log(f"  {name:<11} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  failures {r['failures']}")
    log(f"  hbone: {json.dumps(per)}")

    log(f"idle HBONE: right after, then after the idle timeout ({args.idle_timeout:g} s) with one connection kept open")
    idle: dict[str, Any] = {"right_after": hbone_open(lab), "idle_timeout_s": args.idle_timeout}
    held = probes.open_many(ts["mesh_pod"], 1, workers=1)[0]
    idle["active_pairs"] = len(held)
    idle["closed_after_s"] = poll(lambda: hbone_open(lab)["source_ztunnel"] <= len(held), args.idle_timeout * 3 + 20)
    idle["after_timeout"] = hbone_open(lab)
    idle["held_connection_still_answers"] = probes.still_answering(held) == 0
    for s in held:
        s.close()
    out["idle"] = idle
    log(f"  {json.dumps(idle)}")

    out["throughput"] = {}
    for flows in (1, 8):
        log(f"throughput: iperf3 {flows} flow(s), {args.iperf_rounds} x {args.iperf_seconds:g} s per path, alternating")
        pairs = {k: (lab.pod_netns(c), ip, IPERF_PORT) for k, (c, _, ip) in IPERF.items()}
        r = probes.throughput_interleaved(pairs, args.iperf_seconds, args.iperf_rounds, flows)
        r["ratio_mesh_plain"] = round(r["mesh"]["median_gbit_s"] / r["plain"]["median_gbit_s"], 3)
        out["throughput"][f"{flows}_flow"] = r
        log(f"  {json.dumps(r)}")

    log(f"{args.concurrent} concurrent open connections client -> server pod IP (through ztunnel {SRC_NODE} and {DST_NODE})")
    pids = {n: lab.procs[f"ztunnel:{n}"].pid for n in (SRC_NODE, DST_NODE)}
    rss0 = {n: probes.rss_bytes(p) for n, p in pids.items()}
    t0 = time.monotonic()
    socks, open_fail = probes.open_many(ts["mesh_pod"], args.concurrent)
    opened_s = round(time.monotonic() - t0, 2)
    rss1 = {n: probes.rss_bytes(p) for n, p in pids.items()}
    key = "listener.0.0.0.0_15001.downstream_cx_active"
    active = lab.envoy_stats(SRC_NODE, key).get(key, 0)
    hb = hbone_open(lab)
    again_fail = probes.still_answering(socks)
    for s in socks:
        s.close()
    out["concurrent"] = {"connections": args.concurrent, "open_failures": open_fail, "second_request_failures": again_fail,
                         "failures": open_fail + again_fail, "open_seconds": opened_s, "capture_listener_active": active,
                         "hbone_open_meanwhile": hb, "rss_before_bytes": rss0, "rss_open_bytes": rss1,
                         "rss_per_connection_bytes": {n: round((rss1[n] - rss0[n]) / max(1, len(socks))) for n in pids}}
    log(f"  {json.dumps(out['concurrent'])}")

    if args.large:
        size = args.large_mib * 2**20
        log(f"large: {args.large} x {args.large_mib} MiB from the mesh VIP (server closes first), one at a time")
        want = hashlib.sha256(pattern(size, "bench")).hexdigest()
        vip = ts["mesh_vip"]
        runs = [download_close_first(vip.netns, vip.host, vip.port, size, "bench") for _ in range(args.large)]
        out["large"] = {"size_bytes": size, "downloads": args.large,
                        "intact": sum(1 for n, h, _ in runs if n == size and h == want),
                        "runs": [{"bytes": n, "sha256_ok": h == want, "end": e} for n, h, e in runs]}
        log(f"  intact {out['large']['intact']} of {args.large}")
    return out


# -- targets ---------------------------------------------------------------------------------
def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's table, each row: (figure, limit, measured, verdict)."""
    lat = r["latency"]
    rows: list[tuple[str, str, float | None, float, str]] = []  # (key, label, measured, limit, how: "le"|"ge")
    if "large" in r:
        rows.append(("vip_large_intact", f"{r['large']['size_bytes'] // 2**20} MiB VIP downloads intact (of {r['large']['downloads']})",
                     r["large"]["intact"], r["large"]["downloads"], "ge"))
    hs = r["hbone"]["per_path"]
    rows.append(("handshakes", f"TLS handshakes per {hs['mesh_pod']['client_connections']:,} sequential connections, one pod pair (pod IP)",
                 hs["mesh_pod"]["tls_handshakes"], 2, "le"))
    for kind, (m, p) in {"pod IP": ("mesh_pod", "plain_pod"), "VIP": ("mesh_vip", "plain_vip")}.items():
        for q, limit in (("p50", 0.5), ("p99", 2.0)):
            a, b = lat[m][f"{q}_ms"], lat[p][f"{q}_ms"]
            rows.append((f"added_{q}_{m}", f"added connection latency over plain, {q} ({kind})",
                         None if a is None or b is None else round(a - b, 3), limit, "le"))
    rows.append(("throughput_ratio_1", "single-flow throughput, mesh / plain", r["throughput"]["1_flow"]["ratio_mesh_plain"], 0.6, "ge"))
    rows.append(("concurrent_failures", f"{r['concurrent']['connections']:,} concurrent connections through one ztunnel: failures",
                 r["concurrent"]["failures"], 0, "le"))
    rows.append(("idle_after_timeout", "idle HBONE connections after the idle timeout (limit: active pairs)",
                 r["idle"]["after_timeout"]["source_ztunnel"], r["idle"]["active_pairs"], "le"))
    out = []
    for key, label, value, limit, how in rows:
        ok = value is not None and (value <= limit if how == "le" else value >= limit)
        verdict = "not measured" if value is None else ("met" if ok else f"missed by {abs(value - limit):.4g}")
        out.append({"key": key, "target": label, "limit": ("<= " if how == "le" else ">= ") + f"{limit:g}", "measured": value, "verdict": verdict})
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"{'target':<82} {'limit':>8} {'measured':>10}  verdict"]
    for row in r["targets"]:
        lines.append(f"{row['target']:<82} {row['limit']:>8} {'-' if row['measured'] is None else row['measured']:>10}  {row['verdict']}")
    lines.append("")
    lines.append(f"{'path':<12} {'p50 ms':>8} {'p99 ms':>8} {'fail':>5}   (connect -> request -> close, {r['config']['connections']} each, interleaved)")
    for name, x in r["latency"].items():
        lines.append(f"{name:<12} {x['p50_ms']:>8} {x['p99_ms']:>8} {x['failures']:>5}")
    for flows, t in r["throughput"].items():
        lines.append(f"iperf3 {flows}: plain {t['plain']['median_gbit_s']} Gbit/s, mesh {t['mesh']['median_gbit_s']} Gbit/s, "
                     f"ratio {t['ratio_mesh_plain']} (runs plain {t['plain']['runs_gbit_s']}, mesh {t['mesh']['runs_gbit_s']})")
    for path, h in r["hbone"]["per_path"].items():
        lines.append(f"{path}: {h['tls_handshakes']} TLS handshakes, {h['hbone_connections_opened']} HBONE connections for {h['client_connections']} client connections")
    c = r["concurrent"]
    lines.append(f"concurrent: {c['connections']} open, failures {c['failures']}, ztunnel RSS "
                 + ", ".join(f"{n} {c['rss_before_bytes'][n] / 2**20:.1f} -> {c['rss_open_bytes'][n] / 2**20:.1f} MiB" for n in c["rss_open_bytes"]))
    i = r["idle"]
    lines.append(f"idle HBONE: right after {i['right_after']}, after {i['idle_timeout_s']:g} s timeout {i['after_timeout']} "
                 f"(closed after {i['closed_after_s']} s; held connection still answers: {i['held_connection_still_answers']})")
    return "\n".join(lines)


def machine_description() -> dict[str, Any]:
    from .run import machine

    m = machine()
    m["envoy"] = shutil.which("envoy") or ""
    return m


def _mesh_value(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench datapath", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=1000, help="sequential connections per latency path")
    p.add_argument("--concurrent", type=int, default=1000, help="concurrent open connections through one ztunnel")
    p.add_argument("--iperf-seconds", type=float, default=5.0)
    p.add_argument("--iperf-rounds", type=int, default=3)
    p.add_argument("--idle-timeout", type=float, default=5.0, help="MeshConfig hboneIdleTimeout for the bench (seconds)")
    p.add_argument("--large", type=int, default=6, help="150 MiB VIP downloads to check (0: skip)")
    p.add_argument("--large-mib", type=int, default=150)
    p.add_argument("--concurrency", type=int, default=1, help="ztunnel Envoy --concurrency")
    p.add_argument("--mesh", action="append", default=[], type=_mesh_value, metavar="KEY=YAML",
                   help="extra MeshConfig spec field for this run (repeatable), e.g. accessLog=edges")
    p.add_argument("--prefix", default=os.environ.get("XDS_LAB_PREFIX", "bench"), help="lab namespace prefix (default $XDS_LAB_PREFIX or bench)")
    p.add_argument("--json", type=Path, help="default: bench/results/datapath.json (datapath-costs.json with --costs)")
    p.add_argument("--costs", nargs="*", choices=sorted(costs.EXPERIMENTS), metavar="EXPERIMENT",
                   help=f"instead of the targets: compare the cost variants of these experiments (none given: all of {', '.join(costs.EXPERIMENTS)})")
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--cost-connections", type=int, default=300, help="sequential connections per path and block")
    p.add_argument("--cost-iperf-seconds", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="smoke run: 50 connections, 100 concurrent, 1 s iperf3, no large downloads")
    args = p.parse_args(argv)
    if args.costs is not None and not args.costs:
        args.costs = list(costs.EXPERIMENTS)
    args.json = args.json or RESULTS / ("datapath-costs.json" if args.costs else "datapath.json")
    if args.quick:
        args.connections, args.concurrent, args.iperf_seconds, args.iperf_rounds, args.large = 50, 100, 1.0, 1, 0
    if os.geteuid() != 0:
        print("python -m bench datapath needs root (network namespaces, iptables, TPROXY)", file=sys.stderr)
        return 2
    if not shutil.which("iperf3"):
        print("python -m bench datapath needs iperf3 (bash scripts/setup-lab installs Debian's)", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM tears the lab down too (finally below)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 1,000 client sockets here, and the pod servers inherit it
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    extra = dict(args.mesh)
    config = {"connections": args.connections, "concurrent": args.concurrent, "iperf_seconds": args.iperf_seconds,
              "iperf_rounds": args.iperf_rounds, "idle_timeout_s": args.idle_timeout, "envoy_concurrency": args.concurrency,
              "mesh_config_extra": extra, "quick": args.quick,
              "method": "plain and mesh paths measured in the same run, interleaved (latency: one connection per path per round, "
                        "rotating order; iperf3: paths alternate run by run, medians); the machine is shared, so single numbers are noisy"}
    with tempfile.TemporaryDirectory(prefix="bench-datapath-") as tmp:
        mdir = Path(tmp) / "manifests"
        mdir.mkdir()
        shutil.copy(MANIFESTS, mdir / "cluster.yaml")
        (mdir / "mesh.yaml").write_text(mesh_config_doc(args.idle_timeout, extra))
        lab = Lab(mdir, prefix=args.prefix, log=log, concurrency=args.concurrency)
        iperf: list[tuple[ProcRef, Any]] = []
        try:
            lab.up(timeout=120)
            nacks = json.loads(lab.xds_debug("/debug/nackz"))
            if nacks:  # a MeshConfig variant Envoy refused would silently measure the previous config
                raise RuntimeError(f"a ztunnel NACKed the bench config: {nacks}")
            for _, server, _ in IPERF.values():
                iperf.append(spawn(f"iperf3:{server}", lab.pod_netns(server), ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                   str(lab.state_dir / f"iperf3-{server.replace('/', '_')}.log")))
            for _, server, _ in IPERF.values():
                if poll(lambda: _listening(lab, server), 10) is None:
                    raise RuntimeError(f"iperf3 server in {server} not listening")
            if args.costs:
                res = {"experiments": costs.run_costs(
                    lab, mdir / "mesh.yaml", lambda more: mesh_config_doc(args.idle_timeout, {**extra, **more}), args.costs,
                    args.cost_rounds, args.cost_connections, args.cost_iperf_seconds, targets(lab),
                    {k: (lab.pod_netns(c), ip, IPERF_PORT) for k, (c, _, ip) in IPERF.items()}, tunnel_stats, (SRC_NODE, DST_NODE), log)}
                config = {"rounds": args.cost_rounds, "connections_per_block": args.cost_connections,
                          "iperf_seconds": args.cost_iperf_seconds, "idle_timeout_s": args.idle_timeout, "method": costs.__doc__.strip()}
            else:
                res = measure(lab, args, log)
        finally:
            for ref, popen in iperf:
                stop(ref, popen)
            lab.down()
    res["config"] = config
    res["machine"] = machine_description()
    if not args.costs:
        res["targets"] = evaluate(res)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    log(f"wrote {args.json}")
    print(costs.costs_table(res["experiments"]) if args.costs else table(res))
    return 0


def _listening(lab: Lab, pod: str) -> bool:
    try:
        ns_connect(lab.pod_netns(pod), "127.0.0.1", IPERF_PORT, timeout=1).close()
        return True
    except OSError:
        return False
