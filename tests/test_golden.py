"""Goldens: the repo's dumps are current; ``xdsserver golden --check`` fails with a readable diff on
a one-line manifest change; ``--update`` rewrites (and removes orphans) and ``--check`` passes again.

The CLI runs for real, as CI runs it: ``python -m xdsserver`` in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xdsserver import golden
from xdsserver.model import Flavor

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsserver", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_repo_goldens_are_clean() -> None:
    report = golden.run(GOLDEN, update=False)
    assert report.clean, "\n".join(report.changed.values()) + "\n".join(map(str, report.orphans))
    assert report.checked == sum(len(list((GOLDEN / sc.name).glob("*.json"))) for sc in golden.scenarios(GOLDEN))
    assert report.checked >= 12  # 3 scenarios x 2 nodes x 2 flavors


def test_layout_is_what_other_tooling_expects() -> None:
    for sc in ("bookinfo", "sleep-httpbin", "client-server"):
        assert list((GOLDEN / sc / "manifests").glob("*.yaml")), sc
        for node in ("ambient-worker", "ambient-worker2"):
            for flavor in Flavor:
                path = GOLDEN / sc / f"{node}.{flavor.value}.json"
                dump = json.loads(path.read_text())
                rds = ["RoutesConfigDump"] if flavor is Flavor.ENVOY else []  # istio-2022: inline routes
                assert [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]] == [
                    "ClustersConfigDump", "EndpointsConfigDump", "ListenersConfigDump", *rds, "SecretsConfigDump"]


def test_goldens_hold_no_secret_material() -> None:
    for path in GOLDEN.glob("*/*.json"):
        text = path.read_text()
        assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, path
        assert '"[redacted]"' in text, path


@pytest.fixture
def scenario_copy(tmp_path: Path) -> Path:
    """A golden root in tmp_path holding a copy of the client-server scenario."""
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN / "client-server", root / "client-server")
    return root


def test_check_update_cycle_on_one_line_change(scenario_copy: Path) -> None:
    root, tmp = scenario_copy, scenario_copy.parent
    ok = cli("golden", "--check", "--root", str(root), cwd=tmp)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "4 dumps match" in ok.stdout

    # one line: move the server pod to another IP
    apps = root / "client-server" / "manifests" / "apps.yaml"
    text = apps.read_text()
    assert text.count("podIP: 10.244.2.5\n") == 1
    apps.write_text(text.replace("podIP: 10.244.2.5\n", "podIP: 10.244.2.55\n"))
    # (podIPs must follow, or the model keeps the old address: that is the second, matching line)
    apps.write_text(apps.read_text().replace("  - ip: 10.244.2.5\n", "  - ip: 10.244.2.55\n"))

    bad = cli("golden", "--check", "--root", str(root), cwd=tmp)
    assert bad.returncode != 0
    out = bad.stdout
    # a unified diff naming the changed files, with the old and new addresses on -/+ lines
    assert "--- a/golden/client-server/ambient-worker2.envoy.json" in out
    assert "+++ b/golden/client-server/ambient-worker2.envoy.json" in out
    assert "--- a/golden/client-server/ambient-worker.istio-2022.json" in out  # remote nodes see the pod IP too
    assert "@@ " in out
    assert any(line.startswith("-") and "10.244.2.5\"" in line for line in out.splitlines())
    assert any(line.startswith("+") and "10.244.2.55\"" in line for line in out.splitlines())
    assert "4 differ" in out and "golden --update" in out

    upd = cli("golden", "--update", "--root", str(root), cwd=tmp)
    assert upd.returncode == 0, upd.stdout + upd.stderr
    assert "4 updated" in upd.stdout
    assert "10.244.2.55" in (root / "client-server" / "ambient-worker2.envoy.json").read_text()

    again = cli("golden", "--check", "--root", str(root), cwd=tmp)
    assert again.returncode == 0, again.stdout
    # and the originals are untouched
    assert golden.run(GOLDEN, update=False).clean


def test_hand_edited_golden_is_caught(scenario_copy: Path) -> None:
    path = scenario_copy / "client-server" / "ambient-worker.envoy.json"
    path.write_text(path.read_text().replace('"port_value": 15001', '"port_value": 15011', 1))
    report = golden.run(scenario_copy, update=False)
    assert list(report.changed) == [path]
    lines = report.changed[path].splitlines()
    assert any(x.startswith("-") and '"port_value": 15011' in x for x in lines)
    assert any(x.startswith("+") and '"port_value": 15001' in x for x in lines)
    report = golden.run(scenario_copy, update=True)
    assert list(report.changed) == [path]
    assert golden.run(scenario_copy, update=False).clean


def test_orphan_golden_reported_and_removed(scenario_copy: Path) -> None:
    root, tmp = scenario_copy, scenario_copy.parent
    orphan = root / "client-server" / "ambient-worker3.envoy.json"
    orphan.write_text("{}\n")
    bad = cli("golden", "--check", "--root", str(root), cwd=tmp)
    assert bad.returncode != 0
    assert f"orphan golden (no scenario/node produces it): {orphan}" in bad.stdout
    assert "1 orphaned" in bad.stdout
    assert orphan.exists()  # --check never writes

    upd = cli("golden", "--update", "--root", str(root), cwd=tmp)
    assert upd.returncode == 0 and "1 removed" in upd.stdout
    assert not orphan.exists()
    assert cli("golden", "--check", "--root", str(root), cwd=tmp).returncode == 0


def test_missing_golden_is_a_difference(scenario_copy: Path) -> None:
    gone = scenario_copy / "client-server" / "ambient-worker2.istio-2022.json"
    gone.unlink()
    report = golden.run(scenario_copy, update=False)
    assert list(report.changed) == [gone] and not gone.exists()
    golden.run(scenario_copy, update=True)
    assert gone.exists() and golden.run(scenario_copy, update=False).clean


def test_invalid_manifest_fails_check_with_input_error(scenario_copy: Path) -> None:
    apps = scenario_copy / "client-server" / "manifests" / "apps.yaml"
    apps.write_text(apps.read_text().replace("containerPort: 8080", "containerPort: eighty", 1))
    r = cli("golden", "--check", "--root", str(scenario_copy), cwd=scenario_copy.parent)
    assert r.returncode == 2
    assert str(apps) in r.stderr and "containerPort" in r.stderr
