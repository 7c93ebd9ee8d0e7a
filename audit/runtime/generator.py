"""The exported diffusion target on onnxruntime, behind the ``Generator`` protocol.

Reproduces the torch path (``targets.diffusion.DiffusersGenerator``): the same tokenisation, initial latents drawn
by torch on the CPU from one ``torch.Generator`` per image seeded from ``seeding.image_seeds`` (what diffusers'
``randn_tensor`` does with a list of generators), diffusers' DDIM math, and the same uint8 conversion. Faster
because each distinct caption is tokenised and encoded once, the ``n_gen`` images of a batch of captions are
denoised together (up to ``UNET_LATENT_PIXELS`` a UNet call), and there is no per-step Python pipeline machinery.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..kernels import DEFAULT_IMPLS, cfg_ddim_step
from ..seeding import image_seeds
from ..targets.base import denoising_step, vae_rows
from .folder import ExportFolder
from .scheduler import DdimSchedule
from .session import RuntimeOptions

log = logging.getLogger(__name__)

# Most latent pixels in one UNet call, both halves of a guided batch counted: SD-1.5 (64x64 latents) 2 images a
# call, LDM-256 (32x32) 8, the toy (8x8) 128. At SD's shape a UNet row's activations are ~0.33 GiB, and 2 rows a
# call ran no slower per image than 4 (docs/runtime.md#memory): more rows a call only add memory.
UNET_LATENT_PIXELS = 2 * 64 * 64


def initial_latents(seeds: Sequence[int], channels: int, size: int) -> np.ndarray:
    """float32 [len(seeds), C, s, s]: image i's noise from its own CPU torch.Generator, as diffusers draws it."""
    import torch

    if not seeds:
        return np.zeros((0, channels, size, size), np.float32)
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator("cpu").manual_seed(int(s)),
                                  dtype=torch.float32) for s in seeds]).numpy()


class OnnxGenerator:
    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, batch_size: int = 64,
                 kernel_impl: str | None = None):
        from transformers import AutoTokenizer

        folder = ExportFolder(path).component_folder("target")
        self.folder = folder
        self.options = options or RuntimeOptions()
        s = folder.settings
        ident = folder.identity
        self.name = ident["name"]
        self._identity = ident
        self.family = "ldm" if s["pipeline"] == "LDMTextToImagePipeline" else "diffusion"
        self.resolution = int(s["resolution"])
        self.latent_size, self.latent_channels = int(s["latent_size"]), int(s["latent_channels"])
        self.text_max_length = int(s["text_max_length"])
        self.cfg_rule = s["cfg_rule"]
        self.batch_size = batch_size
        self.kernel_impl = kernel_impl or DEFAULT_IMPLS["cfg_ddim_step"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder.file(s["tokenizer"]), local_files_only=True)
        self.schedule = DdimSchedule.from_file(folder.file(s["scheduler"]))
        self.text_encoder = folder.load_graph("text_encoder", self.options)
        self.unet = folder.load_graph("unet", self.options)
        # Exports since the cross-attention split: keys/values from unet_context once per batch, then the steps.
        has_context = "unet_context" in folder.info.get("graphs", {})
        self.unet_context = folder.load_graph("unet_context", self.options) if has_context else None
        self.vae_decoder = folder.load_graph("vae_decoder", self.options)
        self._uncond: np.ndarray | None = None
        self._encoder = None  # the VAE encoder (gray-box access), loaded on the first variation

    def identity(self) -> dict:
        return dict(self._identity)

    def denoiser(self):
        """Gray-box access through this export's graphs (``runtime.denoiser``)."""
        from .denoiser import OnnxDenoiser

        return OnnxDenoiser(self)

    def vary_with_seeds(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                        steps: int, guidance: float = 1.0) -> np.ndarray:
        """Image variations (``Varier``), reproducing ``targets.variation``: the ``vae_encoder`` graph's latents
        noised to the first of the last ``int(strength x steps)`` DDIM timesteps with each image's own noise, those
        steps, then the decoder."""
        from ..targets.variation import check_inputs, init_pixels, variation_noise, variation_steps

        check_inputs(images, prompts, seeds)
        k, r = variation_steps(strength, steps), self.resolution
        if len(images) == 0:
            return np.zeros((0, r, r, 3), np.uint8)
        if self._encoder is None:
            self._encoder = self.denoiser()
        z0 = self._encoder.encode_images(init_pixels(images, r))
        plan = self.schedule.plan(steps)[-k:]
        a = self.schedule.alphas_cumprod[plan[0][0]]
        # diffusers' add_noise: float32 square roots of the cumulative alpha at the first timestep that runs
        sa, sb = np.float32(a**0.5), np.float32((1 - a) ** 0.5)
        latents = sa * z0 + sb * variation_noise(seeds, (self.latent_channels, self.latent_size))
        unique = list(dict.fromkeys(prompts))
        row = {c: i for i, c in enumerate(unique)}
        cond = self.encode(unique)[[row[c] for c in prompts]]
        g = float(guidance) if self.guided(guidance) else None
        step = self.images_per_call(g is not None)
        return np.concatenate([self._denoise_decode(latents[i:i + step], cond[i:i + step], plan, g)
                               for i in range(0, len(latents), step)])

    def guided(self, guidance: float) -> bool:
        """Whether the pipeline this target came from would run classifier-free guidance at this scale."""
        if self.cfg_rule == "greater_than_one":
            return guidance > 1.0
        if self.cfg_rule == "not_one":
            return guidance != 1.0
        return False

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Text-encoder hidden states [N, L, D], tokenised as the pipeline does (padded to the max length)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.text_max_length, truncation=True,
                             return_tensors="np").input_ids
        return self.text_encoder.run(input_ids=ids.astype(np.int64))["last_hidden_state"]

    def _uncond_embedding(self) -> np.ndarray:
        if self._uncond is None:
            self._uncond = self.encode([""])
        return self._uncond

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        captions = list(captions)
        if n_gen < 1 or steps < 1:
            raise UsageError(f"n_gen and steps must be >= 1 (got n_gen={n_gen}, steps={steps})")
        r = self.resolution
        if not captions:
            return np.zeros((0, n_gen, r, r, 3), np.uint8)
        unique = list(dict.fromkeys(captions))
        embeds = self.encode(unique)
        row = {c: i for i, c in enumerate(unique)}
        cond = embeds[[row[c] for c in captions for _ in range(n_gen)]]
        seeds = [s for c in captions for s in image_seeds(seed, c, n_gen)]
        latents = initial_latents(seeds, self.latent_channels, self.latent_size) * np.float32(
            self.schedule.init_noise_sigma)
        plan = self.schedule.plan(steps)
        g = float(guidance) if self.guided(guidance) else None
        step = self.images_per_call(g is not None)
        out = [self._denoise_decode(latents[i : i + step], cond[i : i + step], plan, g)
               for i in range(0, len(seeds), step)]
        return np.concatenate(out).reshape(len(captions), n_gen, r, r, 3)

    def _denoise_decode(self, x: np.ndarray, cond: np.ndarray, plan, guidance: float | None) -> np.ndarray:
        n = len(x)
        if guidance is not None:
            uncond = np.broadcast_to(self._uncond_embedding(), (n, *cond.shape[1:]))
            context = np.concatenate([uncond, cond])  # unconditional half first, as the pipelines order it
        else:
            context = cond
        sched = self.schedule
        text = self.unet_context.run(encoder_hidden_states=context) if self.unet_context else {
            "encoder_hidden_states": context}
        for t, coeffs in plan:
            sample = np.concatenate([x, x]) if guidance is not None else x
            eps = self.unet.run(sample=sample, timestep=np.full(len(sample), t, np.int64), **text)["noise_pred"]
            x = cfg_ddim_step(eps, x, coeffs, guidance, sched.prediction_type, sched.clip_range,
                              impl=self.kernel_impl)
            denoising_step(len(x))
        step = self.decode_rows()
        images = np.concatenate([self.vae_decoder.run(latents=x[i : i + step])["images"]
                                 for i in range(0, len(x), step)])
        return np.clip(np.round(images.transpose(0, 2, 3, 1) * 255), 0, 255).astype(np.uint8)

    def images_per_call(self, guided: bool) -> int:
        """Images denoised together: ``batch_size``, at most ``UNET_LATENT_PIXELS`` latent pixels a UNet call."""
        fit = UNET_LATENT_PIXELS // (self.latent_size * self.latent_size * (2 if guided else 1))
        return max(1, min(self.batch_size, fit))

    def decode_rows(self) -> int:
        return vae_rows(self.resolution)

    def peak_bytes(self, n_images: int, guidance: float = 1.0) -> tuple[int, str] | None:
        """(bytes, graph) of the most demanding graph call while generating ``n_images`` in one ``generate``
        (from the export's measurements, ``runtime.memory``); None when the export has none."""
        guided = self.guided(guidance)
        rows = min(self.images_per_call(guided), n_images)
        return self.largest_call({"text_encoder": min(n_images, self.batch_size) + 1,
                                  "unet": rows * (2 if guided else 1),
                                  "vae_decoder": min(rows, self.decode_rows())})

    def largest_call(self, rows: dict[str, int]) -> tuple[int, str] | None:
        """(bytes, "target/graph") of the most demanding of these graph calls (graph -> rows a call), a UNet call
        counting the cross-attention keys/values from ``unet_context`` that stay alive through it; None when the
        export has no measurements."""
        from .memory import largest_need

        graphs = self.folder.info.get("graphs", {})
        found = largest_need(graphs, rows)
        context = largest_need(graphs, {"unet_context": rows["unet"]}) if self.unet_context else (0, "")
        if found is None or context is None:
            return None
        if found[1] == "unet":
            return found[0] + context[0], "target/unet"
        return found[0], f"target/{found[1]}"
