"""The variation tier (audit/targets/variation.py, features/variation.py, the var-* attacks): img2img on the torch path
against diffusers' own img2img pipeline, per-image seeds, the store and CLI, refusal of DALL-E mini, and separation on
the bundled toy target, which memorises its members."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import UsageError
from audit.features.variation import DATASETS, variation_features
from audit.targets.builtin import load_target
from audit.toy import scenes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def queries():
    return scenes.scene_images(0, "members", 4)


@pytest.fixture(scope="module")
def tiny_target(tiny_world):
    return load_target(str(tiny_world["target"]))


def test_a_variation_is_diffusers_img2img_on_the_same_modules(tiny_target, queries):
    """Given the VAE posterior mean as its init latents and one generator per image, diffusers'
    StableDiffusionImg2ImgPipeline built from the loaded components makes the same images (its timesteps, noising,
    DDIM steps and decoding)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    images, captions = queries
    seeds = [11, 12, 13, 14]
    ours = tiny_target.vary_with_seeds(images, captions, seeds, 0.6, 5)
    pipe = StableDiffusionImg2ImgPipeline(**tiny_target.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(tiny_target.denoiser().encode_images(images))
    want = pipe(list(captions), image=latents, strength=0.6, num_inference_steps=5, guidance_scale=1.0,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    want = np.clip(np.round(want * 255), 0, 255).astype(np.uint8)
    assert ours.shape == (4, tiny_target.resolution, tiny_target.resolution, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 1


def test_each_variation_depends_on_its_own_image_prompt_and_seed_only(tiny_target, queries):
    images, captions = queries
    batch = tiny_target.vary_with_seeds(images, captions, [1, 2, 3, 4], 0.5, 6, guidance=3.0)
    alone = tiny_target.vary_with_seeds(images[2:3], captions[2:3], [3], 0.5, 6, guidance=3.0)
    np.testing.assert_array_equal(batch[2], alone[0])
    other_seed = tiny_target.vary_with_seeds(images[2:3], captions[2:3], [99], 0.5, 6, guidance=3.0)
    assert np.abs(other_seed.astype(int) - alone.astype(int)).max() > 0
    # Less strength, less change: the lowest strength stays closer to the init image than the highest.
    low = tiny_target.vary_with_seeds(images, [""] * 4, [1, 2, 3, 4], 0.2, 10).astype(float)
    high = tiny_target.vary_with_seeds(images, [""] * 4, [1, 2, 3, 4], 1.0, 10).astype(float)
    assert ((low - images) ** 2).mean() < ((high - images) ** 2).mean()
    with pytest.raises(UsageError, match="runs no denoising step"):
        tiny_target.vary_with_seeds(images, captions, [1, 2, 3, 4], 0.05, 10)


def test_variation_features_are_deterministic_and_independent_of_the_batch(tiny_world, tiny_target, queries):
    from audit.targets.builtin import load_embedder

    images, captions = queries
    emb = load_embedder(str(tiny_world["clip"]))
    f = variation_features(tiny_target, emb, images, list(captions), (0.3, 0.6), 3, 5, seed=0)
    assert set(f) == set(DATASETS)
    assert f["var_pixel_dist"].shape == (4, 2, 3) and f["var_pixel_pair"].shape == (4, 2, 3)
    assert f["var_mean_pixel_dist"].shape == (4, 2) and (f["var_pixel_dist"] > 0).all()
    # The average of the variations is closer to the query than the variations are on average (convexity).
    assert (f["var_mean_pixel_dist"] <= f["var_pixel_dist"].mean(2) + 1e-7).all()
    one = variation_features(tiny_target, emb, images[1:2], list(captions[1:2]), (0.3, 0.6), 3, 5, seed=0)
    for key in DATASETS:
        np.testing.assert_allclose(one[key][0], f[key][1], rtol=1e-3, atol=1e-6)  # batched float rounding
    other = variation_features(tiny_target, emb, images[1:2], list(captions[1:2]), (0.3, 0.6), 3, 5, seed=1)
    assert not np.allclose(other["var_pixel_dist"], one["var_pixel_dist"])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 labelled toy scenes, one without a caption, and one corrupt image."""
    folder = tmp_path_factory.mktemp("var_data")
    images, captions = scenes.scene_images(1, "members", 12)
    scenes.write_imagefolder(folder, images, captions, [i % 2 == 0 for i in range(12)])
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"file_name": "corrupt.png", "text": "a red square", "member": True}) + "\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return folder


def _models(tiny_world):
    return ["--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"])]


@pytest.fixture(scope="module")
def var_store(tiny_world, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("var_store") / "store.h5"
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(out), "--tier", "variation", "--var-strengths", "0.25,0.5",
                                 "--n-var", "2", "--steps", "4", "--batch-size", "5", "-q", *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    # 2 variations x (1 + 2) steps
    assert "tiers variation (UNet evaluations per query: variation 6)" in r.output and "12 ok" in r.output
    return out


def test_store_holds_the_variation_datasets_and_records_tier_sweep_and_cost(var_store, tiny_world):
    from audit.features.store import FeatureStore
    from audit.targets.builtin import load_embedder

    fs = FeatureStore.open(var_store)
    assert fs.tiers == ("variation",) and fs.n_gen == 0 and (fs.n_strengths, fs.n_var) == (2, 2)
    assert fs.manifest["unet_evaluations_per_query"] == {"variation": 6}
    cfg = fs.manifest["config"]
    assert cfg["var_strengths"] == [0.25, 0.5] and cfg["n_var"] == 2 and cfg["tier"] == "variation"
    assert "graybox_timesteps" not in cfg
    b = fs.read(ok_only=False)
    ok = b["status"] == "ok"
    assert b["var_pixel_dist"].shape == (13, 2, 2) and b["var_clip_pair"].shape == (13, 2, 1)
    assert (b["var_pixel_dist"][ok] > 0).all() and (b["var_pixel_dist"][~ok] == 0).all()
    # The rows equal the library call on the same images, whatever the batch of 5.
    images, captions = scenes.scene_images(1, "members", 12)
    want = variation_features(load_target(str(tiny_world["target"])), load_embedder(str(tiny_world["clip"])),
                              images, captions, (0.25, 0.5), 2, 4, seed=0)
    order = np.argsort([str(i) for i in b["ids"][ok]])
    for key in DATASETS:
        np.testing.assert_allclose(b[key][ok][order], want[key], rtol=1e-3, atol=1e-6)


def test_one_variation_per_strength_makes_a_store_with_no_pairs_that_heads_read(tiny_world, labelled, tmp_path):
    from audit.attacks.inputs import build_inputs
    from audit.features.store import FeatureStore

    out = tmp_path / "one.h5"
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(out), "--tier", "variation", "--var-strengths", "0.5", "--n-var", "1",
                                 "--steps", "2", "--batch-size", "13", "-q", *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    b = FeatureStore.open(out).read(ok_only=True)
    assert b["var_pixel_pair"].shape == (12, 1, 0) and (b["var_pixel_dist"] > 0).all()
    x = build_inputs(b, "var-all")
    assert len(x) == 12 and np.isfinite(np.asarray(x)).all()


def test_train_evaluate_and_check_report_variation_attacks_with_tiers(var_store, tiny_world, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    heads = tmp_path / "heads"
    r = CliRunner().invoke(app, ["train", str(var_store), "--out", str(heads), "--epochs", "2", "--folds", "0", "-q"])
    assert r.exit_code == 0, r.output
    info = json.loads((heads / "heads.json").read_text())
    assert list(info["attacks"]) == ["var-pixel", "var-pixel-score", "var-clip", "var-clip-score", "var-all",
                                     "var-all-score", "blind"]
    assert info["attacks"]["var-pixel-score"]["kind"] == "score" and info["attacks"]["var-all"]["tier"] == "variation"
    assert info["input_signature"] == {"embedding_dim": 64, "var_strengths": 2, "n_var": 2}
    assert all((heads / f"{a}.onnx").exists() for a in info["attacks"])
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(app, ["evaluate", str(var_store), "--heads", str(heads), "--json", str(out),
                                 "--bootstrap", "20", "--report", str(tmp_path / "ev.html")])
    assert r.exit_code == 0, r.output
    ev = json.loads(out.read_text())
    for name, m in ev["attacks"].items():
        assert m["tier"] == ("black-box" if name == "blind" else "variation")
        assert len(m["auc"]["ci95"]) == 2
    assert "<td>var-clip-score</td><td>variation</td>" in (tmp_path / "ev.html").read_text()
    # check: the heads' sweep is recomputed for one image, on its caption, and the verdict says its tier.
    images, captions = scenes.scene_images(1, "members", 1)
    scenes.write_imagefolder(tmp_path / "q", images, captions)
    r = CliRunner().invoke(app, ["check", str(tmp_path / "q" / "img_00000.png"), "--caption", captions[0],
                                 "--target", str(tiny_world["target"]), "--heads", str(heads), "--json",
                                 "--attack", "var-pixel-score", *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert v["tier"] == "variation" and v["attack"] == "var-pixel-score"
    assert {s["tier"] for a, s in v["scores"].items() if a != "blind"} == {"variation"}


def test_variation_on_a_dalle_target_fails_in_one_line(tiny_world, labelled, tmp_path):
    from audit.testing import tiny

    dalle = tiny.build_tiny_dalle(tmp_path)
    r = CliRunner().invoke(app, ["features", "--target", str(dalle), "--data", str(labelled), "--out",
                                 str(tmp_path / "x.h5"), "--tier", "variation", *_models(tiny_world)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no image-variation (img2img) access" in lines[0] and "--tier black-box" in lines[0]
    assert not (tmp_path / "x.h5").exists()
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(tmp_path / "y.h5"), "--tier", "variation", "--var-strengths", "0.5,0.2"])
    assert r.exit_code == 2 and "--var-strengths must be strictly increasing" in r.stderr


def test_compiled_variations_equal_the_torch_path(tiny_export, tiny_target, queries):
    """The export's vae_encoder, UNet and DDIM schedule make the torch path's variations within the export's
    stated image tolerance (tests/test_runtime.py: 2 uint8 levels)."""
    compiled = load_target(str(tiny_export["path"]))
    images, captions = queries
    for strength, guidance in ((0.5, 1.0), (0.8, 3.0)):
        a = compiled.vary_with_seeds(images, captions, [5, 6, 7, 8], strength, 6, guidance)
        b = tiny_target.vary_with_seeds(images, captions, [5, 6, 7, 8], strength, 6, guidance)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert a.shape == b.shape and diff.max() <= 2 and diff.mean() < 0.05, (strength, diff.max())
    # Per-image seeds on the compiled path too.
    alone = compiled.vary_with_seeds(images[3:], captions[3:], [8], 0.8, 6, 3.0)
    np.testing.assert_array_equal(alone[0], a[3])


def test_the_variation_benchmark_times_every_tier_and_counts_unet_evaluations(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "variation.py"
    spec = importlib.util.spec_from_file_location("bench_variation", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--queries", "2", "--rounds", "1", "--steps", "4", "--n-gen", "1", "--strengths", "0.25,0.5",
                      "--n-var", "2", "--caption-tokens", "4", "--json", str(tmp_path / "b.json")])
    table = out["toy"]
    assert {k: t["unet_evaluations_per_query"] for k, t in table.items()} == {"black-box": 4, "variation": 6,
                                                                             "gray-box": 19}
    assert all(t["seconds_per_query"] > 0 for t in table.values()) and table["black-box"]["iv_over_this"] == 1.0
    assert json.loads((tmp_path / "b.json").read_text())["toy"]["variation"]["verdicts"].startswith("var-pixel")


@pytest.fixture(scope="module")
def two_tier_heads(tiny_world, labelled, tmp_path_factory):
    """Heads of the gray-box and variation tiers, trained on one store of both."""
    folder = tmp_path_factory.mktemp("two_tiers")
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(folder / "s.h5"), "--tier", "gray-box,variation", "--var-strengths",
                                 "0.25,0.5", "--n-var", "2", "--steps", "4", "--graybox-timesteps", "100,300", "-q",
                                 *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", str(folder / "s.h5"), "--out", str(folder / "heads"), "--epochs", "2",
                                 "--attacks", "loss,PIA,var-pixel,var-all-score", "-q"])
    assert r.exit_code == 0, r.output
    return folder / "heads"


def test_tier_restricts_check_and_scan_to_the_heads_attacks_of_that_tier(tiny_world, labelled, two_tier_heads,
                                                                          tmp_path):
    from audit import api

    target, heads = str(tiny_world["target"]), str(two_tier_heads)
    models = dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]))
    image = labelled / "img_00000.png"
    both = api.check(image, "a caption", target=target, heads=heads, **models)
    assert {s["tier"] for a, s in both.scores.items() if a != "blind"} == {"gray-box", "variation"}
    var = api.check(image, "a caption", target=target, heads=heads, tier="variation", **models)
    # Only the variation attacks (and the blind baseline) are scored, the first of them decides, and their
    # scores are those of the run that computed both tiers: the same features.
    assert list(var.scores) == ["var-pixel", "var-all-score", "blind"]
    assert (var.attack, var.tier) == ("var-pixel", "variation")
    for a in var.scores:
        assert var.scores[a]["probability"] == pytest.approx(both.scores[a]["probability"], abs=1e-6)
    gray = api.check(image, "a caption", target=target, heads=heads, tier="gray-box", attack="PIA", **models)
    assert (gray.attack, gray.tier, set(gray.scores)) == ("PIA", "gray-box", {"loss", "PIA", "blind"})
    assert api.check(image, "a caption", target=target, heads=heads, tier="all", **models).scores.keys() == \
        both.scores.keys()

    # A tier the heads do not have, or an attack outside the tier: one line naming what the heads have.
    for args, text in ((["--tier", "black-box"], "have no attack of that tier; their tiers: gray-box, variation"),
                       (["--tier", "variation", "--attack", "loss"], "attack 'loss' is gray-box, not of --tier "
                                                                     "variation"),
                       (["--tier", "grey"], "unknown tier 'grey'")):
        r = CliRunner().invoke(app, ["check", str(image), "--caption", "c", "--target", target, "--heads", heads,
                                     *args, *_models(tiny_world)])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and text in r.stderr, (args, r.output)

    # scan: every row, its JSONL and the summary say the tier; the features computed are that tier's alone.
    out = tmp_path / "r.jsonl"
    r = CliRunner().invoke(app, ["scan", str(labelled), "--target", target, "--heads", heads, "--out", str(out),
                                 "--tier", "gray-box", "--json", "-q", "--report", str(tmp_path / "r.html"),
                                 *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    default = json.loads((two_tier_heads / "heads.json").read_text())["default_attack"]
    assert default in ("loss", "PIA")  # the heads' default is gray-box here, so it decides
    assert (summary["attack"], summary["tier"], summary["features"]["tier"]) == (default, "gray-box", "gray-box")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(rows) == 13 and len(ok) == 12
    assert all(row["tier"] == "gray-box" and set(row["scores"]) == {"loss", "PIA", "blind"} for row in ok)
    assert "gray-box" in (tmp_path / "r.html").read_text()
