"""The gray-box tier's features: each attack's error at K timesteps, over the ``Denoiser`` protocol.

For a query image ``x`` with caption ``c`` the target's VAE encoder gives ``z_0`` (posterior mean x scaling factor),
its text encoder the conditioning of ``c``; ``a_t`` is the training schedule's cumulative alpha (``alphas_cumprod``),
``eps(z, t)`` the UNet's noise prediction conditioned on ``c`` without classifier-free guidance (converted to a
noise prediction for v- or sample-predicting UNets). With timesteps ``t_1 < ... < t_K`` (``FeaturesConfig.
graybox_timesteps``) and ``z_t(e) = sqrt(a_t) z_0 + sqrt(1 - a_t) e``:

- ``loss`` (the plain denoising loss): ``mean((eps(z_t(n_k), t_k) - n_k)^2)`` with fresh Gaussian noise ``n_k``
  drawn from a seed derived from the run seed, the caption and the image (``seeding.query_seed``).
- ``PIA`` (Kong et al. 2023, proximal initialisation): ``e_0 = eps(z_0, 0)``; ``mean(|eps(z_t(e_0), t_k) - e_0|^4)``,
  the paper's l4 distance (its code's ``lp=4``).
- ``SecMI`` (Duan et al. 2023, as in PIA's ``SecMIAttacker``): a deterministic DDIM inversion ``z_0 -> z_{t_1} ->
  ... -> z_{t_K}``, one step per timestep (``t_0 = 0``), step k with ``eps(z_{t_{k-1}}, t_{k-1})``; then each
  ``z_{t_k}`` is denoised one DDIM step back to ``t_{k-1}`` with ``eps(z_{t_k}, t_k)`` and
  ``mean((denoised - z_{t_{k-1}})^2)`` is error k. The inversion's next step uses that same evaluation, so SecMI
  costs K + 1 UNet evaluations (PIA's code evaluates it twice), the first of them PIA's ``e_0``.

- ``CLiD`` (Zhai et al. 2024, conditional likelihood discrepancy): at each of its own timesteps ``s_j``
  (``FeaturesConfig.clid_timesteps``, the paper's 440, 450, 460 for a 1000-step schedule) and one fresh noise ``n_j``
  (seeded like the loss's, under its own label), the denoising loss ``mean((eps(z_s(n_j), s_j | c') - n_j)^2)`` for
  three conditionings ``c'``: the caption ``c``, the empty caption (unconditional) and ``c`` with about half its words
  removed (``masked_caption``: a seeded choice per caption, where the paper drops the words a separate importance
  model ranks highest). Stored as [K, 3]; the discrepancies (unconditional or masked minus conditional: a member's
  caption lowers its loss more) are formed by the attack (``attacks.inputs``). 3 K UNet evaluations.

Means are over the latent's elements (the papers sum; the mean divides by a constant). Every value depends on its
row alone: UNet batches mix rows, but nothing is computed across them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..seeding import query_seed

# Attack -> store dataset; the order is the store's.
DATASETS = {"loss": "graybox_loss", "PIA": "graybox_pia", "SecMI": "graybox_secmi", "CLiD": "graybox_clid"}
MAX_TIMESTEPS = 32
DEFAULT_TIMESTEPS = (100, 200, 300)
# CLiD's timesteps in its code (Tmid 450, spacing 10, 3 samples) for SD's 1000-step schedule.
CLID_TIMESTEPS = (440, 450, 460)


def check_timesteps(timesteps: Sequence[int], train_steps: int | None = None) -> tuple[int, ...]:
    """Strictly increasing timesteps in [1, T - 1] (T: the schedule's training steps, when known)."""
    ts = tuple(int(t) for t in timesteps)
    if not ts or len(ts) > MAX_TIMESTEPS:
        raise UsageError(f"--graybox-timesteps: give 1 to {MAX_TIMESTEPS} timesteps, got {len(ts)}")
    if any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < 1:
        raise UsageError(f"--graybox-timesteps must be strictly increasing and >= 1, got {','.join(map(str, ts))}")
    if train_steps is not None and ts[-1] >= train_steps:
        raise UsageError(f"--graybox-timesteps: {ts[-1]} is past this target's {train_steps} training timesteps")
    return ts


def unet_evaluations(attacks: Sequence[str], n_timesteps: int, n_clid_timesteps: int = len(CLID_TIMESTEPS)) -> int:
    """UNet evaluations per query for these gray-box attacks computed together (PIA and SecMI share eps(z_0, 0)):
    K for the loss, 1 + K for PIA, 1 + K for SecMI, 3 K' for CLiD (K' its own timesteps)."""
    k = n_timesteps
    shared = 1 if "PIA" in attacks or "SecMI" in attacks else 0
    return shared + k * sum(a in attacks for a in ("loss", "PIA", "SecMI")) + 3 * n_clid_timesteps * ("CLiD" in attacks)


def masked_caption(caption: str, seed: int) -> str:
    """``caption`` with about half its words removed, the same for the same caption and seed: each word is dropped
    with probability 1/2, at least one dropped and one kept (a one-word caption becomes empty)."""
    words = caption.split()
    if len(words) < 2:
        return ""
    rng = np.random.default_rng(query_seed(seed, caption, b"", "clid-mask"))
    drop = rng.random(len(words)) < 0.5
    if drop.all() or not drop.any():
        drop[rng.integers(len(words))] = not drop[0]
    return " ".join(w for w, d in zip(words, drop) if not d)


class _Unet:
    """eps(z, t) for a batch of (latent, timestep, query row), as a noise prediction whatever the UNet predicts."""

    def __init__(self, denoiser, context):
        self.d, self.context = denoiser, context
        self.calls = 0

    def __call__(self, z: np.ndarray, t: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.asarray(self.d.predict(z, t, self.context, rows), np.float32)
        self.calls += len(z)
        kind = self.d.prediction_type
        if kind == "epsilon":
            return out
        a = self.d.alphas_cumprod[t].astype(np.float32)[:, None, None, None]
        if kind == "v_prediction":
            return np.sqrt(a) * out + np.sqrt(1 - a) * z
        if kind == "sample":
            return (z - np.sqrt(a) * out) / np.sqrt(1 - a)
        raise UsageError(f"target {self.d.name!r}: unsupported prediction_type {kind!r}")


def _noised(z0: np.ndarray, e: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.sqrt(a) * z0 + np.sqrt(1 - a) * e


def _ddim(z: np.ndarray, e: np.ndarray, a_from: np.ndarray, a_to: np.ndarray) -> np.ndarray:
    """One deterministic DDIM step (eta 0) between any two timesteps, forwards (inversion) or backwards."""
    z0 = (z - np.sqrt(1 - a_from) * e) / np.sqrt(a_from)
    return np.sqrt(a_to) * z0 + np.sqrt(1 - a_to) * e


def _mean_power(x: np.ndarray, p: int) -> np.ndarray:
    return np.mean(np.abs(x.astype(np.float64)) ** p, axis=tuple(range(1, x.ndim))).astype(np.float32)


def _loss_noise(images: np.ndarray, captions: Sequence[str], seed: int, k: int, shape: tuple,
                label: str = "loss") -> np.ndarray:
    import torch

    out = np.empty((len(images), k, *shape), np.float32)
    for i, (im, c) in enumerate(zip(images, captions)):
        g = torch.Generator("cpu").manual_seed(query_seed(seed, c, np.ascontiguousarray(im).tobytes(), label))
        out[i] = torch.randn((k, *shape), generator=g, dtype=torch.float32).numpy()
    return out


def graybox_errors(denoiser, images: np.ndarray, captions: Sequence[str], timesteps: Sequence[int], seed: int,
                   attacks: Sequence[str] = tuple(DATASETS), clid_timesteps: Sequence[int] = CLID_TIMESTEPS,
                   latents: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
    """({dataset: float32 [N, K] (CLiD: [N, K', 3])} for the wanted ``attacks``, UNet evaluations done) for uint8
    ``images`` [N, R, R, 3] at the denoiser's resolution with their ``captions``. ``latents``: the images' latents
    when already encoded (a reference model reuses the target's, as it shares its VAE)."""
    unknown = sorted(set(attacks) - set(DATASETS))
    if unknown:
        raise UsageError(f"unknown gray-box attack(s) {unknown}; valid: {', '.join(DATASETS)}")
    ts = np.asarray(check_timesteps(timesteps, len(denoiser.alphas_cumprod)), np.int64)
    n, k = len(images), len(ts)
    if n == 0:
        return {DATASETS[a]: np.zeros((0, k), np.float32) for a in attacks}, 0
    z0 = np.asarray(denoiser.encode_images(images) if latents is None else latents, np.float32)
    masked = [masked_caption(c, seed) for c in captions] if "CLiD" in attacks else []
    unique = list(dict.fromkeys([*captions, *masked, *([""] if masked else [])]))
    where = {c: i for i, c in enumerate(unique)}
    rows = np.array([where[c] for c in captions], np.int64)
    unet = _Unet(denoiser, denoiser.text_context(unique))
    ac = denoiser.alphas_cumprod
    a = ac[ts].astype(np.float32)  # [K]
    rep = np.repeat(np.arange(n), k)  # query of each (query, timestep) pair, query-major
    a_rep = np.tile(a, n)[:, None, None, None]
    t_rep = np.tile(ts, n)
    flat = lambda x: x.reshape(n * k, *x.shape[2:])  # noqa: E731
    out: dict[str, np.ndarray] = {}

    if "loss" in attacks:
        noise = flat(_loss_noise(images, captions, seed, k, z0.shape[1:]))
        pred = unet(_noised(z0[rep], noise, a_rep), t_rep, rows[rep])
        out[DATASETS["loss"]] = _mean_power(pred - noise, 2).reshape(n, k)
    if "PIA" in attacks or "SecMI" in attacks:
        e0 = unet(z0, np.zeros(n, np.int64), rows)
    if "PIA" in attacks:
        e0_rep = e0[rep]
        pred = unet(_noised(z0[rep], e0_rep, a_rep), t_rep, rows[rep])
        out[DATASETS["PIA"]] = _mean_power(pred - e0_rep, 4).reshape(n, k)
    if "CLiD" in attacks:
        out[DATASETS["CLiD"]] = _clid(unet, z0, images, captions, masked, where, seed,
                                      check_timesteps(clid_timesteps, len(ac)), ac)
    if "SecMI" in attacks:
        # Inversion t_0 = 0 -> t_1 -> ... -> t_K; eps(z_{t_k}, t_k) both denoises z_{t_k} one step back and makes
        # the next inversion step (eps(z_0, 0) is PIA's e_0).
        a_prev, z, e = np.float32(ac[0]), z0, e0
        errors = np.empty((n, k), np.float32)
        for j in range(k):
            z_next = _ddim(z, e, a_prev, a[j])
            e = unet(z_next, np.full(n, ts[j], np.int64), rows)
            errors[:, j] = _mean_power(_ddim(z_next, e, a[j], a_prev) - z, 2)
            a_prev, z = a[j], z_next
        out[DATASETS["SecMI"]] = errors
    return out, unet.calls


def _clid(unet: _Unet, z0: np.ndarray, images: np.ndarray, captions: Sequence[str], masked: Sequence[str],
          where: dict, seed: int, timesteps: Sequence[int], ac: np.ndarray) -> np.ndarray:
    """float32 [N, K', 3]: the conditional, unconditional and masked-caption losses at the same noise."""
    n, k = len(z0), len(timesteps)
    ts = np.asarray(timesteps, np.int64)
    noise = _loss_noise(images, captions, seed, k, z0.shape[1:], "clid").reshape(n * k, *z0.shape[1:])
    rep = np.repeat(np.arange(n), k)
    zt = _noised(z0[rep], noise, ac[ts].astype(np.float32)[np.tile(np.arange(k), n)][:, None, None, None])
    t_rep = np.tile(ts, n)
    out = np.empty((n, k, 3), np.float32)
    for j, texts in enumerate((captions, [""] * n, masked)):
        rows = np.array([where[c] for c in texts], np.int64)[rep]
        out[:, :, j] = _mean_power(unet(zt, t_rep, rows) - noise, 2).reshape(n, k)
    return out
