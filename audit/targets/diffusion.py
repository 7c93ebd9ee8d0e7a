"""Diffusion targets on the torch path: any diffusers text-to-image pipeline folder (SD, LDM, the toy target)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ModelNotFoundError
from ..manifest import weights_hash
from ..seeding import image_seeds

log = logging.getLogger(__name__)


def load_pipeline(path: str | Path, allow_pickle: bool = False):
    from diffusers import DiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    # safetensors only unless the user asked otherwise; never remote code.
    return DiffusionPipeline.from_pretrained(path, use_safetensors=not allow_pickle, local_files_only=True)


class DiffusersGenerator:
    """Caption -> images through a diffusers pipeline, one torch.Generator per image for batch-independence."""

    def __init__(self, pipe, name: str, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self._path = Path(path) if path else None
        self._hash = weights_hash(self._path) if self._path else "unhashed"
        unet = pipe.unet
        self.resolution = int(unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8))

    @classmethod
    def from_folder(cls, path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                    **kw) -> "DiffusersGenerator":
        return cls(load_pipeline(path, allow_pickle), name or Path(path).name, path, device, **kw)

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    @torch.no_grad()
    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        prompts = [c for c in captions for _ in range(n_gen)]
        seeds = [s for c in captions for s in image_seeds(seed, c, n_gen)]
        out = []
        for i in range(0, len(prompts), self.batch_size):
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i : i + self.batch_size]]
            images = self.pipe(
                prompts[i : i + self.batch_size],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="np",
                height=self.resolution,
                width=self.resolution,
            ).images
            out.append(np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8))
        images = np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        return images.reshape(len(captions), n_gen, *images.shape[1:])
