"""Manifest files -> SourceObjects: the embedded default source (no cluster needed).

A path is a YAML/JSON file or a directory of them (recursively, in sorted order). Each file may
hold several documents and ``kind: List`` wrappers. Parse errors name the file and document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..model import MeshConfig, Model
from . import SourceObject
from .objects import InputError, InputErrors, build_model, mesh_from_spec, validate_mesh_spec

try:  # the C loader is ~10x faster; fall back where libyaml is missing
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader

SUFFIXES = (".yaml", ".yml", ".json")


def manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if path.is_file():
        return [path]
    raise InputErrors([InputError(str(path), "path", "", "no such file or directory")])


def signature(path: Path) -> tuple[Any, ...]:
    """A cheap (stat-only) fingerprint of the manifest tree: it changes when a file is added,
    removed, edited in place or swapped (ConfigMap symlinks); ``("missing",)`` for no path."""
    try:
        files = manifest_files(path)
    except InputErrors:
        return ("missing",)
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _file_objects(f: Path) -> list[SourceObject]:
    """The objects of one file; raises :class:`InputErrors` naming the file if it cannot be parsed."""
    try:
        docs = list(yaml.load_all(f.read_text(), Loader=_Loader))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputErrors([InputError(str(f), "file", "", f"cannot parse: {exc}".replace("\n", " "))]) from None
    out: list[SourceObject] = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        origin = f"{f}#{i}" if len(docs) > 1 else str(f)
        if isinstance(doc, dict) and doc.get("kind") == "List":
            for j, item in enumerate(doc.get("items") or [], start=1):
                out.append(SourceObject(f"{origin} items[{j - 1}]", item))
        else:
            out.append(SourceObject(origin, doc))
    return out


class ManifestReader:
    """Reads a manifest path again after a change, re-parsing only the files that changed.

    A file whose (mtime, size, inode) is what it was keeps its very same :class:`SourceObject`
    values, so the model build skips them (see ``ValidationMemo``): an edit to one file costs
    parsing that file, not the directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._files: dict[Path, tuple[tuple[int, int, int], list[SourceObject]]] = {}
        self.parsed = 0  # files parsed so far (for tests and the bench)

    def objects(self) -> list[SourceObject]:
        out: list[SourceObject] = []
        errors: list[InputError] = []
        seen: dict[Path, tuple[tuple[int, int, int], list[SourceObject]]] = {}
        for f in manifest_files(self.path):
            try:
                st = f.stat()
            except OSError as exc:
                errors.append(InputError(str(f), "file", "", f"cannot read: {exc}"))
                continue
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            hit = self._files.get(f)
            if hit is None or hit[0] != sig:
                try:
                    hit = (sig, _file_objects(f))
                except InputErrors as exc:
                    errors.extend(exc.errors)
                    continue
                self.parsed += 1
            seen[f] = hit
            out.extend(hit[1])
        self._files = seen
        if errors:
            raise InputErrors(errors)
        return out


def read_objects(path: Path | str) -> list[SourceObject]:
    """Every object under ``path``; raises :class:`InputErrors` for unparsable files."""
    return ManifestReader(path).objects()


def load_mesh_config(path: Path | str) -> MeshConfig:
    """A standalone mesh config file (the Helm chart's ConfigMap): the MeshConfig ``spec`` fields."""
    path = Path(path)
    try:
        spec = yaml.load(path.read_text(), Loader=_Loader) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputErrors([InputError(str(path), "MeshConfig", "", f"cannot read: {exc}")]) from exc
    if isinstance(spec, dict) and spec.get("kind") == "MeshConfig":
        spec = spec.get("spec") or {}
    errs = validate_mesh_spec(str(path), spec)
    if errs:
        raise InputErrors(errs)
    return mesh_from_spec(spec)


def load_model(path: Path | str, mesh: MeshConfig | None = None) -> Model:
    """Read, validate and build; all-or-nothing (raises :class:`InputErrors`)."""
    return build_model(read_objects(path), mesh, strict=True)
