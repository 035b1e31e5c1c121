"""Data-path probes for ``python -m bench datapath``: each opens real sockets inside lab pod
namespaces (or runs iperf3 there) and returns plain numbers; nothing here knows about targets."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from xdsserver.lab.netns import ns_socket

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


@dataclass(frozen=True)
class Target:
    """One measured path: a client pod's namespace and the address it connects to."""

    name: str
    netns: str
    host: str
    port: int


def _read_response(s: socket.socket) -> int:
    """Read one HTTP/1.1 answer with Content-Length; returns the status (0 on a short read)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        c = s.recv(4096)
        if not c:
            return 0
        buf += c
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:")), 0)
    while len(body) < length:
        c = s.recv(4096)
        if not c:
            return 0
        body += c
    return int(lines[0].split()[1])


def connect_request_close(t: Target, timeout: float = 10.0) -> float | None:
    """Seconds for connect -> one request -> answer -> close (the client closes first), or None
    on any failure. The socket is created in the pod's namespace before the clock starts."""
    s = ns_socket(t.netns)
    s.settimeout(timeout)
    try:
        t0 = time.perf_counter()
        s.connect((t.host, t.port))
        s.sendall(REQUEST)
        ok = _read_response(s) == 200
        s.close()
        return time.perf_counter() - t0 if ok else None
    except OSError:
        return None
    finally:
        s.close()


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sample."""
    ys = sorted(xs)
    k = max(0, min(len(ys) - 1, int(round(p / 100 * len(ys) + 0.5)) - 1))
    return ys[k]


def latency_interleaved(targets: Sequence[Target], n: int, between: Callable[[int], None] | None = None) -> dict[str, dict]:
    """``n`` sequential connections per target, interleaved (one of each per round, the order
    rotating every round) so machine noise hits every path alike. Milliseconds."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    failures = {t.name: 0 for t in targets}
    for i in range(n):
        k = i % len(targets)
        for t in list(targets[k:]) + list(targets[:k]):
            d = connect_request_close(t)
            if d is None:
                failures[t.name] += 1
            else:
                samples[t.name].append(d * 1000)
        if between:
            between(i)
    out = {}
    for name, xs in samples.items():
        out[name] = {"n": len(xs), "failures": failures[name],
                     "p50_ms": round(percentile(xs, 50), 3) if xs else None,
                     "p99_ms": round(percentile(xs, 99), 3) if xs else None,
                     "mean_ms": round(statistics.fmean(xs), 3) if xs else None}
    return out


def iperf3(netns: str, host: str, port: int, seconds: float, parallel: int) -> float:
    """Receiver-side throughput in Gbit/s of one iperf3 run from ``netns``."""
    argv = ["ip", "netns", "exec", netns, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(parallel), "-J"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    try:
        res = json.loads(proc.stdout)
    except ValueError as exc:
        raise RuntimeError(f"iperf3 to {host}:{port} from {netns}: no JSON ({proc.stderr.strip() or proc.stdout[:200]})") from exc
    if "error" in res:
        raise RuntimeError(f"iperf3 to {host}:{port} from {netns}: {res['error']}")
    return res["end"]["sum_received"]["bits_per_second"] / 1e9


def throughput_interleaved(pairs: dict[str, tuple[str, str, int]], seconds: float, rounds: int, parallel: int) -> dict[str, dict]:
    """``rounds`` iperf3 runs per path, alternating paths (and which goes first) round by round."""
    names = sorted(pairs)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(round(iperf3(*pairs[name], seconds, parallel), 3))
    return {n: {"runs_gbit_s": xs, "median_gbit_s": round(statistics.median(xs), 3)} for n, xs in runs.items()}


def open_many(t: Target, n: int, workers: int = 32) -> tuple[list[socket.socket], int]:
    """Open ``n`` connections that each get one answer and stay open (HTTP/1.1 keep-alive).
    Returns (open sockets, failures)."""

    def one(_: int) -> socket.socket | None:
        s = ns_socket(t.netns)
        s.settimeout(30)
        try:
            s.connect((t.host, t.port))
            s.sendall(REQUEST)
            if _read_response(s) == 200:
                return s
        except OSError:
            pass
        s.close()
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        socks = list(pool.map(one, range(n)))
    good = [s for s in socks if s is not None]
    return good, n - len(good)


def still_answering(socks: Sequence[socket.socket], workers: int = 32) -> int:
    """Send a second request on every open connection; returns how many did not answer."""

    def one(s: socket.socket) -> bool:
        try:
            s.sendall(REQUEST)
            return _read_response(s) == 200
        except OSError:
            return False

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(1 for ok in pool.map(one, socks) if not ok)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
