"""One node's xDS stream relay: its ztunnel's bootstrap points at ``<state>/xds-<node>.sock``
and this process copies bytes to and from the server's socket, so a test can cut that node's
stream (the Envoy reconnects by itself, nothing restarts) or hold the server's bytes back (the
node's ztunnel receives its config late) without touching the server or the Envoy.

Control: a line protocol on ``<state>/relay-<node>.ctl``: ``cut`` aborts every relayed
connection (answers how many), ``delay S`` holds every server->ztunnel byte S seconds from now
on (0: off; answers ``ok``). The delay is also kept in ``relay-<node>.delay`` so a relay the
supervisor restarts keeps it. Run by the lab as
``python -m xdsserver.lab.relay --listen L --upstream U --control C``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

CHUNK = 1 << 16


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Relay:
    def __init__(self, listen: str, upstream: str, control: str) -> None:
        self.listen, self.upstream, self.control = listen, upstream, control
        self.delay_file = Path(control).with_suffix(".delay")
        self.delay = self._saved_delay()
        self.conns: set[asyncio.Task] = set()

    def _saved_delay(self) -> float:
        try:
            return max(0.0, float(self.delay_file.read_text()))
        except (OSError, ValueError):
            return 0.0

    async def run(self) -> None:
        for path in (self.listen, self.control):
            _unlink(path)
        data = await asyncio.start_unix_server(self._relay, self.listen)
        ctl = await asyncio.start_unix_server(self._control, self.control)
        async with data, ctl:
            await asyncio.gather(data.serve_forever(), ctl.serve_forever())

    async def _relay(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.conns.add(task)
        try:
            up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        except OSError:  # server down (restarting): the Envoy retries
            self.conns.discard(task)
            down_w.transport.abort()
            return
        try:
            await asyncio.gather(self._copy(down_r, up_w, delayed=False), self._copy(up_r, down_w, delayed=True))
        except (OSError, asyncio.CancelledError, asyncio.IncompleteReadError):
            pass
        finally:
            self.conns.discard(task)
            down_w.transport.abort()
            up_w.transport.abort()

    async def _copy(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, delayed: bool) -> None:
        """Copy until EOF; server->ztunnel chunks wait until their arrival time + the delay then."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def writer() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                w.write(chunk)
                await w.drain()
            w.transport.abort()

        out = asyncio.ensure_future(writer())
        try:
            while chunk := await r.read(CHUNK):
                await queue.put((time.monotonic() + (self.delay if delayed else 0.0), chunk))
            await queue.put((0.0, b""))
            await out
        finally:
            out.cancel()

    async def _control(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = (await r.readline()).decode().split()
            if line == ["cut"]:
                cut = list(self.conns)
                for task in cut:
                    task.cancel()
                await asyncio.gather(*cut, return_exceptions=True)
                answer = str(len(cut))
            elif len(line) == 2 and line[0] == "delay":
                self.delay = max(0.0, float(line[1]))
                self.delay_file.write_text(repr(self.delay))
                answer = "ok"
            else:
                answer = f"error: unknown command {line!r}"
            w.write(answer.encode() + b"\n")
            await w.drain()
        except (OSError, ValueError) as exc:
            w.write(f"error: {exc}\n".encode())
        finally:
            w.close()


def command(control: str, line: str, timeout: float = 5.0) -> str:
    """Send one control line to a running relay; its one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            got = s.recv(4096)
            if not got:
                break
            buf += got
    answer = buf.decode().strip()
    if answer.startswith("error"):
        raise RuntimeError(f"relay {control}: {answer}")
    return answer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xdsserver.lab.relay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="unix socket the node's ztunnel connects to")
    ap.add_argument("--upstream", required=True, help="the server's xDS unix socket")
    ap.add_argument("--control", required=True, help="unix socket for cut / delay commands")
    args = ap.parse_args(argv)
    asyncio.run(Relay(args.listen, args.upstream, args.control).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
