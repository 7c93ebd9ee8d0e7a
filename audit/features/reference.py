"""Difficulty calibration against a reference model: ``--reference MODEL`` computes every tier feature on a second
model (the base a fine-tune started from, the way LiRA and RMIA calibrate against reference models) with the very
same seeds and noise, so that target minus reference separates "this image is easy for any model" from "this target
learnt this image".

The reference must be interchangeable with the target at every step a feature goes through: the same image
resolution and family; for diffusion models with local weights also the same latent shape, training noise schedule
(``alphas_cumprod``), prediction type and VAE (checked by encoding one seeded probe image through both encoders).
Anything else is refused in one line before a row is computed.
"""

from __future__ import annotations

import numpy as np

from ..errors import AuditError, UsageError

# A VAE counts as the same when its probe latents agree to float32 rounding of a different graph or batch.
LATENT_TOLERANCE = 1e-4


def _name(model) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _denoiser(model):
    from ..targets.denoiser import denoiser_for

    try:
        return denoiser_for(model)
    except AuditError:
        return None


def _sampler(model) -> str | None:
    pipe = getattr(model, "pipe", None)
    return type(pipe.scheduler).__name__ if pipe is not None and hasattr(pipe, "scheduler") else None


def fit_problems(target, reference, target_denoiser=None, reference_denoiser=None) -> list[str]:
    """What makes ``reference`` unusable as the reference of ``target`` (both loaded Generators); empty when it
    fits."""
    problems = []
    for what in ("family", "resolution"):
        a, b = getattr(target, what, None), getattr(reference, what, None)
        if a is not None and b is not None and a != b:
            problems.append(f"{what} {b} vs the target's {a}")
    a, b = _sampler(target), _sampler(reference)
    if a and b and a != b:
        problems.append(f"sampler {b} vs the target's {a}")
    if problems:
        return problems
    td = target_denoiser or _denoiser(target)
    rd = reference_denoiser or _denoiser(reference)
    if td is None or rd is None:
        return problems
    if td.prediction_type != rd.prediction_type:
        problems.append(f"prediction type {rd.prediction_type} vs the target's {td.prediction_type}")
    ta, ra = np.asarray(td.alphas_cumprod), np.asarray(rd.alphas_cumprod)
    if ta.shape != ra.shape or not np.allclose(ta, ra, rtol=1e-5, atol=1e-6):
        problems.append(f"noise schedule of {len(ra)} steps differs from the target's ({len(ta)} steps)")
    probe = np.random.default_rng(0).integers(0, 256, (1, td.resolution, td.resolution, 3), dtype=np.uint8)
    zt, zr = np.asarray(td.encode_images(probe)), np.asarray(rd.encode_images(probe))
    if zt.shape != zr.shape:
        problems.append(f"latent shape {list(zr.shape[1:])} vs the target's {list(zt.shape[1:])}")
    elif not np.allclose(zt, zr, rtol=LATENT_TOLERANCE, atol=LATENT_TOLERANCE):
        problems.append(f"VAE differs from the target's (probe latents differ by up to "
                        f"{float(np.abs(zt - zr).max()):.3g})")
    return problems


def check_reference_fits(target, reference, target_denoiser=None, reference_denoiser=None) -> None:
    """One-line UsageError naming every mismatch between ``target`` and ``reference``."""
    problems = fit_problems(target, reference, target_denoiser, reference_denoiser)
    if problems:
        raise UsageError(f"reference {_name(reference)!r} does not fit target {_name(target)!r}: "
                         + "; ".join(problems) + "; a reference must share the target's resolution, latent shape, "
                         "noise schedule and VAE (the base model a fine-tune started from does)")
