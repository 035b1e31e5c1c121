"""Golden config dumps: ``golden/<scenario>/manifests/*.yaml`` -> ``golden/<scenario>/<node>.<flavor>.json``.

Goldens change only through ``xdsserver golden --update`` and are reviewed in the diff; ``--check``
regenerates everything in memory and fails with a unified diff (and on orphans).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from .dump import dump_json, render
from .model import Flavor
from .pipeline import build_cluster


@dataclass
class GoldenReport:
    changed: dict[Path, str] = field(default_factory=dict)  # path -> unified diff
    orphans: list[Path] = field(default_factory=list)
    checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.changed and not self.orphans


def scenarios(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/manifests") if p.is_dir())


def expected_files(scenario: Path) -> dict[Path, str]:
    out: dict[Path, str] = {}
    for flavor in Flavor:
        cluster = build_cluster(scenario / "manifests", flavor)
        for node, res in cluster.nodes.items():
            out[scenario / f"{node}.{flavor.value}.json"] = dump_json(render(res))
    return out


def run(root: Path, *, update: bool) -> GoldenReport:
    report = GoldenReport()
    for sc in scenarios(root):
        want = expected_files(sc)
        for path, text in want.items():
            report.checked += 1
            have = path.read_text() if path.exists() else ""
            if have != text:
                rel = _rel(path)
                report.changed[path] = "".join(
                    difflib.unified_diff(have.splitlines(True), text.splitlines(True), f"a/{rel}", f"b/{rel}", n=3)
                )
                if update:
                    path.write_text(text)
        for path in sorted(sc.glob("*.json")):
            if path not in want:
                report.orphans.append(path)
                if update:
                    path.unlink()
    return report


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
