"""Resource limits of the ADS server: what one client may cost, so it cannot hurt the others.

Every limit is a refusal or a shed with a gRPC status naming the limit and its flag, never a
silent drop. Why each exists:

- streams per node: a ztunnel needs one stream (two briefly while it reconnects); a client that
  opens hundreds for one node would multiply that node's pushes.
- streams in total: gRPC's own concurrent-RPC limit per listener (RESOURCE_EXHAUSTED), so even
  streams that never send a first request are bounded.
- names per request, request bytes: a request is parsed and its names kept per stream; a
  100,000-name request is refused before it is applied.
- pending requests: the reader stops reading when this many requests wait, so a client that
  writes faster than it reads is pushed back by HTTP/2 flow control instead of filling memory.
- send timeout: a response whose write has not completed after this long means the client
  stopped reading; the stream is shed (the server forgets it and its slot is free). Changes are
  never queued per stream (a change only marks the stream; the latest snapshot is sent when it
  can write again), so a blocked stream holds at most one response.
- connection age: grpc.aio cannot end a call whose write is blocked, so a shed stream's call is
  closed by gRPC when its connection reaches this age (GOAWAY, then the grace period).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "add_limit_arguments", "limits_from_args"]


@dataclass(frozen=True)
class Limits:
    """Per-listener bounds; `None` disables a time-based one."""

    max_streams_per_node: int = 8
    max_streams: int = 4096
    max_resource_names: int = 50_000
    max_request_bytes: int = 4 * 1024 * 1024
    max_pending_requests: int = 64
    send_timeout: float | None = 30.0
    max_connection_age: float | None = 1800.0
    connection_age_grace: float = 60.0

    def grpc_options(self) -> list[tuple[str, Any]]:
        """gRPC core channel arguments enforcing the transport-level limits."""
        opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", self.max_request_bytes)]
        if self.max_connection_age:
            opts += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.connection_age_grace * 1000)),
            ]
        return opts


# flag -> (field, type, help); the flag names are quoted in the refusals' messages
FLAGS: dict[str, tuple[str, type, str]] = {
    "--xds-max-streams-per-node": ("max_streams_per_node", int, "ADS streams one node may hold open; more are refused"),
    "--xds-max-streams": ("max_streams", int, "ADS streams per listener (gRPC concurrent-RPC limit)"),
    "--xds-max-resource-names": ("max_resource_names", int, "resource names per request and subscribed per type"),
    "--xds-max-request-bytes": ("max_request_bytes", int, "largest DiscoveryRequest accepted"),
    "--xds-max-pending-requests": ("max_pending_requests", int, "requests read ahead per stream before backpressure"),
    "--xds-send-timeout": ("send_timeout", float, "seconds a response write may block before the stream is shed (0: never)"),
    "--xds-max-connection-age": ("max_connection_age", float, "seconds before gRPC closes a connection (GOAWAY; 0: never)"),
    "--xds-connection-age-grace": ("connection_age_grace", float, "seconds streams get to finish after GOAWAY"),
}


def flag_of(field: str) -> str:
    return next(f for f, (name, _, _) in FLAGS.items() if name == field)


def _positive(typ: type):
    def parse(text: str):
        value = typ(text)
        if value < 0 or (typ is int and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'>= 1' if typ is int else '>= 0'}, got {text!r}")
        return value

    parse.__name__ = typ.__name__  # argparse names the type in its error message
    return parse


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    g = parser.add_argument_group("xDS resource limits")
    for flag, (name, typ, text) in FLAGS.items():
        g.add_argument(flag, dest=name, type=_positive(typ), default=None, help=f"{text} (default {getattr(defaults, name)})")


def limits_from_args(args: Any) -> Limits:
    given = {}
    for name, _typ, _ in FLAGS.values():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in ("send_timeout", "max_connection_age") and value <= 0:
            value = None
        given[name] = value
    return Limits(**given)
