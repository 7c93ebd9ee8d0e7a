"""Gray-box access on the compiled runtime: an exported diffusion target's ``vae_encoder``, ``text_encoder``,
``unet_context`` and ``unet`` graphs behind the ``Denoiser`` protocol, reproducing ``targets.denoiser``.

It shares the ``OnnxGenerator``'s loaded graphs, tokenizer and noise schedule; only the VAE encoder is loaded here.
The text conditioning is the ``unet_context`` graph's cross-attention keys/values of each caption, computed once per
query and gathered for each of its UNet evaluations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ArtifactError
from ..targets.base import vae_rows
from .session import Graph


class OnnxDenoiser:
    def __init__(self, generator):
        folder = generator.folder
        if "vae_encoder" not in folder.info.get("graphs", {}):
            raise ArtifactError(f"{folder.path}: this export has no vae_encoder graph (it was exported before "
                                "gray-box attacks existed); export the target again with `audit export` to run "
                                "gray-box attacks on the compiled runtime")
        self.generator = generator
        self.name = generator.name
        self.resolution = int(generator.resolution)
        self.batch_size = int(generator.batch_size)
        self.alphas_cumprod = generator.schedule.alphas_cumprod.numpy().astype(np.float32)
        self.prediction_type = generator.schedule.prediction_type
        self.vae_encoder = Graph(folder.graph("vae_encoder"), generator.options)

    def identity(self) -> dict:
        return self.generator.identity()

    def peak_bytes(self, rows: int) -> tuple[int, str] | None:
        """(bytes, graph) of the most demanding call of ``graybox_errors`` at ``rows`` UNet rows a call (the VAE
        encoder at its sub-batch, the UNet with the keys/values of as many captions); None when the export has
        no measurements."""
        return self.generator.largest_call({"unet": rows, "vae_encoder": min(rows, vae_rows(self.resolution))})

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        step = min(self.batch_size, vae_rows(self.resolution))
        out = [self.vae_encoder.run(images=np.ascontiguousarray(
            images[i:i + step].transpose(0, 3, 1, 2), np.float32) / np.float32(255.0))["latents"]
            for i in range(0, len(images), step)]
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def text_context(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        g = self.generator
        hidden = g.encode(list(captions))
        return g.unet_context.run(encoder_hidden_states=hidden) if g.unet_context else {
            "encoder_hidden_states": hidden}

    def predict(self, latents: np.ndarray, timesteps: np.ndarray, context: dict[str, np.ndarray],
                rows: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(latents), self.batch_size):
            sl = slice(i, i + self.batch_size)
            feeds = {k: v[np.asarray(rows[sl])] for k, v in context.items()}
            out.append(self.generator.unet.run(sample=np.ascontiguousarray(latents[sl], np.float32),
                                               timestep=np.asarray(timesteps[sl], np.int64), **feeds)["noise_pred"])
        return np.concatenate(out)
