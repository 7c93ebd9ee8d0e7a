"""Result files that survive ``kill -9``: a resumable JSONL writer and an atomic JSON writer.

How ``audit scan`` (or any batch command) uses the JSONL writer::

    from audit.report.jsonl import JsonlWriter

    with JsonlWriter(out_path, resume=resume, key="image") as out:   # resume: the --resume flag
        for row in rows:
            if row.id in out:            # finished by an earlier, interrupted run: skip, never duplicate
                continue
            out.write(result_dict)       # one line, flushed and fsynced before write() returns

Guarantees:

- A row is either wholly in the file or not at all. Each line is written with one ``write`` on an ``O_APPEND``
  descriptor and fsynced, so a kill loses at most the row being written, as a torn last line without a newline.
- On resume the torn last line is detected, logged and cut off (truncate to the end of the last complete line);
  its row is then not in ``done`` and is redone. A malformed line *before* the last one is not a kill's trace but
  damage: the writer refuses the file (``ArtifactError``) instead of guessing. Every check runs before the cut:
  a file that is not a results file (a record without the key, a last line that is no JSON record cut short)
  is refused unchanged.
- Without ``resume`` an existing non-empty file is refused (``UsageError``: pass --resume or delete it), so a run
  never silently appends to, or overwrites, an earlier one.
- Values are made JSON-safe on the way out: numpy scalars/arrays become numbers/lists, NaN and infinities
  become null, lone surrogates in strings become U+FFFD (a valid UTF-8 file whatever the input).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import atomic_write_text
from ..errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

MAX_RESULTS_BYTES = 4 * 1024**3  # a results file read back (resume, report) is read whole


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts and that encodes to valid UTF-8."""
    if isinstance(value, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value) if _has_surrogate(value) \
            else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return to_jsonable(os.fspath(value))
    if value is None:
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def dumps_line(record: dict) -> bytes:
    """One JSONL line (with its newline) as UTF-8 bytes."""
    return (json.dumps(to_jsonable(record), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write a JSON document atomically (temporary file + fsync + rename): readers see the old or the new file."""
    atomic_write_text(Path(path), json.dumps(to_jsonable(obj), ensure_ascii=False, allow_nan=False, indent=indent)
                      + "\n")


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], int]:
    """Records of a JSONL file and the byte length of its complete part (a torn last line is left out).

    Raises ArtifactError for a malformed line that is not the last one.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return [], 0
    return _records(path, _read_whole(path))


def _records(path: Path, data: bytes) -> tuple[list[dict], int]:
    records: list[dict] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        record = _parse(line)
        if record is None or nl < 0:
            if end == len(data):  # the last line, cut by a kill: redo its row
                break
            if not line.strip():
                pos = good_end = end
                continue
            raise ArtifactError(f"{path}:{lineno}: malformed line in the middle of the file (not an interrupted "
                                "write): not a results file of this tool, or a damaged one; left unchanged")
        records.append(record)
        pos = good_end = end
    return records, good_end


def check_results(path: str | os.PathLike, data: bytes | None = None,
                  key: str = "id") -> tuple[list[dict], int]:
    """``read_jsonl`` for a file about to be resumed: ArtifactError, with the file left unchanged, unless it is
    a results file of this tool (every record carries ``key``; a last line without its newline is a whole record
    carrying it, or the beginning of a JSON object cut short)."""
    path = Path(path)
    if data is None:
        if not os.path.lexists(path):
            return [], 0
        data = _read_whole(path)
    records, good_end = _records(path, data)
    for i, record in enumerate(records, start=1):
        if key not in record:
            raise ArtifactError(f"{path}:{i}: record has no {key!r} field; not a results file of this tool (left "
                                "unchanged)")
    tail = data[good_end:]
    if tail:
        record = _parse(tail)
        torn = key in record if record is not None else (tail.startswith(b'{"') or b'{"'.startswith(tail))
        if not torn:
            raise ArtifactError(f"{path}: its last line is not a record of this tool cut short; not a results "
                                "file (left unchanged)")
    return records, good_end


def _read_whole(path: Path) -> bytes:
    """The whole file; a FIFO in a results file's place would block the reader, a huge file fill memory."""
    from ..imagefolder import UserFileError, read_user_file

    try:
        return read_user_file(path, None, MAX_RESULTS_BYTES, "a results file")
    except UserFileError as exc:
        raise ArtifactError(str(exc)) from None


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def refuse_existing_results(path: str | os.PathLike, resume: bool = False) -> None:
    """A results file is never overwritten: one with lines in it is only continued, with --resume."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0 and not resume:
        raise UsageError(f"{path}: already exists; pass --resume to continue it, or delete it")


class JsonlWriter:
    """Append-only, resumable JSONL results file, keyed by one field of each record (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, key: str = "id", fsync: bool = True):
        self.path = Path(path)
        self.key = key
        self.fsync = fsync
        self.done: set[str] = set()
        self.n_existing = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        refuse_existing_results(self.path, resume)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _recover(self) -> None:
        data = _read_whole(self.path)
        records, good_end = check_results(self.path, data, self.key)
        size = len(data)
        if good_end < size:
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run; its row is redone",
                        self.path, size - good_end)
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        for record in records:
            self.done.add(str(record[self.key]))
        self.n_existing = len(records)
        log.info("%s: resuming after %d finished rows", self.path, len(self.done))

    def __contains__(self, key: object) -> bool:
        return str(key) in self.done

    def write(self, record: dict) -> None:
        """Append one record and make it durable before returning."""
        if self.key not in record:
            raise ValueError(f"record has no {self.key!r} field")
        k = str(record[self.key])
        if k in self.done:
            raise ValueError(f"{self.path}: {self.key} {k!r} is already written")
        data = dumps_line(record)
        written = os.write(self._fd, data)
        while written < len(data):  # short writes are rare (full disk, signals); finish the line
            written += os.write(self._fd, data[written:])
        if self.fsync:
            os.fsync(self._fd)
        self.done.add(k)

    def write_all(self, records: Iterable[dict]) -> None:
        for record in records:
            self.write(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
