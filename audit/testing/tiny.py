"""Tiny, seeded, untrained models of each real family, saved in the layout of the real checkpoints.

Tests and CI build these offline and load them through exactly the code paths the real names take
(``load_target("ldm")`` resolves to a folder that ``DiffusersGenerator`` loads; these are such folders). They
are real architectures at toy sizes, never stubs: outputs are meaningless but computed.

- ``build_tiny_ldm``: ``LDMTextToImagePipeline`` (LDMBert + BERT WordPiece tokenizer + UNet2DConditionModel +
  AutoencoderKL with four blocks, so latents are height // 8 as the pipeline assumes + DDIM), the component
  layout of ``CompVis/ldm-text2im-large-256``.
- ``build_tiny_sd``: the toy ``StableDiffusionPipeline`` builder (``audit.toy.models.build_target``).
- ``build_tiny_dalle``: DALL-E mini encoder/decoder at toy sizes with the real VQGAN detokenizer, in
  ``kuprel/min-dalle``'s file layout with safetensors weights and a ``dalle.json`` of the sizes.
- ``build_tiny_open_clip``: an open_clip ``CLIP`` in the hf-hub layout (``open_clip_config.json`` +
  ``open_clip_model.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..toy import scenes

RESOLUTION = 32


def _captions(seed: int, n: int = 64) -> list[str]:
    return scenes.scene_images(seed, "public", n)[1]


def build_tiny_ldm(out: str | Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from ..toy.tokenizers import build_blip_tokenizer

    out = Path(out)
    wordpiece = build_blip_tokenizer(out / "_tokenizer", _captions(seed)).get_vocab()
    # The real pipeline's tokenizer is a BertTokenizer over a WordPiece vocab (without BLIP's [DEC] token).
    vocab = {t: i for t, i in sorted(wordpiece.items(), key=lambda kv: kv[1]) if t != "[DEC]"}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=77)
    torch.manual_seed(seed)
    hidden = 32
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(tokenizer), max_position_embeddings=77, encoder_layers=2,
                                      encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16, d_model=hidden))
    vqvae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=hidden, attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    pipe = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out / "ldm", safe_serialization=True)
    return out / "ldm"


def build_tiny_sd(out: str | Path, seed: int = 0) -> Path:
    from ..toy.models import build_target
    from ..toy.tokenizers import build_clip_tokenizer

    out = Path(out)
    tok = build_clip_tokenizer(out / "_clip_tokenizer")
    build_target(tok, None, seed).save_pretrained(out / "sd", safe_serialization=True)
    return out / "sd"


def tiny_bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A BART-style vocab + merges that spell each word as one 'Ġword' token, like the real one for common words."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    merges: list[str] = []
    space = chr(ord(" ") + 256)
    for ch in [space] + sorted({c for w in words for c in w}):
        vocab.setdefault(ch, len(vocab))
    for word in words:
        piece = space
        for ch in word:
            merge = f"{piece} {ch}"
            if merge not in merges:
                merges.append(merge)
            piece += ch
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_tiny_dalle(out: str | Path, seed: int = 0) -> Path:
    from ..toy.tokenizers import toy_words
    from ..targets.dalle import MINI, build_modules, save_dalle
    import dataclasses

    vocab, merges = tiny_bpe_vocab(toy_words())
    config = dataclasses.replace(MINI, layer_count=2, attention_head_count=4, embed_count=32, glu_embed_count=64,
                                 text_vocab_count=len(vocab), image_token_count=4, top_k=64)
    torch.manual_seed(seed)
    encoder, decoder, detokenizer = build_modules(config)
    return save_dalle(Path(out) / "dalle", config, encoder, decoder, detokenizer, vocab, merges)


def build_tiny_open_clip(out: str | Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": RESOLUTION, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder = Path(out) / "open_clip"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
