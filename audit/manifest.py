"""Artifact manifests: every export folder, feature store and heads folder says what made it and for which target."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

from . import SCHEMA_VERSION, __version__
from .config import read_json
from .errors import ArtifactError

# Files whose bytes define a model's identity. Tokenizer/processor files count: they change what the model sees;
# so do the weights of a graph written as ONNX external data (``unet.onnx.data``).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".onnx", ".data", ".json", ".txt", ".model")


def weights_hash(folder: str | Path) -> str:
    """sha256 over the relative paths and bytes of every model file under ``folder`` (sorted, so stable)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or path.name == "manifest.json":
            continue
        h.update(rel.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def make_manifest(kind: str, config: dict[str, Any], target: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "config": config,
        **extra,
    }


def check_manifest(manifest: dict[str, Any], kind: str, where: str, target: dict[str, Any] | None = None) -> None:
    """Refuse an artifact of another kind, another schema, or made for another target (naming both)."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: the manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("target") is not None and not isinstance(manifest["target"], dict):
        raise ArtifactError(f"{where}: the manifest's target is not an object")
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{where}: is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{where}: schema version {manifest.get('schema_version')} is not supported (this audit "
            f"{__version__} reads schema {SCHEMA_VERSION}); recreate it"
        )
    if target is not None and manifest.get("target") is not None:
        made_for = manifest["target"]
        if made_for.get("hash") != target.get("hash"):
            raise ArtifactError(
                f"{where}: was made for target {made_for.get('name')!r} (weights {made_for.get('hash')}), "
                f"not for {target.get('name')!r} (weights {target.get('hash')})"
            )


def read_manifest(path: str | Path) -> dict[str, Any]:
    return read_json(path, missing="manifest not found")
