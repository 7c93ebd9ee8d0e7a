"""Reading query data: Hugging Face ImageFolder folders and single images, defensively.

Every row gets a status instead of an exception, so a folder scan never stops on one bad file. Statuses:
``ok``, ``unreadable`` (not an image, corrupt, truncated, permissions), ``too_large`` (decompression-bomb
guard), ``no_caption``, ``bad_metadata``, ``outside_folder`` (a symlink leaving the folder), ``duplicate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64 * 1024 * 1024  # refuse larger images before decoding them
MAX_CAPTION_CHARS = 2000  # longer captions are truncated (CLIP reads 77 tokens anyway), with a warning


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
        self.status, self.error = status, error
        return self


def clean_caption(text: object, where: str) -> tuple[str | None, list[str]]:
    """Normalise a caption; returns (caption or None when empty, warnings)."""
    if text is None:
        return None, []
    if not isinstance(text, str):
        raise InputError(f"{where}: caption must be a string, got {type(text).__name__}")
    text = " ".join(text.replace("\x00", " ").split())
    warnings = []
    if len(text) > MAX_CAPTION_CHARS:
        warnings.append(f"caption truncated from {len(text)} to {MAX_CAPTION_CHARS} characters")
        text = text[:MAX_CAPTION_CHARS]
    return (text or None), warnings


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any common image to uint8 RGB [H, W, 3]; raise InputError with a one-line reason otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(f"{path}: image is {w}x{h} pixels, above the limit of {max_pixels} pixels")
            im.load()
            return _to_rgb(im)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an image") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency onto white, as viewers show it, instead of dropping alpha to black.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def read_metadata(folder: Path) -> tuple[dict[str, dict], list[Row]]:
    """Parse metadata.jsonl; malformed lines become bad_metadata rows (keyed by line number) instead of errors."""
    meta_path = folder / "metadata.jsonl"
    records: dict[str, dict] = {}
    bad: list[Row] = []
    if not meta_path.exists():
        return records, bad
    try:
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{meta_path}: cannot read ({exc.strerror})") from None
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta_path}:{lineno}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(Row(f"metadata.jsonl:{lineno}", str(meta_path)).fail("bad_metadata", f"{where}: not UTF-8"))
            continue
        except json.JSONDecodeError as exc:
            bad.append(Row(f"metadata.jsonl:{lineno}", str(meta_path)).fail("bad_metadata", f"{where}: not valid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not record["file_name"]:
            bad.append(Row(f"metadata.jsonl:{lineno}", str(meta_path)).fail("bad_metadata", f"{where}: needs a string file_name"))
            continue
        name = Path(record["file_name"]).as_posix()
        if name in records:
            bad.append(Row(name, str(folder / name)).fail("duplicate", f"{where}: {name} is listed more than once"))
            continue
        records[name] = record
    return records, bad


def read_imagefolder(folder: str | Path, require_member: bool = False) -> list[Row]:
    """All rows of an ImageFolder, in a stable order (sorted by file name), each with a status."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    records, rows = read_metadata(folder)
    names = set(records)
    for dirpath, _, files in os.walk(folder, followlinks=False):
        for f in files:
            p = Path(dirpath) / f
            if p.suffix.lower() in IMAGE_SUFFIXES:
                names.add(p.relative_to(folder).as_posix())
    for name in sorted(names):
        path = folder / name
        row = Row(id=name, path=str(path))
        rows.append(row)
        if not _inside(folder, path):
            row.fail("outside_folder", f"{path}: leads outside {folder}; refused")
            continue
        if not path.exists():
            row.fail("unreadable", f"{path}: listed in metadata.jsonl but missing")
            continue
        record = records.get(name, {})
        try:
            text = record.get("text")
            source = "metadata" if text is not None else None
            if text is None and path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_bytes().decode("utf-8")
                source = "txt"
            row.caption, row.warnings = clean_caption(text, str(path))
            row.caption_source = source if row.caption else None
        except UnicodeDecodeError:
            row.fail("no_caption", f"{path.with_suffix('.txt')}: caption is not UTF-8")
            continue
        except InputError as exc:
            row.fail("bad_metadata", str(exc))
            continue
        member = record.get("member")
        if member is not None and not isinstance(member, bool):
            row.fail("bad_metadata", f"{path}: member must be true or false, got {member!r}")
            continue
        row.member = member
        if require_member and member is None:
            row.fail("bad_metadata", f"{path}: auxiliary data needs a boolean member column")
    return sorted(rows, key=lambda r: r.id)
