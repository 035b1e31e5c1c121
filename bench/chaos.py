"""``python -m bench chaos`` (root): issue 14's chaos run with its numbers — 50 transfers of
50 MB (sha256-checked, paced to span every fault) and ~20 new connections/s while the control
plane is restarted 3x, one ztunnel's xDS stream is cut 10x, a node agent and a ztunnel Envoy
are killed (:mod:`xdsserver.lab.chaos`). Prints the counts; exit 1 if a required one is not 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from xdsserver.lab import chaos
from xdsserver.lab.lab import Lab


def failures(r: chaos.Result) -> list[str]:
    """The issue's required properties that did not hold."""
    checks = {
        "failed or corrupted transfers not through the restarted ztunnel": not r.transfers_failed_safe,
        "failed new connections not through the restarted ztunnel": not r.attempts_failed_safe,
        "transfers spanning every fault": r.transfers_spanning == r.transfers,
        "through the restarted ztunnel, new connections work within 2 s of Ready":
            r.first_ok_after_ready_s is not None and r.first_ok_after_ready_s <= 2.0 and r.attempts_failed_restarted_outside == 0,
        "no listener/cluster count drop": not r.config_drops and r.watch_samples > 0,
        "every ztunnel on the server's versions": not r.stale,
    }
    return [k for k, ok in checks.items() if not ok]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=50)
    ap.add_argument("--mb", type=int, default=50, help="size of each transfer in MiB (default 50)")
    ap.add_argument("--rate", type=float, default=20.0, help="new connections per second (default 20)")
    ap.add_argument("--pace", type=float, default=60.0, help="seconds over which a transfer may read 90%% of its bytes")
    ap.add_argument("--flaps", type=int, default=10)
    ap.add_argument("--prefix", default=os.environ.get("XDS_LAB_PREFIX", "xdschaos"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench chaos needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        lab = Lab(chaos.write_manifests(Path(tmp) / "manifests"), prefix=args.prefix, xds_relay=True,
                  log=lambda m: print(m, file=sys.stderr))
        try:
            lab.up(timeout=120)
            r = chaos.run(lab, transfers=args.transfers, size=args.mb << 20, rate=args.rate, pace_s=args.pace, flaps=args.flaps)
        finally:
            lab.down()
    print("\n".join(r.lines()))
    bad = failures(r)
    for b in bad:
        print(f"FAILED: {b}")
    if r.transfers_failed_safe or r.attempts_failed_safe:
        print("\n".join(["failures:"] + r.transfers_failed_safe + r.attempts_failed_safe))
    return 1 if bad else 0
