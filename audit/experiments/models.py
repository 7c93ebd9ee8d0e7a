"""Models the study trains on this machine: a second CLIP (RQ4 embedder ablation) and the RQ3 targets.

RQ3 targets: the bundled toy target, further fine-tuned (text encoder + UNet, epsilon loss, the toy recipe) on
the members of a world with another seed, whose scenes no toy model has seen. Fine-tuning length is the only
difference between the weak and the strong target, so the two differ in how strongly they memorise the same
members. The bundled target already draws scenes from captions well, so no pre-training is needed here.
Each model folder is named by a hash of its recipe; an existing folder with a ``done.json`` is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import Config, atomic_write_text

log = logging.getLogger(__name__)

DONE = "done.json"


@dataclasses.dataclass
class Clip2Recipe(Config):
    seed: int = 2
    n_public: int = 2000
    steps: int = 300
    batch: int = 64
    lr: float = 1e-3
    layers: int = 2
    hidden: int = 48

    def folder(self, workdir: Path) -> Path:
        return Path(workdir) / "models" / f"clip2-{_hash(self)}"


@dataclasses.dataclass
class TargetRecipe(Config):
    """The bundled target fine-tuned ``finetune_steps`` steps on the first ``n_members`` members of world
    ``world_seed``."""

    world_seed: int = 1
    n_members: int = 100
    finetune_steps: int = 100
    batch: int = 50
    lr: float = 1e-3
    train_seed: int = 0

    def folder(self, workdir: Path) -> Path:
        return Path(workdir) / "models" / f"target-ft{self.finetune_steps}-{_hash(self)}"


def _hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _done(folder: Path) -> dict | None:
    try:
        return json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fresh(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def train_clip2(recipe: dict, workdir: str) -> dict:
    """Train the second CLIP on public scenes of another seed; measure its held-out text->image retrieval."""
    import torch

    from ..toy import scenes
    from ..toy.models import ToyModelSizes, build_clip
    from ..toy.tokenizers import build_clip_tokenizer
    from ..toy.train import clip_retrieval_top1, train_clip

    torch.set_num_threads(1)
    r = Clip2Recipe.from_dict(recipe)
    folder = r.folder(Path(workdir))
    if (done := _done(folder)) is not None:
        return {**done, "cached": True}
    _fresh(folder)
    t0 = time.perf_counter()
    tok = build_clip_tokenizer(folder / "_tokenizer")
    sizes = ToyModelSizes(clip_layers=r.layers, clip_hidden=r.hidden)
    model, processor = build_clip(tok, sizes, r.seed)
    images, captions = scenes.scene_images(r.seed, "public", r.n_public)
    loss = train_clip(model, processor, images, captions, r.steps, r.batch, r.lr, r.seed, "cpu")
    held = scenes.scene_images(r.seed, "heldout", 200)
    top1 = clip_retrieval_top1(model, processor, *held, "cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer")
    done = {"path": str(folder), "recipe": r.to_dict(), "final_loss": loss, "heldout_top1": top1,
            "heldout_n": len(held[1]), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(folder / DONE, json.dumps(done, indent=2) + "\n")
    return done


def bundle_clip_top1(seed: int, n: int = 200) -> float:
    """The bundled CLIP's retrieval top-1 on the same held-out scenes, for comparison with the second CLIP."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from ..toy import bundle_path, scenes
    from ..toy.train import clip_retrieval_top1

    torch.set_num_threads(1)
    path = bundle_path("clip")
    model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return clip_retrieval_top1(model, processor, *scenes.scene_images(seed, "heldout", n), "cpu")


def train_target(recipe: dict, workdir: str, gap_steps: int = 20) -> dict:
    """Fine-tune the bundled target on the recipe's members; save it; measure its single-score membership gap."""
    import torch

    from ..targets.diffusion import load_pipeline
    from ..toy import bundle_path, scenes
    from ..toy.train import encode_latents, membership_gap, train_denoiser

    torch.set_num_threads(1)
    r = TargetRecipe.from_dict(recipe)
    folder = r.folder(Path(workdir))
    if (done := _done(folder)) is not None:
        return {**done, "cached": True}
    _fresh(folder)
    t0 = time.perf_counter()
    pipe = load_pipeline(bundle_path("target"))
    members = scenes.scene_images(r.world_seed, "members", r.n_members)
    nonmembers = scenes.scene_images(r.world_seed, "nonmembers", r.n_members)
    latents = encode_latents(pipe.vae, members[0], "cpu")
    loss = train_denoiser(pipe, latents, members[1], r.finetune_steps, r.batch, r.lr, r.train_seed, "cpu",
                          phase=f"rq3 fine-tune {r.finetune_steps}")
    pipe.save_pretrained(folder / "target", safe_serialization=True)
    gap = membership_gap(pipe, members, nonmembers, 10_000 + r.train_seed, gap_steps, "cpu")
    done = {"path": str(folder / "target"), "recipe": r.to_dict(), "final_loss": loss, "membership_gap": gap,
            "epochs": r.finetune_steps * min(r.batch, r.n_members) / r.n_members,
            "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(folder / DONE, json.dumps(done, indent=2) + "\n")
    return done


def write_scene_aux(out: Path, world_seed: int, n_members: int, n_nonmembers: int, seed: int) -> Path:
    """An auxiliary ImageFolder of the first members / non-members of world ``world_seed``, in a seeded order under
    neutral file names (what ``toy.data.write_aux_folder`` does for a built world)."""
    from ..toy import scenes

    m_img, m_cap = scenes.scene_images(world_seed, "members", n_members)
    n_img, n_cap = scenes.scene_images(world_seed, "nonmembers", n_nonmembers)
    images = np.concatenate([m_img, n_img])
    captions = m_cap + n_cap
    labels = [True] * n_members + [False] * n_nonmembers
    order = np.random.default_rng(seed).permutation(len(captions))
    return scenes.write_imagefolder(Path(out), images[order], [captions[i] for i in order],
                                    [labels[i] for i in order])
