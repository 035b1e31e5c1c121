"""Growth table: the same four events at 10, 30 and 100 nodes (pods and services scaled with them).

Each size runs the load harness (:mod:`bench.load`) with the server's real pipeline and one
simulated ztunnel per node (half SotW, half delta), so it shows how compute (the rebuild) and
ACK time grow with cluster size and with the number of nodes a change must reach. The 100-node
row is the issue's scale (100 nodes / 10,000 pods / 1,000 services) and is held to its targets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import cluster as bc
from .load import run_load

SIZES = (10, 30, 100)
# event -> (issue target for "all affected ztunnels ACKed, p99" at 100 nodes, in ms)
ACK_TARGETS_MS = {"endpoint_unready": 300, "pod_added": 500, "service_added": 1000, "irrelevant_namespace": 0}
COLD_ALL_TARGET_MS = 5000
MODEL_TARGET_MS = 5.0
RSS_TARGET_MB = 1.0


def scale_for(nodes: int) -> bc.Scale:
    return bc.Scale(f"growth-{nodes}", nodes, nodes * 100, nodes * 10, load_repeats=3)


def run(certs: Any, sizes: tuple[int, ...] = SIZES, log: Any = print) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for n in sizes:
        t0 = time.perf_counter()
        r = asyncio.run(run_load(scale_for(n), certs, n, with_envoy=False, pipeline="incremental", log=log))
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        rows[str(n)] = r
        log(f"[growth] {n} nodes done in {r['wall_s']} s")
    return {"sizes": list(sizes), "rows": rows, "targets": evaluate(rows)}


def merge(old: dict[str, Any] | None, new: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rows replace ``old``'s of the same size; each row keeps the machine it ran on."""
    rows = dict(old["rows"]) if old else {}
    if old and "machine" in old:
        for r in rows.values():
            r.setdefault("machine", old["machine"])
    for n, r in new["rows"].items():
        rows[n] = {**r, "machine": machine}
    rows = {n: rows[n] for n in sorted(rows, key=int)}
    return {"sizes": [int(n) for n in rows], "rows": rows, "targets": evaluate(rows), "machine": machine}


def evaluate(rows: dict[str, Any]) -> list[dict[str, Any]]:
    big = rows.get("100")
    out = []
    if big is None:
        return out

    def verdict(value: float, limit: float) -> str:
        return "met" if value <= limit else f"missed ({value / limit:.1f}x)" if limit else f"missed by {value:g}"

    for ev, limit in ACK_TARGETS_MS.items():
        e = big["events"].get(ev)
        if e is None:
            continue
        value = e["pushes_per_event"] if limit == 0 else e["ack_ms_p99"]
        label = "pushes for a change no node depends on" if limit == 0 else f"{ev} -> all affected ACKed, p99 (ms)"
        out.append({"target": label, "limit": limit, "measured": value, "verdict": verdict(value, limit)})
    stages = (big["events"].get("endpoint_unready") or {}).get("stage_ms_median")
    if stages is not None:  # rows measured before the stages were recorded have none
        out.append({"target": "model + index work on an endpoint change (ms)", "limit": MODEL_TARGET_MS,
                    "measured": stages["model"], "verdict": verdict(stages["model"], MODEL_TARGET_MS)})
    cold = big["initial_rebuild_ms"]
    out.append({"target": "all 100 nodes' snapshots from cold (ms)", "limit": COLD_ALL_TARGET_MS, "measured": cold,
                "verdict": verdict(cold, COLD_ALL_TARGET_MS)})
    rss = round(big["rss_per_ztunnel_bytes"] / 2**20, 3)
    out.append({"target": "server RSS per connected ztunnel (MB)", "limit": RSS_TARGET_MB, "measured": rss,
                "verdict": verdict(rss, RSS_TARGET_MB)})
    return out


def _later(e: dict[str, Any]) -> str:
    v = e.get("ack_ms_p99_later")  # None for one repeat; absent in rows measured before
    return "-" if v is None else f"{v}"


def cpu_split(e: dict[str, Any]) -> str:
    c = e.get("cpu_s_median")  # rows measured before it was recorded have none
    return f"{c['server']:.2f}/{c['clients']:.2f}" if c else "-"


def table(g: dict[str, Any]) -> str:
    lines = ["\n== growth: the same events at " + ", ".join(f"{n} nodes" for n in g["sizes"]) + " (pods x100, services x10 per node; M = nodes)"]
    lines.append(f"{'nodes':>5} {'event':<22} {'streams':>7} {'pushes':>7} {'bytes':>12} {'rebuild ms':>10} {'model ms':>8} "
                 f"{'ACK p50':>8} {'ACK p99':>8} {'p99 later':>9} {'CPU srv/cli s':>14}")
    for n, r in g["rows"].items():
        for ev, e in r["events"].items():
            model = e.get("stage_ms_median", {}).get("model", "-")
            lines.append(f"{n:>5} {ev:<22} {e['affected_streams']:>7} {e['pushes_per_event']:>7} {e['bytes_per_event']:>12,} "
                         f"{e['rebuild_ms_median']:>10} {model:>8} {e['ack_ms_p50']:>8} {e['ack_ms_p99']:>8} {_later(e):>9} {cpu_split(e):>14}")
        lines.append(f"{n:>5} cold: all nodes {r['initial_rebuild_ms']} ms; server RSS per connected ztunnel "
                     f"{r['rss_per_ztunnel_bytes'] / 2**20:.3f} MB")
    lines.append(f"{'target at 100 nodes':<50} {'limit':>8} {'measured':>10}  verdict")
    for t in g["targets"]:
        lines.append(f"{t['target']:<50} {t['limit']:>8,} {t['measured']:>10,}  {t['verdict']}")
    return "\n".join(lines)
