"""Where the bundled example input lives (the default of ``serve`` and the lab).

Its own module so the composition root and the lab can find it without importing the CLI
(the CLI is the top of the import graph; nothing below it may import it)."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def bundled_example() -> Path:
    """The bookinfo manifests: packaged in a wheel, ``golden/bookinfo/manifests`` in a checkout."""
    pkg = Path(__file__).resolve().parent / "examples" / "bookinfo"
    return pkg if pkg.is_dir() else repo_root() / "golden" / "bookinfo" / "manifests"
