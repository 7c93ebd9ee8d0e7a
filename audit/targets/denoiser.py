"""Gray-box access on the torch path: a diffusers pipeline's VAE encoder, text conditioning and UNet behind the
``Denoiser`` protocol (``targets.base``). The compiled counterpart is ``runtime.denoiser.OnnxDenoiser``; the attacks
over either are in ``features.graybox``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .base import vae_rows


class VaeEncoder(nn.Module):
    """uint8-range images scaled to [0, 1], [N, 3, R, R] -> latents: the posterior mean (deterministic, where the
    papers' code samples the posterior) times the VAE's scaling factor, as the pipelines' training scripts encode
    images. The ``vae_encoder`` export spec exports this module, so both paths compute the same function."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, images):
        encoded = self.vae.encode(images * 2 - 1)
        # AutoencoderKL (SD, LDM's KL autoencoders) returns a Gaussian posterior; a VQModel its pre-quantisation
        # latents, which its decoder quantises.
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return latents * self.scale


def pipeline_parts(pipe) -> dict:
    """The pieces of a supported pipeline gray-box attacks use (the two families name them differently)."""
    if type(pipe).__name__ == "LDMTextToImagePipeline":
        return {"text_encoder": pipe.bert, "vae": pipe.vqvae, "text_max_length": 77}
    return {"text_encoder": pipe.text_encoder, "vae": pipe.vae, "text_max_length": int(pipe.tokenizer.model_max_length)}


class DiffusersDenoiser:
    """``Denoiser`` over a ``DiffusersGenerator``'s pipeline (the reference the compiled path is tested against)."""

    def __init__(self, generator, batch_size: int | None = None):
        pipe = generator.pipe
        scheduler = pipe.scheduler
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise UsageError(f"target {generator.name!r} samples with {type(scheduler).__name__}, which has no "
                             "training noise schedule (alphas_cumprod); gray-box attacks need one")
        self.pipe = pipe
        self.parts = pipeline_parts(pipe)
        self.name = generator.name
        self.resolution = int(generator.resolution)
        self.batch_size = int(batch_size or generator.batch_size)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().cpu().numpy().astype(np.float32)
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        self._identity = generator.identity()
        self._encoder = VaeEncoder(self.parts["vae"]).eval()
        self._device = pipe.device

    def identity(self) -> dict:
        return dict(self._identity)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> np.ndarray:
        out = []
        step = min(self.batch_size, vae_rows(self.resolution))
        for i in range(0, len(images), step):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + step])).permute(0, 3, 1, 2)
            x = (x.to(torch.float32) / 255.0).to(self._device)
            out.append(self._encoder(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    @torch.no_grad()
    def text_context(self, captions: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [N, L, D], tokenised as the pipeline tokenises a prompt (padded to the
        maximum length; the pipelines pass no attention mask to these encoders)."""
        tokens = self.pipe.tokenizer(list(captions), padding="max_length", max_length=self.parts["text_max_length"],
                                     truncation=True, return_tensors="pt")
        encoder = self.parts["text_encoder"]
        mask = tokens.attention_mask.to(self._device) if getattr(encoder.config, "use_attention_mask", False) else None
        kwargs = {"attention_mask": mask} if mask is not None else {}
        return encoder(tokens.input_ids.to(self._device), **kwargs)[0]

    @torch.no_grad()
    def predict(self, latents: np.ndarray, timesteps: np.ndarray, context: torch.Tensor,
                rows: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(latents), self.batch_size):
            sl = slice(i, i + self.batch_size)
            x = torch.from_numpy(np.ascontiguousarray(latents[sl], np.float32)).to(self._device)
            t = torch.from_numpy(np.asarray(timesteps[sl], np.int64)).to(self._device)
            ctx = context[torch.from_numpy(np.asarray(rows[sl], np.int64)).to(context.device)]
            out.append(self.pipe.unet(x, t, encoder_hidden_states=ctx).sample.float().cpu().numpy())
        return np.concatenate(out)


def _refusal(name: str, family: str | None) -> UsageError | None:
    if family == "http":
        return UsageError(f"target {name!r} is an HTTP service: gray-box attacks read the denoising error of the "
                          "target's own weights (VAE encoder, UNet, text encoder); audit it with --tier black-box")
    if family == "dalle":
        return UsageError(f"target {name!r} is a token-based (DALL-E) generator: it has no VAE image encoder or "
                          "denoising loss for gray-box attacks; audit it with --tier black-box")
    return None


def check_graybox_spec(spec: str) -> None:
    """Refuse, before anything loads or connects, a target spec that cannot have gray-box access (an HTTP
    service, a DALL-E model); other specs are checked once loaded (``denoiser_for``)."""
    from ..registry import TARGETS, parse_model_ref
    from .real import target_family

    ref = parse_model_ref(spec, TARGETS)
    family = {"http": "http"}.get(ref.kind)
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


def denoiser_for(generator):
    """The gray-box access to a loaded target, or a one-line error saying why this target has none."""
    make = getattr(generator, "denoiser", None)
    if callable(make):
        return make()
    name = getattr(generator, "name", type(generator).__name__)
    error = _refusal(name, getattr(generator, "family", None))
    if error is not None:
        raise error
    raise UsageError(f"target {name!r} ({type(generator).__name__}) gives no access to its weights; gray-box attacks "
                     "need a local diffusers pipeline or an `audit export` folder of one; use --tier black-box")
