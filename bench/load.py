"""Load harness: M simulated ztunnels (+ one real Envoy) on one in-process server.

The control plane is the real :class:`xdsserver.app.ControlPlane` with an ADS server that only
adds timestamps (send and ACK per stream and nonce); the clients run in a child process
(:mod:`bench.clients`) so the server's RSS is measured alone. For each event the clock starts when
the debounced rebuild starts (what the issue's "after the debounce" means) and stops at the last
ACK of the last response each affected stream received.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xdsserver.app import ControlPlane
from xdsserver.xds.limits import Limits
from xdsserver.xds.server import AdsServer, start_server

from . import cluster as bc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


class TimedAds(AdsServer):
    """AdsServer recording when each response was sent and ACKed (server clock)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sends: list[tuple[float, int, str, str, int]] = []  # (time, stream, type, nonce, bytes)
        self.acks: dict[tuple[int, str, str], float] = {}

    async def _send(self, conn, resp):  # type: ignore[override]
        async for data in super()._send(conn, resp):
            self.sends.append((self._clock(), conn.id, resp.type_url, resp.nonce, len(data)))
            yield data

    def _account(self, conn, req, outcome) -> None:  # type: ignore[override]
        super()._account(conn, req, outcome)
        if outcome.acked_nonce is not None:
            self.acks[(conn.id, req.type_url, outcome.acked_nonce)] = self._clock()


def _bytes_by_type(sends: list[tuple[float, int, str, str, int]]) -> dict[str, int]:
    """Bytes pushed per resource type (short name), to say what an event's bytes are."""
    out: dict[str, int] = {}
    for _, _, type_url, _, n in sends:
        short = type_url.rsplit(".", 1)[-1]
        out[short] = out.get(short, 0) + n
    return dict(sorted(out.items()))


class FullRebuildControlPlane(ControlPlane):
    """Baseline for comparison: every rebuild translates every node from scratch (the pipeline
    before the incremental layer was wired into :class:`ControlPlane`)."""

    def rebuild(self) -> bool:
        for node in list(self.snaps):
            self.translator.forget(node)
        return super().rebuild()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads: gRPC's too)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def _quiescent(ads: TimedAds, since: float, timeout: float, barrier: Any = None) -> dict[int, float] | None:
    """Stream -> time of the last ACK for responses sent after `since`; None on timeout. With
    `barrier`, also once the endpoints it held back (ordering.py) were released and ACKed: a
    new endpoint has reached the clients only then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last: dict[tuple[int, str], tuple[str, float]] = {}
        for t, sid, typ, nonce, _ in ads.sends:
            if t >= since:
                last[(sid, typ)] = (nonce, t)
        done: dict[int, float] = {}
        ok = True
        for (sid, typ), (nonce, _) in last.items():
            at = ads.acks.get((sid, typ, nonce))
            if at is None:
                ok = False
                break
            done[sid] = max(done.get(sid, 0.0), at)
        pending = any(c.change_pending or not c.queue.empty() for c in ads._conns.values()) or bool(barrier and barrier.pending)
        if ok and not pending:
            seen = len(ads.sends)
            await asyncio.sleep(0.05)  # grace for a push already scheduled; then re-check
            if len(ads.sends) == seen:
                return done
            continue
        await asyncio.sleep(0.01)  # polling period, bounded by the deadline
    return None


def _acked_versions(ads: AdsServer, node: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in ads.sync_status():
        if row["node"] == node and row["mode"] == "sotw":
            out.setdefault(row["type"], set()).add(str(row["acked_version"]))
    return out


async def run_load(scale: bc.Scale, certs: Any, m: int, *, with_envoy: bool, pipeline: str = "today",
                   events: tuple[str, ...] | None = None, log: Any = print) -> dict[str, Any]:
    """``pipeline``: "today" (the full-rebuild baseline: every node translated) or "incremental"
    (the server's :class:`ControlPlane`)."""
    objs = bc.objects_for(scale)
    state = {"objs": objs}
    cls = ControlPlane if pipeline == "incremental" else FullRebuildControlPlane
    feed = bc.ObjectFeed()
    cp = cls(load_objects=lambda: feed(state["objs"]), certs=certs)
    # M simulated ztunnels over the scale's nodes: more than the default streams per node when M
    # exceeds the node count (the small scale's M=100 over 10 nodes was refused by the limit)
    per_node = -(-m // max(1, scale.nodes))
    cp.server = TimedAds(cp.cache, metrics=cp.xds_metrics, limits=Limits(max_streams_per_node=max(Limits().max_streams_per_node, per_node + 1)))
    t0 = time.perf_counter()
    assert cp.rebuild()
    initial_rebuild = time.perf_counter() - t0
    grpc_server = await start_server(cp.server, address="127.0.0.1:0")
    target = f"127.0.0.1:{grpc_server.xds_port}"
    nodes = list(cp.state.index.node_names)
    specs = [f"{nodes[i % len(nodes)]}:{'sotw' if i % 2 == 0 else 'delta'}" for i in range(m)]
    envoy = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-envoy-")
    rss0 = rss_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "bench.clients", target, *specs], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = {"m": m, "pipeline": pipeline, "nodes": len(nodes), "initial_rebuild_ms": round(initial_rebuild * 1000, 1)}
    try:
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 300)
        if line.strip() != "ready":
            raise RuntimeError(f"clients failed: {line!r}")
        await _quiescent(cp.server, 0.0, 60)
        rss1 = rss_bytes()
        result["rss_before_bytes"] = rss0
        result["rss_connected_bytes"] = rss1
        result["rss_per_ztunnel_bytes"] = max(0, rss1 - rss0) // m
        if with_envoy:
            from harness import Envoy

            envoy = Envoy(Path(tmp.name), nodes[0], grpc_server.xds_port)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                vers = _acked_versions(cp.server, nodes[0])
                if len(vers) >= 4 and all(len(v) == 1 and "None" not in v for v in vers.values()):
                    break
                await asyncio.sleep(0.1)  # polling period, bounded
        results: dict[str, Any] = {}
        for name, event in bc.EVENTS.items():
            if events is not None and name not in events:
                continue
            new_objs, what = event(objs, cp.state.index)
            rows = []
            for rep in range(scale.load_repeats):
                for phase, o in (("apply", new_objs), ("revert", objs)):
                    state["objs"] = o
                    start = cp.server._clock()
                    n_sends = len(cp.server.sends)
                    cpu0 = (_cpu_s(), _cpu_s(proc.pid))
                    t0 = time.perf_counter()
                    assert cp.rebuild()
                    rebuild = time.perf_counter() - t0
                    done = await _quiescent(cp.server, start, 60, cp.barrier)
                    cpu = (_cpu_s() - cpu0[0], _cpu_s(proc.pid) - cpu0[1])
                    if done is None:
                        raise RuntimeError(f"{name}: streams did not converge within 60 s")
                    if phase == "apply":
                        sends = cp.server.sends[n_sends:]
                        published = start + rebuild
                        rows.append({"rebuild_s": rebuild, "stages": dict(cp.timings), "path": cp.last_path,
                                     "lat": [t - start for t in done.values()],
                                     "after_publish": [t - published for t in done.values()],
                                     "pushes": len(sends), "bytes": sum(s[4] for s in sends), "streams": len(done),
                                     "by_type": _bytes_by_type(sends), "cpu": cpu})
            lat = [x for r in rows for x in r["lat"]]
            lat_pub = [x for r in rows for x in r["after_publish"]]
            ev = {
                "what": what,
                "repeats": len(rows),
                "rebuild_ms_median": round(statistics.median(r["rebuild_s"] for r in rows) * 1000, 1),
                # ControlPlane.timings: source, model (+ index), translate, deltas, cache; and the path taken
                "stage_ms_median": {k: round(statistics.median(r["stages"].get(k, 0.0) for r in rows) * 1000, 2)
                                    for k in rows[0]["stages"]},
                "path": rows[0]["path"],
                "affected_streams": rows[0]["streams"],
                "pushes_per_event": rows[0]["pushes"],
                "bytes_per_event": rows[0]["bytes"],
                "bytes_by_type": rows[0]["by_type"],
                "ack_ms_p50": round(_pct(lat, 50) * 1000, 1),
                "ack_ms_p99": round(_pct(lat, 99) * 1000, 1),
                "ack_ms_max": round(max(lat) * 1000, 1) if lat else 0.0,
                # the first repeat is the first large push since the clients connected (both
                # processes still growing their heaps: page faults on fresh memory); the later
                # repeats are a running server's steady state
                "ack_ms_p99_first": round(_pct(rows[0]["lat"], 99) * 1000, 1),
                "ack_ms_p99_later": round(_pct([x for r in rows[1:] for x in r["lat"]], 99) * 1000, 1) if len(rows) > 1 else None,
                "push_to_ack_ms_p99": round(_pct(lat_pub, 99) * 1000, 1),
                # CPU spent from the rebuild's start to the last ACK, by the server (rebuild and
                # pushes) and by the simulated ztunnels (receiving, parsing, ACKing), which share
                # this machine's cores; real ztunnels each parse on their own node
                "cpu_s_median": {"server": round(statistics.median(r["cpu"][0] for r in rows), 2),
                                 "clients": round(statistics.median(r["cpu"][1] for r in rows), 2)},
                "cpu_s_first": {"server": round(rows[0]["cpu"][0], 2), "clients": round(rows[0]["cpu"][1], 2)},
            }
            if envoy is not None:
                vers = _acked_versions(cp.server, nodes[0])
                ev["envoy_same_versions"] = all(len(v) == 1 for v in vers.values()) and len(vers) >= 4
            results[name] = ev
            log(f"  load {pipeline} M={m} {name}: {ev['affected_streams']} streams, p99 {ev['ack_ms_p99']} ms, {ev['pushes_per_event']} pushes, "
                f"CPU server {ev['cpu_s_median']['server']} s / clients {ev['cpu_s_median']['clients']} s")
        result["events"] = results
        result["by_type_pushes"] = {f"{t}/{r}": n for (t, r), n in sorted(cp.server.counters.items())}
        if envoy is not None:
            result["envoy"] = {"node": nodes[0], "alive": envoy.proc.alive(), "nacks": len(cp.server.nacks())}
    finally:
        if envoy is not None:
            envoy.stop()
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        await grpc_server.stop(grace=0.5)
        tmp.cleanup()
    return result
