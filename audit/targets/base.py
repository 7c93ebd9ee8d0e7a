"""The small backend interface every attack runs over: generate, embed, caption (black-box), and a diffusion
target's own denoiser (gray-box).

Torch implementations live beside each family (``targets/diffusion.py``, ``targets/denoiser.py``, ``models/``); the
compiled ones in ``runtime/``. Attacks never see which one they got.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..seeding import image_seeds

# Most pixels per VAE call, decoder or encoder, on either path: their activations are full resolution (~1.2 GiB
# per 512 px image), so large images go a few at a time: SD 512 px 1, LDM 256 px 2 (at 4 a call, +1.2 GiB, the
# LDM-256 runtime peaked in its VAE decode, above eager), the 32 px toy 128.
VAE_PIXELS = 256 * 512


def vae_rows(resolution: int) -> int:
    """Images per VAE call at ``resolution`` (see ``VAE_PIXELS``)."""
    return max(1, VAE_PIXELS // (int(resolution) * int(resolution)))


_steps = threading.local()


@contextmanager
def on_denoising_step(callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(images)`` after every denoising step a target runs in this thread (``images``: how many
    images that step advanced), while the block runs: how ``audit serve-target`` reports a generation's progress.
    Thread-local, so concurrent callers never see each other's steps."""
    before = getattr(_steps, "callback", None)
    _steps.callback = callback
    try:
        yield
    finally:
        _steps.callback = before


def denoising_step(images: int) -> None:
    """Tell this thread's ``on_denoising_step`` listener, if any, that a step advanced ``images`` images."""
    callback = step_listener()
    if callback is not None:
        callback(int(images))


def step_listener() -> Callable[[int], None] | None:
    """This thread's ``on_denoising_step`` callback, or None."""
    return getattr(_steps, "callback", None)


@runtime_checkable
class Generator(Protocol):
    """A text-to-image target, queried only as caption -> images."""

    name: str
    resolution: int

    def identity(self) -> dict:
        """``{"name": ..., "hash": ...}``: artifacts made for this target record it and refuse others."""

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        """uint8 [len(captions), n_gen, H, W, 3]; image j of caption c uses ``seeding.image_seeds(seed, c, n_gen)[j]``."""


@runtime_checkable
class Embedder(Protocol):
    """CLIP-style joint embedding; outputs are L2-normalised float32."""

    name: str
    dim: int

    def identity(self) -> dict: ...

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (any size) -> float32 [N, dim]."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """-> float32 [N, dim]."""


@runtime_checkable
class Captioner(Protocol):
    """BLIP-style captioner, greedy decoding (deterministic)."""

    name: str

    def identity(self) -> dict: ...

    def caption(self, images: np.ndarray, max_new_tokens: int = 30) -> list[str]:
        """uint8 [N, H, W, 3] -> one caption per image."""


@runtime_checkable
class Denoiser(Protocol):
    """Gray-box access to a latent diffusion target whose weights are local: its VAE encoder, its text
    conditioning and one UNet evaluation at a time. Arrays are float32 numpy; the arithmetic of the attacks
    (``features.graybox``) is shared by every implementation."""

    name: str
    resolution: int  # the pixel size the VAE encoder takes
    alphas_cumprod: np.ndarray  # float32 [T]: the training noise schedule
    prediction_type: str  # what the UNet predicts: "epsilon", "v_prediction" or "sample"

    def identity(self) -> dict: ...

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, R, R, 3] -> latents [N, C, s, s]: the VAE posterior mean times the latent scaling factor."""

    def text_context(self, captions: Sequence[str]) -> object:
        """Conditioning for ``captions`` (one row each), as ``predict`` takes it."""

    def predict(self, latents: np.ndarray, timesteps: np.ndarray, context: object, rows: np.ndarray) -> np.ndarray:
        """The UNet output for latents [M, C, s, s] at int64 timesteps [M], latent i conditioned on context row
        ``rows[i]`` (no classifier-free guidance)."""


@runtime_checkable
class Varier(Protocol):
    """Image-variation access (img2img), the third access tier: the target takes a query image, noises it to a
    strength and denoises it, as diffusers' ``StableDiffusionImg2ImgPipeline`` and the A1111 ``/sdapi/v1/img2img``
    endpoint do. Local diffusers targets, their ``audit export`` and HTTP services implement it; DALL-E mini does not.
    """

    name: str
    resolution: int

    def identity(self) -> dict: ...

    def vary_with_seeds(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                        steps: int, guidance: float = 1.0) -> np.ndarray:
        """uint8 [N, H, W, 3] init images (resized to ``resolution``), one prompt ("" for none) and one seed each
        -> uint8 [N, resolution, resolution, 3]. DDIM over ``steps`` steps of which only the last
        ``int(strength * steps)`` run, from the init latents noised with the seed's noise; each image depends only
        on its own image, prompt and seed, never on its batch."""


class PerImageSeeds:
    """``generate`` for a backend that implements ``generate_with_seeds(prompts, seeds, steps, guidance)``:
    every image is made from its own seed (``seeding.image_seeds``), so no image depends on its batch."""

    def generate_with_seeds(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                            guidance: float = 1.0) -> np.ndarray:
        raise NotImplementedError

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        prompts = [c for c in captions for _ in range(n_gen)]
        seeds = [s for c in captions for s in image_seeds(seed, c, n_gen)]
        images = self.generate_with_seeds(prompts, seeds, steps, guidance)
        return images.reshape(len(captions), n_gen, *images.shape[1:])
