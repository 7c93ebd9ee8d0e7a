"""Artifact manifests: every export folder, feature store and heads folder says what made it and for which target."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from . import SCHEMA_VERSION, __version__
from .config import read_json
from .errors import ArtifactError

log = logging.getLogger(__name__)

# Files whose bytes define a model's identity. Tokenizer/processor files count: they change what the model sees;
# so do the weights of a graph written as ONNX external data (``unet.onnx.data``).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".onnx", ".data", ".json", ".txt", ".model")


def weights_hash(folder: str | Path) -> str:
    """sha256 over the relative paths and bytes of every model file under ``folder`` (sorted, so stable)."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or path.name == "manifest.json":
            continue
        files.append(path)
    return cached_hash("weights", folder, files, lambda: _hash_files(folder, files))[:16]


def _hash_files(folder: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def content_hash(folder: str | Path, exclude: Sequence[str] = ()) -> str:
    """sha256 (64 hex digits) over the relative path and bytes of every file under ``folder`` but hidden ones and
    the top-level names in ``exclude``: what an artifact holds, whatever its metadata says it holds."""
    folder = Path(folder)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel or rel in exclude:
            continue
        files.append(path)
    return cached_hash("content", folder, files, lambda: _hash_files(folder, files))


def hash_cache_dir() -> Path:
    return Path(os.environ.get("AUDIT_HOME") or Path.home() / ".cache" / "audit").expanduser() / "hashes"


def cached_hash(kind: str, folder: Path, files: Sequence[Path], compute: Callable[[], str]) -> str:
    """``compute()``, remembered under ``$AUDIT_HOME/hashes`` by the files' names, sizes, inodes and modification
    and change times: a model or export is read in full once, not on every load. The change time (ctime) cannot be
    set back by a user, so a file edited in place, even with its mtime restored, misses the cache. A cache that
    cannot be read or written is only slower."""
    try:
        stats = [(p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                 for p in files for st in (p.stat(),)]
    except OSError:
        return compute()
    key = hashlib.sha256(json.dumps([kind, stats]).encode()).hexdigest()
    entry = hash_cache_dir() / key[:2] / key
    try:
        value = entry.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    except OSError:
        pass
    value = compute()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{key}.{os.getpid()}")
        tmp.write_text(value + "\n")
        os.replace(tmp, entry)
    except OSError as exc:
        log.debug("cannot cache a hash in %s (%s)", entry, exc)
    return value


def file_sha256(path: str | Path) -> str:
    """SHA-256 of one file, read in 1 MiB blocks (stores, heads, graphs, query images)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
