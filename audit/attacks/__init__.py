"""Attack heads: feature construction per attack, training, calibration, metrics, ONNX export, heads registry.

Public names: ``ATTACKS``, ``build_inputs``, ``TrainConfig``, ``train_heads``, ``Heads``, ``load_heads``,
``find_heads``, ``register_heads``, ``resolve_heads``, ``evaluate_heads``, ``Decision`` (a verdict rule at a budget).
"""

from .decision import Decision
from .evaluate import evaluate_heads
from .heads import Heads, audit_home, find_heads, load_heads, no_heads_message, register_heads, resolve_heads
from .inputs import ATTACKS, PAPER_ATTACKS, build_inputs, parse_attacks
from .train import TrainConfig, train_heads

__all__ = [
    "ATTACKS", "PAPER_ATTACKS", "Decision", "Heads", "TrainConfig", "audit_home", "build_inputs", "evaluate_heads", "find_heads",
    "load_heads", "no_heads_message", "parse_attacks", "register_heads", "resolve_heads", "train_heads",
]
