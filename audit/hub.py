"""Real models in the local Hugging Face cache: find them, never download them.

A registered real name (``sd-1.5``, ``blip-base``, ...) or a hub id (``org/name``) resolves to the snapshot
folder that ``hf download`` left in the cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``). With
no cached snapshot, the error names the repo id and the exact command that fetches it. Nothing here reaches the
network: every lookup passes ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import shlex
from pathlib import Path

from .config import audit_home
from .errors import ModelNotFoundError, UnsafeWeightsError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclasses.dataclass(frozen=True)
class HubSource:
    """A repo on the Hugging Face hub and the files of it that ``audit`` needs.

    ``include`` are the ``hf download --include`` patterns (empty: the whole repo); ``required`` are patterns that
    must match at least one cached file for the snapshot to count as present.
    """

    repo_id: str
    include: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # explicit file names for `hf download REPO FILE...` (instead of --include)

    def fetch_command(self) -> str:
        parts = ["hf", "download", self.repo_id, *self.files]
        if self.include:
            parts += ["--include", *self.include]
        return " ".join(shlex.quote(p) for p in parts)

    def local_path(self) -> Path | None:
        """The cached snapshot folder, or None when the repo is not (completely) cached."""
        return cached_snapshot(self.repo_id, self.required)

    def resolve(self) -> Path:
        path = self.local_path()
        if path is None:
            raise ModelNotFoundError(
                f"{self.repo_id}: not in the local Hugging Face cache ({hub_cache_dir()}) and audit never "
                f"downloads; fetch it with `{self.fetch_command()}`"
            )
        return path

    def describe(self) -> str:
        path = self.local_path()
        return f"cache: {path}" if path is not None else f"not cached: {self.fetch_command()}"


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, required: tuple[str, ...] = ()) -> Path | None:
    """Snapshot folder of ``repo_id`` in the cache, if it holds a file matching every ``required`` pattern."""
    from huggingface_hub import snapshot_download

    try:
        # Read at call time, so HF_HUB_CACHE set after import (tests, users' scripts) is honoured.
        folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache_dir()))
    except Exception as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, a malformed repo id, ...
        log.debug("%s: not cached (%s)", repo_id, exc)
        return None
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    for pattern in required:
        if not any(fnmatch.fnmatch(f, pattern) for f in files):
            log.debug("%s: cached snapshot %s lacks %s", repo_id, folder, pattern)
            return None
    return folder


def is_hub_id(spec: str) -> bool:
    """``org/name`` with no path separators beyond the one slash (what parse_model_ref calls a ``hub`` ref)."""
    org, _, name = spec.partition("/")
    return bool(org) and bool(name) and "/" not in name and not org.startswith((".", "~"))


def check_weights_safe(folder: str | Path, allow_pickle: bool) -> None:
    """Refuse a model folder whose weights exist only as pickles, unless the user passed --allow-pickle.

    Checked per component folder (diffusers pipelines keep one per subfolder), before any loader runs, so the
    error names the file and the flag instead of surfacing as a library's stack trace.
    """
    if allow_pickle:
        return
    folder = Path(folder)
    by_dir: dict[Path, list[Path]] = {}
    for p in folder.rglob("*"):
        if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors"):
            by_dir.setdefault(p.parent, []).append(p)
    for directory, weights in sorted(by_dir.items()):
        if any(w.suffix == ".safetensors" for w in weights):
            continue
        pickles = sorted(w for w in weights if w.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeWeightsError(
                f"{pickles[0]}: only pickle weights here (no .safetensors); loading a pickle can run code, so pass "
                f"--allow-pickle (allow_pickle=True) if you trust the file, or convert it to safetensors"
            )


def audit_cache_dir() -> Path:
    """audit's own cache folder (converted weights): $AUDIT_HOME, else ~/.cache/audit."""
    return audit_home()


def snapshot_of(path: str | Path) -> tuple[str, str, str] | None:
    """(repo id, commit, sub-path) when ``path`` lies in a snapshot of the local hub cache
    (``$HF_HUB_CACHE/models--org--name/snapshots/C``). A folder merely laid out like one elsewhere (an unpacked
    archive, a folder someone sent) is not a snapshot: its name says nothing about its bytes."""
    path = Path(path).absolute()  # not resolve(): snapshot files are symlinks into blobs/
    cache = hub_cache_dir().absolute()
    for root in {cache, cache.resolve()}:
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) >= 3 and parts[0].startswith("models--") and parts[1] == "snapshots":
            return parts[0][len("models--"):].replace("--", "/"), parts[2], "/".join(parts[3:])
    return None


def model_hash(path: str | Path, label: str = "") -> str:
    """Identity hash of a model folder: its hub commit when it is a snapshot in the local hub cache, else its
    weights' bytes (hashed once, then cached by the files' sizes, inodes and times: ``manifest.cached_hash``).

    A commit names immutable content that ``hf download`` checked, and hashing a fully downloaded hub repo (fp16
    variants, .ckpt files, ...) would read tens of gigabytes once per copy of the cache.
    """
    import hashlib

    from .manifest import weights_hash

    snap = snapshot_of(path)
    if snap is None:
        return weights_hash(path)
    repo, commit, sub = snap
    return hashlib.sha256(f"hub:{repo}@{commit}/{sub}:{label}".encode()).hexdigest()[:16]
