"""Reading query data: Hugging Face ImageFolder folders and single images, defensively.

Data from people we do not know is read in two stages, and neither stage raises on one bad file:

1. ``read_imagefolder(folder)`` lists the rows (images on disk plus names in ``metadata.jsonl``) and resolves
   captions and labels, without decoding any image.
2. ``load_row_image(row)`` decodes one row's image when it is needed; a failure marks that row.

Every row ends with a status; ``error`` is a one-line message naming the file (and the metadata line) whenever the
status is not ``ok``. Statuses:

``ok``             the row can be scored
``unreadable``     not an image, corrupt or truncated data, permission denied, a directory, a bad file name
``too_large``      width x height above the pixel limit; refused from the header, before decoding
``missing``        listed in metadata.jsonl but not on disk (or a broken symlink)
``outside_folder`` a symlink or a file_name that leads outside the folder
``bad_metadata``   a metadata.jsonl line that is not JSON / not UTF-8 / lacks file_name / has a bad field
``duplicate``      a file listed more than once in metadata.jsonl with different values
``bad_caption``    a .txt caption that is not UTF-8 or is too large
``no_caption``     no caption, where one is required (``require_caption=True``)

Hidden files and folders (names starting with ``.``) are skipped, as the Hugging Face ImageFolder loader does.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import struct
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64 * 1024 * 1024  # refuse larger images from their header, before decoding them
MAX_CAPTION_CHARS = 2000  # longer captions are truncated (CLIP reads 77 tokens anyway), with a warning
MAX_CAPTION_FILE_BYTES = 1 << 20  # a .txt caption larger than this is refused rather than read into memory
METADATA = "metadata.jsonl"

STATUSES = ("ok", "unreadable", "too_large", "missing", "outside_folder", "bad_metadata", "duplicate",
            "bad_caption", "no_caption", "generation_refused")


@dataclasses.dataclass
class Row:
    id: str  # file name relative to the folder: the key in feature stores and results
    path: str
    caption: str | None = None
    member: bool | None = None
    caption_source: str | None = None  # "metadata", "txt", "argument", or "captioner"
    status: str = "ok"
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, status: str, error: str) -> "Row":
        if status not in STATUSES:
            raise ValueError(f"unknown row status {status!r}; valid statuses are {', '.join(STATUSES)}")
        # Keep the first failure: it is the root cause (a later stage may only see its consequence).
        if self.ok:
            self.status, self.error = status, _one_line(error)
        return self


class CaptionError(InputError):
    """A caption file that cannot be used (row status ``bad_caption``)."""


class ImageError(InputError):
    """An image that cannot be used; ``status`` is the row status it maps to (``unreadable`` or ``too_large``)."""

    def __init__(self, message: str, status: str = "unreadable"):
        super().__init__(_one_line(message))
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------- captions

def clean_caption(text: object, where: str) -> tuple[str | None, list[str]]:
    """Normalise a caption; returns (caption or None when empty, warnings).

    Whitespace runs become one space; control characters and lone surrogates (which JSON escapes allow but UTF-8
    files cannot hold) are dropped; the text is NFC-normalised and truncated to ``MAX_CAPTION_CHARS``. The result
    is stable: cleaning a cleaned caption returns it unchanged.
    """
    if text is None:
        return None, []
    if not isinstance(text, str):
        raise InputError(f"{where}: caption must be a string, got {type(text).__name__}")
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text if not "\ud800" <= ch <= "\udfff")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    warns = []
    if len(text) > MAX_CAPTION_CHARS:
        warns.append(f"caption truncated from {len(text)} to {MAX_CAPTION_CHARS} characters")
        text = text[:MAX_CAPTION_CHARS].rstrip()
        # Truncation may split a base character from its combining mark; renormalise so the result is stable.
        text = " ".join(unicodedata.normalize("NFC", text).split())
    return (text or None), warns


def read_caption_file(path: Path) -> str:
    """The text of a ``.txt`` caption; CaptionError when it is too large or not UTF-8."""
    size = path.stat().st_size
    if size > MAX_CAPTION_FILE_BYTES:
        raise CaptionError(f"{path}: caption file is {size} bytes, above the limit of {MAX_CAPTION_FILE_BYTES}")
    with open(path, "rb") as fh:
        data = fh.read(MAX_CAPTION_FILE_BYTES + 1)
    try:
        return data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path}: caption is not UTF-8 (bad byte at offset {exc.start})") from None


# ------------------------------------------------------------------------------------------------------ images

def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode any common image to uint8 RGB [H, W, 3]; raise ImageError with a one-line reason otherwise.

    The pixel limit is checked on the header before any pixel is decoded, so a decompression bomb costs nothing.
    EXIF orientation is applied (as viewers show the image); transparency is composited onto white; 16-bit and
    float images are scaled to 8 bits; CMYK and palette images are converted to RGB. ``data``: the file's bytes
    as ``read_image_bytes`` read them elsewhere (a cluster worker decodes what the driver read); messages still
    name ``path``, and the pixels and errors are those of decoding the file itself.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL warns between its own limit and twice it; our limit is enforced below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path if data is None else io.BytesIO(data))
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: image is {w}x{h} pixels, above the limit of {max_pixels} pixels; "
                                 "refused without decoding", "too_large")
            if w < 1 or h < 1:
                raise ImageError(f"{path}: image has no pixels ({w}x{h})")
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if (_size(path) if data is None else len(data)) == 0:
            raise ImageError(f"{path}: empty file") from None
        raise ImageError(f"{path}: not a readable image (unknown format or not an image)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused without decoding as a possible decompression bomb ({exc})",
                         "too_large") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory while decoding", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _file_error(path, exc) from None


def _file_error(path: Path, exc: BaseException) -> ImageError:
    """The ImageError for a file that could not be opened or read (or, for other errors, decoded)."""
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{path}: file not found")
    if isinstance(exc, PermissionError):
        return ImageError(f"{path}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{path}: is a directory, not an image")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ImageError(f"{path}: corrupt or truncated image ({reason})")


# Files above this size are decoded where they lie before their bytes are read whole: a huge file that is no image
# (or too large an image) is refused from its header, as ``load_image`` refuses it, instead of being shipped.
MAX_SHIPPED_BYTES = 256 * 1024 * 1024


def read_image_bytes(path: str | Path, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes of an image file, for ``load_image(path, data=...)`` on another machine; ImageError with the
    message ``load_image(path)`` gives when the file cannot be read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SHIPPED_BYTES:
            load_image(path, max_pixels)
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise _file_error(path, exc) from None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def load_row_image(row: Row, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """Decode a row's image, or mark the row (status ``unreadable`` / ``too_large``) and return None."""
    if not row.ok:
        return None
    try:
        return load_image(row.path, max_pixels)
    except ImageError as exc:
        row.fail(exc.status, str(exc))
        return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        top = arr.max() if arr.size else 0.0
        if im.mode == "F" and 0 < top <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif top > 255:
            arr = arr / top * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=-1))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency onto white, as viewers show it, instead of dropping alpha to black.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- metadata

_FILE_NAME = re.compile(rb'"file_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass
class MetadataLine:
    lineno: int
    name: str | None  # normalised file_name, when one could be read (even from a broken line)
    record: dict | None  # None when the line is unusable
    error: str | None = None


def _normalise_name(name: str) -> str:
    """A metadata file_name as a folder-relative posix id ("./a.png" and "sub/../a.png" both become "a.png")."""
    name = os.path.normpath(name.replace("\\", "/"))
    return "/" + name.lstrip("/") if name.startswith("//") else name  # POSIX normpath keeps a leading "//"


def parse_metadata_line(line: bytes, lineno: int, where: str) -> MetadataLine | None:
    """One metadata.jsonl line -> MetadataLine (None for a blank line). Never raises on bad content."""
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        return MetadataLine(lineno, _salvage_name(line), None,
                            f"{where}: not UTF-8 (bad byte at column {exc.start + 1})")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return MetadataLine(lineno, _salvage_name(line), None,
                            f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
    except RecursionError:
        return MetadataLine(lineno, _salvage_name(line), None, f"{where}: JSON nested too deeply")
    if not isinstance(record, dict):
        return MetadataLine(lineno, None, None, f"{where}: expected a JSON object, got {type(record).__name__}")
    name = record.get("file_name")
    if not isinstance(name, str) or not name.strip() or "\x00" in name or _has_surrogate(name):
        return MetadataLine(lineno, None, None, f"{where}: needs a file_name string, got {_short(name)}")
    return MetadataLine(lineno, _normalise_name(name), record)


def _salvage_name(line: bytes) -> str | None:
    """Which file a broken line was about, so the error lands on that image's row instead of a nameless one."""
    m = _FILE_NAME.search(line)
    if not m:
        return None
    try:
        name = json.loads(b'"' + m.group(1) + b'"')
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return _normalise_name(name) if name.strip() and not _has_surrogate(name) and "\x00" not in name else None


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_metadata(folder: Path) -> tuple[dict[str, dict], dict[str, tuple[str, str]], list[Row]]:
    """Parse ``metadata.jsonl`` line by line.

    Returns (records by file id, (status, error) by file id, rows for unusable lines that name no file). An error
    keyed by file id (a broken line that still names its file, or a conflicting duplicate) marks that file's row.
    """
    meta_path = folder / METADATA
    records: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    errors: dict[str, tuple[str, str]] = {}
    nameless: list[Row] = []
    if not meta_path.exists():
        return records, errors, nameless
    try:
        fh = open(meta_path, "rb")
    except OSError as exc:
        raise InputError(f"{meta_path}: cannot read ({exc.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            where = f"{meta_path}:{lineno}"
            parsed = parse_metadata_line(line, lineno, where)
            if parsed is None:
                continue
            if parsed.record is None:
                if parsed.name is None:
                    nameless.append(Row(f"{METADATA}:{lineno}", str(meta_path)).fail("bad_metadata", parsed.error))
                else:
                    errors.setdefault(parsed.name, ("bad_metadata", parsed.error))
                continue
            name = parsed.name
            if name in records:
                if records[name] != parsed.record:
                    errors.setdefault(name, ("duplicate", f"{where}: {name} is listed more than once with different "
                                                          f"values (first on line {first_line[name]})"))
                continue
            records[name], first_line[name] = parsed.record, lineno
    return records, errors, nameless


# ---------------------------------------------------------------------------------------------------- folders

def _is_hidden(part: str) -> bool:
    return part.startswith(".")


def _walk(folder: Path) -> tuple[set[str], set[str], list[str]]:
    """(image files, directories named like images, file names that are not valid UTF-8), relative to folder."""
    files, dirs, bad_names = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        rel_dir = Path(dirpath).relative_to(folder)
        for d in dirnames:
            if Path(d).suffix.lower() in IMAGE_SUFFIXES and not (Path(dirpath) / d).is_symlink():
                dirs.add((rel_dir / d).as_posix())
        for f in filenames:
            if _is_hidden(f) or Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = (rel_dir / f).as_posix()
            if _has_surrogate(rel):
                bad_names.append(rel)
            else:
                files.add(rel)
    return files, dirs, bad_names


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, RuntimeError, OSError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def require_folder(folder: str | Path) -> Path:
    """The ImageFolder's path, or a one-line error saying it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder" + (" (it is a file)" if folder.exists() else ""))
    return folder


def read_imagefolder(folder: str | Path, require_member: bool = False, require_caption: bool = False) -> list[Row]:
    """All rows of an ImageFolder, in a stable order (sorted by id), each with a status. Images are not decoded.

    ``require_member`` (auxiliary data) marks rows without a boolean ``member`` as bad_metadata;
    ``require_caption`` marks rows without a caption as no_caption (otherwise a captioner may write one later).
    """
    folder = require_folder(folder)
    records, errors, rows = read_metadata(folder)
    files, image_dirs, bad_names = _walk(folder)
    for rel in bad_names:
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        rows.append(Row(shown, str(folder / shown)).fail("unreadable", f"{folder / shown}: file name is not valid "
                                                                        "UTF-8; rename the file"))
    for name in sorted(files | image_dirs | set(records) | set(errors)):
        rows.append(_read_row(folder, name, records.get(name), errors.get(name), require_member, require_caption))
    return sorted(rows, key=lambda r: r.id)


def _read_row(folder: Path, name: str, record: dict | None, error: tuple[str, str] | None, require_member: bool,
              require_caption: bool) -> Row:
    path = folder / name
    row = Row(id=name, path=str(path))
    if error is not None:
        return row.fail(*error)
    if Path(name).is_absolute() or name.startswith("../") or name == ".." or not _inside(folder, path):
        if path.is_symlink() and _symlink_loops(path):
            return row.fail("unreadable", f"{path}: symlink loop")
        return row.fail("outside_folder", f"{path}: leads outside {folder}; refused")
    if not path.exists():
        if path.is_symlink():
            return row.fail("missing", f"{path}: broken symlink")
        return row.fail("missing", f"{path}: listed in {METADATA} but missing")
    if path.is_dir():
        return row.fail("unreadable", f"{path}: is a directory, not an image")
    record = record or {}
    try:
        _caption(row, path, record)
    except CaptionError as exc:
        return row.fail("bad_caption", str(exc))
    except InputError as exc:
        return row.fail("bad_metadata", str(exc))
    member = record.get("member")
    if isinstance(member, int) and not isinstance(member, bool) and member in (0, 1):
        member = bool(member)  # 0/1 is a common spelling of false/true
    if member is not None and not isinstance(member, bool):
        return row.fail("bad_metadata", f"{path}: member must be true or false, got {_short(member)}")
    row.member = member
    if require_member and member is None:
        return row.fail("bad_metadata", f"{path}: auxiliary data needs a boolean member column in {METADATA}")
    if require_caption and row.caption is None:
        return row.fail("no_caption", f"{path}: no caption (no text in {METADATA} and no non-empty "
                                      f"{path.with_suffix('.txt').name})")
    return row


def _caption(row: Row, path: Path, record: dict) -> None:
    text, source = record.get("text"), "metadata"
    txt = path.with_suffix(".txt")
    if text is None and txt.is_file():
        text, source = read_caption_file(txt), "txt"
    if text is None and "text" not in record:
        others = sorted(k for k in record if k in ("caption", "prompt", "captions", "label", "title"))
        if others:
            row.warnings.append(f"no 'text' field in {METADATA}; found {others[0]!r} (rename it to 'text' to use it)")
    row.caption, warns = clean_caption(text, f"{path}" if source == "metadata" else str(txt))
    row.warnings.extend(warns)
    row.caption_source = source if row.caption else None
    if text is not None and row.caption is None:
        row.warnings.append("caption is empty")


def _symlink_loops(path: Path) -> bool:
    try:
        path.resolve(strict=True)
        return False
    except RuntimeError:
        return True
    except OSError as exc:
        return exc.errno == 40  # ELOOP
