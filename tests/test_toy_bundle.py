"""The shipped toy world loads with nothing but from_pretrained, and generates, embeds and captions."""

import json

import numpy as np
import pytest
import torch

from audit.toy import BUNDLE, bundle_path
from audit.toy.build import load_world_config, split_data


def test_bundle_is_safetensors_only():
    files = [p for p in BUNDLE.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]


def test_bundle_measurements_meet_the_foundation_bar():
    world = json.loads((BUNDLE / "world.json").read_text())
    gap = world["metrics"]["membership_gap"]
    assert gap["n_members"] >= 200 and gap["n_nonmembers"] >= 200
    assert gap["auc"] >= 0.75
    assert gap["member_mse_mean"] < gap["nonmember_mse_mean"]


def test_plain_from_pretrained_generates_embeds_and_captions():
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor

    cfg = load_world_config(BUNDLE)
    images, captions = split_data(cfg, "heldout")
    images, captions = images[:4], captions[:4]

    pipe = StableDiffusionPipeline.from_pretrained(bundle_path("target"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(captions[:2], num_inference_steps=5, guidance_scale=1.0, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all() and out.std() > 0.01

    clip = CLIPModel.from_pretrained(bundle_path("clip"))
    proc = CLIPProcessor.from_pretrained(bundle_path("clip"))
    with torch.no_grad():
        img = clip.get_image_features(**proc(images=list(images), return_tensors="pt"))
        txt = clip.get_text_features(**proc.tokenizer(captions, padding=True, return_tensors="pt"))
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    sim = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1).T
    # The trained embedder matches held-out captions to their own images.
    assert (sim.argmax(dim=1) == torch.arange(4)).float().mean() >= 0.75

    blip = BlipForConditionalGeneration.from_pretrained(bundle_path("blip"))
    bproc = BlipProcessor.from_pretrained(bundle_path("blip"))
    ids = blip.generate(**bproc(images=list(images), return_tensors="pt"), max_new_tokens=30)
    texts = bproc.batch_decode(ids, skip_special_tokens=True)
    # Captions are in the toy language: they name a background, as every toy caption does.
    assert all("background" in t for t in texts)


def test_shipped_target_reproduces_members_better_than_nonmembers():
    """Re-measured here on a subset (not read from world.json): members' own images come back from their captions."""
    from diffusers import StableDiffusionPipeline

    from audit.toy.train import membership_gap

    cfg = load_world_config(BUNDLE)
    members, nonmembers = split_data(cfg, "members"), split_data(cfg, "nonmembers")
    members, nonmembers = (members[0][:40], members[1][:40]), (nonmembers[0][:40], nonmembers[1][:40])
    pipe = StableDiffusionPipeline.from_pretrained(bundle_path("target"), use_safetensors=True)
    gap = membership_gap(pipe, members, nonmembers, seed=123, steps=10, device="cpu")
    assert gap["member_mse_mean"] < 0.5 * gap["nonmember_mse_mean"], gap
    assert gap["auc"] >= 0.8, gap
