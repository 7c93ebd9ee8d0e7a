"""Real targets by name, hub id and folder: cache resolution, fetch commands, LDM and SD on tiny same-architecture
models, pickle refusal, and generate -> features through the registered names."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.errors import ModelNotFoundError, UnsafeWeightsError
from audit.seeding import image_seeds
from audit.targets import default_models, load_target
from audit.hub import model_hash
from audit.toy import scenes

from targets_fixtures import hub_cache, one_torch_thread, tiny_families  # noqa: F401  (fixtures)

CAPTIONS = ["a small red circle at the top left on a grey background", "a large blue square at the center"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "audit_home"))
    return tmp_path / "empty_hub"


def test_targets_command_shows_cache_paths_and_fetch_commands(hub_cache):
    result = CliRunner().invoke(app, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.output)}
    assert rows[("target", "ldm")]["source"].startswith(f"cache: {hub_cache}/models--CompVis--ldm-text2im-large-256")
    assert rows[("target", "sd-1.5")]["source"].startswith("cache: ")
    assert rows[("target", "sd-1.4")]["source"] == (
        "not cached: hf download CompVis/stable-diffusion-v1-4 --include '*.json' '*.txt' "
        "text_encoder/model.safetensors unet/diffusion_pytorch_model.safetensors "
        "vae/diffusion_pytorch_model.safetensors")
    assert rows[("target", "dalle-mini")]["source"].startswith(f"cache: {hub_cache}/models--kuprel--min-dalle")
    assert rows[("embedder", "openai/clip-vit-large-patch14")]["source"].startswith("cache: ")
    assert rows[("embedder", "openai/clip-vit-base-patch32")]["source"].startswith(
        "not cached: hf download openai/clip-vit-base-patch32")
    assert rows[("embedder", "open_clip:ViT-B-32/laion2b_s34b_b79k")]["source"] == (
        "not cached: hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_model.safetensors")
    assert rows[("captioner", "blip-base")]["source"].startswith("cache: ")
    assert rows[("captioner", "blip-large")]["source"].startswith(
        "not cached: hf download Salesforce/blip-image-captioning-large")


def test_uncached_name_fails_in_one_line_naming_repo_and_command(empty_cache):
    with pytest.raises(ModelNotFoundError) as err:
        load_target("sd-2.1")
    msg = str(err.value)
    assert "stabilityai/stable-diffusion-2-1: not in the local Hugging Face cache" in msg
    assert "`hf download stabilityai/stable-diffusion-2-1 --include" in msg and "\n" not in msg
    # Through the CLI: one line on stderr, exit code 1, no traceback.
    result = CliRunner().invoke(app, ["serve-target", "--target", "ldm", "--port", "0"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: CompVis/ldm-text2im-large-256: not in the local Hugging Face cache ({empty_cache}) and audit never "
        "downloads; fetch it with `hf download CompVis/ldm-text2im-large-256`"]
    with pytest.raises(ModelNotFoundError, match="nobody/nothing: not in the local .* `hf download nobody/nothing`"):
        load_target("nobody/nothing")


def test_ldm_name_loads_the_ldm_pipeline_from_the_cache_and_generates_seeded_images(hub_cache):
    g = load_target("ldm")
    assert type(g.pipe).__name__ == "LDMTextToImagePipeline" and g.family == "ldm"
    assert g.resolution == 32 and g.identity()["name"] == "ldm"
    assert g.identity()["hash"] == model_hash(g._path)  # the cached commit, not the bytes
    images = g.generate(CAPTIONS, n_gen=2, seed=5, steps=2)
    assert images.shape == (2, 2, 32, 32, 3) and images.dtype == np.uint8
    # Image j of caption c comes from image_seeds(seed, c, n_gen)[j] alone: not from its batch or position.
    again = g.generate(CAPTIONS[::-1], n_gen=2, seed=5, steps=2)
    np.testing.assert_array_equal(images, again[::-1])
    direct = g.generate_with_seeds([CAPTIONS[1]] * 2, image_seeds(5, CAPTIONS[1], 2), steps=2)
    np.testing.assert_array_equal(images[1], direct)
    assert not np.array_equal(images[0, 0], images[0, 1])
    guided = g.generate(CAPTIONS[:1], n_gen=1, seed=5, steps=2, guidance=3.0)
    assert not np.array_equal(guided[0, 0], images[0, 0])


def test_name_and_hub_id_are_one_model(hub_cache):
    by_name = load_target("sd-1.5")
    by_hub_id = load_target("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert type(by_name.pipe).__name__ == "StableDiffusionPipeline"
    assert by_name.identity()["hash"] == by_hub_id.identity()["hash"]
    assert (by_name.identity()["name"], by_hub_id.identity()["name"]) == (
        "sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    np.testing.assert_array_equal(by_name.generate(CAPTIONS[:1], 1, 0, 1), by_hub_id.generate(CAPTIONS[:1], 1, 0, 1))


def test_ldm_generate_to_features_with_the_default_real_embedder_and_captioner(hub_cache, tmp_path):
    data = tmp_path / "data"
    images, captions = scenes.scene_images(1, "members", 2)
    scenes.write_imagefolder(data, images, captions, [True, False])
    assert default_models("ldm") == ("openai/clip-vit-large-patch14", "blip-base")
    summary = api.featurize("ldm", data, tmp_path / "store.h5", n_gen=2, steps=2, batch_size=2, quiet=True)
    assert summary.ok == 2, summary
    assert summary.target["name"] == "ldm"
    assert summary.embedder["name"] == "openai/clip-vit-large-patch14"
    assert summary.captioner["name"] == "blip-base"
    from audit.features import FeatureStore

    batch = FeatureStore.open(tmp_path / "store.h5").read()
    gen = load_target("ldm").generate(captions, 2, 0, 2)
    np.testing.assert_array_equal(batch["gen_pixels"], gen)  # 32 px: stored as generated
    norms = np.linalg.norm(batch["gen_img_emb"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def _pickle_component(folder, component):
    from safetensors.torch import load_file

    st = folder / component / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), folder / component / "diffusion_pytorch_model.bin")
    st.unlink()
    return folder / component / "diffusion_pytorch_model.bin"


def test_pickle_only_weights_are_refused_unless_allowed(tiny_families, tmp_path):
    folder = tmp_path / "ldm"
    shutil.copytree(tiny_families["ldm"], folder)
    pickle = _pickle_component(folder, "unet")
    with pytest.raises(UnsafeWeightsError) as err:
        load_target(str(folder))
    assert str(pickle) in str(err.value) and "--allow-pickle" in str(err.value)
    result = CliRunner().invoke(app, ["serve-target", "--target", str(folder), "--port", "0"])
    assert result.exit_code == 1 and f"error: {pickle}: only pickle weights" in result.output
    allowed = load_target(str(folder), allow_pickle=True)
    reference = load_target(str(tiny_families["ldm"]))
    # The same weights give the same images, up to one uint8 level where torch's CPU kernels round differently
    # from one process state to the next (seen with torch 2.14).
    got, want = allowed.generate(CAPTIONS[:1], 1, 0, 2), reference.generate(CAPTIONS[:1], 1, 0, 2)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1 and (got != want).mean() < 0.01


def test_folders_that_are_not_targets_say_what_a_target_folder_holds(tmp_path, tiny_families):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a target folder: expected a diffusers pipeline"):
        load_target(str(tmp_path / "empty"))
    other = tmp_path / "xl"
    other.mkdir()
    index = json.loads((tiny_families["sd"] / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelNotFoundError, match="a StableDiffusionXLPipeline pipeline; audit runs"):
        load_target(str(other))


def test_a_pipeline_with_a_safety_checker_loads_without_it(tiny_families, tmp_path):
    """Real SD repos name a safety checker, which blacks out images it flags: audit must see raw generations."""
    folder = tmp_path / "sd"
    shutil.copytree(tiny_families["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))  # as in SD 1.x; the component is not even here
    g = load_target(str(folder))
    assert g.pipe.safety_checker is None
    assert g.generate(CAPTIONS[:1], 1, 0, 1).shape == (1, 1, 32, 32, 3)
