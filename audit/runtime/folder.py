"""Reading ``audit export`` folders: the manifest check, export.json, and which component lives where."""

from __future__ import annotations

from pathlib import Path

from ..config import read_json
from ..errors import ArtifactError
from ..manifest import check_manifest, read_manifest

COMPONENTS = ("target", "embedder", "captioner")
EXPORT_FORMAT = 1


class ExportFolder:
    """An export folder: a bundle (target + embedder + captioner) or a single component."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path / "manifest.json")
        check_manifest(self.manifest, "export", str(self.path))
        self.info = read_json(self.path / "export.json", missing="not found; not an `audit export` folder")
        if self.info.get("format") != EXPORT_FORMAT:
            raise ArtifactError(f"{self.path}: export format {self.info.get('format')} is not supported (this audit "
                                f"reads format {EXPORT_FORMAT}); re-export it")
        self.component = self.info.get("component")

    def component_folder(self, which: str) -> "ExportFolder":
        """The folder holding component ``which`` (this one, or the bundle's subfolder)."""
        if self.component == which:
            return self
        if self.component == "bundle":
            entry = self.info.get("components", {}).get(which)
            if entry is None:
                raise ArtifactError(f"{self.path}: this export has no {which}")
            return ExportFolder(self.path / entry["path"])
        raise ArtifactError(f"{self.path}: is an exported {self.component}, not a {which} (or a bundle holding one)")

    @property
    def identity(self) -> dict:
        return dict(self.info["identity"])

    @property
    def settings(self) -> dict:
        return self.info.get("settings", {})

    def graph(self, name: str) -> Path:
        graphs = self.info.get("graphs", {})
        if name not in graphs:
            raise ArtifactError(f"{self.path}: export.json lists no {name} graph")
        return self.path / graphs[name]["file"]

    def per_item_mib(self, name: str) -> float | None:
        """Activations per batch row of graph ``name`` as export measured them; None for older exports."""
        return (self.info.get("graphs", {}).get(name, {}).get("memory") or {}).get("per_item_mib")

    def load_graph(self, name: str, options):
        """Graph ``name`` as a runtime ``Graph``, sized by what export measured of it."""
        from .session import Graph

        return Graph(self.graph(name), options, self.per_item_mib(name))

    def file(self, rel: str) -> Path:
        path = self.path / rel
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
