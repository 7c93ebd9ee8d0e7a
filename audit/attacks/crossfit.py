"""Cross-fitted heads (``audit train --folds K``): every labelled row outside the test split serves calibration.

The rows outside the outer test split are dealt into K folds (seeded, stratified by class, depending on the ids,
labels and seed only). Member k of an attack is fitted on the other K-1 folds — its early stopping on a seeded
part of those folds, never on fold k — and scores fold k: each such row gets exactly one *out-of-fold* score, from
the one member that never saw it.

The rule (``RULE``): a query is scored by all K members, combined as the mean of their logits, and calibrated by
one Platt map fitted on all out-of-fold logits (``probability = sigmoid(a * mean_k s_k + b)``); the verdict
thresholds of any budget are the split-conformal ones of ``attacks/decision.py`` fitted on ALL out-of-fold
probabilities (n = every labelled row outside the test split instead of the validation quarter). One map for all
members, not one per fold: a map fitted on a fold's labels would pull that fold's own non-members down, below where
an unseen non-member lands, and the pooled thresholds would admit more than the budget. A shared increasing map
keeps the out-of-fold ranks, so the thresholds are those of the raw out-of-fold logits. docs/verdicts.md states
what that guarantees and benchmarks/verdict_budget.py measures it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ..errors import InputError
from ..seeding import derive_seed
from . import calibration
from .export import export_head
from .inputs import get_attack
from .nets import ScoringHead

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
COMBINE = "mean of the K members' logits, one Platt map fitted on all out-of-fold logits"
THRESHOLDS = "split-conformal on all out-of-fold probabilities"
RULE = f"{COMBINE}; thresholds {THRESHOLDS}"


class CrossFitHead(nn.Module):
    """K ScoringHeads as one graph: ``score`` is the mean of the members' logits, ``probability`` its Platt map
    (``platt``, fitted on the out-of-fold logits; the members' own maps are unused)."""

    def __init__(self, members: list[ScoringHead]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("platt", torch.tensor([1.0, 0.0], dtype=torch.float32))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.score(x) for m in self.members], dim=0).mean(dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.score(x)
        return s, torch.sigmoid(self.platt[0] * s + self.platt[1])


def stratified_folds(pool: np.ndarray, labels: np.ndarray, ids: list[str], k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) of each row of ``pool`` (row indices), stratified by class: each class is put in a
    seeded order (of its ids, not of the store's rows) and dealt round-robin, so fold sizes differ by at most one
    per class."""
    pool = np.asarray(pool, dtype=np.int64)
    fold = np.full(len(pool), -1, dtype=np.int64)
    for cls in (1, 0):
        at = np.flatnonzero(np.asarray(labels)[pool] == cls)
        name = "members" if cls == 1 else "non-members"
        if len(at) < k:
            raise InputError(f"cross-fitting with {k} folds needs at least {k} labelled {name} outside the test "
                             f"split (one per fold); there are {len(at)}: use fewer --folds (--folds 0: one split)")
        at = at[np.argsort([ids[pool[i]] for i in at], kind="stable")]
        at = at[np.random.default_rng(derive_seed("folds", seed, cls)).permutation(len(at))]
        fold[at] = np.arange(len(at)) % k
    return fold


def fold_plan(pool: np.ndarray, labels: np.ndarray, ids: list[str], k: int, seed: int,
              early_stop_fraction: float) -> list[dict[str, np.ndarray]]:
    """Per fold: ``held`` (its rows, scored out of fold), and the other folds split into ``fit`` and
    ``early_stop`` rows (seeded and stratified like the split mode's early-stopping rows)."""
    from .train import early_stop_split

    fold = stratified_folds(pool, labels, ids, k, seed)
    plan = []
    for j in range(k):
        held, rest = np.sort(pool[fold == j]), np.sort(pool[fold != j])
        fit, stop = early_stop_split(rest, labels, ids, derive_seed("fold", seed, j), early_stop_fraction)
        plan.append({"held": held, "fit": fit, "early_stop": stop})
    return plan


def fit_crossfit_attack(attack: str, x: np.ndarray, y: np.ndarray, plan: list[dict[str, np.ndarray]],
                        pool: np.ndarray, cfg, out_dir: Path) -> tuple[dict, np.ndarray]:
    """Fit the K members of one attack, calibrate their mean on the out-of-fold logits, export them as one graph;
    returns the heads.json entry and the out-of-fold probabilities of ``pool`` (in ``pool``'s order)."""
    from .train import _fit_network, head_entry

    spec = get_attack(attack)
    t0 = time.perf_counter()
    members, trainings = [], []
    oof_logit = np.full(len(x), np.nan, dtype=np.float32)
    for j, part in enumerate(plan):
        stop = part["early_stop"] if len(part["early_stop"]) else part["fit"]
        head, training = _fit_network(spec.kind, x[part["fit"]], y[part["fit"]], x[stop], y[stop], cfg,
                                      derive_seed("head", cfg.seed, attack, "fold", j))
        with torch.no_grad():
            oof_logit[part["held"]] = head.score(torch.from_numpy(x[part["held"]])).numpy()
        members.append(head)
        trainings.append({**training, "n": int(len(part["fit"])), "n_early_stop": int(len(part["early_stop"])),
                          "n_out_of_fold": int(len(part["held"]))})
    yp = y[pool]
    a, b = calibration.fit_platt(oof_logit[pool], yp)
    combined = CrossFitHead(members).eval()
    combined.platt.copy_(torch.tensor([a, b], dtype=torch.float32))
    file = f"{attack}.onnx"
    parity = export_head(combined, x[pool], out_dir / file, check=x[pool], threads=cfg.threads or None)
    # The out-of-fold probability through the combined graph's own float32 map.
    with torch.no_grad():
        oof = torch.sigmoid(combined.platt[0] * torch.from_numpy(oof_logit[pool]) + combined.platt[1])
    oof = oof.numpy().astype(np.float64)
    entry = head_entry(attack, x.shape, out_dir / file, oof, yp,
                       {"method": "platt", "a": a, "b": b, "fitted_on": "out-of-fold"},
                       "each member's training folds",
                       {"epochs_run": int(max(t["epochs_run"] for t in trainings)), "members": trainings,
                        "seconds": round(time.perf_counter() - t0, 2)}, parity, on="out-of-fold",
                       extra={"cross_fit": {"folds": len(plan), "rule": RULE,
                                            "out_of_fold": {"probability": oof.tolist(),
                                                            "logit": oof_logit[pool].tolist()}}})
    log.info("%s: %d cross-fitted members, out-of-fold AUC %.3f (%.1f s)", attack, len(plan),
             entry["validation"]["auc"], entry["training"]["seconds"])
    return entry, oof


def split_record(plan: list[dict[str, np.ndarray]], pool: np.ndarray, test: np.ndarray, y: np.ndarray,
                 ids: list[str], seed: int, test_fraction: float) -> dict:
    """heads.json's ``split`` of cross-fitted heads: the folds, each fold's early-stopping rows, the test split."""
    from .train import ids_digest

    counts = lambda rows: {"members": int((y[rows] == 1).sum()), "nonmembers": int((y[rows] == 0).sum())}  # noqa
    fold_of = np.empty(len(y), dtype=np.int64)
    for j, part in enumerate(plan):
        fold_of[part["held"]] = j
    return {
        "mode": "cross-fit",
        "seed": seed,
        "fractions": {"test": test_fraction},
        "folds": len(plan),
        "out_of_fold": [ids[i] for i in pool],  # the order of every attack's cross_fit.out_of_fold lists
        "fold_of": [int(fold_of[i]) for i in pool],
        "early_stop": [[ids[i] for i in part["early_stop"]] for part in plan],
        "test": [ids[i] for i in test],
        "ids_sha256": {"out_of_fold": ids_digest([ids[i] for i in pool]), "test": ids_digest([ids[i] for i in test])},
        "counts": {"out_of_fold": counts(pool), "test": counts(test),
                   "folds": [counts(part["held"]) for part in plan]},
    }


def crossfit_summary(info: Mapping) -> dict | None:
    """``{"folds", "rule", "n_out_of_fold"}`` of cross-fitted heads' heads.json, None for split heads."""
    split = info.get("split") or {}
    if split.get("mode") != "cross-fit":
        return None
    return {"folds": split.get("folds"), "rule": RULE, "n_out_of_fold": len(split.get("out_of_fold") or [])}
