"""``python -m bench datapath --costs``: issue 10's cost choices, each variant measured in the
same lab as the others, in alternating blocks.

Between two variants the bench rewrites the lab's MeshConfig and waits until both ztunnels
ACKed the new config (or restarts the ztunnels for ``--concurrency``). Every block measures the
mesh paths *and* the plain path, so each variant's figure is an overhead over plain taken at
the same moment; variants rotate round by round and the figures are medians over rounds. On a
shared machine the plain path itself moves by tens of percent between blocks; only the
overheads are comparable.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsserver.lab.lab import Lab

from . import probes
from .probes import Target


@dataclass(frozen=True)
class Variant:
    label: str
    mesh: dict[str, Any] = field(default_factory=dict)  # MeshConfig spec fields on top of the bench's
    concurrency: int = 1


MIB = 1 << 20
EXPERIMENTS: dict[str, tuple[Variant, ...]] = {
    "access_log": (Variant("all (every hop)"), Variant("edges", {"accessLog": "edges"})),
    "buffer_limit": (Variant("Envoy default (1 MiB)"), Variant("64 KiB", {"bufferLimitBytes": 64 * 1024}),
                     Variant("4 MiB", {"bufferLimitBytes": 4 * MIB})),
    "h2_windows": (Variant("Envoy default (256 MiB / 256 MiB)"),
                   Variant("16 MiB stream / 64 MiB connection", {"hboneStreamWindowBytes": 16 * MIB, "hboneConnectionWindowBytes": 64 * MIB}),
                   Variant("1 MiB stream / 4 MiB connection", {"hboneStreamWindowBytes": MIB, "hboneConnectionWindowBytes": 4 * MIB})),
    "keepalive": (Variant("60 s"), Variant("off", {"hboneKeepalive": "0s"})),
    "concurrency": (Variant("1 worker", concurrency=1), Variant("2 workers", concurrency=2)),
}


def _versions(lab: Lab) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e["node"], e["type"]): (e.get("sent_version") or "", e.get("acked_version") or "")
            for e in json.loads(lab.xds_debug("/debug/syncz"))}


def _apply_mesh(lab: Lab, mesh_file: Path, text: str, timeout: float = 30.0) -> None:
    """Write the MeshConfig and wait until a new version was sent and every stream ACKed it."""
    before = {k: sent for k, (sent, _) in _versions(lab).items()}
    mesh_file.write_text(text)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _versions(lab)
        if any(sent != before.get(k) for k, (sent, _) in now.items()) and all(sent == acked for sent, acked in now.values()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the ztunnels did not ACK the MeshConfig {text!r} within {timeout:g} s")


class _RssPeak:
    """Peak RSS of the given processes while the block runs (sampled every 100 ms)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.peak, self._stop = pids, {n: 0 for n in pids}, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for n, p in self.pids.items():
                self.peak[n] = max(self.peak[n], probes.rss_bytes(p))

    def __enter__(self) -> _RssPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=2)


def block(lab: Lab, ts: dict[str, Target], iperf_pairs: dict[str, tuple[str, str, int]], n: int, iperf_s: float,
          tunnel_stats, nodes: tuple[str, ...]) -> dict[str, Any]:
    paths = [ts["plain_pod"], ts["mesh_pod"], ts["mesh_vip"]]
    probes.latency_interleaved(paths, 10)  # warm: pools and caches of this variant
    before = tunnel_stats(lab)
    lat = probes.latency_interleaved(paths, n)
    after = tunnel_stats(lab)
    pids = {nd: lab.procs[f"ztunnel:{nd}"].pid for nd in nodes}
    t1 = probes.throughput_interleaved(iperf_pairs, iperf_s, 1, 1)
    with _RssPeak(pids) as rss:
        t8 = probes.throughput_interleaved(iperf_pairs, iperf_s, 1, 8)
    fam = "outbound_pod_tunnel_clus"
    return {
        "added_p50_ms": round(lat["mesh_pod"]["p50_ms"] - lat["plain_pod"]["p50_ms"], 3),
        "added_p99_ms": round(lat["mesh_pod"]["p99_ms"] - lat["plain_pod"]["p99_ms"], 3),
        "added_vip_p50_ms": round(lat["mesh_vip"]["p50_ms"] - lat["plain_pod"]["p50_ms"], 3),
        "mesh_pod_p50_ms": lat["mesh_pod"]["p50_ms"], "plain_pod_p50_ms": lat["plain_pod"]["p50_ms"],
        "failures": sum(x["failures"] for x in lat.values()),
        "handshakes": after.get(fam, {}).get("ssl.handshake", 0) - before.get(fam, {}).get("ssl.handshake", 0),
        "ratio_1_flow": round(t1["mesh"]["median_gbit_s"] / t1["plain"]["median_gbit_s"], 3),
        "mesh_1_flow_gbit_s": t1["mesh"]["median_gbit_s"], "plain_1_flow_gbit_s": t1["plain"]["median_gbit_s"],
        "ratio_8_flows": round(t8["mesh"]["median_gbit_s"] / t8["plain"]["median_gbit_s"], 3),
        "peak_rss_8_flows_mib": {nd: round(v / MIB, 1) for nd, v in rss.peak.items()},
    }


def run_costs(lab: Lab, mesh_file: Path, mesh_doc, experiments: list[str], rounds: int, n: int, iperf_s: float,
              ts: dict[str, Target], iperf_pairs, tunnel_stats, nodes: tuple[str, ...], log) -> dict[str, Any]:
    """``mesh_doc(extra)`` renders the MeshConfig with the bench's own fields plus ``extra``."""
    out: dict[str, Any] = {}
    current = mesh_file.read_text()
    for name in experiments:
        variants = EXPERIMENTS[name]
        blocks: dict[str, list[dict[str, Any]]] = {v.label: [] for v in variants}
        for r in range(rounds):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                if v.concurrency != lab.concurrency:
                    lab.restart_ztunnels(v.concurrency)
                text = mesh_doc(v.mesh)
                if text != current:
                    _apply_mesh(lab, mesh_file, text)
                    current = text
                b = block(lab, ts, iperf_pairs, n, iperf_s, tunnel_stats, nodes)
                blocks[v.label].append(b)
                log(f"  {name} / {v.label} round {r + 1}: {json.dumps(b)}")
        summary = {}
        for v in variants:
            bs = blocks[v.label]
            med = {key: round(statistics.median(b[key] for b in bs), 3)
                   for key in ("added_p50_ms", "added_p99_ms", "added_vip_p50_ms", "ratio_1_flow", "ratio_8_flows", "handshakes")}
            med["peak_rss_8_flows_mib"] = {nd: max(b["peak_rss_8_flows_mib"][nd] for b in bs) for nd in nodes}
            med["failures"] = sum(b["failures"] for b in bs)
            summary[v.label] = {"mesh_config": v.mesh, "concurrency": v.concurrency, "median": med, "blocks": bs}
        out[name] = summary
    if lab.concurrency != 1:
        lab.restart_ztunnels(1)
    return out


def costs_table(res: dict[str, Any]) -> str:
    lines = [f"{'experiment / variant':<52} {'+p50 ms':>8} {'+p99 ms':>8} {'+VIP p50':>8} {'1 flow':>7} {'8 flows':>7} {'hs':>3}  peak RSS MiB (8 flows)"]
    for name, variants in res.items():
        for label, v in variants.items():
            m = v["median"]
            lines.append(f"{name + ' / ' + label:<52} {m['added_p50_ms']:>8} {m['added_p99_ms']:>8} {m['added_vip_p50_ms']:>8} "
                         f"{m['ratio_1_flow']:>7} {m['ratio_8_flows']:>7} {m['handshakes']:>3g}  {m['peak_rss_8_flows_mib']}")
    return "\n".join(lines)
