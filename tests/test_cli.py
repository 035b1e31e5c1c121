"""``xdsserver generate`` (a contract other tooling scripts): output equals the goldens, errors exit 2
on stderr naming the file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xdsserver import cli
from xdsserver.model import Flavor
from xdsserver.translate import names

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "golden"
CASES = [
    (sc.parent.name, p.name.split(".")[0], Flavor(p.name.split(".")[1]))
    for sc in sorted(GOLDEN.glob("*/manifests"))
    for p in sorted(sc.parent.glob("*.json"))
]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsserver", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(("scenario", "node", "flavor"), CASES, ids=[f"{s}/{n}.{f.value}" for s, n, f in CASES])
def test_generate_equals_golden(capsys: pytest.CaptureFixture[str], scenario: str, node: str, flavor: Flavor) -> None:
    rc = cli.main(["generate", "--manifests", str(GOLDEN / scenario / "manifests"), "--node", node, "--flavor", flavor.value])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == (GOLDEN / scenario / f"{node}.{flavor.value}.json").read_text()


def test_cases_cover_every_golden() -> None:
    assert len(CASES) >= 12 and {f for _, _, f in CASES} == set(Flavor)


def test_generate_default_flavor_and_output_file(tmp_path: Path) -> None:
    manifests = GOLDEN / "bookinfo" / "manifests"
    out = tmp_path / "dump.json"
    r = run("generate", "--manifests", str(manifests), "--node", "ambient-worker2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert out.read_text() == (GOLDEN / "bookinfo" / "ambient-worker2.envoy.json").read_text()  # envoy is the default
    out2 = tmp_path / "dump2.json"
    r = run("generate", "--manifests", str(manifests), "--node", "ambient-worker2", "--flavor", "istio-2022", "--output", str(out2))
    assert r.returncode == 0, r.stderr
    assert out2.read_text() == (GOLDEN / "bookinfo" / "ambient-worker2.istio-2022.json").read_text()


@pytest.mark.skipif(shutil.which("xdsserver") is None, reason="console script not installed")
def test_console_script_as_in_readme() -> None:
    r = subprocess.run(["xdsserver", "generate", "--manifests", str(GOLDEN / "client-server" / "manifests"), "--node", "ambient-worker"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (GOLDEN / "client-server" / "ambient-worker.envoy.json").read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["generate", "--manifests", "x", "--node", "n", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--node", "n"], "required: --manifests"),
        (["generate", "--manifests", "x", "--node", "n", "--flavor", "istio-2023"], "invalid choice: 'istio-2023'"),
        (["golden"], "one of the arguments --check --update is required"),
        (["explain", "--manifests", "x", "--node", "n", "--src", "1.2.3.4"], "required: --dst"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
    ids=["unknown-flag", "missing-manifests", "bad-flavor", "golden-without-mode", "explain-without-dst", "unknown-command"],
)
def test_usage_errors_exit_2(args: list[str], says: str) -> None:
    r = run(*args)
    assert r.returncode == 2
    assert says in r.stderr and r.stdout == ""


def _bad_manifests(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "manifests"
    shutil.copytree(GOLDEN / "client-server" / "manifests", d)
    apps = d / "apps.yaml"
    apps.write_text(apps.read_text().replace("serviceAccountName: server", "serviceAccountName: server\n  hostNetwork: 'yes'", 1))
    return d, apps


def test_invalid_manifests_exit_2_naming_file_object_field(tmp_path: Path) -> None:
    d, apps = _bad_manifests(tmp_path)
    out = tmp_path / "dump.json"
    r = run("generate", "--manifests", str(d), "--node", "ambient-worker", "-o", str(out))
    assert r.returncode == 2
    assert r.stdout == "" and not out.exists()  # nothing written
    assert "error: invalid input" in r.stderr
    assert f"{apps}#" in r.stderr and "Pod ambient/server-f44ffdf6f-dqgm2" in r.stderr and "spec.hostNetwork" in r.stderr
    assert "Traceback" not in r.stderr


def test_unparsable_manifest_exit_2_naming_file(tmp_path: Path) -> None:
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "broken.yaml").write_text("kind: Pod\nmetadata: {name: [x\n")
    r = run("generate", "--manifests", str(d), "--node", "n1")
    assert r.returncode == 2
    assert str(d / "broken.yaml") in r.stderr and "cannot parse" in r.stderr and "Traceback" not in r.stderr


def test_missing_manifests_path_exit_2(tmp_path: Path) -> None:
    r = run("generate", "--manifests", str(tmp_path / "nope"), "--node", "n1")
    assert r.returncode == 2 and str(tmp_path / "nope") in r.stderr and "Traceback" not in r.stderr


def test_unknown_node_warns_and_emits_an_empty_node(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["generate", "--manifests", str(GOLDEN / "bookinfo" / "manifests"), "--node", "ambient-worker9"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "warning: node 'ambient-worker9' is not named by any Node or Pod" in err
    assert "outbound_tunnel_lis" not in out and names.OUTBOUND_DISPATCH not in out and names.OUTBOUND_POD not in out
    assert '"ROOTCA"' in out
