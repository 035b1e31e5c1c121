"""HTTP from inside a lab namespace without spawning processes: the socket is created in the
pod's network namespace (:func:`ns_socket`), so the connection really leaves from that pod."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Callable
from dataclasses import dataclass

from .netns import ns_connect, ns_socket


class NsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float = 10.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.netns = netns

    def connect(self) -> None:
        self.sock = ns_connect(self.netns, self.host, self.port, self.timeout)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request(netns: str, host: str, port: int, path: str = "/", *, method: str = "GET", body: bytes | None = None,
            timeout: float = 10.0) -> Response:
    conn = NsHTTPConnection(netns, host, port, timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def download_sha256(netns: str, host: str, port: int, path: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Stream a body; returns (length, sha256 of what arrived, X-Sha256 the server announced)."""
    conn = NsHTTPConnection(netns, host, port, timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        h, n = hashlib.sha256(), 0
        while chunk := resp.read(1 << 16):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest(), resp.getheader("X-Sha256", "")
    finally:
        conn.close()


def download_close_first(netns: str, host: str, port: int, n: int, seed: str, timeout: float = 120.0,
                         pace: Callable[[int], None] | None = None) -> tuple[int, str, str]:
    """HTTP/1.0 ``GET /bytes/n`` (the server closes first, unlike :func:`download_sha256`):
    (body bytes, sha256 of them, how it ended: ``eof``, ``reset`` or ``error: ...``). ``pace``
    is called with the body bytes so far before every read and may block (a slow reader)."""
    s = ns_socket(netns)
    s.settimeout(timeout)
    h, got, end, head = hashlib.sha256(), 0, "eof", b""
    try:
        s.connect((host, port))
        s.sendall(f"GET /bytes/{n}?seed={seed} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while (pace is None or pace(got) is None) and (c := s.recv(1 << 18)):
            if head is not None:
                head += c
                if b"\r\n\r\n" not in head:
                    continue
                c, head = head.split(b"\r\n\r\n", 1)[1], None
            h.update(c)
            got += len(c)
    except ConnectionResetError:
        end = "reset"
    except OSError as exc:
        end = f"error: {exc}"
    finally:
        s.close()
    return got, h.hexdigest(), end
