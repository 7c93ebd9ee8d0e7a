"""DDIM sampling schedule for the runtime: diffusers' ``DDIMScheduler`` math, read from the exported config.

The tables (betas, cumulative alphas) are built with the same float32 torch operations diffusers uses, once; the
per-step update is ``kernels.cfg_ddim_step``. Only deterministic DDIM (eta = 0) is supported, which is what the
torch path runs for DDIM pipelines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from ..kernels.guidance import PREDICTION_TYPES, DdimCoefficients

SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def check_scheduler_config(config: dict, where: str) -> None:
    """Refuse a scheduler config the runtime cannot reproduce exactly, saying what is unsupported."""
    cls = config.get("_class_name")
    if cls != "DDIMScheduler":
        raise ArtifactError(f"{where}: the runtime samples with DDIM only; this pipeline's scheduler is {cls!r} "
                            "(audit it on the torch path, without exporting)")
    problems = []
    if config.get("thresholding"):
        problems.append("thresholding=True")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        problems.append(f"prediction_type={config.get('prediction_type')!r}")
    if config.get("timestep_spacing", "leading") not in SPACINGS:
        problems.append(f"timestep_spacing={config.get('timestep_spacing')!r}")
    if config.get("trained_betas") is None and config.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        problems.append(f"beta_schedule={config.get('beta_schedule')!r}")
    if problems:
        raise ArtifactError(f"{where}: DDIM settings not supported by the runtime: {', '.join(problems)}")


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999):
    import torch

    # diffusers' cosine schedule ("squaredcos_cap_v2"), computed in Python floats then stored as float32.
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas):
    import torch

    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class DdimSchedule:
    def __init__(self, config: dict, where: str = "scheduler config"):
        import torch

        check_scheduler_config(config, where)
        self.config = config
        n = self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        schedule = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = _betas_for_alpha_bar(n)
        if config.get("rescale_betas_zero_snr", False):
            betas = _rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.clip_range = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        self.init_noise_sigma = 1.0

    @classmethod
    def from_file(cls, path: str | Path) -> "DdimSchedule":
        path = Path(path)
        try:
            return cls(json.loads(path.read_text(encoding="utf-8")), str(path))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: scheduler config not found") from None

    def timesteps(self, steps: int) -> np.ndarray:
        n, spacing = self.num_train_timesteps, self.config.get("timestep_spacing", "leading")
        if not 1 <= steps <= n:
            raise ArtifactError(f"steps must be between 1 and {n} for this scheduler, got {steps}")
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            ratio = n // steps
            return (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + int(
                self.config.get("steps_offset", 0))
        return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1

    def coefficients(self, t: int, steps: int) -> DdimCoefficients:
        """Scalars of the update at timestep ``t`` (float32, computed as diffusers computes them)."""
        prev = t - self.num_train_timesteps // steps
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        b = 1 - a
        return DdimCoefficients(np.float32(a**0.5), np.float32(b**0.5), np.float32(a_prev**0.5),
                                np.float32((1 - a_prev) ** 0.5))

    def plan(self, steps: int) -> list[tuple[int, DdimCoefficients]]:
        return [(int(t), self.coefficients(int(t), steps)) for t in self.timesteps(steps)]
