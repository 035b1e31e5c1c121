"""The lab's stand-in application: one process per pod, serving HTTP/1.0 on each declared TCP
container port and answering with the peer address it saw (stdlib only; started inside the
pod's network namespace).

- ``GET /`` (any other path): ``{"pod": ..., "peer": "ip:port", "local": "ip:port"}``
- ``GET /bytes/N?seed=S``: N pseudo-random bytes (``random.Random(S).randbytes(N)``)
- ``POST /sha256``: ``{"sha256": hex, "length": n}`` of the request body

Every request is logged to stdout as ``request pod=... peer=... local=... path=...``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import random
import signal
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 1 << 16
MAX_BYTES = 1 << 30


def pattern(n: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(n)


@functools.lru_cache(maxsize=4)
def body(n: int, seed: str) -> tuple[bytes, str]:
    """``pattern`` and its sha256, made once per pod server: many concurrent large transfers of one
    size must not each spend seconds of the GIL (the chaos run's 50 x 50 MB stalled every other
    request of the pod for longer than the clients' 5 s timeout)."""
    data = pattern(n, seed)
    return data, hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive for 1.1 clients (the client closes first); HTTP/1.0 clients get a
    # server-closes-first connection, which tests the ztunnel's close handling.
    protocol_version = "HTTP/1.1"
    server_version = "xds-lab-pod/1"
    pod = "?"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet default logging
        pass

    def _note(self) -> tuple[str, str]:
        peer = "%s:%d" % self.client_address[:2]
        local = "%s:%d" % self.connection.getsockname()[:2]
        sys.stdout.write(f"request pod={self.pod} peer={peer} local={local} method={self.command} path={self.path}\n")
        sys.stdout.flush()
        return peer, local

    def _json(self, obj: dict) -> None:
        body = (json.dumps(obj, sort_keys=True) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        peer, local = self._note()
        url = urlsplit(self.path)
        if url.path.startswith("/bytes/"):
            try:
                n = int(url.path.rsplit("/", 1)[1])
            except ValueError:
                self.send_error(400, "bad size")
                return
            if not 0 <= n <= MAX_BYTES:
                self.send_error(400, "size out of range")
                return
            query = parse_qs(url.query)
            seed = query.get("seed", ["xds-lab"])[0]
            abort_at = int(query.get("abort", ["-1"])[0])  # send this many body bytes, then RST
            data, digest = body(n, seed)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.send_header("X-Sha256", digest)
            self.end_headers()
            view = memoryview(data)
            end = n if abort_at < 0 else min(abort_at, n)
            for i in range(0, end, CHUNK):
                self.wfile.write(view[i : min(i + CHUNK, end)])
            if abort_at >= 0:  # a forced upstream failure: the peer must see a reset, not a clean end
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            return
        self._json({"pod": self.pod, "peer": peer, "local": local})

    def do_POST(self) -> None:  # noqa: N802
        self._note()
        length = int(self.headers.get("Content-Length") or 0)
        h, left = hashlib.sha256(), length
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        self._json({"pod": self.pod, "sha256": h.hexdigest(), "length": length - left})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pod", required=True, help="namespace/name, echoed in answers")
    p.add_argument("--port", type=int, action="append", required=True)
    args = p.parse_args(argv)
    Handler.pod = args.pod
    servers = [Server(("0.0.0.0", port), Handler) for port in args.port]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    sys.stdout.write(f"listening pod={args.pod} ports={','.join(map(str, args.port))}\n")
    sys.stdout.flush()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    for s in servers:
        s.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
