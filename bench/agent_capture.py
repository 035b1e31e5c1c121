"""Issue 11: a pod added to the manifests is in its node's ipset and table 100 within 2 s (p99
over 20 additions), through the node agent alone (no ``lab sync``); removal measured too.

``sudo .venv/bin/python -m bench.agent_capture [--prefix agb] [--count 20]`` brings up the
client-server lab, adds (then removes) one enrolled pod at a time by rewriting the manifests, and
polls the node namespace (10 ms) until the agent has applied it. Prints met/missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from xdsserver.agent.kernel import netns_runner, read_ipsets, read_routes
from xdsserver.lab.lab import Lab
from xdsserver.redirect import IPSET_NAME

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "golden" / "client-server" / "manifests"
NODE = "ambient-worker"
TARGET_S = 2.0


def _write(path: Path, docs: list[dict], extra: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs + extra, sort_keys=False))
    tmp.replace(path)


def _until(ok, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not ok():
        if time.monotonic() - start > timeout:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - start


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", default="agb")
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="agent-capture-"))
    shutil.copytree(MANIFESTS, work / "m")
    apps = work / "m" / "apps.yaml"
    docs = [d for d in yaml.safe_load_all(apps.read_text()) if d]
    client = next(d for d in docs if d.get("kind") == "Pod" and d["metadata"]["name"].startswith("client-"))
    lab = Lab(work / "m", prefix=args.prefix)
    add_s: list[float] = []
    del_s: list[float] = []
    try:
        lab.up()
        run = netns_runner(lab.topo.node(NODE).netns)
        for i in range(args.count):
            ip = f"10.244.1.{100 + i}"
            pod = json.loads(json.dumps(client))
            pod["metadata"]["name"], pod["metadata"]["uid"] = f"bench-{i}", f"bench-{i}-uid"
            pod["status"]["podIP"], pod["status"]["podIPs"] = ip, [{"ip": ip}]
            _write(apps, docs, [pod])
            add_s.append(_until(lambda: ip in read_ipsets(run).get(IPSET_NAME, ()) and (ip,) in read_routes(run, 100)))
            _write(apps, docs, [])
            del_s.append(_until(lambda: ip not in read_ipsets(run).get(IPSET_NAME, ()) and (ip,) not in read_routes(run, 100)))
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    for what, xs in (("added pod in ipset + table 100", add_s), ("removed pod out of both", del_s)):
        v = p99(xs)
        print(f"{what}: p99 {v:.3f} s over {len(xs)} (max {max(xs):.3f} s, median {sorted(xs)[len(xs) // 2]:.3f} s) "
              f"target {TARGET_S} s: {'met' if v <= TARGET_S else 'MISSED'}")
    return 0 if max(p99(add_s), p99(del_s)) <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
