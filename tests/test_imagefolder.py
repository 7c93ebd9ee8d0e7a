"""ImageFolder reading and image decoding: captions, labels, order, conversions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from audit.errors import InputError
from audit.imagefolder import (MAX_CAPTION_CHARS, ImageError, Row, clean_caption, load_image, load_row_image,
                               parse_metadata_line, read_imagefolder)


def _folder(tmp_path, records, images=("a.png", "b.png")):
    for name in images:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_rows_are_sorted_and_carry_caption_member_and_source(tmp_path):
    _folder(tmp_path, [{"file_name": "b.png", "text": " two  words ", "member": False},
                       {"file_name": "a.png", "text": "one", "member": 1}], images=("b.png", "a.png", "c/d.png"))
    (tmp_path / "c" / "d.txt").write_text("from txt")
    rows = read_imagefolder(tmp_path)
    assert [r.id for r in rows] == ["a.png", "b.png", "c/d.png"]
    assert [(r.caption, r.member, r.caption_source) for r in rows] == [
        ("one", True, "metadata"), ("two words", False, "metadata"), ("from txt", None, "txt")]
    assert all(r.ok for r in rows)


def test_metadata_text_wins_over_txt_and_bom_is_tolerated(tmp_path):
    _folder(tmp_path, [], images=("a.png",))
    (tmp_path / "metadata.jsonl").write_bytes(b'\xef\xbb\xbf{"file_name": "a.png", "text": "meta"}\n')
    (tmp_path / "a.txt").write_text("txt")
    (row,) = read_imagefolder(tmp_path)
    assert row.ok and row.caption == "meta" and row.caption_source == "metadata"


def test_require_member_and_require_caption(tmp_path):
    _folder(tmp_path, [{"file_name": "a.png", "text": "x", "member": True}, {"file_name": "b.png"}])
    rows = {r.id: r for r in read_imagefolder(tmp_path, require_member=True, require_caption=True)}
    assert rows["a.png"].ok
    assert rows["b.png"].status == "bad_metadata" and "member" in rows["b.png"].error
    rows = {r.id: r for r in read_imagefolder(tmp_path, require_caption=True)}
    assert rows["b.png"].status == "no_caption" and "b.png" in rows["b.png"].error


def test_caption_column_under_another_name_is_warned_about(tmp_path):
    _folder(tmp_path, [{"file_name": "a.png", "caption": "x"}], images=("a.png",))
    (row,) = read_imagefolder(tmp_path)
    assert row.ok and row.caption is None and "'caption'" in row.warnings[0]


def test_identical_duplicates_are_merged_conflicting_ones_refused(tmp_path):
    rec = {"file_name": "a.png", "text": "x"}
    _folder(tmp_path, [rec, rec, {"file_name": "b.png", "text": "x"}, {"file_name": "sub/../b.png", "text": "y"}])
    rows = {r.id: r for r in read_imagefolder(tmp_path)}
    assert list(rows) == ["a.png", "b.png"]
    assert rows["a.png"].ok and rows["b.png"].status == "duplicate" and ":4:" in rows["b.png"].error


def test_not_a_folder_is_a_one_line_input_error(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        read_imagefolder(tmp_path / "nope")


def test_transparency_composites_on_white_and_palette_converts(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img[0, 0].tolist() == [255, 0, 0] and img[1, 1].tolist() == [255, 255, 255]
    Image.new("RGB", (4, 4), (0, 128, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0, 0].tolist() == [0, 128, 255]


def test_sixteen_bit_and_float_images_scale_to_eight_bits(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_load_row_image_marks_the_row_and_keeps_the_first_failure(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    row = Row("x.png", str(tmp_path / "x.png"))
    assert load_row_image(row) is None and row.status == "unreadable" and "x.png" in row.error
    row.fail("too_large", "later")
    assert row.status == "unreadable"
    with pytest.raises(ValueError, match="valid statuses"):
        Row("y", "y").fail("weird", "x")


def test_single_image_errors_are_one_line(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff" + b"\n" * 50)
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "x.jpg")
    assert "\n" not in str(err.value) and str(tmp_path / "x.jpg") in str(err.value)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_clean_caption_examples():
    assert clean_caption("  a\tb\n\nc  ", "w") == ("a b c", [])
    assert clean_caption("", "w") == (None, [])
    assert clean_caption("x\ud800y", "w") == ("xy", [])
    text, warns = clean_caption("é" * (MAX_CAPTION_CHARS + 5), "w")
    assert len(text) == MAX_CAPTION_CHARS and warns
    with pytest.raises(InputError, match="w: caption must be a string, got int"):
        clean_caption(3, "w")


def test_partial_line_errors_land_on_the_file_they_name():
    line = parse_metadata_line(b'{"file_name": "dir\\/a.png", "text": "cut', 7, "m:7")
    assert line.record is None and line.name == "dir/a.png" and line.error.startswith("m:7: not valid JSON")
    assert parse_metadata_line(b"   \n", 1, "m:1") is None
