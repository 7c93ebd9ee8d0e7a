"""Calibration against a reference model (``--reference``, audit/features/reference.py), the CLiD gray-box attack
and the toy world's base model ``toy-base``: reference features equal the reference featurised alone with the same
seeds, a reference that does not fit is refused in one line before any work, the store records the reference, CLiD
is its definition on the pipeline's own modules, and the reference attacks and scores are built as documented."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit.cli import app
from audit.features.graybox import graybox_errors, masked_caption
from audit.targets.builtin import load_target
from audit.toy import scenes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _copy_with_noise(src, dst, part: str, scale: float = 0.05, seed: int = 0):
    """A copy of a pipeline folder whose ``part`` (unet or vae) weights carry seeded Gaussian noise."""
    from audit.targets.diffusion import load_pipeline

    pipe = load_pipeline(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in getattr(pipe, part).parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    pipe.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {"target": tiny_world["target"],
            "reference": _copy_with_noise(tiny_world["target"], root / "base", "unet"),
            "other_vae": _copy_with_noise(tiny_world["target"], root / "other_vae", "vae", seed=1),
            "args": ["--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"])]}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref_data")
    images, captions = scenes.scene_images(2, "members", 6)
    scenes.write_imagefolder(folder, images, captions, [i % 2 == 0 for i in range(6)])
    return folder


def _features(models, data, out, target, *extra):
    r = CliRunner().invoke(app, ["features", "--target", str(target), "--data", str(data), "--out", str(out),
                                 "--tier", "black-box,gray-box", "--n-gen", "1", "--steps", "2", "--caption-tokens", "4",
                                 "--graybox-timesteps", "200", "-q", *models["args"], *extra])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def ref_store(models, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_store") / "ref.h5"
    return out, _features(models, labelled, out, models["target"], "--reference", str(models["reference"]))


def test_reference_features_equal_the_reference_featurised_alone(models, labelled, ref_store, tmp_path):
    from audit.features.store import FeatureStore

    (tmp_path / "ref.h5").symlink_to(ref_store[0])
    r = ref_store[1]
    # Both models' UNet evaluations: n_gen x steps, and eps(z_0, 0) + K for each of loss, PIA, SecMI + 3 x 3 for
    # CLiD (K = 1), twice.
    assert "black-box 4, gray-box 26" in r.output and "reference base" in r.output
    _features(models, labelled, tmp_path / "alone.h5", models["reference"])
    _features(models, labelled, tmp_path / "target.h5", models["target"])
    with_ref, alone, target = (FeatureStore.open(tmp_path / f"{n}.h5") for n in ("ref", "alone", "target"))
    a, b, t = with_ref.read(), alone.read(), target.read()
    model_keys = [k for k in b if k.startswith(("gen_", "graybox_"))]
    assert set(model_keys) == {"gen_captions", "gen_pixels", "gen_img_emb", "gen_caption_emb", "graybox_loss",
                               "graybox_pia", "graybox_secmi", "graybox_clid"}
    for key in model_keys:
        # The same seeds and noise on the reference: what the reference computes alone, bit for bit; the target's
        # own features are those of a run without a reference.
        np.testing.assert_array_equal(a["ref_" + key], b[key], err_msg=key)
        np.testing.assert_array_equal(a[key], t[key], err_msg=key)
    assert not np.array_equal(a["ref_graybox_loss"], a["graybox_loss"])  # a different UNet, seen
    # The manifest names the reference by identity, and a resume with another reference is refused.
    ident = load_target(str(models["reference"])).identity()
    assert with_ref.reference == ident and with_ref.manifest["reference"]["hash"] == ident["hash"]
    assert alone.reference is None and target.reference is None


def test_heads_trained_with_a_reference_check_with_it_and_refuse_without(models, ref_store, tmp_path, monkeypatch):
    from audit import api

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    heads = tmp_path / "heads"
    api.train(ref_store[0], heads, attacks="PIA-ref,PIA-ref-score", epochs=1, register=False, quiet=True,
              folds=0)
    info = json.loads((heads / "heads.json").read_text())
    assert info["attacks"]["PIA-ref-score"]["standardisation"]["fitted_on"] == "train non-members"
    assert info["manifest"]["feature_store"]["reference"]["name"] == "base"
    images, captions = scenes.scene_images(5, "members", 1)
    scenes.write_imagefolder(tmp_path / "q", images, captions)
    query = [str(tmp_path / "q" / "img_00000.png"), "--caption", captions[0], "--target", str(models["target"]),
             "--heads", str(heads), *models["args"]]
    r = CliRunner().invoke(app, ["check", *query, "--json", "--reference", str(models["reference"])])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)
    assert set(v["scores"]) == {"PIA-ref", "PIA-ref-score", "blind"} and v["tier"] == "gray-box"
    for extra, message in (([], "pass it with --reference"), (["--reference", str(models["target"])],
                                                              "this run's reference is 'target'")):
        r = CliRunner().invoke(app, ["check", *query, *extra])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.output


def test_a_compiled_export_as_the_reference_equals_it_featurised_alone(models, labelled, tiny_export, tmp_path,
                                                                          monkeypatch):
    """`--reference EXPORT`: an `audit export` folder serves as the reference (its onnxruntime graphs, the same
    seeds and noise), equal to that export featurised alone; the target's half is the torch target's own."""
    from audit.features.store import FeatureStore

    monkeypatch.setenv("AUDIT_THREADS", "1")
    export = str(tiny_export["path"])
    r = _features(models, labelled, tmp_path / "ref.h5", models["target"], "--reference", export)
    assert "black-box 4, gray-box 26" in r.output
    _features(models, labelled, tmp_path / "alone.h5", export)
    _features(models, labelled, tmp_path / "target.h5", models["target"])
    with_ref, alone, target = (FeatureStore.open(tmp_path / f"{n}.h5") for n in ("ref", "alone", "target"))
    a, b, t = with_ref.read(), alone.read(), target.read()
    # Images bit for bit; the gray-box losses within float32 rounding (the two models share batches there).
    for key in [k for k in b if k.startswith(("gen_", "graybox_"))]:
        same = np.testing.assert_array_equal if key.startswith("gen_") else \
            (lambda x, y, err_msg: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=err_msg))
        same(a["ref_" + key], b[key], err_msg=key)
        same(a[key], t[key], err_msg=key)
    # The export is of the target's own weights: the same images from the same seeds, within the runtime's
    # stated tolerance of the torch path (2 uint8 levels).
    diff = np.abs(a["ref_gen_pixels"].astype(int) - a["gen_pixels"].astype(int))
    assert diff.max() <= 2
    assert with_ref.reference == load_target(export).identity()


def test_a_reference_that_does_not_fit_is_refused_in_one_line_before_any_work(models, labelled, tmp_path):
    out = tmp_path / "x.h5"
    r = CliRunner().invoke(app, ["features", "--target", str(models["target"]), "--data", str(labelled), "--out",
                                 str(out), "--tier", "gray-box", "--reference", str(models["other_vae"]), "-q",
                                 *models["args"]])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit target" in lines[0] and "VAE differs" in lines[0], r.stderr
    assert not out.exists()


def test_clid_is_its_definition_on_the_pipelines_own_modules(models, tiny_world):
    """Conditional, unconditional and masked-caption losses at CLiD's timesteps, recomputed with the diffusers
    pipeline one UNet call at a time, with the noise drawn as documented (seed, caption, image, "clid")."""
    from audit.seeding import query_seed

    images, captions = scenes.scene_images(0, "members", 3)
    gen = load_target(str(tiny_world["target"]))
    got, evals = graybox_errors(gen.denoiser(), images, captions, (100,), seed=4, attacks=("CLiD",),
                                clid_timesteps=(440, 450, 460))
    assert set(got) == {"graybox_clid"} and got["graybox_clid"].shape == (3, 3, 3) and evals == 3 * 9
    pipe, i = gen.pipe, 1
    masked = masked_caption(captions[i], 4)
    assert 0 < len(masked.split()) < len(captions[i].split())
    assert set(masked.split()) <= set(captions[i].split())
    with torch.no_grad():
        x = torch.from_numpy(images[i:i + 1]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        g = torch.Generator().manual_seed(query_seed(4, captions[i], images[i].tobytes(), "clid"))
        noise = torch.randn((3, *z0.shape[1:]), generator=g)
        for j, text in enumerate((captions[i], "", masked)):
            ctx = pipe.encode_prompt(text, "cpu", 1, False)[0]
            for k, t in enumerate((440, 450, 460)):
                a = pipe.scheduler.alphas_cumprod[t]
                zt = a.sqrt() * z0 + (1 - a).sqrt() * noise[k:k + 1]
                want = ((pipe.unet(zt, torch.tensor([t]), encoder_hidden_states=ctx).sample - noise[k:k + 1]) ** 2)
                np.testing.assert_allclose(got["graybox_clid"][i, k, j], want.mean(), rtol=1e-4)


def test_reference_attacks_and_calibrated_scores_are_built_as_documented():
    from audit.attacks.inputs import ATTACKS, build_inputs, uses_reference
    from audit.attacks.nets import standardisation

    rng = np.random.default_rng(0)
    b = {k: rng.random((5, 3)).astype(np.float32) + 0.1 for k in ("graybox_loss", "ref_graybox_loss")}
    t, r = build_inputs(b, "loss"), np.log(b["ref_graybox_loss"])
    np.testing.assert_allclose(build_inputs(b, "loss-ref"), np.concatenate([t, r, t - r], axis=1), rtol=1e-6)
    want = -np.log(b["graybox_loss"].mean(1)) + np.log(b["ref_graybox_loss"].mean(1))
    np.testing.assert_allclose(build_inputs(b, "loss-ref-score")[:, 0], want, rtol=1e-5)
    assert ATTACKS["loss-ref-score"].kind == "calibrated" and uses_reference("PIA-ref") and not uses_reference("PIA")
    assert "blind-ref" not in ATTACKS and "IV-ref" in ATTACKS and "CLiD-ref-score" in ATTACKS
    # A calibrated score is standardised on the non-members alone, never on both labels pooled.
    x, y = np.array([[0.0], [2.0], [10.0], [12.0]], np.float32), np.array([0, 0, 1, 1])
    mean, std = standardisation("calibrated", x, y)
    assert mean[0] == 1.0 and std[0] == 1.0
    assert standardisation("score", x, y)[0][0] == 6.0


def test_toy_base_loads_fits_and_differs_from_the_toy_target():
    from audit.features.reference import fit_problems

    toy, base = load_target("toy"), load_target("toy-base")
    assert base.identity()["name"] == "toy-base" and base.identity()["hash"] != toy.identity()["hash"]
    unet_t, unet_b = dict(toy.pipe.unet.named_parameters()), dict(base.pipe.unet.named_parameters())
    assert unet_t.keys() == unet_b.keys()
    assert max(float((unet_t[k] - unet_b[k]).abs().max()) for k in unet_t) > 1e-3
    # The VAE is frozen after its own stage: the base shares it, so it fits as the target's reference.
    for k, v in toy.pipe.vae.state_dict().items():
        assert torch.equal(v, base.pipe.vae.state_dict()[k]), k
    assert fit_problems(toy, base) == []
    assert json.loads((base._path / "base.json").read_text())["stage"] == "pretrain"
