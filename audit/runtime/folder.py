"""Reading ``audit export`` folders: the manifest check, export.json, and which component lives where.

export.json is checked before use: every path it names (graphs, tokenizer, components) must be a relative path
inside the folder. A component's identity is its source model's (so heads trained on either path work with the
other) only while the folder's content hashes to the ``content_sha256`` that ``audit export`` recorded; a folder
whose graphs or files were changed since, or one that records no hash, is identified by its content instead, so
it does not inherit the heads registered for the model it claims to be.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

from ..config import read_json
from ..errors import ArtifactError
from ..manifest import check_manifest, content_hash, read_manifest

log = logging.getLogger(__name__)

COMPONENTS = ("target", "embedder", "captioner")
EXPORT_FORMAT = 1
# Files of an export folder that describe it rather than make it up: left out of its content hash.
METADATA_FILES = ("export.json", "manifest.json")


def export_content_hash(folder: str | Path) -> str:
    """sha256 of everything an export component folder holds but its metadata (cached: ``manifest.cached_hash``)."""
    return content_hash(folder, METADATA_FILES)


def inside(folder: Path, rel: object, where: str) -> Path:
    """``folder / rel`` for a relative path that stays inside ``folder``; a one-line ArtifactError otherwise."""
    if not isinstance(rel, str) or not rel or "\0" in rel or "\\" in rel or os.path.isabs(rel) \
            or ".." in PurePosixPath(rel).parts:
        raise ArtifactError(f"{folder / 'export.json'}: {where} {str(rel)[:80]!r} is not a relative path inside "
                            "the export folder")
    return folder / rel


class ExportFolder:
    """An export folder: a bundle (target + embedder + captioner) or a single component."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        for name in METADATA_FILES:  # a FIFO or device would block or never end the read
            if (self.path / name).exists() and not (self.path / name).is_file():
                raise ArtifactError(f"{self.path / name}: not a regular file")
        self.manifest = read_manifest(self.path / "manifest.json")
        check_manifest(self.manifest, "export", str(self.path))
        self.info = read_json(self.path / "export.json", missing="not found; not an `audit export` folder")
        if not isinstance(self.info, dict):
            raise ArtifactError(f"{self.path / 'export.json'}: not an `audit export` file (not a JSON object)")
        if self.info.get("format") != EXPORT_FORMAT:
            raise ArtifactError(f"{self.path}: export format {self.info.get('format')} is not supported (this audit "
                                f"reads format {EXPORT_FORMAT}); re-export it")
        self.component = self.info.get("component")
        if self.component not in (*COMPONENTS, "bundle"):
            raise ArtifactError(f"{self.path / 'export.json'}: component {str(self.component)[:40]!r} is not one of "
                                f"{', '.join(COMPONENTS)}, bundle")
        self._check_paths()
        self._identity: dict | None = None

    def _check_paths(self) -> None:
        graphs = self.info.get("graphs", {})
        components = self.info.get("components", {})
        if not isinstance(graphs, dict) or not isinstance(components, dict):
            raise ArtifactError(f"{self.path / 'export.json'}: graphs and components must be objects")
        for name, entry in graphs.items():
            inside(self.path, entry.get("file") if isinstance(entry, dict) else None, f"graph {name}: file")
        for name, entry in components.items():
            inside(self.path, entry.get("path") if isinstance(entry, dict) else None, f"component {name}: path")

    def component_folder(self, which: str) -> "ExportFolder":
        """The folder holding component ``which`` (this one, or the bundle's subfolder)."""
        if self.component == which:
            return self
        if self.component == "bundle":
            entry = self.info.get("components", {}).get(which)
            if entry is None:
                raise ArtifactError(f"{self.path}: this export has no {which}")
            return ExportFolder(inside(self.path, entry.get("path"), f"component {which}: path"))
        raise ArtifactError(f"{self.path}: is an exported {self.component}, not a {which} (or a bundle holding one)")

    @property
    def identity(self) -> dict:
        """The source model's identity while the content is what export wrote; else one from the content."""
        if self.component == "bundle":  # a bundle is its target's
            return self.component_folder("target").identity
        if self._identity is None:
            claimed = self.info.get("identity")
            if not isinstance(claimed, dict) or not all(isinstance(claimed.get(k), str) for k in ("name", "hash")):
                raise ArtifactError(f"{self.path / 'export.json'}: identity must be an object with text name and "
                                    "hash")
            content = export_content_hash(self.path)
            if self.info.get("content_sha256") == content:
                self._identity = {"name": claimed["name"], "hash": claimed["hash"]}
            else:
                why = "its files changed since it was exported" if self.info.get("content_sha256") else \
                    "it records no content hash (exported by an older audit)"
                log.warning("%s: %s; it is identified by its content (%s), not as %s (%s): re-export it to audit it "
                            "as that model", self.path, why, content[:16], claimed["name"], claimed["hash"])
                self._identity = {"name": f"{claimed['name']} (edited export)", "hash": content[:16]}
        return dict(self._identity)

    @property
    def settings(self) -> dict:
        return self.info.get("settings", {})

    def graph(self, name: str) -> Path:
        graphs = self.info.get("graphs", {})
        if name not in graphs:
            raise ArtifactError(f"{self.path}: export.json lists no {name} graph")
        return inside(self.path, graphs[name].get("file"), f"graph {name}: file")

    def per_item_mib(self, name: str) -> float | None:
        """Activations per batch row of graph ``name`` as export measured them; None for older exports."""
        return (self.info.get("graphs", {}).get(name, {}).get("memory") or {}).get("per_item_mib")

    def load_graph(self, name: str, options):
        """Graph ``name`` as a runtime ``Graph``, sized by what export measured of it."""
        from .session import Graph

        return Graph(self.graph(name), options, self.per_item_mib(name))

    def file(self, rel: str) -> Path:
        path = inside(self.path, rel, "file")
        if not path.exists():
            raise ArtifactError(f"{path}: missing from the export folder")
        return path


def bundled_models(path: str | Path) -> tuple[str | None, str | None]:
    """(embedder, captioner) folders exported together with the target at ``path`` (a bundle, or the target
    folder inside one); None where the export holds none."""
    path = Path(path)
    for root in (path, path.parent):
        try:
            folder = ExportFolder(root)
        except ArtifactError:
            continue
        if folder.component == "bundle":
            parts = folder.info.get("components", {})
            return tuple(str(root / parts[k]["path"]) if k in parts else None for k in ("embedder", "captioner"))
    return None, None
