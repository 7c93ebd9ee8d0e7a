"""The full-size builders (audit.testing.fullsize): the published architectures, checked by parameter count on the
meta device (nothing allocated), and each model built at tiny sizes through the same code path, then loaded as
users load them (from_pretrained; --target/--embedder/--captioner folders)."""

import json

import numpy as np
import pytest
import torch

from audit.errors import ArtifactError, UsageError
from audit.targets import load_captioner, load_embedder, load_target
from audit.testing import fullsize


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_published_sizes_have_the_released_parameter_counts():
    m = fullsize.MODELS
    with torch.device("meta"):
        sd = m["sd-1.5"].sizes
        # stable-diffusion-v1-5's unet, vae and text_encoder, and openai/clip-vit-large-patch14.
        assert _params(fullsize._unet(sd, sd.text_hidden)) == 859_520_964
        assert _params(fullsize._vae(sd)) == 83_653_863
        assert _params(fullsize.sd_text_encoder(sd)) == 123_060_480
        assert _params(fullsize.clip_model(m["clip-vit-l-14"].sizes)) == 427_616_513
        ldm = m["ldm-256"].sizes
        assert round(_params(fullsize._unet(ldm, ldm.text_hidden)) / 1e6) == 872
        assert round(_params(fullsize.ldm_bert(ldm)) / 1e6) == 582


@pytest.fixture(scope="module")
def tiny_sd_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fullsize")
    return root, fullsize.world("sd-1.5", tiny=True, root=root)


def test_tiny_sd_world_loads_as_users_load_it(tiny_sd_world):
    from diffusers import StableDiffusionPipeline

    _, w = tiny_sd_world
    pipe = StableDiffusionPipeline.from_pretrained(w["target"], use_safetensors=True, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    # The full CLIP vocabulary: OpenAI CLIP's ids for a common phrase.
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408

    g = load_target(str(w["target"]))
    images = g.generate(["a photo of a cat"], 1, 0, 2)
    assert images.shape == (1, 1, 64, 64, 3) and images.std() > 0
    e = load_embedder(str(w["embedder"]))
    emb = e.embed_images(images[:, 0])
    assert emb.shape == (1, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    c = load_captioner(str(w["captioner"]))
    assert len(c.processor.tokenizer) == 30524 and c.processor.tokenizer.bos_token == "[DEC]"
    assert isinstance(c.caption(images[:, 0], max_new_tokens=4)[0], str)
    record = json.loads((w["target"] / fullsize.MARKER).read_text())
    assert record["random_weights"] is True and record["tiny"] is True


def test_cache_reuses_a_build_and_refuses_a_foreign_folder(tiny_sd_world, tmp_path):
    root, w = tiny_sd_world
    unet = w["target"] / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = unet.stat().st_mtime_ns
    assert fullsize.cached("sd-1.5", tiny=True, root=root) == w["target"]
    assert unet.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert fullsize.cached("sd-1.5", tiny=True, seed=1, root=root) != w["target"]  # another seed, another build
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(ArtifactError, match="holds something else"):
        fullsize.build("sd-1.5", tmp_path / "other", tiny=True)
    with pytest.raises(UsageError, match="valid names are sd-1.5, ldm-256"):
        fullsize.build("sd-9", tmp_path / "x")


def test_tiny_ldm_is_the_papers_pipeline_family(tmp_path):
    folder = fullsize.main(["ldm-256", "--tiny", "--out", str(tmp_path / "ldm")])
    assert folder == 0
    g = load_target(str(tmp_path / "ldm"))
    assert g.family == "ldm" and type(g.pipe.bert).__name__ == "LDMBertModel"
    tok = g.pipe.tokenizer
    assert len(tok) == fullsize.BERT_VOCAB_SIZE and (tok.cls_token_id, tok.sep_token_id) == (101, 102)
    assert g.generate(["a cat"], 1, 0, 1).shape == (1, 1, 64, 64, 3)
