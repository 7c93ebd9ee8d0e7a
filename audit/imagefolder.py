"""Reading query data: Hugging Face ImageFolder folders and single images, defensively.

Data from people we do not know is read in two stages, and neither stage raises on one bad file:

1. ``read_imagefolder(folder)`` lists the rows (images on disk plus names in ``metadata.jsonl``) and resolves
   captions and labels, without decoding any image.
2. ``load_row_image(row)`` decodes one row's image when it is needed; a failure marks that row.

Every row ends with a status; ``error`` is a one-line message naming the file (and the metadata line) whenever the
status is not ``ok``. Statuses:

``ok``             the row can be scored
``unreadable``     not an image, corrupt or truncated data, permission denied, not a regular file (a directory,
                   FIFO, socket or device), a symlink loop, a bad file name
``too_large``      a file above its byte limit, width x height above the pixel limit, or a shape whose short edge
                   scaled up to a model's input side would exceed it (a 4,000,000 x 2 strip); refused from the
                   header, before decoding
``missing``        listed in metadata.jsonl but not on disk (or a broken symlink)
``outside_folder`` a symlink or a file_name that leads outside the folder
``bad_metadata``   a metadata.jsonl line that is not JSON / not UTF-8 / lacks file_name / has a bad field
``duplicate``      a file listed more than once in metadata.jsonl with different values
``bad_caption``    a .txt caption that is not UTF-8, too large, or not a regular file
``no_caption``     no caption, where one is required (``require_caption=True``)

Hidden files and folders (names starting with ``.``) are skipped, as the Hugging Face ImageFolder loader does.
Every file of a folder (image, caption, metadata) is opened by ``open_user_file``, which refuses what leads outside
the folder, what is not a regular file and what is too large before reading a byte.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import re
import stat
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
# Embedders, captioners and targets scale an image's short edge up to their input side (224 to 1024 pixels here):
# a 4,000,000 x 2 strip would become 448 gigapixels. The aspect ratio bounds what that scaling can make.
MODEL_SIDE = 1024
MAX_ASPECT = 32  # MODEL_SIDE x (MAX_ASPECT x MODEL_SIDE) = 32 Mpx, below MAX_PIXELS
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024  # an image file larger than this is refused before it is read
MAX_METADATA_BYTES = 256 * 1024 * 1024  # metadata.jsonl
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
    root: str | None = None  # the folder the row's files must stay inside (None: a file the user named)

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
    """A caption file that cannot be used (row status ``bad_caption``, or ``outside_folder``)."""

    def __init__(self, message: str, status: str = "bad_caption"):
        super().__init__(_one_line(message))
        self.status = status


class ImageError(InputError):
    """An image that cannot be used; ``status`` is the row status it maps to (``unreadable`` or ``too_large``)."""

    def __init__(self, message: str, status: str = "unreadable"):
        super().__init__(_one_line(message))
        self.status = status


class UserFileError(InputError):
    """A file refused by ``open_user_file``; ``status`` is the row status it maps to."""

    def __init__(self, message: str, status: str = "unreadable"):
        super().__init__(_one_line(message))
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ user files

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path, mode: int, what: str) -> UserFileError | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return UserFileError(f"{path}: is {kind}, not {what}" if kind != "not a regular file" else f"{path}: {kind}")


def open_user_file(path: str | Path, root: str | Path | None, max_bytes: int, what: str = "a regular file"):
    """Open a file of a user's folder for reading (a binary file object), or raise UserFileError before reading
    a byte: when its resolved path (symlinks followed) leaves ``root``, when it is not a regular file (a FIFO
    would block a reader forever, a device could stream without end) or when it holds more than ``max_bytes``.

    ``root`` None: a file the user named on the command line, which may be anywhere. The file is checked on its
    path, then opened non-blocking without following a further symlink and checked again on the open descriptor,
    so a file swapped in between is caught too.
    """
    path = Path(path)
    real = path
    if root is not None:
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            raise UserFileError(f"{path}: broken symlink" if path.is_symlink() else f"{path}: file not found",
                                "missing") from None
        except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise _os_error(path, exc) from None
        if not real.is_relative_to(Path(root).resolve()):
            raise UserFileError(f"{path}: leads outside {root}; refused", "outside_folder")
    try:
        refused = _not_regular(path, os.stat(real).st_mode, what)
        if refused:
            raise refused
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(real, flags | (os.O_NOFOLLOW if root is not None else 0))
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        st = os.fstat(fd)
        refused = _not_regular(path, st.st_mode, what)
        if refused:
            raise refused
        if st.st_size > max_bytes:
            raise UserFileError(f"{path}: {st.st_size} bytes, above the limit of {max_bytes} for {what}",
                                "too_large")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_error(path: Path, exc: BaseException) -> UserFileError:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return UserFileError(f"{path}: symlink loop")
    if isinstance(exc, FileNotFoundError):
        return UserFileError(f"{path}: file not found", "missing")
    if isinstance(exc, PermissionError):
        return UserFileError(f"{path}: permission denied")
    if getattr(exc, "errno", None) == errno.ENXIO:
        return UserFileError(f"{path}: is a socket or device without a reader, not a regular file")
    return UserFileError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})")


def read_user_file(path: str | Path, root: str | Path | None, max_bytes: int, what: str = "a regular file") -> bytes:
    """The bytes of a file, through ``open_user_file``, reading no more than ``max_bytes`` whatever it claims."""
    with open_user_file(path, root, max_bytes, what) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise UserFileError(f"{path}: above the limit of {max_bytes} bytes for {what}", "too_large")
    return data


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


def read_caption_file(path: Path, root: str | Path | None) -> str:
    """The text of a ``.txt`` caption inside ``root`` (the folder, or the image's own folder for a single image);
    CaptionError when it is refused (outside ``root``, not a regular file, too large) or not UTF-8. Its status
    is ``outside_folder`` for a caption leading outside, else ``bad_caption``."""
    try:
        data = read_user_file(path, root, MAX_CAPTION_FILE_BYTES, "a caption file")
    except UserFileError as exc:
        raise CaptionError(str(exc), "outside_folder" if exc.status == "outside_folder" else "bad_caption") from None
    try:
        return data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path}: caption is not UTF-8 (bad byte at offset {exc.start})") from None


# ------------------------------------------------------------------------------------------------------ images

def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None,
               root: str | Path | None = None) -> np.ndarray:
    """Decode any common image to uint8 RGB [H, W, 3]; raise ImageError with a one-line reason otherwise.

    The one decode path for every image that enters (folders, ``check``, HTTP responses, uploads). Its limits are
    checked on the header before any pixel is decoded, so a decompression bomb costs nothing: width x height,
    and the aspect ratio, which bounds the size a model's resize of the short edge would make (``MODEL_SIDE``).
    Only the first frame of an animated image is decoded. EXIF orientation is applied (as viewers show the
    image); transparency is composited onto white; 16-bit and float images are scaled to 8 bits; CMYK and
    palette images are converted to RGB. ``data``: the image's bytes (read elsewhere, e.g. by
    ``read_image_bytes`` on another machine, or received over HTTP); messages still name ``path``. Otherwise the
    file is opened by ``open_user_file`` (inside ``root`` when given: a row of a folder).
    """
    path = Path(path)
    if data is not None and len(data) > MAX_IMAGE_FILE_BYTES:
        raise ImageError(f"{path}: {len(data)} bytes, above the limit of {MAX_IMAGE_FILE_BYTES} for an image",
                         "too_large")
    try:
        fh = open_user_file(path, root, MAX_IMAGE_FILE_BYTES, "an image") if data is None else io.BytesIO(data)
    except UserFileError as exc:
        raise ImageError(str(exc), "unreadable" if exc.status == "missing" else exc.status) from None
    with fh:
        return _decode(path, fh, max_pixels)


def _decode(path: Path, fh, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # PIL warns between its own limit and twice it; our limit is enforced below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
        with im:
            check_image_shape(path, *im.size, max_pixels)
            if im.mode not in _MODES:
                raise ImageError(f"{path}: unsupported pixel mode {im.mode}")
            im.load()
            check_image_shape(path, *im.size, max_pixels)  # a plugin may pick another size when it decodes
            im = ImageOps.exif_transpose(im) or im
            return _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if (len(fh.getbuffer()) if isinstance(fh, io.BytesIO) else os.fstat(fh.fileno()).st_size) == 0:
            raise ImageError(f"{path}: empty file") from None
        raise ImageError(f"{path}: not a readable image (unknown format or not an image)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused without decoding as a possible decompression bomb ({exc})",
                         "too_large") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory while decoding", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
            ZeroDivisionError, OverflowError) as exc:
        # A hostile header can reach corners of a format plugin that raise more than OSError.
        raise _file_error(path, exc) from None


# The modes _to_rgb converts faithfully; anything else (a plugin's raw mode) is refused by name.
_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBa",
                    "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


def check_image_shape(path: str | Path, width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """ImageError (status ``too_large`` or ``unreadable``) for a width x height this tool refuses to decode:
    above ``max_pixels``, or so elongated that scaling its short edge to ``MODEL_SIDE`` (as the embedder,
    captioner and target do) would exceed ``max_pixels``."""
    if width < 1 or height < 1:
        raise ImageError(f"{path}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{path}: image is {width}x{height} pixels, above the limit of {max_pixels} pixels; "
                         "refused without decoding", "too_large")
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT * short:
        raise ImageError(f"{path}: image is {width}x{height} pixels, an aspect ratio above {MAX_ASPECT}:1 (a model "
                         f"scaling its short edge to {MODEL_SIDE} pixels would make it {-(-long * MODEL_SIDE // short)}"
                         f"x{MODEL_SIDE}); refused without decoding", "too_large")


def _file_error(path: Path, exc: BaseException) -> ImageError:
    """The ImageError for a file that could not be opened or read (or, for other errors, decoded)."""
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{path}: file not found")
    if isinstance(exc, PermissionError):
        return ImageError(f"{path}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{path}: is a directory, not an image")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ImageError(f"{path}: corrupt or truncated image ({reason[:200]})")


def read_image_bytes(path: str | Path, root: str | Path | None = None) -> bytes:
    """The bytes of an image file, for ``load_image(path, data=...)`` on another machine; ImageError with the
    message ``load_image(path, root=root)`` gives when the file is refused or cannot be read."""
    path = Path(path)
    try:
        return read_user_file(path, root, MAX_IMAGE_FILE_BYTES, "an image")
    except UserFileError as exc:
        raise ImageError(str(exc), "unreadable" if exc.status == "missing" else exc.status) from None
    except OSError as exc:
        raise _file_error(path, exc) from None


def load_row_image(row: Row, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """Decode a row's image, or mark the row (status ``unreadable`` / ``too_large``) and return None."""
    if not row.ok:
        return None
    try:
        return load_image(row.path, max_pixels, root=row.root)
    except ImageError as exc:
        row.fail(exc.status, str(exc))
        return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)  # float32: 4 bytes a pixel at most, as the decoded image
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
    if not os.path.lexists(meta_path):
        return records, errors, nameless
    try:
        fh = open_user_file(meta_path, folder, MAX_METADATA_BYTES, "a metadata file")
    except UserFileError as exc:
        raise InputError(str(exc)) from None
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
    row = Row(id=name, path=str(path), root=str(folder))
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
        _caption(row, path, record, folder)
    except CaptionError as exc:
        return row.fail(exc.status, str(exc))
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


def _caption(row: Row, path: Path, record: dict, root: Path) -> None:
    text, source = record.get("text"), "metadata"
    txt = path.with_suffix(".txt")
    if text is None and os.path.lexists(txt):
        text, source = read_caption_file(txt, root), "txt"
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
