"""Evaluation of trained heads on the test split recorded in heads.json: metrics with bootstrap CIs, ROC plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import ArtifactError, InputError
from ..manifest import check_manifest
from . import metrics
from .decision import DEFAULT_MAX_FPR, DEFAULT_RULE, rule_text
from .heads import Heads
from .train import _jsonable, _str_ids, ids_digest

log = logging.getLogger(__name__)


def test_rows(batch: Mapping[str, np.ndarray], heads: Heads, store: str) -> np.ndarray:
    """Row indices of the heads' test split in this batch; every test id must be present and labelled."""
    index = {i: k for k, i in enumerate(_str_ids(batch["ids"]))}
    test_ids = heads.info["split"]["test"]
    if not test_ids:
        raise ArtifactError(f"{heads.path}: these heads hold no test split (trained with --test-fraction 0), so "
                            "nothing is left to evaluate them on; their out-of-fold figures are in heads.json")
    missing = [i for i in test_ids if i not in index]
    if missing:
        raise ArtifactError(
            f"{store}: {len(missing)} of the {len(test_ids)} test ids of {heads.path} are not ok rows of this store "
            f"(first: {missing[0]!r}); evaluate on the store the heads were trained on"
        )
    rows = np.array([index[i] for i in test_ids], dtype=np.int64)
    labels = np.asarray(batch["member"])[rows]
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"{store}: test rows without a member label")
    return rows


def evaluate_heads(batch: Mapping[str, np.ndarray], heads: Heads, store_manifest: dict | None, store: str,
                   store_sha256: str | None = None, n_boot: int = 1000, seed: int = 0,
                   plot: str | Path | None = None, rule: str = DEFAULT_RULE, max_fpr: float = DEFAULT_MAX_FPR,
                   max_miss: float | None = None) -> dict:
    """Metrics of every attack of ``heads`` on its test split of ``batch`` (``{"attacks": {...}, "n_test": ...}``).

    Besides the threshold-free metrics, each attack's ``verdicts`` entry holds its verdict rule at this budget
    (thresholds fitted on validation, see ``audit.attacks.decision``) and what that rule does on the test rows:
    the fraction decided, FPR (member verdicts per test non-member), precision, TPR, miss rate, with CIs."""
    decisions = heads.decisions(rule, max_fpr, max_miss)  # a bad budget fails before anything is scored
    if store_manifest is not None:
        check_manifest(store_manifest, "features", store, heads.target)
        heads.check_compatible(embedder=store_manifest.get("embedder"), captioner=store_manifest.get("captioner"))
    warnings: list[str] = list(heads.warnings)
    trained_on = (heads.info["manifest"].get("feature_store") or {}).get("sha256")
    if store_sha256 and trained_on and store_sha256 != trained_on:
        warnings.append(
            f"{store} is not the feature store the heads were trained on (sha256 {store_sha256[:16]} vs "
            f"{trained_on[:16]}); the test split is selected by id"
        )
    rows = test_rows(batch, heads, store)
    sub = {k: np.asarray(v)[rows] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == len(batch["ids"])}
    if ids_digest(_str_ids(sub["ids"])) != heads.info["split"]["ids_sha256"]["test"]:
        raise ArtifactError(f"{heads.path}: the recorded test split does not match its digest; heads.json was edited")
    y = np.asarray(sub["member"]).astype(np.int64)
    preds = heads.predict(sub)
    out_attacks = {}
    curves = {}
    for k, (attack, p) in enumerate(preds.items()):
        m = metrics.attack_metrics(y, p["probability"], p["threshold"], n_boot, seed + 10 * k)
        # What a deployment at the validation 1%-FPR threshold would see on unseen rows.
        t1 = (heads.info["attacks"][attack].get("thresholds") or {}).get("fpr_1pct", {}).get("threshold")
        if t1 is not None:
            hit = np.asarray(p["probability"], np.float64) >= t1
            m["at_validation_1pct_fpr_threshold"] = {
                "threshold": float(t1),
                "tpr": float(hit[y == 1].mean()) if (y == 1).any() else float("nan"),
                "fpr": float(hit[y == 0].mean()) if (y == 0).any() else float("nan"),
            }
        m["tier"] = heads.tier(attack)
        d = decisions[attack]
        m["verdicts"] = {**d.to_dict(), **metrics.verdict_metrics(y, p["probability"], d.member_threshold,
                                                                 d.nonmember_threshold, n_boot, seed + 10 * k + 5)}
        out_attacks[attack] = m
        curves[attack] = (y, np.asarray(p["probability"], np.float64))
    chosen = decisions[heads.default_attack]
    warnings.extend(chosen.notes)
    result = {
        "attacks": out_attacks,
        "default_attack": heads.default_attack,
        "decision": {"rule": chosen.rule, "max_fpr": chosen.max_fpr, "max_miss": chosen.max_miss},
        "calibration": calibration_summary(heads.info),
        "n_test": int(len(y)),
        "n_test_members": int((y == 1).sum()),
        "n_test_nonmembers": int((y == 0).sum()),
        "store": str(store),
        "heads": str(heads.path),
        "target": heads.target,
        "blind_baseline": heads.info.get("blind_baseline"),
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "ci": "percentile 95%, stratified by class"},
        "warnings": warnings,
    }
    if plot is not None:
        title = f"ROC on {len(y)} test rows ({result['n_test_members']} members)"
        result["plot"] = str(metrics.plot_roc(curves, plot, title))
    return _jsonable(result)


def calibration_summary(info: Mapping) -> dict:
    """Where the heads' thresholds come from: ``{"on": "validation"}`` or ``{"on": "out-of-fold", "folds": K,
    "rule": ...}``, with the number of rows of each class they were fitted on."""
    from .crossfit import crossfit_summary

    split = info.get("split") or {}
    cross = crossfit_summary(info)
    counts = (split.get("counts") or {}).get("out_of_fold" if cross else "validation") or {}
    out = {"on": "out-of-fold" if cross else "validation", "n_members": counts.get("members"),
           "n_nonmembers": counts.get("nonmembers")}
    return {**out, "folds": cross["folds"], "rule": cross["rule"]} if cross else out


def calibration_text(cal: Mapping | None) -> str:
    """``validation (50 non-members, 50 members)`` or ``out-of-fold scores of 5 cross-fitted folds (...)``."""
    cal = cal or {}
    rows = f"{cal.get('n_nonmembers')} non-members, {cal.get('n_members')} members"
    if cal.get("on") == "out-of-fold":
        return f"the out-of-fold scores of {cal.get('folds')} cross-fitted folds ({rows})"
    return f"validation ({rows})" if cal else "validation"


def _fmt(m) -> str:
    if m is None:
        return "-"
    if isinstance(m, dict):
        v, ci = m.get("value"), m.get("ci95") or [None, None]
        if v is None:
            return "-"
        if ci[0] is None:
            return f"{v:.3f}"
        return f"{v:.3f} [{ci[0]:.2f},{ci[1]:.2f}]"
    return f"{m:.3f}"


def format_verdicts_table(result: dict) -> list[str]:
    """Lines: per attack, what its verdicts at the budget do on the test split (thresholds from validation)."""
    if not any("verdicts" in m for m in result["attacks"].values()):
        return []
    cols = ("decided_fraction", "fpr", "precision", "tpr")
    head = ("attack", "decided", "FPR", "precision", "TPR (member verdicts)")
    lines = [f"verdicts at {rule_text(result.get('decision'))}, thresholds fitted on "
             f"{calibration_text(result.get('calibration'))}:",
             f"{head[0]:<11} " + " ".join(f"{h:>20}" for h in head[1:]) + "   member/non-member/inconclusive"]
    names = [a for a in result["attacks"] if a != "blind"] + [a for a in result["attacks"] if a == "blind"]
    for a in names:
        v = result["attacks"][a].get("verdicts")
        if not v:
            continue
        c = v.get("counts") or {}
        lines.append(f"{a:<11} " + " ".join(f"{_fmt(v.get(k)):>20}" for k in cols)
                     + f"   {c.get('member', 0)}/{c.get('non-member', 0)}/{c.get('inconclusive', 0)}")
    return lines


def format_table(result: dict) -> str:
    """The evaluation as a text table: one row per attack, the blind baseline last, then the test-set size."""
    cols = ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")
    head = ("attack", "tier", "accuracy", "AUC", "TPR@1%FPR", "TPR@0.1%FPR")
    lines = [f"{head[0]:<11} {head[1]:<9} " + " ".join(f"{h:>20}" for h in head[2:])]
    names = [a for a in result["attacks"] if a != "blind"] + [a for a in result["attacks"] if a == "blind"]
    for a in names:
        m = result["attacks"][a]
        lines.append(f"{a:<11} {m.get('tier') or '-':<9} " + " ".join(f"{_fmt(m.get(c)):>20}" for c in cols))
    lines += ["", *format_verdicts_table(result)]
    n_neg = result.get("n_test_nonmembers") or 0
    lines.append(
        f"test split: {result['n_test']} rows ({result.get('n_test_members')} members, {n_neg} non-members); "
        f"95% bootstrap CIs in brackets"
        + (f"; FPR resolution 1/{n_neg}, so TPR at FPR below {1 / n_neg:.3g} is the TPR at FPR 0" if n_neg else "")
    )
    return "\n".join(lines)
