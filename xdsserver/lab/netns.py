"""Network-namespace helpers: run commands in a namespace, open sockets inside one, and end
processes safely (by PID, checked against their start time so a reused PID is never hit).

Every command here names its namespace explicitly (``ip -n NS`` / ``ip netns exec NS``): nothing
is ever added to the namespace the caller runs in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """A lab step failed; the message names the namespace and the command."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run(ns: str | None, argv: Sequence[str], stdin: str | None = None, *, check: bool = True, timeout: float = 30) -> str:
    """Run ``argv`` inside ``ns`` (``ip netns exec``); returns stdout. ``ns=None`` is only for
    read-only queries of the caller's namespace (snapshots) and for ``ip netns add/del``."""
    full = list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]
    proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"[{ns or 'host'}] {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip_batch(ns: str, lines: Sequence[str]) -> None:
    """``ip -n NS -batch -``: many ip commands in one process, stopping at the first error."""
    if not lines:
        return
    proc = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LabError(f"[{ns}] ip -batch failed: {proc.stderr.strip()}\n  commands: {lines}")


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add_netns(ns: str) -> None:
    run(None, ["ip", "netns", "add", ns])
    ip_batch(ns, ["link set lo up"])


def del_netns(ns: str) -> None:
    if ns in list_netns():
        run(None, ["ip", "netns", "del", ns], check=False)


def netns_pids(ns: str) -> list[int]:
    out = run(None, ["ip", "netns", "pids", ns], check=False)
    return sorted(int(x) for x in out.split() if x.isdigit())


def ns_socket(ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created inside ``ns`` (it stays there; connect/bind from any thread).

    A throwaway thread enters the namespace, so the caller's threads never change namespace."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
                try:
                    _setns(target)
                    try:
                        box["sock"] = socket.socket(family, kind)
                    finally:
                        _setns(own)
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["err"] = exc

    t = threading.Thread(target=work, name=f"setns-{ns}")
    t.start()
    t.join()
    if "err" in box:
        raise LabError(f"cannot open a socket in namespace {ns}: {box['err']}")
    return box["sock"]  # type: ignore[return-value]


def ns_connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = ns_socket(ns)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


# -- processes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcRef:
    """A process the lab started: PID plus kernel start time (guards against PID reuse), and
    what it was started with (namespace, argv) so the lab's supervisor can start it again."""

    name: str
    pid: int
    start: int
    log: str
    ns: str = ""
    argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(self.argv))  # JSON gives a list

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start


def proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def spawn(name: str, ns: str, argv: Sequence[str], log_path: str, env: dict[str, str] | None = None) -> tuple[ProcRef, subprocess.Popen]:
    """Start ``argv`` inside ``ns`` in its own session (survives the CLI; Ctrl-C does not reach it)."""
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env, close_fds=True,
        )
    start = None
    deadline = time.monotonic() + 2
    while start is None and time.monotonic() < deadline:
        start = proc_start_time(popen.pid)
        if start is None and popen.poll() is not None:
            break
    if start is None:
        raise LabError(f"[{ns}] {name} exited at once ({popen.poll()}); see {log_path}")
    return ProcRef(name, popen.pid, start, log_path, ns, tuple(argv)), popen


def stop(ref: ProcRef, popen: subprocess.Popen | None = None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; only if PID and start time still match."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if not ref.alive():
            break
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if popen is not None and popen.poll() is not None:
                break
            if not ref.alive():
                break
            time.sleep(0.02)
    if popen is not None:
        try:
            popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
