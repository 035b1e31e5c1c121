"""The one-way data flow, held by a test: source -> model -> translate -> xds, no sideways imports.

``sources``, ``translate``, ``ca`` and ``xds`` do not import one another; ``model`` imports only
the standard library; Envoy *config* messages are built only in ``translate`` (``xds`` sees
discovery messages and bytes); only the Kubernetes source (and node authentication's
TokenReview) talk to the API.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "xdsserver"
SIBLINGS = ("sources", "translate", "ca", "xds")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    rel_pkg = path.relative_to(PKG.parent).with_suffix("").parts
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_pkg[: len(rel_pkg) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                out.add(mod)
                if not node.module:
                    out.update(f"{mod}.{a.name}" for a in node.names)
            elif node.module:
                out.add(node.module)
    return out


def modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


@pytest.mark.parametrize("layer", SIBLINGS)
def test_siblings_do_not_import_each_other(layer: str) -> None:
    bad = []
    for path in modules(layer):
        for mod in imports(path):
            for other in SIBLINGS:
                if other != layer and (mod == f"xdsserver.{other}" or mod.startswith(f"xdsserver.{other}.")):
                    bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_model_imports_only_the_standard_library() -> None:
    bad = []
    for path in modules("model"):
        for mod in imports(path):
            top = mod.split(".")[0]
            if top != "xdsserver" and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
            if mod.startswith("xdsserver.") and not mod.startswith("xdsserver.model"):
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_xds_layer_is_content_blind() -> None:
    # envoy.config.core.v3 holds Node, part of the discovery protocol itself
    bad = [f"{p.relative_to(PKG)} imports {m}" for p in modules("xds") for m in imports(p)
           if m.startswith(("envoy.config.", "envoy.extensions.")) and not m.startswith("envoy.config.core.")]
    assert not bad, "\n".join(bad)


def test_only_the_kube_source_and_node_auth_talk_to_the_api() -> None:
    allowed = {PKG / "sources" / "kube.py", PKG / "nodeauth.py"}
    bad = [f"{p.relative_to(PKG)}" for p in sorted(PKG.rglob("*.py")) if p not in allowed
           and any(m == "kubernetes" or m.startswith("kubernetes.") for m in imports(p))]
    assert not bad, bad


def test_node_agent_uses_the_plan_not_the_xds_side() -> None:
    """The agent is fed by sources/model and the redirect plan; it never reaches into translation,
    the xDS server, the CA, the debug server or the lab (the lab runs it, not the other way)."""
    allowed = ("xdsserver.agent", "xdsserver.redirect", "xdsserver.model", "xdsserver.sources", "xdsserver.cli")
    bad = [f"{p.relative_to(PKG)} imports {m}" for p in modules("agent") for m in imports(p)
           if m.startswith("xdsserver") and not m.startswith(allowed)]
    assert not bad, "\n".join(bad)
