"""``python -m bench``: run the benchmarks, print a table against the issue's targets, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xdsserver.pipeline import ephemeral_certs

from . import cluster as bc
from . import translation as tr
from .growth import cpu_split

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The targets (for the large scale; printed at every scale for reference).
TARGETS: dict[str, tuple[str, float, str]] = {
    # key: (label, limit, unit); every target is "measured <= limit"
    "one_node_ms": ("one node's full snapshot (cold: first node)", 250, "ms"),
    "one_node_warm_ms": ("one node's full snapshot (each further node)", 250, "ms"),
    "all_nodes_ms": ("all nodes' snapshots", 10_000, "ms"),
    "endpoint_compute_ms": ("endpoint change -> compute (today's full rebuild)", 10, "ms"),
    "endpoint_compute_incremental_ms": ("endpoint change -> compute (incremental layer)", 10, "ms"),
    "endpoint_ack_p99_ms": ("endpoint change -> all affected ACKed, p99 (today)", 300, "ms"),
    "endpoint_ack_p99_incremental_ms": ("endpoint change -> all affected ACKed, p99 (incremental)", 300, "ms"),
    "rss_per_ztunnel_mb": ("server RSS per connected ztunnel", 1.0, "MB"),
    "bytes_ratio_2022": ("node config bytes / 2022 layout", 0.1, "x"),
    "irrelevant_pushes": ("pushes for a change no node depends on", 0, "pushes"),
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import google.protobuf
    import grpc

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "os": platform.platform(),
        "python": platform.python_version(), "protobuf": google.protobuf.__version__, "grpcio": grpc.__version__,
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run_scale(scale: bc.Scale, *, load: bool, load_m: tuple[int, ...] | None, envoy: bool, log: Any,
              pipelines: tuple[str, ...] | None = None, load_events: tuple[str, ...] | None = None) -> dict[str, Any]:
    certs = ephemeral_certs()
    out: dict[str, Any] = {"scale": scale.name, "shape": {"nodes": scale.nodes, "pods": scale.pods, "services": scale.services, "seed": scale.seed}}
    t0 = time.perf_counter()
    objs = bc.objects_for(scale)
    index = bc.index_of(objs)
    out["model"] = {
        "objects": len(objs), "build_ms": round((time.perf_counter() - t0) * 1000, 1),
        "workloads": len(index.workloads), "targets": len(index.targets),
        "identities": len({w.identity for w in index.workloads}),
    }
    log(f"[{scale.name}] model: {out['model']}")
    node = tr.pick_node(index)
    one = tr.one_node(index, node, certs)
    rs = one.pop("_rs")
    out["one_node"] = one
    log(f"[{scale.name}] one node {node}: {one['total_ms']} ms, {one['bytes']} bytes")
    out["bytes_2022"] = tr.layout_2022(index, node, rs, scale.identity_sample, certs)
    log(f"[{scale.name}] bytes vs 2022: ratio {out['bytes_2022']['ratio']}")
    del rs
    out["all_nodes"] = tr.all_nodes(index, certs)
    log(f"[{scale.name}] all nodes: {out['all_nodes']['total_ms']} ms")
    out["incremental"] = tr.incremental(objs, index, certs, scale.sample_nodes,
                                        one["refcheck_ms"] if scale.sample_nodes == 1 else None)
    for name, ev in out["incremental"]["events"].items():
        log(f"[{scale.name}] incremental {name}: full {ev['full_ms']} ms, incremental {ev['incremental_ms']} ms, "
            f"nodes changed {ev['nodes_changed']}, only affected {ev['only_affected']}")
    if load and scale.run_load:
        from .load import run_load

        out["load"] = {}
        first = True
        for pipeline in pipelines or scale.load_pipelines:
            for m in load_m or scale.load_m:
                out["load"].setdefault(pipeline, {})[str(m)] = asyncio.run(
                    run_load(scale, certs, m, with_envoy=envoy and first, pipeline=pipeline, events=load_events, log=log))
                first = False
    else:
        out["load"] = None
        out["load_skipped"] = (
            "not run at this scale: one ztunnel's config is "
            f"{one['bytes'] / 1e6:.0f} MB and takes {one['total_ms'] / 1000:.0f} s to build; M simulated ztunnels "
            "would need M times that in memory and traffic (see the performance section)"
        ) if not scale.run_load else "disabled (--no-load)"
    out["targets"] = evaluate(out)
    return out


def evaluate(r: dict[str, Any]) -> list[dict[str, Any]]:
    ev = r["incremental"]["events"]
    load = r.get("load") or {}

    def biggest(pipeline: str) -> dict[str, Any] | None:
        runs = load.get(pipeline) or {}
        return runs[str(max(int(k) for k in runs))] if runs else None

    def ack(run: dict[str, Any] | None) -> tuple[float | None, str]:
        if run is None or "endpoint_unready" not in run["events"]:
            return (None, "not run")
        return (run["events"]["endpoint_unready"]["ack_ms_p99"], f"M={run['m']}")

    big_m = biggest("today") or biggest("incremental")
    irrelevant = None
    for pl in ("today", "incremental"):
        run = biggest(pl)
        if run and "irrelevant_namespace" in run["events"]:
            irrelevant = (run["events"]["irrelevant_namespace"]["pushes_per_event"], f"M={run['m']}, {pl}")
            break
    measured: dict[str, tuple[float | None, str]] = {
        "one_node_ms": (r["one_node"]["total_ms"], ""),
        "one_node_warm_ms": (r["one_node"].get("warm_ms"), ""),
        "all_nodes_ms": (r["all_nodes"]["total_ms"], "projected" if r["all_nodes"]["projected"] else ""),
        "endpoint_compute_ms": (ev["endpoint_unready"]["full_ms"], "projected" if r["incremental"]["projected"] else ""),
        "endpoint_compute_incremental_ms": (ev["endpoint_unready"]["incremental_ms"], "projected" if r["incremental"]["projected"] else ""),
        "endpoint_ack_p99_ms": ack(biggest("today")),
        "endpoint_ack_p99_incremental_ms": ack(biggest("incremental")),
        "rss_per_ztunnel_mb": (round(big_m["rss_per_ztunnel_bytes"] / 2**20, 3), f"M={big_m['m']}") if big_m else (None, "not run"),
        "bytes_ratio_2022": (r["bytes_2022"]["ratio"], "projected" if r["bytes_2022"]["projected"] else ""),
        "irrelevant_pushes": irrelevant or (ev["irrelevant_namespace"]["nodes_changed"], "nodes changed (no load run)"),
    }
    rows = []
    for key, (label, limit, unit) in TARGETS.items():
        value, note = measured[key]
        if value is None:
            verdict = "not measured"
        elif value <= limit:
            verdict = "met"
        elif limit == 0:
            verdict = f"missed by {value:g} {unit}"
        else:
            verdict = f"missed by {value - limit:,.4g} {unit} ({value / limit:,.1f}x)"
        rows.append({"key": key, "target": label, "limit": limit, "unit": unit, "measured": value, "note": note, "verdict": verdict})
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n== {r['scale']}: {r['shape']['nodes']} nodes / {r['shape']['pods']} pods / {r['shape']['services']} services "
                     f"({r['model']['workloads']} enrolled workloads, {r['model']['identities']} identities, {r['model']['targets']} service ports)")
        lines.append(f"{'target':<55} {'limit':>10} {'measured':>14}  verdict")
        for row in r["targets"]:
            m = "-" if row["measured"] is None else f"{row['measured']:,}"
            note = f" [{row['note']}]" if row["note"] else ""
            lines.append(f"{row['target']:<55} {row['limit']:>8,} {row['unit']:<2}{m:>13}  {row['verdict']}{note}")
        o = r["one_node"]
        lines.append(f"one node ({o['node']}, {o['local_workloads']} local workloads): build {o['build_ms']} ms, refcheck {o['refcheck_ms']} ms, "
                     f"serialize {o['serialize_ms']} ms; {o['bytes']:,} bytes " +
                     ", ".join(f"{t} {v['count']}/{v['bytes']:,}B" for t, v in o["resources"].items()))
        b = r["bytes_2022"]
        lines.append(f"bytes vs 2022 ({b['identities_local']} of {b['identities_cluster_wide']} identities local): ours {b['ours_bytes']:,}, "
                     f"2022 {b['bytes_2022']:,}, outbound listener alone {b['outbound_listener_bytes']:,}")
        lines.append(f"{'incremental event':<22} {'model ms':>9} {'full ms':>10} {'incr ms':>9} {'nodes chg':>9} {'only affected':>13}  changes (first node)")
        for name, ev in r["incremental"]["events"].items():
            first = next(iter(ev["changes"].values()), {})
            lines.append(f"{name:<22} {ev['model_rebuild_ms']:>9} {ev['full_ms']:>10} {ev['incremental_ms']:>9} {ev['nodes_changed']:>9} "
                         f"{str(ev['only_affected']):>13}  {json.dumps({k: v for k, v in first.items() if k != 'listeners_changed'})}")
        if r.get("load"):
            lines.append(f"{'load: M':<15} {'event':<22} {'streams':>7} {'pushes':>7} {'bytes':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99 later':>9} {'rebuild':>8} {'CPU srv/cli s':>14}  envoy")
            for pl, runs in r["load"].items():
              for m, lr in runs.items():
                for name, ev in lr["events"].items():
                    env = "" if "envoy_same_versions" not in ev else ("same versions" if ev["envoy_same_versions"] else "DIFFERENT")
                    lines.append(f"{pl[:5] + ' ' + m:<15} {name:<22} {ev['affected_streams']:>7} {ev['pushes_per_event']:>7} {ev['bytes_per_event']:>12,} "
                                 f"{ev['ack_ms_p50']:>8} {ev['ack_ms_p99']:>8} {ev['ack_ms_max']:>8} {str(ev.get('ack_ms_p99_later') or '-'):>9} {ev['rebuild_ms_median']:>8} {cpu_split(ev):>14}  {env}")
                lines.append(f"{pl[:5] + ' ' + m:<15} server RSS per connected ztunnel: {lr['rss_per_ztunnel_bytes'] / 2**20:.3f} MB "
                             f"(push->ACK p99 after publish, endpoint change: {lr['events'].get('endpoint_unready', {}).get('push_to_ack_ms_p99', '-')} ms)")
        elif r.get("load_skipped"):
            lines.append(f"load harness: {r['load_skipped']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--scale", choices=["small", "large", "both"], default="small")
    p.add_argument("--json", type=Path, help="write results here (default: bench/results/<scale>.json)")
    p.add_argument("--no-load", action="store_true", help="skip the load harness")
    p.add_argument("--no-envoy", action="store_true", help="no real Envoy beside the simulated ztunnels")
    p.add_argument("--load-m", type=lambda s: tuple(int(x) for x in s.split(",")), help="simulated ztunnel counts, e.g. 10,100")
    p.add_argument("--repeats", type=int, help="repetitions per load event")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--growth", action="store_true",
                   help="only the growth table: the four events at 10, 30 and 100 nodes (bench/results/growth.json)")
    p.add_argument("--growth-sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="with --growth: only these node counts, e.g. 100 (their rows replace those in the JSON)")
    p.add_argument("--smoke", action="store_true",
                   help="CI smoke run of the small scale: 2 nodes translated, M=2, incremental pipeline, 2 events, no Envoy")
    args = p.parse_args(argv)
    import dataclasses
    import logging

    logging.basicConfig(level=logging.WARNING)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.growth:
        from . import growth

        path = args.json or RESULTS / "growth.json"
        if args.growth_sizes:
            g = growth.merge(json.loads(path.read_text()) if path.exists() else None,
                             growth.run(ephemeral_certs(), sizes=args.growth_sizes, log=log), machine())
        else:
            g = growth.run(ephemeral_certs(), log=log)
            g["machine"] = machine()
        path.write_text(json.dumps(g, indent=1, sort_keys=True, default=str) + "\n")
        log(f"wrote {path}")
        print(growth.table(g))
        return 0
    names = ["small", "large"] if args.scale == "both" else [args.scale]
    results = []
    for n in names:
        scale = bc.SCALES[n]
        kw: dict[str, Any] = {}
        if args.smoke:
            scale = dataclasses.replace(scale, sample_nodes=2, load_m=(2,), load_repeats=1)
            kw = {"pipelines": ("incremental",), "load_events": ("endpoint_unready", "irrelevant_namespace")}
        if args.repeats:
            scale = dataclasses.replace(scale, load_repeats=args.repeats)
        r = run_scale(scale, load=not args.no_load, load_m=args.load_m, envoy=not (args.no_envoy or args.smoke), log=log, **kw)
        r["smoke"] = args.smoke
        r["machine"] = machine()
        results.append(r)
        path = args.json if args.json and len(names) == 1 else (args.json.with_name(f"{args.json.stem}-{n}.json") if args.json else RESULTS / f"{n}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=1, sort_keys=True, default=str) + "\n")
        log(f"wrote {path}")
    print(table(results))
    return 0
