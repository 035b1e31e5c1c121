"""The lab's kubelet: one process per lab that starts again any recorded process (ztunnel Envoy,
node agent, control plane, pod server) that died, with the same namespace, argv and log, so a
fault is injected by killing a PID and recovery is what a real node would do.

It polls the PIDs recorded in ``<state>/state.json`` (PID + start time, so a reused PID is never
taken for the old process), restarts a dead one with a crash-loop backoff (immediately the first
time; doubling from ``--backoff-min`` up to ``--backoff-max`` while it keeps dying within
``--stable`` seconds of its start), and writes the new PID back under ``<state>/state.lock``, the
lock every writer of the state file takes. It exits when the state file is gone (``lab down``; unreadable for 5 s counts as gone).

Run by ``xdsserver lab up`` as ``python -m xdsserver.lab.supervise --state-dir DIR``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from .netns import LabError, ProcRef, spawn

NAME = "supervisor"  # its own entry in the state file, never restarted by itself
POLL_S = 0.2
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0
STATE_GONE_S = 5.0  # no readable state file for this long: the lab was removed, exit


@contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive lock for read-modify-write of the state file (the lab and its supervisor)."""
    fd = os.open(state_dir / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_state(state_file: Path) -> dict | None:
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None


def write_state(state_file: Path, state: dict) -> None:
    """Atomic: readers without the lock see the old or the new file, never half of one."""
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(state_file)


def recorded(state: dict) -> dict[str, ProcRef]:
    return {k: ProcRef(**v) for k, v in state.get("procs", {}).items()}


def backoff(crashes: int, lo: float, hi: float) -> float:
    """Delay before restart number ``crashes + 1`` of a crash loop: 0, lo, 2*lo, ... capped at hi."""
    return 0.0 if crashes <= 0 else min(hi, lo * 2 ** (crashes - 1))


class Supervisor:
    def __init__(self, state_dir: Path, *, poll_s: float = POLL_S, backoff_min: float = BACKOFF_MIN_S,
                 backoff_max: float = BACKOFF_MAX_S, stable_s: float = STABLE_S) -> None:
        self.state_dir = state_dir
        self.state_file = state_dir / "state.json"
        self.poll_s, self.backoff_min, self.backoff_max, self.stable_s = poll_s, backoff_min, backoff_max, stable_s
        self.children: dict[str, object] = {}  # Popen of what we started: reaped, never left as zombies
        self.started: dict[str, float] = {}  # monotonic time of our last start of each name
        self.crashes: dict[str, int] = {}
        self.due: dict[str, tuple[ProcRef, float]] = {}  # dead ref -> when it may be restarted

    def run(self) -> int:
        missing_since: float | None = None
        while True:
            for popen in self.children.values():
                popen.poll()  # type: ignore[attr-defined]
            state = read_state(self.state_file)
            if state is None:
                missing_since = missing_since or time.monotonic()
                if not self.state_dir.exists() or time.monotonic() - missing_since > STATE_GONE_S:
                    return 0  # the lab is gone
                time.sleep(self.poll_s)
                continue
            missing_since = None
            now = time.monotonic()
            ready = [n for n, ref in recorded(state).items() if n != NAME and ref.argv and not ref.alive()
                     and self._due(n, ref, now) <= now]
            if ready:
                self._restart(ready)
            time.sleep(self.poll_s)

    def _due(self, name: str, ref: ProcRef, now: float) -> float:
        seen = self.due.get(name)
        if seen is not None and seen[0] == ref:
            return seen[1]
        quick = name in self.started and now - self.started[name] < self.stable_s
        self.crashes[name] = self.crashes.get(name, 0) + 1 if quick else 0
        when = now + backoff(self.crashes[name], self.backoff_min, self.backoff_max)
        self.due[name] = (ref, when)
        return when

    def _restart(self, names: list[str]) -> None:
        with state_lock(self.state_dir):
            state = read_state(self.state_file)
            if state is None:
                return
            procs = recorded(state)
            for name in names:
                old = procs.get(name)
                if old is None or old.alive() or self.due.get(name, (None,))[0] != old:
                    continue  # stopped or replaced by the lab meanwhile
                restarts = state.setdefault("restarts", {})
                try:
                    new, popen = spawn(name, old.ns, old.argv, old.log)
                except (LabError, OSError) as exc:
                    self.crashes[name] = self.crashes.get(name, 0) + 1
                    self.due[name] = (old, time.monotonic() + backoff(self.crashes[name], self.backoff_min, self.backoff_max))
                    self._log(name, "restart-failed", old, error=str(exc), crash_loop=self.crashes[name])
                    continue
                self.children[name] = popen
                self.started[name] = time.monotonic()
                self.due.pop(name, None)
                restarts[name] = restarts.get(name, 0) + 1
                state["procs"][name] = asdict(new)
                write_state(self.state_file, state)
                self._log(name, "restarted", old, pid=new.pid, restarts=restarts[name], crash_loop=self.crashes.get(name, 0))

    @staticmethod
    def _log(name: str, event: str, old: ProcRef, **extra: object) -> None:
        print(json.dumps({"event": event, "name": name, "old_pid": old.pid, **extra}, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xdsserver.lab.supervise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between PID checks (default %(default)s)")
    ap.add_argument("--backoff-min", type=float, default=BACKOFF_MIN_S)
    ap.add_argument("--backoff-max", type=float, default=BACKOFF_MAX_S)
    ap.add_argument("--stable", type=float, default=STABLE_S, help="uptime after which a crash loop is forgotten")
    args = ap.parse_args(argv)
    if not (0.01 <= args.poll <= 5):
        ap.error(f"--poll {args.poll}: expected 0.01..5 seconds")
    return Supervisor(args.state_dir, poll_s=args.poll, backoff_min=args.backoff_min, backoff_max=args.backoff_max,
                      stable_s=args.stable).run()


if __name__ == "__main__":
    sys.exit(main())
