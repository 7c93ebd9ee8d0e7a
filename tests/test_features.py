"""Feature computation on the tiny seeded models: what each attack reads, determinism, resume, bad rows, the CLI."""

import json
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.errors import UsageError
from audit.features import KEYS, FeaturesConfig, FeatureStore, Models
from audit.features.compute import featurize_rows, resize_pixels
from audit.imagefolder import Row
from audit.toy import scenes

N_OK = 5
SETTINGS = dict(n_gen=2, steps=2, seed=3, batch_size=3, caption_tokens=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """5 captioned toy scenes (with member labels), one corrupt image, one image without a caption."""
    folder = tmp_path_factory.mktemp("data")
    images, captions = scenes.scene_images(0, "members", N_OK)
    scenes.write_imagefolder(folder, images, captions, [True, False, True, False, True])
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"file_name": "corrupt.png", "text": "a red square", "member": True}) + "\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    scenes.write_imagefolder(folder / "_tmp", images[:1], ["x"])
    shutil.move(folder / "_tmp" / "img_00000.png", folder / "zz_nocap.png")
    shutil.rmtree(folder / "_tmp")
    return folder, images, captions


def _opts(tiny_world):
    return ["--target", str(tiny_world["target"]), "--embedder", str(tiny_world["clip"]),
            "--captioner", str(tiny_world["blip"]), "--n-gen", "2", "--steps", "2", "--seed", "3",
            "--caption-tokens", "8", "--batch-size", "3", "--quiet"]


@pytest.fixture(scope="module")
def reference(tiny_world, data, tmp_path_factory):
    """An uninterrupted store, made through the CLI."""
    out = tmp_path_factory.mktemp("ref") / "store.h5"
    result = CliRunner().invoke(app, ["features", "--data", str(data[0]), "--out", str(out), *_opts(tiny_world)])
    assert result.exit_code == 0, result.output
    assert "wrote 7 rows" in result.output and "5 ok" in result.output
    assert "1 no_caption" in result.output and "1 unreadable" in result.output
    return out


@pytest.fixture(scope="module")
def models(tiny_world):
    return Models.load(str(tiny_world["target"]), str(tiny_world["clip"]), str(tiny_world["blip"]))


def _kw(tiny_world):
    return dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]), quiet=True, **SETTINGS)


def _assert_same_store(a, b):
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    assert sa.manifest["config"] == sb.manifest["config"]
    assert len(sa) == len(sb) == sa.n_rows
    ra, rb = sa.read(ok_only=False), sb.read(ok_only=False)
    for k in KEYS:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


def test_store_layout_rows_and_statuses(reference, data, models):
    store = FeatureStore.open(reference)
    assert store.complete and store.n_rows == 7
    r = store.read(ok_only=False)
    assert r["ids"].tolist() == ["corrupt.png"] + [f"img_{i:05d}.png" for i in range(N_OK)] + ["zz_nocap.png"]
    assert r["status"].tolist() == ["unreadable"] + ["ok"] * N_OK + ["no_caption"]
    assert "corrupt.png" in r["error"][0] and "zz_nocap.png: no caption" in r["error"][-1]
    assert r["member"].tolist() == [1, 1, 0, 1, 0, 1, -1]
    g, d = 2, models.embedder.dim
    shapes = {"query_pixels": (7, 32, 32, 3), "gen_pixels": (7, g, 32, 32, 3), "query_img_emb": (7, d),
              "gen_img_emb": (7, g, d), "caption_emb": (7, d), "gen_caption_emb": (7, g, d), "gen_captions": (7, g)}
    for k, shape in shapes.items():
        assert r[k].shape == shape, k
    # Failed rows keep their row, with zeros in the arrays.
    for k in ("query_pixels", "gen_pixels", "query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb"):
        assert not r[k][[0, 6]].any(), k
    ok = store.read()
    assert len(ok["ids"]) == N_OK and (ok["status"] == "ok").all()
    for k in ("query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb"):
        np.testing.assert_allclose(np.linalg.norm(ok[k], axis=-1), 1.0, atol=1e-5, err_msg=k)
    m = store.manifest
    assert m["kind"] == "features" and m["n_rows"] == 7
    assert m["config"]["n_gen"] == 2 and m["config"]["steps"] == 2 and m["config"]["seed"] == 3
    assert m["embedder"] == models.embedder.identity() and m["captioner"] == models.captioner.identity()
    assert m["target"] == models.generator.identity()


def test_features_are_what_the_models_say(reference, data, models):
    """Each attack's inputs: generated pixels from the caption's seeds, their embeddings and captions, the query's."""
    ok = FeatureStore.open(reference).read()
    _, images, captions = data
    assert ok["caption"].tolist() == captions and set(ok["caption_source"]) == {"metadata"}
    np.testing.assert_array_equal(ok["query_pixels"], images)  # toy scenes are 32x32 already
    gen = models.generator.generate(captions, 2, 3, 2)
    np.testing.assert_array_equal(ok["gen_pixels"], gen)  # I-P / II-P read these
    flat = ok["gen_pixels"].reshape(-1, 32, 32, 3)
    # I-S / II-S: embeddings of exactly the generated pixels; II-S also of the query.
    np.testing.assert_allclose(ok["gen_img_emb"].reshape(-1, models.embedder.dim),
                               models.embedder.embed_images(flat), atol=1e-5)
    np.testing.assert_allclose(ok["query_img_emb"], models.embedder.embed_images(images), atol=1e-5)
    # III-X: the caption's text embedding; III-T: text embeddings of the captioner's captions of the generated images.
    np.testing.assert_allclose(ok["caption_emb"], models.embedder.embed_texts(captions), atol=1e-5)
    gen_caps = models.captioner.caption(flat, max_new_tokens=8)
    assert ok["gen_captions"].reshape(-1).tolist() == [" ".join(c.split()) for c in gen_caps]
    np.testing.assert_allclose(ok["gen_caption_emb"].reshape(-1, models.embedder.dim),
                               models.embedder.embed_texts(list(ok["gen_captions"].reshape(-1))), atol=1e-5)


def test_interrupted_run_resumes_to_the_same_store(reference, data, tiny_world, tmp_path):
    """Killed after the first batch, resumed: equal to the uninterrupted store (and so deterministic too)."""
    out = tmp_path / "store.h5"

    class Killed(Exception):
        pass

    def kill_after_first(n):
        raise Killed

    with pytest.raises(Killed):
        api.featurize(str(tiny_world["target"]), data[0], out, on_batch=kill_after_first, **_kw(tiny_world))
    assert FeatureStore.open(out).n_committed == 3
    with pytest.raises(UsageError, match="--resume"):
        api.featurize(str(tiny_world["target"]), data[0], out, **_kw(tiny_world))
    seen = []
    api.featurize(str(tiny_world["target"]), data[0], out, resume=True, on_batch=seen.append, **_kw(tiny_world))
    assert seen == [6, 7]  # only the missing batches were computed
    _assert_same_store(out, reference)


def test_half_written_batch_is_redone_on_resume(reference, data, tiny_world, tmp_path):
    """Arrays written but the counter never raised (a kill mid-commit): resume truncates and redoes those rows."""
    out = tmp_path / "store.h5"
    shutil.copy(reference, out)
    with h5py.File(out, "a") as f:
        f.attrs["n_committed"] = 3
        f["gen_img_emb"][3:] = 0.0  # garbage in the uncommitted part
        f["status"][3:] = "ok"
    api.featurize(str(tiny_world["target"]), data[0], out, resume=True, **_kw(tiny_world))
    _assert_same_store(out, reference)


def test_resume_with_other_settings_is_refused(reference, data, tiny_world, tmp_path):
    out = tmp_path / "store.h5"
    shutil.copy(reference, out)
    kw = {**_kw(tiny_world), "steps": 4}
    with pytest.raises(UsageError, match=r"steps: store has 2, this run has 4"):
        api.featurize(str(tiny_world["target"]), data[0], out, resume=True, **kw)


def test_missing_caption_can_be_written_by_the_captioner(data, models):
    """check/scan mode: a row without a caption gets the captioner's caption of the query image."""
    folder, images, _ = data
    rows = [Row(id="zz_nocap.png", path=str(folder / "zz_nocap.png"))]
    cfg = FeaturesConfig(n_gen=1, steps=2, missing_caption="captioner", caption_tokens=8)
    batch = featurize_rows(rows, models, cfg)
    assert rows[0].status == "ok" and rows[0].caption_source == "captioner"
    assert rows[0].caption == " ".join(models.captioner.caption(images[:1], max_new_tokens=8)[0].split())
    assert batch["caption_source"][0] == "captioner" and batch["caption"][0] == rows[0].caption


def test_resize_pixels_centre_crops_then_resizes():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255  # the centre square is white, the sides black
    out = resize_pixels(img, 32)
    assert out.shape == (32, 32, 3) and out.min() == 255


def test_cli_features_errors_are_one_line(tiny_world, data, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["features", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "s.h5"),
                                 *_opts(tiny_world)])
    assert result.exit_code == 1 and "nope: not a folder" in result.output
    result = runner.invoke(app, ["features", "--data", str(data[0]), "--out", str(tmp_path / "s.h5"),
                                 *_opts(tiny_world)[:-2], "0", "--quiet"])
    assert result.exit_code == 2 and "--batch-size must be >= 1" in result.output
    result = runner.invoke(app, ["features", "--data", str(data[0]), "--out", str(tmp_path / "s.h5"),
                                 "--target", "no-such-target"])
    assert result.exit_code == 2 and "unknown target 'no-such-target'" in result.output and "toy" in result.output
