"""Evaluation metrics with seeded bootstrap confidence intervals, and the ROC plot.

TPR at a fixed FPR is read off scikit-learn's ROC curve as the highest TPR of any threshold whose FPR does not
exceed the target (a step, never a line drawn between ROC points): with n non-members FPRs come in steps of 1/n,
so below 1/n this is the TPR at FPR 0. ``resolution`` in the output says how coarse that is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, scores))


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, max_fpr: float) -> float:
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; equals roc_auc_score (tested), ~50x cheaper per bootstrap draw."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_tpr_at_fpr(y: np.ndarray, s: np.ndarray, max_fpr: float) -> float:
    """Same step rule as ``tpr_at_fpr`` without sklearn's input checking (tested equal)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    ss, pp = s[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(ss) != 0), len(ss) - 1]  # last index of each distinct score
    tp = np.cumsum(pp)[last]
    fp = np.cumsum(~pp)[last]
    ok = fp / n_neg <= max_fpr + 1e-12
    return float(tp[ok].max() / n_pos) if ok.any() else 0.0


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    y = np.asarray(labels)
    return float(np.mean((np.asarray(probs) >= threshold) == (y == 1))) if len(y) else float("nan")


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, stat: Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = 1000, seed: int = 0) -> list[float]:
    """Percentile 95% CI of ``stat(labels, scores)``; resampling within each class keeps both classes present."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0 or n_boot <= 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals[i] = stat(y[idx], s[idx])
    if not np.isfinite(vals).any():  # e.g. precision of a rule that never says member
        return [float("nan"), float("nan")]
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return [float(lo), float(hi)]


def attack_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float, n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """accuracy (at the validation threshold), AUC, TPR at 1% and 0.1% FPR, each ``{"value", "ci95"}``."""
    y = np.asarray(labels)
    p = np.asarray(probs, np.float64)
    # (point value from scikit-learn, the same statistic for the bootstrap draws)
    stats = {
        "accuracy": (lambda yy, pp: accuracy(yy, pp, threshold),) * 2,
        "auc": (auc, fast_auc),
        "tpr_at_1pct_fpr": (lambda yy, pp: tpr_at_fpr(yy, pp, 0.01), lambda yy, pp: fast_tpr_at_fpr(yy, pp, 0.01)),
        "tpr_at_0_1pct_fpr": (lambda yy, pp: tpr_at_fpr(yy, pp, 0.001),
                              lambda yy, pp: fast_tpr_at_fpr(yy, pp, 0.001)),
    }
    out: dict = {}
    for k, (name, (point, fast)) in enumerate(stats.items()):
        # One seed per statistic keeps each CI reproducible on its own.
        out[name] = {"value": point(y, p), "ci95": bootstrap_ci(y, p, fast, n_boot, seed + k)}
    n_neg = int((y == 0).sum())
    pred = p >= threshold
    out.update(
        threshold=float(threshold),
        tpr_at_threshold=float(pred[y == 1].mean()) if (y == 1).any() else float("nan"),
        fpr_at_threshold=float(pred[y == 0].mean()) if n_neg else float("nan"),
        n_test=int(len(y)),
        n_members=int((y == 1).sum()),
        n_nonmembers=n_neg,
        fpr_resolution=(1.0 / n_neg) if n_neg else None,
    )
    return out


def _mean_where(x: np.ndarray, where: np.ndarray) -> float:
    return float(x[where].mean()) if where.any() else float("nan")


# Statistics of three-way verdicts, over (labels y, verdict codes v: 1 member, 0 non-member, -1 inconclusive).
VERDICT_STATS = {
    "decided_fraction": lambda y, v: float((v >= 0).mean()),
    "member_fraction": lambda y, v: float((v == 1).mean()),
    "nonmember_fraction": lambda y, v: float((v == 0).mean()),
    "fpr": lambda y, v: _mean_where(v == 1, y == 0),  # member verdicts per non-member: what max_fpr bounds
    "tpr": lambda y, v: _mean_where(v == 1, y == 1),
    "miss_rate": lambda y, v: _mean_where(v == 0, y == 1),  # non-member verdicts per member: what max_miss bounds
    "precision": lambda y, v: _mean_where(y == 1, v == 1),  # members among member verdicts
    "npv": lambda y, v: _mean_where(y == 0, v == 0),  # non-members among non-member verdicts
    "accuracy_among_decided": lambda y, v: _mean_where((v == 1) == (y == 1), v >= 0),
}


def verdict_codes(probs: np.ndarray, member_threshold: float | None, nonmember_threshold: float | None) -> np.ndarray:
    """1 member (p >= member_threshold), 0 non-member (p < nonmember_threshold), -1 inconclusive; None: never."""
    p = np.asarray(probs, np.float64)
    v = np.full(len(p), -1, np.int8)
    if nonmember_threshold is not None:
        v[p < nonmember_threshold] = 0
    if member_threshold is not None:
        v[p >= member_threshold] = 1
    return v


def verdict_metrics(labels: np.ndarray, probs: np.ndarray, member_threshold: float | None,
                    nonmember_threshold: float | None, n_boot: int = 1000, seed: int = 0) -> dict:
    """What three-way verdicts at these thresholds do on labelled rows: each of ``VERDICT_STATS`` as
    ``{"value", "ci95"}`` (seeded stratified bootstrap), and the verdict counts."""
    y = np.asarray(labels)
    v = verdict_codes(probs, member_threshold, nonmember_threshold)
    out: dict = {name: {"value": stat(y, v), "ci95": bootstrap_ci(y, v, stat, n_boot, seed + k)}
                 for k, (name, stat) in enumerate(VERDICT_STATS.items())}
    out["counts"] = {"member": int((v == 1).sum()), "non-member": int((v == 0).sum()),
                     "inconclusive": int((v == -1).sum())}
    return out


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """ROC curves (linear and log FPR) of each attack into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for name, (y, s) in curves.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        style = dict(linestyle="--", color="grey") if name == "blind" else {}
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(y, s):.3f})", drawstyle="steps-post", **style)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-4, 1], [1e-4, 1], color="black", linewidth=0.5)
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if scale == "log":
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
    axes[0].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
