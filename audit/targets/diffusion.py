"""Diffusion targets on the torch path: any diffusers text-to-image pipeline folder (SD, LDM, the toy target)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ModelNotFoundError
from .base import PerImageSeeds, denoising_step, step_listener
from ..hub import check_weights_safe, model_hash

log = logging.getLogger(__name__)

# Pipelines whose __call__ takes (prompt, height, width, num_inference_steps, guidance_scale, generator,
# output_type) and whose text encoder is queried with the prompt only: the text-to-image families audit runs.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "LDMTextToImagePipeline")


def pipeline_class(path: str | Path) -> str:
    """``_class_name`` of a diffusers folder's model_index.json (which family it is)."""
    index = Path(path) / "model_index.json"
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)") from None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelNotFoundError(f"{index}: not valid JSON ({exc})") from None


def load_pipeline(path: str | Path, allow_pickle: bool = False):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # transformers honours HF_HUB_DISABLE_PROGRESS_BARS; diffusers does not
        diffusers_logging.disable_progress_bar()
    path = Path(path)
    cls = pipeline_class(path)
    if cls not in SUPPORTED_PIPELINES:
        raise ModelNotFoundError(
            f"{path}: a {cls or 'unnamed'} pipeline; audit runs text-to-image pipelines of the classes "
            f"{', '.join(SUPPORTED_PIPELINES)}"
        )
    check_weights_safe(path, allow_pickle)
    kwargs = {}
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    if index.get("safety_checker") not in (None, [None, None]):
        # The safety checker blacks out images it flags: the attacks must see what the generator made. Its
        # feature extractor serves nothing else.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        if index.get("feature_extractor") not in (None, [None, None]):
            kwargs["feature_extractor"] = None
    try:
        # safetensors only unless the user asked otherwise (then prefer them, fall back to pickles); never
        # remote code: a model_index.json naming a custom class fails instead of importing it.
        return DiffusionPipeline.from_pretrained(path, use_safetensors=True if not allow_pickle else None,
                                                 local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"{path}: could not load the diffusers pipeline ({first})") from None


class DiffusersGenerator(PerImageSeeds):
    """Caption -> images through a diffusers pipeline, one torch.Generator per image for batch-independence."""

    def __init__(self, pipe, name: str, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.family = "ldm" if type(pipe).__name__ == "LDMTextToImagePipeline" else "diffusion"
        self._path = Path(path) if path else None
        self._hash = model_hash(self._path) if self._path else "unhashed"
        # LDM latents are height // 8 whatever the autoencoder; SD uses vae_scale_factor. Both: sample_size x it.
        scale = 8 if self.family == "ldm" else getattr(pipe, "vae_scale_factor", 8)
        self.resolution = int(pipe.unet.config.sample_size * scale)

    @classmethod
    def from_folder(cls, path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                    **kw) -> "DiffusersGenerator":
        return cls(load_pipeline(path, allow_pickle), name or Path(path).name, path, device, **kw)

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    def denoiser(self):
        """Gray-box access to this pipeline's VAE encoder, text encoder and UNet (``targets.denoiser``)."""
        from .denoiser import DiffusersDenoiser

        return DiffusersDenoiser(self)

    def vary_with_seeds(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                        steps: int, guidance: float = 1.0) -> np.ndarray:
        """Image variations (img2img) from this pipeline's own modules (``Varier``; ``targets.variation``)."""
        from .variation import DiffusersVarier

        if getattr(self, "_varier", None) is None:
            self._varier = DiffusersVarier(self)
        return self._varier.vary(images, prompts, seeds, strength, steps, guidance)

    @torch.no_grad()
    def generate_with_seeds(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                            guidance: float = 1.0) -> np.ndarray:
        """uint8 [len(prompts), H, W, 3]: image i from prompts[i] with its own torch.Generator seeded seeds[i]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + self.batch_size]]
            with _steps_reported(self.pipe.unet, len(gens)):
                images = self.pipe(
                    list(prompts[i : i + self.batch_size]),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=gens,
                    output_type="np",
                    height=self.resolution,
                    width=self.resolution,
                ).images
            out.append(np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)


@contextmanager
def _steps_reported(unet, images: int):
    """Report each of the pipeline's denoising steps (one UNet call each, guided or not: the pipelines batch the
    two halves) to this thread's ``on_denoising_step`` listener; nothing is hooked when none listens."""
    if step_listener() is None:
        yield
        return
    handle = unet.register_forward_hook(lambda module, args, output: denoising_step(images))
    try:
        yield
    finally:
        handle.remove()
