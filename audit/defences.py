"""Output-perturbation defences: a ``Generator`` wrapper that perturbs every image the target returns.

A service that wants to blunt membership inference can post-process what it returns: re-encode it as a lossy JPEG,
add noise, or return a smaller image. ``DefendedGenerator`` wraps any target (torch, ONNX, HTTP) so the attacks
run unchanged against the defended service; ``psnr`` measures what a defence costs the service's output quality.

Specs are ``kind:strength``: ``jpeg:Q`` (JPEG quality 1-95), ``noise:S`` (Gaussian noise, standard deviation S in
uint8 levels), ``downscale:F`` (the image shrunk F times per side by area averaging; the smaller image is what the
target returns). ``none`` is the identity. Noise is seeded per image from the run seed, the caption and the image
index, like the images themselves, so a defended target is as deterministic as the target it wraps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .config import Config
from .errors import UnknownNameError, UsageError
from .seeding import derive_seed

# kind -> (name of the strength, what it means, valid range check)
KINDS: dict[str, tuple[str, str, Callable[[float], bool]]] = {
    "none": ("", "no perturbation", lambda s: True),
    "jpeg": ("quality", "JPEG re-encoding at this quality (1-95; lower is lossier)", lambda s: 1 <= s <= 95),
    "noise": ("sigma", "additive Gaussian noise with this standard deviation in uint8 levels (> 0)", lambda s: s > 0),
    "downscale": ("factor", "area downscaling by this integer factor per side (>= 2)",
                  lambda s: s >= 2 and float(s).is_integer()),
}


@dataclasses.dataclass
class DefenceConfig(Config):
    kind: str = "none"
    strength: float = 0.0
    seed: int = 0  # noise only; mixed with the run seed, caption and image index

    def validate(self) -> "DefenceConfig":
        if self.kind not in KINDS:
            raise UnknownNameError(f"unknown defence {self.kind!r}; valid defences are: {', '.join(KINDS)}")
        name, meaning, ok = KINDS[self.kind]
        if self.kind != "none" and not ok(float(self.strength)):
            raise UsageError(f"defence {self.kind}: {name} {self.strength} is out of range; it is {meaning}")
        return self

    @property
    def tag(self) -> str:
        """Short name used in file names and tables: ``jpeg-q30``, ``noise-s8``, ``downscale-x2``, ``none``."""
        if self.kind == "none":
            return "none"
        letter = {"jpeg": "q", "noise": "s", "downscale": "x"}[self.kind]
        s = float(self.strength)
        return f"{self.kind}-{letter}{int(s) if s.is_integer() else s:g}"


def parse_defence(spec: str, seed: int = 0) -> DefenceConfig:
    """``"jpeg:30"`` -> DefenceConfig(kind="jpeg", strength=30); ``"none"`` -> the identity."""
    text = str(spec).strip().lower()
    if text == "none":
        return DefenceConfig(seed=seed)
    kind, sep, value = text.partition(":")
    if kind not in KINDS:
        raise UnknownNameError(f"unknown defence {kind!r} in {spec!r}; valid defences are: {', '.join(KINDS)}")
    if not sep or not value:
        raise UsageError(f"defence {spec!r} needs a strength: {kind}:{KINDS[kind][0].upper()} ({KINDS[kind][1]})")
    try:
        strength = float(value)
    except ValueError:
        raise UsageError(f"defence {spec!r}: {KINDS[kind][0]} {value!r} is not a number") from None
    return DefenceConfig(kind, strength, seed).validate()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = image.astype(np.float32) + rng.normal(0.0, float(sigma), image.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[:2]
    f = int(factor)
    size = (max(1, w // f), max(1, h // f))
    return np.asarray(Image.fromarray(image).resize(size, Image.BOX), dtype=np.uint8)


def apply_defence(image: np.ndarray, cfg: DefenceConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """One uint8 [H, W, 3] image through the defence (``rng`` is needed for noise only)."""
    if cfg.kind == "none":
        return image
    if cfg.kind == "jpeg":
        return jpeg(image, int(cfg.strength))
    if cfg.kind == "noise":
        if rng is None:
            raise UsageError("the noise defence needs a seeded random generator")
        return gaussian_noise(image, cfg.strength, rng)
    if cfg.kind == "downscale":
        return downscale(image, int(cfg.strength))
    raise UnknownNameError(f"unknown defence {cfg.kind!r}; valid defences are: {', '.join(KINDS)}")


class DefendedGenerator:
    """``inner`` with ``defence`` applied to every returned image. A different target from the attacker's view:
    its identity names the defence, so heads and stores made for the undefended target are not mixed with it."""

    def __init__(self, inner, defence: DefenceConfig):
        self.inner = inner
        self.defence = defence.validate()
        self.name = f"{inner.name}+{defence.tag}" if defence.kind != "none" else inner.name
        res = int(inner.resolution)
        self.resolution = res // int(defence.strength) if defence.kind == "downscale" else res

    def identity(self) -> dict:
        base = self.inner.identity()
        if self.defence.kind == "none":
            return base
        digest = hashlib.sha256(json.dumps([base.get("hash"), self.defence.to_dict()], sort_keys=True).encode())
        return {"name": self.name, "hash": digest.hexdigest()[:16], "base": base, "defence": self.defence.to_dict()}

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        images = np.asarray(self.inner.generate(captions, n_gen, seed, steps, guidance))
        if self.defence.kind == "none":
            return images
        if len(captions) == 0:
            return images
        return np.stack([np.stack([self._one(images[i, j], seed, c, j) for j in range(images.shape[1])])
                         for i, c in enumerate(captions)]).astype(np.uint8)

    def _one(self, image: np.ndarray, seed: int, caption: str, j: int) -> np.ndarray:
        rng = None
        if self.defence.kind == "noise":
            # Per image, from content: the same caption gets the same noise in any batch or resumed run.
            rng = np.random.default_rng(derive_seed("defence", self.defence.seed, seed, caption, j))
        return apply_defence(image, self.defence, rng)


def psnr(reference: np.ndarray, images: np.ndarray) -> float:
    """Mean PSNR (dB) of uint8 ``images`` against ``reference`` [N, H, W, 3]; smaller images are upscaled
    (bicubic) to the reference size first, as a viewer would. Identical pairs count as 100 dB."""
    ref = np.asarray(reference)
    imgs = np.asarray(images)
    if imgs.shape[1:3] != ref.shape[1:3]:
        h, w = ref.shape[1:3]
        imgs = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC)) for im in imgs])
    mse = ((ref.astype(np.float64) - imgs.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(axis=1)
    vals = np.where(mse > 0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)), 100.0)
    return float(vals.mean()) if len(vals) else float("nan")
