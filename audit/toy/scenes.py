"""Procedural captioned scenes: the toy world's data distribution.

Each scene is a coloured background carrying a faint stripe texture plus one or two shapes. The caption names
what a reader can see at a glance (shape, colour, size, grid position, background colour); the stripe angle,
frequency and phase, the exact shape offsets and small colour jitter are *not* described. So no image can be
derived from its caption alone, and a generator that reproduces those undescribed details for a caption has
seen that image: that is the membership signal the toy target must carry.

Scene ``i`` of split ``s`` is a pure function of ``(seed, s, i)``, so any split can be regenerated at any size
and members and non-members are drawn from exactly the same distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "pink": (235, 160, 180),
    "teal": (40, 140, 140),
    "brown": (120, 80, 40),
    "navy": (25, 35, 90),
    "beige": (215, 200, 160),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}

# Splits of the toy world. Their order is part of the seed derivation: never reorder.
SPLITS = ("public", "members", "nonmembers", "heldout")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str
    dx: float  # undescribed offset from the grid point, fraction of side
    dy: float
    rgb_jitter: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    bg_jitter: tuple[int, int, int]
    stripe_angle: float  # undescribed texture
    stripe_freq: float
    stripe_phase: float
    stripe_amp: float
    shapes: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        parts = [f"a {s.size} {s.colour} {s.kind} at the {s.position}" for s in self.shapes]
        return " and ".join(parts) + f" on a {self.background} background"


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # A stable hash (not Python's salted hash()) so scenes are identical across processes and machines.
    digest = hashlib.sha256(f"{seed}:{split}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_scene(seed: int, split: str, index: int) -> Scene:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")
    rng = _rng(seed, split, index)
    n_shapes = int(rng.integers(1, 3))
    positions = rng.choice(list(POSITIONS), size=n_shapes, replace=False)
    shapes = []
    for pos in positions:
        shapes.append(
            Shape(
                kind=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=str(rng.choice(list(SIZES))),
                position=str(pos),
                dx=float(rng.uniform(-0.07, 0.07)),
                dy=float(rng.uniform(-0.07, 0.07)),
                rgb_jitter=tuple(int(v) for v in rng.integers(-25, 26, size=3)),
            )
        )
    return Scene(
        background=str(rng.choice(list(BACKGROUNDS))),
        bg_jitter=tuple(int(v) for v in rng.integers(-20, 21, size=3)),
        stripe_angle=float(rng.uniform(0, np.pi)),
        stripe_freq=float(rng.uniform(0.25, 0.6)),
        stripe_phase=float(rng.uniform(0, 2 * np.pi)),
        stripe_amp=float(rng.uniform(25, 45)),
        shapes=tuple(shapes),
    )


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Rasterise a scene to uint8 [H, W, 3], anti-aliased by 4x supersampling."""
    ss = 4
    n = resolution * ss
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xx = (xx + 0.5) / n
    yy = (yy + 0.5) / n
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + scene.bg_jitter, 0, 255).astype(np.float32)
    u = xx * np.cos(scene.stripe_angle) + yy * np.sin(scene.stripe_angle)
    stripes = np.sin(2 * np.pi * scene.stripe_freq * resolution * u / 4 + scene.stripe_phase)
    img = bg[None, None, :] + scene.stripe_amp * stripes[..., None]
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        cx, cy = cx + s.dx, cy + s.dy
        r = SIZES[s.size]
        if s.kind == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        elif s.kind == "square":
            h = r * 0.85
            mask = (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
        else:  # triangle pointing up
            top, bottom = cy - r, cy + r * 0.8
            half_width = (yy - top) / (bottom - top) * r
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)
        colour = np.clip(np.array(COLOURS[s.colour]) + s.rgb_jitter, 0, 255).astype(np.float32)
        img[mask] = colour
    img = img.reshape(resolution, ss, resolution, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def scene_images(seed: int, split: str, count: int, start: int = 0) -> tuple[np.ndarray, list[str]]:
    """Images uint8 [count, H, W, 3] and captions for scenes ``start .. start+count-1`` of a split."""
    scenes = [sample_scene(seed, split, i) for i in range(start, start + count)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def write_imagefolder(
    out: Path, images: np.ndarray, captions: list[str], members: list[bool] | None = None, prefix: str = "img"
) -> Path:
    """Write an ImageFolder: PNG files plus metadata.jsonl (file_name, text, and member when known)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, cap) in enumerate(zip(images, captions)):
        name = f"{prefix}_{i:05d}.png"
        Image.fromarray(img).save(out / name)
        row = {"file_name": name, "text": cap}
        if members is not None:
            row["member"] = bool(members[i])
        lines.append(json.dumps(row))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
