"""``xdsserver synth``: deterministic, valid (loads through the strict manifest source), and shaped
as asked (counts, enrolled share, headless share, multi-port services, ztunnel per node)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from xdsserver import synth
from xdsserver.model.index import MeshIndex
from xdsserver.sources.manifests import load_model


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xdsserver", "synth", *args], capture_output=True, text=True, timeout=120)


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    args = ["--nodes", "4", "--pods", "60", "--services", "20"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, "7"), (b, "7"), (c, "8")):
        r = run(*args, "--seed", seed, "-o", str(out))
        assert r.returncode == 0, r.stderr
    assert _bytes(a) == _bytes(b)
    assert sorted(_bytes(a)) == sorted(synth.FILES)
    assert _bytes(a) != _bytes(c)


def test_small_scale_loads_and_has_the_asked_shape(tmp_path: Path) -> None:
    synth.write(synth.Shape(nodes=10, pods=300, services=100, seed=1), tmp_path)
    model = load_model(tmp_path)  # strict: any invalid object raises
    index = MeshIndex(model)
    assert len(model.nodes) == 10 and all(n.internal_ip and n.pod_cidr for n in model.nodes)
    app_pods = [p for p in model.pods if p.namespace != "istio-system"]
    ztunnels = [p for p in model.pods if p.label_map.get("app") == "ztunnel"]
    assert len(app_pods) == 300
    assert sorted(p.node_name for p in ztunnels) == [n.name for n in model.nodes]
    assert len(model.services) == 100
    # every node gets pods, balanced
    per_node = Counter(p.node_name for p in app_pods)
    assert set(per_node) == {n.name for n in model.nodes} and max(per_node.values()) - min(per_node.values()) <= 1
    # namespaces: most enrolled, some not
    ns = [n.name for n in model.namespaces if n.name.startswith("ns-")]
    enrolled = [n for n in ns if index.namespace_enrolled(n)]
    assert 0 < len(enrolled) < len(ns)
    # several service accounts per namespace, pods use more than one per namespace
    sas = Counter(n for n, _ in model.service_accounts)
    assert all(sas[n] >= 3 for n in ns)
    used = Counter((p.namespace, p.service_account) for p in app_pods)
    assert len(used) > len(ns)
    # services: multi-port, a share headless, named targetPorts resolved to container ports
    assert any(len(s.ports) >= 2 for s in model.services)
    headless = [s for s in model.services if s.headless]
    assert 0 < len(headless) < len(model.services) // 3
    assert any(isinstance(p.target_port, str) for s in model.services for p in s.ports)
    # endpoints exist for every service port of a service with pods; readiness mostly true
    eps = [e for _, es in model.endpoints for e in es]
    assert eps and 0.8 < sum(e.ready for e in eps) / len(eps) < 1.0
    assert all(e.port > 0 for e in eps)
    # enrolled workloads: most pods, not all (unenrolled namespaces, opt-outs, ztunnels)
    assert 0.5 * len(app_pods) < len(index.workloads) < len(app_pods)


def test_errors_are_clear(tmp_path: Path) -> None:
    r = run("--nodes", "1", "--pods", "1000", "--services", "1", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "do not fit" in r.stderr
    f = tmp_path / "file"
    f.write_text("")
    r = run("--nodes", "1", "--pods", "1", "--services", "1", "-o", str(f))
    assert r.returncode == 2 and "not a directory" in r.stderr


@pytest.mark.parametrize("shape", [synth.Shape(1, 0, 0), synth.Shape(3, 5, 0), synth.Shape(2, 3, 40)])
def test_edge_shapes_are_valid(tmp_path: Path, shape: synth.Shape) -> None:
    synth.write(shape, tmp_path)
    model = load_model(tmp_path)
    assert len([p for p in model.pods if p.namespace != "istio-system"]) == shape.pods
