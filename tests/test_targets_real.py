"""The real models (skipped unless AUDIT_REAL_WEIGHTS names a Hugging Face hub cache folder that holds them).

    AUDIT_REAL_WEIGHTS=~/.cache/huggingface/hub pytest -m real_weights tests/test_targets_real.py

Each model missing from that cache is skipped on its own (with the command that fetches it). AUDIT_REAL_DEVICE
picks the device (default cpu). The DALL-E mini checkpoints are pickles: convert them once (README) or set
AUDIT_REAL_ALLOW_PICKLE=1 to load them with torch.load(weights_only=True).
"""

import os

import numpy as np
import pytest

from audit.registry import CAPTIONERS, EMBEDDERS, TARGETS
from audit.targets import load_captioner, load_embedder, load_target

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(not os.environ.get("AUDIT_REAL_WEIGHTS"), reason="AUDIT_REAL_WEIGHTS is not set"),
]

DEVICE = os.environ.get("AUDIT_REAL_DEVICE", "cpu")
ALLOW_PICKLE = os.environ.get("AUDIT_REAL_ALLOW_PICKLE") == "1"
PROMPTS = ["a red double-decker bus driving down a city street", "a bowl of green apples on a wooden table"]


@pytest.fixture(autouse=True)
def real_cache(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.path.expanduser(os.environ["AUDIT_REAL_WEIGHTS"]))


def _need(registry, name):
    source = registry.get(name).source()
    if source.startswith("not cached"):
        pytest.skip(f"{name}: {source}")


@pytest.fixture
def clip():
    _need(EMBEDDERS, "openai/clip-vit-large-patch14")
    return load_embedder("openai/clip-vit-large-patch14", device=DEVICE)


def _diagonal_wins(sims):
    return all(sims[i, i] > sims[i, j] for i in range(len(sims)) for j in range(len(sims)) if i != j)


@pytest.mark.parametrize("name,resolution,guidance,steps", [
    ("ldm", 256, 6.0, 50), ("sd-1.4", 512, 7.5, 25), ("sd-1.5", 512, 7.5, 25), ("sd-2.1", 768, 7.5, 25),
    ("dalle-mini", 256, 16.0, 1),
])
def test_real_target_makes_images_of_its_prompts(name, resolution, guidance, steps, clip):
    _need(TARGETS, name)
    g = load_target(name, device=DEVICE, allow_pickle=ALLOW_PICKLE)
    assert g.resolution == resolution
    images = g.generate(PROMPTS, n_gen=1, seed=0, steps=steps, guidance=guidance)
    assert images.shape == (2, 1, resolution, resolution, 3) and images.std() > 10
    # Each image is closer (in CLIP space) to its own prompt than to the other one.
    sims = clip.embed_images(images[:, 0]) @ clip.embed_texts(PROMPTS).T
    assert _diagonal_wins(sims), sims
    again = g.generate(PROMPTS[:1], n_gen=1, seed=0, steps=steps, guidance=guidance)
    assert np.abs(again[0].astype(int) - images[0].astype(int)).mean() < 1.0  # seeded (GPU kernels may jitter)


def _colour_images():
    images = np.zeros((2, 224, 224, 3), np.uint8)
    images[0, ..., 0] = 220  # red
    images[1, ..., 1] = 200  # green
    return images, ["a plain red square", "a plain green square"]


@pytest.mark.parametrize("name", ["openai/clip-vit-large-patch14", "openai/clip-vit-base-patch32",
                                  "open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip:ViT-L-14/laion2b_s32b_b82k",
                                  "open_clip:ViT-H-14/laion2b_s32b_b79k"])
def test_real_embedders_match_colours_to_their_names(name):
    _need(EMBEDDERS, name)
    emb = load_embedder(name, device=DEVICE, allow_pickle=ALLOW_PICKLE)
    images, texts = _colour_images()
    sims = emb.embed_images(images) @ emb.embed_texts(texts).T
    assert _diagonal_wins(sims), sims


@pytest.mark.parametrize("name", ["blip-base", "blip-large"])
def test_real_captioners_describe_what_they_see(name, clip):
    _need(CAPTIONERS, name)
    cap = load_captioner(name, device=DEVICE)
    images, texts = _colour_images()
    captions = cap.caption(images)
    assert all(c.strip() for c in captions), captions
    # The caption of the red image reads closer to "red" than to "green", and the other way round.
    sims = clip.embed_texts(captions) @ clip.embed_texts(texts).T
    assert _diagonal_wins(sims), (captions, sims)
