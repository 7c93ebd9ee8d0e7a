import json

import numpy as np

from audit.toy import scenes


def test_scenes_are_deterministic_per_seed_split_and_index():
    a, ca = scenes.scene_images(7, "members", 5)
    b, cb = scenes.scene_images(7, "members", 5)
    assert np.array_equal(a, b) and ca == cb
    c, cc = scenes.scene_images(8, "members", 5)
    assert not np.array_equal(a, c)
    # Scene i does not depend on how many scenes were asked for.
    d, cd = scenes.scene_images(7, "members", 2, start=3)
    assert np.array_equal(a[3:], d) and ca[3:] == cd


def test_caption_does_not_determine_the_image():
    # Same caption content, different undescribed detail (stripes, jitter) -> different pixels.
    s = scenes.sample_scene(0, "public", 0)
    other = scenes.Scene(**{**s.__dict__, "stripe_phase": s.stripe_phase + 1.0})
    assert s.caption == other.caption
    assert np.abs(scenes.render(s).astype(int) - scenes.render(other).astype(int)).mean() > 5


def test_captions_describe_visible_content():
    s = scenes.sample_scene(3, "public", 11)
    for shape in s.shapes:
        assert f"{shape.size} {shape.colour} {shape.kind} at the {shape.position}" in s.caption
    assert s.caption.endswith(f"on a {s.background} background")


def test_write_imagefolder(tmp_path):
    images, captions = scenes.scene_images(0, "public", 3)
    scenes.write_imagefolder(tmp_path, images, captions, members=[True, False, True])
    rows = [json.loads(l) for l in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["member"] for r in rows] == [True, False, True]
    assert all((tmp_path / r["file_name"]).is_file() for r in rows)
