"""The paper's study (Wu et al. 2022, RQ1-RQ5) on the toy world, plus set-level inference and output defences.

``run_experiment(ExperimentConfig(), out="docs")`` regenerates docs/RESULTS.md, its PNG plots and experiment.json
(``audit experiment``). Modules: ``config`` (ExperimentConfig), ``plan`` (the task graph), ``schedule`` (worker
processes), ``stores`` (cached feature stores, replay), ``models`` (models trained for RQ3/RQ4), ``cells`` (heads
per table cell), ``analysis`` (aggregates, Fréchet distances, set-level power), ``plots``, ``report``.
"""

from .config import ExperimentConfig
from .runner import run_experiment

__all__ = ["ExperimentConfig", "run_experiment"]
