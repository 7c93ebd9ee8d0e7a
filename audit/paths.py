"""Output paths checked against input paths before anything is written.

A command that writes where it reads loses the input: ``audit scan DIR --out r.jsonl --report r.jsonl`` would
replace the results with HTML, ``audit report r.jsonl --out r.jsonl`` the results with their own report, and an
output named ``metadata.jsonl`` inside the scanned folder its labels. ``check_outputs`` refuses these with a
one-line usage error, before any file is opened for writing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Mapping

from .errors import UsageError

PathLike = str | os.PathLike | None

# Inside a folder that is read, these names are read too: an output there would become an input (or replace one).
_READ_IN_FOLDERS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".txt")
_METADATA = "metadata.jsonl"


def _real(path: Path) -> str:
    return os.path.realpath(path)  # resolves the symlinks of the part that exists, keeps the rest


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same inode."""
    a, b = Path(a), Path(b)
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, PathLike], inputs: Mapping[str, PathLike]) -> None:
    """UsageError when an output is an input, another output, a file an input folder's reading would read
    (an image, a ``.txt`` caption, ``metadata.jsonl``), or an existing special file (a FIFO would block the
    writer). Keys are the options as the user typed them (``--out``), values the paths (None: not given)."""
    outs = [(opt, Path(p)) for opt, p in outputs.items() if p is not None and str(p) != ""]
    ins = [(opt, Path(p)) for opt, p in inputs.items() if p is not None and str(p) != ""]
    for i, (opt, out) in enumerate(outs):
        _check_kind(opt, out)
        for other, path in outs[:i] + ins:
            if same_file(out, path):
                raise UsageError(f"{opt} {out} is also {other}; writing it would replace that file. Give {opt} "
                                 "another path (nothing was written)")
        for other, folder in ins:
            if _read_by_folder(out, folder):
                raise UsageError(f"{opt} {out} is inside {other} {folder}, whose reading would read it; write it "
                                 "somewhere else (nothing was written)")


def _check_kind(opt: str, out: Path) -> None:
    try:
        mode = os.stat(out).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UsageError(f"{opt} {out} exists and is not a regular file or folder; give another path")


def _read_by_folder(out: Path, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    real_out, real_folder = Path(_real(out)), Path(_real(folder))
    if not real_out.is_relative_to(real_folder) or real_out == real_folder:
        return False
    if any(part.startswith(".") for part in real_out.relative_to(real_folder).parts):
        return False  # hidden files and folders are not read
    return real_out.name == _METADATA or real_out.suffix.lower() in _READ_IN_FOLDERS
