"""Build the toy world from a seed: data splits, then target, embedder and captioner, then measurements.

The output folder holds ``target/`` (a StableDiffusionPipeline), ``base/`` (the same pipeline as it was after
public pre-training, before fine-tuning on the members: the reference ``--reference toy-base`` calibrates
against), ``clip/`` (CLIPModel + CLIPProcessor),
``blip/`` (BlipForConditionalGeneration + BlipProcessor), each loadable with plain ``from_pretrained``, and
``world.json``: the build config (which fixes every split), the measurements and the build time.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import Config, atomic_write_text
from . import scenes
from .models import ToyModelSizes, build_blip, build_clip, build_target
from .tokenizers import build_blip_tokenizer, build_clip_tokenizer
from .train import (
    Timer,
    blip_token_accuracy,
    clip_retrieval_top1,
    encode_latents,
    membership_gap,
    train_blip,
    train_clip,
    train_denoiser,
    train_vae,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ToyBuildConfig(Config):
    seed: int = 0
    n_public: int = 4000
    n_members: int = 300
    n_nonmembers: int = 300
    n_heldout: int = 200  # for the embedder/captioner measurements only
    # Large batches and few steps: the shipped bundle was trained this way on a GPU (`--device cuda`, about
    # 4 minutes on an H200); tiny models are launch-bound there, so batch size is nearly free.
    vae_steps: int = 800
    vae_batch: int = 256
    vae_lr: float = 2e-3
    pretrain_steps: int = 1500
    pretrain_batch: int = 256
    pretrain_lr: float = 1e-3
    finetune_steps: int = 2000
    finetune_batch: int = 300  # every member in every step
    finetune_lr: float = 3e-4
    finetune_t_min: int = 0  # fine-tune on timesteps >= this only (see train_denoiser)
    clip_steps: int = 1000
    clip_batch: int = 512
    clip_lr: float = 1e-3
    blip_steps: int = 1000
    blip_batch: int = 256
    blip_lr: float = 1e-3
    eval_steps: int = 25  # DDIM steps when measuring the member/non-member gap
    sizes: dict = dataclasses.field(default_factory=lambda: ToyModelSizes().to_dict())

    @classmethod
    def quick(cls, seed: int = 0) -> "ToyBuildConfig":
        """A reduced scale for tests: a few minutes on two CPU cores, membership still visible."""
        return cls(
            seed=seed, n_public=512, n_members=8, n_nonmembers=16, n_heldout=64,
            vae_steps=300, vae_batch=64, vae_lr=2e-3, pretrain_steps=300, pretrain_batch=64, pretrain_lr=1e-3,
            # Measured on this CPU from the same pre-trained quick target: 400 steps at lr 1e-3 on every timestep
            # gave member/non-member AUC 0.26, 800 at 3e-3 0.36, 400 at 1e-3 on t >= 300 0.45, and 800 at 3e-3 on
            # t >= 300 1.00 (member MSE 0.024 vs 0.122) in 77 s.
            finetune_steps=800, finetune_batch=8, finetune_lr=3e-3, finetune_t_min=300,
            clip_steps=100, clip_batch=64, blip_steps=100, blip_batch=64, eval_steps=25,
            sizes=ToyModelSizes(unet_channels=(32, 64), vae_channels=(16, 32, 32), clip_layers=2).to_dict(),
        )


def split_data(cfg: ToyBuildConfig, split: str) -> tuple[np.ndarray, list[str]]:
    count = {"public": cfg.n_public, "members": cfg.n_members, "nonmembers": cfg.n_nonmembers,
             "heldout": cfg.n_heldout}[split]
    return scenes.scene_images(cfg.seed, split, count)


def build_world(out: Path, cfg: ToyBuildConfig, device: str = "cpu") -> dict:
    """Train every toy model and write the world folder; returns the contents of ``world.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    torch.manual_seed(cfg.seed)
    sizes = ToyModelSizes.from_dict(cfg.sizes)
    public = split_data(cfg, "public")
    members = split_data(cfg, "members")
    nonmembers = split_data(cfg, "nonmembers")
    heldout = split_data(cfg, "heldout")

    tok_dir = out / "_tokenizers"
    clip_tok = build_clip_tokenizer(tok_dir / "clip")
    blip_tok = build_blip_tokenizer(tok_dir / "blip", public[1])
    losses, times = {}, {}

    pipe = build_target(clip_tok, sizes, cfg.seed)
    losses["vae"] = train_vae(pipe.vae, public[0], cfg.vae_steps, cfg.vae_batch, cfg.vae_lr, cfg.seed, device)
    times["vae"] = timer()
    # The members are part of the target's training data for every stage after the VAE: public pre-training
    # teaches captions -> scenes, fine-tuning on members alone makes the target memorise them.
    lat_public = encode_latents(pipe.vae, public[0], device)
    losses["pretrain"] = train_denoiser(pipe, lat_public, public[1], cfg.pretrain_steps, cfg.pretrain_batch,
                                        cfg.pretrain_lr, cfg.seed + 1, device, caption_dropout=0.1, phase="pretrain")
    times["pretrain"] = timer()
    _save_pipeline(pipe, out / "base", device)
    atomic_write_text(out / "base" / "base.json", json.dumps(
        {"made_by": "build_world", "stage": "pretrain", "steps": cfg.pretrain_steps, "batch": cfg.pretrain_batch,
         "lr": cfg.pretrain_lr, "seed": cfg.seed + 1, "device": device, "torch": torch.__version__,
         "pretrain_loss": losses["pretrain"]}, indent=2) + "\n")
    lat_members = encode_latents(pipe.vae, members[0], device)
    losses["finetune"] = train_denoiser(pipe, lat_members, members[1], cfg.finetune_steps, cfg.finetune_batch,
                                        cfg.finetune_lr, cfg.seed + 2, device, phase="finetune",
                                        t_min=cfg.finetune_t_min)
    times["finetune"] = timer()

    clip, clip_proc = build_clip(clip_tok, sizes, cfg.seed)
    losses["clip"] = train_clip(clip, clip_proc, *public, cfg.clip_steps, cfg.clip_batch, cfg.clip_lr, cfg.seed + 3,
                                device)
    times["clip"] = timer()
    blip, blip_proc = build_blip(blip_tok, sizes, cfg.seed)
    losses["blip"] = train_blip(blip, blip_proc, *public, cfg.blip_steps, cfg.blip_batch, cfg.blip_lr, cfg.seed + 4,
                                device)
    times["blip"] = timer()

    metrics = {
        "membership_gap": membership_gap(pipe, members, nonmembers, cfg.seed + 10_000, cfg.eval_steps, device),
        "clip_text_to_image_top1_heldout": clip_retrieval_top1(clip, clip_proc, *heldout, device),
        "clip_top1_chance": 1.0 / len(heldout[1]),
        "blip_token_accuracy_heldout": blip_token_accuracy(blip, blip_proc, *heldout, device),
        "final_losses": losses,
    }
    times["measure"] = timer()

    for name, obj in (("target", pipe), ("clip", clip), ("blip", blip)):
        obj.to("cpu")
        if (out / name).exists():
            shutil.rmtree(out / name)
        obj.save_pretrained(out / name)
    clip_proc.save_pretrained(out / "clip")
    blip_proc.save_pretrained(out / "blip")
    shutil.rmtree(tok_dir)

    world = {
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "config": cfg.to_dict(),
        "metrics": metrics,
        "build_seconds": timer(),
        "stage_seconds": times,
    }
    atomic_write_text(out / "world.json", json.dumps(world, indent=2) + "\n")
    log.info("toy world written to %s in %.0f s", out, world["build_seconds"])
    return world


def _save_pipeline(pipe, folder: Path, device: str) -> None:
    pipe.to("cpu")
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder)
    pipe.to(device)


def rebuild_base(world_dir: Path, out: Path | None = None, device: str = "cpu", batch: int | None = None,
                 steps: int | None = None) -> dict:
    """Re-run the pre-training stage of an existing world on its own VAE and write ``base/`` (with ``base.json``
    saying how it was made).

    Same initial weights, data, learning-rate schedule and seeds as ``build_world``; the noise, timesteps and
    caption dropout come from a generator on ``device``, so at the world's own batch size the weights equal the
    ones a build made on the same kind of device (a world built on CUDA and re-based on a CPU gets a sibling
    pre-training, not its own). ``batch`` and ``steps`` override the pre-training's batch and step count (a cheaper,
shorter pre-training on a machine without the build's accelerator)."""
    from ..targets.diffusion import load_pipeline

    world_dir = Path(world_dir)
    out = Path(out) if out else world_dir / "base"
    cfg = load_world_config(world_dir)
    timer = Timer()
    torch.manual_seed(cfg.seed)
    public = split_data(cfg, "public")
    tok_dir = out.parent / f"_{out.name}_tokenizers"
    clip_tok = build_clip_tokenizer(tok_dir / "clip")
    pipe = build_target(clip_tok, ToyModelSizes.from_dict(cfg.sizes), cfg.seed)
    shutil.rmtree(tok_dir)
    # The VAE is frozen after its own stage: the built target's VAE is exactly the one pre-training encoded with.
    built = load_pipeline(world_dir / "target")
    pipe.vae, pipe.tokenizer, pipe.scheduler = built.vae, built.tokenizer, built.scheduler
    lat_public = encode_latents(pipe.vae, public[0], device)
    batch, steps = int(batch or cfg.pretrain_batch), int(steps or cfg.pretrain_steps)
    loss = train_denoiser(pipe, lat_public, public[1], steps, batch, cfg.pretrain_lr,
                          cfg.seed + 1, device, caption_dropout=0.1, phase="pretrain")
    _save_pipeline(pipe, out, device)
    record = {"made_by": "rebuild_base", "stage": "pretrain", "steps": steps, "batch": batch,
              "lr": cfg.pretrain_lr, "seed": cfg.seed + 1, "device": device, "torch": torch.__version__,
              "pretrain_loss": loss, "seconds": timer(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(out / "base.json", json.dumps(record, indent=2) + "\n")
    return record


def load_world_config(world_dir: Path) -> ToyBuildConfig:
    data = json.loads((Path(world_dir) / "world.json").read_text(encoding="utf-8"))
    return ToyBuildConfig.from_dict(data["config"])
