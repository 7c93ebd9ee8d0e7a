"""Typed configs that round-trip to JSON and are saved beside every artifact they produce."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from .errors import ArtifactError, UsageError

T = TypeVar("T", bound="Config")


@dataclasses.dataclass
class Config:
    """Dataclass base with strict JSON round-tripping (unknown keys are an error, not silently dropped)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ArtifactError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                # Tuples become lists in JSON; restore them so configs compare equal after a round trip.
                if isinstance(value, list) and isinstance(f.default, tuple):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        return cls.from_dict(read_json(path, missing="config file not found"))


DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """``--device``: one of DEVICES (whether CUDA is usable is the runtime's and torch's to say)."""
    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; valid devices are {', '.join(DEVICES)}")
    return device


def audit_home() -> Path:
    """audit's own folder (registered heads, converted weights, logs): $AUDIT_HOME, else ~/.cache/audit."""
    return Path(os.environ.get("AUDIT_HOME") or Path.home() / ".cache" / "audit").expanduser()


def read_json(path: str | os.PathLike, missing: str = "not found", error: type[Exception] = ArtifactError) -> Any:
    """The JSON content of ``path``, or a one-line ``error`` naming the file: ``missing`` when it does not exist
    (say what the file should have been), "not valid JSON (...)" when it cannot be parsed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a sibling folder to build ``out`` in; renamed to ``out`` (an existing empty ``out`` is replaced) when
    the block ends, removed when it raises: an interrupted build never looks like a finished one."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never half of it."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; give results the permissions a plain open() would (0666 less the umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    # Reading the umask means setting it; do it once per call, restoring it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
