"""Tiny models of the real architectures: the toy target, the toy CLIP and the toy BLIP.

Sizes are ones measured to train in minutes on two CPU cores. Every builder returns freshly initialised models;
``audit.toy.train`` trains them, and tests use them untrained (seeded) to exercise the real code paths.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from . import scenes


@dataclasses.dataclass
class ToyModelSizes(Config):
    resolution: int = scenes.RESOLUTION
    # target: text encoder + UNet + VAE
    text_hidden: int = 64
    text_layers: int = 2
    unet_channels: tuple = (64, 128)
    vae_channels: tuple = (32, 64, 64)
    latent_channels: int = 4
    # embedder (CLIP)
    clip_hidden: int = 64
    clip_layers: int = 3
    clip_patch: int = 4
    clip_projection: int = 64
    # captioner (BLIP)
    blip_hidden: int = 64
    blip_layers: int = 2
    blip_patch: int = 4


def build_target(tokenizer, sizes: ToyModelSizes | None = None, seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (CLIPTextModel + UNet2DConditionModel + AutoencoderKL + DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    s = sizes or ToyModelSizes()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.text_hidden,
            intermediate_size=s.text_hidden * 4,
            num_hidden_layers=s.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_vae = len(s.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(s.vae_channels),
        layers_per_block=1,
        latent_channels=s.latent_channels,
        norm_num_groups=16,
        sample_size=s.resolution,
    )
    n_unet = len(s.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=s.resolution // 2 ** (n_vae - 1),
        in_channels=s.latent_channels,
        out_channels=s.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        block_out_channels=tuple(s.unet_channels),
        layers_per_block=1,
        cross_attention_dim=s.text_hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_clip(tokenizer, sizes: ToyModelSizes | None = None, seed: int = 0):
    """A tiny ``CLIPModel`` and its ``CLIPProcessor``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    s = sizes or ToyModelSizes()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=s.clip_hidden,
            intermediate_size=s.clip_hidden * 4,
            num_hidden_layers=s.clip_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=s.clip_hidden,
            intermediate_size=s.clip_hidden * 4,
            num_hidden_layers=s.clip_layers,
            num_attention_heads=4,
            image_size=s.resolution,
            patch_size=s.clip_patch,
        ),
        projection_dim=s.clip_projection,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s.resolution},
        crop_size={"height": s.resolution, "width": s.resolution},
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_blip(tokenizer, sizes: ToyModelSizes | None = None, seed: int = 0):
    """A tiny ``BlipForConditionalGeneration`` and its ``BlipProcessor``."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    s = sizes or ToyModelSizes()
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=s.blip_hidden,
            intermediate_size=s.blip_hidden * 4,
            num_hidden_layers=s.blip_layers,
            num_attention_heads=4,
            encoder_hidden_size=s.blip_hidden,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=s.blip_hidden,
            intermediate_size=s.blip_hidden * 4,
            num_hidden_layers=s.blip_layers,
            num_attention_heads=4,
            image_size=s.resolution,
            patch_size=s.blip_patch,
        ),
        projection_dim=s.blip_hidden,
    )
    model = BlipForConditionalGeneration(config)
    image_processor = BlipImageProcessor(size={"height": s.resolution, "width": s.resolution})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_untrained_world(out: Path, seed: int = 0, sizes: ToyModelSizes | None = None) -> dict[str, Path]:
    """Save seeded, untrained tiny target/CLIP/BLIP folders under ``out``: what most tests run on."""
    from .tokenizers import build_blip_tokenizer, build_clip_tokenizer

    out = Path(out)
    clip_tok = build_clip_tokenizer(out / "_clip_tokenizer")
    _, captions = scenes.scene_images(seed, "public", 64)
    blip_tok = build_blip_tokenizer(out / "_blip_tokenizer", captions)
    paths = {"target": out / "target", "clip": out / "clip", "blip": out / "blip"}
    build_target(clip_tok, sizes, seed).save_pretrained(paths["target"])
    for name, builder, tok in (("clip", build_clip, clip_tok), ("blip", build_blip, blip_tok)):
        model, processor = builder(tok, sizes, seed)
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths
