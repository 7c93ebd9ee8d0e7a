"""The gray-box tier (audit/features/graybox.py, targets/denoiser.py, runtime/denoiser.py): the attacks' definitions
against the pipeline's own modules, compiled = torch within tolerance, determinism, the store and CLI, refusal of
targets without weights, and separation on the bundled toy target, which memorises its members."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import ArtifactError, UsageError
from audit.features.graybox import DATASETS, graybox_errors, unet_evaluations
from audit.targets.builtin import load_target
from audit.toy import scenes

TIMESTEPS = (100, 250, 400)
# Compiled vs torch: the graphs match PyTorch to ~1e-6 absolutely; the errors are differences of noise predictions
# (PIA raises them to the 4th power), measured within 1e-4 relative on the tiny and the toy targets.
RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second thread, and two threads collapse when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def queries():
    images, captions = scenes.scene_images(0, "members", 6)
    return images, captions


@pytest.fixture(scope="module")
def torch_denoiser(tiny_world):
    return load_target(str(tiny_world["target"])).denoiser()


def test_each_attack_is_its_definition_on_the_pipelines_own_modules(tiny_world, torch_denoiser, queries):
    """Recompute one query's errors with the diffusers pipeline directly (VAE posterior mean, the pipeline's
    prompt encoding, UNet calls one at a time) and compare with the batched implementation."""
    from audit.seeding import query_seed

    images, captions = queries
    pipe = load_target(str(tiny_world["target"])).pipe
    got, evals = graybox_errors(torch_denoiser, images, captions, TIMESTEPS, seed=5)
    # K for the loss, 1 + K each for PIA and SecMI, eps(z_0, 0) shared: 3K + 1 per query; 3 x 3 for CLiD.
    assert evals == unet_evaluations(tuple(DATASETS), len(TIMESTEPS)) * len(images) == (3 * 3 + 1 + 9) * 6
    i = 2
    ac = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        x = torch.from_numpy(images[i:i + 1]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ctx = pipe.encode_prompt(captions[i], "cpu", 1, False)[0]

        def eps(z, t):
            return pipe.unet(z, torch.tensor([t]), encoder_hidden_states=ctx).sample

        def ddim(z, e, a_from, a_to):
            return a_to.sqrt() * (z - (1 - a_from).sqrt() * e) / a_from.sqrt() + (1 - a_to).sqrt() * e

        g = torch.Generator().manual_seed(query_seed(5, captions[i], images[i].tobytes(), "loss"))
        noise = torch.randn((len(TIMESTEPS), *z0.shape[1:]), generator=g)
        e0 = eps(z0, 0)
        chain, e = [z0], e0
        for k, t in enumerate(TIMESTEPS):
            a = ac[t]
            want_loss = ((eps(a.sqrt() * z0 + (1 - a).sqrt() * noise[k:k + 1], t) - noise[k:k + 1]) ** 2).mean()
            want_pia = ((eps(a.sqrt() * z0 + (1 - a).sqrt() * e0, t) - e0).abs() ** 4).mean()
            prev = ac[TIMESTEPS[k - 1]] if k else ac[0]
            chain.append(ddim(chain[-1], e, prev, a))
            e = eps(chain[-1], t)
            want_secmi = ((ddim(chain[-1], e, a, prev) - chain[-2]) ** 2).mean()
            np.testing.assert_allclose(got["graybox_loss"][i, k], want_loss, rtol=1e-4)
            np.testing.assert_allclose(got["graybox_pia"][i, k], want_pia, rtol=1e-4)
            np.testing.assert_allclose(got["graybox_secmi"][i, k], want_secmi, rtol=1e-4)


def test_features_are_deterministic_and_independent_of_the_batch(torch_denoiser, queries):
    images, captions = queries
    a, _ = graybox_errors(torch_denoiser, images, captions, TIMESTEPS, seed=0)
    b, _ = graybox_errors(torch_denoiser, images, captions, TIMESTEPS, seed=0)
    alone, _ = graybox_errors(torch_denoiser, images[3:4], captions[3:4], TIMESTEPS, seed=0)
    reordered, _ = graybox_errors(torch_denoiser, images[::-1], captions[::-1], TIMESTEPS, seed=0)
    other_seed, _ = graybox_errors(torch_denoiser, images, captions, TIMESTEPS, seed=1)
    for key in DATASETS.values():
        np.testing.assert_array_equal(a[key], b[key])
        # Batched matrix products may round differently with the batch's size; nothing is shared between rows.
        np.testing.assert_allclose(alone[key][0], a[key][3], rtol=1e-5)
        np.testing.assert_allclose(reordered[key][::-1], a[key], rtol=1e-5)
    # Only the loss draws noise (from the seed, caption and image); PIA and SecMI are deterministic.
    assert not np.allclose(other_seed["graybox_loss"], a["graybox_loss"])
    np.testing.assert_allclose(other_seed["graybox_pia"], a["graybox_pia"], rtol=1e-6)
    np.testing.assert_allclose(other_seed["graybox_secmi"], a["graybox_secmi"], rtol=1e-6)
    # Only the attacks asked for are computed, each with its own UNet evaluations.
    pia, evals = graybox_errors(torch_denoiser, images[:2], captions[:2], TIMESTEPS, 0, ("PIA",))
    assert set(pia) == {"graybox_pia"} and evals == 2 * (1 + len(TIMESTEPS))
    np.testing.assert_allclose(pia["graybox_pia"], a["graybox_pia"][:2], rtol=1e-5)


def test_vae_encoder_is_exported_and_validated(tiny_export):
    info = tiny_export["info"]
    graph = json.loads((tiny_export["path"] / "target" / "export.json").read_text())["graphs"]["vae_encoder"]
    assert graph["input_names"] == ["images"] and graph["output_names"] == ["latents"]
    assert graph["inputs"]["images"]["shape"] == ["batch", 3, 32, 32]
    v = graph["validation"]
    assert v["passed"] and v["max_abs_err"] <= graph["tolerance"]["atol"] + 10 * graph["tolerance"]["rtol"]
    # The export's end-to-end check ran the gray-box attacks through the compiled graphs against the torch path.
    check = info["end_to_end"]["target"]["graybox"]
    assert check["n_images"] >= 3 and check["max_rel_error"] < RTOL


def test_compiled_graybox_features_equal_the_torch_path(tiny_export, torch_denoiser, queries):
    images, captions = queries
    compiled = load_target(str(tiny_export["path"])).denoiser()
    assert type(compiled).__name__ == "OnnxDenoiser"
    ours, n1 = graybox_errors(compiled, images, captions, TIMESTEPS, seed=0)
    theirs, n2 = graybox_errors(torch_denoiser, images, captions, TIMESTEPS, seed=0)
    assert n1 == n2
    for key in DATASETS.values():
        np.testing.assert_allclose(ours[key], theirs[key], rtol=RTOL, err_msg=key)


def test_an_export_without_the_vae_encoder_is_refused_in_one_line(tiny_export, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_export["path"], old, symlinks=True)
    info = json.loads((old / "target" / "export.json").read_text())
    del info["graphs"]["vae_encoder"]
    (old / "target" / "export.json").write_text(json.dumps(info))
    g = load_target(str(old))
    with pytest.raises(ArtifactError, match="no vae_encoder graph.*export the target again"):
        g.denoiser()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 labelled toy scenes and one corrupt image."""
    folder = tmp_path_factory.mktemp("gray_data")
    images, captions = scenes.scene_images(1, "members", 12)
    scenes.write_imagefolder(folder, images, captions, [i % 2 == 0 for i in range(12)])
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"file_name": "corrupt.png", "text": "a red square", "member": True}) + "\n")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return folder


def _models(tiny_world):
    return ["--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"])]


@pytest.fixture(scope="module")
def gray_store(tiny_world, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("gray_store") / "store.h5"
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(out), "--tier", "gray-box", "--graybox-timesteps", "100,250,400",
                                 "--batch-size", "5", "-q", *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    assert "tiers gray-box (UNet evaluations per query: gray-box 19)" in r.output and "12 ok" in r.output
    return out


def test_store_holds_the_graybox_datasets_and_records_tier_and_cost(gray_store, tiny_world, labelled):
    from audit.features.store import FeatureStore

    fs = FeatureStore.open(gray_store)
    assert fs.tiers == ("gray-box",) and fs.n_gen == 0 and fs.n_timesteps == 3
    assert fs.manifest["tiers"] == ["gray-box"]
    assert fs.manifest["unet_evaluations_per_query"] == {"gray-box": 19}
    assert fs.manifest["config"]["graybox_timesteps"] == [100, 250, 400]
    assert fs.manifest["config"]["clid_timesteps"] == [440, 450, 460] and fs.n_clid == 3
    b = fs.read(ok_only=False)
    assert not any(k.startswith("gen_") for k in b)
    for key in DATASETS.values():
        assert b[key].shape == ((13, 3, 3) if key == "graybox_clid" else (13, 3)) and b[key].dtype == np.float32
    ok = b["status"] == "ok"
    assert (b[key][ok] > 0).all() and (b[key][~ok] == 0).all()
    # The rows equal the library call on the same images (the seed and content decide, not the batch of 5).
    images, captions = scenes.scene_images(1, "members", 12)
    want, _ = graybox_errors(load_target(str(tiny_world["target"])).denoiser(), images, captions, (100, 250, 400), 0)
    order = np.argsort([str(i) for i in b["ids"][ok]])
    for key in DATASETS.values():
        np.testing.assert_allclose(b[key][ok][order], want[key], rtol=1e-5)


def test_train_and_evaluate_report_graybox_attacks_with_tiers_cis_and_the_blind_baseline(gray_store, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    heads = tmp_path / "heads"
    r = CliRunner().invoke(app, ["train", str(gray_store), "--out", str(heads), "--epochs", "3", "--folds", "0", "-q"])
    assert r.exit_code == 0, r.output
    for name in ("loss", "loss-score", "PIA", "PIA-score", "SecMI", "SecMI-score", "CLiD", "CLiD-score", "blind"):
        assert any(line.split()[:1] == [name] for line in r.output.splitlines()), name
    assert "PIA-score   gray-box" in r.output and "blind       black-box" in r.output
    info = json.loads((heads / "heads.json").read_text())
    assert info["attacks"]["PIA"]["tier"] == "gray-box" and info["attacks"]["PIA-score"]["kind"] == "score"
    assert info["attacks"]["PIA-score"]["training"]["epochs_run"] == 0  # untrained: calibrated only
    assert info["input_signature"] == {"embedding_dim": 64, "graybox_timesteps": 3, "clid_timesteps": 3}
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(app, ["evaluate", str(gray_store), "--heads", str(heads), "--json", str(out),
                                 "--bootstrap", "50", "--report", str(tmp_path / "ev.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "ev.html").read_text()
    assert "<th>tier</th>" in page and "<td>PIA-score</td><td>gray-box</td>" in page
    assert "gray-box attacks read none" in page  # the gallery shows the queries alone: no generated images
    ev = json.loads(out.read_text())
    assert set(ev["attacks"]) == {"loss", "loss-score", "PIA", "PIA-score", "SecMI", "SecMI-score", "CLiD",
                                  "CLiD-score", "blind"}
    for name, m in ev["attacks"].items():
        assert m["tier"] == ("black-box" if name == "blind" else "gray-box")
        assert len(m["auc"]["ci95"]) == 2
    assert ev["blind_baseline"]["n_test"] == ev["n_test"]
    assert "SecMI-score gray-box" in r.output


def test_check_scores_with_graybox_heads_and_says_the_tier(gray_store, tiny_world, tmp_path, monkeypatch):
    from audit import api

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    heads = tmp_path / "heads"
    api.train(gray_store, heads, attacks="PIA,PIA-score", epochs=2, register=False, quiet=True, folds=0)
    images, captions = scenes.scene_images(1, "members", 1)
    scenes.write_imagefolder(tmp_path / "q", images, captions)
    r = CliRunner().invoke(app, ["check", str(tmp_path / "q" / "img_00000.png"), "--caption", captions[0],
                                 "--target", str(tiny_world["target"]), "--heads", str(heads), "--json",
                                 *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    v = json.loads(r.stdout)  # stderr names the heads
    assert v["tier"] == "gray-box" and v["attack"] in ("PIA", "PIA-score")
    assert {a: s["tier"] for a, s in v["scores"].items()} == {"PIA": "gray-box", "PIA-score": "gray-box",
                                                               "blind": "black-box"}


def test_a_store_with_both_tiers_trains_every_attack(tiny_world, labelled, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    store = tmp_path / "all.h5"
    r = CliRunner().invoke(app, ["features", "--target", str(tiny_world["target"]), "--data", str(labelled),
                                 "--out", str(store), "--tier", "black-box,gray-box", "--graybox-timesteps", "200", "--n-gen", "1",
                                 "--steps", "2", "--caption-tokens", "4", "--batch-size", "13", "-q",
                                 *_models(tiny_world)])
    assert r.exit_code == 0, r.output
    assert "(UNet evaluations per query: black-box 2, gray-box 13)" in r.output
    r = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "heads"), "--epochs", "1", "--folds", "0",
                                 "--json"])
    assert r.exit_code == 0, r.output
    attacks = json.loads(r.output)["info"]["attacks"]
    assert list(attacks) == ["I-P", "I-S", "II-P", "II-S", "III-X", "III-T", "IV", "loss", "loss-score", "PIA",
                             "PIA-score", "SecMI", "SecMI-score", "CLiD", "CLiD-score", "blind"]
    assert json.loads(r.output)["info"]["default_attack"] == "IV"


def test_graybox_on_an_http_or_dalle_target_fails_in_one_line(tiny_world, labelled, tmp_path):
    from audit.testing import tiny

    dalle = tiny.build_tiny_dalle(tmp_path)
    for target, what in (("http://127.0.0.1:9/", "is an HTTP service"), (str(dalle), "token-based (DALL-E)")):
        r = CliRunner().invoke(app, ["features", "--target", target, "--data", str(labelled), "--out",
                                     str(tmp_path / "x.h5"), "--tier", "gray-box", *_models(tiny_world)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and "--tier black-box" in lines[0]
        assert not (tmp_path / "x.h5").exists()
    with pytest.raises(UsageError, match="--graybox-timesteps must be strictly increasing"):
        from audit import api

        api.featurize(str(tiny_world["target"]), labelled, tmp_path / "y.h5", tier="gray-box",
                      graybox_timesteps=(300, 200))


def test_the_bundled_toy_target_memorises_and_the_untrained_scores_see_it(tmp_path):
    """Planted: the bundled target was fine-tuned on its members; each untrained gray-box score separates 16 of
    them from 16 non-members of the same world (mean error lower for members)."""
    from sklearn.metrics import roc_auc_score

    from audit import api
    from audit.imagefolder import read_imagefolder, load_row_image

    folder = api.toy_aux_data(tmp_path / "aux", 16, 16, seed=3)
    rows = read_imagefolder(folder)
    images = np.stack([load_row_image(r) for r in rows])
    y = np.array([int(r.member) for r in rows])
    errors, _ = graybox_errors(load_target("toy").denoiser(), images, [r.caption for r in rows], (100, 300), 0)
    clid = errors.pop("graybox_clid")
    for key, e in errors.items():
        assert roc_auc_score(y, -e.mean(1)) > 0.9, key
        assert e[y == 1].mean() < e[y == 0].mean(), key
    # CLiD: a member's own caption lowers its loss more than the empty or a masked caption does.
    discrepancy = (clid[..., 1:] - clid[..., :1]).mean(axis=(1, 2))
    assert roc_auc_score(y, discrepancy) > 0.9
