"""CI smoke run of the benchmark (small scale, shrunk): it runs from the command line as the README
says, prints the table and writes complete JSON. No thresholds: numbers depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--scale", "small", "--smoke", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "one node's full snapshot" in r.stdout and "node config bytes / 2022 layout" in r.stdout
    res = json.loads(out.read_text())
    assert res["scale"] == "small" and res["shape"] == {"nodes": 10, "pods": 300, "services": 100, "seed": 1}
    assert res["machine"]["cores"] and res["machine"]["python"]
    assert {row["key"] for row in res["targets"]} >= {"one_node_ms", "all_nodes_ms", "bytes_ratio_2022", "irrelevant_pushes"}
    assert all(row["verdict"] for row in res["targets"])
    events = res["incremental"]["events"]
    assert set(events) == {"pod_added", "endpoint_unready", "service_added", "irrelevant_namespace"}
    for name, ev in events.items():
        assert ev["identical_to_full"], name  # the incremental layer gives translate()'s exact bytes
        assert ev["only_affected"], (name, ev["unexplained"])
    assert events["irrelevant_namespace"]["nodes_changed"] == 0
    assert all(set(c.get("changed", {})) == {"EDS"} and not c.get("added") for c in events["endpoint_unready"]["changes"].values())
    assert 0 < res["bytes_2022"]["ours_bytes"] < res["bytes_2022"]["bytes_2022"]
    load = res["load"]["incremental"]["2"]
    assert load["events"]["irrelevant_namespace"]["pushes_per_event"] == 0
    assert load["events"]["endpoint_unready"]["affected_streams"] == 2
    assert load["rss_per_ztunnel_bytes"] > 0
    assert set(load["events"]["endpoint_unready"]["cpu_s_median"]) == {"server", "clients"}  # the CPU split column
