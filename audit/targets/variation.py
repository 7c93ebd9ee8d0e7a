"""Image-variation access (img2img, the ``Varier`` protocol of ``targets.base``) on the torch path, and the checks
every implementation shares.

A variation of image ``x`` at strength ``s`` with ``steps`` DDIM steps: ``z_0`` is the VAE posterior mean of ``x``
times the scaling factor (the gray-box tier's encoder, ``targets.denoiser.VaeEncoder``: deterministic, where
diffusers' ``StableDiffusionImg2ImgPipeline`` samples the posterior); of the ``steps`` DDIM timesteps only the last
``k = int(s * steps)`` run, from ``z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) n`` at the first of them (``n``: Gaussian
noise from the image's own CPU ``torch.Generator``); the result is decoded as the text-to-image pipeline decodes.
The loop runs the loaded pipeline's own modules (no second copy of the weights) with a DDIM scheduler made from
its scheduler's config, so the compiled runtime (``runtime.generator``) reproduces it with its DDIM kernel.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError
from .base import denoising_step, vae_rows


def variation_steps(strength: float, steps: int) -> int:
    """DDIM steps a variation runs: ``int(strength * steps)`` as diffusers' img2img counts them (at least one)."""
    if not 0.0 < float(strength) <= 1.0:
        raise UsageError(f"variation strength must be in (0, 1], got {strength}")
    k = min(int(float(strength) * int(steps)), int(steps))
    if k < 1:
        raise UsageError(f"variation strength {strength} with {steps} steps runs no denoising step "
                         f"(int(strength x steps) = 0); raise --steps or the strength")
    return k


def check_inputs(images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if np.ndim(images) != 4 or np.shape(images)[-1] != 3:
        raise ValueError(f"init images must be uint8 [N, H, W, 3], got shape {np.shape(images)}")
    if not len(images) == len(prompts) == len(seeds):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds: give one of each")


def variation_noise(seeds: Sequence[int], shape: tuple) -> np.ndarray:
    """float32 [len(seeds), *shape]: each variation's noise from its own CPU torch.Generator, as diffusers draws
    per-image initial latents (``runtime.generator.initial_latents``)."""
    from ..runtime.generator import initial_latents

    return initial_latents(list(seeds), shape[0], shape[1])


def init_pixels(images: np.ndarray, resolution: int) -> np.ndarray:
    """The init images as the target takes them: centre-cropped and resized to its resolution."""
    from ..kernels.preprocess import resize_pixels

    return np.stack([resize_pixels(np.asarray(im, np.uint8), resolution) for im in images])


class DiffusersVarier:
    """``vary_with_seeds`` over a ``DiffusersGenerator``'s loaded pipeline (``DiffusersGenerator.vary_with_seeds``)."""

    def __init__(self, generator):
        from diffusers import DDIMScheduler

        from .denoiser import DiffusersDenoiser

        self.generator = generator
        self.denoiser = DiffusersDenoiser(generator)  # VAE encoder, text conditioning: the same modules
        pipe = generator.pipe
        # A scheduler of its own (set_timesteps mutates it), DDIM whatever the pipeline samples with.
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.vae = self.denoiser.parts["vae"]
        self.scale = float(self.vae.config.scaling_factor)

    def guided(self, guidance: float) -> bool:
        """As the text-to-image pipeline decides: LDM guides at any scale but 1, SD above 1."""
        return guidance != 1.0 if self.generator.family == "ldm" else guidance > 1.0

    def vary(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], strength: float, steps: int,
             guidance: float = 1.0) -> np.ndarray:
        import torch

        check_inputs(images, prompts, seeds)
        g = self.generator
        r = g.resolution
        k = variation_steps(strength, steps)
        if len(images) == 0:
            return np.zeros((0, r, r, 3), np.uint8)
        out = []
        with torch.no_grad():
            for i in range(0, len(images), g.batch_size):
                sl = slice(i, i + g.batch_size)
                out.append(self._batch(init_pixels(images[sl], r), list(prompts[sl]), list(seeds[sl]), k, steps,
                                       float(guidance)))
        return np.concatenate(out)

    def _batch(self, pixels, prompts, seeds, k, steps, guidance):
        import torch

        d, sched = self.denoiser, self.scheduler
        z0 = torch.from_numpy(d.encode_images(pixels)).to(d._device)
        noise = torch.from_numpy(variation_noise(seeds, tuple(z0.shape[1:3]))).to(d._device)
        sched.set_timesteps(steps)
        timesteps = sched.timesteps[len(sched.timesteps) - k:]
        x = sched.add_noise(z0, noise, timesteps[:1].repeat(len(z0)))
        cond = d.text_context(prompts)
        guided = self.guided(guidance)
        context = torch.cat([d.text_context([""]).expand_as(cond), cond]) if guided else cond
        for t in timesteps:
            sample = torch.cat([x, x]) if guided else x
            eps = _unet(self.generator.pipe.unet, sample, t, context)
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            x = sched.step(eps, t, x).prev_sample
            denoising_step(len(x))
        return self._decode(x)

    def _decode(self, latents):
        rows = max(1, min(self.generator.batch_size, vae_rows(self.generator.resolution)))
        out = []
        for i in range(0, len(latents), rows):
            images = self.vae.decode(latents[i:i + rows] / self.scale).sample
            images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            out.append(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
        return np.concatenate(out)


def _unet(unet, sample, t, context):
    import torch

    timestep = torch.full((len(sample),), int(t), dtype=torch.int64, device=sample.device)
    return unet(sample, timestep, encoder_hidden_states=context).sample


def _refusal(name: str, family: str | None) -> UsageError | None:
    if family == "dalle":
        return UsageError(f"target {name!r} is a token-based (DALL-E) generator: it has no image-variation "
                          "(img2img) access; audit it with --tier black-box")
    return None


def check_variation_spec(spec: str) -> None:
    """Refuse, before anything loads, a target spec that cannot have variation access (a DALL-E model)."""
    from ..registry import TARGETS, parse_model_ref
    from .real import target_family

    ref = parse_model_ref(spec, TARGETS)
    family = None
    if ref.kind == "registered":
        family = TARGETS.get(ref.value).family
    elif ref.kind == "folder":
        family = target_family(ref.value)
    elif ref.kind == "export":
        from ..runtime.folder import ExportFolder

        family = ExportFolder(ref.value).component_folder("target").info.get("family")
    error = _refusal(spec, family)
    if error is not None:
        raise error


def varier_for(generator):
    """The loaded target itself when it has image-variation access, or a one-line error saying why it has none."""
    if callable(getattr(generator, "vary_with_seeds", None)):
        return generator
    name = getattr(generator, "name", type(generator).__name__)
    error = _refusal(name, getattr(generator, "family", None))
    if error is not None:
        raise error
    raise UsageError(f"target {name!r} ({type(generator).__name__}) has no image-variation (img2img) access; "
                     "use --tier black-box")
