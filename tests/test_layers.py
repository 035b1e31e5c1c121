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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    """A top-level module or sub-package of xdsserver: the unit the one-way rule speaks about."""
    return ".".join(module.split(".")[:2])


def stage_graph() -> dict[str, set[str]]:
    """Stage -> stages it imports, counting every import: module level, inside functions and under
    ``TYPE_CHECKING`` (a type-only import is still a dependency on the other stage's shape)."""
    stages = {_stage(_module_name(p)) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {s: set() for s in stages}
    for path in PKG.rglob("*.py"):
        a = _stage(_module_name(path))
        for mod in imports(path):
            b = _stage(mod)
            if mod.startswith("xdsserver.") and b != a and b in stages:
                graph[a].add(b)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one stage (Tarjan, iterative: bounded by the graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_import_cycle_detector_finds_a_cycle() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_stages() -> None:
    """cli -> app -> debug -> (published state, xds, translate, model): nothing points back up."""
    cycles = import_cycles(stage_graph())
    assert not cycles, f"import cycles between stages: {cycles}"


def test_debug_and_app_do_not_import_what_composes_them() -> None:
    graph = stage_graph()
    assert "xdsserver.app" not in graph["xdsserver.debug"], "debug reads the control plane through debug/source.py"
    assert "xdsserver.cli" not in graph["xdsserver.app"], "the composition root must not import the CLI"
    assert not any("xdsserver.cli" in deps for s, deps in graph.items() if s not in ("xdsserver.__main__",)), \
        "only __main__ imports the CLI"
