"""The variation tier's features: how close the target's variations (img2img) of a query come back to it, over the
``Varier`` protocol (``targets.base``).

For a query image ``x`` (at the target's resolution, as the target takes it) with prompt ``c`` (its caption, or
"" when it has none), at each strength ``s`` of the sweep ``FeaturesConfig.var_strengths`` the target makes
``n_var`` variations ``v_1..v_V`` over ``steps`` DDIM steps, of which the last ``int(s x steps)`` run. Variation j
uses the same seed at every strength (``seeding.variation_seeds``: run seed, caption, the image's pixels, j), so the
sweep varies the strength alone. Stored per strength (``S`` strengths, ``V`` variations, ``P = V(V-1)/2`` pairs):

- ``var_pixel_dist`` [N, S, V]: mean squared pixel difference (pixels in [0, 1]) of each variation to ``x``;
- ``var_clip_dist`` [N, S, V]: 1 - cosine of the embedder's image embeddings of each variation and of ``x``;
- ``var_mean_pixel_dist`` [N, S]: ReDiffuse's statistic, the pixel distance of the variations' average to ``x``
  (averaging cancels the seeds' noise, leaving the model's bias: small for a member);
- ``var_pixel_pair``, ``var_clip_pair`` [N, S, P]: the variations' distances to each other (their spread: a
  member's variations agree).

Means and spreads across seeds are taken by the attacks (``attacks.inputs``), order-free. Every value depends on its
row alone.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..seeding import variation_seeds
from ..targets.variation import init_pixels, variation_steps

DATASETS = ("var_pixel_dist", "var_clip_dist", "var_mean_pixel_dist", "var_pixel_pair", "var_clip_pair")
# ReDiffuse reads small strengths (the image noised a little: a model brings its members back before the image is
# lost) and averages a few variations; Bohacek & Farid sweep the strength. On the toy (docs/attacks.md) a strength
# running one DDIM step barely separates and 0.2 and above separate fully, with no gain from a third variation at
# a fixed strength: three strengths from weak to clear, two variations (the fewest with a spread). At 25 steps that
# is 2 x (2 + 5 + 10) = 34 UNet evaluations a query, 0.68 of attack IV's 2 x 25.
DEFAULT_STRENGTHS = (0.1, 0.2, 0.4)
DEFAULT_N_VAR = 2
MAX_STRENGTHS = 16


def check_strengths(strengths: Sequence[float], steps: int | None = None) -> tuple[float, ...]:
    """Strictly increasing strengths in (0, 1], each running at least one of ``steps`` DDIM steps."""
    ss = tuple(float(s) for s in strengths)
    if not ss or len(ss) > MAX_STRENGTHS:
        raise UsageError(f"--var-strengths: give 1 to {MAX_STRENGTHS} strengths, got {len(ss)}")
    if any(b <= a for a, b in zip(ss, ss[1:])) or ss[0] <= 0 or ss[-1] > 1:
        raise UsageError(f"--var-strengths must be strictly increasing, in (0, 1], got {','.join(map(str, ss))}")
    if steps is not None:
        for s in ss:
            variation_steps(s, steps)
    return ss


def n_pairs(n_var: int) -> int:
    return n_var * (n_var - 1) // 2


def unet_evaluations(strengths: Sequence[float], n_var: int, steps: int, guided: bool = False) -> int:
    """UNet evaluations per query: ``n_var`` variations at each strength, ``int(s x steps)`` steps each."""
    return n_var * sum(variation_steps(s, steps) for s in strengths) * (2 if guided else 1)


def _mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a.astype(np.float32) / 255.0 - b.astype(np.float32) / 255.0
    return np.mean(d * d, axis=tuple(range(-3, 0)))


def variation_features(varier, embedder, images: np.ndarray, prompts: Sequence[str], strengths: Sequence[float],
                       n_var: int, steps: int, seed: int, guidance: float = 1.0) -> dict[str, np.ndarray]:
    """{dataset: float32 array} (``DATASETS``) for uint8 query ``images`` [N, H, W, 3] and their ``prompts``."""
    n, s_count, v = len(images), len(strengths), int(n_var)
    if v < 1:
        raise UsageError(f"--n-var must be >= 1, got {n_var}")
    pairs = np.triu_indices(v, 1)
    out = {"var_pixel_dist": np.zeros((n, s_count, v), np.float32),
           "var_clip_dist": np.zeros((n, s_count, v), np.float32),
           "var_mean_pixel_dist": np.zeros((n, s_count), np.float32),
           "var_pixel_pair": np.zeros((n, s_count, n_pairs(v)), np.float32),
           "var_clip_pair": np.zeros((n, s_count, n_pairs(v)), np.float32)}
    if n == 0:
        return out
    x = init_pixels(images, int(varier.resolution))  # [N, R, R, 3]: what the target varies
    seeds = [s for i in range(n) for s in variation_seeds(seed, prompts[i], hashlib.sha256(
        np.ascontiguousarray(x[i]).tobytes()).hexdigest(), v)]
    rep = np.repeat(np.arange(n), v)
    q_emb = _unit(np.asarray(embedder.embed_images(x), np.float32))
    for k, strength in enumerate(strengths):
        var = np.asarray(varier.vary_with_seeds(x[rep], [prompts[i] for i in rep], seeds, float(strength), steps,
                                                guidance))
        if var.shape != x[rep].shape or var.dtype != np.uint8:
            raise RuntimeError(f"target returned variations {var.dtype} {var.shape}, expected uint8 "
                               f"{x[rep].shape}")
        var = var.reshape(n, v, *x.shape[1:])
        out["var_pixel_dist"][:, k] = _mse(var, x[:, None])
        mean = var.astype(np.float32).mean(axis=1)
        out["var_mean_pixel_dist"][:, k] = np.mean((mean / 255.0 - x.astype(np.float32) / 255.0) ** 2,
                                                   axis=(1, 2, 3))
        emb = _unit(np.asarray(embedder.embed_images(var.reshape(n * v, *x.shape[1:])), np.float32)).reshape(n, v, -1)
        out["var_clip_dist"][:, k] = 1.0 - np.einsum("nd,nvd->nv", q_emb, emb)
        if v > 1:
            out["var_pixel_pair"][:, k] = _mse(var[:, pairs[0]], var[:, pairs[1]])
            out["var_clip_pair"][:, k] = 1.0 - np.einsum("npd,npd->np", emb[:, pairs[0]], emb[:, pairs[1]])
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)
