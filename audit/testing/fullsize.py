"""Random-weight models with the exact published architectures, built offline: FOR TIME AND MEMORY ONLY.

Speed, memory and export limits do not depend on weight values, so these stand in for checkpoints that cannot be
downloaded here (no model hub). Their weights are random: what they generate, caption or embed means nothing, and
no attack result may ever be computed on them or presented as one. Benchmarks (``benchmarks/realsize.py``) and
the slow tests (``AUDIT_SLOW=1``) use them.

- ``sd-1.5``: ``StableDiffusionPipeline`` as ``stable-diffusion-v1-5``: ``CLIPTextModel`` (ViT-L/14's text
  tower: 768 wide, 12 layers, 12 heads, quick_gelu, 77 positions), the 860 M-parameter ``UNet2DConditionModel``
  (320-640-1280-1280, cross-attention 768, 8 heads), the f8 ``AutoencoderKL`` (128-256-512-512) at 512 px, the
  CLIP tokenizer with OpenAI's 49,408-token vocabulary, DDIM with SD's betas (scaled_linear 0.00085-0.012,
  steps_offset 1).
- ``ldm-256``: ``LDMTextToImagePipeline`` as ``CompVis/ldm-text2im-large-256`` (the paper's LDM): ``LDMBertModel``
  with the released sizes (32 layers, d_model 1280), the 872 M-parameter UNet (cross-attention 1280, 32x32
  latents), the same f8 autoencoder at 256 px, a ``BertTokenizer`` over a 30,522-token WordPiece vocabulary laid
  out as bert-base-uncased's (its special tokens at their ids), DDIM.
- ``clip-vit-l-14``: transformers ``CLIPModel`` as ``openai/clip-vit-large-patch14`` (the default embedder) with its
  processor (224 px, bicubic, OpenAI mean/std) and the full CLIP tokenizer.
- ``blip-base``: ``BlipForConditionalGeneration`` as ``Salesforce/blip-image-captioning-base`` (the default
  captioner): ViT-B/16 at 384 px, a 12-layer BERT decoder over 30,524 tokens (the WordPiece vocabulary above
  plus ``[DEC]`` and ``[ENC]``).

Each is saved with safetensors in the layout of the real checkpoint, so it loads with the usual
``from_pretrained`` and as ``--target DIR`` / ``--embedder DIR`` / ``--captioner DIR``. Every builder takes a
sizes config: the published one by default, or ``tiny=True`` sizes that run the same code path in seconds (tests).
Builds are cached under ``$AUDIT_HOME/fullsize/<name>-<hash of sizes and seed>``::

    python -m audit.testing.fullsize sd-1.5                  # build (or find) it in the cache, print its folder
    python -m audit.testing.fullsize sd-1.5 --out DIR        # into DIR
    python -m audit.testing.fullsize world sd-1.5            # target + CLIP + BLIP folders, as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, atomic_folder, atomic_write_text, read_json
from ..errors import ArtifactError, UsageError

BUILD_FORMAT = 1
MARKER = "fullsize.json"  # written last into a finished build: what was built, with which sizes and seed
BERT_VOCAB_SIZE = 30522


# --- sizes ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DiffusionSizes(Config):
    """A latent diffusion target; the defaults are SD-1.5's."""

    resolution: int = 512
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    text_head_dim: int = 64  # LDMBert only
    unet_channels: tuple = (320, 640, 1280, 1280)
    unet_layers: int = 2
    unet_heads: int = 8  # diffusers' `attention_head_dim` of these UNets, which is really the number of heads
    unet_groups: int = 32
    vae_channels: tuple = (128, 256, 512, 512)
    vae_layers: int = 2
    vae_groups: int = 32


@dataclasses.dataclass
class ClipSizes(Config):
    """A transformers CLIPModel; the defaults are ViT-L/14's."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_ffn: int = 4096
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    projection_dim: int = 768


@dataclasses.dataclass
class BlipSizes(Config):
    """A BlipForConditionalGeneration; the defaults are blip-image-captioning-base's."""

    image_size: int = 384
    patch_size: int = 16
    vision_hidden: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn: int = 3072
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    text_positions: int = 512
    projection_dim: int = 512


_TINY_DIFFUSION = dict(text_hidden=32, text_layers=1, text_heads=2, text_ffn=64, text_head_dim=16,
                       unet_channels=(32, 32, 64, 64), unet_layers=1, unet_groups=8, vae_channels=(8, 8, 16, 16),
                       vae_layers=1, vae_groups=4)


# --- tokenizers ----------------------------------------------------------------------------------------------------

def clip_tokenizer(out: Path):
    """OpenAI CLIP's tokenizer (49,408 tokens, the same ids) from the merges open_clip ships."""
    from ..toy.tokenizers import build_clip_tokenizer

    return build_clip_tokenizer(out, full=True)


def wordpiece_vocab(size: int = BERT_VOCAB_SIZE) -> list[str]:
    """A lower-case WordPiece vocabulary of ``size`` tokens in bert-base-uncased's layout: [PAD] 0, [unused0-98],
    [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, characters, then whole words and ``##`` continuations taken from
    the CLIP merges in rank order (common English first). A stand-in of the real vocabulary's size and form."""
    from ..toy.tokenizers import _clip_merges, toy_words

    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars if c.isalnum()] + toy_words()
    words, pieces = [], []
    for a, b in _clip_merges():
        token = a + b
        if token.endswith("</w>") and re.fullmatch("[a-z0-9]+", token[:-4]):
            words.append(token[:-4])
        elif re.fullmatch("[a-z0-9]+", token):
            pieces.append("##" + token)
    vocab = list(dict.fromkeys(tokens + words + pieces))
    if len(vocab) < size:
        raise ArtifactError(f"only {len(vocab)} WordPiece tokens could be made from the CLIP merges, need {size}")
    return vocab[:size]


def _bert_tokenizer(out: Path, max_length: int, blip: bool):
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(wordpiece_vocab())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_length)
    if blip:  # BLIP's tokenizer: bert-base-uncased plus a [DEC] bos token and an [ENC] token (30,524 in all)
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(out)
    return BertTokenizerFast.from_pretrained(out)


# --- builders ------------------------------------------------------------------------------------------------------

def _ddim(steps_offset: int):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=steps_offset)


def _unet(s: DiffusionSizes, cross_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    return UNet2DConditionModel(
        sample_size=s.resolution // 8, in_channels=4, out_channels=4, layers_per_block=s.unet_layers,
        block_out_channels=tuple(s.unet_channels), down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), cross_attention_dim=cross_dim,
        attention_head_dim=s.unet_heads, norm_num_groups=s.unet_groups)


def _vae(s: DiffusionSizes):
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(s.vae_channels),
                         layers_per_block=s.vae_layers, latent_channels=4, norm_num_groups=s.vae_groups,
                         sample_size=s.resolution)


def sd_text_encoder(s: DiffusionSizes, vocab_size: int = 49408, bos: int = 49406, eos: int = 49407):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_ffn,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=s.text_hidden, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))


def ldm_bert(s: DiffusionSizes, vocab_size: int = BERT_VOCAB_SIZE):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    return LDMBertModel(LDMBertConfig(
        vocab_size=vocab_size, max_position_embeddings=77, encoder_layers=s.text_layers, encoder_ffn_dim=s.text_ffn,
        encoder_attention_heads=s.text_heads, head_dim=s.text_head_dim, d_model=s.text_hidden))


def clip_model(s: ClipSizes, vocab_size: int = 49408, bos: int = 49406, eos: int = 49407):
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_ffn,
                         num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                         max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_ffn,
                           num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                           image_size=s.image_size, patch_size=s.patch_size, hidden_act="quick_gelu"),
        projection_dim=s.projection_dim))


def blip_model(s: BlipSizes, vocab_size: int = BERT_VOCAB_SIZE + 2, bos: int = BERT_VOCAB_SIZE, pad: int = 0,
               sep: int = 102):
    from transformers import BlipConfig, BlipForConditionalGeneration

    return BlipForConditionalGeneration(BlipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=s.text_hidden, encoder_hidden_size=s.vision_hidden,
                         intermediate_size=s.text_ffn, num_hidden_layers=s.text_layers,
                         num_attention_heads=s.text_heads, max_position_embeddings=s.text_positions,
                         bos_token_id=bos, pad_token_id=pad, sep_token_id=sep, eos_token_id=sep),
        vision_config=dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_ffn,
                           num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                           image_size=s.image_size, patch_size=s.patch_size),
        projection_dim=s.projection_dim))


def build_sd(out: Path, sizes: DiffusionSizes, seed: int = 0) -> None:
    from diffusers import StableDiffusionPipeline

    tok = clip_tokenizer(out / "_tokenizer")
    torch.manual_seed(seed)
    text = sd_text_encoder(sizes, len(tok), tok.bos_token_id, tok.eos_token_id)
    pipe = StableDiffusionPipeline(vae=_vae(sizes), text_encoder=text, tokenizer=tok,
                                   unet=_unet(sizes, sizes.text_hidden), scheduler=_ddim(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tokenizer")


def build_ldm(out: Path, sizes: DiffusionSizes, seed: int = 0) -> None:
    from diffusers import LDMTextToImagePipeline

    tok = _bert_tokenizer(out / "_tokenizer", 77, blip=False)
    torch.manual_seed(seed)
    pipe = LDMTextToImagePipeline(vqvae=_vae(sizes), bert=ldm_bert(sizes, len(tok)), tokenizer=tok,
                                  unet=_unet(sizes, sizes.text_hidden), scheduler=_ddim(steps_offset=0))
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "_tokenizer")


def build_clip(out: Path, sizes: ClipSizes, seed: int = 0) -> None:
    from transformers import CLIPImageProcessor, CLIPProcessor

    tok = clip_tokenizer(out / "_tokenizer")
    torch.manual_seed(seed)
    model = clip_model(sizes, len(tok), tok.bos_token_id, tok.eos_token_id)
    # CLIPImageProcessor's defaults are OpenAI's (bicubic, OpenAI mean/std); the sizes are the model's.
    s = sizes.image_size
    images = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    model.save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    shutil.rmtree(out / "_tokenizer")


def build_blip(out: Path, sizes: BlipSizes, seed: int = 0) -> None:
    from transformers import BlipImageProcessor, BlipProcessor

    tok = _bert_tokenizer(out / "_tokenizer", 512, blip=True)
    torch.manual_seed(seed)
    model = blip_model(sizes, len(tok), tok.bos_token_id, tok.pad_token_id, tok.sep_token_id)
    images = BlipImageProcessor(size={"height": sizes.image_size, "width": sizes.image_size})
    model.save_pretrained(out, safe_serialization=True)
    BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    shutil.rmtree(out / "_tokenizer")


@dataclasses.dataclass(frozen=True)
class Model:
    kind: str  # target, embedder or captioner
    builder: Callable[[Path, Config, int], None]
    sizes: Config  # the published sizes
    tiny: Config  # the same architecture at toy sizes, for tests
    description: str


MODELS: dict[str, Model] = {
    "sd-1.5": Model("target", build_sd, DiffusionSizes(),
                    DiffusionSizes(resolution=64, **_TINY_DIFFUSION),
                    "StableDiffusionPipeline with SD-1.5's architecture (UNet 860 M, 512 px), DDIM"),
    "ldm-256": Model("target", build_ldm,
                     DiffusionSizes(resolution=256, text_hidden=1280, text_layers=32, text_heads=8, text_ffn=5120,
                                    text_head_dim=64),
                     DiffusionSizes(resolution=64, **_TINY_DIFFUSION),
                     "LDMTextToImagePipeline with CompVis/ldm-text2im-large-256's architecture (LDMBert 32 "
                     "layers, UNet 872 M, 256 px), DDIM"),
    "clip-vit-l-14": Model("embedder", build_clip, ClipSizes(),
                           ClipSizes(image_size=28, vision_hidden=32, vision_layers=1, vision_heads=2,
                                     vision_ffn=64, text_hidden=32, text_layers=1, text_heads=2, text_ffn=64,
                                     projection_dim=16),
                           "CLIPModel with openai/clip-vit-large-patch14's architecture (the default embedder)"),
    "blip-base": Model("captioner", build_blip, BlipSizes(),
                       BlipSizes(image_size=32, vision_hidden=32, vision_layers=1, vision_heads=2, vision_ffn=64,
                                 text_hidden=32, text_layers=1, text_heads=2, text_ffn=64, text_positions=64,
                                 projection_dim=16),
                       "BlipForConditionalGeneration with Salesforce/blip-image-captioning-base's architecture "
                       "(the default captioner)"),
}
# The embedder and captioner a target's benchmarks and slow tests pair it with: the defaults for real targets.
WORLD = {"target": None, "embedder": "clip-vit-l-14", "captioner": "blip-base"}


def _model(name: str) -> Model:
    if name not in MODELS:
        raise UsageError(f"unknown full-size model {name!r}; valid names are {', '.join(MODELS)}")
    return MODELS[name]


def build_record(name: str, tiny: bool = False, seed: int = 0) -> dict:
    """What a build is made of: the key of its cache folder and the content of its ``fullsize.json``."""
    m = _model(name)
    sizes = json.loads(json.dumps((m.tiny if tiny else m.sizes).to_dict()))  # as JSON has it (tuples as lists)
    return {"format": BUILD_FORMAT, "name": name, "kind": m.kind, "tiny": tiny, "seed": seed, "sizes": sizes,
            "random_weights": True,
            "note": "random weights with the published architecture: for time and memory only, never for attack "
                    "results"}


def _key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def is_built(folder: Path, record: dict) -> bool:
    marker = Path(folder) / MARKER
    return marker.is_file() and read_json(marker) == record


def build(name: str, out: str | Path, tiny: bool = False, seed: int = 0) -> Path:
    """Build ``name`` into the folder ``out`` (kept as it is when it already holds this very build); the folder
    appears complete or not at all (built beside it, then renamed)."""
    record = build_record(name, tiny, seed)
    out = Path(out)
    if is_built(out, record):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: exists and holds something else than this build; choose another --out or "
                            "delete it")
    m = _model(name)
    with atomic_folder(out) as tmp:
        m.builder(tmp, type(m.sizes).from_dict(record["sizes"]), seed)
        atomic_write_text(tmp / MARKER, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def cache_root() -> Path:
    from ..hub import audit_cache_dir

    return audit_cache_dir() / "fullsize"


def cached(name: str, tiny: bool = False, seed: int = 0, root: str | Path | None = None) -> Path:
    """The folder of ``name`` in the cache (``root``, default ``$AUDIT_HOME/fullsize``), built on first use."""
    record = build_record(name, tiny, seed)
    folder = Path(root or cache_root()) / f"{name}{'-tiny' if tiny else ''}-{_key(record)}"
    return build(name, folder, tiny, seed)


def world(target: str, tiny: bool = False, seed: int = 0, root: str | Path | None = None) -> dict[str, Path]:
    """A target with the default embedder and captioner, each from the cache: {target, embedder, captioner}."""
    if _model(target).kind != "target":
        raise UsageError(f"{target} is not a target; valid targets are "
                         f"{', '.join(n for n, m in MODELS.items() if m.kind == 'target')}")
    names = {**WORLD, "target": target}
    return {kind: cached(name, tiny, seed, root) for kind, name in names.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.testing.fullsize", description=__doc__.splitlines()[0])
    p.add_argument("name", help=f"{', '.join(MODELS)}, or `world` followed by a target name")
    p.add_argument("target", nargs="?", help="with `world`: the target (sd-1.5 or ldm-256)")
    p.add_argument("--out", type=Path, help="build into this folder instead of the cache")
    p.add_argument("--tiny", action="store_true", help="the same architectures at toy sizes (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ..progress import silence_libraries

    silence_libraries()
    try:
        if args.name == "world":
            if not args.target:
                raise UsageError("world: name a target (sd-1.5 or ldm-256)")
            print(json.dumps({k: str(v) for k, v in world(args.target, args.tiny, args.seed, args.out).items()},
                             indent=2))
        elif args.out is not None:
            print(build(args.name, args.out, args.tiny, args.seed))
        else:
            print(cached(args.name, args.tiny, args.seed))
    except (UsageError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
