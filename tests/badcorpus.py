"""A folder mixing good images with ~45 kinds of bad and hostile input, and the status every row must end with.

Used by tests/test_badfiles.py (reader, decoder, and `scan`/`features`/`report` through the CLI runner: every good
row scored, every bad row explained, nothing leaked). ``write_bad_corpus(folder, outside)`` returns ``{row id:
expected final status}`` (after ``read_imagefolder`` and ``load_row_image``) plus the ids that must carry a warning.
Hostile neighbours: special files named like images or captions (FIFO, socket, device), captions through symlinks
(to a secret outside the folder, to ``/proc/self/environ``, in a loop), shape bombs (4,000,000 x 2), ancillary
chunk bombs. ``SECRET`` is the content that must never reach any output.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes: decoding it would allocate
    width*height*3 bytes before failing, so a reader that decodes before checking the size is caught out."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


SECRET = "s3cr3t-token-that-must-never-leak"


def chunk_bomb_png(kind: bytes) -> bytes:
    """An 8x8 PNG carrying an ancillary chunk (zTXt, iCCP, iTXt) whose data inflates to 16 MB from 16 KB."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, format="PNG")
    png = buf.getvalue()
    prefix = {b"zTXt": b"k\0\0", b"iCCP": b"p\0\0", b"iTXt": b"k\0\1\0\0\0"}[kind]
    return png[:33] + _chunk(kind, prefix + zlib.compress(bytes(16 << 20), 9)) + png[33:]


def strip_png(width: int, height: int) -> bytes:
    """A real, decodable PNG of a thin strip: small in pixels and bytes, huge once a model scales its short edge."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def noise(rng: np.random.Generator, size: int = 24, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_bad_corpus(folder: Path, outside: Path, seed: int = 0) -> tuple[dict[str, str], set[str]]:
    folder, outside = Path(folder), Path(outside)
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    expect: dict[str, str] = {}
    warned: set[str] = set()
    meta: list[bytes] = []

    def put(name: str, data: bytes, status: str, caption: str | None = "a test image", member: object = True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        expect[name] = status
        if caption is not None:
            meta.append(json.dumps({"file_name": name, "text": caption, "member": member}).encode())

    # ---- good rows: unusual but valid images and captions
    good_png = _png_bytes(noise(rng))
    put("good.png", good_png, "ok")
    put("good.jpg", _jpeg_bytes(Image.fromarray(noise(rng))), "ok", caption=None)
    (folder / "good.txt").write_text("a caption read from a .txt file\n", encoding="utf-8")
    put("palette.png", _palette_png(rng, transparency=False), "ok")
    put("palette_transparent.png", _palette_png(rng, transparency=True), "ok")
    put("alpha.png", _png_bytes(noise(rng, channels=4)), "ok")
    put("gray_alpha.png", _png_bytes(noise(rng, channels=2)), "ok")
    put("gray16.png", _png_bytes(rng.integers(0, 65536, (24, 24), dtype=np.uint16)), "ok")
    put("cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (24, 24), (10, 200, 30, 5))), "ok")
    put("rotated_exif.jpg", _exif_rotated_jpeg(rng), "ok")
    put("picture.gif", _gif_bytes(rng), "ok")
    put("picture.bmp", _bmp_bytes(rng), "ok")
    put("sub/nested.png", _png_bytes(noise(rng)), "ok")
    put("long_caption.png", _png_bytes(noise(rng)), "ok", caption="word " * 2000)  # 10,000 characters
    warned.add("long_caption.png")
    put("control_chars.png", _png_bytes(noise(rng)), "ok", caption="tab\there\x00null\x1b[31m and a lone \ud800")
    put("empty_caption.png", _png_bytes(noise(rng)), "ok", caption="")
    warned.add("empty_caption.png")
    put("no_caption.png", _png_bytes(noise(rng)), "ok", caption=None)
    put("same_twice.png", _png_bytes(noise(rng)), "ok")
    meta.append(meta[-1])  # listed twice with identical values: harmless
    os.symlink("good.png", folder / "link_inside.png")
    expect["link_inside.png"] = "ok"
    (folder / ".hidden.png").write_bytes(b"junk an editor left behind")  # skipped, like HF ImageFolder does
    (folder / ".cache").mkdir()
    (folder / ".cache" / "thumb.png").write_bytes(b"junk")

    # ---- bad image bytes (found when decoding)
    put("empty.png", b"", "unreadable")
    put("text.png", b"this is a text file, not a PNG\n" * 10, "unreadable")
    put("truncated.png", _png_bytes(noise(rng, 64))[:900], "unreadable")
    put("truncated.jpg", _jpeg_bytes(Image.fromarray(noise(rng, 64)))[:700], "unreadable")
    corrupt = bytearray(_png_bytes(noise(rng, 64)))
    corrupt[200:260] = bytes(60)
    put("corrupt.png", bytes(corrupt), "unreadable")
    put("corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), "unreadable")
    put("huge_header.png", png_with_header_only(100_000, 100_000), "too_large")  # 10 gigapixels
    put("over_limit.png", png_with_header_only(9000, 9000), "too_large")  # 81 Mpx: above ours, below PIL's guard
    put("noperm.png", _png_bytes(noise(rng)), "ok")
    os.chmod(folder / "noperm.png", 0)
    if not os.access(folder / "noperm.png", os.R_OK):  # root reads anyway; see test_unreadable_permissions
        expect["noperm.png"] = "unreadable"
    (folder / "directory.png").mkdir()
    expect["directory.png"] = "unreadable"

    # ---- bad metadata and captions (found when reading the folder)
    meta.append(json.dumps({"file_name": "missing.png", "text": "listed but absent"}).encode())
    expect["missing.png"] = "missing"
    meta.append(b"{this is not json}")
    expect[f"metadata.jsonl:{len(meta)}"] = "bad_metadata"
    meta.append(json.dumps({"text": "a line without file_name"}).encode())
    expect[f"metadata.jsonl:{len(meta)}"] = "bad_metadata"
    meta.append(b'["file_name", "a list, not an object"]')
    expect[f"metadata.jsonl:{len(meta)}"] = "bad_metadata"
    meta.append(b'{"file_name": "latin1_meta.png", "text": "caf\xe9"}')  # not UTF-8
    put("latin1_meta.png", _png_bytes(noise(rng)), "bad_metadata", caption=None)
    meta.append(json.dumps({"file_name": "number_caption.png", "text": 42}).encode())
    put("number_caption.png", _png_bytes(noise(rng)), "bad_metadata", caption=None)
    put("bad_member.png", _png_bytes(noise(rng)), "bad_metadata", member="yes")
    put("conflict.png", _png_bytes(noise(rng)), "duplicate")
    meta.append(json.dumps({"file_name": "./conflict.png", "text": "another caption", "member": False}).encode())
    put("latin1.png", _png_bytes(noise(rng)), "bad_caption", caption=None)
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    meta.append(json.dumps({"file_name": "../outside_listed.png", "text": "escape by name"}).encode())
    (outside / "outside_listed.png").write_bytes(good_png)
    expect["../outside_listed.png"] = "outside_folder"
    (outside / "secret.png").write_bytes(good_png)
    os.symlink(outside / "secret.png", folder / "escape.png")
    expect["escape.png"] = "outside_folder"
    os.symlink(outside, folder / "escape_dir")  # a symlinked folder is not followed: no rows from it
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    expect["dangling.png"] = "missing"
    os.symlink("loop_b.png", folder / "loop_a.png")
    os.symlink("loop_a.png", folder / "loop_b.png")
    expect["loop_a.png"] = expect["loop_b.png"] = "unreadable"
    bad_name = os.fsencode(str(folder)) + b"/bad\xffname.png"
    with open(bad_name, "wb") as fh:
        fh.write(good_png)
    expect["bad\\xffname.png"] = "unreadable"
    # ---- hostile neighbours: special files, captions through symlinks, shape and chunk bombs
    os.mkfifo(folder / "fifo.png")  # opening it for reading would block the scan forever
    expect["fifo.png"] = "unreadable"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "socket.png"))
    expect["socket.png"] = "unreadable"
    if os.geteuid() == 0:
        os.mknod(folder / "device.png", 0o600 | 0o020000, os.makedev(1, 5))  # a character device (/dev/zero)
        expect["device.png"] = "unreadable"
    put("strip.png", strip_png(4_000_000, 2), "too_large")  # 8 KB; its short edge scaled to 224: 448 Gpx
    put("tall.png", strip_png(2, 100), "too_large")  # aspect 50:1
    put("wide_ok.png", strip_png(320, 10), "ok")  # aspect 32:1, the limit
    for kind in (b"zTXt", b"iCCP", b"iTXt"):
        put(f"bomb_{kind.decode().lower()}.png", chunk_bomb_png(kind), "unreadable")
    put("animated.png", _apng_bytes(rng), "ok")  # the first frame only
    (outside / "secret.txt").write_text(SECRET)
    for name, target, status in (("caption_secret", outside / "secret.txt", "outside_folder"),
                                 ("caption_environ", Path("/proc/self/environ"), "outside_folder"),
                                 ("caption_loop", Path("caption_loop.txt"), "bad_caption"),
                                 ("caption_inside", Path("good.txt"), "ok")):
        put(f"{name}.png", _png_bytes(noise(rng)), status, caption=None)
        os.symlink(target, folder / f"{name}.txt")
    os.mkfifo(folder / "caption_fifo.txt")
    put("caption_fifo.png", _png_bytes(noise(rng)), "bad_caption", caption=None)
    (folder / "caption_dir.txt").mkdir()
    put("caption_dir.png", _png_bytes(noise(rng)), "bad_caption", caption=None)
    put("caption_big.png", _png_bytes(noise(rng)), "bad_caption", caption=None)
    (folder / "caption_big.txt").write_bytes(b"a" * ((1 << 20) + 1))
    put(f"markup_{'x' * 3}.png", _png_bytes(noise(rng)), "ok",
        caption="<script>alert(1)</script><img src=x onerror=alert(2)>")

    # The last line of the file is cut mid-record, as when a writer was killed; it still names its file.
    put("partial.png", _png_bytes(noise(rng)), "bad_metadata", caption=None)
    meta.append(b'{"file_name": "partial.png", "text": "the writer was ki')

    (folder / "metadata.jsonl").write_bytes(b"\n".join(meta))  # no final newline: the torn line is last
    return expect, warned


def _palette_png(rng: np.random.Generator, transparency: bool) -> bytes:
    im = Image.fromarray(noise(rng)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"transparency": 0} if transparency else {}))
    return buf.getvalue()


def _exif_rotated_jpeg(rng: np.random.Generator) -> bytes:
    im = Image.fromarray(noise(rng)[:, :16])  # 16 wide, 24 high; orientation 6 shows it 24 wide, 16 high
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(im, exif=exif.tobytes())


def _gif_bytes(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(noise(rng)).convert("P") for _ in range(2)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _apng_bytes(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(noise(rng)) for _ in range(3)]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _bmp_bytes(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(rng)).save(buf, format="BMP")
    return buf.getvalue()


def png_of_zeros(width: int, height: int) -> bytes:
    """A real, fully decodable black PNG of width x height, compressed row by row (never held decoded here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
