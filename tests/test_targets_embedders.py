"""Real embedders and captioners by name: OpenAI CLIP and BLIP from the HF cache (tiny models under the real repo
ids), open_clip models from a folder, a cached hf-hub repo or a pretrained tag."""

import json
import shutil

import numpy as np
import pytest
import torch

from audit.errors import ModelNotFoundError, UnknownNameError, UnsafeWeightsError
from audit.manifest import weights_hash
from audit.models.open_clip import OpenCLIPEmbedder
from audit.targets import load_captioner, load_embedder
from audit.hub import model_hash
from audit.toy import scenes

from targets_fixtures import hub_cache, one_torch_thread, tiny_families  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def images():
    return scenes.scene_images(4, "public", 3)


def test_openai_clip_and_blip_names_load_from_the_cache(hub_cache, images):
    clip = load_embedder("openai/clip-vit-large-patch14")
    assert clip.identity()["name"] == "openai/clip-vit-large-patch14"
    # A cached snapshot is identified by its commit, not by hashing every byte of the repo.
    assert clip.identity()["hash"] == model_hash(clip._path) != weights_hash(clip._path)
    emb = clip.embed_images(images[0])
    assert emb.shape == (3, clip.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    blip = load_captioner("blip-base")
    assert blip.identity()["name"] == "blip-base"
    assert len(blip.caption(images[0][:2], max_new_tokens=5)) == 2


def test_open_clip_folder_hub_repo_and_hub_id_are_one_model(hub_cache, tiny_families, images):
    imgs, captions = images
    by_folder = load_embedder(str(tiny_families["open_clip"]))
    by_hub = load_embedder("open_clip:hf-hub:tiny-org/tiny-open-clip")
    by_id = load_embedder("tiny-org/tiny-open-clip")
    assert isinstance(by_folder, OpenCLIPEmbedder) and by_folder.dim == 32
    assert by_hub.identity()["name"] == "open_clip:hf-hub:tiny-org/tiny-open-clip"
    assert by_hub.identity()["hash"] == by_id.identity()["hash"]
    img = by_folder.embed_images(imgs)
    txt = by_folder.embed_texts(captions)
    assert img.shape == txt.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(np.concatenate([img, txt]), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(by_hub.embed_images(imgs), img, atol=1e-6)
    np.testing.assert_allclose(by_id.embed_texts(captions), txt, atol=1e-6)
    # Batch independence and any input size: one image alone, and upscaled, embed as in the batch / close to it.
    np.testing.assert_allclose(by_folder.embed_images(imgs[1:2]), img[1:2], atol=1e-5)
    big = np.repeat(np.repeat(imgs[:1], 4, axis=1), 4, axis=2)
    assert big.shape[1:3] == (128, 128) and by_folder.embed_images(big).shape == (1, 32)
    assert not np.allclose(img[0], img[1])


def test_open_clip_weights_match_the_saved_state(tiny_families):
    from safetensors.torch import load_file

    emb = load_embedder(str(tiny_families["open_clip"]))
    saved = load_file(str(tiny_families["open_clip"] / "open_clip_model.safetensors"))
    loaded = emb.model.state_dict()
    assert set(saved) <= set(loaded)
    for key in ("visual.conv1.weight", "token_embedding.weight", "text_projection"):
        torch.testing.assert_close(loaded[key], saved[key])


def test_open_clip_tags_resolve_to_hub_repos_or_say_how_to_fetch(hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        load_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K: open_clip:ViT-B-32/laion2b_s34b_b79k weights are not in the local "
            "Hugging Face cache") in str(err.value)
    assert "`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_model.safetensors`" in str(err.value)
    with pytest.raises(UnknownNameError, match="ViT-B-32 has no pretrained tag 'nonsense'; its tags are: .*openai"):
        load_embedder("open_clip:ViT-B-32/nonsense")
    with pytest.raises(UnknownNameError, match="unknown embedder 'open_clip:ViT-B-32'; registered embedders are"):
        load_embedder("open_clip:ViT-B-32")


def test_pickle_only_open_clip_folder_is_refused(tiny_families, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "oc"
    folder.mkdir()
    shutil.copyfile(tiny_families["open_clip"] / "open_clip_config.json", folder / "open_clip_config.json")
    torch.save(load_file(str(tiny_families["open_clip"] / "open_clip_model.safetensors")),
               folder / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="open_clip_pytorch_model.bin: only pickle weights .*--allow-pickle"):
        load_embedder(str(folder))
    allowed = load_embedder(str(folder), allow_pickle=True)
    reference = load_embedder(str(tiny_families["open_clip"]))
    np.testing.assert_allclose(allowed.embed_texts(["a red circle"]), reference.embed_texts(["a red circle"]))


def test_folders_that_are_not_embedders_or_captioners(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.json").write_text(json.dumps({}))
    with pytest.raises(ModelNotFoundError, match="not an embedder folder: expected a transformers CLIPModel"):
        load_embedder(str(tmp_path / "x"))
    with pytest.raises(ModelNotFoundError, match="not a captioner folder"):
        load_captioner(str(tmp_path / "x"))
